"""A DALI pipeline as a torch iterable: `DaliLoader(spec)` yields batches with an exact len().

Training batches are `(images, labels)`; evaluation batches `(images, labels, keys)`, keys the
sample numbers of samples.csv. A sample that does not decode stops the pipeline (DALI cannot
skip it); the loader then finds which one by decoding the split's samples in stored order on
the CPU, and raises `DecodeError` naming the shard and the sample key. Knows DALI and torch,
not Lightning.
"""

from __future__ import annotations

from pathlib import Path

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from shard_tools.errors import UserError
from shard_tools.manifest import KEY_INDEX, LABEL_INDEX
from shard_tools.tario import parse_index

from .pipeline import PipeSpec, build_pipeline


class DecodeError(UserError):
    """A sample of the shards does not decode; the message names its shard and key."""


@pipeline_def(batch_size=1, num_threads=1, device_id=None)
def _decode_each(tars: list[str], indexes: list[str], exts: tuple[str, str]):
    jpegs, _ = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=list(exts),
                                     dtypes=[types.UINT8, types.INT64], name="Reader")
    return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)


def find_undecodable(spec: PipeSpec) -> tuple[str, str] | None:
    """(tar, key) of the first sample of `spec`'s shards that the CPU decoder rejects."""
    where = [(tar, row[0].name.split(".")[0]) for tar, idx in zip(spec.tars, spec.indexes)
             for row in parse_index(Path(idx).read_text(), idx)]
    pipe = _decode_each(list(spec.tars), list(spec.indexes), spec.exts)
    pipe.build()
    for position in range(len(where)):
        try:
            pipe.run()
        except RuntimeError:
            return where[position]
    return None


def _dali_reason(message: str) -> str:
    """The line of a DALI pipeline error that says what went wrong."""
    lines = [x.strip() for x in message.splitlines() if x.strip()]
    after = [x for i, x in enumerate(lines) if i and lines[i - 1] == "encountered:"]
    return (after or lines or ["pipeline error"])[0]


class DaliLoader:
    """A DALI iterator as a re-iterable of batches with an exact `len()`."""

    def __init__(self, spec: PipeSpec) -> None:
        self.spec = spec
        self.pipe = build_pipeline(spec)
        self.last_keys: torch.Tensor | None = None  # (N,) sample keys of the latest batch
        policy = LastBatchPolicy.DROP if spec.train else LastBatchPolicy.PARTIAL
        try:  # the iterator runs the pipeline ahead already here
            self._it = DALIGenericIterator(self.pipe, ["images", "labels"],
                                           reader_name="Reader", last_batch_policy=policy,
                                           auto_reset=True)
        except RuntimeError as exc:
            self._explain(exc)

    def __len__(self) -> int:
        return len(self._it)

    def state(self) -> str:
        """DALI checkpoint of the training pipeline: where the next epoch starts."""
        return self._it.checkpoints()[0]

    def _batches(self):
        try:
            yield from self._it
        except RuntimeError as exc:
            self._explain(exc)

    def _explain(self, exc: RuntimeError) -> None:
        """Raise DecodeError naming the sample that stopped the pipeline (else re-raise)."""
        if "Critical error in pipeline" not in str(exc) or not self.spec.tars:
            raise exc
        found, reason = find_undecodable(self.spec), _dali_reason(str(exc))
        if found is None:
            raise DecodeError(f"DALI stopped on a sample of {', '.join(self.spec.tars)} "
                              f"({reason}) that decodes on the CPU; run `kvasir-shard verify` "
                              "on the shards folder") from exc
        tar, key = found
        raise DecodeError(f"{tar}: sample {key} does not decode ({reason}); rebuild the shards "
                          "(`kvasir-shard build`) from the source images, which re-checks "
                          "every image") from exc

    def __iter__(self):
        for batch in self._batches():
            images, lbl = batch[0]["images"], batch[0]["labels"]  # lbl: (N, 2) label, key
            self.last_keys = lbl[:, KEY_INDEX]
            if self.spec.channels_last:  # (N, S, S, 3) -> (N, 3, S, S) view, NHWC in memory
                images = images.permute(0, 3, 1, 2)
            if self.spec.train:
                yield images, lbl[:, LABEL_INDEX]
            else:
                yield images, lbl[:, LABEL_INDEX], lbl[:, KEY_INDEX]
