"""Atomic writes never leave partial files; sidecars describe their artefact; run dirs never collide."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from data_prep.runs.artifacts import atomic_path, next_run_dir, write_csv_atomic, write_sidecar


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "boxes.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boxes.csv"]


def test_csv_and_sidecar(tmp_path):
    df = pd.DataFrame({"StudyInstanceUID": ["a", "b"], "score": [0.1, 0.9]})
    path = write_csv_atomic(tmp_path / "sub" / "t.csv", df)
    pd.testing.assert_frame_equal(pd.read_csv(path, dtype={"StudyInstanceUID": str}), df)
    meta_path = write_sidecar(path, kind="test", config={"a": 1}, counts={"rows": 2}, runtime_s=1.23456)
    meta = json.loads(meta_path.read_text())
    assert meta_path.name == "t.csv.meta.json"
    assert meta["kind"] == "test" and meta["counts"] == {"rows": 2} and meta["runtime_s"] == 1.235
    assert len(meta["config_hash"]) == 12 and "numpy" in meta["versions"]
    other = json.loads(write_sidecar(path, kind="test", config={"a": 2}).read_text())
    assert other["config_hash"] != meta["config_hash"]


def test_next_run_dir_numbers_like_ultralytics(tmp_path):
    first = next_run_dir(tmp_path, "train")
    assert first == tmp_path / "train"
    first.mkdir()
    second = next_run_dir(tmp_path, "train")
    assert second == tmp_path / "train2"
    second.mkdir()
    assert next_run_dir(tmp_path, "train") == tmp_path / "train3"


def test_input_errors_survive_a_process_pool():
    """Errors raised in worker processes must unpickle with their file and reason intact."""
    import pickle

    from data_prep.errors import DicomReadError

    err = pickle.loads(pickle.dumps(DicomReadError("/data/1.dcm", "file is truncated")))
    assert isinstance(err, DicomReadError)
    assert str(err) == "/data/1.dcm: file is truncated" and err.reason == "file is truncated"


def test_a_carriage_return_in_a_cell_keeps_its_row_whole(tmp_path):
    """pandas leaves a cell holding '\\r' unquoted and reads it back as two rows; such a table is fully quoted."""
    df = pd.DataFrame({"StudyInstanceUID": ["1.2.3", "in\rput"], "path": ["/a/b", "/x\r/y"], "n": [1, 2]})
    write_csv_atomic(tmp_path / "t.csv", df)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t.csv", dtype={"StudyInstanceUID": str, "path": str}), df)
    plain = pd.DataFrame({"StudyInstanceUID": ["1.2.3"], "n": [1]})
    write_csv_atomic(tmp_path / "plain.csv", plain)
    assert (tmp_path / "plain.csv").read_text() == "StudyInstanceUID,n\n1.2.3,1\n"      # other tables: unchanged
