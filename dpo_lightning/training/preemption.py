"""Preemption: a SIGTERM (or SIGUSR1 outside SLURM's auto-requeue) only records that the job is being stopped;
each command stops at its own safe point (``fit``: after saving ``last.ckpt`` at the next optimizer step;
``generate``: after the batch being written; ``iterate``: between stages) and raises :class:`Preempted`, which the
CLI turns into exit code :data:`PREEMPTED_EXIT_CODE` so a scheduler requeues the job.

Ctrl-C (SIGINT) is the same request from a person at the terminal: the first stops at the next safe point, as
SIGTERM does (exit code :data:`INTERRUPTED_EXIT_CODE`); a second one stops at once (``KeyboardInterrupt``,
losing the work since the last save).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what a shell reports for a process that SIGTERM ended
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: stopped by Ctrl-C, after saving


class Preempted(RuntimeError):
    """A command stopped on a preemption signal with its work durable (``fit``: a resumable ``last.ckpt``;
    ``generate``: every record written). The message ends with how to resume; ``status`` is what was
    done without it (for a caller, such as ``iterate``, that resumes differently)."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status or message
        # Raised once a watch recorded the signal: Ctrl-C's exit status is the shell's 130, a scheduler's 143.
        self.signal_name = PreemptionWatch.received
        self.exit_code = INTERRUPTED_EXIT_CODE if self.signal_name == "SIGINT" else PREEMPTED_EXIT_CODE


class PreemptionWatch:
    """While started, SIGTERM (and SIGUSR1, unless another handler owns it: SLURM auto-requeue; and SIGINT,
    Ctrl-C, unless the program set its own handler) only records that the job is being preempted
    (`preemption_signal`) and logs ``message``; the code that started the watch stops at its next safe point.
    A second Ctrl-C raises ``KeyboardInterrupt`` at once. Watches nest (``iterate`` around each stage's
    own): a signal received under any of them is seen by all, until the outermost one stops; the
    outermost one starts with nothing received. Outside the main thread (no signal handlers there)
    a watch does nothing.
    """

    received: str | None = None  # the name of the signal received while a watch was started
    _stack: list[PreemptionWatch] = []

    def __init__(self, message: str, forward: Callable[[int], None] | None = None) -> None:
        """
        Args:
            message: What the code that started the watch does on the signal (logged once).
            forward: Called with the signal number on the first signal, e.g. to pass it on to the ranks
                this process started (what Lightning's own SIGTERM handler does, which a watch replaces).
        """
        self.message = message
        self.forward = forward
        self._previous: dict[int, Any] = {}
        self._started = False

    def start(self) -> PreemptionWatch:
        if self._started or threading.current_thread() is not threading.main_thread():
            return self
        if not PreemptionWatch._stack:
            PreemptionWatch.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            current = signal.getsignal(sig)
            if sig == signal.SIGUSR1 and current not in (signal.SIG_DFL, signal.SIG_IGN, None, _on_preemption_signal):
                continue
            if sig == signal.SIGINT and current not in (signal.default_int_handler, _on_preemption_signal):
                continue  # a handler of the program's own (or Ctrl-C ignored): left as it is
            self._previous[sig] = current
            signal.signal(sig, _on_preemption_signal)
        PreemptionWatch._stack.append(self)
        self._started = True
        return self

    def stop(self) -> None:
        if not self._started:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        PreemptionWatch._stack.remove(self)
        self._started = False

    def __enter__(self) -> PreemptionWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _on_preemption_signal(signum: int, frame: FrameType | None) -> None:
    # Only set a flag: each watcher stops at its own safe point (an optimizer step, a written batch, a stage).
    first = PreemptionWatch.received is None
    if signum == signal.SIGINT and not first:
        raise KeyboardInterrupt  # Ctrl-C twice: stop now
    PreemptionWatch.received = PreemptionWatch.received or signal.Signals(signum).name
    if first and PreemptionWatch._stack:
        again = "; press Ctrl-C again to stop at once (losing the work since the last save)" if (
            signum == signal.SIGINT) else ""
        log.warning("received %s: %s%s", PreemptionWatch.received, PreemptionWatch._stack[-1].message, again)
        for watch in PreemptionWatch._stack:
            if watch.forward is not None:
                watch.forward(signum)


def stop_with_launcher() -> None:
    """In a rank Lightning's launcher started (``LOCAL_RANK`` > 0, not under torchrun): a SIGTERM when the
    launching process dies. Killed with ``kill -9``, the launcher (rank 0) cannot pass the signal on, and such a
    rank went on sampling into the folder a re-run then takes over; now it stops as on a preemption. Linux only."""
    if not sys.platform.startswith("linux") or os.environ.get("LOCAL_RANK", "0") == "0":
        return
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's agent stops its workers itself
        return
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
        if os.getppid() == 1:  # the launcher died before this rank asked
            os.kill(os.getpid(), signal.SIGTERM)


def preemption_signal() -> str | None:
    """The name of the preemption signal received while a `PreemptionWatch` was started, else None."""
    return PreemptionWatch.received if PreemptionWatch._stack else None


__all__ = ["INTERRUPTED_EXIT_CODE", "PREEMPTED_EXIT_CODE", "Preempted", "PreemptionWatch", "preemption_signal",
           "stop_with_launcher"]
