"""The shard contract and the layers: one label layout, DALI's own index format, folds and
published splits, light imports, and checkpoints independent of torch.compile."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from shard_tools.build import BuildSpec, build
from shard_tools.manifest import load, samples
from shard_tools.splitfile import SplitFileError
from tests.helpers import BIN, ROOT

SPLIT = {"val_fraction": 0.25, "test_fraction": 0.25, "shard_bytes": 1_500_000, "workers": 2}


def test_the_label_layout_is_spelled_in_one_module():
    spelled = [p.relative_to(ROOT).as_posix() for d in ("shard_tools", "kvasir_dali", "benchmarks")
               for p in (ROOT / d).glob("*.py") if re.search(r"[\"']<q", p.read_text())]
    assert spelled == ["shard_tools/manifest.py"]


def test_index_files_equal_dalis_own_wds2idx_output(shards, tmp_path):
    manifest = load(shards)
    for shard in [s for split in manifest.splits.values() for s in split.shards][:3]:
        theirs = tmp_path / "theirs.idx"
        subprocess.run([str(BIN / "wds2idx"), str(shards / shard.tar), str(theirs)], check=True,
                       capture_output=True, timeout=120)
        assert theirs.read_text() == (shards / shard.idx).read_text(), shard.idx


@pytest.fixture(scope="module")
def folds(synth_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("folds") / "out"
    build(BuildSpec(src=str(synth_dir), out=str(out), folds=3, **SPLIT))
    return out


def test_folds_partition_the_non_test_samples_and_keep_the_test_split(folds, shards):
    rows, plain = samples(folds), samples(shards)
    assert sorted(r.source for r in rows if r.split == "test") == \
        sorted(r.source for r in plain if r.split == "test")
    train = [r for r in rows if r.split != "test"]
    assert {r.split for r in train} == {"train"} and {r.fold for r in train} == {"0", "1", "2"}
    assert len(train) == len([r for r in plain if r.split != "test"]) == 72
    per = Counter((r.cls, r.fold) for r in train)
    for cls in {r.cls for r in train}:  # stratified: 9 of each class, 3 per fold
        assert [per[(cls, f)] for f in "012"] == [3, 3, 3], cls
    m = load(folds)
    assert m.layout == "folds" and m.folds == 3 and set(m.splits) == {"fold0", "fold1", "fold2",
                                                                        "test"}
    assert m.roles(1) == {"train": ["fold0", "fold2"], "val": ["fold1"], "test": ["test"]}


def test_a_duplicate_group_stays_in_one_fold(synth_dir, tmp_path):
    src = shutil.copytree(synth_dir, tmp_path / "src")
    for p in sorted(Path(src, "polyps").glob("*.jpg")):
        shutil.copy(p, p.with_name("copy-" + p.name))
    build(BuildSpec(src=str(src), out=str(tmp_path / "out"), folds=4, **SPLIT))
    place = {r.source: (r.split, r.fold) for r in samples(tmp_path / "out")}
    for p in sorted(Path(src, "polyps").glob("[!c]*.jpg")):
        rel = f"polyps/{p.name}"
        assert place[rel] == place[f"polyps/copy-{p.name}"]


def test_the_datamodule_trains_on_the_other_folds_and_validates_on_one(folds):
    from kvasir_dali.data import KvasirDataModule
    from kvasir_dali.shards import ShardSet

    s = ShardSet.open(folds)
    counts = {f: sum(r.fold == str(f) for r in samples(folds)) for f in range(3)}
    assert s.count("val", 2) == counts[2] and s.count("train", 2) == counts[0] + counts[1]
    assert len(s.files("train", 2).tars) == len(load(folds).splits["fold0"].shards) + \
        len(load(folds).splits["fold1"].shards)
    with pytest.raises(Exception, match="--data.fold 0..2"):
        KvasirDataModule(str(folds))


def test_rebuilding_from_a_builds_samples_csv_reproduces_the_split(shards, tmp_path):
    src = json.loads((shards / "manifest.json").read_text())["source"]
    published = str(shards / "samples.csv")
    build(BuildSpec(src=src, out=str(tmp_path / "again"), split_file=published, **SPLIT))
    assert (tmp_path / "again" / "samples.csv").read_bytes() == Path(published).read_bytes()
    for tar in sorted(shards.rglob("*.tar")):  # and the shards byte for byte
        assert (tmp_path / "again" / tar.relative_to(shards)).read_bytes() == tar.read_bytes()
    build(BuildSpec(src=src, out=str(tmp_path / "seed7"), split_file=published, seed=7,
                    **SPLIT))  # another seed draws no other split: the file decides
    assert {r.source: r.split for r in samples(tmp_path / "seed7")} == \
        {r.source: r.split for r in samples(shards)}


def test_a_published_path_split_csv_is_followed_and_disagreements_stop_the_build(synth_dir,
                                                                               tmp_path):
    files = sorted(p.relative_to(synth_dir).as_posix() for p in synth_dir.rglob("*.jpg"))
    table = tmp_path / "official.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh, delimiter=";")
        w.writerow(["path", "split"])
        for i, f in enumerate(files[1:]):  # one file left out
            w.writerow([f"kvasir-dataset-v2/{f}", ("train", "validation", "test")[i % 3]])
        w.writerow(["kvasir-dataset-v2/polyps/not-there.jpg", "test"])
    with pytest.raises(SplitFileError, match="1 source file.*1 row.*--allow-missing"):
        build(BuildSpec(src=str(synth_dir), out=str(tmp_path / "o"), split_file=str(table)))
    res = build(BuildSpec(src=str(synth_dir), out=str(tmp_path / "o"), split_file=str(table),
                          allow_missing=True, workers=2))
    m = res.manifest
    assert m.split_file["unlisted"] == [files[0]]
    assert m.split_file["missing"] == ["kvasir-dataset-v2/polyps/not-there.jpg"]
    placed = {r.source: r.split for r in samples(tmp_path / "o")}
    assert len(placed) == len(files) - 1
    assert all(placed[f] == ("train", "val", "test")[i % 3] for i, f in enumerate(files[1:]))
    assert {r["path"]: r["reason"] for r in m.rejected}[files[0]].startswith("not in the split")


def test_importing_the_package_and_inference_stays_light():
    code = ("import sys, kvasir_dali; assert 'torch' not in sys.modules, 'torch'; "
            "import kvasir_dali.inference; "
            "heavy = [m for m in ('lightning', 'nvidia.dali', 'torchmetrics', 'matplotlib') "
            "if m in sys.modules]; assert not heavy, heavy; "
            "from kvasir_dali import KvasirDataModule, KvasirClassifier, ShardSet, PipeSpec; "
            "print(KvasirDataModule.__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "KvasirDataModule", res.stderr


def test_a_checkpoint_loads_with_compile_switched_either_way(tmp_path):
    import torch

    from kvasir_dali.module import KvasirClassifier

    plain = KvasirClassifier(num_classes=3, compile=False)
    compiled = KvasirClassifier(num_classes=3, compile=True)  # compiles lazily: no run here
    assert list(plain.state_dict()) == list(compiled.state_dict())
    assert all(k.startswith(("model.", "val_", "test_")) for k in plain.state_dict())
    compiled.load_state_dict(plain.state_dict())
    plain.load_state_dict(compiled.state_dict())
    assert torch.equal(compiled.state_dict()["model.head.fc.weight"],
                       plain.state_dict()["model.head.fc.weight"])
