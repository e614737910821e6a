"""The bad-file policy with each loader backend: a tree holding every kind of bad file, and images
that are unusual but good (PNG, grayscale, CMYK, RGBA, smaller than the crop)."""

import io
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_data_loader import BACKENDS, MEAN, STD, write_solid_tree

from fastmae.data import pretrain_loader
from fastmae.data.bad_files import CHECKS, BadImageError, check_image, scan_images
from fastmae.data.images import class_labels, list_images, open_rgb

GOOD_SOLID = 40


def _noise_jpeg() -> bytes:
    """A 64x48 JPEG of noise: long compressed data after the header."""
    buf = io.BytesIO()
    Image.effect_noise((64, 48), 60).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_bad_tree(root: Path) -> tuple[list[Path], list[Path]]:
    """Solid-colour JPEGs, unusual good images and every kind of bad file: (good extras, bad files)."""
    write_solid_tree(root, GOOD_SOLID)
    odd = root / "odd"
    odd.mkdir()
    Image.new("RGB", (40, 30), (30, 200, 60)).save(odd / "rgb.png")
    Image.new("L", (40, 30), 170).save(odd / "gray.jpg", quality=95)
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(odd / "cmyk.jpg", quality=95)  # red
    Image.new("RGBA", (40, 30), (220, 40, 220, 128)).save(odd / "rgba.png")
    Image.new("RGB", (9, 7), (250, 250, 20)).save(odd / "tiny.jpg", quality=95)
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    jpeg = _noise_jpeg()
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    (bad / "notes.jpg").write_text("this is not an image\n")
    Image.new("RGB", (40, 30)).save(bad / "animation.png", format="GIF")  # a format no backend decodes
    (root / "README.txt").write_text("a non-image file without an image extension: ignored, and logged\n")
    good = sorted(odd.iterdir())
    return good, sorted(bad.iterdir())


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("bad")
    good, bad = write_bad_tree(root)
    return root, good, bad


def test_each_kind_of_file_is_judged(bad_tree: tuple[Path, list[Path], list[Path]]) -> None:
    root, good, bad = bad_tree
    reasons = {p.name: check_image(p) for p in bad}
    assert reasons["empty.jpg"] == "empty file"
    assert reasons["truncated.jpg"].startswith("truncated JPEG")
    assert reasons["corrupt.jpg"].startswith("cannot decode") and reasons["notes.jpg"].startswith("cannot decode")
    assert reasons["animation.png"].startswith("GIF images are not supported")
    assert {p.name: check_image(p) for p in good} == {"cmyk.jpg": (40, 30), "gray.jpg": (40, 30), "rgb.png": (40, 30),
                                                     "rgba.png": (40, 30), "tiny.jpg": (9, 7)}
    assert all(isinstance(check_image(p, "decode"), str) for p in bad)
    assert all(open_rgb(p).mode == "RGB" for p in good)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_stops_naming_every_bad_file(bad_tree: tuple[Path, list[Path], list[Path]], backend: str) -> None:
    root, good, bad = bad_tree
    total = GOOD_SOLID + len(good) + len(bad)
    with pytest.raises(BadImageError) as caught:
        pretrain_loader(root, 8, img_size=32, backend=backend, device="cpu")
    first, *listed = str(caught.value).splitlines()
    assert first == (f"{len(bad)} bad image files of {total} in '{root}' (--on-bad-file skip (on_bad_file='skip') "
                     "leaves bad files out):")
    assert [line.split(": ")[0] for line in listed] == [f"  '{path}'" for path in bad]  # all of them, sorted
    assert listed[bad.index(root / "bad" / "empty.jpg")].endswith(": empty file")


def test_a_long_list_of_bad_files_is_cut_after_twenty(tmp_path: Path) -> None:
    for i in range(23):
        (tmp_path / f"{i:02d}.jpg").write_bytes(b"")
    with pytest.raises(BadImageError) as caught:
        scan_images(tmp_path)
    first, *listed = str(caught.value).splitlines()
    assert first.startswith("23 bad image files of 23 in ")
    assert len(listed) == 21 and listed[19] == f"  '{tmp_path / '19.jpg'}': empty file"
    assert listed[-1] == "  and 3 more"


def test_too_many_bad_files_stop_the_run(bad_tree: tuple[Path, list[Path], list[Path]]) -> None:
    root, good, bad = bad_tree
    total = GOOD_SOLID + len(good) + len(bad)
    with pytest.raises(BadImageError) as caught:
        scan_images(root, on_bad_file="skip")
    first, *listed = str(caught.value).splitlines()
    assert first == (f"{len(bad)} of {total} image files of '{root}' are bad ({100 * len(bad) / total:.2f}%), more "
                     "than the 0.01 that --max-skip-fraction (max_skip_fraction) allows: is this the right dataset?")
    assert [line.split(": ")[0] for line in listed] == [f"  '{path}'" for path in bad]


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_yields_only_good_images_and_reports_each_bad_one(
        bad_tree: tuple[Path, list[Path], list[Path]], backend: str, caplog: pytest.LogCaptureFixture) -> None:
    root, good, bad = bad_tree
    with caplog.at_level(logging.WARNING, logger="fastmae.data"):
        loader = pretrain_loader(root, 5, img_size=32, backend=backend, device="cpu", on_bad_file="skip",
                                 max_skip_fraction=0.2, num_workers=0 if backend == "torch" else 2)
    assert loader.skipped == bad and loader.num_images == GOOD_SOLID + len(good) == 45 and len(loader) == 9
    for path in bad:
        assert any(str(path) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), path
    assert any(f"skipped {len(bad)} of 50 image files" in r.getMessage() for r in caplog.records)
    assert any("ignoring 1 files without an image extension" in r.getMessage() for r in caplog.records)

    files = loader.files  # every good file, each a single colour: identify the outputs by colour
    colors = torch.stack([torch.tensor(list(open_rgb(p).getpixel((4, 4))), dtype=torch.float32) for p in files])
    seen = []
    for _ in range(len(loader)):
        rgb = (next(loader) * STD + MEAN).mean(dim=(2, 3)) * 255  # (N, 3)
        dist = (rgb[:, None] - colors[None]).abs().amax(dim=2)  # (N, files)
        assert (dist.amin(dim=1) < 8).all()  # grayscale, CMYK, RGBA, PNG: RGB as PIL converts them
        seen += dist.argmin(dim=1).tolist()
    assert sorted(seen) == list(range(len(files)))  # one epoch: every good image once


def _scan_on_rank(rank: int, world_size: int, init_file: str, root: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        scanned = scan_images(root, on_bad_file="skip", max_skip_fraction=0.2)
        torch.save({"files": [str(p) for p in scanned.files], "sizes": scanned.sizes.tolist(),
                    "skipped": [str(p) for p in scanned.skipped]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_share_the_check_and_agree(bad_tree: tuple[Path, list[Path], list[Path]], tmp_path: Path) -> None:
    """Under torch.distributed each rank checks a slice; all end with the single-process result."""
    root = bad_tree[0]
    torch.multiprocessing.spawn(_scan_on_rank, args=(2, str(tmp_path / "init"), str(root), str(tmp_path / "scan")),
                                nprocs=2)
    alone = scan_images(root, on_bad_file="skip", max_skip_fraction=0.2)
    expected = {"files": [str(p) for p in alone.files], "sizes": alone.sizes.tolist(),
                "skipped": [str(p) for p in alone.skipped]}
    for rank in range(2):
        assert torch.load(tmp_path / f"scan.{rank}", weights_only=True) == expected


def test_symlinked_class_folders_are_listed(tmp_path: Path) -> None:
    """ImageFolder trees often link their class folders from elsewhere; a loop is listed once."""
    write_solid_tree(tmp_path / "elsewhere", 4, classes=2)
    (tmp_path / "root" / "class0").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "root" / "class0" / "own.jpg")
    (tmp_path / "root" / "class1").symlink_to(tmp_path / "elsewhere" / "class1", target_is_directory=True)
    (tmp_path / "root" / "class0" / "loop").symlink_to(tmp_path / "root", target_is_directory=True)
    names = [p.relative_to(tmp_path / "root").as_posix() for p in list_images(tmp_path / "root")]
    assert names == ["class0/own.jpg", "class1/0001.jpg", "class1/0003.jpg"]


def test_data_after_the_end_marker_is_good_truncation_is_not(tmp_path: Path) -> None:
    """Cameras append data after a JPEG's end: the header check, unsure without the end marker near
    the end, decodes such a file (good); a truncated file still fails both checks."""
    jpeg = _noise_jpeg()
    buf = io.BytesIO()
    Image.effect_noise((40, 30), 60).convert("RGB").save(buf, "PNG")
    (tmp_path / "trailer.jpg").write_bytes(jpeg + b"\0" * 4096)
    (tmp_path / "trailer.png").write_bytes(buf.getvalue() + b"\0" * 4096)
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) * 2 // 3])
    for check in CHECKS:
        assert check_image(tmp_path / "trailer.jpg", check) == (64, 48)
        assert check_image(tmp_path / "trailer.png", check) == (40, 30)
        assert isinstance(check_image(tmp_path / "truncated.jpg", check), str)
        scanned = scan_images(tmp_path, on_bad_file="skip", max_skip_fraction=0.5, check=check)
        assert scanned.files == [tmp_path / "trailer.jpg", tmp_path / "trailer.png"]
        assert scanned.skipped == [tmp_path / "truncated.jpg"]
    assert check_image(tmp_path / "truncated.jpg").startswith("truncated JPEG (no end marker")
    assert open_rgb(tmp_path / "trailer.jpg").tobytes() == Image.open(io.BytesIO(jpeg)).convert("RGB").tobytes()


def test_hidden_folders_and_files_are_left_out(tmp_path: Path) -> None:
    """Hidden folders (top level or deeper) and hidden files are not listed, as class_labels leaves
    hidden class folders out: the two agree."""
    write_solid_tree(tmp_path, 4, classes=2)
    for hidden in (".cache/0100.jpg", "class0/.thumbs/0101.jpg", "class1/.0102.jpg"):
        (tmp_path / hidden).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / hidden)
    files = list_images(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == [
        "class0/0000.jpg", "class0/0002.jpg", "class1/0001.jpg", "class1/0003.jpg"]
    assert class_labels(files, tmp_path) == ([0, 0, 1, 1], ["class0", "class1"])
