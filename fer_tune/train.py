"""`fer-tune train` and `fer-tune evaluate`: one config, trained once, tested once.

Also home to what a search reuses after its trials: the test evaluation of a best model and the
export of `best/` (a complete config that `fer-tune train` re-runs, plus the weights).
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from fer_tune import EXPRESSIONS
from fer_tune.data.prepare import PreparedData, open_prepared, prepare_data
from fer_tune.errors import UserError
from fer_tune.evaluate import evaluate_split
from fer_tune.io import atomic_write, atomic_write_json, atomic_write_text, check_writable  # noqa: F401 (search.py imports it from here)
from fer_tune.loop import TrainingDiverged, fit
from fer_tune.metrics import flat_metrics, predicted_classes
from fer_tune.model import create_model
from fer_tune.spec import Spec, load_spec


def choose_device(use_gpu) -> torch.device:
    if use_gpu is True and not torch.cuda.is_available():
        raise UserError("resources.use_gpu: true but no CUDA GPU is visible here; use auto or false")
    if use_gpu is not False and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def train_experiment(spec: Spec, out: Path, verbose: bool = True) -> dict:
    """Train one config into `out`, evaluate its best epoch once on the test split, export it."""
    started = time.time()
    out = Path(out)
    check_writable(out)
    device = choose_device(spec.resources.use_gpu)
    if spec.space:
        print(f"note: {spec.name} has a space: section; `train` runs its base values "
              f"(`fer-tune run` searches it)")
    spec = spec.with_values({})
    atomic_write_text(out / "spec.yaml", spec.to_yaml())
    prepared = prepare_data(spec.data, out)
    train, val = prepared.load("train", verbose), prepared.load("val", verbose)
    say = print if verbose else (lambda *a, **k: None)
    say(f"{spec.name}: {spec.model.backbone} on {len(train)} train / {len(val)} val images at "
        f"{spec.data.image_size}px, device {device}; tasks: {', '.join(prepared.tasks)}")

    from torch.utils.tensorboard import SummaryWriter

    from fer_tune.tensorboard import log_epoch

    writer = SummaryWriter(str(out / "tensorboard"))

    def report(metrics: dict, checkpoint: Optional[dict]) -> None:
        log_epoch(writer, metrics)
        if checkpoint is not None:
            save_torch(out / "checkpoints" / "last.pt", checkpoint)
        say(format_epoch(metrics, spec.train.epochs))

    try:
        result = fit(spec, train, val, prepared.labels, report, device=device,
                     progress=StepProgress() if verbose else None)
    except TrainingDiverged as err:
        raise UserError(f"{' '.join(str(err).split())}: the recipe diverged; lower train.lr "
                        f"(now {spec.train.lr:g}) or set train.grad_clip, e.g. --set train.grad_clip=1.0") from None
    finally:
        writer.close()
    export_best(out / "best", spec, result.best_model, prepared.labels)  # before the test: never lost
    metrics = evaluate_on_test(spec, prepared, result.best_model, device,
                              extra={"best_epoch": result.best_epoch,
                                     "val": flat_metrics(result.best_metrics.get("val", {})),
                                     "train_accuracy": result.best_metrics.get("train_accuracy"),
                                     "epochs_run": len(result.history),
                                     "wall_seconds": round(time.time() - started, 1)},
                              report_dir=out / "report")
    say(format_test(metrics, out / "report" / "metrics.json"))
    write_history(out / "report", {"train": result.history},
                  {"train": {"epoch": result.best_epoch, "matrix": result.best_metrics.get("val_confusion")}}
                  if result.best_metrics.get("val_confusion") else {})
    write_report(out, say)
    return metrics


class StepProgress:
    """A progress bar over one epoch's steps (shown on terminals only)."""

    def __init__(self):
        self.bar = None

    def __call__(self, epoch: int, step: int, steps: int, loss: float) -> None:
        from tqdm import tqdm

        if step == 1:
            self.bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="step", leave=False, disable=None)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step == steps:
            self.bar.close()


def evaluate_on_test(spec: Spec, prepared: PreparedData, weights: dict, device, extra: dict,
                    report_dir: Path) -> dict:
    """The only place the test split is read: load it, evaluate once, write metrics.json."""
    model = create_model(spec.model).to(device)
    model.load_state_dict(weights)
    test = prepared.load("test")
    metrics, preds = evaluate_split(model, test, prepared.labels, device)
    atomic_write_text(report_dir / "test_predictions.csv",
                      predictions_table(test, preds, prepared.labels).to_csv(index=False))
    metrics.update({"split": "test", "test_images": len(test), "labels": prepared.labels,
                    "data": {"source": spec.data.source, "root": str(spec.data.root or ""),
                             "image_size": spec.data.image_size, **prepared.info}, **extra})
    atomic_write_json(report_dir / "metrics.json", metrics)
    return metrics


def predictions_table(split, preds: dict, labels: list[int]) -> pd.DataFrame:
    """One row per test image: targets, predicted class, class probabilities, valence, arousal."""
    targets = split.targets()
    return pd.DataFrame({
        "image": split.table["image"].astype(str).to_numpy(),
        "expression": targets["expression"],
        "expression_pred": predicted_classes(preds["expression"], labels),
        **{f"p_{name}": preds["expression"][:, i] for i, name in enumerate(EXPRESSIONS)},
        "valence": targets["valence"], "valence_pred": preds["valence"],
        "arousal": targets["arousal"], "arousal_pred": preds["arousal"]})


def write_history(report_dir: Path, histories: dict[str, list[dict]], confusions: dict[str, dict]) -> None:
    """Per-epoch metrics of every trial (history.csv) and each one's best val confusion matrix."""
    rows = [{"trial_id": trial_id, **{k: v for k, v in epoch.items() if not isinstance(v, (list, dict))}}
            for trial_id, epochs in histories.items() for epoch in epochs]
    atomic_write_text(report_dir / "history.csv", pd.DataFrame(rows).to_csv(index=False))
    atomic_write_json(report_dir / "val_confusion.json", confusions)


def write_report(out: Path, say=print) -> None:
    """The markdown report and plots; a failure here is reported but never undoes the run."""
    from fer_tune.report import build_report

    try:
        path = build_report(out)
    except Exception as err:  # noqa: BLE001 - the experiment itself is already safely written
        say(f"warning: the report could not be written ({type(err).__name__}: "
              f"{' '.join(str(err).split())[:200]}); retry with `fer-tune report {out}`")
        return
    say(f"report: {path}")


def export_best(best_dir: Path, spec: Spec, weights: dict, labels: list[int]) -> None:
    """`best/config.yaml` (complete, no space: re-runnable as is) and `best/model.pt`."""
    spec = spec.with_values({})
    atomic_write_text(best_dir / "config.yaml",
                      f"# exported by fer-tune: `fer-tune train {best_dir / 'config.yaml'}` re-runs it\n"
                      + spec.to_yaml())
    save_torch(best_dir / "model.pt", {"model": weights, "labels": labels, "spec": spec.model_dump(mode="json")})


def save_torch(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: Path):
    """Checkpoints and exported weights never unpickle arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model_file(weights_file: Path, spec: Spec, config: Path) -> dict:
    """An exported model.pt, checked to load into the network its config describes."""
    try:
        saved = load_torch(weights_file)
        weights = saved["model"]
    except pickle.UnpicklingError:
        reason = "not a torch file of tensors"
        raise UserError(f"{weights_file}: not a readable model file ({reason}); expected best/model.pt "
                        f"as exported by `fer-tune train` or `fer-tune run`") from None
    except Exception as err:  # torch raises many kinds (RuntimeError, EOFError, KeyError...)
        reason = " ".join(str(err).split()).split(". ")[0][:120] or type(err).__name__
        raise UserError(f"{weights_file}: not a readable model file ({reason}); expected best/model.pt "
                        f"as exported by `fer-tune train` or `fer-tune run`") from None
    expected = create_model(spec.model).state_dict()
    if not isinstance(weights, dict):
        raise UserError(f"{weights_file}: holds no model weights; expected best/model.pt as exported by "
                        f"`fer-tune train` or `fer-tune run`")
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [k for k in expected if k in weights and tuple(getattr(weights[k], "shape", ())) !=
                tuple(expected[k].shape)]
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0]
        raise UserError(f"{weights_file}: the weights do not fit model.backbone '{spec.model.backbone}' of "
                        f"{config} ({len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} "
                        f"mis-shaped tensors, e.g. '{example}'); evaluate with the config.yaml saved beside them")
    return saved


def find_model(path: Path) -> tuple[Path, Path]:
    """(config.yaml, model.pt) of an experiment folder, its best/ folder, or a model file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: does not exist; give an experiment folder, its best/ folder or "
                        f"a model.pt from `fer-tune train` or `fer-tune run`")
    for folder in ([path / "best", path] if path.is_dir() else [path.parent]):
        if (folder / "config.yaml").is_file() and (folder / "model.pt").is_file():
            return folder / "config.yaml", folder / "model.pt"
    raise UserError(f"{path}: no trained model here (expected best/config.yaml and best/model.pt "
                    f"from `fer-tune train` or `fer-tune run`)")


def evaluate_model(model_path: Path, overrides: list[str], out: Optional[Path]) -> dict:
    """Evaluate a trained model on the test split of its own data, or of data named by --set."""
    config, weights_file = find_model(model_path)
    spec = load_spec(config, overrides)
    saved = load_model_file(weights_file, spec, config)
    run_dir = config.parent.parent if config.parent.name == "best" else config.parent
    own = load_spec(config).data == spec.data and (run_dir / "splits" / "data.json").exists()
    tag = "own-test" if own else f"{spec.data.source}-{spec.data.image_size}px"
    out = Path(out) if out else run_dir / "evaluate" / tag
    check_writable(out)
    prepared = open_prepared(spec.data, run_dir) if own else prepare_data(spec.data, out)
    device = choose_device(spec.resources.use_gpu)
    metrics = evaluate_on_test(spec, prepared, saved["model"], device, extra={"model": str(weights_file)},
                              report_dir=out)
    print(format_test(metrics, out / "metrics.json"))
    return metrics


def format_epoch(m: dict, epochs: int) -> str:
    parts = [f"epoch {m['epoch']:>3}/{epochs}", f"loss {m['train_loss']:.4f}", f"train acc {m['train_accuracy']:.3f}"]
    for key, label in (("val_expression_accuracy", "val acc"), ("val_expression_f1", "val F1"),
                       ("val_valence_ccc", "val V-CCC"), ("val_arousal_ccc", "val A-CCC")):
        if key in m:
            parts.append(f"{label} {m[key]:.3f}")
    parts.append(f"objective {m['objective']:.4f}{' *' if m['best_epoch'] == m['epoch'] else ''}")
    parts.append(f"{m['epoch_seconds']:.1f}s")
    return "  ".join(parts)


def format_test(metrics: dict, out: Path) -> str:
    lines = [f"test ({metrics['test_images']} images):"]
    for task in ("expression", "valence", "arousal"):
        if task in metrics:
            values = ", ".join(f"{k} {v:.4f}" for k, v in metrics[task].items())
            lines.append(f"  {task}: {values}")
    if metrics.get("missing_tasks"):
        lines.append(f"  not measured (no labels in this data): {', '.join(metrics['missing_tasks'])}")
    lines.append(f"  written to {out}")
    return "\n".join(lines)
