"""The exit codes of ``fastmae pretrain``, importable without torch (``fastmae pretrain --help`` lists them), and
what a rank does before leaving with one of them."""

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

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


def run_command(name: str, run: Callable[[], Any]) -> tuple[int, Any]:
    """Run a training command's body ``run()`` (``fastmae pretrain`` / ``finetune`` / ``linprobe``) and turn how it
    ended into ``(exit code, summary)``: a bad setting, bad image or no loadable checkpoint -> 2, too many non-finite
    steps -> 3, preempted -> 75 (each with its one line on stderr, summary None for a failure); else 0 and the summary
    (``status`` "already complete" when nothing was changed; the caller prints a completed run's line)."""
    from fastmae.data.bad_files import BadImageError
    from fastmae.train.checkpoint import NoLoadableCheckpointError
    from fastmae.train.config import SettingError
    from fastmae.train.nonfinite import NonFiniteError

    try:
        summary = run()
    except SettingError as exc:  # raised before anything is written
        print(f"{name}: {exc.with_flags()}", file=sys.stderr)
        return EXIT_BAD_SETTING, None
    except (BadImageError, NoLoadableCheckpointError) as exc:  # a bad image, too many skipped, damaged checkpoints
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTING, None
    except NonFiniteError as exc:
        print(f"{name} (rank {os.environ.get('RANK', '0')}): {exc}", file=sys.stderr)
        let_other_ranks_exit()
        return EXIT_NONFINITE, None
    if summary.status == "preempted":
        let_other_ranks_exit()
        return EXIT_PREEMPTED, summary
    return 0, summary
