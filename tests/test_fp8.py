"""--precision fp8 (fastmae.train.fp8): which Linears become float8, the refusals, and training steps against bf16.

This torch runs ``torch._scaled_mm`` on a CPU, so the conversion and the float8 training steps are checked here
through the same code path a GPU runs (slowly, and without cuBLAS's fast accumulation); the speed, the compiled
and graph-captured fp8 steps need a GPU of compute capability >= 8.9: the gpu-marked tests at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fastmae
import fastmae.train.fp8 as fp8_module
from fastmae.benchmark.train_step import FASTMAE_IMPLS, fastmae_unavailable_reason
from fastmae.cli import main
from fastmae.train.config import PretrainConfig, SettingError
from fastmae.train.fp8 import convert_to_fp8, fp8_unavailable_reason
from fastmae.train.optim import param_groups
from fastmae.train.pretrain import pretrain
from pretrain_runs import config, demo_root, final_weights  # noqa: F401  (demo_root: a fixture)

torchao = pytest.importorskip("torchao", reason="fastmae's fp8 training uses torchao.float8; torchao is not installed")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402

STEPS = 10
# fp8 vs bf16 autocast, largest relative gap of a step's loss over the 10 steps below, measured on this CPU:
# 5.1e-4 (tensorwise), 7.3e-4 (rowwise); bf16 vs fp32: 5.8e-5. e4m3's unit roundoff is 2^-4, but the loss averages
# thousands of rounded products. Tolerance 5e-3; the gap must also exceed bf16's own, so the fp8 GEMMs did run.
FP8_RTOL = 5e-3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _small(device: str = "cpu", width: int = 64, decoder_width: int = 32) -> fastmae.MAE:
    torch.manual_seed(0)
    with torch.device(device):
        return fastmae.MAE(img_size=32, patch_size=16, embed_dim=width, depth=2, num_heads=4,
                           decoder_embed_dim=decoder_width, decoder_depth=1, decoder_num_heads=4, norm_pix_loss=True)


def test_which_linears_become_float8() -> None:
    model = fastmae.mae_vit_tiny_patch16(img_size=32)
    plain_keys = list(model.state_dict())
    converted = convert_to_fp8(model)
    blocks = [f"{part}.{i}.{name}" for part, depth in (("blocks", 12), ("decoder_blocks", 2)) for i in range(depth)
              for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert sorted(converted) == sorted(blocks + ["decoder_embed"])
    assert all(isinstance(model.get_submodule(name), Float8Linear) for name in converted)
    assert type(model.decoder_pred) is torch.nn.Linear  # the loss's input stays bf16
    assert list(model.state_dict()) == plain_keys  # checkpoints keep their keys

    odd = fastmae.MAE(img_size=32, patch_size=16, embed_dim=72, depth=1, num_heads=3, decoder_embed_dim=48,
                      decoder_depth=1, decoder_num_heads=4)
    converted = convert_to_fp8(odd, "rowwise")  # 72 is no multiple of 16: the encoder's Linears stay
    assert sorted(converted) == [f"decoder_blocks.0.{n}" for n in ("attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2")]
    with pytest.raises(ValueError, match=r"recipe must be one of \['tensorwise', 'rowwise'\], got 'delayed'"):
        convert_to_fp8(_small(), "delayed")
    with pytest.raises(ValueError, match="multiples of 16, got none"):
        convert_to_fp8(fastmae.MAE(img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=3,
                                   decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=3))


def _train(mode: str, recipe: str = "tensorwise") -> tuple[list[float], int]:
    """10 AdamW steps of the small model on fixed data and masks: ``fp32``, ``bf16`` (autocast) or ``fp8`` (float8
    Linears, bf16 autocast); the losses and how many Float8Linear forwards ran per step."""
    model = _small()
    if mode == "fp8":
        convert_to_fp8(model, recipe)
    calls = 0

    def count(module: torch.nn.Module, args: tuple) -> None:
        nonlocal calls
        calls += 1

    for module in model.modules():
        if isinstance(module, Float8Linear):
            module.register_forward_pre_hook(count)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        imgs, noise = torch.randn(8, 3, 32, 32, generator=data), torch.rand(8, 4, generator=data)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
            loss, _, _ = model(imgs, 0.75, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, calls // STEPS


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_steps_track_bf16(recipe: str) -> None:
    fp32, _ = _train("fp32")
    bf16, _ = _train("bf16")
    fp8, per_step = _train("fp8", recipe)
    assert per_step == 13  # every converted Linear ran in float8, the MLPs' fc1 included
    bf16_noise = max(abs(b - f) / abs(f) for b, f in zip(bf16, fp32))
    gap = max(abs(e - b) / abs(b) for e, b in zip(fp8, bf16))
    assert bf16_noise < gap <= FP8_RTOL, f"fp8 vs bf16 {gap:.1e}, bf16 vs fp32 {bf16_noise:.1e}"


def test_refused_without_a_gpu_that_has_float8_matmuls(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SettingError) as err:
        PretrainConfig(precision="fp8", device="cpu")
    assert str(err.value) == ("precision fp8 cannot run here: float8 matmuls (torch._scaled_mm) need a CUDA GPU of "
                              "compute capability >= 8.9 (Ada, Hopper or newer); the device is cpu")
    assert main(["pretrain", "--precision", "fp8", "--device", "cpu"]) == 2
    assert "fastmae pretrain: --precision fp8 cannot run here: float8 matmuls" in capsys.readouterr().err
    with pytest.raises(SettingError, match="precision fp8 is not supported with parallel fsdp"):
        PretrainConfig(precision="fp8", parallel="fsdp")
    assert fastmae_unavailable_reason("fastmae-fp8", torch.device("cpu")).startswith(
        "fastmae-fp8: float8 matmuls (torch._scaled_mm) need a CUDA GPU")
    assert FASTMAE_IMPLS["fastmae-compile-cudagraph-fp8"].fp8 and FASTMAE_IMPLS["fastmae-fp8"].compile

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what each GPU would be told
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (8, 0))
    assert fp8_unavailable_reason("cuda") == ("float8 matmuls (torch._scaled_mm) need compute capability >= 8.9 "
                                              "(Ada, Hopper or newer); NVIDIA A100-SXM4-80GB is sm_80")
    for capability in ((8, 9), (9, 0), (10, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        assert fp8_unavailable_reason(None) is None
    monkeypatch.setattr(fp8_module, "torchao_available", lambda: False)
    assert fp8_unavailable_reason("cuda") == ("torchao is not installed (pip install torchao; fastmae's float8 "
                                              "training uses torchao.float8)")


@pytest.mark.slow
def test_trainer_runs_fp8_steps_past_the_refusal(tmp_path: Path, demo_root: Path,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    """The trainer's fp8 path on this CPU (the refusal lifted): its log line, finite losses, checkpoints that load
    into a plain model, the figure drawn by the float8 model."""
    monkeypatch.setattr(fp8_module, "fp8_unavailable_reason", lambda device: None)
    out = tmp_path / "run"
    summary = pretrain(config(demo_root, out, steps=2, precision="fp8", deterministic=False), progress=False)
    assert summary.status == "complete" and 0 < summary.final_loss < 10
    assert "step: eager + float8 matmuls (tensorwise scaling) (not compiled: auto (a compiled step" in (
        capsys.readouterr().out)
    assert json.loads((out / "config.json").read_text())["precision"] == "fp8"
    fastmae.mae_vit_tiny_patch16(img_size=32).load_state_dict(final_weights(out, 2), strict=True)
    assert (out / "reconstruction.png").is_file()


# --- on a GPU ------------------------------------------------------------------------------------------------------

def _needs_float8_gpu() -> None:
    why = fp8_unavailable_reason("cuda")
    if why is not None:
        pytest.skip(why)


@pytest.mark.gpu
def test_compiled_fp8_step_tracks_bf16_on_the_gpu() -> None:
    """ViT-B widths (768/512) so cuBLAS's float8 GEMMs run at real sizes; tolerance twice the CPU's (the forward
    GEMM accumulates with cuBLAS's fast accumulation)."""
    _needs_float8_gpu()

    def run(fp8: bool) -> list[float]:
        model = _small("cuda", width=768, decoder_width=512)
        if fp8:
            convert_to_fp8(model)
        forward = torch.compile(model)
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=True)
        data = torch.Generator(device="cuda").manual_seed(1)
        losses = []
        for _ in range(20):
            imgs = torch.randn(64, 3, 32, 32, device="cuda", generator=data)
            noise = torch.rand(64, 4, device="cuda", generator=data)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _, _ = forward(imgs, 0.75, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    bf16, fp8 = run(False), run(True)
    for step, (e, b) in enumerate(zip(fp8, bf16), start=1):
        assert abs(e - b) / abs(b) <= 2 * FP8_RTOL, f"step {step}: fp8 {e} vs bf16 {b}"


@pytest.mark.gpu
def test_graphed_fp8_benchmark_step_and_trainer_run_on_the_gpu(tmp_path: Path, demo_root: Path,  # noqa: F811
                                                               capsys: pytest.CaptureFixture) -> None:
    _needs_float8_gpu()
    from fastmae.benchmark.train_step import build_fastmae_step

    step = build_fastmae_step("fastmae-compile-cudagraph-fp8", "mae_vit_base_patch16", 32, 224, torch.device("cuda"))
    losses = [float(step.run(torch.randn(32, 3, 224, 224, device="cuda"))) for _ in range(3)]
    assert all(0 < loss < 10 for loss in losses)
    summary = pretrain(config(demo_root, tmp_path / "run", steps=4, precision="fp8", device="cuda",
                              deterministic=False, img_size=64, batch_size=16), progress=False)
    assert summary.status == "complete" and 0 < summary.final_loss < 10
    assert "step: compiled + CUDA graph + float8 matmuls (tensorwise scaling)" in capsys.readouterr().out
