"""Where detector training time goes on CPU: ms per image for each part of a training step, and what the knobs do.

    python -m benchmarks.bench_train_cost [--quick] [--data data.yaml] [--work DIR] [--repeats N]
                                          [--parts step loader epoch omp] [--imgsz 160 192 288]

Without --data it builds a small YOLO detector dataset itself: `spinefrac synth` full-field 512 px studies,
then `prepare_detector_dataset` with the spine ROI on and no locator (crops from the body fallback), rendered
with `render.imgsz=160 roi.size_mm=80 render.recipe=windows`. It is kept in --work and reused.

Parts, each timed per image (ms), variants round-robin over --repeats rounds, medians reported:
  step    (after one discarded warm-up round) one optimisation step of yolov8n (1 class) on in-memory
          batches taken from the real train dataloader: forward, Ultralytics loss (v8DetectionLoss), backward, optimizer step (grad clip, AdamW,
          EMA update, as BaseTrainer.optimizer_step); variants threads 1/2, deterministic on/off, imgsz;
          "cpu" is process CPU time per image (all threads), which other load disturbs less than wall time
  loader  iterating the Ultralytics train dataloader alone (decode, mosaic/affine/flip, collate), one warm
          pass then one timed pass; variants workers 0/2, cache none/ram/disk, imgsz
  omp     the step part in child processes, OpenMP threads spinning while they wait (libgomp's default),
          sleeping (OMP_WAIT_POLICY=PASSIVE) or spinning briefly (GOMP_SPINCOUNT), each beside 0 and 4 extra
          busy processes (--omp-load) that stand in for other work on the shared cores; every other part
          runs with the wait policy of configs/detector.yaml train.omp_wait, as train_yolo does
  epoch   `detector.train.train_yolo` for 3 epochs (close_mosaic 0, so mosaic stays as configured); the second
          epoch is timed with callbacks (the first warms up, the last also plots its validation): its batches,
          its validation, the rest (EMA attributes, metrics CSV, saving last.pt/best.pt); also the final
          validation of best.pt and the whole call (setup, plots, every epoch); variants deterministic, workers
          (honoured on CPU through a callback), cache, threads, plots, imgsz
Profile one run and summarise it by part of the training loop (dataloading, forward, loss, backward, ...):
    py-spy record --subprocesses -f raw -r 50 -o prof.txt -- python -m benchmarks.bench_train_cost --one-run 2
    python -m benchmarks.bench_train_cost --summarise prof.txt

The default row of each part is configs/detector.yaml `train:` as it stands (threads 0 = every core) at the
first --imgsz. The machine is shared: absolute figures move 3-6x with other load, so compare ratios within
one run only, and quote them beside the load average printed at the start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MS = 1000.0
SYNTH_SET = ("labels.box_fraction=1.0", "labels.positive_fraction=0.6")  # every positive study boxed
PREPARE_SET = ("render.imgsz=160", "roi.size_mm=80", "render.recipe=windows", "roi.enabled=true")
DEFAULT_IMGSZ = (160, 192, 288)
EPOCHS = 3            # epoch part: the first epoch is warm-up (allocations, first plots), the last plots its validation
TIMED_EPOCH = 1       # epoch part: the epoch timed (0-based): neither the first nor the last
STEPS = 4             # step part: timed optimisation steps per variant per round (after one warm-up step)
GRAD_CLIP = 10.0      # BaseTrainer.optimizer_step clips gradients to this norm
LR = 1e-3
FULL = {"studies": 16, "slices": 200, "repeats": 3}
QUICK = {"studies": 10, "slices": 150, "repeats": 2}
PARTS = ("step", "loader", "epoch", "omp")


# ---------------------------------------------------------------- dataset
def build_dataset(work: Path, *, studies: int, slices: int, seed: int) -> Path:
    """Synthesise full-field studies and prepare an ROI detector dataset under `work`; return its data.yaml."""
    from data_prep.runs.config import load_config
    from data_prep.synthetic.synth import synthesize
    from detector.yolo_dataset import prepare_detector_dataset

    data_yaml = work / "yolo" / "data.yaml"
    if data_yaml.is_file():
        print(f"# reusing {data_yaml}")
        return data_yaml
    root = work / "synth"
    t0 = time.perf_counter()
    synthesize(root, n_studies=studies, seed=seed, split="train", progress=False, overwrite=True, workers=2,
               config=load_config("synth", None, [*SYNTH_SET, f"volume.slices={slices}"]))
    t1 = time.perf_counter()
    out = prepare_detector_dataset(root, work / "yolo", config=load_config("detector", None, PREPARE_SET),
                                   workers=2, progress=False, overwrite=True)
    print(f"# dataset: synth {studies} studies x ~{slices} slices in {t1 - t0:.0f} s, prepare in "
          f"{time.perf_counter() - t1:.0f} s -> {out}")
    return out


def disk_copy(data_yaml: Path, work: Path) -> Path:
    """A copy of the dataset for cache=disk: its .npy files would otherwise be read by every other variant too."""
    import yaml

    data = yaml.safe_load(data_yaml.read_text())
    root = Path(data.get("path") or data_yaml.parent)
    root = root if root.is_absolute() else (data_yaml.parent / root).resolve()
    target = work / "yolo_diskcache"
    if not target.is_dir():
        shutil.copytree(root, target, ignore=shutil.ignore_patterns("*.cache", "*.npy"))
    out = target / "data_disk.yaml"
    out.write_text(yaml.safe_dump({**data, "path": str(target)}, sort_keys=False))
    return out


# ---------------------------------------------------------------- helpers
def ultralytics_cfg(train: dict[str, Any], imgsz: int, **extra: Any) -> Any:
    """The Ultralytics IterableSimpleNamespace the trainer would build from our `train:` section."""
    from ultralytics.cfg import get_cfg

    from detector.train import _ultralytics_args

    args = _ultralytics_args(train)
    args.update(imgsz=imgsz, model="yolov8n.yaml", **extra)
    args.pop("threads", None)
    return get_cfg(overrides=args)


def train_loader(data_yaml: Path, cfg: Any, *, workers: int) -> Any:
    """The Ultralytics train dataloader for `data_yaml` with hyperparameters `cfg` (as DetectionTrainer builds it)."""
    from ultralytics.data import build_dataloader, build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(data_yaml))
    dataset = build_yolo_dataset(cfg, data["train"], int(cfg.batch), data, mode="train", stride=32)
    return build_dataloader(dataset, int(cfg.batch), workers, shuffle=True)


def load_avg() -> str:
    """The 1-minute load average (how busy the shared cores were)."""
    return f"{os.getloadavg()[0]:.1f}"


def round_robin(variants: Sequence[str], repeats: int, run: Callable[[str], dict[str, float]], *,
                warm: bool = False) -> dict:
    """Run every variant once per round, `repeats` rounds; return variant -> metric -> list of values.

    With `warm`, one discarded round first (first-call paths, allocator, page cache).
    """
    results: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    if warm:
        for v in variants:
            run(v)
        print(f"#   warm-up round done (load {load_avg()})", flush=True)
    for r in range(repeats):
        for v in variants:
            for key, value in run(v).items():
                results[v].setdefault(key, []).append(value)
            print(f"#   round {r + 1}/{repeats} {v}: done (load {load_avg()})", flush=True)
    return results


def medians(results: dict) -> dict[str, dict[str, float]]:
    """Median of every metric of every variant."""
    return {v: {k: statistics.median(xs) for k, xs in m.items()} for v, m in results.items()}


def table(title: str, med: dict[str, dict[str, float]], columns: Sequence[str], ratio_of: str,
          default: str) -> str:
    """A markdown table: one row per variant, the median of each column, and `ratio_of` over the default's."""
    head = ["variant", *columns, f"x default ({ratio_of})"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = med[default].get(ratio_of)
    for v, m in med.items():
        cells = [f"{m[c]:.1f}" if c in m else "-" for c in columns]
        ratio = f"{m[ratio_of] / base:.2f}" if base and ratio_of in m else "-"
        lines.append("| " + " | ".join([v, *cells, ratio]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- step: forward / loss / backward / optimizer
def bench_step(data_yaml: Path, train: dict[str, Any], imgsizes: Sequence[int], repeats: int) -> dict:
    """ms per image of forward, loss, backward and optimizer step on in-memory batches."""
    import torch
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import ModelEMA, init_seeds

    from detector.offline import resolve_threads, restore_threads

    base = imgsizes[0]
    all_threads = resolve_threads(train["threads"])
    variants = {"default": (base, bool(train["deterministic"]), all_threads)}
    variants[f"deterministic {str(not train['deterministic']).lower()}"] = (base, not train["deterministic"],
                                                                            all_threads)
    if all_threads > 1:
        variants["threads 1"] = (base, bool(train["deterministic"]), 1)
    for size in imgsizes[1:]:
        variants[f"imgsz {size}"] = (size, bool(train["deterministic"]), all_threads)

    batches = {}
    for size in {v[0] for v in variants.values()}:
        cfg = ultralytics_cfg(train, size)
        loader = train_loader(data_yaml, cfg, workers=0)
        it = iter(loader)
        batches[size] = [next(it) for _ in range(min(STEPS + 1, len(loader)))]
        model_args = cfg
    model = DetectionModel("yolov8n.yaml", nc=1, verbose=False)
    model.args = model_args  # box / cls / dfl gains for the loss, as the trainer sets them
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    ema = ModelEMA(model)

    def prep(batch: dict) -> dict:
        out = dict(batch)
        out["img"] = batch["img"].float() / 255.0
        return out

    def step(batch: dict, times: dict[str, float]) -> None:
        t0 = time.perf_counter()
        preds = model(batch["img"])
        t1 = time.perf_counter()
        loss, _ = model.loss(batch, preds)
        t2 = time.perf_counter()
        loss.sum().backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        t4 = time.perf_counter()
        for key, dt in (("forward", t1 - t0), ("loss", t2 - t1), ("backward", t3 - t2), ("optimizer", t4 - t3)):
            times[key] = times.get(key, 0.0) + dt

    def run(name: str) -> dict[str, float]:
        size, deterministic, threads = variants[name]
        init_seeds(0, deterministic=deterministic)
        restore_threads(threads)
        data = [prep(b) for b in batches[size]]
        step(data[0], {})  # warm-up (allocator, first-call paths)
        times: dict[str, float] = {}
        n = 0
        cpu0 = time.process_time()
        for b in data[1:]:
            step(b, times)
            n += b["img"].shape[0]
        cpu = (time.process_time() - cpu0) * MS / n
        out = {k: v * MS / n for k, v in times.items()}
        out["total"] = sum(out.values())
        out["cpu"] = cpu
        return out

    print(f"# step: {len(variants)} variants x {repeats} rounds", flush=True)
    med = medians(round_robin(list(variants), repeats, run, warm=True))
    init_seeds(0, deterministic=False)
    return med


# ---------------------------------------------------------------- loader: the train dataloader alone
def bench_loader(data_yaml: Path, train: dict[str, Any], imgsizes: Sequence[int], repeats: int,
                 work: Path) -> dict:
    """ms per image of iterating the Ultralytics train dataloader (decode + augmentation + collate)."""
    base = imgsizes[0]
    cache = str(train["cache"])
    variants = {"default (workers 0)": (base, "none" if cache == "none" else cache, 0)}
    variants["workers 2"] = (base, cache, 2)
    for other in ("ram", "disk"):
        if other != cache:
            variants[f"cache {other}"] = (base, other, 0)
    for size in imgsizes[1:]:
        variants[f"imgsz {size}"] = (size, cache, 0)
    disk_yaml = disk_copy(data_yaml, work) if any(v[1] == "disk" for v in variants.values()) else None

    def run(name: str) -> dict[str, float]:
        size, cache_mode, workers = variants[name]
        cfg = ultralytics_cfg({**train, "cache": cache_mode}, size)
        t0 = time.perf_counter()
        loader = train_loader(disk_yaml if cache_mode == "disk" else data_yaml, cfg, workers=workers)
        t1 = time.perf_counter()
        n = sum(b["img"].shape[0] for b in loader)  # warm pass (worker start-up, first disk-cache writes)
        t2 = time.perf_counter()
        n = sum(b["img"].shape[0] for b in loader)
        t3 = time.perf_counter()
        if hasattr(loader, "close"):
            loader.close()
        return {"steady": (t3 - t2) * MS / n, "first pass": (t2 - t1) * MS / n, "build s": t1 - t0}

    print(f"# loader: {len(variants)} variants x {repeats} rounds", flush=True)
    return medians(round_robin(list(variants), repeats, run))


# ---------------------------------------------------------------- epoch: train_yolo end to end
class EpochClock:
    """Trainer callbacks that time the last epoch's batches, its validation, the rest, and the final validation."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.vals: list[tuple[float, float]] = []
        self.n_train = self.n_val = 0

    def callbacks(self) -> dict[str, Callable[[Any], None]]:
        """Callbacks for train_yolo (event -> function)."""
        def epoch_mark(name: str) -> Callable[[Any], None]:
            def cb(trainer: Any) -> None:
                self.n_train, self.n_val = len(trainer.train_loader.dataset), len(trainer.test_loader.dataset)
                if trainer.epoch == TIMED_EPOCH:
                    self.marks[name] = time.perf_counter()
            return cb

        def val_start(_validator: Any) -> None:
            self.vals.append((time.perf_counter(), float("nan")))

        def val_end(_validator: Any) -> None:
            self.vals[-1] = (self.vals[-1][0], time.perf_counter())

        return {"on_train_epoch_start": epoch_mark("epoch_start"), "on_train_epoch_end": epoch_mark("batches_end"),
                "on_fit_epoch_end": epoch_mark("epoch_end"), "on_val_start": val_start, "on_val_end": val_end}

    def summary(self) -> dict[str, float]:
        """ms per image of the last epoch's batches and validation, seconds of the rest and of the final val."""
        m = self.marks
        if not {"epoch_start", "batches_end", "epoch_end"} <= m.keys() or not self.vals:
            return {}
        in_epoch = [(a, b) for a, b in self.vals if m["batches_end"] <= a <= m["epoch_end"]]
        after = [(a, b) for a, b in self.vals if a > m["epoch_end"]]
        val = sum(b - a for a, b in in_epoch)
        out = {"train ms/img": (m["batches_end"] - m["epoch_start"]) * MS / self.n_train,
               "val ms/img": val * MS / self.n_val,
               "rest s": m["epoch_end"] - m["batches_end"] - val,
               "epoch s": m["epoch_end"] - m["epoch_start"]}
        if after:
            out["final val s"] = sum(b - a for a, b in after)
        return out


def bench_epoch(data_yaml: Path, train: dict[str, Any], imgsizes: Sequence[int], repeats: int, work: Path) -> dict:
    """Whole-epoch cost through detector.train.train_yolo, per variant."""
    from data_prep.runs.config import load_config
    from detector.train import train_yolo

    base = imgsizes[0]
    common = [f"train.epochs={EPOCHS}", "train.close_mosaic=0", "train.device=cpu", "train.patience=100"]
    variants = {"default": [f"render.imgsz={base}"]}
    variants[f"deterministic {str(not train['deterministic']).lower()}"] = [
        f"render.imgsz={base}", f"train.deterministic={str(not train['deterministic']).lower()}"]
    variants["workers 2 (honoured)"] = [f"render.imgsz={base}", "workers:2"]
    variants["cache ram" if train["cache"] != "ram" else "cache none"] = [
        f"render.imgsz={base}", f"train.cache={'ram' if train['cache'] != 'ram' else 'none'}"]
    variants["threads 1"] = [f"render.imgsz={base}", "train.threads=1"]
    variants[f"plots {str(not train['plots']).lower()}"] = [
        f"render.imgsz={base}", f"train.plots={str(not train['plots']).lower()}"]
    for size in imgsizes[1:]:
        variants[f"imgsz {size}"] = [f"render.imgsz={size}"]
    counter = iter(range(10**6))

    def run(name: str) -> dict[str, float]:
        sets = [s for s in variants[name] if not s.startswith("workers:")]
        workers = [int(s.split(":")[1]) for s in variants[name] if s.startswith("workers:")]
        config = load_config("detector", None, [*common, *sets])
        clock = EpochClock()
        cbs = clock.callbacks()
        if workers:
            force = workers[0]

            def honour_workers(trainer: Any) -> None:
                trainer.args.workers = force  # Ultralytics sets 0 on CPU before this event

            cbs = {**cbs, "on_pretrain_routine_start": honour_workers}
        t0 = time.perf_counter()
        train_yolo(data_yaml, work / "runs" / f"r{next(counter)}", config=config, overwrite=True, callbacks=cbs)
        total = time.perf_counter() - t0
        return {**clock.summary(), "run s": total}

    print(f"# epoch: {len(variants)} variants x {repeats} rounds (train_yolo, {EPOCHS} epochs each)", flush=True)
    return medians(round_robin(list(variants), repeats, run))


# ---------------------------------------------------------------- omp: OpenMP wait policy, child processes
OMP_POLICIES = {"spin (libgomp default)": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
                "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"}}
OMP_ENV_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
HOG_CODE = "while True: pass"  # one busy process: stands in for another engineer's training on the shared cores


def bench_omp(data_yaml: Path, imgsz: int, repeats: int, work: Path, loads: Sequence[int]) -> dict:
    """The step part at `imgsz` in child processes per OpenMP wait setting, with `loads` extra busy processes."""
    results: dict[str, dict[str, list[float]]] = {}
    print(f"# omp: {len(OMP_POLICIES)} settings x loads {list(loads)} x {repeats} rounds, one child each", flush=True)
    for r in range(repeats):
        for load in loads:
            hogs = [subprocess.Popen([sys.executable, "-c", HOG_CODE]) for _ in range(load)]
            try:
                for label, extra in OMP_POLICIES.items():
                    env = {k: v for k, v in os.environ.items() if k not in OMP_ENV_KEYS} | extra
                    child_work = work / "omp_child"
                    subprocess.run([sys.executable, "-m", "benchmarks.bench_train_cost", "--parts", "step",
                                    "--repeats", "1", "--imgsz", str(imgsz), "--data", str(data_yaml),
                                    "--work", str(child_work), "--keep-omp-env"],
                                   env=env, check=True, stdout=subprocess.DEVNULL)
                    step = json.loads((child_work / "bench_train_cost.json").read_text())["step"]
                    for variant, threads in (("default", "2 threads"), ("threads 1", "1 thread")):
                        row = results.setdefault(f"+{load} busy, {label}, {threads}", {})
                        for key in ("total", "cpu"):
                            row.setdefault(key, []).append(step[variant][key])
                    print(f"#   round {r + 1}/{repeats} +{load} busy {label}: done (load {load_avg()})", flush=True)
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
    return medians(results)


# ---------------------------------------------------------------- profile: one run under py-spy, summarised
# (category, markers): a sample goes to the first category one of whose markers occurs in its stack; the
# order matters (validation and plotting contain forward passes; the forward pass runs inside the loss call).
CATEGORIES = (
    ("plotting/logging", ("utils/plotting.py", "plt_settings", "plot_", "save_metrics", "print_args")),
    ("final validation (best.pt)", ("final_eval",)),
    ("validation per epoch", ("engine/validator.py", "validate (ultralytics/engine/trainer.py")),
    ("saving checkpoints", ("save_model", "torch/serialization.py")),
    ("setup (model, dataset scan, optimizer)", ("_setup_train", "__init__ (ultralytics/engine/trainer.py",
                                                "_new (ultralytics/engine/model.py", "get_dataset")),
    ("dataloading/augmentation", ("ultralytics/data/", "torch/utils/data/")),
    ("loss", ("utils/loss.py", "utils/tal.py")),
    ("forward", ("_predict_once",)),
    ("backward", ("backward (torch/_tensor.py", "torch/autograd/")),
    ("optimizer step + EMA", ("optimizer_step",)),
    ("imports/start-up", ("_find_and_load",)),
)
LOOP_MARK = "_do_train"  # samples inside the epoch loop of BaseTrainer
NOT_LOOP = ("plotting/logging", "final validation (best.pt)", "setup (model, dataset scan, optimizer)",
            "imports/start-up")


def summarise_profile(raw: Path) -> str:
    """Share of samples per category in a py-spy `-f raw` (collapsed stacks) file, as a markdown table.

    "of run" counts every sample; "of epochs" only those inside the epoch loop, without setup and plots.
    """
    if not raw.is_file():
        raise SystemExit(f"{raw}: no such py-spy profile (record one with `py-spy record -f raw -o {raw} -- ...`)")
    counts: dict[str, int] = {}
    loop: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        category = next((name for name, marks in CATEGORIES if any(m in stack for m in marks)), "other")
        counts[category] = counts.get(category, 0) + int(n)
        if LOOP_MARK in stack and category not in NOT_LOOP:
            loop[category] = loop.get(category, 0) + int(n)
    total, in_loop = sum(counts.values()), sum(loop.values())
    if not total:
        raise SystemExit(f"{raw}: no py-spy samples (expected `-f raw` lines 'frame;frame;... count')")
    order = [name for name, _ in CATEGORIES] + ["other"]
    lines = ["| part | samples | of run | of epochs |", "|---|---|---|---|"]
    for name in order:
        if counts.get(name):
            share = f"{100.0 * loop[name] / in_loop:.1f} %" if loop.get(name) and in_loop else "-"
            lines.append(f"| {name} | {counts[name]} | {100.0 * counts[name] / total:.1f} % | {share} |")
    lines.append(f"| all | {total} | 100 % | {in_loop} samples |")
    return "\n".join(lines)


def one_run(data_yaml: Path, work: Path, imgsz: int, epochs: int) -> None:
    """One default train_yolo run (for py-spy to record)."""
    from data_prep.runs.config import load_config
    from detector.train import train_yolo

    config = load_config("detector", None, [f"render.imgsz={imgsz}", f"train.epochs={epochs}", "train.device=cpu",
                                            "train.close_mosaic=0"])
    t0 = time.perf_counter()
    train_yolo(data_yaml, work / "runs" / "profiled", config=config, overwrite=True)
    print(f"# one run: {epochs} epoch(s) at imgsz {imgsz} in {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, build or take the dataset, run the parts, print one table per part."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="an existing YOLO detector data.yaml")
    p.add_argument("--work", type=Path, default=Path("runs/bench_train_cost"), help="dataset and run folder")
    p.add_argument("--quick", action="store_true", help=f"smaller dataset and fewer rounds ({QUICK})")
    p.add_argument("--repeats", type=int, default=None, help="rounds over the variants")
    p.add_argument("--studies", type=int, default=None)
    p.add_argument("--slices", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--imgsz", type=int, nargs="+", default=list(DEFAULT_IMGSZ), help="first one is the default")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--omp-load", type=int, nargs="+", default=[0, 4],
                   help="omp part: extra busy processes started beside it (0 = only the machine's own load)")
    p.add_argument("--keep-omp-env", action="store_true",
                   help="leave OMP_WAIT_POLICY as the environment has it (not as train.omp_wait sets it)")
    p.add_argument("--one-run", type=int, default=None, metavar="EPOCHS",
                   help="only train once with the defaults for this many epochs (to run under py-spy)")
    p.add_argument("--summarise", type=Path, default=None, metavar="RAW",
                   help="only summarise a py-spy `-f raw` profile by part of the training loop")
    args = p.parse_args(argv)
    if args.summarise is not None:
        print(summarise_profile(args.summarise))
        return 0
    if args.data is not None and not args.data.is_file():
        p.error(f"--data {args.data}: no such dataset YAML (write one with spinefrac prepare-detector)")
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats or sizes["repeats"]

    from data_prep.runs.config import load_config
    from detector.offline import configure_ultralytics, set_ultralytics_verbosity
    from detector.train import set_omp_wait

    if not args.keep_omp_env:
        set_omp_wait(str(load_config("detector").train["omp_wait"]))  # as train_yolo does, before torch loads
    configure_ultralytics()
    set_ultralytics_verbosity(False)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"# load average at start {load_avg()} on {os.cpu_count()} cores; python {sys.version.split()[0]}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    data_yaml = args.data or build_dataset(work, studies=args.studies or sizes["studies"],
                                           slices=args.slices or sizes["slices"], seed=args.seed)
    if args.one_run is not None:
        one_run(data_yaml, work, args.imgsz[0], args.one_run)
        return 0
    train = load_config("detector").train.to_dict()
    report: dict[str, Any] = {"data": str(data_yaml), "repeats": repeats, "imgsz": args.imgsz}
    tables = []
    if "step" in args.parts:
        med = bench_step(data_yaml, train, args.imgsz, repeats)
        report["step"] = med
        tables.append(table("step: ms per image of one optimisation step (batch "
                            f"{train['batch']}, in-memory batches)", med,
                            ["forward", "loss", "backward", "optimizer", "total", "cpu"], "total", "default"))
    if "loader" in args.parts:
        med = bench_loader(data_yaml, train, args.imgsz, repeats, work)
        report["loader"] = med
        tables.append(table("loader: ms per image of the train dataloader alone", med,
                            ["steady", "first pass", "build s"], "steady", "default (workers 0)"))
    if "epoch" in args.parts:
        med = bench_epoch(data_yaml, train, args.imgsz, repeats, work)
        report["epoch"] = med
        tables.append(table(f"epoch: train_yolo, epoch {TIMED_EPOCH + 1} of {EPOCHS}", med,
                            ["train ms/img", "val ms/img", "rest s", "epoch s", "final val s", "run s"], "epoch s", "default"))
    if "omp" in args.parts:
        med = bench_omp(data_yaml, args.imgsz[0], repeats, work, args.omp_load)
        report["omp"] = med
        tables.append(table("omp: step total ms per image, one child process per OpenMP wait policy", med,
                            ["total", "cpu"], "total", next(iter(med))))
    print(f"\n# {repeats} rounds, medians; load average at end {load_avg()}; {time.perf_counter() - start:.0f} s "
          f"in all; data {data_yaml}\n")
    print("\n\n".join(tables))
    (work / "bench_train_cost.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
