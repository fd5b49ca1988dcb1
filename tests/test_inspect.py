"""`spinefrac inspect` through the real command, on a good and a broken study."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from data_prep.dicom.inspect import inspect_path
from data_prep.dicom.writer import write_series
from data_prep.runs import registry
from spinefrac.cli import main

N, SIZE = 10, 32


def _study(root, name, *, order="head_first", ts=registry.TS_EXPLICIT_LE, lo=-1000, hi=1500, thickness=0.625):
    volume = np.linspace(lo, hi, N * SIZE * SIZE).reshape(N, SIZE, SIZE).round().astype(np.float32)
    write_series(root / name, volume, study_uid=name, pixel_spacing=(0.4, 0.4), slice_thickness=thickness,
                 z_top_mm=100.0, instance_order=order, transfer_syntax=ts)
    return root / name


TALL = 10.0
"""mm per slice: N slices then cover 100 mm, enough for C1-C7 (shorter studies are flagged)."""


def test_good_study(tmp_path, capsys):
    study = _study(tmp_path, "1.2.826.0.1.3680043.5", order="feet_first", ts=registry.TS_JPEG_LOSSLESS_SV1,
                   thickness=TALL)
    assert main(["inspect", str(study), "--no-progress", "--strict"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("1.2.826.0.1.3680043.5"))
    assert f"{N} x {SIZE}x{SIZE}" in row
    assert "0.4 x 0.4" in row and "10" in row
    assert "100.0..10.0" in row  # z of the top and bottom slice: 100 - 9 * 10
    assert "reversed (feet first)" in row
    assert "JPEG-lossless" in row
    assert "-1000..1500" in row  # the HU we wrote
    assert "no problems found" in out


def test_broken_study_lists_every_problem(tmp_path, capsys):
    study = _study(tmp_path, "1.2.3.9")
    (study / "notes.txt").write_text("not dicom")
    for n in (4, 5):  # a gap in z
        (study / f"{n}.dcm").unlink()
    victim = study / "8.dcm"  # pixel data cut short
    victim.write_bytes(victim.read_bytes()[:-50])
    victim2 = study / "9.dcm"  # and another one
    victim2.write_bytes(victim2.read_bytes()[:-50])
    assert main(["inspect", str(study), "--no-progress", "--strict"]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "8.dcm" in out and "9.dcm" in out and "cut short" in out
    assert "WARNING" in out and "notes.txt" in out
    assert main(["inspect", str(study), "--no-progress"]) == 0  # without --strict problems are only reported


def test_folder_of_studies_reports_all(tmp_path, capsys):
    images = tmp_path / "train_images"
    _study(images, "1.2.3.1", thickness=TALL)
    _study(images, "1.2.3.2", order="feet_first", ts=registry.TS_RLE, lo=-2000, hi=3000)   # 6 mm: too short
    bad = _study(images, "1.2.3.3", thickness=TALL)
    ds = pydicom.dcmread(bad / "3.dcm")
    ds.Modality = "MR"
    ds.save_as(bad / "3.dcm")
    (images / "1.2.3.4").mkdir()  # an empty study folder
    report = inspect_path(tmp_path, workers=2, progress=False)  # the dataset root finds train_images/
    assert [s.study_dir.name for s in report.studies] == ["1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"]
    assert report.studies[1].hu_range == (-2000, 3000)
    assert report.studies[1].instance_order_reversed and not report.studies[0].instance_order_reversed
    assert report.has_errors and report.studies[3].errors and not report.studies[0].errors
    assert any("Modality is 'MR', not CT" in e for e in report.studies[2].errors)    # a failed study (issue 23)
    assert any("too short to hold C1-C7" in w for w in report.studies[1].warnings)
    assert not report.studies[0].warnings
    text = report.format()
    assert "4 studies, 2 with errors, 1 with warnings only" in text
    assert main(["inspect", str(images), "--no-progress"]) == 0
    assert "1.2.3.4" in capsys.readouterr().out


def test_undecodable_slice_is_an_error(tmp_path):
    study = _study(tmp_path, "1.2.3.8", ts=registry.TS_RLE)
    path = study / "6.dcm"
    data = bytearray(path.read_bytes())
    start = data.rindex(b"\xfe\xff\x00\xe0")
    data[start + 8:start + 72] = b"\xff" * 64
    path.write_bytes(bytes(data))
    report = inspect_path(study, workers=1, progress=False)
    assert report.has_errors and any("6.dcm" in e for e in report.studies[0].errors)
    assert report.studies[0].n_slices == N


def test_missing_path_exits_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_same_report(tmp_path, workers):
    study = _study(tmp_path, "1.2.3.8", ts=registry.TS_JPEG_LOSSLESS_SV1)
    assert inspect_path(study, workers=workers, progress=False).studies[0].hu_range == (-1000, 1500)
