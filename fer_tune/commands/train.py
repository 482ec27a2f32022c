"""`fer-tune train`: one config, trained once, tested once, exported."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from fer_tune.data.prepare import prepare_data
from fer_tune.engine.artifacts import export_best, load_torch, save_torch
from fer_tune.engine.device import choose_device
from fer_tune.engine.evaluate import evaluate_on_test, format_test
from fer_tune.engine.loop import FitResult, TrainingDiverged, fit
from fer_tune.errors import Interrupted, UserError, one_line
from fer_tune.io import atomic_write_text, check_writable, folder_lock
from fer_tune.metrics import flat_metrics
from fer_tune.report import write_history, write_report
from fer_tune.report.tensorboard import log_epoch
from fer_tune.spec import Spec
from fer_tune.specfile import check_same_experiment, check_spec

CHECKPOINT = Path("checkpoints") / "last.pt"
"""Where `train` keeps every epoch's state (what `--resume` goes on from), inside the experiment folder."""


def train_experiment(spec: Spec, out: Path, verbose: bool = True, resume: bool = False) -> dict:
    """Train one config into `out`, evaluate its best epoch once on the test split, export it.

    Every epoch leaves `out/checkpoints/last.pt`; `resume` goes on from it (a long run on a CPU,
    or one stopped by Ctrl-C), and a folder whose training was interrupted is never started
    over without being asked.
    """
    started = time.time()
    spec = check_spec(spec, source=spec.name)  # a spec made in code is checked like a loaded one (cheap, idempotent)
    out = Path(out)
    if spec.space:
        print(f"note: {spec.name} has a space: section; `train` runs its base values "
              f"(`fer-tune run` searches it)")
    spec = spec.with_values({})
    check_same_experiment(spec, out, resume, search=False)  # before anything is written there
    check_writable(out)
    with folder_lock(out):
        check_same_experiment(spec, out, resume, search=False)  # again: another command may have finished meanwhile
        return _train(spec, out, verbose, started, last_checkpoint(out, resume))


def last_checkpoint(out: Path, resume: bool) -> Optional[dict]:
    """With `resume`, the interrupted training's last epoch; without, None, after making sure no
    unfinished training would be started over."""
    path = out / CHECKPOINT
    if not path.is_file():
        if resume:
            raise UserError(f"--resume: {out} holds no epoch to resume from ({CHECKPOINT}); train without --resume")
        return None
    try:
        state = load_torch(path)
        done = state["history"][-1]
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is the same answer
        if resume:
            raise UserError(f"--resume: {path} is unreadable ({one_line(err, limit=120)}); train without --resume "
                            f"into another --out") from None
        return None
    if resume:
        return state
    if not done.get("finished"):
        raise UserError(f"{out} holds an unfinished training (epoch {done['epoch']} of {state['spec']['train']['epochs']}"
                        f"): add --resume to go on from it, or use another --out")
    return None


def _train(spec: Spec, out: Path, verbose: bool, started: float, resume: Optional[dict]) -> dict:
    device = choose_device(spec.resources.use_gpu)
    atomic_write_text(out / "spec.yaml", spec.to_yaml())
    prepared = prepare_data(spec.data, out)
    train, val = prepared.load("train", verbose), prepared.load("val", verbose)
    say = print if verbose else (lambda *a, **k: None)
    say(f"{spec.name}: {spec.model.backbone} on {len(train)} train / {len(val)} val images at "
        f"{spec.data.image_size}px, device {device}; tasks: {', '.join(prepared.tasks)}")

    from torch.utils.tensorboard import SummaryWriter  # deferred: TensorBoard's import costs a second

    writer = SummaryWriter(str(out / "tensorboard"))
    earlier_wall = float(resume.get("wall_seconds", 0.0)) if resume else 0.0  # of the pieces before this one
    done = resume["epoch"] if resume else 0

    def report(metrics: dict, checkpoint: Optional[dict]) -> None:
        nonlocal done
        log_epoch(writer, metrics)
        if checkpoint is not None:
            save_torch(out / CHECKPOINT, {**checkpoint, "wall_seconds": earlier_wall + time.time() - started})
        done = metrics["epoch"]
        say(format_epoch(metrics, spec.train.epochs))

    try:
        if resume and resume["history"][-1].get("finished"):  # stopped after its training, before the test
            say(f"resuming: the training had finished (epoch {resume['epoch']}); testing its best epoch")
            result = FitResult(resume["best_model"], resume["best_metrics"], resume["best_epoch"], resume["history"])
        else:
            if resume:
                say(f"resuming after epoch {resume['epoch']} of {spec.train.epochs}")
            result = fit(spec, train, val, prepared.labels, report, device=device, resume=resume,
                         progress=StepProgress() if verbose else None)
    except TrainingDiverged as err:
        raise UserError(f"{one_line(err, limit=10_000)}: the recipe diverged; lower train.lr "
                        f"(now {spec.train.lr:g}) or set train.grad_clip, e.g. --set train.grad_clip=1.0") from None
    except KeyboardInterrupt:
        kept = f"epochs 1-{done} are kept in {out / CHECKPOINT}" if done else "no epoch had finished"
        raise Interrupted(f"interrupted during epoch {done + 1}; {kept}: "
                          f"{'resume with the same command plus --resume' if done else 'start it again'}") from None
    finally:
        writer.close()
    export_best(out / "best", spec, result.best_model, prepared.labels)  # before the test: never lost
    metrics = evaluate_on_test(spec, prepared, result.best_model, device,
                              extra={"best_epoch": result.best_epoch,
                                     "val": flat_metrics(result.best_metrics.get("val", {})),
                                     "train_accuracy": result.best_metrics.get("train_accuracy"),
                                     "epochs_run": len(result.history),
                                     "wall_seconds": round(earlier_wall + time.time() - started, 1)},
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
