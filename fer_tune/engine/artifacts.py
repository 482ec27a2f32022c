"""What training leaves behind, written and read back in one place.

Written: checkpoints (`save_torch`) and `best/` (`export_best`: a complete config.yaml that
`fer-tune train` re-runs as is, and model.pt with the weights, labels and spec).

Read: `find_trained` is the one reader of a trained model, used by `evaluate`, `export`,
`predict` and distillation's teacher. It takes what a user points at (an experiment folder,
its best/ folder, or a model.pt / model.ts / model.onnx) and reads config.yaml only as far as
running the model needs it: the model and loss sections and the image size. Data paths and the
backbone's pretrained-weights file belong to training and are dropped, so a best/ folder copied
to another machine, or whose dataset has moved away, still loads.
"""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from fer_tune import TASKS
from fer_tune.errors import UserError, one_line
from fer_tune.io import atomic_write, atomic_write_text, read_yaml
from fer_tune.layout import (CONFIG_FILE, DATA_FILE, MODEL_FILE, SPLITS_DIR, experiment_of, find_model,
                             rerun_command)
from fer_tune.model import MultiTaskNet, create_model
from fer_tune.spec import Spec, validate_spec
from fer_tune.specfile import check_spec

EXPORTED_SUFFIXES = (".ts", ".onnx")
"""Model files `fer-tune export` writes beside model.pt (see `fer_tune.engine.runtime`)."""


# ----------------------------------------------------------------------------- writing


def save_torch(path: Path, obj) -> None:
    """`torch.save` through `atomic_write`. torch reports a full disk as a RuntimeError of its
    stream writer; it is raised as the OSError it is, so the CLI says it in one line."""
    def write(tmp: Path) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            if shutil.disk_usage(tmp.parent).free < 64 * 2**20:
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from err
            raise

    atomic_write(path, write)


def load_torch(path: Path):
    """Checkpoints and exported weights never unpickle arbitrary objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def export_best(best_dir: Path, spec: Spec, weights: dict, labels: list[int]) -> None:
    """`best/config.yaml` (complete, no space: re-runnable as is) and `best/model.pt`."""
    spec = spec.with_values({})
    atomic_write_text(best_dir / CONFIG_FILE,
                      f"# exported by fer-tune: `{rerun_command(best_dir.parent)}` re-runs it\n"
                      + spec.to_yaml())
    save_torch(best_dir / MODEL_FILE, {"model": weights, "labels": labels, "spec": spec.model_dump(mode="json")})


# ----------------------------------------------------------------------------- reading


@dataclass
class TrainedModel:
    """A trained model as fer-tune wrote it: its config.yaml, its model file, and what running it needs."""

    config: Path        # best/config.yaml (or the config.yaml beside an exported model file)
    model_file: Path    # model.pt, model.ts or model.onnx
    spec: Spec          # config.yaml's model and loss sections and image size (see the module docstring)
    _saved: Optional[dict] = field(default=None, repr=False)

    @property
    def experiment(self) -> Path:
        """The experiment folder the model belongs to (where its splits/ and report/ are)."""
        return experiment_of(self.config)

    @property
    def image_size(self) -> int:
        return self.spec.data.image_size

    @property
    def tasks(self) -> tuple[str, ...]:
        """Heads it was trained on: a loss weight > 0 and labels in its data (splits/data.json)."""
        tasks = [t for t in TASKS if getattr(self.spec.loss, t) > 0]
        data_json = self.experiment / SPLITS_DIR / DATA_FILE
        if data_json.is_file():
            measured = json.loads(data_json.read_text()).get("tasks", TASKS)
            tasks = [t for t in tasks if t in measured]
        return tuple(tasks)

    def saved(self) -> dict:
        """model.pt's contents, checked to load into the network config.yaml describes."""
        if self._saved is None:
            if self.model_file.suffix != ".pt":
                raise UserError(f"{self.model_file}: an exported model holds no PyTorch weights; give the "
                                f"model.pt beside it, or its best/ folder")
            self._saved = check_weights(self.model_file, self.spec, self.config)
        return self._saved

    @property
    def weights(self) -> dict:
        return self.saved()["model"]

    def network(self) -> MultiTaskNet:
        """The network with its trained weights, in eval mode on the CPU."""
        net = create_model(self.spec.model)
        net.load_state_dict(self.weights)
        return net.eval()


def find_trained(path: Path, exported: bool = False) -> TrainedModel:
    """The trained model at `path`: an experiment folder, its best/ folder or a model.pt (with
    `exported`, also a model.ts or model.onnx, whose config.yaml must sit beside it)."""
    path = Path(path)
    if exported and path.is_file() and path.suffix in EXPORTED_SUFFIXES:
        config = path.parent / CONFIG_FILE
        if not config.is_file():
            raise UserError(f"{path}: no config.yaml beside it; keep the exported model in the best/ "
                            f"folder it was exported into (config.yaml gives its image size)")
        return TrainedModel(config, path, inference_spec(config))
    if exported and path.is_file() and path.suffix != ".pt":
        raise UserError(f"{path}: not a model file (expected model.pt, model.ts or model.onnx, or an "
                        f"experiment folder)")
    config, model_file = find_model(path)
    return TrainedModel(config, model_file, inference_spec(config))


def inference_spec(config: Path) -> Spec:
    """The spec of `config.yaml` as far as running the model needs it (see the module docstring)."""
    raw = read_yaml(config)
    if not isinstance(raw.get("model"), dict):
        raise UserError(f"{config}: not an exported config (no model: section)")
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    kept = {"model": {**raw["model"], "pretrained": None},
            "data": {"image_size": data["image_size"]} if "image_size" in data else {}}
    if isinstance(raw.get("loss"), dict):
        kept["loss"] = raw["loss"]
    return check_spec(validate_spec(kept, source=str(config)), source=str(config), sections=("model",))


def check_weights(weights_file: Path, spec: Spec, config: Path) -> dict:
    """An exported model.pt, checked to load into the network its config describes."""
    try:
        saved = load_torch(weights_file)
        weights = saved["model"]
    except pickle.UnpicklingError:
        reason = "not a torch file of tensors"
        raise UserError(f"{weights_file}: not a readable model file ({reason}); expected best/model.pt "
                        f"as exported by `fer-tune train` or `fer-tune run`") from None
    except Exception as err:  # torch raises many kinds (RuntimeError, EOFError, KeyError...)
        reason = one_line(err, limit=10_000).split(". ")[0][:120] or type(err).__name__
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
