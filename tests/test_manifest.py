"""data_prep.runs.manifest: what a manifest lists, and each way a folder can differ from it."""

from __future__ import annotations

import json

import pytest

from data_prep.runs.manifest import ManifestError, build_manifest, file_sha256, tree_sha256, verify_manifest

EXCLUDE = ("cache/*", "*.onnx")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "m"
    (root / "sub").mkdir(parents=True)
    (root / "a.json").write_text(json.dumps({"x": 1}))
    (root / "sub" / "w.pt").write_bytes(b"\x00\x01weights")
    (root / "cache").mkdir()
    (root / "cache" / "big.bin").write_bytes(b"cached")
    (root / "model.onnx").write_bytes(b"onnx")
    return root


def test_manifest_lists_every_file_but_the_excluded(folder):
    manifest = build_manifest(folder, EXCLUDE)
    assert sorted(manifest) == ["a.json", "sub/w.pt"]
    assert manifest["sub/w.pt"] == file_sha256(folder / "sub" / "w.pt")
    verify_manifest(folder, manifest, EXCLUDE)  # unchanged: accepted
    (folder / "cache" / "big.bin").write_bytes(b"changed cache")  # excluded files may change
    verify_manifest(folder, manifest, EXCLUDE)


def test_changed_missing_and_extra_files_are_named(folder):
    manifest = build_manifest(folder, EXCLUDE)
    (folder / "a.json").write_text(json.dumps({"x": 2}))
    with pytest.raises(ManifestError, match=r"a\.json: differs"):
        verify_manifest(folder, manifest, EXCLUDE)
    (folder / "a.json").unlink()
    with pytest.raises(ManifestError, match=r"a\.json: listed .* but missing"):
        verify_manifest(folder, manifest, EXCLUDE)


def test_extra_loadable_or_executable_files_are_refused_others_logged(folder, caplog):
    manifest = build_manifest(folder, EXCLUDE)
    (folder / "notes.txt").write_text("a note")
    verify_manifest(folder, manifest, EXCLUDE)
    assert "notes.txt: not in the model folder's manifest" in caplog.text
    script = folder / "sub" / "run"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    with pytest.raises(ManifestError, match=r"sub/run: not part of"):
        verify_manifest(folder, manifest, EXCLUDE)
    script.unlink()
    (folder / "sub" / "extra.joblib").write_bytes(b"x")
    with pytest.raises(ManifestError, match=r"extra\.joblib: not part"):
        verify_manifest(folder, manifest, EXCLUDE)


def test_empty_manifest_and_entries_outside_the_folder_are_refused(folder, tmp_path):
    with pytest.raises(ManifestError, match="no file manifest"):
        verify_manifest(folder, {}, EXCLUDE)
    (tmp_path / "outside.txt").write_text("x")
    with pytest.raises(ManifestError, match="points outside"):
        verify_manifest(folder, {"../outside.txt": file_sha256(tmp_path / "outside.txt")}, EXCLUDE)


def test_tree_hash_sees_a_change_anywhere_in_a_folder(folder):
    before = tree_sha256(folder / "sub")
    assert tree_sha256(folder / "sub" / "w.pt") == file_sha256(folder / "sub" / "w.pt")
    (folder / "sub" / "w.pt").write_bytes(b"\x00\x01weightz")
    assert tree_sha256(folder / "sub") != before
