"""Preemption: SIGTERM or SIGUSR1 asks the run to stop; every rank finishes its current step, the run saves
one checkpoint and exits with ``EXIT_PREEMPTED`` (75, ``EX_TEMPFAIL``: try again). Running the same command
again resumes from that checkpoint.

The ranks agree after every step through an all-reduce on a gloo group (host memory only: no device sync), so
a signal that reaches one rank stops them all at the same step. Under ``torchrun``, send SIGTERM to
``torchrun`` (it forwards SIGTERM to every worker and waits for them) or SIGUSR1 to the workers.
"""

from __future__ import annotations

import signal
from types import FrameType

from fastmae.train.distributed import Ranks, all_ranks_agree
from fastmae.train.exit_codes import EXIT_PREEMPTED  # noqa: F401  (re-exported)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatch:
    """Records the first preemption signal; :meth:`agreed` tells every rank whether any rank got one."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks
        self.signal_name: str | None = None
        self._previous = {sig: signal.signal(sig, self._receive) for sig in PREEMPTION_SIGNALS}

    def _receive(self, signum: int, frame: FrameType | None) -> None:
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank once any rank has received a preemption signal (a collective: call on all ranks)."""
        return not all_ranks_agree(self.signal_name is None, self.ranks)  # a host all-reduce: no device sync

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
