"""The files of an experiment folder, by name, and where a trained model is found.

    DIR/spec.yaml               the resolved spec          DIR/splits/{train,val,test}.csv, data.json
    DIR/best/config.yaml        the winner, re-runnable    DIR/best/model.pt (.ts, .onnx)
    DIR/report/                 metrics.json, report.md    DIR/tune/, DIR/optuna.db (searches)
    DIR/wall.json               a search's wall time, piece by piece (each run of the command is one)
    DIR/asha.json               a search's ASHA rungs, kept for --resume
    DIR/searches.json           a search's Tune experiments: tune/, and tune_2/... once extended
    DIR/final_runs.json         which runs each final phase trains (an extended one reuses earlier ones)

Every command that takes "a trained model" accepts the experiment folder, its best/ folder or
the model file itself; `find_model` is the one place that turns such a path into its files.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from fer_tune.errors import UserError

SPEC_FILE = "spec.yaml"
CONFIG_FILE = "config.yaml"
MODEL_FILE = "model.pt"
BEST_DIR = "best"
SPLITS_DIR = "splits"
DATA_FILE = "data.json"  # under splits/: tasks, labels and sizes of the prepared data
REPORT_DIR = "report"
WALL_FILE = "wall.json"  # a search's pieces (each run of the command): when each began, how long it ran
ASHA_FILE = "asha.json"  # a search's ASHA rungs, so that a --resume judges trials against every earlier result
PARTS_FILE = "searches.json"  # a search's Tune experiments (tune, then tune_2... per --resume that adds trials)
FINAL_RUNS_FILE = "final_runs.json"  # per final phase, the (trial, seed) runs it trains, in its own order


def check_model_exists(path: Path) -> Path:
    """`path` itself, if it exists. The commands check it before torch loads, so a mistyped path
    answers in a fraction of a second instead of after seconds of imports."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: does not exist; give an experiment folder, its best/ folder or "
                        f"a model.pt from `fer-tune train` or `fer-tune run`")
    return path


def find_model(path: Path) -> tuple[Path, Path]:
    """(config.yaml, model.pt) of an experiment folder, its best/ folder, or a model file."""
    path = check_model_exists(path)
    for folder in ([path / BEST_DIR, path] if path.is_dir() else [path.parent]):
        if (folder / CONFIG_FILE).is_file() and (folder / MODEL_FILE).is_file():
            return folder / CONFIG_FILE, folder / MODEL_FILE
    raise UserError(f"{path}: no trained model here (expected best/config.yaml and best/model.pt "
                    f"from `fer-tune train` or `fer-tune run`)")


def is_experiment(path: Path) -> bool:
    """Whether `path` names a finished experiment (a folder, or a model.pt with its config.yaml) rather than
    a weights file."""
    path = Path(path)
    return path.is_dir() or (path.name == MODEL_FILE and (path.parent / CONFIG_FILE).is_file())


def experiment_of(config: Path) -> Path:
    """The experiment folder a config.yaml belongs to (the folder above best/, or its own)."""
    config = Path(config)
    return config.parent.parent if config.parent.name == BEST_DIR else config.parent


def rerun_command(out: Path) -> str:
    """The command that retrains an experiment's winner, ready to paste. It names its own --out: the
    default, runs/<name>, is the experiment's folder when run where it ran, which `train` refuses to
    overwrite."""
    out = Path(out)
    if out.name in ("", ".."):  # `.` or `..`: the folder's own name, for DIR-again beside it
        out = out.resolve()
    again = out.parent / f"{out.name}-again"
    return f"fer-tune train {shlex.quote(str(out / BEST_DIR / CONFIG_FILE))} --out {shlex.quote(str(again))}"
