"""Splits: stratified, seeded, subject-disjoint, source test split honoured, never silently redrawn."""

import numpy as np
import pandas as pd
import pytest

from fer_tune.data.splits import make_splits
from fer_tune.data.prepare import _read_splits
from fer_tune.errors import UserError
from fer_tune.spec import SplitSpec


def table(n=400, subjects=False, source_test=0, classes=8, seed=0):
    rng = np.random.default_rng(seed)
    expression = np.arange(n) % classes
    rows = pd.DataFrame({
        "image": [f"img/{i:04d}.png" for i in range(n)], "expression": expression,
        "valence": rng.uniform(-1, 1, n), "arousal": np.nan,
        "subject": [f"s{i % 40}" for i in range(n)] if subjects else "",
        "source_split": ["test" if i < source_test else "train" for i in range(n)],
        "face_x": np.nan, "face_y": np.nan, "face_w": np.nan, "face_h": np.nan})
    return rows


def split(t, tmp_path, **kw):
    make_splits(t, SplitSpec(**kw), tmp_path / "splits")
    return _read_splits(tmp_path / "splits")


def test_counts_fractions_and_stratification(tmp_path):
    parts = split(table(), tmp_path, val=40, test=0.1, seed=3)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [320, 40, 40]
    for name in ("val", "test"):
        assert parts[name]["expression"].value_counts().tolist() == [5] * 8  # exactly stratified
    images = [set(parts[k]["image"]) for k in ("train", "val", "test")]
    assert not (images[0] & images[1]) and not (images[0] & images[2]) and not (images[1] & images[2])


def test_seeded(tmp_path):
    a = split(table(), tmp_path / "a", seed=1)
    b = split(table(), tmp_path / "b", seed=1)
    c = split(table(), tmp_path / "c", seed=2)
    assert a["test"]["image"].tolist() == b["test"]["image"].tolist()
    assert a["test"]["image"].tolist() != c["test"]["image"].tolist()


def test_subject_disjoint(tmp_path):
    parts = split(table(subjects=True), tmp_path, val=0.1, test=0.1)
    subjects = [set(parts[k]["subject"]) for k in ("train", "val", "test")]
    assert not (subjects[0] & subjects[1]) and not (subjects[0] & subjects[2]) and not (subjects[1] & subjects[2])
    assert 20 <= len(parts["test"]) <= 80


def test_source_test_split_is_used(tmp_path):
    parts = split(table(source_test=80), tmp_path, val=40, test=0.1)
    assert len(parts["test"]) == 80 and set(parts["test"]["source_split"]) == {"test"}
    assert len(parts["val"]) == 40 and "test" not in set(parts["train"]["source_split"])


def test_existing_split_reused_and_never_redrawn(tmp_path):
    first = split(table(), tmp_path, seed=0)
    again = split(table(), tmp_path, seed=0)
    assert first["test"]["image"].tolist() == again["test"]["image"].tolist()
    with pytest.raises(UserError, match="never redrawn silently"):
        split(table(), tmp_path, seed=5)
    with pytest.raises(UserError, match="different data"):
        split(table(seed=1), tmp_path, seed=0)


def test_sizes_larger_than_data(tmp_path):
    with pytest.raises(UserError, match="data.split.test: 500 images"):
        split(table(), tmp_path, test=500)


def test_test_class_missing_from_training(tmp_path):
    t = table(source_test=16)
    t.loc[t["source_split"] == "train", "expression"] = t.loc[t["source_split"] == "train", "expression"] % 7
    with pytest.raises(UserError, match=r"test split has expression classes the training split lacks: 7 \(contempt\)"):
        split(t, tmp_path, val=0.1)
