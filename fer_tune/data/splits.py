"""Train / val / test splits: stratified by expression, seeded, subject-disjoint when subjects exist.

A split is drawn once and written to `<out>/splits/{train,val,test}.csv` with a `split.json`
recording how it was made. An existing split is always reused; if the spec now asks for a
different one the run stops with an error instead of silently redrawing it (which would leak
test images into training across runs).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from fer_tune import EXPRESSIONS
from fer_tune.errors import UserError
from fer_tune.io import atomic_write_text
from fer_tune.spec import describe_differences

SPLITS = ("train", "val", "test")


def table_fingerprint(table: pd.DataFrame) -> str:
    cols = ["image", "expression", "valence", "arousal", "subject", "source_split"]
    digest = hashlib.sha256(pd.util.hash_pandas_object(table[cols], index=False).values.tobytes())
    return digest.hexdigest()[:16]


def resolve_size(size: float, total: int) -> int:
    return int(size) if size >= 1 else max(1, round(size * total))


def make_splits(table: pd.DataFrame, split_spec, splits_dir: Path, where: str = "") -> Path:
    """Write train/val/test CSVs to `splits_dir` unless the same split is already there.

    `where` names the data in error messages (its root folder or file)."""
    splits_dir = Path(splits_dir)
    recipe = {"val": split_spec.val, "test": split_spec.test, "seed": split_spec.seed,
              "table": table_fingerprint(table)}
    meta_path = splits_dir / "split.json"
    if meta_path.exists():
        made = read_split_record(splits_dir)
        files = made.pop("files", None)
        if made != recipe:
            raise UserError(
                f"{splits_dir}: an existing split was made from different data or split settings "
                f"({', '.join(describe_differences(made, recipe, 'split has', 'spec wants'))}); "
                f"it is never redrawn silently: use another --out folder "
                f"or delete {splits_dir}")
        check_split_files(splits_dir, files)
        return splits_dir

    splits = draw_splits(table, split_spec)
    check_splits(splits, where)
    splits_dir.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        atomic_write_text(splits_dir / f"{name}.csv", part.to_csv(index=False))
    recipe["files"] = {name: file_digest(splits_dir / f"{name}.csv") for name in splits}
    atomic_write_text(meta_path, json.dumps(recipe, indent=2))
    return splits_dir


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def read_split_record(splits_dir: Path) -> dict:
    """split.json: how the split was drawn and a digest of each split file."""
    path = Path(splits_dir) / "split.json"
    try:
        made = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({type(err).__name__}); the split's record is damaged: delete "
                        f"{splits_dir} to draw the split again (the same seed draws the same split)") from None
    if not isinstance(made, dict):
        raise UserError(f"{path}: not a split record; delete {splits_dir} to draw the split again")
    return made


def check_split_files(splits_dir: Path, files) -> None:
    """Each split CSV is the one drawn: a deleted or edited file (test faces moved into train, say)
    is refused, never trained on. Records from before digests were kept have none to check."""
    for name, digest in (files or {}).items():
        path = Path(splits_dir) / f"{name}.csv"
        if not path.is_file():
            raise UserError(f"{path}: the {name} split file is missing; delete {splits_dir} to draw the split "
                            f"again (the same seed draws the same split)")
        if file_digest(path) != digest:
            raise UserError(f"{path}: the {name} split file was changed after the split was drawn; it is never "
                            f"trained or tested on edited: restore it or delete {splits_dir} to draw it again")


def draw_splits(table: pd.DataFrame, split_spec) -> dict[str, pd.DataFrame]:
    total = len(table)
    given_test = table["source_split"] == "test"
    given_val = table["source_split"] == "val"
    rest = table[~given_test & ~given_val]
    if given_test.any():
        test = table[given_test]
    else:
        n_test = resolve_size(split_spec.test, total)
        rest, test = _split_off(rest, n_test, split_spec.seed, "test")
    if given_val.any():
        val = table[given_val]
    else:
        n_val = resolve_size(split_spec.val, total)
        rest, val = _split_off(rest, n_val, split_spec.seed + 1, "val")
    return {"train": rest.reset_index(drop=True), "val": val.reset_index(drop=True),
            "test": test.reset_index(drop=True)}


def _split_off(pool: pd.DataFrame, n: int, seed: int, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    if n >= len(pool):
        raise UserError(f"data.split.{name}: {n} images asked for the {name} split but only "
                        f"{len(pool)} are left to split; use a smaller count or a fraction like 0.1")
    strata = pool["expression"].to_numpy()
    subjects = pool["subject"].fillna("").astype(str).to_numpy()
    if (subjects != "").all() and len(np.unique(subjects)) >= 2:
        n_folds = min(max(2, round(len(pool) / n)), len(np.unique(subjects)))
        folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        keep, held = next(folds.split(np.zeros(len(pool)), strata, groups=subjects))
        return pool.iloc[keep], pool.iloc[held]
    counts = pd.Series(strata).value_counts()
    stratify = strata if counts.min() >= 2 and n >= len(counts) and len(pool) - n >= len(counts) else None
    keep, held = train_test_split(np.arange(len(pool)), test_size=n, stratify=stratify, random_state=seed)
    return pool.iloc[np.sort(keep)], pool.iloc[np.sort(held)]


def check_splits(splits: dict[str, pd.DataFrame], where: str = "") -> None:
    prefix = f"{where}: " if where else ""
    train_classes = set(splits["train"]["expression"]) - {-1}
    for name in ("val", "test"):
        if splits[name].empty:
            raise UserError(f"{prefix}the {name} split is empty; check data.split.{name}")
        unseen = sorted(set(splits[name]["expression"]) - {-1} - train_classes)
        if unseen:
            names = ", ".join(f"{c} ({EXPRESSIONS[c]})" for c in unseen)
            given = (splits[name]["source_split"] == name).any() if "source_split" in splits[name] else False
            fix = (f"add training images of those classes, or remove them from the dataset's own {name} split"
                   if given else "add training images of those classes")
            raise UserError(f"{prefix}the {name} split has expression classes the training split lacks: "
                            f"{names}; a model cannot learn them ({fix})")

