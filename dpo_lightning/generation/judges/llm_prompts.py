"""The text side of an LLM judge: its default templates, the template and verdict checks that run before any
weights load (`check_template`, `verdict_ids`), and a row's text (`fill`, `prompt_text`, the chat wrapping).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from dpo_lightning.data.formats import Text

PLACEHOLDER = re.compile(r"\{(\w+)\}")

PAIRWISE_TEMPLATE = (
    "Which response answers the prompt better?\n\nPrompt:\n{prompt}\n\nResponse A:\n{response_a}\n\n"
    "Response B:\n{response_b}\n\nAnswer with A or B only. The better response is"
)
SCORE_TEMPLATE = (
    "Rate how well the response answers the prompt, from 1 (poor) to 5 (excellent).\n\nPrompt:\n{prompt}\n\n"
    "Response:\n{response}\n\nAnswer with one digit only. Rating:"
)


def check_template(template: str, required: Sequence[str], name: str) -> None:
    """ValueError naming ``name`` when ``template`` lacks one of the ``required`` ``{placeholders}`` or
    has another one (a typo such as ``{respones}``); other braces are text."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{name}: the template must be a non-empty string, got {template!r}")
    found = set(PLACEHOLDER.findall(template))
    missing = [p for p in required if p not in found]
    unknown = sorted(found - set(required))
    if missing or unknown:
        problems = ([f"missing {', '.join('{' + p + '}' for p in missing)}"] if missing else []) + (
            [f"unknown {', '.join('{' + p + '}' for p in unknown)}"] if unknown else [])
        raise ValueError(f"{name}: the template's placeholders are wrong ({'; '.join(problems)}); it takes exactly "
                         f"{', '.join('{' + p + '}' for p in required)}")


def fill(template: str, fields: dict[str, str]) -> str:
    """The template with each ``{name}`` replaced, in one pass (a response containing ``{prompt}`` stays as it is)."""
    return PLACEHOLDER.sub(lambda m: fields[m.group(1)], template)


def prompt_text(prompt: Text) -> str:
    """A prompt as the judge reads it: a string as it is, a message list as ``role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def verdict_ids(tokenizer: PreTrainedTokenizerBase, verdicts: Sequence[str], name: str) -> list[int]:
    """The token id of each verdict; ValueError naming ``name`` when one is not exactly one token, maps to the
    unknown token, or two share an id: the verdict is read from one next-token logit per verdict."""
    if len(verdicts) < 2:
        raise ValueError(f"{name}: give at least 2 verdict tokens, got {list(verdicts)!r}")
    ids = []
    for verdict in verdicts:
        if not isinstance(verdict, str) or not verdict:
            raise ValueError(f"{name}: each verdict must be a non-empty string, got {verdict!r}")
        encoded = tokenizer.encode(verdict, add_special_tokens=False)
        if len(encoded) != 1:
            pieces = tokenizer.convert_ids_to_tokens(encoded)
            raise ValueError(f"{name}: verdict {verdict!r} is {len(encoded)} tokens {pieces} in the judge's tokenizer, "
                             "not one; the verdict is read from one next-token logit, so pick verdicts that are single "
                             "tokens (with or without a leading space, as the model would write them)")
        unk = tokenizer.unk_token_id
        if unk is not None and encoded[0] == unk and verdict.strip() != tokenizer.unk_token:
            raise ValueError(f"{name}: verdict {verdict!r} is not in the judge tokenizer's vocabulary (it maps to "
                             f"{tokenizer.unk_token!r})")
        ids.append(encoded[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: verdicts {list(verdicts)!r} map to the token ids {ids}; each needs its own token")
    return ids


def _check_known_words(tokenizer: PreTrainedTokenizerBase, template: str, name: str) -> None:
    """ValueError when the template's own text (placeholders aside) has words the tokenizer maps to its unknown
    token: the judge would read ``<unk>`` where the question should be (a template written for another tokenizer)."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return  # byte-level tokenizers spell every text
    unknown = [word for part in PLACEHOLDER.split(template)[::2] for word in part.split()
               if unk in tokenizer.encode(word, add_special_tokens=False) and word != tokenizer.unk_token]
    if unknown:
        shown = ", ".join(map(repr, dict.fromkeys(unknown)))
        raise ValueError(f"{name}: the template's words {shown[:200]} are not in the judge tokenizer's vocabulary "
                         f"(they map to {tokenizer.unk_token!r}); write the template in words the judge knows")


def _default_verdicts(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> tuple[str, ...]:
    # After a chat template's generation prompt the reply starts a new text; in plain text it follows a word.
    return tuple(words) if getattr(tokenizer, "chat_template", None) else tuple(f" {w}" for w in words)


def _as_chat(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)
