"""`kvasir-export CKPT --format onnx|torchscript|safetensors --out PATH`: ship a trained model.

The exported model is the reparameterized FastViT in eval mode, input float32
(N, 3, S, S) with a dynamic batch N, output logits (N, C). ONNX (metadata_props) and TorchScript
(extra file `kvasir.json`) carry the class names and the preprocessing (input size, mean, std),
so a consumer needs nothing else; safetensors holds the weights alone, `PATH.json` beside it.

Parity: the exported model's logits on a few real images (preprocessed by the evaluation graph)
must match PyTorch fp32 within max|diff| <= RTOL * max(1, max|logit|), and give the same
predicted classes; otherwise the export fails and the file is removed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from shard_tools.errors import UserError, run_command
from shard_tools.imagecheck import inspect

from .inference import Preprocess, run_data_config
from .predictor import Options, Predictor, gather

RTOL = 1e-3  # relative to the logits' scale; fp32 exports differ by ~1e-6 in practice
FORMATS = ("onnx", "torchscript", "safetensors")


class ParityError(UserError):
    """The exported model does not compute what the PyTorch model computes."""


def parity_inputs(pred: Predictor, inputs: list[str], n: int = 8) -> torch.Tensor:
    """Up to `n` real images, preprocessed by the evaluation graph: (n, 3, S, S) float32."""
    from .pipeline import build_pipeline
    from .shards import ShardSet

    rows, shard_dirs = gather(inputs)
    files = [Path(r.path) for r in rows if not r.error and Path(r.path).is_file()]
    spec = None
    if files:
        ok = [f for f in files[: 4 * n] if (v := inspect(f.read_bytes())).ok and not v.convert]
        if ok:
            spec = pred.spec(files=tuple(str(f) for f in ok[:n]), batch_size=min(n, len(ok)))
    elif shard_dirs:
        s = ShardSet.open(shard_dirs[0])
        role = next(r for r in ("test", "val", "train") if s.count(r, _any_fold(s)))
        f = s.files(role, _any_fold(s))
        spec = pred.spec(tars=f.tars, indexes=f.indexes, batch_size=min(n, f.count),
                         exts=(f.components.image, f.components.label))
    if spec is None:
        raise UserError("no decodable baseline JPEG among the --inputs given for the parity "
                        "check; give a few images with --inputs")
    pipe = build_pipeline(spec)
    images = pipe.run()[0]
    return torch.from_numpy(np.array(images.as_tensor()))


def _any_fold(shard_set) -> int | None:
    return 0 if shard_set.manifest.layout == "folds" else None


def default_inputs(ckpt: Path) -> list[str]:
    """The run's own shards (from the config it saved), when they are still there."""
    shards = run_data_config(ckpt).get("shards")
    return [shards] if shards and (Path(shards) / "manifest.json").is_file() else []


def export(model: torch.nn.Module, pre: Preprocess, fmt: str, out: Path,
           example: torch.Tensor) -> None:
    """Write `model` (fused, eval, CPU, fp32) to `out` in `fmt`, with its metadata."""
    meta = pre.to_json()
    if fmt == "onnx":
        import onnx

        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(model, (example,), str(out), input_names=["images"],
                          output_names=["logits"], dynamic_shapes={"x": {0: batch}},
                          external_data=False, dynamo=True, verbose=False)
        proto = onnx.load(str(out))
        for k, v in {"kvasir": meta, "classes": json.dumps(pre.classes),
                     "image_size": str(pre.image_size), "mean": json.dumps(pre.mean),
                     "std": json.dumps(pre.std)}.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.save(proto, str(out))
    elif fmt == "torchscript":
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(out), _extra_files={"kvasir.json": meta})
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out), metadata={"kvasir": meta})
        out.with_name(out.name + ".json").write_text(
            json.dumps({**json.loads(meta), "weights": out.name,
                        "load": "timm.create_model(model_name, num_classes=len(classes)); "
                                "timm.utils.reparameterize_model(model); "
                                "model.load_state_dict(safetensors.torch.load_file(weights))"},
                       indent=2) + "\n")
    else:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")


def exported_logits(fmt: str, out: Path, pre: Preprocess, x: torch.Tensor) -> np.ndarray:
    """Run the file just written, as a consumer would."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    if fmt == "torchscript":
        warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
        with torch.no_grad():
            return torch.jit.load(str(out)).eval()(x).numpy()
    import timm
    from safetensors.torch import load_file
    from timm.utils import reparameterize_model

    model = reparameterize_model(timm.create_model(pre.model_name, num_classes=len(pre.classes)))
    model.load_state_dict(load_file(str(out)))
    with torch.no_grad():
        return model.eval()(x).numpy()


def check_parity(ref: np.ndarray, got: np.ndarray) -> float:
    """max |logit difference|; raises ParityError beyond the tolerance or on a changed class."""
    diff = float(np.abs(ref - got).max())
    tol = RTOL * max(1.0, float(np.abs(ref).max()))
    if got.shape != ref.shape or diff > tol or (ref.argmax(1) != got.argmax(1)).any():
        raise ParityError(f"exported logits differ from PyTorch's: max |diff| {diff:.3g} "
                          f"(tolerance {tol:.3g}), shapes {got.shape} vs {ref.shape}")
    return diff


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kvasir-export", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="--debug (or KVASIR_DEBUG=1) shows tracebacks of errors")
    ap.add_argument("ckpt", help="checkpoint written by kvasir-train (.ckpt)")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--out", required=True, help="file to write")
    ap.add_argument("--inputs", nargs="*", default=None,
                    help="images, folders or a shards folder for the parity check (default: "
                         "the run's own shards, from its config.yaml)")
    return ap


def _run(argv: list[str]) -> int:
    from .predict import writable

    a = parser().parse_args(argv)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    ckpt, out = Path(a.ckpt), Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writable(out)
    pred = Predictor(str(ckpt), Options(device="cpu", precision="32"))
    inputs = a.inputs if a.inputs is not None else default_inputs(ckpt)
    if not inputs:
        raise UserError(f"the run's shards are not found next to {ckpt}; give a few images for "
                        "the parity check with --inputs")
    x = parity_inputs(pred, inputs)
    model, pre = pred.model.eval(), pred.pre
    # Traced with a batch of 2 and checked on another batch size: proves the batch is dynamic.
    export(model, pre, a.format, out, x[:2].clone() if len(x) > 2 else torch.cat([x, x, x])[:3])
    with torch.no_grad():
        ref = model(x).numpy()
    try:
        diff = check_parity(ref, exported_logits(a.format, out, pre, x))
    except ParityError as exc:
        out.unlink(missing_ok=True)
        raise ParityError(f"{out} removed: {exc}") from exc
    print(f"kvasir-export: wrote {out} ({a.format}, {out.stat().st_size / 1e6:.1f} MB, "
          f"{len(pre.classes)} classes, input {pre.image_size} px); parity on {len(x)} images: "
          f"max |logit diff| {diff:.2e}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kvasir-export`."""
    return run_command("kvasir-export", _run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
