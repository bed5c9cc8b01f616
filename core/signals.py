"""Stopping a run cleanly: SIGTERM and Ctrl-C end it at the next step boundary, not mid-step.

The loop then writes a checkpoint (when checkpointing is on), every sink is ended and the backend
closed as for any other end, and the command line prints how to resume (or, when the backend
says a resume cannot use the checkpoint, why and what is left) and exits with 143 (SIGTERM) or
130 (Ctrl-C). A signal that comes while the backend starts or the reference pass
runs ends the run when that phase is done. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from .errors import PreftuneError
from .messages import log

NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}


class Stopped(PreftuneError):
    """The run stopped at a step boundary because it was asked to (a signal)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.advice: str | None = None  # set when the backend says a resume cannot use it
        saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (checkpoint_interval = 0)"
        super().__init__(f"stopped by {NAMES.get(signum, signum)} after step {step}; {saved}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Records SIGTERM and the first Ctrl-C while installed; the loop looks at ``signum``."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers live there only
            for signum in NAMES:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def check(self, step: int, signum: int | None = None) -> None:
        """At a boundary before training (the backend built, the reference done): a signal
        received so far (here, or ``signum``: on any rank) stops the run, with nothing to
        checkpoint."""
        signum = signum if signum is not None else self.signum
        if signum is not None:
            raise Stopped(signum, step, None)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signum = signum
        log(f"{NAMES[signum]}: stopping after this step (Ctrl-C again to stop at once)")


def resume_advice(backend: Any, status: str, stopped: Stopped | None) -> None:
    """After the backend closed: its optional ``resume_advice()`` says why ``--resume`` cannot
    continue the run (a remote job holding the checkpoint's state was deleted) and what is left.
    A stopped run carries it, for the command line to print in place of the resume command; after
    a failure it is logged."""
    advise = getattr(backend, "resume_advice", None)
    advice = advise() if callable(advise) and status != "completed" else None
    if stopped is not None:
        stopped.advice = advice
    elif advice:
        log(advice)
