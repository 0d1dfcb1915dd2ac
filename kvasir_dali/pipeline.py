"""DALI graphs: one training and one evaluation graph, the device a parameter.

Reader -> decode (`mixed` on the GPU, hardware JPEG decoder where present; `cpu` otherwise)
-> [train: random-resized-crop decode, resize, dihedral flips + rotation, colour jitter]
-> resize to `image_size` -> normalize. Output images (N, 3, S, S) (or (N, S, S, 3) for
channels-last) float16/float32, and (N, 2) int64 holding each sample's label and key
number (`shard_tools.manifest.LABEL_STRUCT`), on the pipeline's device. Knows DALI, not
torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shard_tools.errors import UserError

from .augment import Augment


class DaliMissing(UserError, ImportError):
    """NVIDIA DALI is not importable; the message says which package to install."""


try:
    from nvidia.dali import fn, pipeline_def, types
except ImportError as exc:  # an install problem, not a bug: say what to install
    raise DaliMissing("NVIDIA DALI is not installed: pip install 'kvasir-dali[cu13]' (CUDA 13, "
                      "as torch's cu130 wheels) or 'kvasir-dali[cu12]' (CUDA 12)") from exc


@dataclass(frozen=True)
class PipeSpec:
    """Everything one pipeline instance needs; built per rank in DataModule.setup()."""

    tars: list[str]
    indexes: list[str]
    batch_size: int
    image_size: int
    mean: tuple[float, float, float]  # of [0, 1] pixels, from the model's timm config
    std: tuple[float, float, float]
    train: bool
    device: str = "cpu"  # "cpu" | "gpu"
    device_id: int | None = None  # CUDA device index; None for the CPU graph
    num_threads: int = 2
    shard_id: int = 0  # global rank
    num_shards: int = 1  # world size
    seed: int = 0  # base seed + global rank: augmentation and in-buffer shuffle per rank
    order_seed: int = 0  # the base seed: the per-epoch shard order, the same on every rank
    fp16: bool = False
    channels_last: bool = False
    shuffle_buffer: int = 2048  # samples held for random_shuffle (train): bounded memory
    hw_decoder_load: float = 0.65  # share of JPEGs for the hardware decoder (GPU only)
    augment: Augment = field(default_factory=Augment)
    exts: tuple[str, str] = ("jpg", "lbl")  # tar member extensions: image, binary label
    # Plain image files instead of shards (kvasir-predict, kvasir-train preview): the "labels"
    # output is then each file's index in this list, (N, 1) int32; no shuffling.
    files: tuple[str, ...] = ()
    # DALI checkpoint (reader position, shuffle and RNG state) to resume a training pipeline
    # from, as saved by DaliLoader.state(); training pipelines always keep checkpointing on.
    checkpoint: str | None = None


def _uniform(lo: float, hi: float):
    return fn.random.uniform(range=[lo, hi])


def _coin(p: float = 0.5):
    return fn.random.coin_flip(probability=p)


def _augment(images, aug: Augment):
    """Flips, transpose, rotation and colour jitter on (S, S, 3) uint8; returns (images, mirror).

    Per-sample `if` (DALI conditionals) runs an op only on the samples that draw it, so a
    rotation with p=0.5 costs half a rotation. The horizontal flip is left to
    crop_mirror_normalize, where it is free.
    """
    if aug.transpose and _coin():
        images = fn.transpose(images, perm=[1, 0, 2], transpose_layout=False)
    if aug.vflip:
        images = fn.flip(images, horizontal=0, vertical=_coin())
    if aug.rotate and aug.rotate_p and _coin(aug.rotate_p):
        images = fn.rotate(images, angle=_uniform(-aug.rotate, aug.rotate), keep_size=True,
                           fill_value=0)
    if aug.jitter_p and (aug.brightness or aug.contrast or aug.saturation or aug.hue):
        if _coin(aug.jitter_p):
            images = fn.color_twist(
                images, brightness=_uniform(1 - aug.brightness, 1 + aug.brightness),
                contrast=_uniform(1 - aug.contrast, 1 + aug.contrast),
                saturation=_uniform(1 - aug.saturation, 1 + aug.saturation),
                hue=_uniform(-aug.hue, aug.hue))
    return images, (_coin() if aug.hflip else 0)


def _reader(spec: PipeSpec):
    """(encoded images, labels) of the shards' split, or of `spec.files`."""
    if spec.files:
        return fn.readers.file(files=list(spec.files), labels=list(range(len(spec.files))),
                               shard_id=spec.shard_id, num_shards=spec.num_shards,
                               pad_last_batch=True, stick_to_shard=True, name="Reader")
    # Training shuffles twice: the shard order every epoch (the same permutation on every rank,
    # so the ranks' slices stay disjoint) and the samples inside a bounded buffer. Shards are
    # shuffled at packing time too, so a small buffer mixes classes as well as a whole share.
    order = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": spec.order_seed} \
        if spec.train else {}
    return fn.readers.webdataset(
        paths=spec.tars, index_paths=spec.indexes, ext=list(spec.exts),
        dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
        shard_id=spec.shard_id, num_shards=spec.num_shards, pad_last_batch=True,
        random_shuffle=spec.train, initial_fill=spec.shuffle_buffer,
        stick_to_shard=not spec.train,  # eval: each rank always reads its own fixed share
        name="Reader", **order)


@pipeline_def(enable_conditionals=True)
def _graph(spec: PipeSpec):
    gpu = spec.device == "gpu"
    jpegs, labels = _reader(spec)
    decoder = {"device": "mixed" if gpu else "cpu", "output_type": types.RGB}
    if gpu:  # sizes up to Kvasir's 1920x1072; the hint avoids reallocations while warming up
        decoder |= {"hw_decoder_load": spec.hw_decoder_load,
                    "preallocate_width_hint": 1920, "preallocate_height_hint": 1080}
    size = [spec.image_size, spec.image_size]
    aug = spec.augment
    mirror = 0
    if spec.train:
        # Decoding only the crop window saves the decode of pixels that would be thrown away.
        images = fn.decoders.image_random_crop(jpegs, random_area=list(aug.scale),
                                               random_aspect_ratio=list(aug.ratio),
                                               num_attempts=10, **decoder)
        images = fn.resize(images, size=size, antialias=aug.antialias)
        # Everything after the resize works on S x S pixels, fewer than the frame's.
        images, mirror = _augment(images, aug)
    else:
        images = fn.decoders.image(jpegs, **decoder)
        images = fn.resize(images, size=size)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT16 if spec.fp16 else types.FLOAT,
        output_layout="HWC" if spec.channels_last else "CHW",
        mean=[255 * m for m in spec.mean], std=[255 * s for s in spec.std], mirror=mirror)
    return images, (labels.gpu() if gpu else labels)


def build_pipeline(spec: PipeSpec):
    """A built DALI pipeline for `spec` (CPU graph when spec.device == 'cpu')."""
    resume = {"enable_checkpointing": True, "checkpoint": spec.checkpoint} if spec.train else {}
    pipe = _graph(spec, batch_size=spec.batch_size, num_threads=spec.num_threads,
                  device_id=spec.device_id if spec.device == "gpu" else None,
                  seed=spec.seed, prefetch_queue_depth=2, **resume)
    pipe.build()
    return pipe
