"""``fastmae bench``'s run: training-step throughput of fastmae and the baselines, one CSV row each.

A run has a task: ``pretrain`` (MAE pretraining steps of the ``mae_*`` presets at mask ratio 0.75) or
``finetune`` (end-to-end fine-tuning steps of the ``vit_*`` classifier presets, ``fastmae.benchmark.finetune_step``;
synthetic input only; their rows leave ``mask_ratio`` empty).

For each model, input mode and implementation (in the order given): build the step, run
``warmup`` steps, time ``steps`` steps, count the CUDA kernels of one more step (on CUDA, unless
``count_kernels`` is off), and upsert the row into ``<results-dir>/<gpu>.csv`` at
once, so a run cut short keeps every row it finished. A row that runs out of GPU memory is retried
once at half the batch, then recorded as ``oom``; any other failure is recorded as ``error: ...``
and the next row runs; an implementation that cannot run here (a baseline's missing dependency,
a CUDA graph on a CPU) is reported as skipped and not written. ``--max-seconds`` stops starting
new rows once spent. Memory is freed between rows.
"""

from __future__ import annotations

import gc
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

import fastmae
from fastmae.benchmark.finetune_step import FINETUNE_IMPLS, check_vit_name, fastmae_classifier
from fastmae.benchmark.inputs import INPUT_MODES, BatchSource, input_unavailable_reason
from fastmae.benchmark.peak import measure_matmul_tflops, mfu, spec_tflops
from fastmae.benchmark.registry import (
    CPU_DEFAULT_FINETUNE_IMPLS,
    CPU_DEFAULT_IMPLS,
    GPU_DEFAULT_FINETUNE_IMPLS,
    GPU_DEFAULT_IMPLS,
    TASKS,
    Builders,
    check_impl_names,
    load_builders,
    unavailable_reason,
)
from fastmae.benchmark.results import gpu_slug, upsert_rows
from fastmae.benchmark.timing import Timing, count_kernels, time_train_step
from fastmae.benchmark.train_step import FASTMAE_IMPLS, MASK_RATIO, StepUnavailable, TrainStep, check_model_name
from fastmae.flops import classifier_flops, mae_flops
from fastmae.model import PRESETS

# Relative: the folder where fastmae bench is run, never the installed package or its source tree.
# The repository's committed GPU results live in bench/results (bench/device_check.sh passes it).
DEFAULT_RESULTS_DIR = Path("bench-results")
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class BenchDefaults:
    """What ``fastmae bench`` measures where it is not told, on one kind of device."""

    models: tuple[str, ...]
    batch_size: int
    steps: int
    warmup: int
    impls: tuple[str, ...]  # off CUDA, those that cannot run there are left out (bench_defaults)


GPU_DEFAULTS = BenchDefaults(models=("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14"),
                             batch_size=256, steps=20, warmup=5, impls=GPU_DEFAULT_IMPLS)
# A CPU run of under a minute (53 s on 2 shared cores, 224 px, 4 rows): the tiny preset, a small batch,
# a few steps.
CPU_DEFAULTS = BenchDefaults(models=("mae_vit_tiny_patch16",), batch_size=8, steps=3, warmup=1,
                             impls=CPU_DEFAULT_IMPLS)
# Fine-tuning ViT-B/L at 224 px, batch 128 per GPU (the recipe's is 32 per GPU x 4 accumulation steps: 128 images
# per optimiser step and GPU); on a CPU the tiny ViT.
FINETUNE_GPU_DEFAULTS = BenchDefaults(models=("vit_base_patch16", "vit_large_patch16"), batch_size=128, steps=20,
                                      warmup=5, impls=GPU_DEFAULT_FINETUNE_IMPLS)
FINETUNE_CPU_DEFAULTS = BenchDefaults(models=("vit_tiny_patch16",), batch_size=8, steps=3, warmup=1,
                                      impls=CPU_DEFAULT_FINETUNE_IMPLS)
TASK_DEFAULTS = {"pretrain": (GPU_DEFAULTS, CPU_DEFAULTS), "finetune": (FINETUNE_GPU_DEFAULTS, FINETUNE_CPU_DEFAULTS)}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``: ``None`` is cuda when available, else cpu; only cuda[:N] and cpu."""
    if device is not None and not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str, a torch.device or None, got {type(device).__name__}")
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be cuda, cuda:N or cpu, got {device!r}") from None
    if resolved.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda, cuda:N or cpu, got {device!r}")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device here")
    return resolved


def bench_defaults(device: torch.device, task: str = "pretrain") -> BenchDefaults:
    """The task's GPU defaults on CUDA (``GPU_DEFAULTS``, ``FINETUNE_GPU_DEFAULTS``); elsewhere its CPU defaults
    less the implementations that cannot run there (``hf`` without transformers)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    gpu, cpu = TASK_DEFAULTS[task]
    if device.type == "cuda":
        return gpu
    return replace(cpu, impls=tuple(i for i in cpu.impls if unavailable_reason(i, device) is None))


@dataclass
class BenchConfig:
    """What ``fastmae bench`` measures; ``batch_sizes`` holds one size for every model or one per model.

    ``device`` ``None`` is cuda when available, else cpu; after construction it is a ``torch.device``.
    ``models``, ``impls``, ``batch_sizes``, ``steps`` and ``warmup`` left ``None`` get that device's and task's
    ``bench_defaults`` (the GPU set on CUDA, a small CPU set elsewhere); ``defaults_used`` names them.
    ``task``: ``pretrain`` (``mae_*`` presets) or ``finetune`` (``vit_*`` presets, synthetic input only).
    """

    models: tuple[str, ...] | None = None
    impls: tuple[str, ...] | None = None
    batch_sizes: tuple[int, ...] | None = None
    img_size: int = 224
    steps: int | None = None
    warmup: int | None = None
    inputs: tuple[str, ...] = ("synthetic",)
    results_dir: Path = DEFAULT_RESULTS_DIR
    device: str | torch.device | None = None
    max_seconds: float | None = None
    data_dir: Path | None = None  # JPEG folder for the loader input; default: the generated demo set
    loader_workers: int | None = None
    count_kernels: bool = True  # profile one more step per row on CUDA and record its kernel count
    task: str = "pretrain"
    defaults_used: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        defaults = bench_defaults(self.device, self.task)
        fallback = {"models": defaults.models, "impls": defaults.impls, "batch_sizes": (defaults.batch_size,),
                    "steps": defaults.steps, "warmup": defaults.warmup}
        self.defaults_used = tuple(name for name in fallback if getattr(self, name) is None)
        for name in self.defaults_used:
            setattr(self, name, fallback[name])
        self.models, self.impls, self.inputs = tuple(self.models), tuple(self.impls), tuple(self.inputs)
        self.batch_sizes = tuple(self.batch_sizes)
        if not self.models or not self.impls or not self.inputs:
            raise ValueError("models, impls and inputs must each name at least one item")
        for name in self.models:
            (check_model_name if self.task == "pretrain" else check_vit_name)(name)
        check_impl_names(self.impls, self.task)
        bad_inputs = [m for m in self.inputs if m not in INPUT_MODES]
        if bad_inputs:
            raise ValueError(f"unknown input mode(s) {bad_inputs}; expected names from {list(INPUT_MODES)}")
        if self.task == "finetune" and self.inputs != ("synthetic",):
            raise ValueError(f"the finetune task takes synthetic input only (the loaders feed pretraining), got "
                             f"{list(self.inputs)}")
        if len(self.batch_sizes) not in (1, len(self.models)) or not all(
                isinstance(b, int) and b >= 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be one positive int, or one per model ({len(self.models)}), "
                             f"got {self.batch_sizes}")
        if self.task == "finetune" and any(b % 2 for b in self.batch_sizes):
            raise ValueError(f"the finetune task needs even batch sizes (timm's Mixup pairs each batch), got "
                             f"{self.batch_sizes}")
        for name in ("img_size", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {self.warmup!r}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        self.results_dir = Path(self.results_dir)

    def batch_for(self, model: str) -> int:
        return self.batch_sizes[0] if len(self.batch_sizes) == 1 else self.batch_sizes[self.models.index(model)]


@dataclass(frozen=True)
class RunContext:
    """What every row of one run shares."""

    device: torch.device
    gpu: str
    csv_path: Path
    matmul_tflops: float | None  # measured dense bf16 rate; None on a CPU
    spec_tflops: float | None  # datasheet rate; None on a CPU or an unknown card
    versions: dict[str, str]


@dataclass(frozen=True)
class Attempt:
    """One try at one row."""

    status: str  # "ok" | "oom" | "error: ..." | "skipped: ..."
    meta: dict[str, object] | None = None  # dtype, compile, cuda_graph of the built step
    timing: Timing | None = None
    setup_s: float | None = None
    kernels: int | None = None  # CUDA kernels of one step (None off CUDA, or when not counted)
    input_detail: str = ""  # which input the row had (BatchSource.detail)
    note: str | None = None  # a side remark for the log (a kernel count that failed)


def _git_revision() -> str:
    root = Path(fastmae.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return "unknown"
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def _versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda or "none",
            "git_rev": _git_revision()}


def _context(cfg: BenchConfig, log: Callable[[str], None]) -> RunContext:
    device = cfg.device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        gpu = torch.cuda.get_device_name(device)
        measured = measure_matmul_tflops(device)
        spec = spec_tflops(gpu)
        log(f"{gpu}: dense bf16 matmul (8192^3) {measured:.1f} TFLOP/s measured, "
            f"spec {'unknown' if spec is None else f'{spec:.1f}'} TFLOP/s")
    else:  # resolve_device allows only cuda and cpu
        gpu, measured, spec = "cpu", None, None
    return RunContext(device, gpu, cfg.results_dir / f"{gpu_slug(gpu)}.csv", measured, spec, _versions())


def _expected_meta(impl: str, device: torch.device) -> dict[str, object] | None:
    """dtype/compile/cuda_graph of a fastmae variant or a fine-tuning row without building it (the pretraining
    baselines are known once built)."""
    dtype = "bf16" if device.type == "cuda" else "fp32"
    if impl in FINETUNE_IMPLS:
        return {"dtype": dtype, "compile": FINETUNE_IMPLS[impl].compile, "cuda_graph": False}
    if impl not in FASTMAE_IMPLS:
        return None
    variant = FASTMAE_IMPLS[impl]
    return {"dtype": dtype, "compile": variant.compile, "cuda_graph": variant.cuda_graph}


def _step_meta(step: TrainStep) -> dict[str, object]:
    return {"dtype": step.dtype, "compile": step.compile, "cuda_graph": step.cuda_graph}


def _is_oom(exc: BaseException) -> bool:
    """Out of GPU memory, also when wrapped (torch.compile re-raises errors from inside its backend)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _describe(exc: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}"[:MAX_ERROR_CHARS]


def _check_step(step: object, impl: str, model: str, batch: int) -> TrainStep:
    if not isinstance(step, TrainStep):
        raise TypeError(f"the {impl} builder must return a TrainStep, got {type(step).__name__}")
    if (step.model_name, step.batch_size) != (model, batch):
        raise ValueError(f"the {impl} builder was asked for {model} at batch {batch}, "
                         f"built {step.model_name} at batch {step.batch_size}")
    return step


def _attempt(builders: Builders, impl: str, model: str, batch: int, mode: str, cfg: BenchConfig,
             ctx: RunContext) -> Attempt:
    """Build and time one row; every exception becomes a status (so no tensor outlives the call)."""
    step = source = None
    start = time.perf_counter()
    try:
        try:
            step = _check_step(builders.builders[impl](model, batch, cfg.img_size, ctx.device), impl, model, batch)
        except StepUnavailable as exc:  # cannot run here (e.g. transformers missing); any other error is an error
            return Attempt(f"skipped: {_describe(exc)}")
        build_s = time.perf_counter() - start
        source = BatchSource(mode, batch, cfg.img_size, ctx.device, cfg.warmup + cfg.steps, cfg.data_dir,
                             cfg.loader_workers)
        timing = time_train_step(step, source, cfg.steps, cfg.warmup, ctx.device)
        kernels, note = None, None
        if cfg.count_kernels:
            try:
                kernels = count_kernels(step, source, ctx.device)
            except Exception as exc:  # the timing stands; the count stays empty and the log says why
                note = f"kernel count failed: {_describe(exc)}"
            if kernels == 0:  # a step launches kernels: no count rather than a wrong one
                kernels, note = None, "kernel count failed: the profiler recorded no kernel of the step"
        return Attempt("ok", _step_meta(step), timing, build_s + timing.warmup_seconds, kernels, source.detail, note)
    except Exception as exc:
        status = "oom" if _is_oom(exc) else f"error: {_describe(exc)}"
        return Attempt(status, _step_meta(step) if step is not None else None)
    finally:
        if source is not None:
            source.close()


def _free_memory(device: torch.device) -> None:
    """Drop what the last row left: compiled graphs, cycles, cached CUDA blocks; reset the peak."""
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        except RuntimeError:  # a broken CUDA context: the next row records the error as its status
            pass


def _measure(builders: Builders, impl: str, model: str, mode: str, cfg: BenchConfig, ctx: RunContext,
             log: Callable[[str], None]) -> tuple[Attempt, int]:
    """(the attempt, the batch it used): the configured batch, or half of it after running out of memory."""
    batch = cfg.batch_for(model)
    while True:
        _free_memory(ctx.device)
        torch.manual_seed(0)
        attempt = _attempt(builders, impl, model, batch, mode, cfg, ctx)
        if attempt.status != "oom" or batch != cfg.batch_for(model) or batch < 2:
            return attempt, batch
        log(f"    out of memory at batch {batch}; retrying at batch {batch // 2}")
        batch //= 2


def _row(ctx: RunContext, cfg: BenchConfig, impl: str, model: str, mode: str, batch_used: int,
         attempt: Attempt, train_flops: int) -> dict[str, object]:
    meta = attempt.meta or _expected_meta(impl, ctx.device) or {"dtype": "", "compile": "", "cuda_graph": ""}
    row: dict[str, object] = {
        "gpu": ctx.gpu, "impl": impl, "model": model, "batch": cfg.batch_for(model), "batch_used": batch_used,
        "img_size": cfg.img_size, "mask_ratio": MASK_RATIO if cfg.task == "pretrain" else None,
        "dtype": meta["dtype"],
        "compile": str(meta["compile"]).lower(), "cuda_graph": str(meta["cuda_graph"]).lower(), "input": mode,
        "steps": cfg.steps, "gflops_per_img": f"{train_flops / 1e9:.2f}",
        "matmul_tflops_measured": None if ctx.matmul_tflops is None else f"{ctx.matmul_tflops:.1f}",
        "spec_tflops": ctx.spec_tflops, **ctx.versions,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "status": attempt.status,
        "kernels_per_step": attempt.kernels, "input_detail": attempt.input_detail,
    }
    timing = attempt.timing
    if timing is not None:
        measured, spec = mfu(train_flops, timing.img_per_s, ctx.matmul_tflops), mfu(train_flops, timing.img_per_s,
                                                                                    ctx.spec_tflops)
        row.update({
            "img_per_s": f"{timing.img_per_s:.1f}", "ms_per_step": f"{timing.ms_per_step:.2f}",
            "loss": f"{timing.loss:.5f}", "setup_s": f"{attempt.setup_s:.1f}",
            "mfu_measured": None if measured is None else f"{measured:.4g}",
            "mfu_spec": None if spec is None else f"{spec:.4g}",
            "peak_mem_gib": None if timing.peak_mem_bytes is None else f"{timing.peak_mem_bytes / 2**30:.3f}",
        })
    return row


def _summary(row: dict[str, object]) -> str:
    if row.get("img_per_s") is None:
        return str(row["status"])
    mfu_text = "" if row.get("mfu_measured") is None else f", MFU {100 * float(row['mfu_measured']):.1f}%"
    mem_text = "" if row.get("peak_mem_gib") is None else f", {row['peak_mem_gib']} GiB"
    kernel_text = "" if row.get("kernels_per_step") is None else f", {row['kernels_per_step']} kernels/step"
    return (f"{row['img_per_s']} img/s at batch {row['batch_used']}, {row['ms_per_step']} ms/step{mfu_text}{mem_text}"
            f"{kernel_text}, setup {row['setup_s']} s, loss {row['loss']}: {row['status']}")


def _train_flops(model: str, img_size: int, task: str = "pretrain") -> int:
    """Matmul FLOPs of one training step per image (``fastmae.flops``), from a copy of the model on meta."""
    with torch.device("meta"):
        if task == "finetune":
            return classifier_flops(fastmae_classifier(model, img_size, 0.0)).train_step
        return mae_flops(PRESETS[model](img_size=img_size), MASK_RATIO).train_step


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> tuple[list[dict[str, object]], Path]:
    """Measure every (model, input, impl) of ``cfg``; returns (all rows, skipped included; the CSV path).

    Rows with a known configuration are upserted into the CSV as soon as they are measured; skipped
    ones (not runnable here, or past ``max_seconds``) are only returned.
    """
    started = time.monotonic()
    ctx = _context(cfg, log)
    builders = load_builders(cfg.impls, ctx.device)
    rows: list[dict[str, object]] = []
    for model in cfg.models:
        train_flops = _train_flops(model, cfg.img_size, cfg.task)
        for mode in cfg.inputs:
            for impl in cfg.impls:
                elapsed, batch = time.monotonic() - started, cfg.batch_for(model)
                if impl in builders.unavailable:
                    attempt = Attempt(f"skipped: {builders.unavailable[impl]}")
                elif input_unavailable_reason(mode) is not None:
                    attempt = Attempt(f"skipped: {input_unavailable_reason(mode)}")
                elif cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
                    attempt = Attempt(f"skipped: time budget of {cfg.max_seconds:g} s spent")
                else:
                    log(f"[{elapsed:6.1f} s] {model} {impl} {mode} batch {batch} ...")
                    attempt, batch = _measure(builders, impl, model, mode, cfg, ctx, log)
                row = _row(ctx, cfg, impl, model, mode, batch, attempt, train_flops)
                rows.append(row)
                if not attempt.status.startswith("skipped") and row["dtype"] != "":
                    upsert_rows(ctx.csv_path, [row])
                log(f"    {impl}: {_summary(row)}")
                if attempt.note is not None:
                    log(f"    {impl}: {attempt.note}")
    return rows, ctx.csv_path
