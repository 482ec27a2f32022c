"""The one table every source produces: its columns, its labels, and the checks that normalise it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from fer_tune import EXPRESSIONS
from fer_tune.errors import UserError

COLUMNS = ("image", "expression", "valence", "arousal", "subject", "source_split",
           "face_x", "face_y", "face_w", "face_h")
"""The columns of every source's table, in this order (the synthetic table adds its own after)."""

EXPRESSION_ALIASES = {
    "angry": "anger",
    "surprised": "surprise",
    "happiness": "happy",
    "sadness": "sad",
    "fearful": "fear",
    "disgusted": "disgust",
    "neutrality": "neutral",
}
"""Other names for the classes in `fer_tune.EXPRESSIONS` (matched case-insensitively)."""

NON_IMAGE_FILES = "non-image files"

NAME_TO_ID = {name: i for i, name in enumerate(EXPRESSIONS)}
NAME_TO_ID.update({alias: NAME_TO_ID[name] for alias, name in EXPRESSION_ALIASES.items()})


def expression_id(value: Any) -> Optional[int]:
    """An expression label (id, numeric string or class name/alias, any case) as its id 0..7,
    or None when ``value`` is not a valid label (empty values are not labels either)."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value) if 0 <= int(value) < len(EXPRESSIONS) else None
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value) and value == int(value) and 0 <= value < len(EXPRESSIONS):
            return int(value)
        return None
    text = str(value).strip().lower()
    if text in NAME_TO_ID:
        return NAME_TO_ID[text]
    try:
        number = float(text)
    except ValueError:
        return None
    return expression_id(number)


def check_root(data, source) -> None:
    kind = source.root_kind
    if kind is None:
        return
    root = data.root
    what = "a dataset folder" if kind == "dir" else "a CSV file or a folder holding labels.csv"
    if root is None:
        raise UserError(f"data.root is not set: data.source '{source.name}' needs {what}; "
                        f"set it with --set data.root=PATH")
    root = Path(root)
    if not root.exists():
        raise UserError(f"data.root '{root}' does not exist; point it at {what} with "
                        f"--set data.root=PATH")
    if kind == "dir" and not root.is_dir():
        raise UserError(f"data.root '{root}' is not a directory: data.source '{source.name}' "
                        f"needs {what}; point elsewhere with --set data.root=PATH")
    if kind == "file_or_dir" and not (root.is_dir() or root.is_file()):
        raise UserError(f"data.root '{root}' is neither a file nor a directory: data.source "
                        f"'{source.name}' needs {what}; point elsewhere with --set data.root=PATH")


def finalize(raw: pd.DataFrame, source, data) -> pd.DataFrame:
    dropped = dict(raw.attrs.get("dropped", {}))
    where = raw["_where"] if "_where" in raw.columns else raw.get("image")
    root = getattr(data, "root", None)
    if len(raw) == 0:
        detail = f" (dropped: {fmt_dropped(dropped)})" if dropped else ""
        place = f"under {root}" if source.root_kind is not None else f"in source '{source.name}'"
        raise UserError(f"no images found {place}{detail}; data.source '{source.name}' expects "
                        f"{source.description}")
    raw = raw.reset_index(drop=True)
    where = where.reset_index(drop=True) if where is not None else pd.Series(range(len(raw)))

    n = len(raw)
    out: dict[str, Any] = {}
    out["image"] = raw["image"].astype(str).to_numpy(dtype=object)

    expr = pd.to_numeric(raw["expression"], errors="coerce") if "expression" in raw else \
        pd.Series(np.full(n, -1))
    bad = expr.isna() | (expr != expr.round()) | (expr < -1) | (expr >= len(EXPRESSIONS))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{where.iloc[i]}: expression {raw['expression'].iloc[i]!r} is out of "
                        f"range; valid: 0..{len(EXPRESSIONS) - 1} or empty for unlabelled")
    out["expression"] = expr.to_numpy().astype(np.int64)

    for col in ("valence", "arousal"):
        values = pd.to_numeric(raw[col], errors="coerce").to_numpy(dtype=np.float64) \
            if col in raw else np.full(n, np.nan)
        bad = ~np.isnan(values) & ((values < -1) | (values > 1) | ~np.isfinite(values))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"{where.iloc[i]}: {col} {values[i]!r} is outside [-1, 1]")
        out[col] = values

    out["subject"] = str_column(raw["subject"]) if "subject" in raw else np.full(n, "", object)
    if "source_split" in raw:
        split = str_column(raw["source_split"])
        bad = ~np.isin(split, ["train", "val", "test", ""])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"{where.iloc[i]}: source_split {split[i]!r} is not one of "
                            f"train, val, test or empty")
        out["source_split"] = split
    else:
        out["source_split"] = np.full(n, "", object)

    box = np.stack([pd.to_numeric(raw[c], errors="coerce").to_numpy(dtype=np.float64)
                    if c in raw else np.full(n, np.nan)
                    for c in ("face_x", "face_y", "face_w", "face_h")], axis=1)
    nan = np.isnan(box)
    partial = nan.any(axis=1) & ~nan.all(axis=1)
    full = ~nan.any(axis=1)
    invalid = partial | (full & ((box[:, 2] <= 0) | (box[:, 3] <= 0) | ~np.isfinite(box).all(1)))
    if invalid.any():
        i = int(np.flatnonzero(invalid)[0])
        raise UserError(f"{where.iloc[i]}: face box (x, y, w, h) = {tuple(box[i].tolist())} is "
                        f"invalid; give all four with w, h > 0, or none for a cropped face")
    for j, c in enumerate(("face_x", "face_y", "face_w", "face_h")):
        out[c] = box[:, j]

    # one photo may hold several faces (rows with different boxes); the same face twice could land
    # in train and test both
    keys = pd.Series([f"{image}|{b.tolist()}" for image, b in zip(out["image"], box)], dtype=object)
    twice = keys.duplicated(keep=False).to_numpy()
    if twice.any():
        i, j = np.flatnonzero(keys.to_numpy() == keys.iloc[int(np.flatnonzero(twice)[0])])[:2].tolist()
        raise UserError(f"{where.iloc[j]}: the same image as {where.iloc[i]} ({out['image'][i]}"
                        f"{', the same face box' if full[i] else ''}); a face listed twice could be both trained "
                        f"and tested on: remove one of the two rows")

    table = pd.DataFrame(out)
    table["image"] = table["image"].astype(str)
    table["subject"] = table["subject"].astype(str)
    table["source_split"] = table["source_split"].astype(str)
    extra = [c for c in raw.columns if c not in COLUMNS and c != "_where"]
    if extra:
        table = pd.concat([table, raw[extra]], axis=1)

    tasks = []
    if (table["expression"] >= 0).any():
        tasks.append("expression")
    for col in ("valence", "arousal"):
        if table[col].notna().any():
            tasks.append(col)
    table.attrs["dropped"] = dropped
    table.attrs["tasks"] = tasks
    return table


def fmt_dropped(dropped: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in dropped.items())


def str_column(series: pd.Series) -> np.ndarray:
    values = series.to_numpy(dtype=object)
    return np.array(["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                     for v in values], dtype=object)
