"""The read-ahead reader: studies in order with their own chunks, errors kept to their study, bounded memory."""

from __future__ import annotations

import time

import numpy as np
import pytest

from data_prep.dicom.geometry import EmptyStudyError, scan_study
from data_prep.dicom.readahead import read_ahead
from data_prep.dicom.volume import iter_chunks
from data_prep.dicom.writer import write_series

N, ROWS, COLS, CHUNK = 20, 24, 28, 4
SETTLE_S = 0.5   # time the reader gets to run ahead while the consumer waits


def _study(root, name: str, seed: int) -> tuple:
    volume = np.random.default_rng(seed).integers(-1000, 2000, size=(N, ROWS, COLS)).astype(np.float32)
    write_series(root / name, volume, study_uid=f"1.2.3.{seed}", pixel_spacing=(0.5, 0.5), slice_thickness=1.0,
                 z_top_mm=0.0)
    return root / name, volume


@pytest.fixture
def studies(tmp_path):
    made = [_study(tmp_path, f"s{k}", k) for k in range(3)]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "1.dcm").write_bytes(b"not a dicom file at all" * 10)
    return made, bad


@pytest.mark.parametrize("scan_ahead", [True, False])
def test_each_study_gets_its_own_chunks_in_order_and_a_bad_one_fails_alone(studies, scan_ahead):
    made, bad = studies
    order = [made[0][0], bad, made[1][0], made[2][0]]
    seen = []
    for stream in read_ahead(order, chunk_size=CHUNK, context=lambda g: 1, workers=2, depth=2,
                             scan_ahead=scan_ahead):
        with stream:
            if stream.study_dir == bad:
                with pytest.raises(EmptyStudyError, match="bad"):
                    stream.geometry   # noqa: B018
                with pytest.raises(EmptyStudyError):
                    list(stream.chunks())
                seen.append("bad")
                continue
            chunks = list(stream.chunks())
            volume = dict((str(p), v) for p, v in made)[str(stream.study_dir)]
            reference = list(iter_chunks(scan_study(stream.study_dir), chunk_size=CHUNK, context=1))
            assert [(c.start, c.stop, c.lo, c.hi) for c in chunks] == [(c.start, c.stop, c.lo, c.hi)
                                                                      for c in reference]
            got = np.concatenate([c.hu[c.start - c.lo:c.stop - c.lo] for c in chunks])
            np.testing.assert_array_equal(got, volume)
            seen.append(stream.study_dir.name)
    assert seen == ["s0", "bad", "s1", "s2"]


def test_the_reader_stays_depth_chunks_ahead_and_moves_on_when_a_study_is_dropped(studies):
    made, _ = studies
    depth = 2
    streams = read_ahead([p for p, _ in made], chunk_size=CHUNK, context=lambda g: 0, workers=1, depth=depth)
    first = next(streams)
    time.sleep(SETTLE_S)                                     # nothing consumed: the reader must block
    assert first._chunks.qsize() == depth
    it = first.chunks()
    next(it)
    first.close()                                           # give up on the study after one chunk
    second = next(streams)
    assert second.study_dir == made[1][0]
    assert sum(c.stop - c.start for c in second.chunks()) == N   # the next study arrives whole
    streams.close()                                         # stops the reader: no thread left blocked
