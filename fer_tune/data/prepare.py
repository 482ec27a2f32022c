"""From a DataSpec to training-ready splits, once per experiment folder.

`prepare_data` reads the source, draws (or reuses) the split and records what the data can
measure in `splits/data.json`; `open_prepared` reads that back without touching the source, which
is what every trial does. Images are decoded into the cache on the first `load()` of a split, so
the test split's images are never read until the final evaluation asks for them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from fer_tune.data.cache import load_images
from fer_tune.data.sources import load_table
from fer_tune.data.splits import SPLITS, check_split_files, make_splits, read_split_record
from fer_tune.errors import UserError, one_line
from fer_tune import TASKS
from fer_tune.io import atomic_write_json, atomic_write_text


@dataclass
class Split:
    name: str
    table: pd.DataFrame
    images: np.ndarray

    def __len__(self) -> int:
        return len(self.table)

    def targets(self) -> dict[str, np.ndarray]:
        return {"expression": self.table["expression"].to_numpy(dtype=np.int64),
                "valence": self.table["valence"].to_numpy(dtype=np.float32),
                "arousal": self.table["arousal"].to_numpy(dtype=np.float32)}


@dataclass
class PreparedData:
    data_spec: object
    out_dir: Path
    tables: dict[str, pd.DataFrame]
    tasks: list[str]
    labels: list[int]
    info: dict = field(default_factory=dict)
    cache_root: Optional[Path] = None  # a node-local cache, for workers on nodes other than the driver's

    @property
    def cache_dir(self) -> Path:
        return self.cache_root or self.out_dir / "cache"

    def load(self, name: str, progress: bool = True) -> Split:
        images, table = load_images(self.data_spec, self.tables[name], name, self.cache_dir, progress)
        return Split(name, table, images)


def prepare_data(data_spec, out_dir: Path) -> PreparedData:
    """Read the source, make or reuse the split, record tasks and labels. Reads no image."""
    out_dir = Path(out_dir)
    table = load_table(data_spec)
    splits_dir = out_dir / "splits"
    make_splits(table, data_spec.split, splits_dir, where=str(data_spec.root or ""))
    tables = _read_splits(splits_dir)
    train = tables["train"]
    tasks = (["expression"] if (train["expression"] >= 0).any() else []) + \
            [t for t in ("valence", "arousal") if train[t].notna().any()]
    if not tasks:
        raise UserError(f"{data_spec.root or 'synthetic data'}: the training split has no labels at all")
    labels = sorted(int(c) for c in set(train["expression"]) if c >= 0)
    info = {"tasks": tasks, "labels": labels, "missing_tasks": [t for t in ("expression", "valence", "arousal")
                                                                 if t not in tasks],
            "sizes": {name: len(t) for name, t in tables.items()},
            "dropped": dict(table.attrs.get("dropped", {}))}
    atomic_write_json(splits_dir / "data.json", info)
    return PreparedData(data_spec, out_dir, tables, tasks, labels, info)


def prepare_test_only(data_spec, out_dir: Path) -> PreparedData:
    """Data that a trained model is only evaluated on (`fer-tune evaluate --set data...`): no train or
    val split is drawn. The test split is the dataset's own (a `test/` folder, AffectNet's
    validation.csv) when it has one, else the whole dataset; its classes are the labels the
    metrics average over. Reads no image."""
    out_dir = Path(out_dir)
    table = load_table(data_spec)
    own = table["source_split"] == "test"
    test = (table[own] if own.any() else table).reset_index(drop=True)
    tasks = (["expression"] if (test["expression"] >= 0).any() else []) + \
            [t for t in ("valence", "arousal") if test[t].notna().any()]
    if not tasks:
        raise UserError(f"{data_spec.root}: no labels to evaluate against (no expression, valence or arousal)")
    splits_dir = out_dir / "splits"
    atomic_write_text(splits_dir / "test.csv", test.to_csv(index=False))
    labels = sorted(int(c) for c in set(test["expression"]) if c >= 0)
    info = {"tasks": tasks, "labels": labels, "missing_tasks": [t for t in TASKS if t not in tasks],
            "sizes": {"test": len(test)}, "dropped": dict(table.attrs.get("dropped", {})),
            "test_split": (f"the dataset's own test split ({len(test)} of {len(table)} images)" if own.any()
                           else f"the whole dataset ({len(test)} images): it is only a test set here")}
    atomic_write_json(splits_dir / "data.json", info)
    tables = {"test": _read_split(splits_dir / "test.csv")}
    return PreparedData(data_spec, out_dir, tables, tasks, labels, info)


def open_prepared(data_spec, out_dir: Path) -> PreparedData:
    """The prepared data of an experiment folder, without reading the source again."""
    out_dir = Path(out_dir)
    splits_dir = out_dir / "splits"
    try:
        info = json.loads((splits_dir / "data.json").read_text())
        tasks, labels = info["tasks"], info["labels"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{splits_dir / 'data.json'}: missing or damaged ({type(err).__name__}); the experiment's "
                        f"prepared data cannot be read back") from None
    if (splits_dir / "split.json").exists():
        check_split_files(splits_dir, read_split_record(splits_dir).get("files"))
    return PreparedData(data_spec, out_dir, _read_splits(splits_dir), tasks, labels, info)


def _read_splits(splits_dir: Path) -> dict[str, pd.DataFrame]:
    return {name: _read_split(splits_dir / f"{name}.csv") for name in SPLITS}


def _read_split(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, keep_default_na=False,
                            na_values={"valence": [""], "arousal": [""], "face_x": [""], "face_y": [""],
                                       "face_w": [""], "face_h": [""]},
                            dtype={"subject": str, "source_split": str, "image": str})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise UserError(f"{path}: the split file is missing or unreadable ({one_line(err, 80)}); delete "
                        f"{path.parent} to draw the split again") from None
    missing = [c for c in ("image", "expression") if c not in table.columns]
    if missing:
        raise UserError(f"{path}: the split file has no {', '.join(missing)} column; delete {path.parent} to "
                        f"draw the split again")
    return table
