"""kvasir-shard build/verify: round trip, determinism, hostile input, safety."""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shard_tools.build import BuildError, BuildSpec, build
from shard_tools.manifest import dump as dump_manifest
from shard_tools.manifest import load as load_manifest
from shard_tools.outdir import OutError
from shard_tools.split import Item, assign_splits, duplicate_groups, split_counts
from shard_tools.tario import format_index, iter_tar, write_tar
from shard_tools.verify import verify


def read_samples(root: Path) -> list[dict]:
    return list(csv.DictReader(open(root / "samples.csv")))


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isreg()}


def test_round_trip_keeps_bytes_labels_and_counts(synth_dir, shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    rows = read_samples(shards)
    assert manifest["classes"] == sorted(p.name for p in synth_dir.iterdir())
    assert manifest["source_files"] == 96 and not manifest["rejected"]
    assert len(rows) == 96
    for split, info in manifest["splits"].items():
        assert info["count"] == sum(r["split"] == split for r in rows)
        assert len(info["shards"]) >= 2
    by_key = {r["key"]: r for r in rows}
    seen = 0
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            members = tar_members(shards / shard["tar"])
            names = list(members)
            for i in range(0, len(names), 3):  # cls, jpg, lbl adjacent
                key = names[i].split(".")[0]
                assert [n.split(".", 1)[1] for n in names[i : i + 3]] == ["cls", "jpg", "lbl"]
                assert "." not in key and " " not in key
                row = by_key[key]
                src = (synth_dir / row["source"]).read_bytes()
                assert members[f"{key}.jpg"] == src  # baseline JPEG packed byte for byte
                label = int(row["label"])
                assert manifest["classes"][label] == row["class"] == Path(row["source"]).parts[0]
                assert int(members[f"{key}.cls"]) == label
                assert struct.unpack("<qq", members[f"{key}.lbl"]) == (label, int(key))
                assert row["split"] == split
                seen += 1
    assert seen == 96


def test_split_is_stratified_per_class(shards):
    rows = read_samples(shards)
    for cls in {r["class"] for r in rows}:
        counts = {s: sum(r["class"] == cls and r["split"] == s for r in rows)
                  for s in ("train", "val", "test")}
        assert counts == {"train": 6, "val": 3, "test": 3}


def test_default_fractions_reproduce_reference_split_sizes():
    assert split_counts(1000, 0.2, 0.104) == (200, 104)
    items = [Item(f"c{c}/{i}.jpg", f"c{c}", f"{c}-{i}", f"{(c * 1000 + i):064x}")
             for c in range(8) for i in range(1000)]
    splits = assign_splits(items, [], 0.2, 0.104, seed=0)
    assert splits.count("val") == 1600 and splits.count("test") == 832
    assert assign_splits(items, [], 0.2, 0.104, seed=0) == splits
    assert assign_splits(items, [], 0.2, 0.104, seed=1) != splits


def test_webdataset_library_reads_the_shards(shards):
    import webdataset as wds

    manifest = json.loads((shards / "manifest.json").read_text())
    urls = [str(shards / s["tar"]) for s in manifest["splits"]["val"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "cls"))
    assert len(samples) == manifest["splits"]["val"]["count"]
    img, cls = samples[0]
    assert img.mode == "RGB" and 0 <= int(cls) < len(manifest["classes"])


def test_dali_reader_reads_shards_with_project_index_on_cpu(shards):
    from nvidia.dali import fn, pipeline_def, types

    manifest = json.loads((shards / "manifest.json").read_text())
    info = manifest["splits"]["train"]
    rows = {r["key"]: r for r in read_samples(shards)}

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def pipe():
        jpg, lbl = fn.readers.webdataset(
            paths=[str(shards / s["tar"]) for s in info["shards"]],
            index_paths=[str(shards / s["idx"]) for s in info["shards"]],
            ext=["jpg", "lbl"], dtypes=[types.UINT8, types.INT64],
            missing_component_behavior="error", name="Reader")
        return jpg, lbl

    p = pipe()
    p.build()
    got = []
    while len(got) < info["count"]:
        jpg, lbl = p.run()
        for i in range(len(jpg)):
            assert int(lbl.at(i)[1]) >= 0  # the key number rides along with the label
            got.append((bytes(jpg.at(i)), int(lbl.at(i)[0])))
    got = got[: info["count"]]
    by_digest = {r["sha256"]: int(r["label"]) for r in rows.values() if r["split"] == "train"}
    assert sorted(hashlib.sha256(b).hexdigest() for b, _ in got) == sorted(by_digest)
    assert all(by_digest[hashlib.sha256(b).hexdigest()] == lab for b, lab in got)


def test_rebuild_is_byte_identical(synth_dir, shards, tmp_path):
    again = tmp_path / "again"
    build(BuildSpec(src=str(synth_dir), out=str(again), shard_bytes=1_500_000, workers=1,
                    val_fraction=0.25, test_fraction=0.25))
    files = sorted(p.relative_to(shards) for p in shards.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        if rel.name != "manifest.json":  # holds the source path, which differs
            assert (shards / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_zip_source_packs_the_same_samples_as_the_folder(synth_dir, shards, tmp_path):
    zpath = tmp_path / "kvasir-dataset-v2.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(synth_dir.rglob("*.jpg")):
            zf.write(p, "kvasir-dataset-v2/" + p.relative_to(synth_dir).as_posix())
    out = tmp_path / "zshards"
    build(BuildSpec(src=str(zpath), out=str(out), shard_bytes=1_500_000, workers=2,
                    val_fraction=0.25, test_fraction=0.25))
    assert (out / "samples.csv").read_bytes() == (shards / "samples.csv").read_bytes()


def test_hostile_folder_is_fully_accounted_for(hostile, tmp_path):
    out = tmp_path / "out"
    m = build(BuildSpec(src=str(hostile), out=str(out), workers=2, val_fraction=0.0,
                        test_fraction=0.0)).manifest
    rows = read_samples(out)
    all_files = sorted(p.relative_to(hostile).as_posix() for p in hostile.rglob("*") if p.is_file())
    packed = sorted(r["source"] for r in rows)
    rejected = {r["path"]: r["reason"] for r in m.rejected}
    assert m.source_files == len(all_files) == 16
    assert sorted(packed + list(rejected)) == all_files  # each file exactly once
    assert rejected["README.txt"] == "not inside a class folder (a file at the top level)"
    assert rejected["beta gamma/.DS_Store"] == "hidden or system file, not data"
    assert "absurd declared size 60000x60000" in rejected["beta gamma/absurd.jpg"]
    for name in ("truncated.jpg", "random.jpg", "notes.txt"):
        assert "does not decode" in rejected[f"beta gamma/{name}"], name
    assert rejected["beta gamma/empty.jpg"] == "empty file"
    reasons = {r["source"]: r["reason"] for r in rows}
    assert reasons["alpha/plain.jpg"] == "" and reasons["alpha/x.y.z.jpeg"] == ""
    assert "progressive" in reasons["alpha/progressive.jpg"]
    assert "CMYK" in reasons["beta gamma/cmyk.jpg"]
    assert "L colour mode" in reasons["beta gamma/gray.jpg"]
    assert "PNG content" in reasons["beta gamma/really_png.jpg"]
    assert "EXIF orientation" in reasons["beta gamma/rotated.jpg"]
    by_src = {r["source"]: r for r in rows}
    rot = by_src["beta gamma/rotated.jpg"]
    assert (rot["packed_width"], rot["packed_height"]) == ("60", "120")
    members = {}
    for shard in m.splits["train"].shards:
        members.update(tar_members(out / shard.tar))
    for row in rows:  # every packed image is a baseline RGB JPEG, as the HW decoder needs
        data = members[f"{row['key']}.jpg"]
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")
    assert any({"alpha/plain.jpg", "alpha/copy of plain.JPG"} <= set(g["members"])
               for g in m.duplicate_groups)
    assert verify(out) == []


def test_near_duplicates_stay_in_one_split(synth_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(synth_dir, src)
    originals = sorted((src / "polyps").glob("*.jpg"))
    for p in originals:  # a re-encoded, slightly smaller copy of every polyp image
        img = Image.open(p)
        img.resize((int(img.width * 0.9), int(img.height * 0.9))).save(
            p.with_name("copy-" + p.name), "JPEG", quality=75)
    out = tmp_path / "out"
    m = build(BuildSpec(src=str(src), out=str(out), workers=2, val_fraction=0.25,
                        test_fraction=0.25)).manifest
    split_of = {r["source"]: r["split"] for r in read_samples(out)}
    for p in originals:
        rel = p.relative_to(src).as_posix()
        assert split_of[rel] == split_of[rel.replace("polyps/", "polyps/copy-")]
    assert len(m.duplicate_groups) >= len(originals)
    assert all(len(g["splits"]) == 1 for g in m.duplicate_groups)


def test_verify_catches_a_flipped_byte(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    assert verify(copy) == []
    manifest = json.loads((copy / "manifest.json").read_text())
    tar = copy / manifest["splits"]["val"]["shards"][1]["tar"]
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0x01
    tar.write_bytes(bytes(data))
    errors = verify(copy)
    assert len(errors) == 1 and str(tar) in errors[0] and "SHA-256" in errors[0]
    cli = subprocess.run([sys.executable, "-m", "shard_tools.cli", "verify", str(copy)],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1 and tar.name in cli.stderr


def test_verify_catches_an_index_that_disagrees_with_its_tar(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    idx = copy / manifest["splits"]["test"]["shards"][0]["idx"]
    lines = idx.read_text().splitlines()
    f = lines[1].split()
    f[1] = str(int(f[1]) + 512)
    idx.write_text("\n".join([lines[0], " ".join(f), *lines[2:]]) + "\n")
    errors = verify(copy)
    assert len(errors) == 1 and str(idx) in errors[0]


def test_verify_reads_every_sample_label_and_image_header(shards, tmp_path):
    """A shard rewritten whole (so its SHA-256, size and index agree with the manifest) with
    one wrong text label and one image that is not a JPEG: verify names both samples."""
    copy = Path(shutil.copytree(shards, tmp_path / "copy"))
    m = load_manifest(copy)
    shard = m.splits["val"].shards[0]
    tar = copy / shard.tar
    samples = []
    with open(tar, "rb") as fh:
        for row in iter_tar(tar):
            parts = {}
            for member in row:
                fh.seek(member.offset)
                parts[member.ext] = fh.read(member.size)
            samples.append((row[0].name.split(".")[0], parts))
    (k0, p0), (k1, p1) = samples[0], samples[1]
    p0["cls"] = str((int(p0["cls"]) + 1) % len(m.classes)).encode()
    p1["jpg"] = b"\x89PNG" + p1["jpg"][4:]
    (copy / shard.idx).write_text(format_index(write_tar(tar, samples)))
    m.splits["val"].shards[0] = dataclasses.replace(
        shard, bytes=tar.stat().st_size, sha256=hashlib.sha256(tar.read_bytes()).hexdigest())
    dump_manifest(m, copy)
    errors = verify(copy)
    assert len(errors) == 2, errors
    assert f"sample {k0} has labels" in errors[0] and f"sample {k1} image" in errors[1]


def test_non_empty_out_is_refused_without_overwrite(synth_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutError, match="--overwrite"):
        build(BuildSpec(src=str(synth_dir), out=str(out), workers=1))
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_build_leaves_no_output(synth_dir, tmp_path, monkeypatch):
    import shard_tools.build as b

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(b, "write_samples", boom)
    with pytest.raises(KeyboardInterrupt):
        build(BuildSpec(src=str(synth_dir), out=str(tmp_path / "out"), workers=1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("err", "message"), [(errno.ENOSPC, "no space left"),
                                              (errno.EROFS, "cannot write")])
def test_full_or_read_only_disk_gives_a_clear_error(synth_dir, tmp_path, monkeypatch, err,
                                                    message):
    import shard_tools.build as b

    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(b, "TarWriter", fail)
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=message) as info:
        build(BuildSpec(src=str(synth_dir), out=str(out), workers=1))
    assert str(out) in str(info.value)
    assert list(tmp_path.iterdir()) == []  # the partial build was removed


def test_shard_tools_imports_neither_torch_nor_dali():
    code = ("import sys, shard_tools.cli, shard_tools.build, shard_tools.verify, shard_tools.synth,"
            " shard_tools.download, shard_tools.eda, shard_tools.eda_plots, shard_tools.manifest,"
            " shard_tools.outdir, shard_tools.splitfile; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'nvidia', 'lightning')];"
            " assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _all_pairs_groups(items: list[Item], near: int = 16) -> list[list[int]]:
    """The reference: every pair compared, as the search did before its index."""
    hashes = np.stack([np.frombuffer(bytes.fromhex(it.phash), np.uint8) for it in items])
    parent = list(range(len(items)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(items) - 1):
        for j in np.nonzero(np.bitwise_count(hashes[i + 1:] ^ hashes[i]).sum(1) <= near)[0]:
            a, b = find(i), find(i + 1 + int(j))
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def test_indexed_near_duplicate_search_finds_exactly_the_all_pairs_groups():
    rng = np.random.default_rng(0)
    n = 3000  # a quarter of the bits nearly constant, as a shared dark border makes them
    p = np.where(np.arange(256) % 4 == 0, 0.03, 0.5)
    bits = (rng.random((n, 256)) < p).astype(np.uint8)
    for _ in range(400):  # near copies, 0..24 bits apart: some inside the threshold, some not
        a, b = rng.integers(n, size=2)
        bits[b] = bits[a] ^ (rng.permutation(256) < rng.integers(0, 25)).astype(np.uint8)
    hexes = [row.tobytes().hex() for row in np.packbits(bits, axis=1)]
    items = [Item(f"c/{i}.jpg", "c", f"{i}", h) for i, h in enumerate(hexes)]
    found = duplicate_groups(items)
    assert found == _all_pairs_groups(items) and len(found) > 100
