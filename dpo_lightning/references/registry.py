"""The reference kinds by short name, and the one resolver from a config's value to a Reference."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from dpo_lightning._moved import import_module
from dpo_lightning.references.adapter import AdapterReference
from dpo_lightning.references.base import Reference
from dpo_lightning.references.copy import CopyReference
from dpo_lightning.references.none import NoReference
from dpo_lightning.references.precomputed import PrecomputedReference

REFERENCES: dict[str, type[Reference]] = {
    cls.name: cls for cls in (CopyReference, AdapterReference, PrecomputedReference, NoReference)
}


def resolve_reference(spec: str | Reference | Mapping[str, Any]) -> Reference:
    """A reference from its short name (``copy``), an instance, or ``{class_path, init_args}``."""
    if isinstance(spec, Reference):
        return spec
    if isinstance(spec, Mapping):  # as stored in hyper-parameters (load_from_checkpoint)
        module, _, name = str(spec["class_path"]).rpartition(".")
        cls = getattr(import_module(module), name)
        if not (isinstance(cls, type) and issubclass(cls, Reference)):
            raise ValueError(f"{spec['class_path']} is not a dpo_lightning.references.Reference")
        return cls(**dict(spec.get("init_args") or {}))
    if spec not in REFERENCES:
        close = difflib.get_close_matches(str(spec), list(REFERENCES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown reference {spec!r}{hint}: use one of {', '.join(REFERENCES)} or a Reference class")
    return REFERENCES[spec]()


def reference_spec(value: Any) -> Any:
    """A config's ``reference`` value as a stage records it (:meth:`Reference.spec`): ``copy`` and its expansion
    ``{class_path: ...CopyReference, init_args: {sync_steps: null, ...}}`` are one setting. A value that does not
    resolve is returned as it is (the stage reports it)."""
    plain = value.as_dict() if hasattr(value, "as_dict") else value
    try:
        return resolve_reference(plain).spec()
    except (ValueError, TypeError, ImportError, AttributeError, KeyError):
        return value


__all__ = ["REFERENCES", "reference_spec", "resolve_reference"]
