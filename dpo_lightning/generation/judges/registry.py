"""Judges by name: a spec such as ``"reward_model:<path>"`` -> the judge class its prefix names, built with its
options. Each kind lives in its own file, named here as ``"module:Class"`` and imported when a spec names it.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from dpo_lightning._moved import import_module
from dpo_lightning.generation.judges.base import Judge

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- by name

# Spec prefix -> judge class (or "module:Class", imported when named); the rest of the spec is its first argument.
JUDGES: dict[str, type[Judge] | str] = {
    "function": "dpo_lightning.generation.judges.function:FunctionJudge",
    "reward_model": "dpo_lightning.generation.judges.reward_model:RewardModelJudge",
    "llm_pairwise": "dpo_lightning.generation.judges.llm:LLMPairwiseJudge",
    "llm_score": "dpo_lightning.generation.judges.llm:LLMScoreJudge",
}

_FORMS = ("'function:package.module:function', 'reward_model:<path or hub id>', 'llm_pairwise:<path or hub id>', "
          "'llm_score:<path or hub id>', or a Judge instance")


def judge_class(kind: str) -> type[Judge]:
    """The class registered under a spec prefix (``"llm_pairwise"``...); KeyError for an unknown one."""
    entry = JUDGES[kind]
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(import_module(module), name)
    return entry


def check_options(cls: type[Judge], spec: str, options: dict[str, Any]) -> None:
    """ValueError naming the option when ``cls`` does not take one of ``options`` (a typo in ``judge_options``)."""
    parameters = inspect.signature(cls.__init__).parameters
    takes = [name for name in list(parameters)[2:] if parameters[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
             or parameters[name].kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ValueError(f"judge {spec}: {cls.__name__} takes no option {', '.join(map(repr, unknown))}; its options: "
                         f"{', '.join(takes)}")


def resolve_judge(spec: str | Judge, **options: Any) -> Judge:
    """A judge from its spec: ``"function:pkg.mod:fn"``, ``"reward_model:<path or hub id>"``,
    ``"llm_pairwise:<path or hub id>"``, ``"llm_score:<path or hub id>"`` or a `Judge` (returned as it is).
    ``options`` go to the class (``timeout_s=``, ``batch_size=``, ``template=``...)."""
    if isinstance(spec, Judge):
        if options:
            raise ValueError(f"judge options {sorted(options)} apply to a judge given by spec, not to {spec!r}")
        return spec
    if isinstance(spec, str):
        kind, sep, target = spec.partition(":")
        if sep and target and kind in JUDGES:
            cls = judge_class(kind)
            check_options(cls, spec, options)
            return cls(target, **options)
    raise ValueError(f"judge {spec!r}: expected {_FORMS}")
