"""The user hyper-parameters of each loss besides beta: defaults and valid intervals (`LOSS_HPARAMS`).
"""

import math

from dpo_lightning.losses.base import HParam

_CDPO_SMOOTHING = HParam(0.0, 0.0, 0.5)  # cDPO's flip probability eps; 0.5 makes the loss constant

# The user hyper-parameters of each loss besides beta, with the function's default and the valid interval.
# The one declaration: the functions check their arguments against it, ``check_loss_config`` validates a
# configuration with it, docs/losses.md tabulates it, and tests check it against the signatures.
LOSS_HPARAMS: dict[str, dict[str, HParam]] = {
    "sigmoid": {"label_smoothing": _CDPO_SMOOTHING},
    "hinge": {},
    "ipo": {},
    "robust": {"label_smoothing": HParam(0.0, 0.0, 0.5, high_open=True)},
    "exo_pair": {
        "label_smoothing": HParam(
            0.0, 0.0, 1.0, low_open=True, high_open=True, note="required; the EXO paper recommends 1e-3"
        )
    },
    "nca_pair": {},
    "bco_pair": {},
    "sppo_hard": {},
    "apo_zero": {},
    "apo_down": {},
    "aot": {"label_smoothing": _CDPO_SMOOTHING},
    "aot_unpaired": {"label_smoothing": _CDPO_SMOOTHING},
    "discopop": {"discopop_tau": HParam(0.05, 0.0, math.inf, low_open=True)},
    "sigmoid_norm": {},
    "sft": {},
    "kto_pair": {},
    "simpo": {"simpo_gamma": HParam(0.5, 0.0), "label_smoothing": _CDPO_SMOOTHING},
    "cpo": {"label_smoothing": _CDPO_SMOOTHING, "cpo_alpha": HParam(1.0, 0.0)},
    "orpo": {},
    "npo": {},
}

# Keyword arguments of the losses that are statistics of the batch, not settings: omitted, the loss computes
# them from its inputs; a module may compute them (e.g. across ranks) and pass them to ``compute_loss``.

def _check_hparams(loss: str, **values: object) -> None:
    """Check a loss function's hyper-parameters against its declaration in ``LOSS_HPARAMS``."""
    for name, value in values.items():
        LOSS_HPARAMS[loss][name].check(loss, name, value)
