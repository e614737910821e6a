"""The exit codes of ``fastmae pretrain``, importable without torch (``fastmae pretrain --help`` lists them)."""

EXIT_BAD_SETTING = 2  # a bad setting, a bad image file (see --on-bad-file) or no loadable checkpoint
EXIT_NONFINITE = 3  # stopped after too many consecutive non-finite steps; the last checkpoint is good
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: preempted by SIGTERM/SIGUSR1 after saving a checkpoint; rerun to resume
