"""The install: fastmae.kernels resolves in editable and regular installs; fastmae._C builds where it can."""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fastmae.extension import extension_status

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_subpackage_in_this_install() -> None:
    import fastmae.kernels

    assert Path(fastmae.kernels.__file__).parent.name == "kernels"
    assert "kernels" not in sys.modules or sys.modules["kernels"] is not fastmae.kernels


@pytest.mark.slow
def test_regular_wheel_install_resolves_kernels(tmp_path: Path) -> None:
    env = {**os.environ, "FASTMAE_BUILD_CUDA": "0"}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                            "-w", str(tmp_path / "dist"), str(ROOT)], env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("fastmae-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastmae/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names), "kernels/ must not install as a top-level package"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    probe = subprocess.run([sys.executable, "-c", "import fastmae.kernels; print(fastmae.kernels.__file__)"],
                           cwd=tmp_path, env={**env, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert Path(probe.stdout.strip()).is_relative_to(site)


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return shutil.which("nvcc", path=str(Path(cuda_home) / "bin"))


def test_extension_builds_where_it_can() -> None:
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build, so fastmae._C is not built")
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc under CUDA_HOME (or /usr/local/cuda), so fastmae._C is not built")
    if os.environ.get("FASTMAE_BUILD_CUDA") == "0":
        pytest.skip("FASTMAE_BUILD_CUDA=0 skips building fastmae._C")
    loaded, detail = extension_status()
    assert loaded, detail
    cuda_version, *archs = torch.ops.fastmae_C.build_info()
    release = re.search(r"release (\d+)\.(\d+)", subprocess.run([nvcc, "--version"], capture_output=True,
                                                                 text=True).stdout)
    assert cuda_version == int(release[1]) * 1000 + int(release[2]) * 10, (cuda_version, release[0])
    wanted = sorted({int(a.strip().replace(".", "")) * 10
                     for a in os.environ.get("FASTMAE_CUDA_ARCHS", "8.0;9.0").replace(",", ";").split(";") if a.strip()})
    assert archs == wanted, f"FASTMAE_CUDA_ARCHS asks for {wanted}, the library holds {archs}"
