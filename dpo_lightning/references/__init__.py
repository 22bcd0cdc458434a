"""References: the frozen model a stage's loss compares the policy against, one file per kind.

`base` (the `Reference` interface: a `FrozenModel` that owns its model), `copy` (a frozen copy of the initial
policy, optionally TR-DPO synced), `adapter` (the LoRA policy with adapters off), `precomputed` (log-probs cached by
`precompute`), `none` (reference-free losses); `registry` resolves a config's value to one.
"""

from dpo_lightning.references.adapter import AdapterReference
from dpo_lightning.references.base import Reference
from dpo_lightning.references.copy import CopyReference, mix_into_reference_
from dpo_lightning.references.none import NoReference
from dpo_lightning.references.precomputed import REF_TABLES_KEY, PrecomputedReference
from dpo_lightning.references.registry import REFERENCES, reference_spec, resolve_reference

__all__ = [
    "AdapterReference",
    "CopyReference",
    "NoReference",
    "PrecomputedReference",
    "REFERENCES",
    "REF_TABLES_KEY",
    "Reference",
    "mix_into_reference_",
    "reference_spec",
    "resolve_reference",
]
