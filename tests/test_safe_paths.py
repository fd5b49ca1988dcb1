"""Property tests (hypothesis) of issue 23's rule: no identifier from an input or a model folder decides where
spinefrac reads or writes.

Hostile identifiers ('..', '/', absolute paths, NUL, 300-character strings, Unicode look-alikes of '/' and '.',
Windows separators and drives) go through every reader and writer that turns a name into a path: the safe name
itself, done markers and part files, failure records and overlay folders, the review report, the DICOM results'
folders, the node's spool, the classifier's crop folders, train.csv keys, DICOMDIR records, zip members, study
folders and StudyInstanceUIDs read by detect, and model.json entries. After each, no file exists outside the
output folder, and no file outside the input was opened. Examples that write studies are few (`SLOW`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pydicom
import pytest
from helpers import FixedBoxes
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from data_prep.dicom.writer import write_series
from data_prep.errors import InputError
from data_prep.runs.registry import STUDY_COL, TARGETS
from data_prep.runs.resume import StudyMarkers
from data_prep.safe_paths import (
    MAX_VERBATIM_CHARS,
    NAME_HASH_CHARS,
    SLUG_CHARS,
    UnsafePathError,
    inside,
    is_verbatim,
    key_problem,
    safe_name,
    valid_uid,
)

LOOKALIKES = ("\u2215", "\uff0e", "\u2044", "\uff0f", "\u29f8", "\u3002", "\u2024")
"""Unicode look-alikes of '/' and '.' (division slash, fullwidth full stop, fraction slash, ...)."""
PIECES = ("..", ".", "/", "\\", "C:", "C:\\", "\0", "~", "*", "?", " ", "-", "_", ".hidden", "CON", "nul",
          "1.2.840.10008", *LOOKALIKES)
HOSTILE_FIXED = ["..", ".", "/", "", "../../../EVIL", "./../../../X", "/etc/passwd", "C:\\Windows\\x", "a\0b",
                 "x" * 300, "\u2215etc\u2215passwd", "\uff0e\uff0e/\uff0e\uff0e", "..\\..\\x", "CON", "aux.txt",
                 "name-0123abcd", "trailing.", "-rf", "1.2.3", "1.2.3.", "01.2"]
hostile = st.one_of(
    st.sampled_from(HOSTILE_FIXED),
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(min_size=1, max_size=8)), min_size=1, max_size=12).map(
        "".join),
    st.text(max_size=300),
    st.text(alphabet=st.sampled_from("./\\:0123456789abc"), max_size=80),
)
"""Identifiers as a hostile or careless input holds them."""
FAST = settings(max_examples=300, deadline=None, database=None)
MEDIUM = settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SLOW = settings(max_examples=5, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
"""Examples that write and detect a study cost about a second each on 2 busy cores."""
SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


@contextlib.contextmanager
def sandbox():
    """A fresh folder (hypothesis runs many examples in one test) with `out/` and `in/` in it, removed after."""
    root = Path(tempfile.mkdtemp(prefix="sandbox."))
    try:
        (root / "out").mkdir()
        (root / "in").mkdir()
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def assert_only_under(root: Path, allowed: Path, before: set[Path]) -> None:
    new = files(root) - before
    outside = sorted(p for p in new if allowed != p and allowed not in p.parents)
    assert outside == [], f"written outside {allowed}: {outside}"


# ---------------------------------------------------------------- the rule itself
@FAST
@given(hostile)
def test_safe_name_is_one_safe_component_inside_any_folder(identifier):
    name = safe_name(identifier)
    assert SAFE.fullmatch(name) and not name.endswith(".") and name not in (".", "..")
    assert len(name) <= max(MAX_VERBATIM_CHARS, SLUG_CHARS + 1 + NAME_HASH_CHARS)
    root = Path("/srv/out")
    assert inside(root, name + ".boxes.csv").parent == root
    assert (name == identifier) == is_verbatim(identifier)


@FAST
@given(hostile, hostile)
def test_safe_name_never_gives_two_identifiers_one_name(a, b):
    assume(a != b)
    assert safe_name(a) != safe_name(b)
    assert safe_name(safe_name(a)) == safe_name(a)          # a name made here is kept: files of a key, once


def test_names_that_may_belong_to_another_key_are_told_apart():
    from data_prep.safe_paths import check_unique_names, names_itself

    assert names_itself("1.2.840.113654.2.70.1") and not names_itself(safe_name("my study #1"))
    crafted = safe_name("my study #1")                     # a folder named after another key's file name
    with pytest.raises(InputError, match="would share the file name"):
        check_unique_names(["my study #1", crafted])


@FAST
@given(st.lists(st.integers(0, 10 ** 12).map(str), min_size=1, max_size=12).map(".".join))
def test_valid_dicom_uids_are_kept_as_they_are(uid):
    assume(len(uid) <= 64)
    assert valid_uid(uid) and safe_name(uid) == uid


@FAST
@given(hostile)
def test_inside_refuses_or_stays_inside(relative):
    root = Path("/srv/out")
    try:
        path = inside(root, relative)
    except UnsafePathError as exc:
        assert str(root) in str(exc) and "refused" in str(exc)
        return
    normal = Path(os.path.normpath(path))
    assert root in normal.parents


# ---------------------------------------------------------------- writers: names become files in OUT
@MEDIUM
@given(hostile)
def test_done_markers_and_parts_stay_in_the_folder_and_give_back_the_key(uid):
    with sandbox() as box:
        before = files(box)
        markers = StudyMarkers(box / "out", {"a": 1})
        (box / "out" / "parts").mkdir()
        part = markers.part(uid, ".boxes.csv")
        pd.DataFrame({STUDY_COL: [uid]}).to_csv(part, index=False)
        markers.write(uid, {STUDY_COL: uid}, files=[part.relative_to(box / "out").as_posix()])
        assert markers.done_uids() == [uid] and markers.is_current(uid)
        assert_only_under(box, box / "out", before)
        markers.remove(uid)
        assert markers.done_uids() == [] and not part.exists()


@MEDIUM
@given(hostile)
def test_failure_records_overlays_report_and_dicom_folders_stay_in_out(uid):
    from detector.detect_outputs import error_record, failed_studies, overlay_dir
    from spinefrac.dicom_out import study_folder
    from spinefrac.report.build import study_slug

    with sandbox() as box:
        out = box / "out"
        before = files(box)
        record = error_record(out, uid)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(pd.Series({STUDY_COL: uid}).to_json())
        assert failed_studies(out) == [uid]
        folder = overlay_dir(out, uid)
        folder.mkdir(parents=True)
        (folder / "contact_sheet.png").write_bytes(b"png")
        dicom = study_folder(out / "dicom", uid)
        dicom.mkdir(parents=True)
        (dicom / "SR.dcm").write_bytes(b"sr")
        (out / "report" / "studies").mkdir(parents=True)
        (inside(out / "report" / "studies", f"{study_slug(uid)}.html")).write_text("page")
        assert_only_under(box, out, before)


@MEDIUM
@given(hostile)
def test_the_review_report_of_hostile_keys_stays_in_its_folder(uid):
    from detector.detect_outputs import overlay_dir
    from spinefrac.report import write_report

    with sandbox() as box:
        pred = box / "out"
        pd.DataFrame([{STUDY_COL: uid, **dict.fromkeys(TARGETS, 0.3), "failed": 0}]).to_csv(
            pred / "predictions.csv", index=False)
        folder = overlay_dir(pred, uid)
        folder.mkdir(parents=True)
        import cv2

        cv2.imwrite(str(folder / "01_slice3.png"), np.zeros((8, 8, 3), np.uint8))
        before = files(box)
        try:
            write_report(pred, model_dir=box / "no_model")
        except InputError:
            assume(False)                              # a key a CSV cannot hold (empty): predictions.csv refused
        assert_only_under(box, pred, before)
        assert len(list((pred / "report" / "studies").glob("*.html"))) == 1
        assert len(list((pred / "report" / "studies").rglob("01_slice3.png"))) == 1


@MEDIUM
@given(hostile, hostile)
def test_the_spool_refuses_hostile_uids_and_writes_nothing(study_uid, sop_uid):
    from spinefrac.serve.spool import INVALID_UID, Spool, SpoolError

    with sandbox() as box:
        spool = Spool(box / "out")
        before = files(box)
        if valid_uid(study_uid) and valid_uid(sop_uid):
            spool.store(study_uid, sop_uid, b"DICM")
        else:
            with pytest.raises(SpoolError) as err:
                spool.store(study_uid, sop_uid, b"DICM")
            assert err.value.status == INVALID_UID
        assert_only_under(box, box / "out", before)
        for state in ("incoming", "ready", "done", "failed"):
            assert box / "out" / state in spool.folder(state, study_uid).parents
        assert spool.state_path(study_uid).parent == box / "out" / "state"


@MEDIUM
@given(hostile)
def test_train_csv_keys_either_fail_the_schema_or_name_a_folder_inside_train_images(uid):
    from data_prep.runs.tables import TableError, read_table
    from detector.classifier_dataset import study_images
    from detector.yolo_dataset import train_study_dir

    with sandbox() as box:
        path = box / "in" / "train.csv"
        pd.DataFrame([{STUDY_COL: uid, **dict.fromkeys(TARGETS, 0)}]).to_csv(path, index=False)
        try:
            table = read_table(path, "train")
        except TableError as exc:
            assert "row 1 (line 2)" in str(exc) or "empty" in str(exc) or "blank" in str(exc)
            return
        except InputError:
            return                                   # e.g. a NUL the CSV reader itself refuses
        key = str(table[STUDY_COL].iloc[0])
        folder = train_study_dir(box / "in", key)
        assert folder.parent == box / "in" / "train_images"
        assert study_images(box / "out", key).parent == box / "out" / "images"
        assert inside(box / "out", f"images/train/{safe_name(key)}_3.png").parent == box / "out" / "images" / "train"


@MEDIUM
@given(st.lists(hostile, min_size=1, max_size=3))
def test_model_json_entries_are_refused_unless_inside_and_listed(entries):
    from spinefrac.model_folder import model_entry

    with sandbox() as box:
        root = box / "in" / "model"
        (root / "classifier" / "fold0" / "weights").mkdir(parents=True)
        (root / "classifier" / "fold0" / "weights" / "best.pt").write_bytes(b"w")
        (box / "in" / "x.pt").write_bytes(b"outside")
        manifest = {"classifier/fold0/weights/best.pt": "sha"}
        for k, entry in enumerate(entries):
            try:
                path = model_entry(root, entry, manifest, entry=f"classifier[{k}]")
            except InputError as exc:
                assert f"classifier[{k}]" in str(exc)
                continue
            assert path == root / "classifier" / "fold0" / "weights" / "best.pt"


# ---------------------------------------------------------------- readers: nothing outside the input is read
@contextlib.contextmanager
def reads():
    """Record the real path of every file pydicom opens by name."""
    seen: list[str] = []
    real = pydicom.dcmread

    def spy(fp, *args, **kwargs):
        if isinstance(fp, (str, os.PathLike)):
            seen.append(os.path.realpath(fp))
        return real(fp, *args, **kwargs)

    with mock.patch.object(pydicom, "dcmread", spy):
        yield seen


def write_study(folder: Path, uid: str, n: int = 4) -> list[Path]:
    hu = np.stack([np.full((16, 16), -500.0 + 100.0 * k, dtype=np.float32) for k in range(n)])
    return write_series(folder, hu, study_uid=uid, pixel_spacing=(0.5, 0.5), slice_thickness=2.0, z_top_mm=10.0)


@pytest.fixture(scope="module")
def fileset(tmp_path_factory):
    from data_prep.synthetic.export import write_export

    root = tmp_path_factory.mktemp("fileset") / "cd"
    write_export(root, variant="dicomdir", size=32, slices=6)
    return root


@MEDIUM
@given(st.lists(hostile, min_size=1, max_size=4))
def test_dicomdir_records_never_read_outside_the_fileset(fileset, components):
    from data_prep.dicom.study_finder import search_dicom

    with sandbox() as box:
        cd = box / "in" / "cd"
        shutil.copytree(fileset, cd)
        secret = write_study(box / "secret", "1.2.3.4")
        ds = pydicom.dcmread(cd / "DICOMDIR")
        image = next(r for r in ds.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE")
        for file_id in (components, ["..", "..", "secret", secret[0].name], [str(secret[1])]):
            record = copy.deepcopy(image)
            record.ReferencedFileID = [str(c) for c in file_id] if len(file_id) > 1 else str(file_id[0])
            ds.DirectoryRecordSequence.append(record)
        with contextlib.suppress(Exception):      # a value pydicom itself cannot write is no DICOMDIR to test
            ds.save_as(cd / "DICOMDIR")
        with reads() as seen:
            try:
                search_dicom(cd)
            except InputError:
                return                                 # an unreadable DICOMDIR is refused whole
        root = os.path.realpath(cd)
        assert all(p == root or p.startswith(root + os.sep) for p in seen), [p for p in seen if root not in p]


@MEDIUM
@given(st.lists(hostile, min_size=1, max_size=4, unique=True))
def test_zip_members_are_never_extracted_outside_the_cache(names):
    from data_prep.dicom.study_finder import search_dicom

    with sandbox() as box:
        dcm = write_study(box / "src", "1.2.3.5", n=1)[0]
        archive = box / "in" / "upload.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            for name in names:
                info = zipfile.ZipInfo(name)
                if info.filename:                     # zipfile cuts a name at NUL and cannot store an empty one
                    zf.writestr(info, dcm.read_bytes())
        before = files(box)
        with contextlib.suppress(InputError, OSError):   # e.g. a member 'a' and a member 'a/b': not extractable
            search_dicom(archive, extract_to=box / "out")
        assert_only_under(box, box / "out", before)


def _detect(studies, out: Path, *, follow_symlinks: bool = False):
    from data_prep.runs.config import load_config
    from detector.detect import detect_studies

    cfg = load_config("detector", None, ["render.imgsz=32", "roi.enabled=false", "overlays.display_size=32",
                                         "overlays.top_n=1", "detect.prefetch=0"])
    with mock.patch("detector.backends.load_predictor", lambda weights, **kw: FixedBoxes()):
        return detect_studies(studies, weights=out.parent / "w.pt", out=out, config=cfg, workers=1,
                              progress=False, follow_symlinks=follow_symlinks)


@SLOW
@given(hostile)
def test_detect_of_a_tree_with_a_hostile_study_uid_writes_only_inside_out(uid):
    uid = uid.encode("latin-1", "replace").decode("latin-1")    # what pydicom can write into a UI element
    with sandbox() as box:
        paths = write_study(box / "in" / "tree" / "a", uid)
        (box / "in" / "tree" / "b").mkdir()
        for k, p in enumerate(paths):                 # PACS-style names, over two folders: keyed by its UID
            p.rename(box / "in" / "tree" / ("b" if k == len(paths) - 1 else "a") / f"IM{k:05d}")
        written = str(pydicom.dcmread(box / "in" / "tree" / "a" / "IM00000").get("StudyInstanceUID", "") or "").strip()
        assume(written)                                # no StudyInstanceUID: no study (tested elsewhere)
        secret = write_study(box / "secret", "9.9.9")
        (box / "in" / "tree" / "a" / "link").symlink_to(secret[0])
        out = box / "out" / "det"
        before = files(box)
        with reads() as seen:
            result = _detect([box / "in" / "tree"], out)
        assert_only_under(box, out, before)
        assert not [p for p in seen if str(box / "secret") in p]
        done = result.finished + result.failed
        assert len(done) == 1 and (done[0] == written if valid_uid(written) else done[0] == safe_name(written))


@SLOW
@given(hostile)
@example("\r")                                     # a carriage return would end a CSV row: keyed by its safe name
@example("CON:..\\x")
def test_detect_of_a_study_folder_with_a_hostile_name_writes_only_inside_out(name):
    name = name.replace("/", "\u2215").replace("\0", "_")[:200] or "_"   # what a file system lets a folder be named
    assume(name not in (".", "..") and not name.startswith(".") and len(name.encode("utf-8", "surrogatepass")) < 250)
    with sandbox() as box:
        try:
            folder = box / "in" / "images" / name
            write_study(folder, "1.2.3.6")
        except (OSError, UnicodeEncodeError):
            assume(False)
        out = box / "out" / "det"
        before = files(box)
        result = _detect([box / "in" / "images"], out)
        assert_only_under(box, out, before)
        if key_problem(name) is None:
            assert result.finished == [name]
            assert set(pd.read_csv(out / "slices.csv", dtype={STUDY_COL: str}, keep_default_na=False)[STUDY_COL]) == {
                name}
        else:                                       # the study fails, reported under its safe name
            assert result.failed == [safe_name(name)]
            errors = pd.read_csv(out / "errors.csv", dtype={STUDY_COL: str}, keep_default_na=False)
            assert errors[STUDY_COL].tolist() == [safe_name(name)] and "control character" in errors["error"][0]
