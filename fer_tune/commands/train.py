"""`fer-tune train`: one config, trained once, tested once, exported."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from fer_tune.data.prepare import prepare_data
from fer_tune.engine.artifacts import export_best, save_torch
from fer_tune.engine.device import choose_device
from fer_tune.engine.evaluate import evaluate_on_test, format_test
from fer_tune.engine.loop import TrainingDiverged, fit
from fer_tune.errors import UserError, one_line
from fer_tune.io import atomic_write_text, check_writable, folder_lock
from fer_tune.metrics import flat_metrics
from fer_tune.report import write_history, write_report
from fer_tune.report.tensorboard import log_epoch
from fer_tune.spec import Spec
from fer_tune.specfile import check_same_experiment, check_spec


def train_experiment(spec: Spec, out: Path, verbose: bool = True) -> dict:
    """Train one config into `out`, evaluate its best epoch once on the test split, export it."""
    started = time.time()
    spec = check_spec(spec, source=spec.name)  # a spec made in code is checked like a loaded one (cheap, idempotent)
    out = Path(out)
    if spec.space:
        print(f"note: {spec.name} has a space: section; `train` runs its base values "
              f"(`fer-tune run` searches it)")
    spec = spec.with_values({})
    check_same_experiment(spec, out, search=False)  # before anything is written there
    check_writable(out)
    with folder_lock(out):
        check_same_experiment(spec, out, search=False)  # again: another command may have finished meanwhile
        return _train(spec, out, verbose, started)


def _train(spec: Spec, out: Path, verbose: bool, started: float) -> dict:
    device = choose_device(spec.resources.use_gpu)
    atomic_write_text(out / "spec.yaml", spec.to_yaml())
    prepared = prepare_data(spec.data, out)
    train, val = prepared.load("train", verbose), prepared.load("val", verbose)
    say = print if verbose else (lambda *a, **k: None)
    say(f"{spec.name}: {spec.model.backbone} on {len(train)} train / {len(val)} val images at "
        f"{spec.data.image_size}px, device {device}; tasks: {', '.join(prepared.tasks)}")

    from torch.utils.tensorboard import SummaryWriter  # deferred: TensorBoard's import costs a second

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
        raise UserError(f"{one_line(err, limit=10_000)}: the recipe diverged; lower train.lr "
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


def format_epoch(m: dict, epochs: int) -> str:
    parts = [f"epoch {m['epoch']:>3}/{epochs}", f"loss {m['train_loss']:.4f}", f"train acc {m['train_accuracy']:.3f}"]
    for key, label in (("val_expression_accuracy", "val acc"), ("val_expression_f1", "val F1"),
                       ("val_valence_ccc", "val V-CCC"), ("val_arousal_ccc", "val A-CCC")):
        if key in m:
            parts.append(f"{label} {m[key]:.3f}")
    parts.append(f"objective {m['objective']:.4f}{' *' if m['best_epoch'] == m['epoch'] else ''}")
    parts.append(f"{m['epoch_seconds']:.1f}s")
    return "  ".join(parts)
