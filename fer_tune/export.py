"""A trained model in three forms, and one way to run each: `fer-tune export`.

`best/model.pt` (weights, from `fer_tune.train.export_best`) is what training writes.
`fer-tune export` adds `best/model.ts` (TorchScript, for libtorch / Python without fer-tune) and
`best/model.onnx` (ONNX, for onnxruntime and friends) next to `best/config.yaml`. Every form is the
same function:

    images  float32 (N, 3, S, S), RGB in [0, 1], S = data.image_size of config.yaml
    ->  probabilities (N, 8)  softmax over `fer_tune.EXPRESSIONS` (AffectNet order)
        valence (N,), arousal (N,)  in [-1, 1]

so the network normalises inside, and the caller only resizes and scales (see `fer_tune.predict`).
An export is checked before it is kept: the written file is loaded back and must match the
PyTorch model on a batch of another size than the one it was traced with, to `TOLERANCE`.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer_tune.errors import UserError

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
"""`--format` names and the file each writes in best/."""

INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "valence", "arousal")
TOLERANCE = 1e-4
ONNX_EXTRA = "pip install 'fer-tune[onnx]'"


class InferenceNet(nn.Module):
    """MultiTaskNet as a function of plain tensors: what every exported form computes."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net(images)
        return F.softmax(out["expression"].float(), dim=1), out["valence"].float(), out["arousal"].float()


# ----------------------------------------------------------------------------- locating a model


def locate_model(path: Path) -> tuple[Path, Path]:
    """(config.yaml, model file) of an experiment folder, its best/ folder, or a model.pt/.ts/.onnx."""
    from fer_tune.train import find_model

    path = Path(path)
    if path.is_file() and path.suffix in (".ts", ".onnx"):
        config = path.parent / "config.yaml"
        if not config.is_file():
            raise UserError(f"{path}: no config.yaml beside it; keep the exported model in the best/ "
                            f"folder it was exported into (config.yaml gives its image size)")
        return config, path
    if path.is_file() and path.suffix != ".pt":
        raise UserError(f"{path}: not a model file (expected model.pt, model.ts or model.onnx, or an "
                        f"experiment folder)")
    return find_model(path)


def inference_spec(config: Path):
    """The spec of `config.yaml` as far as running the model needs it.

    Data paths and the backbone's pretrained-weights file belong to training; they are dropped, so
    a best/ folder copied to another machine still loads.
    """
    from fer_tune.spec import read_yaml, validate_spec

    raw = read_yaml(config)
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise UserError(f"{config}: not an exported config (no model: section)")
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    raw["data"] = {"image_size": data["image_size"]} if "image_size" in data else {}
    raw["model"] = {**raw["model"], "pretrained": None}
    return validate_spec(raw, source=str(config))


def load_torch_net(config: Path, weights_file: Path) -> tuple[InferenceNet, object]:
    """The PyTorch model of an exported model.pt, in eval mode, with its spec."""
    from fer_tune.model import create_model
    from fer_tune.train import load_model_file

    spec = inference_spec(config)
    saved = load_model_file(weights_file, spec, config)
    net = create_model(spec.model)
    net.load_state_dict(saved["model"])
    return InferenceNet(net).eval(), spec


# ----------------------------------------------------------------------------- running a model


class TorchRuntime:
    """A model.pt (as `InferenceNet`) or a model.ts: float32 (N, 3, S, S) numpy in, numpy outputs out."""

    def __init__(self, module, image_size: int):
        self.module, self.image_size = module, image_size

    @torch.inference_mode()
    def __call__(self, images):
        outputs = self.module(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        return tuple(o.float().numpy() for o in outputs)


class OnnxRuntime:
    """A model.onnx through onnxruntime on the CPU, called like `TorchRuntime`."""

    def __init__(self, path: Path, image_size: int):
        onnxruntime = require_onnx("onnxruntime")["onnxruntime"]
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:
            raise UserError(f"{path}: not a readable ONNX model ({_first_line(err)}); re-export it with "
                            f"`fer-tune export DIR --format onnx`") from None
        shape = self.session.get_inputs()[0].shape
        if list(shape[1:]) != [3, image_size, image_size]:
            raise UserError(f"{path}: takes images of shape {shape[1:]}, but config.yaml beside it says "
                            f"data.image_size {image_size}; re-export it with `fer-tune export`")
        self.image_size = image_size

    def __call__(self, images):
        outputs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})
        return tuple(np.asarray(o, dtype=np.float32) for o in outputs)


def load_runtime(model_path: Path):
    """The model at `model_path` (folder, model.pt, model.ts or model.onnx), ready to run on the CPU.

    Every runtime has `image_size` and maps float32 images (N, 3, S, S) in [0, 1] to numpy
    (probabilities (N, 8), valence (N,), arousal (N,)).
    """
    config, model_file = locate_model(model_path)
    if model_file.suffix == ".onnx":
        return OnnxRuntime(model_file, inference_spec(config).data.image_size)
    if model_file.suffix == ".ts":
        image_size = inference_spec(config).data.image_size
        try:
            module = _load_torchscript(model_file)
        except Exception as err:
            raise UserError(f"{model_file}: not a readable TorchScript model ({_first_line(err)}); "
                            f"re-export it with `fer-tune export DIR --format torchscript`") from None
        return TorchRuntime(module, image_size)
    net, spec = load_torch_net(config, model_file)
    return TorchRuntime(net, spec.data.image_size)


# ----------------------------------------------------------------------------- exporting


def parse_formats(text: str) -> list[str]:
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format {text}: unknown format '{(unknown or [''])[0]}'; choose from "
                        f"{', '.join(FORMATS)} (comma-separated)")
    return list(dict.fromkeys(formats))


def export_model(model_path: Path, formats: list[str]) -> list[tuple[Path, float]]:
    """Write each format next to config.yaml; returns (file, largest difference from PyTorch) for each."""
    from fer_tune.io import atomic_write
    from fer_tune.train import find_model

    if "onnx" in formats:
        require_onnx("onnx", "onnxscript", "onnxruntime")  # before any work: say it first
    config, weights_file = find_model(model_path)
    net, spec = load_torch_net(config, weights_file)
    size = spec.data.image_size
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, size, size, generator=generator)
    check = torch.rand(3, 3, size, size, generator=generator)  # another batch size: the batch axis stays free
    with torch.inference_mode():
        expected = [o.numpy() for o in net(check)]
    written = []
    for name in formats:
        path = config.parent / FORMATS[name]
        writer = _write_torchscript if name == "torchscript" else _write_onnx

        def write_and_check(tmp: Path) -> None:
            writer(net, example, tmp)
            runtime = OnnxRuntime(tmp, size) if name == "onnx" else TorchRuntime(_load_torchscript(tmp), size)
            diff = max(float(np.abs(a - b).max()) for a, b in zip(runtime(check.numpy()), expected))
            if not diff <= TOLERANCE:  # not written: a model that answers differently is worse than none
                raise UserError(f"{path}: the {name} export of backbone '{spec.model.backbone}' differs "
                                f"from the PyTorch model by {diff:.2g} (> {TOLERANCE:g}); not written. "
                                f"Use model.pt, or another --format")
            written.append((path, diff))

        atomic_write(path, write_and_check)
    return written


def _write_torchscript(net: InferenceNet, example: torch.Tensor, path: Path) -> None:
    # Tracing, not scripting: timm backbones trace reliably but many do not script.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice and tracer warnings
        traced = torch.jit.trace(net, example, check_trace=False)
        torch.jit.save(traced, str(path))


def _load_torchscript(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice, not the user's concern
        return torch.jit.load(str(path), map_location="cpu").eval()


def _write_onnx(net: InferenceNet, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamo=True, external_data=False, verbose=False, dynamic_shapes=({0: batch},))


def require_onnx(*names: str) -> dict:
    """The named ONNX packages (exporting needs onnx and onnxscript, running onnxruntime), or a
    UserError saying how to install them: they are an optional extra."""
    import importlib

    modules, missing = {}, []
    for name in names:
        try:
            modules[name] = importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"ONNX needs the packages {', '.join(missing)}, which are not installed: {ONNX_EXTRA}")
    return modules


def _first_line(err: Exception) -> str:
    return (" ".join(str(err).split())[:160]) or type(err).__name__
