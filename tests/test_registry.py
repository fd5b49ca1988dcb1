"""The registry of levels, targets and submission row ids."""

from __future__ import annotations

import pytest

from data_prep.runs import registry


def test_targets_in_competition_order():
    assert registry.TARGETS == ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "patient_overall")
    assert registry.SEG_LABELS[1] == "C1" and registry.SEG_LABELS[7] == "C7"
    assert registry.SEG_LABELS[8] == "T1" and registry.SEG_LABELS[19] == "T12"


def test_row_id_round_trip_with_dots_and_underscores_in_uid():
    uid = "1.2.826.0.1.3680043.10197"
    for target in registry.TARGETS:
        assert registry.split_row_id(registry.row_id(uid, target)) == (uid, target)
    assert registry.row_id(uid, "patient_overall") == "1.2.826.0.1.3680043.10197_patient_overall"


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="C8"):
        registry.row_id("x", "C8")
    with pytest.raises(ValueError, match="does not end"):
        registry.split_row_id("1.2.3_T1")
    assert registry.level_index("C3") == 2
    with pytest.raises(ValueError, match="unknown vertebra level"):
        registry.level_index("T1")
