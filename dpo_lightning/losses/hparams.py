"""The user hyper-parameters of a loss besides beta, read from its signature (`declared_hparams`), and the
check a loss function runs on its own arguments (`_check_hparams`).

A hyper-parameter is declared once, where the loss takes it: a keyword-only argument annotated with a
``Range`` (``label_smoothing: Annotated[float, Range(0.0, 0.5)] = 0.0``). Its default and interval make the
``HParam`` that ``registry.LOSS_HPARAMS`` holds: the functions check their arguments against it,
``check_loss_config`` validates a configuration with it, docs/losses.md tabulates it.
"""

import functools
import inspect
import typing

from dpo_lightning.losses.base import HParam, LossFn, Range


@functools.cache
def declared_hparams(fn: LossFn) -> dict[str, HParam]:
    """``{name: HParam(default, *range)}`` for each keyword-only argument of ``fn`` annotated with a ``Range``,
    in signature order. An argument without a ``Range`` (beta, a batch statistic) is not a hyper-parameter."""
    hints = typing.get_type_hints(fn, include_extras=True)
    declared = {}
    for param in inspect.signature(fn).parameters.values():
        ranges = [m for m in getattr(hints.get(param.name), "__metadata__", ()) if isinstance(m, Range)]
        if not ranges:
            continue
        if param.kind is not inspect.Parameter.KEYWORD_ONLY or param.default is inspect.Parameter.empty:
            raise TypeError(f"{fn.__name__}: hyper-parameter {param.name!r} must be keyword-only with a default")
        declared[param.name] = HParam(param.default, *ranges[0])
    return declared


def _check_hparams(fn: LossFn, **values: object) -> None:
    """Check a loss function's hyper-parameters against its signature's declaration (``declared_hparams``)."""
    declared = declared_hparams(fn)
    for name, value in values.items():
        declared[name].check(fn.__name__, name, value)
