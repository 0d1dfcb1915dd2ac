"""`make demo`: the main job end to end on the embedded default.

synthesize a Kvasir-shaped set (or take the real one: --kvasir PATH) -> kvasir-shard eda
(OUT/eda/) -> kvasir-shard build -> verify -> kvasir-train preview (OUT/preview.png) ->
kvasir-train fit with configs/cpu_smoke.yaml, once per seed (each tests its best checkpoint:
results.md with intervals) -> kvasir-report over the runs (OUT/report/leaderboard.*) ->
kvasir-predict on a class folder of the source, with class-activation maps (OUT/cams/) ->
kvasir-export to ONNX (OUT/model.onnx).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=cwd)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m kvasir_dali.demo`."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="demo")
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--kvasir", default=None, help="Kvasir v2 folder or zip (default: synthetic)")
    p.add_argument("--config", default=str(ROOT / "configs" / "cpu_smoke.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="one fit per seed; kvasir-report compares them")
    a, extra = p.parse_known_args(argv)
    t0 = time.time()
    out = Path(a.out)
    bindir = Path(sys.executable).parent
    src = a.kvasir
    if src is None:
        src = str(out / "synthetic")
        if not (out / "synthetic").exists():
            run([str(bindir / "kvasir-shard"), "synth", src, "--per-class", str(a.per_class)])
    shards = out / "shards"
    tool = lambda name: str(bindir / name)  # noqa: E731 - this environment's console scripts
    run([tool("kvasir-shard"), "eda", src, "--out", str(out / "eda")])
    if not (shards / "manifest.json").exists():
        run([tool("kvasir-shard"), "build", src, str(shards)])
    run([tool("kvasir-shard"), "verify", str(shards)])
    run([tool("kvasir-train"), "preview", "--config", a.config, "--data.shards", str(shards),
         "--out", str(out / "preview.png")])
    before = set(out.glob("runs/*/version_*"))
    for seed in a.seeds:  # inside OUT, so that the config's relative `runs/` lands in OUT/runs
        run([tool("kvasir-train"), "fit", "--config", str(Path(a.config).resolve()),
             "--data.shards", str(shards.resolve()), "--seed_everything", str(seed),
             "--trainer.enable_progress_bar=false", *extra], cwd=out)
    runs = sorted(set(out.glob("runs/*/version_*")) - before, key=lambda d: d.stat().st_mtime)
    run([tool("kvasir-report"), *map(str, runs), "--out", str(out / "report")])
    best = next(runs[0].glob("checkpoints/best-*.ckpt"))
    folder = next(p for p in sorted(Path(src).iterdir()) if p.is_dir()) if a.kvasir is None \
        else shards  # a zip has no folder to point at
    # Files of one class folder, and the test split of the shards (every class): a row each,
    # and a class-activation map each (OUT/cams/cams.png: a row per predicted class).
    run([tool("kvasir-predict"), str(best), str(folder), str(shards), "--out",
         str(out / "predictions.csv"), "--cam", str(out / "cams")])
    run([tool("kvasir-export"), str(best), "--format", "onnx", "--out", str(out / "model.onnx")])
    print(f"\ndemo finished in {time.time() - t0:.0f} s; runs {', '.join(map(str, runs))}; "
          f"leaderboard {out / 'report' / 'leaderboard.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
