"""DALI pipelines and the DataModule, on the CPU graph with generated shards."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from dataclasses import replace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from kvasir_dali.data import DataError, KvasirDataModule
from kvasir_dali.loader import DaliLoader
from kvasir_dali.model import preprocessing
from kvasir_dali.pipeline import Augment, PipeSpec
from kvasir_dali.shards import ShardError, ShardSet
from shard_tools.manifest import ManifestError

MEAN, STD = preprocessing("fastvit_t8").mean, preprocessing("fastvit_t8").std


def spec_for(shards, split, **kw) -> PipeSpec:
    f = ShardSet.open(shards).files(split)
    base = PipeSpec(tars=f.tars, indexes=f.indexes, batch_size=4, image_size=64, mean=MEAN,
                    std=STD, train=split == "train", num_threads=2, seed=7)
    return replace(base, **kw)


def rows_by_key(shards) -> dict[int, dict]:
    return {int(r["key"]): r for r in csv.DictReader(open(shards / "samples.csv"))}


def pil_reference(path, size) -> np.ndarray:
    img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(img, np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)  # (3, S, S)


def test_eval_pipeline_matches_pil_reference(synth_dir, shards):
    rows = rows_by_key(shards)
    loader = DaliLoader(spec_for(shards, "val", image_size=96))
    images, labels, keys = next(iter(loader))
    assert images.shape == (4, 3, 96, 96) and images.dtype == torch.float32
    for img, label, key in zip(images.numpy(), labels.tolist(), keys.tolist()):
        row = rows[key]
        assert label == int(row["label"]) and row["split"] == "val"
        ref = pil_reference(synth_dir / row["source"], 96)
        err = np.abs(img - ref).mean()
        assert err < 0.06, err  # ~3/255 in pixel units: resampling and IDCT differences
        # The tolerance is tight enough to see each class of mistake:
        assert np.abs(img[::-1] - ref).mean() > 4 * err + 0.1  # swapped channels
        assert np.abs(img.transpose(0, 2, 1) - ref).mean() > 4 * err + 0.1  # transposed
        assert np.abs(img * 1.1 - ref).mean() > 2 * err  # 10% wrong normalization


def one_epoch(loader) -> list[tuple[int, int]]:
    out = []
    for _, labels, keys in loader:
        out += list(zip(keys.tolist(), labels.tolist()))
    return out


def test_eval_epoch_delivers_every_sample_once_with_its_label(shards):
    rows = rows_by_key(shards)
    loader = DaliLoader(spec_for(shards, "test", batch_size=5))
    got = one_epoch(loader)
    expected = {k for k, r in rows.items() if r["split"] == "test"}
    assert sorted(k for k, _ in got) == sorted(expected)
    assert all(int(rows[k]["label"]) == lab for k, lab in got)
    assert len(loader) == -(-len(expected) // 5)
    assert one_epoch(loader) == got  # a second epoch: same order, nothing lost to a reset


def test_ranks_split_eval_data_disjointly_and_padding_is_never_delivered(shards):
    rows = rows_by_key(shards)
    expected = sorted(k for k, r in rows.items() if r["split"] == "test")  # 24 samples
    world = 5  # 24 over 5 ranks: shares of 4 and 5, DALI pads the short ones
    per_rank = []
    for rank in range(world):
        loader = DaliLoader(spec_for(shards, "test", batch_size=3, shard_id=rank,
                                     num_shards=world))
        keys = [k for k, _ in one_epoch(loader)]
        assert len(keys) == len(set(keys))
        per_rank.append(keys)
        assert len(loader) == 2  # equal step counts on every rank
    union = sorted(k for keys in per_rank for k in keys)
    assert union == expected  # no overlap, nothing missing, no padded repeat


def test_training_output_shape_dtype_range_and_randomness(shards):
    spec = spec_for(shards, "train", batch_size=8, fp16=True)
    loader = DaliLoader(spec)
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == len(loader) == ShardSet.open(shards).count("train") // 8
        images, labels = batches[0]
        assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float16
        assert labels.dtype == torch.int64 and labels.shape == (8,)
        lo = (0 - max(MEAN)) / min(STD)
        hi = (1 - min(MEAN)) / min(STD)
        assert lo - 0.1 <= images.min().item() and images.max().item() <= hi + 0.1
        assert images.float().std() > 0.2  # not a constant image
        epochs.append(torch.cat([b[0].float() for b in batches]))
    # The shuffled label order differs between epochs, and so do the augmented pixels.
    assert not torch.equal(epochs[0], epochs[1])
    again = [torch.cat([b[0].float() for b in DaliLoader(spec)])]
    assert torch.equal(again[0], epochs[0])  # a fixed seed reproduces the first epoch
    other = torch.cat([b[0].float() for b in DaliLoader(replace(spec, seed=8))])
    assert not torch.equal(other, epochs[0])


def test_channels_last_output_matches_nchw(shards):
    a = next(iter(DaliLoader(spec_for(shards, "val"))))[0]
    b = next(iter(DaliLoader(spec_for(shards, "val", channels_last=True))))[0]
    assert b.shape == a.shape and b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


def test_augmentations_without_randomness_reduce_to_the_eval_graph(shards):
    """Full-frame crop, no flips, rotation or jitter: the training graph equals evaluation
    for frames of the crop's aspect ratio (1.25: 720x576, 1280x1024)."""
    rows = rows_by_key(shards)
    still = Augment(scale=(1.0, 1.0), ratio=(1.25, 1.25), hflip=False, vflip=False,
                    transpose=False, rotate=0, jitter_p=0)
    n = ShardSet.open(shards).count("val")
    evaluated, labels, keys = next(iter(DaliLoader(spec_for(shards, "val", batch_size=n))))
    loader = DaliLoader(spec_for(shards, "val", batch_size=n, train=True, augment=still))
    trained, train_labels = next(iter(loader))
    order = [keys.tolist().index(k) for k in loader.last_keys.tolist()]  # train order shuffles
    trained, train_labels = trained[torch.tensor(order).argsort()], train_labels[
        torch.tensor(order).argsort()]
    assert torch.equal(train_labels, labels) and sorted(order) == list(range(n))
    full = [i for i, k in enumerate(keys.tolist())
            if int(rows[k]["width"]) * 4 == int(rows[k]["height"]) * 5]
    assert len(full) >= n // 2
    for i in full:
        assert (trained[i] - evaluated[i]).abs().max() < 1e-4, rows[int(keys[i])]["source"]
    other = [i for i in range(n) if i not in full]
    assert all((trained[i] - evaluated[i]).abs().mean() > 0.01 for i in other)  # cropped


class Probe(L.LightningModule):
    """A linear model that records what the loaders delivered."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 8)
        self.seen = {"train": 0, "val": 0}

    def training_step(self, batch, _):
        x, y = batch
        self.seen["train"] += len(y)
        return torch.nn.functional.cross_entropy(self.fc(x.float().mean((2, 3))), y)

    def validation_step(self, batch, _):
        x, y, keys = batch
        self.seen["val"] += len(y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_datamodule_feeds_a_lightning_trainer_on_cpu(shards, tmp_path):
    dm = KvasirDataModule(str(shards), batch_size=8, image_size=64, device="auto")
    assert dm.num_classes == 8 and dm.classes == sorted(dm.classes)
    probe = Probe()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, enable_progress_bar=False,
                        default_root_dir=tmp_path)
    trainer.fit(probe, dm)
    assert dm.picked == "cpu"
    n_train, n_val = ShardSet.open(shards).count("train"), ShardSet.open(shards).count("val")
    assert probe.seen == {"train": 2 * (n_train // 8 * 8), "val": 2 * n_val}


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="kvasir-shard build"):
        KvasirDataModule(str(tmp_path))


def test_shard_that_does_not_match_the_manifest_is_named(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    tar = copy / manifest["splits"]["train"]["shards"][0]["tar"]
    tar.write_bytes(tar.read_bytes()[:-512])
    with pytest.raises(ShardError, match=f"{tar}.*kvasir-shard verify"):
        ShardSet.open(copy).files("train")
    idx = copy / manifest["splits"]["val"]["shards"][0]["idx"]
    idx.write_text("v1.2 999\n")
    with pytest.raises(ShardError, match=f"{idx}.*kvasir-shard verify"):
        ShardSet.open(copy).files("val")


def test_empty_split_and_oversized_batch_are_clear_errors(synth_dir, tmp_path):
    from shard_tools.build import BuildSpec, build

    out = tmp_path / "noval"
    build(BuildSpec(src=str(synth_dir), out=str(out), val_fraction=0.0, test_fraction=0.5,
                    workers=2))
    with pytest.raises(ShardError, match="val split .* no samples"):
        ShardSet.open(out).files("val")
    count = ShardSet.open(out).count("train")
    dm = KvasirDataModule(str(out), batch_size=1000, image_size=32)
    with pytest.raises(DataError, match=f"batch_size 1000 is larger .*{count} of {count}"):
        dm.check_batch()  # what kvasir-train asks before the Trainer starts
    dm.setup("test")  # testing needs no training batch
    # A rank's share, once the world size is known (two ranks here).
    dm = KvasirDataModule(str(out), batch_size=count // 2 + 1, image_size=32)
    dm.check_batch()
    dm._placement = lambda: (0, 2, 2, "cpu", None, False)
    with pytest.raises(DataError, match=f"larger than a rank's share .*{count // 2} of {count}"):
        dm.setup("fit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_gpu_requested_without_a_gpu_is_a_clear_error(shards):
    dm = KvasirDataModule(str(shards), batch_size=4, device="gpu")
    with pytest.raises(DataError, match="no CUDA GPU is visible"):
        dm.setup("fit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_gpu_graph_keeps_images_on_the_device(shards):
    for split in ("train", "val"):
        loader = DaliLoader(spec_for(shards, split, device="gpu", device_id=0, fp16=True))
        batch = next(iter(loader))
        assert batch[0].is_cuda and batch[0].dtype == torch.float16 and batch[0].shape[1] == 3
        assert batch[1].is_cuda and batch[1].dtype == torch.int64
    cpu = next(iter(DaliLoader(spec_for(shards, "val"))))[0]
    gpu = next(iter(DaliLoader(spec_for(shards, "val", device="gpu", device_id=0))))[0]
    assert (gpu.cpu() - cpu).abs().mean() < 0.05  # hardware vs libjpeg decode, same graph


def _longest_class_run(labels: list[int]) -> int:
    return max(len(list(run)) for _, run in itertools.groupby(labels))


def test_a_bounded_shuffle_buffer_mixes_classes_as_well_as_a_whole_share(shards):
    """Memory is bounded by the buffer, not the split; classes stay mixed because the shards
    are shuffled when packed and their order every epoch."""
    def epoch_labels(buffer: int, seed: int) -> list[int]:
        loader = DaliLoader(spec_for(shards, "train", batch_size=8, shuffle_buffer=buffer,
                                     seed=seed, order_seed=seed))
        return torch.cat([y for _, y in loader]).tolist()

    whole = [epoch_labels(48, s) for s in range(4)]  # the whole training split (48 samples)
    small = [epoch_labels(4, s) for s in range(4)]
    assert _longest_class_run(sorted(whole[0])) == 6  # what class-ordered data would give
    assert max(map(_longest_class_run, small)) <= max(map(_longest_class_run, whole)) + 1 < 6
    assert len({tuple(x) for x in small}) == 4  # each seed its own order
