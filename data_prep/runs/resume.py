"""Resume that never mixes results: per-study done markers keyed by the settings that made them.

One mechanism for every batch stage that works study by study (`detect`/`predict`, `prepare-detector`,
`prepare-locator`). A study's results are written first (part files, images, labels), then its marker
`<out>/<done_dir>/<uid>.json` last; the combined outputs are rebuilt only from studies with a marker.
Each marker records the run's *settings key*: a hash of the resolved config sections that shape the
outputs plus the SHA-256 of the weights used (`stage_settings` of each stage says which). A rerun with the
same key skips finished studies; with another key it refuses before any work, naming the settings that
changed, unless `overwrite` (then those studies are redone and the other-settings studies that are not
part of this run are removed). A folder therefore never holds results of two settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from data_prep.errors import InputError
from data_prep.runs.artifacts import write_json_atomic
from data_prep.runs.registry import STUDY_COL
from data_prep.safe_paths import UnsafePathError, inside, names_itself, safe_name

log = logging.getLogger("data_prep")

MARKER_VERSION = 1
"""Version of the marker layout; markers without `settings_key` (older versions) count as other settings."""
MARKER_SUFFIX = ".json"
KEY_FIELD = "study_key"
"""The marker field holding the study's key (its file is named `safe_name(key)`, which may differ from the key)."""
KEY_CHARS = 16            # hex characters of a settings key (64 bits)
HASH_CHUNK = 1 << 20      # bytes read at a time when hashing weights
MAX_LISTED = 5            # changed settings (or studies) named in one message
MAX_VALUE_CHARS = 60      # a changed value longer than this is shortened in messages
UNKNOWN = "<not recorded>"


class SettingsChangedError(InputError):
    """An output folder holds results made with other settings; the message says which and how to proceed."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a folder (e.g. an OpenVINO export): its files' relative paths and contents."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "not found (weights to hash)")
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode("utf-8") + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(HASH_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def weights_id(path: str | os.PathLike) -> str:
    """What identifies weights in a settings key: their SHA-256, or for a path that does not exist its path.

    A missing path is left to the weights loader to refuse with its own message; the key must not fail first.
    """
    path = Path(path)
    return file_sha256(path) if path.exists() else f"path:{path.resolve()}"


def plain(value: Any) -> Any:
    """A JSON-plain copy of a config value (Config objects, tuples, Paths become dicts, lists, strings)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def settings_key(settings: Mapping[str, Any]) -> str:
    """Stable short hash of a settings mapping (canonical JSON, sorted keys)."""
    blob = json.dumps(plain(settings), sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:KEY_CHARS]


def section(config: Mapping[str, Any], name: str, *, drop: Iterable[str] = ()) -> dict[str, Any]:
    """A config section as plain data, without the keys in `drop` (ones that do not change the results)."""
    values = plain(config[name])
    dropped = set(drop)
    return {k: v for k, v in values.items() if k not in dropped}


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping: {"detect": {"conf": 0.1}} -> {"detect.conf": 0.1}."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_settings(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """Describe what differs between two settings mappings, one `key: old -> new` line per setting."""
    if old is None:
        return [f"(the earlier results do not record their settings: made by an older version) -> {settings_key(new)}"]
    before, after = flatten(plain(old)), flatten(plain(new))
    lines = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, UNKNOWN), after.get(key, UNKNOWN)
        if a != b:
            lines.append(f"{key}: {_short(a)} -> {_short(b)}")
    return lines


def describe_changes(lines: Sequence[str]) -> str:
    """Join change lines for one message, naming at most MAX_LISTED."""
    more = f"; and {len(lines) - MAX_LISTED} more" if len(lines) > MAX_LISTED else ""
    return "; ".join(lines[:MAX_LISTED]) + more


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


@dataclass
class ResumePlan:
    """What a run does with the studies it was given: skip (finished, same settings) or do."""

    skip: list[str] = field(default_factory=list)
    todo: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)   # other-settings studies outside this run, removed


@dataclass(frozen=True)
class StudyMarkers:
    """The done markers (and part files) of one output folder, for one run's settings.

    `settings` is the JSON-plain mapping the key is computed from; it is stored in every marker so a
    refusal can say which setting changed. `what` names the stage in messages; `how` the way out.
    """

    root: Path
    settings: Mapping[str, Any] = field(default_factory=dict)
    done_dir: str = "done"
    parts_dir: str = "parts"
    what: str = "this stage"
    how: str = "rerun with --overwrite to redo them with the new settings, or write to a new folder"

    @property
    def key(self) -> str:
        """This run's settings key."""
        return settings_key(self.settings)

    def marker(self, uid: str) -> Path:
        """Path of a study's done marker: `<done_dir>/<safe_name(uid)>.json` (data_prep.safe_paths)."""
        return study_file(self.root / self.done_dir, uid, MARKER_SUFFIX)

    def part(self, uid: str, suffix: str) -> Path:
        """Path of one of a study's part files, e.g. part(uid, ".boxes.csv") -> parts/<safe_name(uid)>.boxes.csv."""
        return study_file(self.root / self.parts_dir, uid, suffix)

    def read_parts(self, suffix: str, uids: Sequence[str] | None = None, *,
                   dtype: Mapping[str, Any] | None = None) -> list[pd.DataFrame]:
        """The part tables `parts/<uid><suffix>` of finished studies (default: every study with a marker) that exist."""
        paths = [self.part(u, suffix) for u in (self.done_uids() if uids is None else uids)]
        return [pd.read_csv(p, dtype=dict(dtype or {})) for p in paths if p.is_file()]

    def read(self, uid: str) -> dict[str, Any] | None:
        """A study's marker record, or None when it has none (or an unreadable one, which is removed)."""
        path = self.marker(uid)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable done marker (%s); the study will be redone", path, exc)
            path.unlink(missing_ok=True)
            return None
        return data if isinstance(data, dict) else None

    def done_uids(self) -> list[str]:
        """Every study with a marker in the folder (its key, as recorded in the marker), sorted."""
        return sorted(study_keys(self.root / self.done_dir))

    def is_current(self, uid: str, inputs_key: str | None = None) -> bool:
        """Whether a study is finished with this run's settings (and, when given, the same study inputs)."""
        data = self.read(uid)
        if data is None or data.get("settings_key") != self.key:
            return False
        return inputs_key is None or data.get("inputs_key") == inputs_key

    def write(self, uid: str, record: Mapping[str, Any], *, files: Sequence[str] = (),
              inputs_key: str | None = None) -> Path:
        """Write a study's marker (last, once its results are on disk); `files` are relative to the folder."""
        data = {**record, KEY_FIELD: uid, "marker_version": MARKER_VERSION, "settings_key": self.key,
                "files": list(files), "settings": plain(self.settings)}
        if inputs_key is not None:
            data["inputs_key"] = inputs_key
        return write_json_atomic(self.marker(uid), data)

    def remove(self, uid: str) -> None:
        """Delete a study's marker first, then the files and folders it lists."""
        data = self.read(uid)
        self.marker(uid).unlink(missing_ok=True)
        for rel in (data or {}).get("files", []):
            try:    # a marker is data: a listed path outside the folder (a tampered or foreign marker) is never removed
                target = inside(self.root, rel, source=f"files of the done marker of study {uid}")
            except UnsafePathError as exc:
                log.warning("%s", exc)
                continue
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)



    def plan(self, uids: Sequence[str], *, overwrite: bool) -> ResumePlan:
        """Check every marker of the folder against this run's settings and say what to skip and do.

        Without `overwrite`, any finished study made with other settings is refused (SettingsChangedError
        naming the changed settings), whether or not it is part of this run: the combined outputs would mix.
        With `overwrite`, every study of this run is redone and other-settings studies outside it are removed.
        """
        wanted = set(uids)
        other: dict[str, dict[str, Any] | None] = {}
        current: set[str] = set()
        for uid in self.done_uids():
            data = self.read(uid)
            if data is None:
                continue
            if data.get("settings_key") == self.key:
                current.add(uid)
            else:
                other[uid] = data
        if other and not overwrite:
            first = other[sorted(other)[0]]
            changes = changed_settings(first.get("settings") if first else None, self.settings)
            raise SettingsChangedError(
                self.root, f"{len(other)} finished studies here (e.g. {sorted(other)[0]}) were made by {self.what} "
                f"with other settings: {describe_changes(changes) or 'settings key ' + str(first.get('settings_key'))}"
                f". Results of two settings are never mixed: {self.how}")
        plan = ResumePlan()
        for uid in other:
            if uid not in wanted:
                self.remove(uid)
                plan.removed.append(uid)
        if plan.removed:
            log.warning("%s: removed %d finished studies made with other settings (--overwrite): %s", self.root,
                        len(plan.removed), ", ".join(sorted(plan.removed)[:MAX_LISTED]))
        for uid in uids:
            (plan.skip if uid in current and not overwrite else plan.todo).append(uid)
        return plan


def study_file(folder: str | os.PathLike, uid: str, suffix: str) -> Path:
    """`folder/<safe_name(uid)><suffix>`: the file of one study (a marker, a part, a failure record), never outside."""
    return inside(folder, f"{safe_name(uid)}{suffix}", source=f"study {uid!r}")


def study_keys(folder: str | os.PathLike, suffix: str = MARKER_SUFFIX, field: str = KEY_FIELD) -> list[str]:
    """The keys of the studies with a `<name><suffix>` JSON record in `folder` (done markers, failure records).

    A file whose name can only be its own key's (`safe_paths.names_itself`) belongs to the study of that name; for
    any other name the key is read from the record (`field`, else StudyInstanceUID); an unreadable one is left out
    with a warning.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    keys = []
    for path in sorted(folder.glob(f"*{suffix}")):
        name = path.name[: -len(suffix)]
        if names_itself(name):
            keys.append(name)
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            key = data.get(field, data.get(STUDY_COL)) if isinstance(data, dict) else None
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable record (%s); left out", path, exc)
            continue
        if not isinstance(key, str) or safe_name(key) != name:
            log.warning("%s: its record names study %r, whose file would be %s; left out", path, key,
                        safe_name(key) + suffix if isinstance(key, str) else "(no key)")
            continue
        keys.append(key)
    return keys
