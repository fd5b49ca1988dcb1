"""Run the benchmarks one after another and keep each one's printed table in OUT/<name>.txt.

    python -m benchmarks.run_all [--out bench_out] [--quick] [--only decode levels ...]

Figures are timing-sensitive: run on a quiet machine (2 torch threads lose 3-6x under other load).
The detection-quality benchmark trains a detector for up to 45 minutes; `--quick` runs a small version.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

# name -> (module, full arguments, --quick arguments)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "realism": ("benchmarks.bench_realism", ["--studies", "40", "--size", "512"],
                ["--studies", "12", "--size", "256", "--slices", "150"]),
    "decode": ("benchmarks.bench_decode", ["--slices", "64", "--size", "512", "--repeats", "5"],
               ["--slices", "32", "--size", "512", "--repeats", "2"]),
    "synth": ("benchmarks.bench_synth", ["--studies", "4", "--size", "512", "--slices", "100"],
              ["--studies", "3", "--size", "512", "--slices", "60", "--repeats", "1"]),
    "levels": ("benchmarks.bench_levels", [], []),
    "level_field": ("benchmarks.bench_level_field", ["--work", "bench_out/level_field", "--setting", "both"],
                    ["--work", "bench_out/level_field_quick", "--train-studies", "6", "--test-studies", "3",
                     "--size", "128", "--slices", "120", "--imgsz", "96", "--a-epochs", "1", "--setting", "a"]),
    "aggregation": ("benchmarks.bench_aggregation", ["--studies", "600"], ["--studies", "200"]),
    "candidates": ("benchmarks.bench_candidates", ["--worlds", "weak,medium,scoreless,none", "--seeds", "0,1,2",
                                                   "--set", "model.max_depth=2", "--set", "model.max_iter=100"],
                   ["--worlds", "weak", "--seeds", "0", "--test-studies", "100", "--set", "model.max_iter=20",
                    "--set", "candidates.repeats=1"]),
    "backends": ("benchmarks.bench_backends", ["--imgsz", "384", "512"], ["--imgsz", "384", "--repeats", "3"]),
    "detect_quality": ("benchmarks.bench_detect_quality",
                       ["--train-studies", "40", "--test-studies", "12", "--epochs", "60", "--imgsz", "384"],
                       ["--train-studies", "12", "--test-studies", "4", "--epochs", "3", "--imgsz", "128",
                        "--size", "128", "--slices", "48"]),
    "detect_speed": ("benchmarks.bench_detect_speed", [], []),
    "roi": ("benchmarks.bench_roi", ["--train-studies", "120", "--test-studies", "40", "--budget-min", "6"],
            ["--train-studies", "16", "--test-studies", "6", "--slices", "60", "--budget-min", "0.5",
             "--locator-epochs", "1"]),
    "predict_speed": ("benchmarks.bench_predict_speed",
                      ["--model", "demo_out/model", "--studies", "20", "--work", "bench_out/predict_speed"],
                      ["--model", "demo_out/model", "--studies", "4", "--naive-studies", "1", "--rss-studies", "4",
                       "--work", "bench_out/predict_speed_quick"]),
    "ladder": ("benchmarks.bench_ladder",
               ["--worlds", "coarse", "default", "subtle", "--seeds", "0", "1", "2", "--work", "bench_out/ladder",
                "--out", "bench_out/ladder.md"],
               ["--worlds", "subtle", "--seeds", "0", "--budget", "90s", "--train-studies", "16", "--test-studies",
                "6", "--synth-set", "image.size=128", "--synth-set", "volume.slices=48", "--work",
                "bench_out/ladder_quick"]),
    "serve": ("benchmarks.bench_serve", ["--model", "demo_out/model", "--studies", "3", "--work", "bench_out/serve"],
              ["--model", "demo_out/model", "--studies", "2", "--work", "bench_out/serve_quick"]),
    "crack_signal": ("benchmarks.bench_crack_signal", ["--studies", "24", "--work", "bench_out/crack_signal"],
                     ["--studies", "6", "--slices", "60", "--repeats", "2", "--work", "bench_out/crack_signal_quick"]),
}
NEEDS: dict[str, Path] = {"predict_speed": Path("demo_out/model"), "serve": Path("demo_out/model")}
"""Benchmarks that need a model folder: skipped, with the command that makes it, when it is missing."""


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks; return the number that failed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for the printed tables")
    ap.add_argument("--quick", action="store_true", help="small versions (minutes, not an hour)")
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for name in args.only:
        module, full, quick = BENCHMARKS[name]
        needed = NEEDS.get(name)
        if needed is not None and not needed.exists():
            print(f"== {name}: skipped, it needs {needed} (run `make demo` first)\n", flush=True)
            continue
        cmd = [sys.executable, "-m", module, *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        with open(args.out / f"{name}.txt", "w", encoding="utf-8") as log:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            log.write(proc.stdout)
        print(proc.stdout[-4000:], flush=True)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"== {name}: {status} in {time.perf_counter() - t0:.0f} s -> {args.out / (name + '.txt')}\n", flush=True)
        failed += proc.returncode != 0
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
