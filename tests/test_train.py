"""`fer-tune train` / `evaluate` end to end on tiny data, and the test split's isolation."""

import json

import pandas as pd
import pytest
import torch
from PIL import Image

from fer_tune.cli import main
from fer_tune.data.synthetic import render_face, sample_faces
from fer_tune.specfile import load_spec

from conftest import write_spec


def test_train_synthetic_end_to_end(tiny_spec, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(tiny_spec), "--out", str(out)]) == 0
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics["expression"]) == {"accuracy", "f1_macro", "kappa", "auc_roc", "auc_pr"}
    for task in ("valence", "arousal"):
        assert set(metrics[task]) == {"rmse", "pcc", "sagr", "ccc"}
    assert metrics["missing_tasks"] == []
    lo, hi = metrics["ci95"]["expression"]["accuracy"]
    assert lo <= metrics["expression"]["accuracy"] <= hi
    assert metrics["test_images"] == len(pd.read_csv(out / "splits" / "test.csv"))
    assert 1 <= metrics["best_epoch"] <= 2 and metrics["epochs_run"] == 2

    exported = load_spec(out / "best" / "config.yaml")
    assert exported.space == {} and exported.model.backbone == "resnet10t"
    saved = torch.load(out / "best" / "model.pt", weights_only=True)
    assert saved["labels"] == list(range(8))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # evaluate reads the same test split and the same weights: the same numbers
    assert main(["evaluate", str(out), "--out", str(tmp_path / "eval")]) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["expression"] == pytest.approx(metrics["expression"])
    assert again["valence"] == pytest.approx(metrics["valence"])


def make_folder_dataset(root, per_class=12, classes=("happy", "sad", "Angry")):
    """A class-folder dataset (train/ and test/) of synthetic faces: expression labels only."""
    table = sample_faces(400, seed=7)
    ids = {"happy": 1, "sad": 2, "angry": 6}
    for split, count in (("train", per_class), ("test", 4)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            rows = table[table["true_expression"] == ids[name.lower()]]
            rows = rows.iloc[:count] if split == "train" else rows.iloc[-count:]
            for i, row in enumerate(rows.itertuples(index=False)):
                image = render_face(row._asdict(), 32)[..., 0]  # grayscale, like FER2013
                Image.fromarray(image).save(folder / f"{i}.jpg")
    (root / "train" / "happy" / "notes.txt").write_text("not an image")
    return root


def test_train_folder_source_lists_missing_tasks(tmp_path):
    root = make_folder_dataset(tmp_path / "faces")
    spec = write_spec(tmp_path / "spec.yaml", data={"source": "folder", "root": str(root), "image_size": 24,
                                                    "split": {"val": 6, "test": 0.1, "seed": 0}},
                      train={"epochs": 1, "batch_size": 16})
    out = tmp_path / "run"
    assert main(["train", str(spec), "--out", str(out)]) == 0
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert metrics["missing_tasks"] == ["valence", "arousal"]
    assert "valence" not in metrics and "expression" in metrics
    assert metrics["labels"] == [1, 2, 6] and metrics["test_images"] == 12
    assert metrics["data"]["dropped"] == {"non-image files": 1}


def test_test_split_is_read_only_by_the_final_evaluation(tiny_spec, tmp_path, monkeypatch):
    import fer_tune.data.cache as cache
    import fer_tune.commands.train as train

    reads, phase = [], {"now": "before"}
    original_read, original_fit = cache.read_image, train.fit

    def recording_read(data, row, **kw):
        reads.append((phase["now"], row["image"]))
        return original_read(data, row, **kw)

    def fit_then_mark(*args, **kwargs):
        result = original_fit(*args, **kwargs)
        phase["now"] = "after fit"
        return result

    monkeypatch.setattr(cache, "read_image", recording_read)
    monkeypatch.setattr(train, "fit", fit_then_mark)
    out = tmp_path / "run"
    assert main(["train", str(tiny_spec), "--out", str(out)]) == 0
    test_images = set(pd.read_csv(out / "splits" / "test.csv")["image"])
    read_before = {image for when, image in reads if when == "before"}
    read_after = {image for when, image in reads if when == "after fit"}
    assert read_before and not (read_before & test_images)
    assert read_after == test_images


def test_evaluate_a_synthetic_model_on_other_data(tiny_spec, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(tiny_spec), "--out", str(out), "--set", "train.epochs=1"]) == 0
    root = make_folder_dataset(tmp_path / "faces", per_class=6)
    assert main(["evaluate", str(out / "best"), "--set", "data.source=folder", "--set", f"data.root={root}",
                 "--set", "data.split.val=3", "--out", str(tmp_path / "cross")]) == 0
    metrics = json.loads((tmp_path / "cross" / "metrics.json").read_text())
    assert metrics["missing_tasks"] == ["valence", "arousal"]
    assert metrics["test_images"] == 12 and metrics["labels"] == [1, 2, 6]


def test_evaluate_on_data_that_is_only_a_test_set(tiny_spec, tmp_path, capsys):
    """Cross-dataset evaluation draws no train or val split: a test/ folder alone, class folders
    without one, or a CSV: the dataset's own test split if it has one, else all of it."""
    import shutil

    out = tmp_path / "run"
    assert main(["train", str(tiny_spec), "--out", str(out), "--set", "train.epochs=1"]) == 0
    root = make_folder_dataset(tmp_path / "faces", per_class=6)
    shutil.rmtree(root / "train")  # only test/<class>/ is left
    assert main(["evaluate", str(out), "--set", "data.source=folder", "--set", f"data.root={root}",
                 "--out", str(tmp_path / "only-test")]) == 0
    metrics = json.loads((tmp_path / "only-test" / "metrics.json").read_text())
    assert metrics["test_images"] == 12 and metrics["labels"] == [1, 2, 6]
    assert "own test split (12 of 12 images)" in metrics["data"]["test_split"]
    flat = tmp_path / "flat"
    shutil.copytree(root / "test", flat)  # class folders, no split folder at all
    assert main(["evaluate", str(out), "--set", "data.source=folder", "--set", f"data.root={flat}",
                 "--out", str(tmp_path / "whole")]) == 0
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["test_images"] == 12 and "the whole dataset (12 images)" in metrics["data"]["test_split"]
    assert "test: the whole dataset (12 images): it is only a test set here" in capsys.readouterr().out
    rows = [{"path": f"{p.parent.name}/{p.name}", "expression": {"happy": 1, "sad": 2, "Angry": 6}[p.parent.name]}
            for p in sorted(flat.rglob("*.jpg"))]
    pd.DataFrame(rows).to_csv(flat / "labels.csv", index=False)
    assert main(["evaluate", str(out), "--set", "data.source=csv", "--set", f"data.root={flat / 'labels.csv'}",
                 "--out", str(tmp_path / "csv")]) == 0
    assert json.loads((tmp_path / "csv" / "metrics.json").read_text())["test_images"] == 12


def test_an_interrupted_training_resumes_to_the_same_model(tmp_path, monkeypatch, capsys):
    """Ctrl-C after epoch 2 of 3 keeps epochs 1-2; `--resume` trains epoch 3 only and ends where an
    uninterrupted run ends; without --resume the folder is not started over."""
    import fer_tune.commands.train as train_command

    spec = str(write_spec(tmp_path / "s.yaml", train={"epochs": 3, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0}))
    assert main(["train", spec, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "report" / "metrics.json").read_text())

    shown = train_command.format_epoch

    def ctrl_c_after_epoch_2(metrics, epochs):
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt
        return shown(metrics, epochs)

    out = tmp_path / "cut"
    monkeypatch.setattr(train_command, "format_epoch", ctrl_c_after_epoch_2)
    assert main(["train", spec, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"fer-tune: interrupted during epoch 3; epochs 1-2 are kept in "
                                f"{out / 'checkpoints' / 'last.pt'}: resume with the same command plus --resume"]
    monkeypatch.setattr(train_command, "format_epoch", shown)

    assert main(["train", spec, "--out", str(out)]) == 2  # not started over unasked
    assert "holds an unfinished training (epoch 2 of 3): add --resume" in capsys.readouterr().err
    assert main(["train", spec, "--out", str(out), "--resume"]) == 0
    assert "resuming after epoch 2 of 3" in capsys.readouterr().out
    resumed = json.loads((out / "report" / "metrics.json").read_text())
    history = pd.read_csv(out / "report" / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3] and history["resumed_from_epoch"].tolist() == [0, 0, 2]
    assert resumed["best_epoch"] == whole["best_epoch"] and resumed["epochs_run"] == 3
    assert resumed["val"]["expression_f1"] == pytest.approx(whole["val"]["expression_f1"], abs=1e-6)
    assert resumed["expression"]["accuracy"] == pytest.approx(whole["expression"]["accuracy"], abs=1e-6)

    assert main(["train", spec, "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "--resume: " in capsys.readouterr().err
