"""Decode speed of the study reader vs plain pydicom, on series written by data_prep.dicom.writer.

    python -m benchmarks.bench_decode [--slices 64 --size 512 --repeats 3]

For each transfer syntax it writes one temporary series of CT-like slices, then times (median of
--repeats runs, after one warm-up run) reading the whole study into HU:
  pydicom loop      dcmread + pixel_array + apply_rescale per file, pydicom's default plugin
  reader w=1        data_prep.dicom.volume.read_volume(workers=1)
  reader w=2 proc   read_volume(workers=2) with the process pool
  reader w=2 thread read_volume(workers=2) with threads
Every method's volume is checked equal to the pydicom loop's before timing counts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_rescale

from data_prep.dicom import geometry
from data_prep.dicom import volume as dicom_volume
from data_prep.dicom.writer import write_series
from data_prep.runs import registry

SYNTAXES = {
    "uncompressed": registry.TS_EXPLICIT_LE,
    "JPEG lossless .70": registry.TS_JPEG_LOSSLESS_SV1,
    "RLE": registry.TS_RLE,
    "JPEG 2000 lossless": registry.TS_JPEG2000_LOSSLESS,
}


def ct_like_volume(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Return a CT-like HU volume: air, a soft-tissue disc, a bony ring, noise (so codecs see real entropy)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    r = np.hypot(xx, yy)
    base = np.where(r < 0.4, 40.0, -1000.0) + np.where((r > 0.08) & (r < 0.12), 900.0, 0.0)
    vol = base[None] + rng.normal(0, 25, size=(n, size, size))
    return np.round(vol).astype(np.float32)


def pydicom_loop(paths: list[Path]) -> np.ndarray:
    """The baseline: plain pydicom, one file after another."""
    out = []
    for p in paths:
        ds = pydicom.dcmread(p)
        out.append(apply_rescale(ds.pixel_array, ds).astype(np.float32))
    return np.stack(out)


def timed(fn, repeats: int) -> tuple[float, np.ndarray]:
    """Run fn once to warm up, then `repeats` times; return the median seconds and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> None:
    """Write the series, time every method, print a table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--syntax", choices=list(SYNTAXES), action="append", default=None)
    args = ap.parse_args(argv)
    vol = ct_like_volume(args.slices, args.size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        for label in args.syntax or list(SYNTAXES):
            study = Path(tmp) / label.replace(" ", "_")
            write_series(study, vol, study_uid="1.2.826.0.1.3680043.99999", pixel_spacing=(0.4, 0.4),
                         slice_thickness=0.625, transfer_syntax=SYNTAXES[label], instance_order="feet_first")
            geom = geometry.scan_study(study)
            t_scan, _ = timed(lambda g=study: geometry.scan_study(g), args.repeats)
            methods = {
                "pydicom loop": lambda g=geom: pydicom_loop(list(g.paths)),
                "reader w=1": lambda g=geom: dicom_volume.read_volume(g, workers=1),
                "reader w=2 proc": lambda g=geom: dicom_volume.read_volume(g, workers=2, executor="process"),
                "reader w=2 thread": lambda g=geom: dicom_volume.read_volume(g, workers=2, executor="thread"),
            }
            ref = None
            for name, fn in methods.items():
                sec, out = timed(fn, args.repeats)
                ref = out if ref is None else ref
                if not np.array_equal(out, ref) or not np.array_equal(out, vol):
                    raise SystemExit(f"{label} / {name}: volume differs from pydicom's")
                rows.append((label, name, args.slices / sec, 1000 * sec / args.slices))
            rows.append((label, "scan_study (headers)", args.slices / t_scan, 1000 * t_scan / args.slices))
    dicom_volume.shutdown_pools()
    print(f"decode benchmark: {args.slices} slices of {args.size}x{args.size}, median of {args.repeats} runs "
          "after a warm-up; machine may be shared (noisy)")
    print(f"{'format':<20} {'method':<22} {'slices/s':>9} {'ms/slice':>9}")
    for label, name, sps, ms in rows:
        print(f"{label:<20} {name:<22} {sps:>9.1f} {ms:>9.2f}")


if __name__ == "__main__":
    main()
