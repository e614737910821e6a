"""The benchmark's baselines (fastmae.benchmark.baselines). The official MAE written as plain PyTorch gives
fastmae.MAE's loss, pred, mask and gradients with the same weights and noise, so the benchmark compares like
with like; its two attention forms agree; each baseline's training step runs and trains, or says why it
cannot run here; the baselines are part of the installed package."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fastmae
from fastmae.benchmark.baselines import official_mae
from fastmae.benchmark.baselines.steps import BUILDERS, unavailable_reason
from fastmae.benchmark.train_step import StepUnavailable
from numerics import rel_err

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # relative, fp32 on CPU
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
EAGER_ON_CPU = ("official", "modern", "hf")  # modern runs eagerly off CUDA

# config name -> (fastmae factory, baseline factory, batch size); CUSTOM is odd-sized on purpose
CUSTOM = dict(img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
              decoder_depth=2, decoder_num_heads=2)  # constructor default norm_layer: LayerNorm eps 1e-5
CONFIGS = {
    "tiny_preset": (partial(fastmae.mae_vit_tiny_patch16, img_size=224),
                    partial(official_mae.mae_from_preset, "mae_vit_tiny_patch16", img_size=224), 3),
    "custom": (partial(fastmae.MAE, **CUSTOM), partial(official_mae.MaskedAutoencoderViT, **CUSTOM), 5),
}


def _pair(config: str, norm_pix_loss: bool, attn_impl: str = "explicit"):  # noqa: ANN202
    """fastmae.MAE with non-trivial weights, and the baseline loaded strictly with the same state_dict."""
    make_fast, make_base, n = CONFIGS[config]
    torch.manual_seed(0)
    fast = make_fast(norm_pix_loss=norm_pix_loss)
    with torch.no_grad():  # non-zero biases, non-unit LN affines and perturbed pos tables exercise every term
        for name, p in fast.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        fast.pos_embed.add_(0.1 * torch.randn_like(fast.pos_embed))
        fast.decoder_pos_embed.add_(0.1 * torch.randn_like(fast.decoder_pos_embed))
    base = make_base(norm_pix_loss=norm_pix_loss, attn_impl=attn_impl)
    base.load_state_dict(fast.state_dict(), strict=True)
    return fast, base, n


def _run(model: nn.Module, imgs: torch.Tensor, noise: torch.Tensor):  # noqa: ANN202
    """Forward with mask ratio 0.75 and the given noise, then backward; returns loss, pred, mask, grads."""
    model.zero_grad()
    loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), pred.detach(), mask, grads


def _inputs(model: nn.Module, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = model.patch_embed.img_size
    size = size if isinstance(size, int) else size[0]
    imgs = torch.randn(n, 3, size, size, generator=g)  # (N, 3, H, W)
    noise = torch.rand(n, model.patch_embed.num_patches, generator=g)  # (N, L)
    return imgs, noise


def _assert_same(got, want) -> None:  # noqa: ANN001
    (g_loss, g_pred, g_mask, g_grads), (w_loss, w_pred, w_mask, w_grads) = got, want
    assert torch.equal(g_mask, w_mask)
    assert rel_err(g_loss, w_loss) <= TOL, f"loss {g_loss.item()} vs {w_loss.item()}"
    assert rel_err(g_pred, w_pred) <= TOL, f"pred rel err {rel_err(g_pred, w_pred):.2e}"
    assert g_grads.keys() == w_grads.keys()
    errors = {k: rel_err(g_grads[k], w_grads[k]) for k in w_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOL, f"grad of {worst}: rel err {errors[worst]:.2e}"


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_official_baseline_matches_fastmae(config: str, norm_pix_loss: bool) -> None:
    """Same weights, same noise: same mask, loss, pred and every parameter gradient as fastmae.MAE."""
    fast, base, n = _pair(config, norm_pix_loss)
    imgs, noise = _inputs(fast, n, seed=n)
    _assert_same(_run(base, imgs, noise), _run(fast, imgs, noise))


def test_parity_tolerance_catches_a_biased_norm_pix_variance() -> None:
    """The tolerance above is tight enough to see norm_pix computed with the biased variance."""

    class BiasedVariance(official_mae.MaskedAutoencoderViT):
        def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            target = self.patchify(imgs)
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True)
                                                                  + 1e-6) ** 0.5
            return ((((pred - target) ** 2).mean(-1)) * mask).sum() / mask.sum()

    fast, _, n = _pair("custom", norm_pix_loss=True)
    biased = BiasedVariance(**CUSTOM, norm_pix_loss=True)
    biased.load_state_dict(fast.state_dict(), strict=True)
    imgs, noise = _inputs(fast, n, seed=1)
    with torch.no_grad():
        want = fast(imgs, 0.75, noise)[0]
        got = biased(imgs, 0.75, noise)[0]
    assert rel_err(got, want) > 10 * TOL


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_explicit_and_sdpa_attention_agree(config: str) -> None:
    fast, explicit, n = _pair(config, norm_pix_loss=True, attn_impl="explicit")
    sdpa = CONFIGS[config][1](norm_pix_loss=True, attn_impl="sdpa")
    sdpa.load_state_dict(explicit.state_dict(), strict=True)
    imgs, noise = _inputs(fast, n, seed=2)
    _assert_same(_run(sdpa, imgs, noise), _run(explicit, imgs, noise))


def test_every_fastmae_preset_has_the_same_state_dict_layout() -> None:
    """Keys and shapes of every preset (built on the meta device, so ViT-H costs nothing)."""
    with torch.device("meta"):
        for name, factory in fastmae.PRESETS.items():
            fast = {k: tuple(v.shape) for k, v in factory().state_dict().items()}
            base = {k: tuple(v.shape) for k, v in official_mae.mae_from_preset(name).state_dict().items()}
            assert base == fast, name


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="attn_impl"):
        official_mae.MaskedAutoencoderViT(**CUSTOM, attn_impl="flash")
    with pytest.raises(ValueError, match="unknown MAE preset"):
        official_mae.mae_from_preset("mae_vit_giant_patch14")
    with pytest.raises(ValueError, match="divisible by the patch size"):
        BUILDERS["official"]("mae_vit_tiny_patch16", 2, 60, torch.device("cpu"))
    model = official_mae.MaskedAutoencoderViT(**CUSTOM)
    with pytest.raises(ValueError, match=r"imgs must be \(N, 3, 56, 56\)"):
        model(torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("impl", EAGER_ON_CPU)
def test_step_builders_train_on_cpu(impl: str) -> None:
    """Two complete steps of the tiny preset in fp32: finite losses, every trained parameter moves."""
    if impl == "hf" and not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed")
    torch.manual_seed(0)
    step = BUILDERS[impl]("mae_vit_tiny_patch16", 3, 64, torch.device("cpu"))
    assert (step.impl, step.model_name, step.batch_size, step.dtype, step.compile, step.cuda_graph) == (
        impl, "mae_vit_tiny_patch16", 3, "fp32", False, False)
    before = {k: p.detach().clone() for k, p in step.model.named_parameters() if p.requires_grad}
    for _ in range(2):
        loss = step.run(torch.randn(3, 3, 64, 64))
        assert loss.ndim == 0 and torch.isfinite(loss)
    after = dict(step.model.named_parameters())
    unchanged = [k for k, v in before.items() if torch.equal(v, after[k])]
    assert not unchanged, f"parameters not updated: {unchanged}"
    assert all(p.grad is None for p in step.model.parameters()), "grads must be set to None after the step"


def test_hf_model_is_the_preset_architecture() -> None:
    """ViTMAE built from the preset has exactly the baseline's trained parameter count, and uses SDPA."""
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed")
    hf = BUILDERS["hf"]("mae_vit_tiny_patch16", 2, 64, torch.device("cpu")).model
    base = official_mae.mae_from_preset("mae_vit_tiny_patch16", img_size=64)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(hf) == count(base)
    assert hf.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("impl", ["hf", "hf-compile"])
def test_hf_steps_report_missing_transformers(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    reason = f"{impl}: transformers is not installed (pip install transformers)"
    assert unavailable_reason(impl, torch.device("cpu")) == reason
    with pytest.raises(StepUnavailable) as info:
        BUILDERS[impl]("mae_vit_tiny_patch16", 2, 64, torch.device("cpu"))
    assert str(info.value) == reason


def test_modern_cudagraph_refuses_a_cpu_with_the_reason() -> None:
    """The whole-step CUDA graph needs CUDA: said before building, and by the builder itself."""
    reason = "modern-cudagraph: CUDA graphs need a CUDA device, got cpu"
    assert unavailable_reason("modern-cudagraph", torch.device("cpu")) == reason
    with pytest.raises(StepUnavailable) as info:
        BUILDERS["modern-cudagraph"]("mae_vit_tiny_patch16", 2, 64, torch.device("cpu"))
    assert str(info.value) == reason
    assert unavailable_reason("modern", torch.device("cpu")) is None
    assert unavailable_reason("official", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="unknown baseline 'fastmae'"):
        unavailable_reason("fastmae", torch.device("cpu"))


def test_hf_compile_is_built_compiled_on_cpu() -> None:
    """hf-compile on a CPU is the hf model under torch.compile, in fp32. Only its construction is tested
    here: compiling ViTMAE's step with CPU Inductor takes about two minutes on 2 cores (measured: 128 s
    for the tiny preset at 64 px); the GPU test below runs it."""
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed")
    step = BUILDERS["hf-compile"]("mae_vit_tiny_patch16", 2, 64, torch.device("cpu"))
    assert (step.impl, step.dtype, step.compile, step.cuda_graph) == ("hf-compile", "fp32", True, False)
    assert type(step.model).__name__ == "ViTMAEForPreTraining"


def _setup_packages() -> list[str]:
    """The ``packages=`` list of setup.py's ``setup()`` call."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "packages":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py calls setup() without packages=")


def test_every_package_under_fastmae_is_installed() -> None:
    """setup.py lists every folder of fastmae/ that holds an __init__.py (the baselines among them)."""
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "fastmae").rglob("__init__.py")}
    assert "fastmae.benchmark.baselines" in found
    assert found <= set(_setup_packages()), sorted(found - set(_setup_packages()))


def test_baselines_import_from_outside_the_source_tree(tmp_path: Path) -> None:
    """The installed package alone gives the baselines: no sys.path entry for the checkout, no top-level
    ``bench`` package."""
    code = ("import sys, fastmae.benchmark.registry as r; from fastmae.benchmark.baselines import steps; "
            "print(sorted(r.BASELINE_IMPLS), any(m == 'bench' or m.startswith('bench.') for m in sys.modules), "
            f"any(p.rstrip('/') == {str(ROOT)!r} for p in sys.path))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split() == ["['hf',", "'hf-compile',", "'modern',", "'modern-cudagraph',", "'official',",
                                    "'timm',", "'timm-compile']", "False", "False"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["official", "hf", "hf-compile"])
def test_step_builders_on_gpu(impl: str) -> None:
    """The baselines in their GPU recipes (official: fp16 + GradScaler; hf: bf16 + fused AdamW; hf-compile:
    the same under torch.compile). The compiled ``modern`` step is exercised by the benchmark itself."""
    if impl.startswith("hf") and not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed")
    device = torch.device("cuda")
    step = BUILDERS[impl]("mae_vit_tiny_patch16", 8, 224, device)
    assert (step.dtype, step.compile) == {"official": ("fp16", False), "hf": ("bf16", False),
                                          "hf-compile": ("bf16", True)}[impl]
    for _ in range(3):
        loss = step.run(torch.randn(8, 3, 224, 224, device=device))
    assert torch.isfinite(loss).item()
