"""The bundled offline preference task behind ``recipes/tiny.yaml``: sorting digits.

Everything here is generated in code, so the default recipe trains and is tested without a
download: the rows, the tokenizer and the ground-truth reward.

The task. A prompt lists 3..8 random digits; the chosen response is their ascending sort,
the rejected response a near miss of the same length::

    prompt:   "sort: 3 1 4 1 5 ="
    chosen:   " 1 1 3 4 5"
    rejected: " 1 1 4 3 5"    (swap)     or    " 1 1 3 7 5"    (replace)

Responses start with a space so that ``prompt + response`` splits into the prompt's words
followed by the response's words; the data module finds the prompt/response boundary as the
token-level common prefix of the two, which this guarantees.

The near misses, each checkable from local evidence, so a 2-layer transformer learns them in
a few hundred DPO steps on a CPU:

- ``swap``: two adjacent *unequal* elements of the sorted list trade places. The rejected
  response then contains a descent (a digit smaller than the one before it), which a correct
  sort never has: one attention step to the previous token tells them apart.
- ``replace``: one element is replaced by a digit that does not occur in the prompt (with at
  most 8 digits out of 10 such a digit always exists). The rejected response then contains a
  digit absent from the prompt: one attention step back to the prompt tells them apart.

Both kinds keep the length of the correct answer, so summed log-probs cannot win on length,
and both change at least one position, so ``chosen != rejected`` always. Near misses that
would need counting (a dropped or duplicated element, a replacement by a digit that *is* in
the prompt) are left out on purpose: a tiny model learns them far more slowly.

The ground truth. :func:`sort_reward` scores any response against the prompt: 1.0 iff it is
the correct sort, otherwise the fraction of positions that match the correct sort (over the
longer of the two), so always < 1.0. It is what a judge uses to rank model samples into new
preference pairs; every generated pair satisfies ``sort_reward(chosen) > sort_reward(rejected)``.

Entry points, called lazily by the data module for specs starting with ``synthetic:``:
:func:`build_tokenizer`, :func:`load_dataset`; :func:`generate_pairs` underlies the latter.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence

import datasets
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = [
    "NAMES",
    "NEAR_MISS_KINDS",
    "build_tokenizer",
    "generate_pairs",
    "load_dataset",
    "sort_exact",
    "sort_reward",
    "sort_solved",
]

NAMES = ("synthetic:sort",)
NEAR_MISS_KINDS = ("swap", "replace")

_DIGITS = tuple(str(d) for d in range(10))
# Llama's layout for the first ids (unk 0, bos 1, eos 2), then pad, then the words.
_SPECIAL = ("<unk>", "<s>", "</s>", "<pad>")
_VOCAB = (*_SPECIAL, "sort:", "=", *_DIGITS)
_PREFIX, _SUFFIX = "sort:", "="


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown synthetic task {name!r}; valid names: {', '.join(NAMES)}")


def build_tokenizer(name: str = "synthetic:sort") -> PreTrainedTokenizerFast:
    """Word-level tokenizer for the sort task: 16 ids, whitespace split, BOS prepended.

    ``tok("sort: 3 1 =").input_ids == [1, 4, 9, 7, 5]`` (``<s> sort: 3 1 =``); words outside
    the vocabulary map to ``<unk>`` (0). Ids are fixed by ``_VOCAB``, so they never depend on
    the data.
    """
    _check_name(name)
    vocab = {word: i for i, word in enumerate(_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # With add_special_tokens=True this behaves like a Llama tokenizer: BOS first, no EOS.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=64,
    )


def _parse_prompt(prompt: str) -> list[int]:
    words = prompt.split()
    if (
        len(words) < 2
        or words[0] != _PREFIX
        or words[-1] != _SUFFIX
        or not all(w in _DIGITS for w in words[1:-1])
    ):
        raise ValueError(f"not a sort prompt: {prompt!r} (expected 'sort: d d ... =')")
    return [int(w) for w in words[1:-1]]


def _format_prompt(digits: Sequence[int]) -> str:
    return f"{_PREFIX} {' '.join(map(str, digits))} {_SUFFIX}"


def _format_response(digits: Sequence[int]) -> str:
    return "".join(f" {d}" for d in digits)


def sort_reward(prompt: str, response: str) -> float:
    """Ground-truth reward: 1.0 iff ``response`` is the ascending sort of the prompt's digits.

    Otherwise the fraction of positions equal to the correct sort, counted over the longer of
    the two sequences (words that are not digits never match), so any wrong answer scores
    < 1.0. E.g. for "sort: 3 1 4 1 5 =": " 1 1 3 4 5" -> 1.0, " 1 1 4 3 5" -> 3/5 = 0.6,
    " 1 1 3 4" -> 4/5 = 0.8, "" -> 0.0. Raises ValueError if ``prompt`` is not a sort prompt.
    """
    target = [str(d) for d in sorted(_parse_prompt(prompt))]
    words = response.split()
    if words == target:
        return 1.0
    hits = sum(a == b for a, b in zip(words, target))
    return hits / max(len(words), len(target))


def sort_exact(prompt: str, response: str) -> bool:
    """Whether ``response`` is exactly the ascending sort of the prompt's digits: the task's pass/fail
    check, apart from the partial credit of `sort_reward`. Whitespace between words does not matter
    (" 1 1 3" and "1 1 3 " pass for "sort: 3 1 1 ="); anything else does ("1,1,3", " 1 1 3 3" fail)."""
    return response.split() == [str(d) for d in sorted(_parse_prompt(prompt))]


def sort_solved(prompt: str, response: str) -> float:
    """Pass/fail reward: 1.0 if ``response`` is exactly the sort (`sort_exact`), else 0.0, with no partial
    credit, as a verifier scores a math answer. As a judge (``function:dpo_lightning.data.synthetic:
    sort_solved``) it pairs a correct answer against a wrong one only: a prompt whose samples are all
    right, or all wrong, gives no pair (ties)."""
    return 1.0 if sort_exact(prompt, response) else 0.0


def _near_miss(target: list[int], present: set[int], kind: str, rng: random.Random) -> list[int]:
    out = list(target)
    if kind == "swap":
        i = rng.choice([j for j in range(len(out) - 1) if out[j] != out[j + 1]])
        out[i], out[i + 1] = out[i + 1], out[i]
    else:  # replace
        j = rng.randrange(len(out))
        out[j] = rng.choice([d for d in range(10) if d not in present])
    return out


def generate_pairs(
    n: int,
    seed: int,
    *,
    min_len: int = 3,
    max_len: int = 8,
    kinds: Sequence[str] = NEAR_MISS_KINDS,
    exclude_prompts: Iterable[str] = (),
) -> list[dict[str, str]]:
    """``n`` rows ``{"prompt", "chosen", "rejected"}`` with distinct prompts, deterministic in ``seed``.

    Each prompt has a uniform length in ``[min_len, max_len]`` and uniform digits; the near-miss
    kind is drawn uniformly from ``kinds`` (``swap`` falls back to ``replace`` when all digits
    are equal). Prompts in ``exclude_prompts`` are never produced (this keeps splits disjoint).
    """
    if not 2 <= min_len <= max_len <= 9:
        raise ValueError(f"need 2 <= min_len <= max_len <= 9, got {min_len}, {max_len}")
    unknown = set(kinds) - set(NEAR_MISS_KINDS)
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {NEAR_MISS_KINDS}, got {tuple(kinds)}")
    rng = random.Random(seed)
    seen = set(exclude_prompts)
    rows: list[dict[str, str]] = []
    # There are ~10^max_len distinct prompts; the cap only guards against asking for more.
    for _ in range(100 * n + 1000):
        if len(rows) == n:
            break
        digits = [rng.randrange(10) for _ in range(rng.randint(min_len, max_len))]
        prompt = _format_prompt(digits)
        if prompt in seen:
            continue
        seen.add(prompt)
        target = sorted(digits)
        kind = rng.choice(list(kinds))
        if kind == "swap" and len(set(digits)) == 1:
            kind = "replace"
        rejected = _near_miss(target, set(digits), kind, rng)
        rows.append(
            {"prompt": prompt, "chosen": _format_response(target), "rejected": _format_response(rejected)}
        )
    if len(rows) < n:
        raise ValueError(f"could not draw {n} distinct prompts with lengths {min_len}..{max_len}")
    return rows


def _derive_seed(seed: int, split: str) -> int:
    # Independent streams per split, stable across Python processes (unlike hash()).
    return int.from_bytes(hashlib.sha256(f"{seed}:{split}".encode()).digest()[:8], "little")


def load_dataset(
    name: str = "synthetic:sort", seed: int = 0, num_train: int = 10_000, num_val: int = 200
) -> datasets.DatasetDict:
    """Splits ``train`` and ``validation`` of string columns prompt/chosen/rejected.

    Deterministic in ``seed``; no validation prompt occurs in ``train``. The validation split
    does not depend on ``num_train``. The defaults suit the CPU recipe: a 2-layer, 64-wide Llama
    reaches >= 97% held-out reward accuracy in ~100-250 steps of batch 32 (lr 1e-3, beta 0.1),
    i.e. under one epoch of 10k pairs, so it does not see pairs often enough to memorise them
    (with 2k pairs, ~10 epochs, held-out accuracy stalled at 94-96% on some seeds).
    """
    _check_name(name)
    val = generate_pairs(num_val, _derive_seed(seed, "validation"))
    train = generate_pairs(
        num_train, _derive_seed(seed, "train"), exclude_prompts=(row["prompt"] for row in val)
    )
    features = datasets.Features({k: datasets.Value("string") for k in ("prompt", "chosen", "rejected")})
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(train, features=features),
            "validation": datasets.Dataset.from_list(val, features=features),
        }
    )
