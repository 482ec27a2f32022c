"""`csv`: any CSV with `path, expression[, valence, arousal, subject]`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fer_tune import EXPRESSIONS
from fer_tune.data.sources._paths import Lines, check_paths, normalise_all
from fer_tune.data.sources._registry import Source, register_source
from fer_tune.data.sources._table import expression_id
from fer_tune.errors import UserError, one_line


@register_source("csv")
class CsvSource(Source):
    """A CSV with columns path, expression[, valence, arousal, subject, face_x, face_y, face_w,
    face_h]; paths relative to the CSV's folder."""

    root_kind = "file_or_dir"
    required = ("path", "expression")
    optional = ("valence", "arousal", "subject", "face_x", "face_y", "face_w", "face_h")
    description = ("a CSV file (or a folder holding labels.csv) with columns path, expression"
                   "[, valence, arousal, subject, face_x, face_y, face_w, face_h]")

    @staticmethod
    def _csv_path(data) -> Path:
        root = Path(data.root)
        return root / "labels.csv" if root.is_dir() else root

    def dataset_root(self, data) -> Path:
        root = super().dataset_root(data)
        return root if root.is_dir() else root.parent

    def load(self, data) -> pd.DataFrame:
        csv_path = self._csv_path(data)
        root = self.dataset_root(data)
        if not csv_path.is_file():
            raise UserError(f"data.root '{data.root}' is a folder without labels.csv; point "
                            f"--set data.root=PATH at the CSV file or a folder holding labels.csv")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)  # rows wider than the header
                raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                                  skipinitialspace=True, index_col=False)
        except pd.errors.ParserWarning:
            line, width, fields = wider_than_header(csv_path)
            raise UserError(f"{csv_path} line {line}: {fields} fields where the header has {width}; quote values "
                            f"that hold commas") from None
        except pd.errors.EmptyDataError:
            raise UserError(f"{csv_path}: empty file; needs a header with columns "
                            f"{', '.join(self.required)}") from None
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
            msg = one_line(err, limit=10_000)
            raise UserError(f"{csv_path}: not a readable CSV: {msg}") from None
        raw.columns = [str(c).strip().lower() for c in raw.columns]
        for col in self.required:
            if col not in raw.columns:
                raise UserError(f"{csv_path}: missing column '{col}'; required columns: "
                                f"{', '.join(self.required)} "
                                f"(optional: {', '.join(self.optional)})")
        box_cols = [c for c in ("face_x", "face_y", "face_w", "face_h") if c in raw.columns]
        if box_cols and len(box_cols) != 4:
            absent = [c for c in ("face_x", "face_y", "face_w", "face_h") if c not in raw.columns]
            raise UserError(f"{csv_path}: missing column '{absent[0]}'; a face box needs all of "
                            f"face_x, face_y, face_w, face_h")
        wheres = Lines(csv_path, record_lines(csv_path, len(raw)))
        n = len(raw)

        expression = np.full(n, -1, dtype=np.int64)
        for i, value in enumerate(raw["expression"].to_numpy(dtype=object)):
            text = str(value).strip()
            if text == "":
                continue
            label = expression_id(text)
            if label is None:
                raise UserError(f"{wheres[i]}: expression {text!r} is out of range; valid: "
                                f"0..{len(EXPRESSIONS) - 1}, a class name "
                                f"({', '.join(EXPRESSIONS)}) or empty for unlabelled")
            expression[i] = label

        columns: dict[str, Any] = {"expression": expression}
        for col in ("valence", "arousal", "face_x", "face_y", "face_w", "face_h"):
            if col not in raw.columns:
                continue
            text = raw[col].str.strip()
            values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
            bad = np.isnan(values) & (text != "").to_numpy()
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise UserError(f"{wheres[i]}: {col} {text.iloc[i]!r} is not a number"
                                + ("; valid: -1..1 or empty" if col in ("valence", "arousal")
                                   else ""))
            if col in ("valence", "arousal"):
                bad = ~np.isnan(values) & ((values < -1) | (values > 1))
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise UserError(f"{wheres[i]}: {col} {text.iloc[i]} is outside [-1, 1] "
                                    f"(leave it empty when missing)")
            columns[col] = values
        if "subject" in raw.columns:
            columns["subject"] = raw["subject"].str.strip().to_numpy(dtype=object)

        rels = normalise_all(raw["path"], root, wheres)
        check_paths(root, rels, wheres, str(csv_path))
        table = pd.DataFrame({"image": rels, **columns, "_where": wheres.series()})
        table.attrs = {"dropped": {}}
        return table


def record_lines(path: Path, records: int) -> np.ndarray:
    """The line each data record starts on, counting blank lines and quoted line breaks as pandas
    does not; where the two readers disagree on the count, one record per line after the header."""
    import csv

    starts, previous = [], 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, skipinitialspace=True)  # as pandas reads it
            for row in reader:
                if row and any(cell.strip() for cell in row):
                    starts.append(previous + 1)
                previous = reader.line_num
    except (OSError, UnicodeDecodeError, csv.Error):
        starts = []
    data = np.asarray(starts[1:], dtype=np.int64)
    return data if len(data) == records else np.arange(records) + 2


def wider_than_header(path: Path) -> tuple[int, int, int]:
    """(line, header fields, fields) of the first record with more fields than the header."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, skipinitialspace=True)
        header, previous = None, 0
        for row in reader:
            if row:
                if header is None:
                    header = row
                elif len(row) > len(header):
                    return previous + 1, len(header), len(row)
            previous = reader.line_num
    return previous, len(header or []), len(header or [])

