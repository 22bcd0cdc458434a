"""The function judge: a Python function ``"package.module:function"`` scores each response.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import threading
from collections.abc import Callable
from typing import Any

from dpo_lightning._moved import import_module
from dpo_lightning.data.formats import Text
from dpo_lightning.generation.judges.base import (
    Failure,
    Judge,
)

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- functions


def import_function(spec: str) -> Callable[..., Any]:
    """``"package.module:function"`` (or ``"package.module:Class.method"``) -> the callable; ValueError
    naming ``spec`` when it does not parse, import or name a callable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr or ":" in attr:
        raise ValueError(f"function judge {spec!r}: expected 'package.module:function', "
                         "e.g. 'dpo_lightning.data.synthetic:sort_reward'")
    try:
        obj: Any = import_module(module_name)
    except Exception as err:  # ImportError, or whatever importing the module raised
        problem = f"{type(err).__name__}: {err}"
        raise ValueError(f"function judge {spec!r}: cannot import {module_name!r} ({problem})") from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"function judge {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"function judge {spec!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def _check_signature(function: Callable[..., Any], name: str) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins have none; they are called as they are
        return
    try:
        signature.bind("prompt", "response")
    except TypeError as err:
        raise ValueError(f"function judge {name!r}: must take (prompt, response), but its signature is "
                         f"{signature} ({err})") from None


def _qualified_name(function: Callable[..., Any]) -> str:
    module = getattr(function, "__module__", None) or "?"
    return f"{module}:{getattr(function, '__qualname__', type(function).__name__)}"


def _call(function: Callable[..., Any], prompt: Text, response: str) -> Any:
    try:
        return function(prompt, response)
    except Exception as err:
        return Failure(f"raised {type(err).__name__}", str(err))


def _call_with_timeout(function: Callable[..., Any], prompt: Text, response: str, timeout_s: float) -> Any:
    """`_call` in a daemon thread, waited for at most ``timeout_s``. Python cannot stop a thread: a call
    past its timeout runs on in the background (it never blocks the exit) and its result is dropped."""
    box: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append(_call(function, prompt, response))
        except BaseException as err:  # noqa: BLE001 - SystemExit in a thread would be lost silently
            box.append(Failure(f"raised {type(err).__name__}", str(err)))
        finally:
            done.set()

    threading.Thread(target=run, name="judge-function", daemon=True).start()
    if not done.wait(timeout_s):
        return Failure(f"timed out (> {timeout_s:g} s)")
    return box[0]


class FunctionJudge(Judge):
    """Scores each row with a Python function ``(prompt, response) -> float``, e.g. a verifier or a
    ground-truth reward (``dpo_lightning.data.synthetic:sort_reward`` for the bundled sorting task).

    The prompt is passed as the data holds it (a string, or a message list), the response as generated
    (a string). A row whose call raises, returns a non-number, NaN or infinity, or runs past
    ``timeout_s`` is None (counted in ``stats``); the run goes on.
    """

    def __init__(self, function: str | Callable[[Text, str], float], timeout_s: float | None = None) -> None:
        """
        Args:
            function: ``"package.module:function"`` (imported now, so a mistake fails before any generation)
                or a callable.
            timeout_s: Seconds one call may take; None for no limit. A call past it cannot be stopped
                (Python threads cannot be killed): it runs on in a background thread, its result dropped.
        """
        super().__init__()
        if timeout_s is not None and not (isinstance(timeout_s, numbers.Real) and 0 < timeout_s < math.inf):
            raise ValueError(f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
        if isinstance(function, str):
            self.function = import_function(function)
            self._spec = f"function:{function}"
        elif callable(function):
            self.function = function
            self._spec = f"function:{_qualified_name(function)}"
        else:
            raise ValueError(f"function judge: expected 'package.module:function' or a callable, got "
                             f"{type(function).__name__}")
        _check_signature(self.function, self._spec.removeprefix("function:"))
        self.timeout_s = timeout_s

    def score_rows(self, prompts: list[Text], responses: list[str]) -> list[Any]:
        if self.timeout_s is None:
            return [_call(self.function, p, r) for p, r in zip(prompts, responses)]
        return [_call_with_timeout(self.function, p, r, self.timeout_s) for p, r in zip(prompts, responses)]

    def spec(self) -> str:
        return self._spec
