"""Reference models: the frozen model a stage's loss compares the policy against, one class per kind.

`strategies`: copy (optionally TR-DPO synced), adapter (the LoRA policy with adapters off),
precomputed (log-probs cached by `precompute`), none (reference-free losses).
"""

from dpo_lightning.references.strategies import (
    REFERENCES,
    AdapterReference,
    CopyReference,
    NoReference,
    PrecomputedReference,
    Reference,
    mix_into_reference_,
    resolve_reference,
)

__all__ = [
    "AdapterReference",
    "CopyReference",
    "NoReference",
    "PrecomputedReference",
    "REFERENCES",
    "Reference",
    "mix_into_reference_",
    "resolve_reference",
]
