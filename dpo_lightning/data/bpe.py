"""A byte-level BPE tokenizer trained on a dataset's own text, for offline runs and benchmarks.

``load_tokenizer("bpe:4096:../shared/data/hh-rlhf-harmless-base-test.jsonl.gz")`` trains a
4,096-token tokenizer on every string (and message content) of that source's train split, so a
recipe on real data runs without downloading a tokenizer. Training is deterministic and takes
seconds for a few thousand rows. Byte-level: any text round-trips, nothing maps to ``<unk>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from .sources import load_source

BPE_PREFIX = "bpe:"
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # bos, eos, pad: ids 0, 1, 2


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` tokens; BOS is added to every encoding, as Llama does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL_TOKENS[0], eos_token=SPECIAL_TOKENS[1], pad_token=SPECIAL_TOKENS[2]
    )


def build_bpe_tokenizer(spec: str, split: str = "train") -> PreTrainedTokenizerFast:
    """``bpe:<vocab size>:<dataset spec>`` -> a BPE trained on that dataset's ``split``."""
    try:
        _, size, source = spec.split(":", 2)
        vocab_size = int(size)
    except ValueError:
        raise ValueError(f"bad tokenizer spec {spec!r}; expected 'bpe:<vocab size>:<dataset>'") from None
    data = load_source(source, default_split=split)
    if split not in data:
        raise ValueError(f"{source}: no split {split!r} to train the tokenizer on (has {sorted(data)})")
    return train_bpe(_texts(data[split]), vocab_size)


def _texts(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    for row in rows:
        for value in row.values():
            if isinstance(value, str):
                yield value
            elif isinstance(value, list):  # conversational: the messages' contents
                yield from (m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))
