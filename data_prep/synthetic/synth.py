"""`spinefrac synth`: synthetic CT studies written in the RSNA Kaggle layout, with the truth they know.

The anatomy, fractures and distractors come from `data_prep.synthetic.phantom`; this module decides which studies
are positive, boxed and segmented, chooses the file variety (instance order, transfer syntax, pixel
representation), writes the DICOM series (`data_prep.dicom.writer`), the NIfTI segmentations, the Kaggle
CSVs and `truth/` (docs/contracts.md, "Kaggle layout").
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm import tqdm

from data_prep.dicom.writer import write_series
from data_prep.errors import InputError
from data_prep.runs import registry
from data_prep.runs.artifacts import atomic_path, write_csv_atomic, write_sidecar
from data_prep.runs.config import Config, ConfigError, _suggest, load_config
from data_prep.runs.registry import LEVELS, PATIENT, STUDY_COL
from data_prep.synthetic import phantom

log = logging.getLogger("data_prep")

UID_ROOT = "1.2.826.0.1.3680043"
"""The RSNA competition's UID root; study numbers follow it as in the real files."""
UID_OFFSET = 100_000
"""Synthetic study numbers start here, above every real RSNA study number (< 33 000)."""
MAX_STUDIES = 100_000
"""Studies per (seed, split); the study number encodes (seed, split, index), so sets never share a UID."""
SPLITS: dict[str, int] = {"train": 0, "test": 1}
META_NAME = "synth"
"""The dataset sidecar is ROOT/synth.meta.json (seed, config, counts)."""
UNSIGNED_PADDING_HU = -1024.0
SIGNED_PADDING_HU = -2048.0
HU_MAX = 3071.0
FLOAT_DECIMALS = 5
RNG_STUDY, RNG_PLAN = 1, 2
MAX_RENDER_ATTEMPTS = 4
"""Fractures are re-drawn (and the study re-rendered) when a labelled level shows no break on any slice."""
WORLDS_CONFIG = "worlds"
"""configs/worlds.yaml: the named worlds (synth overrides that change only the fractures and their look-alikes)."""
KINDS_KEY = {"C1": "kinds_c1", "C2": "kinds_c2"}
SEG_DIR, TRUTH_DIR = "segmentations", "truth"

TRAIN_COLUMNS = (STUDY_COL, PATIENT, *LEVELS)
BOX_COLUMNS = (STUDY_COL, "x", "y", "width", "height", "slice_number")
SLICE_LEVEL_COLUMNS = (STUDY_COL, "slice_number", "slice_index", *LEVELS)
LEVEL_BOX_COLUMNS = (STUDY_COL, "slice_number", "slice_index", "level", "x", "y", "width", "height")
FRACTURE_COLUMNS = (STUDY_COL, "level", "first_slice_number", "last_slice_number", "description")
FRACTURE_BOX_COLUMNS = (STUDY_COL, "slice_number", "slice_index", "levels", "x", "y", "width", "height")


@dataclass(frozen=True)
class StudyPlan:
    """What one study will be: its UID, labels and file variety."""

    index: int
    uid: str
    levels: tuple[str, ...]
    boxed: bool
    segmented: bool
    instance_order: str
    transfer_syntax: str
    pixel_representation: int


@dataclass
class StudyResult:
    """The tables of one written study."""

    label_row: dict[str, Any]
    boxes: list[dict[str, Any]] = field(default_factory=list)
    fracture_boxes: list[dict[str, Any]] = field(default_factory=list)
    slice_levels: pd.DataFrame | None = None
    level_boxes: pd.DataFrame | None = None
    fractures: list[dict[str, Any]] = field(default_factory=list)
    n_slices: int = 0


def study_uid(seed: int, split: str, index: int) -> str:
    """Return the StudyInstanceUID of study `index` of a (seed, split) set; distinct for every triple."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0 <= index < MAX_STUDIES:
        raise ValueError(f"study index {index} outside 0..{MAX_STUDIES - 1}")
    number = UID_OFFSET + (seed * len(SPLITS) + SPLITS[split]) * MAX_STUDIES + index
    return f"{UID_ROOT}.{number}"


def world_names() -> tuple[str, ...]:
    """The worlds configs/worlds.yaml defines, in its order."""
    return tuple(load_config(WORLDS_CONFIG))


def world_overrides(world: str) -> list[str]:
    """The configs/synth.yaml overrides of a named world (configs/worlds.yaml); ConfigError for an unknown name."""
    worlds = load_config(WORLDS_CONFIG)
    if world not in worlds:
        raise ConfigError(f"unknown world {world!r}: configs/{WORLDS_CONFIG}.yaml defines "
                          f"{', '.join(worlds)}{_suggest(world, worlds)}")
    return list(worlds[world]["synth_set"])


def synth_config(world: str | None = None, path: str | os.PathLike | None = None,
                 overrides: Sequence[str] = ()) -> Config:
    """The synth config of a world: defaults < the file at `path` < the world's overrides < `overrides`."""
    return load_config("synth", path, [*(world_overrides(world) if world else []), *overrides])


def synthesize(out: Path, *, n_studies: int, seed: int, split: str = "train", config: Config | None = None,
               progress: bool = True, overwrite: bool = False, workers: int = 2, world: str | None = None) -> Path:
    """Write `n_studies` synthetic studies in the Kaggle layout under `out`; return `out`.

    Studies are built in `workers` processes; each is seeded by its own plan, so the output does not
    depend on the worker count. `world`: the name of the configs/worlds.yaml world `config` was made from,
    recorded in the sidecar (the config itself is recorded in full either way).
    """
    t0 = time.perf_counter()
    out = Path(out)
    cfg = config if config is not None else load_config("synth")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not 1 <= n_studies <= MAX_STUDIES:
        raise ValueError(f"n_studies must be in 1..{MAX_STUDIES}, got {n_studies}")
    _prepare_root(out, overwrite)
    named = {"world": world} if world is not None else {}
    write_sidecar(out / META_NAME, kind="synth", config=cfg.to_dict(),
                  extra={"status": "incomplete", "seed": seed, "split": split, "n_studies": n_studies, **named})
    plans = plan_studies(n_studies, seed=seed, split=split, config=cfg)
    images = out / ("train_images" if split == "train" else "test_images")
    results = _synthesize_all(plans, images, out, seed=seed, split=split, config=cfg, progress=progress,
                              workers=workers)
    counts = _write_tables(out, results, split, cfg)
    counts.update(slices=int(sum(r.n_slices for r in results)),
                  transfer_syntaxes=_count(p.transfer_syntax for p in plans),
                  instance_orders=_count(p.instance_order for p in plans),
                  pixel_representations=_count(str(p.pixel_representation) for p in plans))
    write_sidecar(out / META_NAME, kind="synth", config=cfg.to_dict(), counts=counts,
                  runtime_s=time.perf_counter() - t0,
                  extra={"status": "complete", "seed": seed, "split": split, "n_studies": n_studies, **named,
                         "uids": [p.uid for p in plans]})
    log.info("wrote %d synthetic %s studies to %s in %.1f s", n_studies, split, out, time.perf_counter() - t0)
    return out


def plan_studies(n: int, *, seed: int, split: str, config: Config) -> list[StudyPlan]:
    """Decide labels and file variety for every study (stratified, so small sets hold every case)."""
    rng = np.random.default_rng([seed, SPLITS[split], RNG_PLAN])
    lab, files = config["labels"], config["files"]
    positive = _stratified(rng, n, {True: lab["positive_fraction"], False: 1 - lab["positive_fraction"]})
    levels = [_sample_levels(rng, lab) if positive[i] else () for i in range(n)]
    boxed = _choose_boxed(rng, levels, lab["box_fraction"])
    seg_fraction = lab["segmentation_fraction"] if split == "train" else 0.0
    segmented = _stratified(rng, n, {True: seg_fraction, False: 1 - seg_fraction})
    plain = 1.0 - files["jpeg_lossless_fraction"] - files["rle_fraction"]
    syntaxes = _stratified(rng, n, {registry.TS_EXPLICIT_LE: plain,
                                    registry.TS_JPEG_LOSSLESS_SV1: files["jpeg_lossless_fraction"],
                                    registry.TS_RLE: files["rle_fraction"]})
    unsigned = _stratified(rng, n, {0: files["unsigned_fraction"], 1: 1 - files["unsigned_fraction"]})
    first = int(rng.integers(2))
    plans = []
    for i in range(n):
        plans.append(StudyPlan(index=i, uid=study_uid(seed, split, i), levels=levels[i], boxed=i in boxed,
                               segmented=bool(segmented[i]),
                               instance_order=("head_first", "feet_first")[(i + first) % 2],
                               transfer_syntax=str(syntaxes[i]), pixel_representation=int(unsigned[i])))
    return plans


def _stratified(rng: np.random.Generator, n: int, shares: Mapping[Any, float]) -> list[Any]:
    """n values with counts proportional to `shares` (largest remainder), in random order.

    Every value with a positive share appears at least once when n allows it, so tiny sets still hold
    both instance orders, a compressed study, a positive and a negative.
    """
    keys = list(shares)
    p = np.clip(np.array([shares[k] for k in keys], dtype=float), 0.0, None)
    if p.sum() <= 0:
        raise ValueError(f"shares {dict(shares)} sum to zero")
    p = p / p.sum()
    counts = np.floor(p * n).astype(int)
    for j in np.argsort(-(p * n - counts), kind="stable")[: n - counts.sum()]:
        counts[j] += 1
    if n >= np.count_nonzero(p):
        for j in np.nonzero((p > 0) & (counts == 0))[0]:
            counts[int(np.argmax(counts))] -= 1
            counts[j] += 1
    values = [k for k, c in zip(keys, counts, strict=True) for _ in range(c)]
    order = rng.permutation(len(values))
    return [values[i] for i in order]


def _choose_boxed(rng: np.random.Generator, levels: Sequence[tuple[str, ...]], fraction: float) -> set[int]:
    """Positive studies that get boxes: round(fraction * positives), at least one, drawn with weights
    proportional to the number of fractured levels (real boxed studies have 2.0 levels on average
    against 1.5 for all positives; weighting by the count reproduces that shift)."""
    pos = [i for i, lv in enumerate(levels) if lv]
    if not pos or fraction <= 0:
        return set()
    k = min(len(pos), max(1, round(fraction * len(pos))))
    w = np.array([len(levels[i]) for i in pos], dtype=float)
    return set(rng.choice(pos, size=k, replace=False, p=w / w.sum()).tolist())


def _sample_levels(rng: np.random.Generator, lab: Mapping[str, Any]) -> tuple[str, ...]:
    """Fractured levels of a positive study, following the real count and level distributions."""
    p_count = np.array(lab["levels_per_positive"], dtype=float)
    k = int(rng.choice(np.arange(1, len(p_count) + 1), p=p_count / p_count.sum()))
    if k == 1:
        w = np.array(lab["single_level_weights"], dtype=float)
        return (LEVELS[int(rng.choice(len(LEVELS), p=w / w.sum()))],)
    w = np.array(lab["multi_level_weights"], dtype=float)
    if rng.random() < lab["contiguous_prob"]:
        starts = np.array([w[s:s + k].sum() for s in range(len(LEVELS) - k + 1)])
        s = int(rng.choice(len(starts), p=starts / starts.sum()))
        idx = list(range(s, s + k))
    else:
        idx = sorted(rng.choice(len(LEVELS), size=k, replace=False, p=w / w.sum()).tolist())
    return tuple(LEVELS[i] for i in idx)


def make_grid(rng: np.random.Generator, anatomy: phantom.Anatomy, config: Config) -> phantom.Grid:
    """The study's voxel grid (body coordinates): spacing from the FOV, thickness from volume.slices."""
    img, vol = config["image"], config["volume"]
    size = int(img["size"])
    spacing = round(float(rng.uniform(*img["fov_mm"])) / size, int(img["spacing_decimals"]))
    step = float(vol["thickness_step_mm"])
    thickness = max(step, round(float(vol["nominal_coverage_mm"]) / int(vol["slices"]) / step) * step)
    n = int(math.floor((anatomy.top_z - anatomy.bottom_z) / thickness)) + 1
    c4 = anatomy.vertebrae["C4"].frame.origin
    jit = float(img["origin_jitter_mm"])
    half = (size - 1) / 2 * spacing
    origin = (round(c4[0] - half + float(rng.uniform(-jit, jit)), 3),
              round(c4[1] + float(img["centre_behind_body_mm"]) - half + float(rng.uniform(-jit, jit)), 3))
    return phantom.Grid(n=n, rows=size, cols=size, spacing=spacing, thickness=thickness, origin_xy=origin,
                        z_top=round(anatomy.top_z, 3))


@dataclass
class BuiltStudy:
    """A rendered study before writing: HU as stored, labels, geometry in patient mm, fracture truth."""

    plan: StudyPlan
    hu: np.ndarray
    labels: np.ndarray
    grid: phantom.Grid
    origin_xy: tuple[float, float]
    z_top: float
    fractures: list[phantom.Fracture]
    fracture_boxes: list[dict[int, tuple[int, int, int, int]]]
    margin_px: float


def build_study(plan: StudyPlan, *, seed: int, split: str, config: Config) -> BuiltStudy:
    """Sample and render one study (nothing written)."""
    rng = np.random.default_rng([seed, SPLITS[split], RNG_STUDY, plan.index])
    anatomy = phantom.build_anatomy(rng, config["anatomy"])
    grid = make_grid(rng, anatomy, config)
    for attempt in range(1, MAX_RENDER_ATTEMPTS + 1):
        fractures = _sample_fractures(rng, anatomy, plan.levels, grid, config["fracture"])
        rendered = phantom.render(anatomy, fractures, grid, config["hu"], rng)
        seen = {f.level for f, boxes in zip(fractures, rendered.fracture_boxes, strict=True) if boxes}
        hidden = sorted(set(plan.levels) - seen)
        if not hidden:
            break
        log.log(logging.WARNING if attempt == MAX_RENDER_ATTEMPTS else logging.DEBUG,
                "%s: fractured level(s) %s cut no bone on any slice (attempt %d of %d)", plan.uid,
                ", ".join(hidden), attempt, MAX_RENDER_ATTEMPTS)
    hu = _to_file_range(rendered.hu, grid, plan, config)
    # patient coordinates = body coordinates + a table offset (the body frame never reaches the files)
    table = np.round(np.array([*rng.uniform(*config["image"]["table_xy_mm"], size=2),
                               rng.uniform(*config["volume"]["z_top_mm"]) - grid.z_top]), 3)
    origin_xy = (round(float(grid.origin_xy[0] + table[0]), 3), round(float(grid.origin_xy[1] + table[1]), 3))
    margin_px = float(rng.uniform(*config["fracture"]["box_margin_mm"])) / grid.spacing
    return BuiltStudy(plan, hu, rendered.labels, grid, origin_xy, round(float(grid.z_top + table[2]), 3),
                      fractures, rendered.fracture_boxes, margin_px)


def study_tables(built: BuiltStudy) -> StudyResult:
    """The CSV rows of a built study: labels, boxes (one per slice), truth tables."""
    plan, grid = built.plan, built.grid
    numbers = slice_numbers(grid.n, plan.instance_order)
    result = StudyResult(label_row={STUDY_COL: plan.uid, PATIENT: int(bool(plan.levels)),
                                    **{lv: int(lv in plan.levels) for lv in LEVELS}}, n_slices=grid.n)
    result.slice_levels, result.level_boxes = _level_tables(plan.uid, built.labels, numbers)
    per_slice: dict[int, list[int]] = {}
    for i, (frac, boxes) in enumerate(zip(built.fractures, built.fracture_boxes, strict=True)):
        if not boxes:
            log.debug("%s: one %s %s plane cuts no bone on any slice", plan.uid, frac.level, frac.kind)
            continue
        ks = sorted(boxes)
        result.fractures.append({STUDY_COL: plan.uid, "level": frac.level,
                                 "first_slice_number": int(min(numbers[ks])),
                                 "last_slice_number": int(max(numbers[ks])), "description": frac.describe()})
        for k in ks:
            per_slice.setdefault(k, []).append(i)
    m = built.margin_px
    for k in sorted(per_slice):
        members = per_slice[k]
        r0 = min(built.fracture_boxes[i][k][0] for i in members)
        r1 = max(built.fracture_boxes[i][k][1] for i in members)
        c0 = min(built.fracture_boxes[i][k][2] for i in members)
        c1 = max(built.fracture_boxes[i][k][3] for i in members)
        x0, y0 = max(0.0, c0 - m), max(0.0, r0 - m)
        x1, y1 = min(float(grid.cols), c1 + 1 + m), min(float(grid.rows), r1 + 1 + m)
        row = {STUDY_COL: plan.uid, "x": round(x0, FLOAT_DECIMALS), "y": round(y0, FLOAT_DECIMALS),
               "width": round(x1 - x0, FLOAT_DECIMALS), "height": round(y1 - y0, FLOAT_DECIMALS),
               "slice_number": int(numbers[k])}
        levels = "|".join(sorted({built.fractures[i].level for i in members}, key=LEVELS.index))
        result.fracture_boxes.append({**row, "slice_index": k, "levels": levels})
        if plan.boxed:
            result.boxes.append(row)
    return result


def _synthesize_all(plans: Sequence[StudyPlan], images: Path, root: Path, *, seed: int, split: str, config: Config,
                    progress: bool, workers: int) -> list[StudyResult]:
    """Run `synthesize_study` over the plans, in order, in up to `workers` processes."""
    bar = tqdm(total=len(plans), desc="synth studies", unit="study", disable=not progress)
    if workers <= 1 or len(plans) <= 1:
        results = []
        for plan in plans:
            results.append(synthesize_study(plan, images, root, seed=seed, split=split, config=config))
            bar.update()
        bar.close()
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from data_prep.runs.workers import dies_with_parent

    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=min(workers, len(plans)), mp_context=ctx,
                             **dies_with_parent()) as pool:
        futures = [pool.submit(synthesize_study, plan, images, root, seed=seed, split=split, config=config)
                   for plan in plans]
        for future in futures:
            future.result()
            bar.update()
    bar.close()
    return [f.result() for f in futures]


def synthesize_study(plan: StudyPlan, images: Path, root: Path, *, seed: int, split: str,
                     config: Config) -> StudyResult:
    """Build, render and write one study (DICOM series, optional NIfTI); return its table rows."""
    built = build_study(plan, seed=seed, split=split, config=config)
    grid = built.grid
    write_series(images / plan.uid, built.hu, study_uid=plan.uid, pixel_spacing=(grid.spacing, grid.spacing),
                 slice_thickness=grid.thickness, z_top_mm=built.z_top, origin_xy_mm=built.origin_xy,
                 instance_order=plan.instance_order, transfer_syntax=plan.transfer_syntax,
                 pixel_representation=plan.pixel_representation)
    if plan.segmented:
        write_segmentation(root / SEG_DIR / f"{plan.uid}.nii", built.labels, spacing=grid.spacing,
                           thickness=grid.thickness, origin_xy=built.origin_xy, z_top=built.z_top)
    return study_tables(built)


def _sample_fractures(rng: np.random.Generator, anatomy: phantom.Anatomy, levels: Sequence[str],
                      grid: phantom.Grid, cfg: Mapping[str, Any]) -> list[phantom.Fracture]:
    out: list[phantom.Fracture] = []
    for level in levels:
        kinds = cfg[KINDS_KEY.get(level, "kinds_lower")]
        names, w = list(kinds), np.array([kinds[k] for k in kinds], dtype=float)
        n_lines = 1 + int(rng.random() < cfg["extra_line_prob"])
        for _ in range(n_lines):
            kind = str(rng.choice(names, p=w / w.sum()))
            out += phantom.make_fracture(rng, anatomy.vertebrae[level], kind, cfg, grid.thickness, grid.spacing)
    return out


def _to_file_range(hu: np.ndarray, grid: phantom.Grid, plan: StudyPlan, config: Config) -> np.ndarray:
    """Round to integer HU in the range the study's pixel representation stores; pad outside the FOV circle.

    A float32 `hu` (what `phantom.render` returns) is rounded in place and returned: the rendered volume is
    not needed afterwards, and a 512 px study's full-volume temporaries cost more than the arithmetic.
    """
    pad = SIGNED_PADDING_HU if plan.pixel_representation else UNSIGNED_PADDING_HU
    out = np.rint(hu, out=hu) if hu.dtype == np.float32 else np.rint(hu)
    np.clip(out, UNSIGNED_PADDING_HU, HU_MAX, out=out)
    out = out.astype(np.float32, copy=False)
    if config["image"]["circle_padding"]:
        r = np.arange(grid.rows) - (grid.rows - 1) / 2
        c = np.arange(grid.cols) - (grid.cols - 1) / 2
        outside = (r[:, None] ** 2 + c[None, :] ** 2) > (min(grid.rows, grid.cols) / 2) ** 2
        np.copyto(out, np.float32(pad), where=outside)
    return out


def slice_numbers(n: int, instance_order: str) -> np.ndarray:
    """InstanceNumber of each canonical slice (0 = most superior)."""
    k = np.arange(n)
    return k + 1 if instance_order == "head_first" else n - k


def nifti_affine(*, rows: int, n: int, spacing: float, thickness: float, origin_xy: tuple[float, float],
                 z_top: float) -> np.ndarray:
    """RAS affine of the stored array m[i, j, k]: i = column, j = flipped row, k = slice from the feet."""
    ox, oy = origin_xy
    return np.array([[-spacing, 0.0, 0.0, -ox],
                     [0.0, spacing, 0.0, -oy - spacing * (rows - 1)],
                     [0.0, 0.0, thickness, z_top - thickness * (n - 1)],
                     [0.0, 0.0, 0.0, 1.0]])


def write_segmentation(path: Path, labels: np.ndarray, *, spacing: float, thickness: float,
                       origin_xy: tuple[float, float], z_top: float) -> Path:
    """Write labels (n, rows, cols; canonical) as a NIfTI in the RSNA orientation with a correct affine.

    The stored array m satisfies m.transpose(1, 0, 2)[::-1, :, ::-1] == labels.transpose(1, 2, 0), the
    convention most Kaggle competitors used; the affine maps its voxels to RAS mm of the DICOM pixels.
    """
    n, rows, _ = labels.shape
    # NIfTI stores m in Fortran order, which is labels[::-1, ::-1, :] in C order: building it that way and
    # handing nibabel the transposed view lets it write contiguous slices instead of gathering strided ones
    data = np.ascontiguousarray(labels[::-1, ::-1, :]).astype(np.uint8, copy=False).T
    affine = nifti_affine(rows=rows, n=n, spacing=spacing, thickness=thickness, origin_xy=origin_xy, z_top=z_top)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(np.uint8)
    with atomic_path(path) as tmp:
        tmp.write_bytes(img.to_bytes())
    return path


def _level_tables(uid: str, labels: np.ndarray, numbers: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-slice level presence and per-(slice, level) boxes from the label volume."""
    n = labels.shape[0]
    presence = pd.DataFrame({STUDY_COL: uid, "slice_number": numbers, "slice_index": np.arange(n)})
    # the levels are searched only inside the bounding box of all labelled voxels (a small part of the volume)
    box = _label_box(labels)
    crop, k0, r0, c0 = labels[box], box[0].start, box[1].start, box[2].start
    frames = []
    for j, name in enumerate(LEVELS):
        mask = crop == (j + 1)
        rows_any = mask.any(axis=2)
        cols_any = mask.any(axis=1)
        present = np.zeros(n, dtype=bool)
        present[k0:k0 + crop.shape[0]] = rows_any.any(axis=1)
        presence[name] = present.astype(int)
        ks = np.nonzero(present)[0]
        if len(ks) == 0:
            continue
        ra, ca = rows_any[ks - k0], cols_any[ks - k0]
        y0 = ra.argmax(axis=1)
        y1 = ra.shape[1] - 1 - ra[:, ::-1].argmax(axis=1)
        x0 = ca.argmax(axis=1)
        x1 = ca.shape[1] - 1 - ca[:, ::-1].argmax(axis=1)
        y0, y1, x0, x1 = y0 + r0, y1 + r0, x0 + c0, x1 + c0
        frames.append(pd.DataFrame({STUDY_COL: uid, "slice_number": numbers[ks], "slice_index": ks, "level": name,
                                    "x": x0.astype(float), "y": y0.astype(float),
                                    "width": (x1 - x0 + 1).astype(float), "height": (y1 - y0 + 1).astype(float)}))
    boxes = (pd.concat(frames, ignore_index=True) if frames
             else pd.DataFrame({c: [] for c in LEVEL_BOX_COLUMNS}))
    boxes = boxes.sort_values(["slice_index", "level"], kind="stable").reset_index(drop=True)
    return presence, boxes[list(LEVEL_BOX_COLUMNS)]


def _label_box(labels: np.ndarray) -> tuple[slice, slice, slice]:
    """(slice, row, column) index ranges of the smallest box holding every non-zero label (empty if none)."""
    ks = np.nonzero(labels.any(axis=(1, 2)))[0]
    if len(ks) == 0:
        return slice(0, 0), slice(0, 0), slice(0, 0)
    plane = labels[ks[0]:ks[-1] + 1].any(axis=0)
    rs, cs = np.nonzero(plane.any(axis=1))[0], np.nonzero(plane.any(axis=0))[0]
    return slice(int(ks[0]), int(ks[-1]) + 1), slice(int(rs[0]), int(rs[-1]) + 1), slice(int(cs[0]), int(cs[-1]) + 1)


def _write_tables(out: Path, results: Sequence[StudyResult], split: str, cfg: Config) -> dict[str, Any]:
    labels = pd.DataFrame([r.label_row for r in results], columns=list(TRAIN_COLUMNS))
    boxes = pd.DataFrame([b for r in results for b in r.boxes], columns=list(BOX_COLUMNS))
    truth = out / TRUTH_DIR
    conf = cfg.to_dict()

    def put(path: Path, df: pd.DataFrame) -> None:
        write_csv_atomic(path, df)
        write_sidecar(path, kind="synth", config=conf, counts={"rows": len(df)})

    if split == "train":
        put(out / "train.csv", labels)
        put(out / "train_bounding_boxes.csv", boxes)
    else:
        put(truth / "train.csv", labels)
        put(truth / "train_bounding_boxes.csv", boxes)
        uids = labels[STUDY_COL].tolist()
        rows = [(registry.row_id(u, t), u, t) for u in uids for t in registry.TARGETS]
        put(out / "test.csv", pd.DataFrame(rows, columns=["row_id", STUDY_COL, "prediction_type"]))
        put(out / "sample_submission.csv", pd.DataFrame({"row_id": [r[0] for r in rows], "fractured": 0.5}))
    put(truth / "slice_levels.csv", pd.concat([r.slice_levels for r in results], ignore_index=True)
        [list(SLICE_LEVEL_COLUMNS)])
    put(truth / "level_boxes.csv", pd.concat([r.level_boxes for r in results], ignore_index=True))
    put(truth / "fractures.csv", pd.DataFrame([f for r in results for f in r.fractures],
                                              columns=list(FRACTURE_COLUMNS)))
    put(truth / "fracture_boxes.csv", pd.DataFrame([b for r in results for b in r.fracture_boxes],
                                                   columns=list(FRACTURE_BOX_COLUMNS)))
    return {"studies": len(results), "positive": int(labels[PATIENT].sum()),
            "boxed_studies": int(boxes[STUDY_COL].nunique()), "boxes": len(boxes),
            "level_positives": {lv: int(labels[lv].sum()) for lv in LEVELS},
            "segmentations": len(list((out / SEG_DIR).glob("*.nii"))) if (out / SEG_DIR).is_dir() else 0}


def _prepare_root(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(out, "is not empty; choose a new folder or pass --overwrite")
        if not (out / f"{META_NAME}.meta.json").is_file():
            raise InputError(out, f"is not empty and holds no {META_NAME}.meta.json, so it was not written by "
                                  "`spinefrac synth`; refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out
