"""Speed and reproducibility of `spinefrac synth` on full-size studies.

    python -m benchmarks.bench_synth [--studies 4 --size 512 --slices 100 --repeats 3]

Writes the same --studies train studies (seed --seed) --repeats times with 1 worker and once with 2
workers, and prints the median wall time and process CPU time per study (the 1-worker runs; the 2-worker
run gives the parallel wall time). Every run must write byte-identical files (sidecars compared without
their creation time and runtime), whatever the worker count; the table also shows which transfer
syntaxes the set holds, since JPEG Lossless studies cost the most to write.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from data_prep.runs.artifacts import SIDECAR_SUFFIX
from data_prep.runs.config import load_config
from data_prep.synthetic.synth import META_NAME, synthesize

VOLATILE_KEYS = ("created", "runtime_s")
"""Sidecar keys that differ between identical runs."""


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (sidecars without their volatile keys), by relative path."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name.endswith(SIDECAR_SUFFIX):
            meta = json.loads(data)
            for key in VOLATILE_KEYS:
                meta.pop(key, None)
            data = json.dumps(meta, sort_keys=True).encode()
        out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def run(out: Path, args: argparse.Namespace, workers: int) -> tuple[float, float]:
    """Synthesise the set into `out`; return (wall s, CPU s of this process; worker processes not counted)."""
    cfg = load_config("synth", None, [f"image.size={args.size}", f"volume.slices={args.slices}"])
    cpu0, t0 = time.process_time(), time.perf_counter()
    synthesize(out, n_studies=args.studies, seed=args.seed, config=cfg, progress=False, workers=workers)
    return time.perf_counter() - t0, time.process_time() - cpu0


def main(argv: list[str] | None = None) -> None:
    """Time the runs, check they wrote the same bytes, print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=4)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    walls, cpus = [], []
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        ref = None
        for r in range(args.repeats + 1):
            workers = 1 if r < args.repeats else 2
            out = Path(tmp) / f"run{r}"
            wall, cpu = run(out, args, workers)
            digest = tree_digest(out)
            ref = ref or digest
            if digest != ref:
                changed = sorted(k for k in set(ref) | set(digest) if ref.get(k) != digest.get(k))
                raise SystemExit(f"run {r} (workers={workers}) wrote different files: {changed[:5]}")
            if workers == 1:
                walls.append(wall)
                cpus.append(cpu)
            else:
                wall2 = wall
            meta = json.loads((out / f"{META_NAME}{SIDECAR_SUFFIX}").read_text())
            shutil.rmtree(out)  # keeps /tmp small at 512 px
    n = args.studies
    print(f"synth benchmark: {n} studies of {args.size}x{args.size}, ~{args.slices} slices, seed {args.seed}; "
          f"median of {args.repeats} 1-worker runs; machine may be shared (noisy)")
    print(f"transfer syntaxes: {meta['counts']['transfer_syntaxes']}; slices: {meta['counts']['slices']}; "
          f"identical files in all {args.repeats + 1} runs: yes")
    print(f"{'run':<22} {'s/study':>9}")
    print(f"{'1 worker, wall':<22} {statistics.median(walls) / n:>9.2f}")
    print(f"{'1 worker, CPU':<22} {statistics.median(cpus) / n:>9.2f}")
    print(f"{'2 workers, wall':<22} {wall2 / n:>9.2f}")


if __name__ == "__main__":
    main()
