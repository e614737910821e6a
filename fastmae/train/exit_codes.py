"""The exit codes of ``fastmae pretrain``, importable without torch (``fastmae pretrain --help`` lists them), and
what a rank does before leaving with one of them."""

import os
import signal

EXIT_BAD_SETTING = 2  # a bad setting, a bad image file (see --on-bad-file) or no loadable checkpoint
EXIT_NONFINITE = 3  # stopped after too many consecutive non-finite steps; the last checkpoint is good
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: preempted by SIGTERM/SIGUSR1 after saving a checkpoint; rerun to resume


def let_other_ranks_exit() -> None:
    """Under torchrun (``WORLD_SIZE`` > 1), ignore SIGTERM from here on: every rank has stopped at the same step (and
    saved, if preempted), and torchrun sends SIGTERM to the other workers as soon as one exits non-zero; this lets
    them exit with their own code. In one process (a test or a script calling ``fastmae.cli.main``) nothing changes:
    an ignored SIGTERM would outlive the command and be inherited by every process started afterwards."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
