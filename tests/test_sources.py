"""Sources as users have them: wrapper folders, stray files, nested layouts, hostile zips,
symbolic links, special files and oversized members. Every input is packed or rejected with
its reason, and nothing changes the classes."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from shard_tools.build import BuildSpec, build
from shard_tools.source import SourceError, open_source
from tests.conftest import jpeg_bytes
from tests.helpers import run_tool

CLASSES = ("polyps", "normal-cecum", "esophagitis")


def _images(root: Path, per_class: int = 2) -> list[str]:
    rels = []
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / cls / f"{i}.jpg").write_bytes(jpeg_bytes(color=(40 * c + 20 * i, 90, 60)))
            rels.append(f"{cls}/{i}.jpg")
    return rels


def _strays(root: Path) -> None:
    (root / "README.txt").write_text("Kvasir v2")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._polyps").write_bytes(b"\x00\x05\x16\x07")


def _zip(folder: Path, path: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return path


def _classes_and_rejects(src: Path) -> tuple[list[str], dict[str, str]]:
    s = open_source(src)
    return s.classes(), {f.rel: f.reject for f in s.files() if f.reject}


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_wrapper_folder_with_stray_files_keeps_the_classes(tmp_path, as_zip):
    wrapper = tmp_path / "src" / "kvasir-dataset-v2"
    _images(wrapper)
    _strays(wrapper.parent)  # beside the wrapper, as an unzip of a macOS zip leaves them
    (wrapper / "LICENSE.txt").write_text("CC BY 4.0")  # and one inside it
    src = _zip(tmp_path / "src", tmp_path / "k.zip") if as_zip else tmp_path / "src"
    classes, rejects = _classes_and_rejects(src)
    assert classes == sorted(CLASSES)
    assert rejects["README.txt"] == "not inside a class folder (a file at the top level)"
    assert "holds folders of images" in rejects["kvasir-dataset-v2/LICENSE.txt"]
    assert rejects[".DS_Store"] == rejects["__MACOSX/._polyps"] == \
        "hidden or system file, not data"
    res = build(BuildSpec(src=str(src), out=str(tmp_path / "out"), val_fraction=0,
                          test_fraction=0, workers=1))
    assert res.packed == 6 and res.manifest.source_files == 6 + 4
    assert res.manifest.classes == sorted(CLASSES)


def test_a_single_wrapper_is_stripped_from_paths_so_zip_and_folder_agree(tmp_path):
    _images(tmp_path / "src" / "kvasir-dataset-v2")
    zpath = _zip(tmp_path / "src", tmp_path / "k.zip")
    folder = sorted(f.rel for f in open_source(tmp_path / "src").files())
    assert folder == sorted(f.rel for f in open_source(zpath).files())
    assert folder[0] == "esophagitis/0.jpg"  # the class folder itself is never stripped


def test_nested_layout_takes_classes_from_leaf_folders(tmp_path):
    root = tmp_path / "hyper-kvasir" / "labeled-images"
    for region, kind, cls in (("lower-gi-tract", "pathological-findings", "polyps"),
                              ("lower-gi-tract", "anatomical-landmarks", "cecum"),
                              ("upper-gi-tract", "anatomical-landmarks", "pylorus")):
        (root / region / kind / cls).mkdir(parents=True)
        (root / region / kind / cls / "a.jpg").write_bytes(jpeg_bytes())
    (root / "image-labels.csv").write_text("Video file,Finding\n")
    classes, rejects = _classes_and_rejects(tmp_path / "hyper-kvasir")
    assert classes == ["cecum", "polyps", "pylorus"]
    assert list(rejects) == ["image-labels.csv"]


def test_two_folders_with_the_same_class_name_stop_the_build_naming_both(tmp_path):
    for split in ("train", "test"):
        (tmp_path / "src" / split / "polyps").mkdir(parents=True)
        (tmp_path / "src" / split / "polyps" / "a.jpg").write_bytes(jpeg_bytes())
    with pytest.raises(SourceError, match="'test/polyps/' and 'train/polyps/'"):
        open_source(tmp_path / "src")
    res = run_tool("kvasir-shard", ["build", str(tmp_path / "src"), str(tmp_path / "out")],
                   check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "train/polyps/" in res.stderr and not (tmp_path / "out").exists()


def test_a_folder_of_images_with_image_subfolders_is_not_a_class(tmp_path):
    _images(tmp_path / "src")
    (tmp_path / "src" / "polyps" / "thumbs").mkdir()
    (tmp_path / "src" / "polyps" / "thumbs" / "t.jpg").write_bytes(jpeg_bytes())
    classes, rejects = _classes_and_rejects(tmp_path / "src")
    assert classes == ["esophagitis", "normal-cecum", "thumbs"]
    assert rejects["polyps/0.jpg"] == \
        "not inside a class folder ('polyps/' holds folders of images)"


def test_zip_members_that_escape_the_root_are_rejected_never_classes(tmp_path):
    zpath = tmp_path / "evil.zip"
    good = jpeg_bytes()
    with zipfile.ZipFile(zpath, "w") as zf:
        for name in ("polyps/ok.jpg", "../evil.jpg", "/abs/path.jpg", "cls/../../x.jpg",
                     "C:/win.jpg", "polyps\\back.jpg", "polyps/ok.jpg"):
            zf.writestr(name, good)
        link = zipfile.ZipInfo("polyps/link.jpg")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
        zf.writestr("normal-cecum/fine.jpg", jpeg_bytes(color=(1, 2, 3)))
    classes, rejects = _classes_and_rejects(zpath)
    assert classes == ["normal-cecum"]  # polyps holds only rejected members (and a duplicate)
    assert "'..' would leave the archive root" in rejects["../evil.jpg"]
    assert "'..' would leave the archive root" in rejects["cls/../../x.jpg"]
    assert "absolute path or drive letter" in rejects["/abs/path.jpg"]
    assert "absolute path or drive letter" in rejects["C:/win.jpg"]
    assert "backslash" in rejects["polyps\\back.jpg"]
    assert "symbolic link inside the zip" in rejects["polyps/link.jpg"]
    assert "several members of this name" in rejects["polyps/ok.jpg"]


def _peak_mib() -> str:
    """Code printing this process's and its finished children's peak RSS in MiB. VmHWM, not
    ru_maxrss, for the process itself: Linux carries ru_maxrss over from the parent."""
    return ("import resource; hwm = [l for l in open('/proc/self/status') "
            "if l.startswith('VmHWM')][0].split()[1]; "
            "print(int(hwm) / 1024, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")


def test_oversized_member_is_rejected_by_its_size_without_inflating_it(tmp_path):
    zpath, fine = tmp_path / "bomb.zip", tmp_path / "fine.jpg"
    fine.write_bytes(jpeg_bytes())
    make = ("import zipfile, sys; zf = zipfile.ZipFile(sys.argv[1], 'w'); "
            "info = zipfile.ZipInfo('polyps/huge.jpg'); info.compress_type = zipfile.ZIP_DEFLATED; "
            "fh = zf.open(info, 'w', force_zip64=True); "
            "[fh.write(bytes(1 << 20)) for _ in range(300)]; fh.close(); "  # 300 MiB of zeros
            "zf.write(sys.argv[2], 'polyps/fine.jpg'); zf.close()")
    subprocess.run([sys.executable, "-c", make, str(zpath), str(fine)], check=True, timeout=300)
    assert zpath.stat().st_size < 2_000_000  # about 300 KB compressed
    for job in (f"from shard_tools.build import BuildSpec, build; r = build(BuildSpec("
                f"src={str(zpath)!r}, out={str(tmp_path / 'out')!r}, val_fraction=0, "
                "test_fraction=0, workers=2)); print(r.manifest.rejected); ",
                f"from shard_tools.eda import eda; e = eda({str(zpath)!r}, "
                f"{str(tmp_path / 'eda')!r}, 2); print(e['would_reject']); "):
        res = subprocess.run([sys.executable, "-c", job + _peak_mib()], capture_output=True,
                             text=True, timeout=300, check=True)
        rejected, peaks = res.stdout.strip().splitlines()[-2:]
        assert "'polyps/huge.jpg', 'reason': 'file of 300.0 MiB is over the 64 MiB limit" \
            in rejected
        assert max(float(x) for x in peaks.split()) < 200, peaks  # the member alone: 300 MiB


def test_symlinks_are_followed_and_broken_or_looping_ones_rejected(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "esophagitis"
    elsewhere.mkdir(parents=True)
    (elsewhere / "e.jpg").write_bytes(jpeg_bytes(color=(5, 6, 7)))
    src = tmp_path / "src"
    _images(src)
    os.symlink(elsewhere, src / "linked-class", target_is_directory=True)
    os.symlink(src / "polyps" / "0.jpg", src / "normal-cecum" / "link.jpg")
    os.symlink(tmp_path / "nowhere.jpg", src / "polyps" / "broken.jpg")
    os.symlink(src, src / "polyps" / "loop", target_is_directory=True)
    s = open_source(src)
    files = {f.rel: f for f in s.files()}
    assert files["linked-class/e.jpg"].cls == "linked-class"
    assert files["normal-cecum/link.jpg"].cls == "normal-cecum"
    assert "broken symbolic link" in files["polyps/broken.jpg"].reject
    assert "already listed" in files["polyps/loop"].reject
    res = build(BuildSpec(src=str(src), out=str(tmp_path / "out"), val_fraction=0,
                          test_fraction=0, workers=1))
    packed = {r.rel for r in res.records if not r.reject}
    assert {"linked-class/e.jpg", "normal-cecum/link.jpg"} <= packed
    assert res.packed + len(res.manifest.rejected) == res.manifest.source_files == len(files)


def test_a_fifo_in_a_class_folder_is_rejected_without_blocking(tmp_path):
    _images(tmp_path / "src")
    os.mkfifo(tmp_path / "src" / "polyps" / "pipe.jpg")
    res = run_tool("kvasir-shard", ["build", str(tmp_path / "src"), str(tmp_path / "out"),
                                    "--val-fraction", "0", "--test-fraction", "0"], timeout=120)
    assert "polyps/pipe.jpg: not a regular file (a FIFO): not read" in res.stdout
