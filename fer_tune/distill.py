"""Knowledge distillation: a finished experiment's best model teaches a (smaller) student.

Not a second training loop: `distill:` is a spec section that `fit` honours (it loads the teacher
once and adds `losses.distillation_loss` to every step), so `fer-tune train` trains one student
and `fer-tune run` searches the student's own `space:` (distill.temperature and distill.alpha
are searchable too). `fer-tune distill TEACHER SPEC` is exactly that with `distill.teacher` set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fer_tune.losses import TASKS
from fer_tune.model import create_model
from fer_tune.spec import Spec, load_spec, read_yaml, set_path, validate_spec
from fer_tune.train import find_model, load_model_file


@dataclass
class Teacher:
    """A frozen, evaluating model that sees the student's batch at its own training size."""

    model: nn.Module
    image_size: int
    tasks: tuple[str, ...]  # heads it was trained on; the others are not used as targets

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return self.model(images)


def load_teacher(path: Path, device: torch.device) -> Teacher:
    """The best model of a finished experiment (folder, best/ folder or model.pt), frozen.

    Only its `model:` and `loss:` sections are read, so a teacher whose dataset has moved away
    still loads; its weights are checked against its config like `fer-tune evaluate` does.
    """
    config, weights_file = find_model(Path(path))
    raw = read_yaml(config)
    model_raw = {**(raw.get("model") or {}), "pretrained": None}  # model.pt holds every weight
    spec = validate_spec({"model": model_raw, "loss": raw.get("loss") or {}}, source=str(config))
    saved = load_model_file(weights_file, spec, config)
    model = create_model(spec.model)
    model.load_state_dict(saved["model"])
    model.eval().requires_grad_(False).to(device)
    image_size = int((raw.get("data") or {}).get("image_size") or Spec().data.image_size)
    return Teacher(model, image_size, trained_tasks(config, spec))


def trained_tasks(config: Path, spec: Spec) -> tuple[str, ...]:
    """Tasks with a loss weight > 0 whose labels the teacher's data had (splits/data.json)."""
    tasks = [t for t in TASKS if getattr(spec.loss, t) > 0]
    run_dir = config.parent.parent if config.parent.name == "best" else config.parent
    data_json = run_dir / "splits" / "data.json"
    if data_json.is_file():
        measured = json.loads(data_json.read_text()).get("tasks", TASKS)
        tasks = [t for t in tasks if t in measured]
    return tuple(tasks)


def distill(teacher: Path, spec_path: Path, overrides: list[str], out: Optional[Path] = None,
            resume: bool = False, address: Optional[str] = None) -> dict:
    """`fer-tune distill`: the student spec with `distill.teacher` set, searched if it has a space."""
    find_model(Path(teacher))  # a wrong teacher path is the likeliest mistake: say it plainly
    spec = load_spec(spec_path, overrides)
    raw = spec.model_dump(mode="json")
    set_path(raw, "distill.teacher", str(Path(teacher).expanduser().resolve()))
    if isinstance(raw.get("space"), dict):
        raw["space"].pop("distill.teacher", None)
    spec = validate_spec(raw, source=str(spec_path))
    out = Path(out) if out else Path("runs") / spec.name
    if spec.space:
        from fer_tune.search import run_search

        return run_search(spec, out, resume=resume, address=address)
    from fer_tune.train import train_experiment

    return train_experiment(spec, out)
