"""What Inductor fuses around fastmae's custom ops: the kernels of one compiled training step.

Design note. ``measure`` compiles a small MAE's training step (forward, loss, backward) with
``torch.compile(fullgraph=True)`` (Inductor) under one choice of backends, runs it once, and reads Inductor's
generated code (``torch._inductor.utils.run_and_get_code``): the forward and the backward graph, each as the
kernels Inductor generated (in launch order) and the extern calls between them (GEMMs, attention, every
``fastmae::<op>``). A kernel is known by its name, which Inductor builds from the aten ops fused into it
(``cpp_fused_add_native_layer_norm_view_2``: a residual add fused into a LayerNorm); :func:`kernel_ops` reads
the ops back. Comparing a mapping of kernel backends against :func:`baseline_mapping` (every op on its
torch/reference backend, all of it Inductor's) shows which kernels the custom ops remove and which they add:
a copy or cast kernel beside an op, a residual add outside its LayerNorm, a backward chain cut in two.

On a CPU, Inductor emits C++ kernels (``cpp_fused_*``) and the kernel backends run there as they can: the
``cuda`` ones as fastmae._C's CPU implementations, the ``triton`` ones only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before importing fastmae; slow, so the model is tiny). On a GPU it emits Triton
kernels (``triton_{poi,per,red,tem}_fused_*``) and fuses bias epilogues differently, so counts differ from the
CPU's; the GPU's count per step is ``fastmae bench``'s ``kernels_per_step`` column (a profiler count).

``python -m fastmae.benchmark.fusion`` prints the kernel mapping's report, the baseline's and their difference.
"""

from __future__ import annotations

import argparse
import collections
import functools
import re
import time
from dataclasses import dataclass

import torch

from fastmae.model import MaskedAutoencoderViT
from fastmae.ops import use_backend
from fastmae.ops.dispatch import OPS, _cached_availability

KERNEL_PREFIXES = ("cpp_fused_", "triton_poi_fused_", "triton_per_fused_", "triton_red_fused_", "triton_tem_fused_")
# ops that only move or convert data: a kernel made of these (and a fastmae op's name, when Inductor made it for
# that op's argument) is a copy, not computation
COPY_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze", "slice",
    "select", "as_strided", "alias", "clone", "_to_copy", "copy", "copy_", "convert_element_type", "contiguous",
    "slice_backward", "select_backward", "new_zeros", "zeros", "full", "empty",
})
MAPPINGS = ("kernels", "triton", "baseline")
_CALL_TOKEN = re.compile(r"(?P<name>\b[A-Za-z_]\w*)(?:\.run)?\(|torch\.ops\.(?P<ns>\w+)\.(?P<op>\w+)\.\w+\(")


# ------------------------------------------------------------------------------------------ mappings


def baseline_mapping() -> dict[str, str]:
    """Every op on the backend Inductor sees through: ``torch`` where the op has one (attention's SDPA,
    layer_norm, linear_gelu), else ``reference``."""
    return {name: "torch" if op.backend("torch") is not None else "reference" for name, op in _model_ops().items()}


def kernel_mapping(device: torch.device | str = "cpu") -> dict[str, str]:
    """What the CUDA priority lists (fastmae/ops/*.py) pick for a bf16 MAE step, among the backends that run on
    ``device``: random_masking, unshuffle and masked_mse on ``cuda`` (fastmae._C; else ``triton``, else the
    ``reference``), attention and patch_embed_visible on ``triton`` where Triton runs (a GPU, or the interpreter;
    else SDPA, ``torch``, and the ``reference``), layer_norm and linear_gelu on ``torch`` (they measured faster
    there; apex, picked first on a GPU where installed, is not an op Inductor traces and is left out)."""
    device = torch.device(device)

    def first(op_name: str, *names: str) -> str:
        return next(name for name in names if name in ("torch", "reference") or _runs(op_name, name, device))

    return {"random_masking": first("random_masking", "cuda", "triton", "reference"),
            "patch_embed_visible": first("patch_embed_visible", "triton", "reference"),
            "attention": first("attention", "triton", "torch"),
            "unshuffle": first("unshuffle", "cuda", "triton", "reference"),
            "masked_mse": first("masked_mse", "cuda", "triton", "reference"),
            "layer_norm": "torch", "linear_gelu": "torch"}


def triton_mapping() -> dict[str, str]:
    """Every op of the model on its ``triton`` backend (linear_gelu: ``fastmae::bias_gelu`` after the GEMM)."""
    return {name: "triton" for name in _model_ops()}


def mapping_named(name: str, device: torch.device | str = "cpu") -> dict[str, str]:
    """The mapping called ``name`` (one of :data:`MAPPINGS`) on ``device``."""
    if name == "kernels":
        return kernel_mapping(device)
    if name == "triton":
        return triton_mapping()
    if name == "baseline":
        return baseline_mapping()
    raise ValueError(f"mapping must be one of {MAPPINGS}, got {name!r}")


def _model_ops() -> dict[str, object]:
    """The ops the MAE's training step calls (not random_masking_philox, which the trainer's Philox mode uses)."""
    names = ("random_masking", "patch_embed_visible", "attention", "unshuffle", "masked_mse", "layer_norm",
             "linear_gelu")
    return {name: OPS[name] for name in names}


def _why_not_runs(op_name: str, backend_name: str, device: torch.device) -> str | None:
    """Why ``op_name``'s backend ``backend_name`` cannot run on ``device`` (availability, devices), or ``None``."""
    backend = OPS[op_name].backend(backend_name)
    if backend is None:
        return f"no backend {backend_name!r} (it has {[b.name for b in OPS[op_name].backends]})"
    reason = _cached_availability(backend.key)
    if reason is None and backend.devices is not None and device.type not in backend.devices:
        reason = f"runs on {'/'.join(backend.devices)}, not {device.type}"
        if backend_name in ("triton", "triton-gemm"):
            reason += " (set TRITON_INTERPRET=1 before importing fastmae to run Triton on a CPU)"
    return reason


def _runs(op_name: str, backend_name: str, device: torch.device) -> bool:
    return _why_not_runs(op_name, backend_name, device) is None


def check_mapping(mapping: dict[str, str], device: torch.device | str) -> None:
    """Raise ``ValueError`` naming every op of ``mapping`` whose backend is unknown or cannot run on ``device``
    (availability and device only; the shapes are checked when the step is traced)."""
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise TypeError(f"mapping must be a dict of op name -> backend name, got {mapping!r}")
    device = torch.device(device)
    problems = []
    for op_name, backend_name in mapping.items():
        if op_name not in _model_ops():
            problems.append(f"{op_name}: not an op of the MAE step (expected one of {sorted(_model_ops())})")
            continue
        reason = _why_not_runs(op_name, backend_name, device)
        if reason is not None:
            problems.append(f"{op_name}={backend_name}: {reason}")
    if problems:
        raise ValueError("this backend mapping cannot run here:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------- generated code


def kernel_ops(name: str) -> tuple[str, ...]:
    """The ops an Inductor kernel's name lists (``cpp_fused_add_native_layer_norm_view_2`` ->
    ``("add", "native_layer_norm", "view")``), each the longest known op name at its place; Inductor sorts
    them and keeps at most ``torch._inductor.config.kernel_name_max_ops``. A name of no known prefix -> ``()``."""
    prefix = next((p for p in KERNEL_PREFIXES if name.startswith(p)), None)
    if prefix is None:
        return ()
    parts = re.sub(r"_\d+$", "", name[len(prefix):]).split("_")
    known = _op_names()
    ops, i = [], 0
    while i < len(parts):
        for j in range(len(parts), i, -1):  # longest match first: native_layer_norm_backward before native
            candidate = "_".join(parts[i:j])
            if candidate in known:
                ops.append(candidate)
                i = j
                break
        else:  # not an op name (e.g. a kernel of inductor's own): keep the word
            ops.append(parts[i])
            i += 1
    return tuple(op for op in ops if op)


@functools.cache
def _op_names() -> frozenset[str]:
    """Names of the aten, prims and fastmae ops (fastmae's are registered: this module imports fastmae.ops)."""
    return frozenset(n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                     if n.split("::")[0] in ("aten", "prims", "fastmae"))


@functools.cache
def fastmae_op_names() -> frozenset[str]:
    """Names of the ``fastmae::`` custom ops (forward and backward ones)."""
    return frozenset(n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                     if n.startswith("fastmae::"))


@dataclass(frozen=True)
class GraphKernels:
    """One compiled graph: ``kernels``, the names of the kernels Inductor generated, in launch order (a kernel
    launched twice is listed twice); ``extern_calls``, everything else it calls, in order: ``mm``/``addmm``/
    ``bmm`` (``extern_kernels.*``), ``fastmae.<op>``, ``aten.<op>`` fallbacks."""

    kernels: tuple[str, ...]
    extern_calls: tuple[str, ...]

    @property
    def count(self) -> int:
        """Generated kernel launches."""
        return len(self.kernels)

    def with_ops(self, *ops: str) -> tuple[str, ...]:
        """The kernels whose names list every op of ``ops``."""
        return tuple(k for k in self.kernels if set(ops) <= set(kernel_ops(k)))

    def copies(self) -> tuple[str, ...]:
        """Kernels that only move or convert data (views, clones, casts, the zero padding of a slice's gradient)
        -- a materialised layout or dtype -- possibly made for a ``fastmae::`` op's argument."""
        return tuple(k for k in self.kernels if set(kernel_ops(k)) <= COPY_OPS | fastmae_op_names())

    def for_custom_ops(self) -> tuple[str, ...]:
        """Kernels whose names list a ``fastmae::`` op: Inductor computed them (also) to hand that op an argument
        in the layout or dtype its registration asks for."""
        return tuple(k for k in self.kernels if fastmae_op_names() & set(kernel_ops(k)))

    def extern_counts(self) -> dict[str, int]:
        """How often each extern call is made."""
        return dict(collections.Counter(self.extern_calls))


def parse_code(code: str) -> GraphKernels:
    """The kernels and extern calls of one Inductor output module (its ``call`` function, and the graph
    partitions it calls, ``def partition_<i>``, where Inductor split the graph), in order."""
    defined = set(re.findall(r"^(\w+) = async_compile\.\w+\(", code, flags=re.MULTILINE))
    kernels, externs = [], []
    for line in _launcher_lines(code):
        if line.lstrip().startswith("#"):
            continue
        for match in _CALL_TOKEN.finditer(line):
            if match.group("ns") is not None:
                if match.group("ns") != "inductor":  # inductor's own helpers (_alloc_from_pool) are no calls
                    externs.append(f"{match.group('ns')}.{match.group('op')}")
            elif match.group("name") in defined:
                kernels.append(match.group("name"))
        externs.extend(re.findall(r"\bextern_kernels\.(\w+)\(", line))
    return GraphKernels(tuple(kernels), tuple(externs))


def _launcher_lines(code: str) -> list[str]:
    """The lines of the output module's ``call`` function (``def call(args)`` or ``Runner.call``), each call of
    a graph partition (``self.partitions[i](...)``) replaced by the lines of ``def partition_<i>``."""
    lines = code.splitlines()
    body = _function_body(lines, r"\s*def call\(")
    if body is None:
        raise ValueError("not an Inductor output module: it has no call function")
    expanded = []
    for line in body:
        partition = re.search(r"\bself\.partitions\[(\d+)\]\(", line)
        if partition is None:
            expanded.append(line)
            continue
        partition_body = _function_body(lines, rf"def partition_{partition.group(1)}\(")
        if partition_body is None:
            raise ValueError(f"the output module calls partition {partition.group(1)} but does not define it")
        expanded.extend(partition_body)
    return expanded


def _function_body(lines: list[str], header: str) -> list[str] | None:
    """The lines after the first line matching ``header`` that are indented deeper than it (None: no such line)."""
    start = next((i for i, line in enumerate(lines) if re.match(header, line)), None)
    if start is None:
        return None
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
    return body


# ------------------------------------------------------------------------------------------ measuring


@dataclass(frozen=True)
class FusionReport:
    """The generated code of one compiled MAE training step under ``mapping`` (op -> backend)."""

    mapping: dict[str, str]
    device: str
    autocast: str  # "bf16"/"fp16": the step ran under autocast in that dtype; "fp32": no autocast
    depth: int
    decoder_depth: int
    forward: GraphKernels
    backward: GraphKernels
    seconds: float  # compiling and running the step once

    @property
    def kernels(self) -> int:
        """Generated kernel launches of the whole step."""
        return self.forward.count + self.backward.count

    def format(self) -> str:
        """The report as text: counts, each graph's kernels and extern calls, copy kernels."""
        lines = [f"mapping: {', '.join(f'{k}={v}' for k, v in sorted(self.mapping.items()))}",
                 (f"{self.device}, {self.autocast}, encoder depth {self.depth}, decoder depth {self.decoder_depth}: "
                  f"{self.kernels} generated kernels ({self.forward.count} forward + {self.backward.count} backward); "
                  f"compile + one step {self.seconds:.1f} s")]
        for label, graph in (("forward", self.forward), ("backward", self.backward)):
            externs = ", ".join(f"{name} x{n}" for name, n in sorted(graph.extern_counts().items()))
            lines += [f"{label}: {graph.count} kernels; extern calls: {externs or 'none'}"]
            lines += [f"  {k}" for k in graph.kernels]
            if graph.copies():
                lines.append(f"  copy-only kernels: {', '.join(graph.copies())}")
            if graph.for_custom_ops():
                lines.append(f"  kernels that also make a fastmae op's argument: {', '.join(graph.for_custom_ops())}")
        return "\n".join(lines)


def tiny_mae(depth: int = 2, decoder_depth: int = 1, device: torch.device | str = "cpu") -> MaskedAutoencoderViT:
    """The test-sized MAE: 64x96 images, 16 px patches (L = 24), widths 64 (encoder) and 32 (decoder), 4 heads,
    norm_pix_loss; initialised from seed 0 (the global generator is left as it was)."""
    on_cpu = torch.device(device).type == "cpu"
    with torch.random.fork_rng(devices=[] if on_cpu else None), torch.device(device):
        torch.manual_seed(0)
        return MaskedAutoencoderViT(img_size=(64, 96), patch_size=16, embed_dim=64, depth=depth, num_heads=4,
                                    decoder_embed_dim=32, decoder_depth=decoder_depth, decoder_num_heads=4,
                                    norm_pix_loss=True)


_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(mapping: dict[str, str], *, device: torch.device | str = "cpu", autocast: str = "fp32",
            depth: int = 2, decoder_depth: int = 1, batch: int = 3, vectorize: bool = True) -> FusionReport:
    """Compile :func:`tiny_mae`'s training step (forward at mask ratio 0.75, the loss, ``backward``) with Inductor,
    every op on ``mapping``'s backend, run it once on ``batch`` random images ``(N, 3, 64, 96)``, and read the
    generated forward and backward code. ``autocast``: "fp32" (none) or the autocast dtype ("bf16", "fp16").
    ``vectorize=False`` generates Inductor's C++ kernels scalar (``cpp.simdlen = 1``), which compiles them about
    twice as fast on a cold cache; which kernels exist is decided before (the same names and counts, measured
    on this model in fp32 and bf16)."""
    if autocast not in _AUTOCAST:
        raise ValueError(f"autocast must be one of {sorted(_AUTOCAST)}, got {autocast!r}")
    for name, value in (("depth", depth), ("decoder_depth", decoder_depth), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    device = torch.device(device)
    check_mapping(mapping, device)
    from torch._inductor.utils import run_and_get_code

    model = tiny_mae(depth, decoder_depth, device)
    generator = torch.Generator().manual_seed(1)
    imgs = torch.randn(batch, 3, 64, 96, generator=generator).to(device)  # (N, C, H, W)
    noise = torch.rand(batch, model.patch_embed.num_patches, generator=generator).to(device)  # (N, L)
    compiled = torch.compile(model, fullgraph=True)

    def step() -> None:
        with use_backend(**mapping), torch.autocast(device.type, dtype=_AUTOCAST[autocast] or torch.bfloat16,
                                                     enabled=_AUTOCAST[autocast] is not None):
            loss, _, _ = compiled(imgs, 0.75, noise)
        loss.backward()

    start = time.perf_counter()
    with torch._inductor.config.patch({} if vectorize else {"cpp.simdlen": 1}):
        _, codes = run_and_get_code(step)  # resets dynamo first: a fresh compile (Inductor's caches still apply)
    seconds = time.perf_counter() - start
    torch._dynamo.reset()
    graphs = {_is_backward(code): parse_code(code) for code in codes}
    if set(graphs) != {False, True}:
        raise RuntimeError(f"expected one forward and one backward graph, got {len(codes)} output modules")
    return FusionReport(dict(mapping), str(device), autocast, depth, decoder_depth, graphs[False], graphs[True],
                        seconds)


def _is_backward(code: str) -> bool:
    """A backward graph's inputs include the tangents (the gradients of the forward's outputs)."""
    return "tangents_" in "\n".join(_launcher_lines(code)[:4])


def difference(report: FusionReport, baseline: FusionReport) -> dict[str, dict[str, list[str]]]:
    """Per graph, the kernels (by the ops their names list) only in ``report`` (``"added"``) and only in
    ``baseline`` (``"removed"``), as ``"+".join(ops)`` keys, repeated as often as they differ in count."""
    result = {}
    for label in ("forward", "backward"):
        ours = collections.Counter("+".join(kernel_ops(k)) for k in getattr(report, label).kernels)
        theirs = collections.Counter("+".join(kernel_ops(k)) for k in getattr(baseline, label).kernels)
        result[label] = {"added": sorted((ours - theirs).elements()), "removed": sorted((theirs - ours).elements())}
    return result


def format_difference(report: FusionReport, baseline: FusionReport) -> str:
    """:func:`difference` as text, with the counts."""
    lines = [(f"{report.kernels} kernels vs the baseline's {baseline.kernels} "
              f"(forward {report.forward.count} vs {baseline.forward.count}, "
              f"backward {report.backward.count} vs {baseline.backward.count})")]
    for label, change in difference(report, baseline).items():
        for kind in ("added", "removed"):
            lines += [f"{label} {kind}: {ops}" for ops in change[kind]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmae.benchmark.fusion", description=__doc__.split("\n")[0])
    parser.add_argument("--mapping", choices=MAPPINGS, default="kernels",
                        help="the backends measured (default: kernels, the CUDA priority lists' picks)")
    parser.add_argument("--backend", action="append", default=[], metavar="OP=NAME",
                        help="override one op's backend in the mapping (repeatable), e.g. unshuffle=reference")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--autocast", choices=sorted(_AUTOCAST), default="fp32")
    parser.add_argument("--depth", type=int, default=2, help="encoder blocks (default 2)")
    parser.add_argument("--decoder-depth", type=int, default=1, help="decoder blocks (default 1)")
    parser.add_argument("--no-baseline", action="store_true", help="do not measure the all-Inductor baseline")
    parser.add_argument("--scalar", action="store_true",
                        help="generate scalar C++ kernels (compiles faster; the same kernels, not vectorised)")
    args = parser.parse_args(argv)
    mapping = mapping_named(args.mapping, args.device)
    for item in args.backend:
        op, sep, name = item.partition("=")
        if not sep:
            parser.error(f"--backend takes OP=NAME, got {item!r}")
        mapping[op.strip()] = name.strip()
    options = {"device": args.device, "autocast": args.autocast, "depth": args.depth,
               "decoder_depth": args.decoder_depth, "vectorize": not args.scalar}
    report = measure(mapping, **options)
    print(report.format())
    if not args.no_baseline:
        baseline = measure(baseline_mapping(), **options)
        print("\nbaseline (every op on Inductor):\n" + baseline.format())
        print("\ndifference:\n" + format_difference(report, baseline))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
