"""`load_tokenizer`: the one place a tokenizer spec becomes a tokenizer (hub id, path, built-in, object)."""

from __future__ import annotations

import logging

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from dpo_lightning.models.loading import check_local_source

from . import synthetic
from .bpe import BPE_PREFIX, build_bpe_tokenizer
from .sources import SYNTHETIC_PREFIX

log = logging.getLogger(__name__)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token one (EOS). Only the attention mask marks padding, so
    reusing EOS as the pad id is safe."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with; set one")
        tokenizer.pad_token = tokenizer.eos_token
        log.info(
            "The tokenizer has no pad token; padding with EOS %r (id %d)",
            tokenizer.eos_token,
            tokenizer.pad_token_id,
        )
    return tokenizer


def load_tokenizer(
    spec: str | PreTrainedTokenizerBase, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """A ready tokenizer (with a pad token) from a spec.

    Args:
        spec: a tokenizer object (used as is), ``synthetic:<name>`` (built by
            `dpo_lightning.data.synthetic.build_tokenizer`), ``bpe:<vocab size>:<dataset>`` (a
            byte-level BPE trained on that dataset, `dpo_lightning.data.bpe`), or a hub id / local path.
        trust_remote_code: let ``AutoTokenizer`` run code shipped with the tokenizer.
    """
    if isinstance(spec, PreTrainedTokenizerBase):
        tokenizer = spec
    elif spec.startswith(SYNTHETIC_PREFIX):

        tokenizer = synthetic.build_tokenizer(spec)
    elif spec.startswith(BPE_PREFIX):
        tokenizer = build_bpe_tokenizer(spec)
    else:
        check_local_source(spec, "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    return ensure_pad_token(tokenizer)


def resolve_tokenizer(
    tokenizer: str | PreTrainedTokenizerBase | None, trust_remote_code: bool
) -> PreTrainedTokenizerBase | None:
    """``load_tokenizer`` for a spec; None and tokenizer objects as they are."""
    if tokenizer is None or isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    return load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
