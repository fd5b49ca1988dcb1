"""The Kaggle input tables (train.csv, train_bounding_boxes.csv, test.csv): one reader, one schema each.

`read_table(path, kind)` reads a table with StudyInstanceUID as text, validates it against its pandera
schema (types, ranges, finite values, unique keys, labels in {0, 1}) and returns it with clean dtypes.
Every problem is collected and reported at once as a `TableError` naming the file, the line and the column.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaError, SchemaErrors

from data_prep.errors import InputError
from data_prep.runs import registry
from data_prep.safe_paths import name_problem

TRAIN = "train"
BOXES = "boxes"
TEST = "test"
KINDS: tuple[str, ...] = (TRAIN, BOXES, TEST)
FILE_NAMES: dict[str, str] = {TRAIN: "train.csv", BOXES: "train_bounding_boxes.csv", TEST: "test.csv"}
"""The usual file name of each kind of table (Kaggle layout)."""
BOX_COORDS: tuple[str, ...] = ("x", "y", "width", "height")
SLICE_NUMBER = "slice_number"
ROW_ID = "row_id"
PREDICTION_TYPE = "prediction_type"
LABEL_VALUES: tuple[int, ...] = (0, 1)
HEADER_LINES = 1
"""Lines before the first data row: a data row at 0-based position i is on line i + HEADER_LINES + 1."""
MAX_LISTED = 10
"""At most this many problems are spelt out in one error message (the count of the rest follows)."""


class TableError(InputError):
    """An input table whose values break its schema; `problems` holds one line per failing cell."""

    def __init__(self, path: str | Path | None, reason: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(path, reason)
        self.problems = tuple(problems)

    def __reduce__(self):
        """Pickle with (path, reason, problems)."""
        return (type(self), (self.path, self.reason, self.problems))


# ---------------------------------------------------------------- checks (numeric-safe: text fails, never raises)
def _numbers(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce").astype(float)


def _finite(series: pd.Series) -> pd.Series:
    return pd.Series(np.isfinite(_numbers(series)), index=series.index)


def _at_least_zero(series: pd.Series) -> pd.Series:
    return _numbers(series) >= 0


def _above_zero(series: pd.Series) -> pd.Series:
    return _numbers(series) > 0


def _integral(series: pd.Series) -> pd.Series:
    values = _numbers(series)
    return pd.Series(np.isfinite(values) & (values == np.round(values)), index=series.index)


def _label(series: pd.Series) -> pd.Series:
    return _numbers(series).isin(LABEL_VALUES)


def _not_blank(series: pd.Series) -> pd.Series:
    return series.astype(str).str.strip() != ""


def _unpadded(series: pd.Series) -> pd.Series:
    text = series.astype(str)
    return text == text.str.strip()


def _folder_name(series: pd.Series) -> pd.Series:
    return series.map(lambda v: name_problem(str(v)) is None).astype(bool)


def _patient_matches_levels(df: pd.DataFrame) -> pd.Series:
    """patient_overall is 1 exactly when some level C1..C7 is 1 (rows with invalid labels are judged elsewhere)."""
    levels = pd.DataFrame({c: _numbers(df[c]) for c in registry.LEVELS})
    patient = _numbers(df[registry.PATIENT])
    valid = levels.isin(LABEL_VALUES).all(axis=1) & patient.isin(LABEL_VALUES)
    return ~valid | (patient == levels.max(axis=1))


def _row_id_parses(series: pd.Series) -> pd.Series:
    def ok(value: object) -> bool:
        try:
            registry.split_row_id(str(value))
        except ValueError:
            return False
        return True

    return series.map(ok).astype(bool)


FINITE = pa.Check(_finite, error="must be a finite number")
NON_NEGATIVE = pa.Check(_at_least_zero, error="must be >= 0")
POSITIVE = pa.Check(_above_zero, error="must be > 0")
INTEGRAL = pa.Check(_integral, error="must be a whole number")
LABEL = pa.Check(_label, error="must be 0 or 1")
NOT_BLANK = pa.Check(_not_blank, error="must not be blank")
UNPADDED = pa.Check(_unpadded, error="must not start or end with spaces")
FOLDER_NAME = pa.Check(_folder_name, error="must name one study folder (no '/', '\\', ':', control character, "
                                           "'.' or '..')")


def _uid_column(*, unique: bool) -> pa.Column:
    """A study key that names its folder under train_images/ (so it can never lead elsewhere)."""
    return pa.Column(str, checks=[NOT_BLANK, UNPADDED, FOLDER_NAME], nullable=False, unique=unique,
                     report_duplicates="all")


def _label_column() -> pa.Column:
    return pa.Column(checks=LABEL, nullable=False)


def _row_id_matches(df: pd.DataFrame) -> pd.Series:
    """row_id must be `<StudyInstanceUID>_<prediction_type>` when those columns are present."""
    ok = pd.Series(True, index=df.index)
    expected = df[ROW_ID].astype(str)
    if registry.STUDY_COL in df.columns and PREDICTION_TYPE in df.columns:
        ok &= expected == df[registry.STUDY_COL].astype(str) + "_" + df[PREDICTION_TYPE].astype(str)
    return ok


SCHEMAS: dict[str, pa.DataFrameSchema] = {
    TRAIN: pa.DataFrameSchema(
        {registry.STUDY_COL: _uid_column(unique=True), **{t: _label_column() for t in registry.TARGETS}},
        checks=[pa.Check(_patient_matches_levels, error=f"{registry.PATIENT} must be 1 exactly when one of "
                                                        f"{registry.LEVELS[0]}..{registry.LEVELS[-1]} is 1")],
        strict=False, name=FILE_NAMES[TRAIN]),
    BOXES: pa.DataFrameSchema(
        {registry.STUDY_COL: _uid_column(unique=False),
         "x": pa.Column(float, [FINITE, NON_NEGATIVE], coerce=True, nullable=False),
         "y": pa.Column(float, [FINITE, NON_NEGATIVE], coerce=True, nullable=False),
         "width": pa.Column(float, [FINITE, POSITIVE], coerce=True, nullable=False),
         "height": pa.Column(float, [FINITE, POSITIVE], coerce=True, nullable=False),
         SLICE_NUMBER: pa.Column(float, [INTEGRAL, NON_NEGATIVE], coerce=True, nullable=False)},
        strict=False, name=FILE_NAMES[BOXES]),
    TEST: pa.DataFrameSchema(
        {ROW_ID: pa.Column(str, [NOT_BLANK, pa.Check(_row_id_parses,
                                                     error="must end in _C1.._C7 or _patient_overall")],
                           nullable=False, unique=True, report_duplicates="all"),
         registry.STUDY_COL: pa.Column(str, [NOT_BLANK, UNPADDED], nullable=False, required=False),
         PREDICTION_TYPE: pa.Column(str, pa.Check.isin(registry.TARGETS,
                                                       error=f"must be one of {', '.join(registry.TARGETS)}"),
                                    nullable=False, required=False)},
        checks=[pa.Check(_row_id_matches, error="row_id must be <StudyInstanceUID>_<prediction_type>")],
        strict=False, name=FILE_NAMES[TEST]),
}
"""One pandera schema per kind of table; extra columns are allowed and passed through unchanged."""

CASTS: dict[str, Callable[[pd.DataFrame], pd.DataFrame]] = {
    TRAIN: lambda df: df.assign(**{t: _numbers(df[t]).astype("int64") for t in registry.TARGETS}),
    BOXES: lambda df: df.assign(**{SLICE_NUMBER: _numbers(df[SLICE_NUMBER]).astype("int64")}),
    TEST: lambda df: df,
}
"""Dtypes after validation: labels and slice numbers as int64 (a CSV may spell them 1.0)."""


# ---------------------------------------------------------------- public API
def schema(kind: str) -> pa.DataFrameSchema:
    """Return the pandera schema of a kind of table ('train', 'boxes' or 'test')."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown table kind {kind!r}; expected one of {', '.join(KINDS)}")
    return SCHEMAS[kind]


def read_table(path: str | os.PathLike, kind: str) -> pd.DataFrame:
    """Read and validate a Kaggle input table; raise InputError/TableError naming the file, line and column."""
    schema(kind)
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"not found (expected {FILE_NAMES[kind]} of the Kaggle layout)")
    try:
        df = pd.read_csv(path, dtype={registry.STUDY_COL: str, ROW_ID: str, PREDICTION_TYPE: str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, f"is not a readable CSV ({FILE_NAMES[kind]}): {exc}") from None
    if kind == TEST and not len(df):
        raise InputError(path, "has a header but no data rows: a submission from it would be empty (give the "
                               "test.csv that lists the rows to predict, or leave --test-csv out)")
    return validate_table(df, kind, path=path)


def validate_table(df: pd.DataFrame, kind: str, *, path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Validate an already-read table against its schema; return it with clean dtypes (labels as int)."""
    return CASTS[kind](validate_frame(df, schema(kind), path=path, name=FILE_NAMES[kind]))


def validate_frame(df: pd.DataFrame, table_schema: pa.DataFrameSchema, *, path: str | os.PathLike | None,
                   name: str) -> pd.DataFrame:
    """Validate a table against any pandera schema; TableError names the file, rows, lines and columns."""
    df = df.reset_index(drop=True)
    try:
        return table_schema.validate(df, lazy=True)
    except SchemaErrors as exc:
        raise _table_error(path, name, exc.failure_cases) from None
    except SchemaError as exc:  # non-lazy failures (should not happen with lazy=True)
        raise TableError(path if path is not None else name, f"invalid table: {exc}") from None


def read_csv_table(path: str | os.PathLike, required: Sequence[str] = (), what: str = "table",
                   **read_csv: Any) -> pd.DataFrame:
    """Read a CSV (StudyInstanceUID as text unless `dtype` is given); InputError naming the file when it is
    absent, unreadable or lacks a `required` column. `read_csv`: further pandas.read_csv arguments."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, f"{what} not found")
    read_csv.setdefault("dtype", {registry.STUDY_COL: str})
    try:
        df = pd.read_csv(path, **read_csv)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, f"is not a readable CSV ({what}): {exc}") from None
    check_columns(df, required, what, path)
    return df


def check_columns(df: pd.DataFrame, required: Sequence[str], what: str, path: str | os.PathLike | None) -> None:
    """Raise InputError naming the file and every `required` column the table lacks."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(path, f"lacks column(s) {', '.join(missing)} ({what}; see docs/contracts.md)")


def format_problem(case: pd.Series) -> str:
    """Return one failure case of a pandera report as 'row R (line L), column C: reason (found V)'."""
    column, check, value, index = case["column"], str(case["check"]), case["failure_case"], case["index"]
    if check == "column_in_dataframe":
        return f"missing column {value!r}"
    where = _where(index)
    if case["schema_context"] == "DataFrameSchema":      # a check across columns: one message per row
        return f"{where}: {check}"
    if check == "field_uniqueness":
        return f"{where}, column {column}: {value!r} appears more than once (it must be unique)"
    if check == "not_nullable":
        return f"{where}, column {column}: empty value"
    if check.startswith(("coerce_dtype", "dtype(")):
        return f"{where}, column {column}: {value!r} is not a number"
    return f"{where}, column {column}: {check} (found {value!r})"


# ---------------------------------------------------------------- helpers
def _where(index: object) -> str:
    """Name a 0-based data row as it appears in the file: 'row 3 (line 4)' (1-based, header on line 1)."""
    try:
        i = int(index)
    except (TypeError, ValueError):
        return "table"
    return f"row {i + 1} (line {i + 1 + HEADER_LINES})"


def _table_error(path: str | os.PathLike | None, name: str, cases: pd.DataFrame) -> TableError:
    checks = cases["check"].astype(str)
    keys = cases["column"].astype(str) + "|" + cases["index"].astype(str)
    not_numbers = set(keys[checks.str.startswith("coerce_dtype")])
    # a value that is not a number fails the dtype and every numeric check too: report it once
    keep = ~keys.isin(not_numbers) | checks.str.startswith("coerce_dtype")
    cases = cases[keep & cases["index"].notna() | (checks == "column_in_dataframe")]
    order = pd.to_numeric(cases["index"], errors="coerce")
    cases = cases.assign(_row=order).sort_values("_row", na_position="first", kind="stable")
    problems = tuple(dict.fromkeys(format_problem(c) for _, c in cases.iterrows()))
    listed = "; ".join(problems[:MAX_LISTED])
    more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return TableError(path if path is not None else name,
                      f"{len(problems)} problem(s) ({name} schema): {listed}{more}", problems)
