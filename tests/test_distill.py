"""Knowledge distillation (`distill:` / `fer-tune distill`), and one `fit` with every option on.

A teacher is trained once for the module (2 epochs of test_resnet at 32 px) and exported like
`fer-tune train` does; students learn from it.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from sklearn.metrics import cohen_kappa_score

from fer_tune.cli import main
from fer_tune.data.prepare import prepare_data
from fer_tune.engine.teacher import load_teacher
from fer_tune.engine.evaluate import predict
from fer_tune.engine.loop import fit
from fer_tune.model import create_model
from fer_tune.spec import validate_spec
from fer_tune.engine.artifacts import export_best

from conftest import write_spec

CPU = torch.device("cpu")
BASE = {"name": "teacher",
        "data": {"source": "synthetic", "image_size": 32, "synthetic": {"n": 400, "identities": 40},
                 "split": {"val": 64, "test": 16, "seed": 0}},
        "model": {"backbone": "test_resnet", "dropout": 0.0},
        "train": {"epochs": 2, "batch_size": 32, "lr": 5e-3, "warmup_epochs": 0},
        "augment": {"strength": 0.0}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(teacher folder, train split, val split, labels) from one short `fit`, exported to best/."""
    folder = tmp_path_factory.mktemp("teacher")
    spec = validate_spec(BASE)
    prepared = prepare_data(spec.data, folder)
    train, val = prepared.load("train", False), prepared.load("val", False)
    result = fit(spec, train, val, prepared.labels, lambda metrics, checkpoint: None)
    export_best(folder / "best", spec, result.best_model, prepared.labels)
    return folder, train, val, prepared.labels


def student_spec(teacher_dir, **train):
    return validate_spec({**BASE, "name": "student", "train": {**BASE["train"], **train},
                          "distill": {"teacher": str(teacher_dir), "alpha": 1.0, "temperature": 1.0}})


def test_student_matches_the_teacher_better_than_chance(teacher):
    folder, train, val, labels = teacher
    # Hide every label: whatever the student learns about expressions comes from the teacher.
    unlabelled = dataclasses.replace(train, table=train.table.assign(expression=-1, valence=np.nan, arousal=np.nan))
    spec = student_spec(folder, epochs=4)
    last = {}
    fit(spec, unlabelled, val, labels, lambda metrics, checkpoint: last.update(checkpoint))
    student, untrained = create_model(spec.model), create_model(spec.model)
    student.load_state_dict(last["model"])
    mentor = load_teacher(folder, CPU)
    t, s, u = (predict(m, val, CPU) for m in (mentor.model, student, untrained))

    agreement = cohen_kappa_score(t["expression"].argmax(1), s["expression"].argmax(1))  # 0 = chance
    assert agreement > 0.05, agreement

    def kl(p, q):
        return F.kl_div(torch.log(torch.tensor(q)), torch.tensor(p), reduction="batchmean").item()

    assert kl(t["expression"], s["expression"]) < 0.5 * kl(t["expression"], u["expression"])
    for task in ("valence", "arousal"):  # the teacher's valence and arousal are targets too
        assert np.mean((t[task] - s[task]) ** 2) < 0.5 * np.mean((t[task] - u[task]) ** 2), task


def test_teacher_heads_without_labels_are_not_targets(teacher, tmp_path):
    folder, *_ = teacher
    assert load_teacher(folder, CPU).tasks == ("expression", "valence", "arousal")
    assert load_teacher(folder / "best" / "model.pt", CPU).image_size == 32
    # the same model, as if its data had had no valence/arousal labels
    (tmp_path / "best").mkdir()
    for name in ("config.yaml", "model.pt"):
        (tmp_path / "best" / name).write_bytes((folder / "best" / name).read_bytes())
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "data.json").write_text(json.dumps({"tasks": ["expression"]}))
    assert load_teacher(tmp_path, CPU).tasks == ("expression",)


def test_fit_with_every_option_on(teacher):
    folder, train, val, labels = teacher
    spec = validate_spec({**BASE, "name": "everything",
                          "model": {**BASE["model"], "attention": "cbam", "neck": "fpn", "neck_channels": 16},
                          "train": {**BASE["train"], "sampler": "class_balanced", "class_weights": True,
                                    "mixup_alpha": 0.4, "cutmix_alpha": 1.0, "schedule": "onecycle",
                                    "warmup_epochs": 0.5, "ema_decay": 0.99, "grad_clip": 1.0, "label_smoothing": 0.1},
                          "loss": {"weighting": "uncertainty", "regression": "ccc"},
                          "distill": {"teacher": str(folder), "alpha": 0.5, "temperature": 4.0}})
    checkpoints, history = [], []

    def report(metrics, checkpoint):
        history.append(metrics)
        checkpoints.append({k: checkpoint[k] for k in ("ema", "uncertainty", "model", "best_model", "best_epoch")})

    result = fit(spec, train, val, labels, report)
    assert [m["epoch"] for m in history] == [1, 2] and history[-1]["finished"]
    assert all(np.isfinite(m["train_loss"]) and np.isfinite(m["objective"]) for m in history)
    assert history[-1]["lr"] < spec.train.lr / 25  # one-cycle: annealed below its starting lr
    last = checkpoints[-1]
    assert not torch.equal(last["uncertainty"]["log_vars"], torch.zeros(3))
    assert {"task_weight_expression", "task_weight_valence", "task_weight_arousal"} <= set(history[-1])
    best_ema = checkpoints[result.best_epoch - 1]["ema"]
    assert all(torch.equal(result.best_model[k], best_ema[k]) for k in best_ema)  # validated and kept: the EMA
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["ema"])
    assert any(k.startswith("neck.") for k in result.best_model) and any(k.startswith("attention.") for k in result.best_model)


def test_distill_command(teacher, tmp_path, capsys):
    folder, *_ = teacher
    spec = write_spec(tmp_path / "student.yaml", name="student",
                      data={"image_size": 32, "synthetic": {"n": 120, "identities": 30}},
                      model={"backbone": "test_resnet", "dropout": 0.0}, train={"epochs": 1, "batch_size": 32})
    out = tmp_path / "run"
    assert main(["distill", str(folder), str(spec), "--out", str(out), "--set", "distill.temperature=2"]) == 0
    exported = yaml.safe_load((out / "best" / "config.yaml").read_text())
    assert exported["distill"] == {"teacher": str(folder.resolve()), "temperature": 2.0, "alpha": 0.5}
    assert json.loads((out / "report" / "metrics.json").read_text())["test_images"] > 0

    capsys.readouterr()
    assert main(["distill", str(tmp_path / "nowhere"), str(spec), "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fer-tune: error: ") and "nowhere: does not exist" in err and "\n" not in err
