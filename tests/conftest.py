import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
FER2013 = REPO.parent / "shared" / "data" / "fer2013-4k"


def write_spec(path: Path, **sections) -> Path:
    """A tiny synthetic experiment (seconds on a CPU), with sections overridden by keyword."""
    spec = {
        "name": "tiny",
        "data": {"source": "synthetic", "image_size": 24, "synthetic": {"n": 160, "identities": 40},
                 "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        "model": {"backbone": "resnet10t", "dropout": 0.1},
        "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0},
        "augment": {"strength": 0.2},
        # no final phase unless a test is about it (tests/test_search.py's shared search is): it
        # re-trains finalists at full budget, minutes of a 2-core suite that test something else
        "search": {"finalists": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def tiny_spec(tmp_path) -> Path:
    return write_spec(tmp_path / "tiny.yaml")
