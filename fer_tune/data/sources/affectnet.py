"""`affectnet`: AffectNet's official CSVs (training.csv, validation.csv) and image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fer_tune.data.sources._paths import Lines, check_paths, normalise_all
from fer_tune.data.sources._registry import Source, register_source
from fer_tune.errors import UserError, one_line

AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                     "facial_landmarks", "expression", "valence", "arousal")
AFFECTNET_DROP_EXPRESSION = "expression 8-10 (none/uncertain/no-face)"
AFFECTNET_DROP_VA = "valence/arousal == -2"


@register_source("affectnet")
class AffectNetSource(Source):
    """AffectNet's official training.csv / validation.csv with Manually_Annotated_Images/."""

    description = ("AffectNet's training.csv / validation.csv in the root or in "
                   "Manually_Annotated_file_lists/, images under the root or "
                   "Manually_Annotated_Images/")

    def load(self, data) -> pd.DataFrame:
        root = Path(data.root)
        found = []
        for name, split in (("training.csv", "train"), ("validation.csv", "test")):
            for folder in (root, root / "Manually_Annotated_file_lists"):
                if (folder / name).is_file():
                    found.append((folder / name, split))
                    break
        if not found:
            raise UserError(f"data.root '{root}': no training.csv or validation.csv in it or in "
                            f"Manually_Annotated_file_lists/; data.source 'affectnet' needs "
                            f"AffectNet's official CSVs (point elsewhere: --set data.root=PATH)")
        parts = []
        dropped: dict[str, int] = {}
        for csv_path, split in found:
            part, part_dropped = self._read_csv(csv_path, split, root)
            parts.append(part)
            for k, v in part_dropped.items():
                dropped[k] = dropped.get(k, 0) + v
        table = pd.concat(parts, ignore_index=True)
        table.attrs = {"dropped": {k: v for k, v in dropped.items() if v}}
        return table

    def _read_csv(self, csv_path: Path, split: str, root: Path):
        try:
            with open(csv_path, encoding="utf-8-sig", errors="replace") as f:
                first = f.readline()
        except OSError as err:
            raise UserError(f"{csv_path}: cannot read: {err}") from None
        has_header = "subdirectory_filepath" in first.lower()
        try:
            raw = pd.read_csv(csv_path, header=0 if has_header else None,
                              names=None if has_header else list(AFFECTNET_COLUMNS),
                              usecols=lambda c: str(c).strip() != "facial_landmarks",
                              dtype=str, keep_default_na=False, skipinitialspace=True,
                              encoding="utf-8-sig")
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
            msg = one_line(err, limit=10_000)
            raise UserError(f"{csv_path}: not a readable AffectNet CSV: {msg}") from None
        raw.columns = [str(c).strip() for c in raw.columns]
        needed = ["subDirectory_filePath", "expression", "valence", "arousal"]
        missing = [c for c in needed if c not in raw.columns]
        if missing:
            raise UserError(f"{csv_path}: missing column {missing[0]!r}; AffectNet CSVs need "
                            f"{', '.join(AFFECTNET_COLUMNS)}")
        first_line = 2 if has_header else 1
        lines = np.arange(len(raw)) + first_line

        expr_text = raw["expression"].str.strip()
        expr = pd.to_numeric(expr_text, errors="coerce")
        bad = expr.isna() | (expr != expr.round()) | (expr < 0) | (expr > 10)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{csv_path} line {lines[i]}: expression {expr_text.iloc[i]!r} is out "
                            f"of range; valid: 0..7, or 8-10 (none/uncertain/no-face, dropped)")
        va = {}
        for col in ("valence", "arousal"):
            text = raw[col].str.strip()
            values = pd.to_numeric(text, errors="coerce")
            bad = values.isna() & (text != "")
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise UserError(f"{csv_path} line {lines[i]}: {col} {text.iloc[i]!r} is not a "
                                f"number; valid: -1..1 or -2 (missing)")
            va[col] = values.to_numpy(dtype=np.float64)

        drop_expr = (expr >= 8).to_numpy()
        drop_va = ~drop_expr & ((va["valence"] == -2) | (va["arousal"] == -2))
        keep = ~(drop_expr | drop_va)
        for col in ("valence", "arousal"):
            values = va[col]
            bad = keep & ~np.isnan(values) & ((values < -1) | (values > 1))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise UserError(f"{csv_path} line {lines[i]}: {col} {values[i]!r} is outside "
                                f"[-1, 1] (and is not -2, AffectNet's missing marker)")
        dropped = {AFFECTNET_DROP_EXPRESSION: int(drop_expr.sum()),
                   AFFECTNET_DROP_VA: int(drop_va.sum())}

        raw = raw.loc[keep].reset_index(drop=True)
        lines = lines[keep]
        wheres = Lines(csv_path, lines)
        rels = normalise_all(raw["subDirectory_filePath"], root, wheres)
        prefix = ""
        if rels and not (root / rels[0]).exists() and \
                (root / "Manually_Annotated_Images" / rels[0]).exists():
            prefix = "Manually_Annotated_Images/"
        rels = [prefix + r for r in rels]
        check_paths(root, rels, wheres, str(csv_path))

        def box(col):
            if col not in raw:
                return np.full(len(raw), np.nan)
            return pd.to_numeric(raw[col].str.strip(), errors="coerce").to_numpy(dtype=np.float64)

        table = pd.DataFrame({
            "image": rels,
            "expression": expr[keep].to_numpy().astype(np.int64),
            "valence": va["valence"][keep],
            "arousal": va["arousal"][keep],
            "subject": "",
            "source_split": split,
            "face_x": box("face_x"),
            "face_y": box("face_y"),
            "face_w": box("face_width"),
            "face_h": box("face_height"),
            "_where": wheres.series(),
        })
        return table, dropped
