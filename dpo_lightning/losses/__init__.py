"""Preference losses: per-sequence log-probs ``(B,)`` -> per-pair losses ``(B,)`` + detached rewards.

Every function here is pure: no model calls, no reduction over the batch, no distributed code, no state.
A loss is chosen by name through ``LOSSES`` (names and formulas follow TRL 1.x ``DPOConfig.loss_type``);
``compute_loss`` sums a weighted list of them, as TRL does for ``loss_type=[...]`` with ``loss_weights``.
Each loss's user hyper-parameters (besides beta) are declared once, on its signature (default and a ``Range``
of valid values), and tabulated from there in ``LOSS_HPARAMS``; ``check_loss_config`` validates a whole
configuration against it before any model is loaded (unknown names, unused or misspelled hyper-parameters,
out-of-range values) and returns the ``LossConfig`` that ``compute_loss`` applies.

Notation used in the docstrings (all tensors are ``(B,)``, one entry per preference pair):

    c, r      policy log-prob of the chosen / rejected response (sum over response tokens)
    rc, rr    reference log-prob of the same responses (treated as constants; detached here)
    Lc, Lr    number of response tokens of the chosen / rejected response (clamped at >= 1 where divided by)
    hc = c - rc, hr = r - rr          chosen / rejected log-ratios
    D  = hc - hr                      the DPO margin
    s(x) = sigmoid(x),  ls(x) = log sigmoid(x)

When ``ref_chosen``/``ref_rejected`` are ``None`` the losses below are reference-free: ``hc = c`` and
``hr = r`` (TRL 0.x's ``reference_free=True``, a reference that gives every response the same probability).

Rewards are ``beta * hc`` and ``beta * hr``, detached, with the raw (summed) log-ratios, as TRL 1.x
logs them for every ``loss_type`` (including ``ipo`` and ``sigmoid_norm``, whose *loss* is length-normalised).
The reference-free losses of TRL's CPO/ORPO trainers (``simpo``, ``cpo``, ``orpo``; see ``REFERENCE_FREE``)
ignore ``ref_*`` and return beta times the policy log-probs those trainers log (length-averaged for
``simpo`` and ``orpo``). ``npo`` reads only the rejected side. KTO on unpaired data is not a pair loss: it
has its own function, ``kto_loss``, with the helpers ``kto_kl_estimate``, ``kto_reference_point`` and
``kto_weight_warning``.

A few methods are defined on batch statistics (KTO's KL reference point, BCO's reward baseline, the token
mean of the SFT term, AOT's sorting). Each takes that statistic as an optional keyword argument (named in
``BATCH_STATISTICS``; these are not hyper-parameters and cannot be configured) so a module can pass an exact
cross-rank value; when it is omitted the local batch is used, as TRL does (for ``bco_pair``: delta = 0, as
TRL 1.16). The helpers ``kto_pair_batch_kl``, ``bco_batch_reward_mean`` and ``rank_matched`` compute them.

The functions live by family: `pairwise`, `reference_free`, `unpaired` (KTO), `reward` (Bradley-Terry);
`statistics` computes the batch statistics, `base` holds what they share, `hparams` reads their
hyper-parameters from the signatures, `registry` selects by name.
"""

from dpo_lightning.losses.base import HParam, LossFn, LossOutput, PairLogps, Range
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
from dpo_lightning.losses.registry import (
    BATCH_STATISTICS,
    LOSS_HPARAMS,
    LOSSES,
    REFERENCE_FREE,
    UNPAIRED_LOSSES,
    LossConfig,
    check_loss_config,
    compute_loss,
    get_loss_fn,
    hparam_names,
    statistic_names,
)
from dpo_lightning.losses.reward import bradley_terry_loss
from dpo_lightning.losses.statistics import bco_batch_reward_mean, kto_pair_batch_kl, rank_matched
from dpo_lightning.losses.unpaired import KTOOutput, kto_kl_estimate, kto_loss, kto_reference_point, kto_weight_warning

__all__ = [
    "BATCH_STATISTICS",
    "HParam",
    "KTOOutput",
    "LOSSES",
    "LOSS_HPARAMS",
    "LossConfig",
    "LossFn",
    "LossOutput",
    "PairLogps",
    "REFERENCE_FREE",
    "Range",
    "UNPAIRED_LOSSES",
    "aot",
    "aot_unpaired",
    "apo_down",
    "apo_zero",
    "bco_batch_reward_mean",
    "bco_pair",
    "bradley_terry_loss",
    "check_loss_config",
    "compute_loss",
    "cpo",
    "declared_hparams",
    "discopop",
    "exo_pair",
    "get_loss_fn",
    "hinge",
    "hparam_names",
    "ipo",
    "kto_kl_estimate",
    "kto_loss",
    "kto_pair",
    "kto_pair_batch_kl",
    "kto_reference_point",
    "kto_weight_warning",
    "nca_pair",
    "npo",
    "orpo",
    "rank_matched",
    "robust",
    "sft",
    "sigmoid",
    "sigmoid_norm",
    "simpo",
    "sppo_hard",
    "statistic_names",
]
