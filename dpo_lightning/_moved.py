"""Where the flat layout's modules went (#28), and the one resolver of dotted paths that knows it.

Configs, checkpoints and sample manifests written before the package layout name classes and functions
by their old module (``dpo_lightning.dpo.DPOModule``, ``dpo_lightning.reference.CopyReference``,
``dpo_lightning.checkpoint.AtomicCheckpointIO``, judges as ``dpo_lightning.llm_judges:LLMScoreJudge``).
They keep resolving: every place that imports a dotted path goes through :func:`import_object`, and
the package's ``__getattr__`` answers ``dpo_lightning.<old name>`` with the new module, which is also
how jsonargparse (recipes, ``--print_config``) resolves a class path whose module does not import.
A Python ``import dpo_lightning.dpo`` does not resolve: CHANGELOG.md lists the new module of each.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

PACKAGE = "dpo_lightning"

# old module (under dpo_lightning.) -> new module
MOVED: dict[str, str] = {
    "stage": "stages.base",
    "dpo": "stages.dpo",
    "kto": "stages.kto",
    "sft": "stages.sft",
    "reward": "stages.reward",
    "module": "stages",
    "options": "stages.options",
    "preflight": "stages.preflight",
    "export": "stages.export",
    "reference": "references",
    "precompute": "references.precompute",
    "judges": "generation.judges",
    "llm_judges": "generation.judges.llm",
    "pairing": "generation.pairing",
    "samples_io": "generation.samples_io",
    "sampling": "generation.sampling",
    "config_errors": "cli.config_errors",
    "logprobs": "models.logprobs",
    "lm_head": "models.lm_head",
    "callbacks": "training.callbacks",
    "checkpoint": "training.checkpoint",
    "distributed": "training.distributed",
    "metrics": "training.metrics",
    "optim": "training.optim",
    "runs": "training.runs",
    "folders": "training.folders",
}


def new_module_name(name: str) -> str:
    """``dpo_lightning.dpo`` -> ``dpo_lightning.stages.dpo``; any other name as it is."""
    package, _, rest = name.partition(".")
    if package != PACKAGE or not rest:
        return name
    head, _, tail = rest.partition(".")
    if head not in MOVED:
        return name
    return f"{PACKAGE}.{MOVED[head]}" + (f".{tail}" if tail else "")


def import_module(name: str) -> ModuleType:
    """``importlib.import_module`` that also accepts the flat layout's module names."""
    return importlib.import_module(new_module_name(name))


def import_object(path: str) -> Any:
    """The object a dotted path names: ``package.module.Name`` or ``package.module:Name`` (old module names too).

    Raises ImportError (a module that does not import) or AttributeError (a name it does not define)."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    obj: Any = import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj
