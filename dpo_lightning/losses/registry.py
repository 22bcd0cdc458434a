"""Losses by name (`LOSSES`), a whole loss configuration checked before any model loads
(`check_loss_config`), and the weighted sum it selects (`compute_loss`).
"""

import difflib
import functools
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from torch import Tensor

from dpo_lightning.losses.base import (
    HParam,
    LossFn,
    LossOutput,
    PairLogps,
    _check_beta,
)
from dpo_lightning.losses.hparams import declared_hparams
from dpo_lightning.losses.pairwise import (
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco_pair,
    discopop,
    exo_pair,
    hinge,
    ipo,
    kto_pair,
    nca_pair,
    robust,
    sft,
    sigmoid,
    sigmoid_norm,
    sppo_hard,
)
from dpo_lightning.losses.reference_free import cpo, npo, orpo, simpo

# --------------------------------------------------------------------------------------------------------
# selection by name, and the declaration of each loss's hyper-parameters


LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid,
    "hinge": hinge,
    "ipo": ipo,
    "robust": robust,
    "exo_pair": exo_pair,
    "nca_pair": nca_pair,
    "bco_pair": bco_pair,
    "sppo_hard": sppo_hard,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "aot": aot,
    "aot_unpaired": aot_unpaired,
    "discopop": discopop,
    "sigmoid_norm": sigmoid_norm,
    "sft": sft,
    "kto_pair": kto_pair,
    "simpo": simpo,
    "cpo": cpo,
    "orpo": orpo,
    "npo": npo,
}

# The user hyper-parameters of each loss besides beta, with its default and valid interval: read from the
# loss function's signature, where each is declared once (``Range``; see ``hparams.declared_hparams``).
LOSS_HPARAMS: dict[str, dict[str, HParam]] = {name: declared_hparams(fn) for name, fn in LOSSES.items()}


BATCH_STATISTICS: dict[str, str] = {
    "bco_delta": "bco_pair's reward baseline",
    "sft_num_tokens": "the chosen-token count dividing the NLL of sft, cpo and orpo",
    "chosen_kl": "kto_pair's KL estimate of the chosen responses",
    "rejected_kl": "kto_pair's KL estimate of the rejected responses",
    "aot_ref_matched": "aot's rank-matched reference margins",
    "aot_chosen_matched": "aot_unpaired's rank-matched chosen log-ratios",
    "aot_rejected_matched": "aot_unpaired's rank-matched rejected log-ratios",
}

# Losses that never read ``ref_chosen``/``ref_rejected``: they need no reference model.
REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "cpo", "orpo"})

# loss_type names that are not pair losses: "kto" is KTO on unpaired data (``kto_loss``), used on its own.
UNPAIRED_LOSSES: frozenset[str] = frozenset({"kto"})

_RENAMED = {"aot_pair": "aot_unpaired"}


def _unknown_loss(name: object) -> str:
    hint = f" (TRL 1.x renamed {name!r} to {_RENAMED[name]!r})" if name in _RENAMED else ""
    close = difflib.get_close_matches(str(name), [*LOSSES, *UNPAIRED_LOSSES], n=1) if not hint else []
    hint = hint or (f" (did you mean {close[0]!r}?)" if close else "")
    unpaired = ", ".join(sorted(UNPAIRED_LOSSES))
    return (
        f"Unknown loss_type {name!r}{hint}. Valid names: {', '.join(sorted(LOSSES))}; "
        f"and, on its own for unpaired data, {unpaired}"
    )


def get_loss_fn(name: str) -> LossFn:
    """The loss function registered under ``name`` in ``LOSSES``; ValueError listing valid names otherwise."""
    if name in LOSSES:
        return LOSSES[name]
    if name in UNPAIRED_LOSSES:
        raise ValueError(f"loss_type {name!r} is KTO on unpaired data, not a pair loss: use kto_loss")
    raise ValueError(_unknown_loss(name))


@functools.cache
def _keyword_names(fn: LossFn) -> frozenset[str]:
    params = inspect.signature(fn).parameters.values()
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "beta")


def hparam_names(fn: LossFn) -> frozenset[str]:
    """The user hyper-parameters a loss function takes: keyword-only arguments other than ``beta`` that are
    not ``BATCH_STATISTICS``. Read from the signature; tests check it equals the ``LOSS_HPARAMS`` entry
    (the arguments declared with a ``Range``)."""
    return _keyword_names(fn).difference(BATCH_STATISTICS)


def statistic_names(fn: LossFn) -> frozenset[str]:
    """The batch statistics (``BATCH_STATISTICS``) a loss function accepts as keyword arguments."""
    return _keyword_names(fn).intersection(BATCH_STATISTICS)


# --------------------------------------------------------------------------------------------------------
# a checked configuration, and the weighted sum it selects


class LossConfig(NamedTuple):
    """A checked loss configuration: build it with ``check_loss_config``, apply it with ``compute_loss``."""

    loss_type: tuple[str, ...]  # names in LOSSES, or ("kto",) for KTO on unpaired data
    loss_weights: tuple[float, ...]  # one per name
    beta: float
    hparams: tuple[dict[str, float], ...]  # one per name: every hyper-parameter it declares, given or default


def _not_used(key: str, value: object, names: Sequence[str]) -> str:
    users = sorted(loss for loss, declared in LOSS_HPARAMS.items() if key in declared)
    return f"`{key}`={value!r} is not used by loss_type {list(names)}; it is used by: {', '.join(users)}"


def _check_loss_kwargs(names: Sequence[str], loss_kwargs: Mapping[str, object]) -> None:
    """Refuse a loss_kwargs key that is no user hyper-parameter (a typo, a batch statistic, beta, ...)."""
    all_keys = sorted({key for declared in LOSS_HPARAMS.values() for key in declared} - {"label_smoothing"})
    selected = sorted({key for name in names for key in LOSS_HPARAMS.get(name, {})} - {"label_smoothing"})
    for key in loss_kwargs:
        if key in ("beta", "label_smoothing"):
            raise ValueError(f"`{key}` is an argument of its own, not a loss_kwargs key")
        if key in BATCH_STATISTICS:
            raise ValueError(
                f"`{key}` ({BATCH_STATISTICS[key]}) is a batch statistic: it is computed per batch (by the loss "
                "from its inputs, or by the module and passed to compute_loss), not configured; "
                "remove it from loss_kwargs"
            )
        if key not in all_keys:
            close = difflib.get_close_matches(str(key), all_keys, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Unknown loss hyper-parameter {key!r} in loss_kwargs.{hint} The loss_kwargs of loss_type "
                f"{list(names)}: {', '.join(selected) or 'none'} (of all losses: {', '.join(all_keys)}; "
                "beta and label_smoothing are arguments of their own)"
            )


def check_loss_config(
    loss_type: str | Sequence[str],
    *,
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_kwargs: Mapping[str, float] | None = None,
) -> LossConfig:
    """Validate a loss configuration as a module holds it, before any model is loaded; a ``LossConfig``.

    ValueError, naming the offending value and the valid choices, for: an unknown or empty ``loss_type``
    (``"kto"`` is valid only on its own); ``loss_weights`` of the wrong length, or non-finite, or given with
    ``"kto"``; a beta that is not a finite number > 0; a ``loss_kwargs`` key that is not a user
    hyper-parameter (a typo, ``beta``, ``label_smoothing``, or a ``BATCH_STATISTICS`` name); a hyper-parameter
    that none of the selected losses uses (``label_smoothing`` counts as given when it is not 0.0); a value
    outside its loss's interval in ``LOSS_HPARAMS`` (for every selected loss that uses it). The result holds,
    per loss, each hyper-parameter it declares: the given value, or the declared default.
    """
    if isinstance(loss_type, str):
        names = [loss_type]
    elif isinstance(loss_type, Sequence):
        names = list(loss_type)
    else:
        raise ValueError(f"loss_type must be a loss name or a list of names, got {loss_type!r}")
    if not names:
        raise ValueError("loss_type must name at least one loss")
    for name in names:
        if name not in LOSSES and name not in UNPAIRED_LOSSES:
            raise ValueError(_unknown_loss(name))
    unpaired = sorted(set(names) & UNPAIRED_LOSSES)
    if unpaired and len(names) > 1:
        raise ValueError(f"loss_type {unpaired[0]!r} (unpaired data) must be used on its own, got {names}")

    if loss_weights is None:
        weights = (1.0,) * len(names)
    elif unpaired:
        raise ValueError(
            f"loss_weights={list(loss_weights)!r} is not used by loss_type {names} "
            "(KTO's weights are desirable_weight and undesirable_weight)"
        )
    else:
        if len(loss_weights) != len(names):
            raise ValueError(f"loss_weights has {len(loss_weights)} entries but loss_type has {len(names)}: {names}")
        for w in loss_weights:
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                raise ValueError(f"loss_weights must be finite numbers, got {list(loss_weights)!r}")
        weights = tuple(float(w) for w in loss_weights)
    _check_beta(beta)

    loss_kwargs = dict(loss_kwargs or {})
    _check_loss_kwargs(names, loss_kwargs)
    given = dict(loss_kwargs)
    if label_smoothing != 0.0:  # 0.0, the default, counts as not set
        given["label_smoothing"] = label_smoothing
    for key, value in given.items():
        if not any(key in LOSS_HPARAMS.get(name, {}) for name in names):
            raise ValueError(_not_used(key, value, names))
    hparams = tuple(
        {key: spec.check(name, key, given.get(key, spec.default)) for key, spec in LOSS_HPARAMS.get(name, {}).items()}
        for name in names
    )
    return LossConfig(tuple(names), weights, float(beta), hparams)


def compute_loss(
    loss: LossConfig | str | Sequence[str],
    logps: PairLogps,
    *,
    beta: float | None = None,
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float | None = None,
    **kwargs: object,
) -> LossOutput:
    """Weighted sum of the per-pair losses of a configuration (TRL's ``loss_type`` + ``loss_weights``).

        losses = sum_k loss_weights[k] * LOSSES[loss_type[k]](logps, beta=beta, **hparams[k], **statistics).losses

    Two forms, one path. ``compute_loss(config, logps, **statistics)`` with ``config`` from
    ``check_loss_config``: what a module does, validating once up front. ``compute_loss(names, logps,
    beta=..., loss_weights=..., label_smoothing=..., **kwargs)``: builds the config with ``check_loss_config``
    first (so the same errors), the ``kwargs`` that are not ``BATCH_STATISTICS`` being its ``loss_kwargs``.

    ``statistics`` are ``BATCH_STATISTICS`` values for this batch (None = not given); each goes to the losses
    that accept it, and one that no selected loss accepts is a ValueError. Rewards are those of the first loss
    in the list (the losses that use the reference all return beta * summed log-ratios; the choice matters
    for the reference-free ones, which define their own reward).
    """
    if isinstance(loss, LossConfig):
        extra = [k for k, v in (("beta", beta), ("loss_weights", loss_weights)) if v is not None]
        extra += ["label_smoothing"] if label_smoothing is not None else []
        extra += sorted(k for k in kwargs if k not in BATCH_STATISTICS)
        if extra:
            raise ValueError(
                f"compute_loss got a LossConfig and also {extra}: the config holds beta, loss_weights and the "
                f"hyper-parameters; only batch statistics ({', '.join(BATCH_STATISTICS)}) go with it"
            )
        config = loss
    else:
        if beta is None:
            raise TypeError("compute_loss() needs beta when the losses are given by name")
        config = check_loss_config(
            loss,
            loss_weights=loss_weights,
            beta=beta,
            label_smoothing=0.0 if label_smoothing is None else label_smoothing,
            loss_kwargs={k: v for k, v in kwargs.items() if k not in BATCH_STATISTICS},
        )
    statistics = {k: v for k, v in kwargs.items() if k in BATCH_STATISTICS and v is not None}

    names = list(config.loss_type)
    for name in names:
        if name in UNPAIRED_LOSSES:
            raise ValueError(f"loss_type {name!r} is KTO on unpaired data, not a pair loss: use kto_loss")
    fns = [LOSSES[name] for name in names]
    for key in statistics:
        if not any(key in statistic_names(fn) for fn in fns):
            users = sorted(name for name, fn in LOSSES.items() if key in statistic_names(fn))
            raise ValueError(f"`{key}` is not used by loss_type {names}; it is used by: {', '.join(users)}")

    total: Tensor | None = None
    first: LossOutput | None = None
    for fn, weight, hparams in zip(fns, config.loss_weights, config.hparams):
        accepted = statistic_names(fn)
        out = fn(logps, beta=config.beta, **hparams, **{k: v for k, v in statistics.items() if k in accepted})
        first = out if first is None else first
        total = weight * out.losses if total is None else total + weight * out.losses  # (B,)
    assert total is not None and first is not None
    return LossOutput(total, first.chosen_rewards, first.rejected_rewards)
