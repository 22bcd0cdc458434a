"""What every loss shares: the inputs (`PairLogps`), the output (`LossOutput`), the hyper-parameter
declaration (`Range` on a loss's signature; `HParam`, an entry of the table derived from it) and the small
checks and pieces the loss functions are built from.
"""

import math
from collections.abc import Callable
from typing import Annotated, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PairLogps(NamedTuple):
    """Per-sequence log-probs of a batch of B preference pairs."""

    chosen: Tensor  # (B,) policy, sum of response-token log-probs
    rejected: Tensor  # (B,)
    ref_chosen: Tensor | None  # (B,) reference; None for reference-free use
    ref_rejected: Tensor | None  # (B,)
    chosen_tokens: Tensor  # (B,) response token counts (float or long)
    rejected_tokens: Tensor  # (B,)


class LossOutput(NamedTuple):
    """Per-pair losses (not reduced) and the detached implicit rewards."""

    losses: Tensor  # (B,)
    chosen_rewards: Tensor  # (B,) detached
    rejected_rewards: Tensor  # (B,) detached


LossFn = Callable[..., LossOutput]


# --------------------------------------------------------------------------------------------------------
# shared pieces


def _check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, int | float) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")


class Range(NamedTuple):
    """The valid values of a loss hyper-parameter, declared where the loss function takes it::

        def robust(logps, *, beta: float, label_smoothing: Annotated[float, Range(0.0, 0.5, high_open=True)] = 0.0)

    The signature is the one declaration: its default and this interval become the loss's ``LOSS_HPARAMS``
    entry (``hparams.declared_hparams``). A bound is excluded where ``low_open``/``high_open`` say so, and
    always when it is infinite, so a valid value is finite. ``note`` is added to the error message (e.g. the
    value a paper recommends).
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    note: str = ""


# cDPO's flip probability eps, a hyper-parameter of several losses; 0.5 makes the loss constant
LabelSmoothing = Annotated[float, Range(0.0, 0.5)]


class HParam(NamedTuple):
    """A user hyper-parameter of a loss (an entry of ``LOSS_HPARAMS``): its default and its valid interval,
    read from the loss function's signature (see ``Range``)."""

    default: float
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def interval(self) -> str:
        """The valid values in interval notation, e.g. ``[0.0, 0.5)``."""
        left = "(" if self.low_open or math.isinf(self.low) else "["
        right = ")" if self.high_open or math.isinf(self.high) else "]"
        return f"{left}{self.low}, {self.high}{right}"

    def check(self, loss: str, name: str, value: object) -> float:
        """``value`` as a float if it lies in the interval; ValueError naming loss, hyper-parameter and interval."""
        note = f" ({self.note})" if self.note else ""
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"loss {loss!r} needs {name} to be a number in {self.interval()}{note}, got {value!r}")
        x = float(value)
        above = self.low < x if self.low_open or math.isinf(self.low) else self.low <= x
        below = x < self.high if self.high_open or math.isinf(self.high) else x <= self.high
        if not (above and below):  # NaN fails both
            raise ValueError(f"loss {loss!r} needs {name} in {self.interval()}{note}, got {value!r}")
        return x


def _check_logps(logps: PairLogps) -> None:
    shape = logps.chosen.shape
    if len(shape) != 1:
        raise ValueError(f"log-probs must have shape (B,), got chosen of shape {tuple(shape)}")
    if (logps.ref_chosen is None) != (logps.ref_rejected is None):
        raise ValueError("ref_chosen and ref_rejected must both be tensors or both be None")
    for name in PairLogps._fields:
        value = getattr(logps, name)
        if value is not None and value.shape != shape:
            raise ValueError(f"PairLogps.{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")


def _logratios(logps: PairLogps) -> tuple[Tensor, Tensor]:
    """(hc, hr): policy minus reference log-probs; the reference is a constant (detached)."""
    _check_logps(logps)
    if logps.ref_chosen is None or logps.ref_rejected is None:
        return logps.chosen, logps.rejected
    return logps.chosen - logps.ref_chosen.detach(), logps.rejected - logps.ref_rejected.detach()  # (B,)


def _output(losses: Tensor, beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor) -> LossOutput:
    return LossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
    )


def _per_token(x: Tensor, tokens: Tensor) -> Tensor:
    return x / tokens.detach().to(x.dtype).clamp(min=1.0)  # (B,)


def _as_tensor(value: Tensor | float, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).detach()


def _cdpo(margin: Tensor, label_smoothing: float) -> Tensor:
    """-(1 - eps) * ls(m) - eps * ls(-m): the conservative (label-smoothed) logistic loss."""
    loss = -F.logsigmoid(margin)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-margin)
    return loss
