"""Test pictures with known faces: FER2013 faces pasted, enlarged, on a noisy background.

FER2013's 48 px crops are real faces, but too small and too tight for a detector to be tested on
them as they are; pasted at 120-160 px on a background, they make "photos" whose face boxes are
known. A picture with `faces=0` is background only.
"""

from __future__ import annotations

import random
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from conftest import FER2013


def fer_faces() -> list[Path]:
    return sorted((FER2013 / "test").glob("*/*.jpg"))


def compose(faces: list[Path], seed: int, tile: int = 140) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """An RGB picture with `faces` in a row, and the (x, y, w, h) box of each."""
    rng = np.random.default_rng(seed)
    step = int(tile * 1.6)
    width, height = max(1, len(faces)) * step + tile // 3, int(tile * 1.8)
    tint = rng.uniform(0.8, 1.2, 3)
    gray = np.full((height, width), rng.uniform(90, 190)) + rng.normal(0, 10, (height, width))
    boxes = []
    for i, path in enumerate(faces):
        face = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
        face = cv2.resize(face, (tile, tile), interpolation=cv2.INTER_CUBIC)
        x, y = i * step + tile // 3, int(tile * 0.4)
        gray[y:y + tile, x:x + tile] = face
        boxes.append((x, y, tile, tile))
    rgb = np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)
    return rgb, boxes


def write_pictures(folder: Path, count: int, per_picture: int = 3, seed: int = 0) -> dict[Path, list]:
    """`count` composed pictures saved as JPEG in `folder`; returns each file's true face boxes."""
    folder.mkdir(parents=True, exist_ok=True)
    pool, rng = fer_faces(), random.Random(seed)
    truth = {}
    for i in range(count):
        rgb, boxes = compose(rng.sample(pool, per_picture), seed=seed * 1000 + i, tile=rng.choice([120, 140, 160]))
        path = folder / f"picture_{i:02d}.jpg"
        Image.fromarray(rgb).save(path, quality=95)
        truth[path] = boxes
    return truth


def iou(a, b) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def matches(truth: list, found: list) -> tuple[int, int]:
    """(true faces found: a detection with IoU > 0.3, detections centred on no true face).

    A detection of part of a face (the cascade sometimes takes a cheek for a face) is a miss of
    that face, but not a face found in the background.
    """
    hits = sum(any(iou(t, f) > 0.3 for f in found) for t in truth)
    false = sum(not any(_inside(f, t) for t in truth) for f in found)
    return hits, false


def _inside(box, face) -> bool:
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    return face[0] <= cx <= face[0] + face[2] and face[1] <= cy <= face[1] + face[3]
