"""Batch inference split over machines: a deterministic shard of the studies per job, and a merge of the shards.

For batch schedulers (SLURM arrays, ...): job i of n runs `spinefrac predict STUDIES --model M --out OUT_i
--shard i/n`; each study belongs to exactly one shard, decided by a hash of its folder name alone (so the
partition does not depend on the listing order, the machine or n's other jobs). Then `spinefrac merge OUT_1 ...
OUT_n --model M --out OUT [--test-csv test.csv]` copies the shards' per-study parts, done markers, failure
records and overlays into OUT, rebuilds the combined tables, and aggregates exactly as a single `predict` does:
the same studies give the same boxes.csv, slices.csv, predictions.csv and submission.csv.
Shards made with other settings (another model, config or weights) are refused, never mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from data_prep.errors import InputError
from data_prep.runs.locks import locks_output
from detector.detect_outputs import BOXES_CSV, DONE_DIR, ERRORS_DIR, OVERLAYS_DIR, PARTS_DIR

COPIED_DIRS = (DONE_DIR, PARTS_DIR, ERRORS_DIR, OVERLAYS_DIR)
"""What a shard's prediction folder holds per study (detector/detect_outputs.py); merge copies these."""
SETTINGS_META = f"{BOXES_CSV}.meta.json"

log = logging.getLogger("spinefrac")

SHARD_SEPARATOR = "/"
HASH_HEX_DIGITS = 16
"""Leading hex digits of the SHA-256 of a study's folder name that decide its shard."""


def parse_shard(text: str) -> tuple[int, int]:
    """Parse "i/n" (1 <= i <= n) into (i, n); raise ValueError naming the expected form."""
    try:
        i, n = (int(part) for part in str(text).split(SHARD_SEPARATOR))
    except ValueError:
        raise ValueError(f"--shard must be i/n with whole numbers, e.g. 2/8; found {text!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"--shard {text}: i must be between 1 and n")
    return i, n


def shard_of(uid: str, n: int) -> int:
    """Return the 1-based shard (of n) of a study, from the SHA-256 of its folder name."""
    digest = hashlib.sha256(str(uid).encode("utf-8")).hexdigest()[:HASH_HEX_DIGITS]
    return int(digest, 16) % n + 1


def select_shard(study_dirs: Sequence[Path], i: int, n: int) -> list[Path]:
    """Keep the study folders of shard i of n (in their given order) and log how many."""
    chosen = [s for s in study_dirs if shard_of(s.name, n) == i]
    log.info("shard %d/%d: %d of %d studies", i, n, len(chosen), len(study_dirs))
    return chosen


@locks_output("out")
def merge_predictions(shard_dirs: Sequence[str | os.PathLike], *, model_dir: str | os.PathLike,
                      out: str | os.PathLike, test_csv: str | os.PathLike | None = None,
                      overwrite: bool = False) -> Path:
    """Combine the folders of `predict --shard` runs into one prediction folder, as one `predict` would write it."""
    from aggregation.model import StudyAggregator
    from aggregation.submission import read_test_csv
    from detector.detect_outputs import detected_studies, rebuild_outputs
    from spinefrac.model_folder import open_model
    from spinefrac.results import aggregate_detections

    t0 = time.perf_counter()
    out = Path(out)
    shards = [Path(d) for d in shard_dirs]
    model = open_model(model_dir)
    test = read_test_csv(test_csv) if test_csv is not None else None
    aggregator = StudyAggregator.load(model.root / "aggregator")
    key = _common_settings_key(shards)
    if (out / DONE_DIR).is_dir() and any((out / DONE_DIR).iterdir()):
        if not overwrite:
            raise InputError(out, "already holds finished studies: merge into a new folder, or pass --overwrite")
        for sub in COPIED_DIRS:
            shutil.rmtree(out / sub, ignore_errors=True)
    owner: dict[str, Path] = {}
    for shard in shards:
        uids = set(detected_studies(shard))
        twice = sorted(u for u in uids if u in owner)
        if twice:
            raise InputError(shard, f"holds {len(twice)} studies that {owner[twice[0]]} holds too (e.g. {twice[0]}): "
                                    "the shards overlap")
        owner.update(dict.fromkeys(uids, shard))
    for sub in COPIED_DIRS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    for shard in shards:
        for sub in COPIED_DIRS:
            src = shard / sub
            if not src.is_dir():
                continue
            for item in src.iterdir():
                target = out / sub / item.name
                if item.is_symlink():          # a shard is an input: nothing it links to outside it is read
                    log.warning("%s: a symbolic link in a shard; not copied", item)
                elif item.is_dir():
                    shutil.copytree(item, target, dirs_exist_ok=True, ignore=_links)
                else:
                    shutil.copy2(item, target)
    rebuild_outputs(out, extra={"settings_key": key, "merged_from": [str(s) for s in shards]})
    uids = sorted(owner)
    if test is not None:
        absent = [u for u in dict.fromkeys(test["_uid"]) if u not in owner]
        if absent:
            log.warning("%s: %d studies are in no shard and get the training prior (e.g. %s)", test_csv, len(absent),
                        absent[0])
    log.info("merged %d shards (%d studies) into %s", len(shards), len(uids), out)
    return aggregate_detections(out, model=model, aggregator=aggregator, uids=uids, test=test, started=t0,
                                extra={"merged_from": [str(s) for s in shards], "settings_key": key})


def _links(folder: str, names: list[str]) -> list[str]:
    """copytree's ignore: the symbolic links of a shard's folder (logged, never followed)."""
    links = [n for n in names if os.path.islink(os.path.join(folder, n))]
    for name in links:
        log.warning("%s: a symbolic link in a shard; not copied", os.path.join(folder, name))
    return links


def _common_settings_key(shards: Sequence[Path]) -> str | None:
    """The detect settings key all shards share; refuse shards made with other settings, or missing ones."""
    keys = {}
    for shard in shards:
        meta = shard / SETTINGS_META
        if not meta.is_file():
            raise InputError(shard, f"not a prediction folder (no {SETTINGS_META}): run predict --shard into it first")
        keys[shard] = json.loads(meta.read_text(encoding="utf-8")).get("extra", {}).get("settings_key")
    distinct = set(keys.values())
    if len(distinct) > 1:
        first, *_ = shards
        other = next(s for s in shards if keys[s] != keys[first])
        raise InputError(other, f"was made with other settings than {first} (settings key {keys[other]} vs "
                                f"{keys[first]}: another model, config or weights); results are never mixed")
    return distinct.pop() if distinct else None
