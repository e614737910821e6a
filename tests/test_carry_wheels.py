"""bench/carry_wheels.sh on CPU: wheels cut into pieces, stashed one by one, joined, checked and installed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "carry_wheels.sh"


def _run(*args: str | Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "CARRY_PIECE_BYTES": "100000", **env}, timeout=60)


def _pack_and_stash(tmp_path: Path) -> tuple[dict[str, bytes], Path]:
    wheels = {"a-1.0-py3-none-any.whl": os.urandom(250_000), "b-2.0-py3-none-any.whl": os.urandom(10_000)}
    (tmp_path / "wheels").mkdir()
    for name, data in wheels.items():
        (tmp_path / "wheels" / name).write_bytes(data)
    packed = _run("pack", tmp_path / "wheels", tmp_path / "pieces")
    assert packed.returncode == 0, packed.stderr
    pieces = sorted((tmp_path / "pieces").iterdir())
    assert [p.name for p in pieces if "a-1.0" in p.name] == [f"a-1.0-py3-none-any.whl.part-00{i}" for i in range(3)]
    for piece in pieces:  # one call each on the GPU machine
        assert _run("stash", piece, tmp_path / "stash").returncode == 0
    return wheels, tmp_path / "stash"


def test_pieces_join_to_the_wheels_and_install(tmp_path: Path) -> None:
    wheels, stash = _pack_and_stash(tmp_path)
    installed = _run("install", stash, PIP="echo pip")  # the pip command line, not an install
    assert installed.returncode == 0, installed.stderr
    words = installed.stdout.split()
    assert words[:4] == ["pip", "install", "--no-index", "--no-deps"]
    joined = {Path(w).name: Path(w).read_bytes() for w in words[4:]}
    assert joined == wheels


def test_a_missing_or_damaged_piece_stops_before_pip(tmp_path: Path) -> None:
    _, stash = _pack_and_stash(tmp_path)
    piece = stash / "a-1.0-py3-none-any.whl.part-001"
    data = bytearray(piece.read_bytes())
    data[0] ^= 0xFF
    piece.write_bytes(bytes(data))
    damaged = _run("install", stash, PIP="echo pip")
    assert damaged.returncode == 1 and "differs from its checksum" in damaged.stderr and "pip" not in damaged.stdout
    for part in stash.glob("b-2.0*"):
        part.unlink()
    missing = _run("install", stash, PIP="echo pip")
    assert missing.returncode == 1 and "no piece of b-2.0-py3-none-any.whl" in missing.stderr
    assert _run("bogus").returncode == 2
