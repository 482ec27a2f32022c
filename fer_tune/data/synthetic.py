"""Synthetic procedural faces: fer-tune's built-in default dataset (``data.source: synthetic``).

What this is
    Cartoon-like face images drawn with OpenCV primitives, generated deterministically from a
    seed, so nothing is ever downloaded. Every face carries the labels a real AffectNet-style
    dataset carries: one of the 8 expression classes (``fer_tune.EXPRESSIONS``, AffectNet id
    order) plus continuous valence and arousal in [-1, 1].

What it is for
    A CPU-runnable default that has all 8 classes and valence/arousal, so that every code path of
    fer-tune (data loading, splits, caching, augmentation, multi-task heads and losses, metrics,
    search, reports) can be exercised end to end in seconds, in tests and on a laptop. It is
    learnable but not trivial, so that a better recipe measurably beats a worse one. It is NOT a
    substitute for real faces: a model or a recipe tuned on it says nothing about real-world
    expression recognition.

How labels relate to images
    Each face draws a *true* expression uniformly from the 8 classes and an intensity in
    [0.2, 1]. The expression sets prototype action-unit-like parameters (brow raise / lower /
    inner raise, eye openness, cheek raise, lip corners up / down, upper-lip raise, lip stretch,
    lip press, mouth open, jaw drop, nose wrinkle); they are multiplied by ``intensity ** 0.7`` (so
    weak expressions stay visible at low resolution), shifted by the identity's resting face and
    jittered a little. Contempt is one-sided: a single lip
    corner (left or right at random) is raised. Valence and arousal are the expression's
    circumplex position (happy: high valence, mid arousal; fear: low valence, high arousal;
    surprise: ~0 valence, high arousal; sad: low / low; anger: low valence, high arousal; disgust:
    low valence, mid arousal; contempt: slightly negative valence; neutral: ~0, low arousal)
    multiplied by the same intensity, plus small Gaussian noise, clipped to [-1, 1]. So both the
    class and the V/A values are predictable from the image.

    Label noise: a ``label_noise`` fraction of faces get their ``expression`` label replaced by a
    uniformly random *other* class. The image keeps showing ``true_expression``, and valence /
    arousal stay those of the true expression.

    Nuisance variation that carries no label information: identity shape (face width / height,
    eye spacing and size, nose and mouth size, hair; the same identity always looks the same,
    whatever the seed: identity ``k`` is drawn from an RNG seeded with ``k`` alone), skin tone,
    head tilt, scale, position jitter, a lighting gradient, pixel noise, blur, occluders (a
    "hand", glasses / sunglasses or a bar over part of the face) and the background (plain
    colour, gradient or texture).

API
    ``sample_faces(n, seed, label_noise, identities)`` returns a table with one row per face
    (labels plus every rendering parameter as plain columns); ``render_face(row, size)`` and
    ``render_faces(table, size)`` draw them. Row ``i`` depends only on ``(seed, i, label_noise,
    identities)``, never on ``n``, and rendering depends only on the row and the size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from fer_tune.io import atomic_write_text

__all__ = ["AU_NAMES", "sample_faces", "render_face", "render_faces", "write_dataset"]

AU_NAMES = (
    "au_brow_raise",  # AU1+2: whole brow up
    "au_brow_lower",  # AU4: brows down and together
    "au_brow_inner",  # AU1: inner ends up (oblique "sad" brows)
    "au_eye_open",  # signed: >0 upper lid raised (AU5, wide eyes), <0 narrowed (AU7)
    "au_cheek_raise",  # AU6: lower lid pushed up, nasolabial folds
    "au_lip_corner_l",  # signed, image-left corner: >0 up (AU12), <0 down (AU15)
    "au_lip_corner_r",  # signed, image-right corner
    "au_upper_lip_raise",  # AU10: upper lip up, upper teeth show
    "au_lip_stretch",  # signed: >0 stretched wide (AU20), <0 narrowed / rounded
    "au_lip_press",  # AU23/24: thin pressed lips
    "au_mouth_open",  # AU25: lips part
    "au_jaw_drop",  # AU26/27: lower lip and chin drop
    "au_nose_wrinkle",  # AU9
)
_N_AU = len(AU_NAMES)
_AU = {name: k for k, name in enumerate(AU_NAMES)}

# Prototype action units at intensity 1, one row per class in fer_tune.EXPRESSIONS order.
# Contempt's one-sided corner is filled in per face (a random side).
_PROTO = np.zeros((8, _N_AU))


def _set(cls: int, **aus: float) -> None:
    for name, value in aus.items():
        _PROTO[cls, _AU["au_" + name]] = value


_set(1, cheek_raise=1.0, lip_corner_l=1.0, lip_corner_r=1.0, mouth_open=0.35, eye_open=-0.35,
     upper_lip_raise=0.15, lip_stretch=0.25)  # happy
_set(2, brow_inner=1.0, brow_lower=0.35, eye_open=-0.35, lip_corner_l=-0.9, lip_corner_r=-0.9,
     lip_press=0.25)  # sad
_set(3, brow_raise=1.0, eye_open=1.0, mouth_open=0.8, jaw_drop=1.0, lip_stretch=-0.45)  # surprise
_set(4, brow_raise=0.55, brow_inner=0.6, brow_lower=0.5, eye_open=0.9, lip_stretch=1.0,
     mouth_open=0.45, jaw_drop=0.3, lip_corner_l=-0.35, lip_corner_r=-0.35)  # fear
_set(5, nose_wrinkle=1.0, upper_lip_raise=1.0, brow_lower=0.8, eye_open=-0.5, cheek_raise=0.1,
     lip_corner_l=-0.7, lip_corner_r=-0.7, mouth_open=0.1, lip_stretch=-0.15)  # disgust
_set(6, brow_lower=1.0, eye_open=0.35, lip_press=1.0, lip_corner_l=-0.15, lip_corner_r=-0.15,
     lip_stretch=-0.2)  # anger
_set(7, eye_open=-0.15)  # contempt (+ one corner, per face)

# Circumplex (valence, arousal) at intensity 1, per class.
_VA = np.array([
    [0.0, -0.2],  # neutral
    [0.85, 0.35],  # happy
    [-0.75, -0.45],  # sad
    [0.1, 0.85],  # surprise
    [-0.7, 0.8],  # fear
    [-0.7, 0.3],  # disgust
    [-0.65, 0.7],  # anger
    [-0.4, 0.2],  # contempt
])
_VA_NOISE = 0.05
_AU_JITTER = 0.07

_SKIN_LIGHT = np.array([250.0, 222.0, 200.0])
_SKIN_DARK = np.array([85.0, 55.0, 40.0])
_HAIR_COLOURS = np.array([
    [25, 20, 18], [60, 40, 25], [110, 75, 45], [170, 130, 80], [200, 170, 110], [140, 50, 25],
    [120, 120, 120], [220, 220, 215],
], dtype=float)
_IRIS_COLOURS = np.array([[60, 40, 25], [35, 25, 20], [70, 110, 150], [80, 110, 70],
                          [110, 85, 50]], dtype=float)

_IDENTITY_SALT = 0x1D  # identity RNG: default_rng([_IDENTITY_SALT, k]); independent of the seed


def _identity_params(k: int) -> dict:
    """Shape, colouring and resting face of identity k (the same whatever the sample seed)."""
    rng = np.random.default_rng([_IDENTITY_SALT, k])
    tone = rng.random() ** 0.9
    skin = _SKIN_LIGHT * (1 - tone) + _SKIN_DARK * tone + rng.normal(0, 8, 3)
    hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.8, 1.15)
    iris = _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))]
    p = {
        "face_w": rng.uniform(0.7, 0.86),
        "face_h": rng.uniform(0.94, 1.06),
        "eye_y": rng.uniform(-0.13, -0.03),
        "eye_spacing": rng.uniform(0.29, 0.37),
        "eye_size": rng.uniform(0.13, 0.17),
        "brow_thick": rng.uniform(0.045, 0.07),
        "nose_len": rng.uniform(0.28, 0.38),
        "nose_w": rng.uniform(0.075, 0.115),
        "mouth_gap": rng.uniform(0.2, 0.27),  # nose tip to mouth
        "mouth_w": rng.uniform(0.21, 0.27),
        "lip_thick": rng.uniform(0.035, 0.06),
        "hairline": rng.uniform(-0.66, -0.5),
        "hair_style": int(rng.integers(3)),  # 0 short, 1 full, 2 long
        "skin_r": skin[0], "skin_g": skin[1], "skin_b": skin[2],
        "hair_r": hair[0], "hair_g": hair[1], "hair_b": hair[2],
        "iris_r": iris[0], "iris_g": iris[1], "iris_b": iris[2],
    }
    for key in ("skin_r", "skin_g", "skin_b", "hair_r", "hair_g", "hair_b"):
        p[key] = float(np.clip(p[key], 0, 255))
    # Resting face: some people look a bit sad / surprised / stern at rest.
    rest = np.zeros(_N_AU)
    rest[_AU["au_brow_raise"]] = rng.normal(0, 0.1)
    rest[_AU["au_brow_lower"]] = abs(rng.normal(0, 0.1))
    rest[_AU["au_eye_open"]] = rng.normal(0, 0.12)
    corner = rng.normal(0, 0.12)
    rest[_AU["au_lip_corner_l"]] = corner
    rest[_AU["au_lip_corner_r"]] = corner
    rest[_AU["au_lip_press"]] = abs(rng.normal(0, 0.12))
    p["_rest"] = rest
    return p


_SIGNED_AUS = np.array([n in ("au_eye_open", "au_lip_corner_l", "au_lip_corner_r",
                              "au_lip_stretch") for n in AU_NAMES])


def _sample_row(i: int, seed: int, label_noise: float, identities: int, id_cache: dict) -> dict:
    rng = np.random.default_rng([seed, i])
    # Draw order is fixed so that label_noise only changes the labels, nothing else.
    true_expr = int(rng.integers(8))
    noise_u = rng.random()
    other = int(rng.integers(1, 8))
    expr = (true_expr + other) % 8 if noise_u < label_noise else true_expr
    identity = int(rng.integers(identities))
    intensity = rng.uniform(0.2, 1.0)
    side = int(rng.integers(2))

    ident = id_cache.get(identity)
    if ident is None:
        ident = id_cache[identity] = _identity_params(identity)

    proto = _PROTO[true_expr].copy()
    if true_expr == 7:
        proto[_AU["au_lip_corner_l" if side == 0 else "au_lip_corner_r"]] = 1.0
    aus = proto * intensity**0.7 + ident["_rest"] + rng.normal(0, _AU_JITTER, _N_AU)
    aus[[_AU["au_lip_corner_l"], _AU["au_lip_corner_r"]]] += rng.normal(0, 0.03, 2)
    aus = np.where(_SIGNED_AUS, np.clip(aus, -1, 1), np.clip(aus, 0, 1.1))

    va = _VA[true_expr] * intensity + rng.normal(0, _VA_NOISE, 2)
    va = np.clip(va, -1, 1)

    row = {
        "expression": expr,
        "true_expression": true_expr,
        "valence": float(va[0]),
        "arousal": float(va[1]),
        "subject": f"id{identity:04d}",
        "identity": identity,
        "intensity": float(intensity),
    }
    row.update({name: float(v) for name, v in zip(AU_NAMES, aus)})
    row.update({k: v for k, v in ident.items() if not k.startswith("_")})

    # Pose and photography.
    row["tilt_deg"] = float(np.clip(rng.normal(0, 7), -20, 20))
    row["scale"] = rng.uniform(0.86, 1.06)
    row["shift_x"] = rng.uniform(-0.07, 0.07)
    row["shift_y"] = rng.uniform(-0.06, 0.06)
    row["light_angle"] = rng.uniform(0, 2 * math.pi)
    row["light_strength"] = rng.uniform(0.0, 0.45)
    row["brightness"] = rng.uniform(0.75, 1.2)
    row["noise_std"] = rng.uniform(0.0, 10.0)
    row["blur"] = rng.uniform(0.0, 0.8) if rng.random() < 0.3 else 0.0
    row["bg_type"] = int(rng.integers(3))  # 0 plain, 1 gradient, 2 texture
    grey = rng.uniform(40, 220)
    bg = grey * 0.35 + rng.uniform(0, 255, 3) * 0.65
    bg2 = grey * 0.35 + rng.uniform(0, 255, 3) * 0.65
    shirt = rng.uniform(0, 255, 3)
    row.update(bg_r=bg[0], bg_g=bg[1], bg_b=bg[2], bg2_r=bg2[0], bg2_g=bg2[1], bg2_b=bg2[2],
               shirt_r=shirt[0], shirt_g=shirt[1], shirt_b=shirt[2])
    row["bg_angle"] = rng.uniform(0, 2 * math.pi)

    # Occluder: 0 none, 1 hand, 2 glasses (occ_fill > 0.5: sunglasses), 3 bar.
    u = rng.random()
    occ_type = 0 if u < 0.75 else 1 if u < 0.83 else 2 if u < 0.94 else 3
    occ = rng.uniform(0, 1, 8)
    row["occ_type"] = occ_type
    row["occ_x"] = float(occ[0] * 1.4 - 0.7)
    row["occ_y"] = float(occ[1] * 1.0 - 0.1)
    row["occ_w"] = float(0.15 + occ[2] * 0.25)
    row["occ_h"] = float(0.1 + occ[3] * 0.25)
    row["occ_angle"] = float(occ[4] * 180.0)
    row["occ_fill"] = float(occ[5] < 0.3)
    col = rng.uniform(0, 255, 3)
    if occ_type == 1:  # hands are skin coloured (someone's skin)
        t = rng.random()
        col = _SKIN_LIGHT * (1 - t) + _SKIN_DARK * t
    elif occ_type == 2:
        col = col * 0.35
    row.update(occ_r=float(col[0]), occ_g=float(col[1]), occ_b=float(col[2]))
    row["noise_seed"] = int(rng.integers(2**31 - 1))
    return row


def sample_faces(n: int, seed: int = 0, label_noise: float = 0.05,
                 identities: int = 100) -> pd.DataFrame:
    """Sample `n` synthetic faces: labels plus every parameter `render_face` needs.

    Columns: ``expression`` (int 0..7, possibly noisy label), ``true_expression`` (int, what the
    image shows), ``valence``, ``arousal`` (floats in [-1, 1]), ``subject`` (``"id0042"``),
    ``identity`` (int), ``intensity`` (in [0.2, 1]), the action units ``AU_NAMES``, identity shape
    and colour (``face_w`` ... ``iris_b``), pose (``tilt_deg``, ``scale``, ``shift_x``,
    ``shift_y``), photography (``light_*``, ``brightness``, ``noise_std``, ``blur``, ``bg_*``,
    ``shirt_*``), occluder (``occ_*``) and ``noise_seed``.

    Row i depends only on (seed, i, label_noise, identities): sampling more rows never changes
    the first ones.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    if identities < 1:
        raise ValueError(f"identities must be >= 1, got {identities}")
    cache: dict = {}
    rows = [_sample_row(i, int(seed), float(label_noise), int(identities), cache)
            for i in range(n)]
    if not rows:
        return pd.DataFrame(columns=list(_sample_row(0, 0, 0.0, 1, {}).keys()))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# Rendering


_SHIFT = 4  # sub-pixel bits for cv2 polygon drawing
_SCALE = float(1 << _SHIFT)
_XS13 = np.linspace(-1, 1, 13)
_EYE_PROF = (1 - _XS13**2) ** 0.7
_T21 = np.linspace(-1, 1, 21)
_GRID16 = np.stack(np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 16)))  # (x, y)


class _Painter:
    """Records shapes in face units (face centre at 0, face half-height ~1, y down).

    `flush` maps every recorded point to pixels in one go (tilt, scale, position) and draws the
    shapes in order with anti-aliased cv2 primitives; batching keeps the per-face Python and
    numpy overhead low.
    """

    def __init__(self, img: np.ndarray, center: tuple[float, float], radius: float,
                 tilt_deg: float):
        self.img = img
        self.radius = radius
        a = math.radians(tilt_deg)
        c, s = math.cos(a) * radius * _SCALE, math.sin(a) * radius * _SCALE
        self.m = np.array([[c, s], [-s, c]])  # right-multiplied: row @ m
        self.t = np.array(center) * _SCALE
        self.ops: list[tuple] = []
        self.pts: list[np.ndarray] = []

    def fill(self, pts: np.ndarray, color) -> None:
        self.ops.append((0, len(pts), color, 0, False))
        self.pts.append(pts)

    def line(self, pts: np.ndarray, color, thick: float, closed: bool = False) -> None:
        t = max(1, int(round(thick * self.radius)))
        self.ops.append((1, len(pts), color, t, closed))
        self.pts.append(pts)

    def flush(self) -> None:
        if not self.ops:
            return
        px = np.rint(np.concatenate(self.pts) @ self.m + self.t).astype(np.int32)
        k = 0
        img = self.img
        for kind, n, color, thick, closed in self.ops:
            poly = [px[k:k + n]]
            k += n
            if kind == 0:
                cv2.fillPoly(img, poly, color, cv2.LINE_AA, _SHIFT)
            else:
                cv2.polylines(img, poly, closed, color, thick, cv2.LINE_AA, _SHIFT)
        self.ops.clear()
        self.pts.clear()


@lru_cache(maxsize=64)
def _unit_arc(t0: float, t1: float, n: int) -> np.ndarray:
    t = np.linspace(t0, t1, n)
    out = np.stack([np.cos(t), np.sin(t)], axis=1)
    out.flags.writeable = False
    return out


def _ellipse(cx, cy, ax, ay, angle_deg=0.0, t0=0.0, t1=2 * math.pi, n=28) -> np.ndarray:
    pts = _unit_arc(t0, t1, n) * (ax, ay)
    if angle_deg:
        a = math.radians(angle_deg)
        ca, sa = math.cos(a), math.sin(a)
        pts = pts @ np.array([[ca, sa], [-sa, ca]])
    return pts + (cx, cy)


def _curve(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    return np.stack([xs, ys], axis=1)


def _mix(a, b, t: float) -> tuple:
    t = min(max(t, 0.0), 1.0)
    return tuple(float(x * (1 - t) + y * t) for x, y in zip(a, b))


def _scaled(c, f: float) -> tuple:
    return tuple(float(min(255.0, x * f)) for x in c)


def _background(row: Mapping, c: int, rng: np.random.Generator) -> np.ndarray:
    bg = np.array([row["bg_r"], row["bg_g"], row["bg_b"]], dtype=np.float32)
    kind = int(row["bg_type"])
    if kind == 0:
        return np.broadcast_to(bg, (c, c, 3)).astype(np.uint8)
    if kind == 1:
        bg2 = np.array([row["bg2_r"], row["bg2_g"], row["bg2_b"]], dtype=np.float32)
        a = float(row["bg_angle"])
        w = np.clip(_GRID16[0] * math.cos(a) + _GRID16[1] * math.sin(a), -1, 1) * 0.5 + 0.5
        small = (bg * (1 - w[..., None]) + bg2 * w[..., None]).astype(np.float32)
        return cv2.resize(small, (c, c), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    cells = int(rng.integers(3, 9))
    tex = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
    tex = cv2.resize(tex, (c, c), interpolation=cv2.INTER_CUBIC)
    amp = float(row["bg2_r"]) / 255.0 * 60.0 + 15.0
    return np.clip(bg + tex * amp, 0, 255).astype(np.uint8)


def _draw_face(p: _Painter, r: Mapping) -> None:
    fw, fh = float(r["face_w"]), float(r["face_h"])
    skin = (float(r["skin_r"]), float(r["skin_g"]), float(r["skin_b"]))
    hair = (float(r["hair_r"]), float(r["hair_g"]), float(r["hair_b"]))
    iris = (float(r["iris_r"]), float(r["iris_g"]), float(r["iris_b"]))
    shade = _scaled(skin, 0.8)
    dark = _mix(_scaled(skin, 0.45), (30, 15, 10), 0.35)
    lip = _mix(_scaled(skin, 0.78), (170, 60, 60), 0.4)
    brow_c = _mix(hair, (25, 18, 12), 0.55)

    brow_raise = float(r["au_brow_raise"])
    brow_lower = float(r["au_brow_lower"])
    brow_inner = float(r["au_brow_inner"])
    eye_open = float(r["au_eye_open"])
    cheek = float(r["au_cheek_raise"])
    cl, cr = float(r["au_lip_corner_l"]), float(r["au_lip_corner_r"])
    ulr = float(r["au_upper_lip_raise"])
    stretch = float(r["au_lip_stretch"])
    press = float(r["au_lip_press"])
    mopen = float(r["au_mouth_open"])
    jaw = float(r["au_jaw_drop"])
    wrinkle = float(r["au_nose_wrinkle"])
    style = int(r["hair_style"])
    hairline = float(r["hairline"])

    # Body, long hair, neck, ears.
    p.fill(_ellipse(0, 1.85, fw * 1.9, 0.7), (float(r["shirt_r"]), float(r["shirt_g"]),
                                              float(r["shirt_b"])))
    if style == 2:
        p.fill(_ellipse(0, 0.15, fw * 1.28, 1.2), _scaled(hair, 0.85))
    p.fill(np.array([[-0.3 * fw, 0.4], [0.3 * fw, 0.4], [0.34 * fw, 1.5], [-0.34 * fw, 1.5]]),
           _scaled(skin, 0.82))
    ey = float(r["eye_y"])
    for sx in (-1, 1):
        p.fill(_ellipse(sx * fw * 0.98, ey + 0.08, 0.1, 0.17), _scaled(skin, 0.9))

    # Face: an ellipse whose lower half lengthens with the jaw drop.
    face = _ellipse(0, 0, fw, fh, n=48)
    lower = face[:, 1] > 0
    face[lower, 1] *= 1 + 0.13 * jaw
    face[lower, 0] *= 1 - 0.05 * jaw
    p.fill(face, skin)
    p.line(face, shade, 0.018, closed=True)

    # Hair on top.
    vol = 0.05 if style == 0 else 0.15
    half_w = fw * (1.01 if style == 0 else 1.08)
    cap = _ellipse(0, hairline, half_w, fh + hairline + vol, t0=math.pi, t1=2 * math.pi, n=28)
    hx = np.linspace(half_w, -half_w, 15)  # hairline: lower at the temples
    edge = _curve(hx, hairline + 0.16 * (hx / half_w) ** 4 - 0.03 * (1 - (hx / half_w) ** 2))
    p.fill(np.concatenate([cap, edge]), hair)

    # Raised cheeks bulge and catch the light.
    es, ew = float(r["eye_spacing"]), float(r["eye_size"])
    if cheek > 0.15:
        c = _mix(_scaled(skin, 1 + 0.3 * cheek), (235, 140, 130), 0.2 * cheek)
        for sx in (-1, 1):
            p.fill(_ellipse(sx * (es + 0.03), ey + 0.24 - 0.05 * cheek, 0.14, 0.09, n=20), c)

    # Forehead wrinkles (brow raise: across; inner raise: centre), glabella lines (brow lower).
    es, ew = float(r["eye_spacing"]), float(r["eye_size"])
    by = ey - 0.17 - 0.3 * ew
    fore = max(brow_raise, 0.6 * brow_inner)
    if fore > 0.25:
        c = _mix(skin, dark, 0.55 * fore)
        half = 0.3 if brow_raise >= 0.6 * brow_inner else 0.13
        for k in range(2):
            y = by - 0.17 - 0.07 * k
            xs = np.linspace(-half, half, 7)
            p.line(_curve(xs, y + 0.03 * (xs / half) ** 2), c, 0.014)
    if brow_lower > 0.3:
        c = _mix(skin, dark, 0.8 * brow_lower)
        for sx in (-1, 1):
            p.line(np.array([[sx * 0.035, by - 0.02], [sx * 0.045, by + 0.09]]), c, 0.015)

    # Eyes.
    h_up = ew * 0.5 * (1 + 0.8 * eye_open)
    h_lo = ew * 0.42 * (1 - 0.55 * cheek) * (1 + 0.35 * min(eye_open, 0) + 0.2 * max(eye_open, 0))
    h_up, h_lo = max(h_up, 0.08 * ew), max(h_lo, 0.06 * ew)
    xs = _XS13
    prof = _EYE_PROF
    ir = 0.48 * ew
    for sx in (-1, 1):
        ex = sx * es
        top = _curve(ex + xs * ew, ey - h_up * prof)
        bot = _curve(ex + xs * ew, ey + h_lo * prof)
        p.fill(np.concatenate([top, bot[::-1]]), (242, 242, 238))
        p.fill(_ellipse(ex, ey, ir, ir, n=20), iris)
        p.fill(_ellipse(ex, ey, 0.45 * ir, 0.45 * ir, n=14), (12, 10, 10))
        # Cover the iris where the lids close over it.
        edge = np.array([[ex + ew * 1.05, ey], [ex + ew * 1.05, ey - 1.3 * ir],
                         [ex - ew * 1.05, ey - 1.3 * ir], [ex - ew * 1.05, ey]])
        p.fill(np.concatenate([top, edge]), skin)
        edge = np.array([[ex + ew * 1.05, ey], [ex + ew * 1.05, ey + 1.3 * ir],
                         [ex - ew * 1.05, ey + 1.3 * ir], [ex - ew * 1.05, ey]])
        p.fill(np.concatenate([bot, edge]), skin)
        p.line(top, (20, 15, 15), 0.03)
        p.line(bot, _mix(skin, dark, 0.6), 0.012)
        if cheek > 0.3:  # crow's feet / lower-lid bulge
            c = _mix(skin, dark, 0.6 * cheek)
            p.line(_curve(ex + xs * ew * 0.9, ey + h_lo * prof + 0.045), c, 0.012)

    # Brows: inner, middle and outer point, moved by the brow action units.
    for sx in (-1, 1):
        xin = es - ew * 0.95 - 0.03 * brow_lower
        xout = es + ew * 1.15
        d_in = -0.2 * brow_raise + 0.17 * brow_lower - 0.2 * brow_inner
        d_mid = -0.05 - 0.2 * brow_raise + 0.08 * brow_lower - 0.05 * brow_inner
        d_out = -0.01 - 0.16 * brow_raise + 0.02 * brow_lower + 0.07 * brow_inner
        pts = np.array([[sx * xin, by + d_in], [sx * (xin + xout) / 2, by + d_mid],
                        [sx * xout, by + d_out]])
        p.line(pts, brow_c, float(r["brow_thick"]))

    # Nose.
    ny = ey + float(r["nose_len"]) - 0.03 * wrinkle
    nw = float(r["nose_w"]) * (1 + 0.25 * wrinkle)
    p.line(np.array([[-0.035, ey + 0.05], [-0.06, ny - 0.1], [-nw * 0.85, ny - 0.03]]),
           _mix(skin, dark, 0.35), 0.014)
    p.line(_ellipse(0, ny - 0.025, nw, 0.05, t0=0.15 * math.pi, t1=0.85 * math.pi, n=12),
           _mix(skin, dark, 0.7), 0.02)
    for sx in (-1, 1):
        p.fill(_ellipse(sx * nw * 0.55, ny + 0.01, 0.032, 0.016, n=12), dark)
    if wrinkle > 0.25:
        c = _mix(skin, dark, 0.8 * wrinkle)
        for k in range(3):
            y = ey + 0.0 + 0.045 * k
            p.line(np.array([[-0.07, y + 0.01], [0.0, y - 0.01], [0.07, y + 0.01]]), c, 0.013)

    # Mouth.
    my = ny + float(r["mouth_gap"]) + 0.02 * jaw
    t = _T21
    side_lift = np.maximum(np.where(t < 0, cl, cr), 0)  # raised corners also pull outwards
    mw = float(r["mouth_w"]) * (1 + 0.28 * stretch + 0.22 * side_lift - 0.15 * press)
    lift = np.where(t < 0, cl, cr)
    lift = np.where(lift > 0, 0.17 * lift, 0.13 * lift)
    seam = my - lift * t**2
    shape = (1 - t**2) ** 0.6
    gap = 0.3 * mopen + 0.03 * ulr
    ui = seam - (0.5 * gap * shape + 0.06 * ulr * (1 - t**2) ** 0.3)
    li = seam + (0.5 * gap + 0.2 * jaw) * shape
    ut = float(r["lip_thick"]) * (1 - 0.75 * min(press, 1)) * (1 - 0.3 * max(stretch, 0))
    uo = ui - ut * (1 - t**2) ** 0.5 - 0.006
    lo = li + 1.3 * ut * (1 - t**2) ** 0.5 + 0.006
    x = t * mw

    # Nasolabial folds (cheek raise, nose wrinkle, upper-lip raise).
    fold = max(cheek, 0.8 * wrinkle, 0.5 * ulr)
    if fold > 0.2:
        c = _mix(skin, dark, 0.7 * fold)
        for sx, side in ((-1, 0), (1, -1)):
            cx, cy = x[side], seam[side]
            pts = np.array([[sx * (nw + 0.04), ny - 0.04], [sx * (nw + 0.08), ny + 0.06],
                            [cx + sx * 0.05, cy - 0.01], [cx + sx * 0.045, cy + 0.04]])
            p.line(pts, c, 0.014)

    p.fill(np.concatenate([_curve(x, uo), _curve(x, lo)[::-1]]), lip)
    if float(np.max(li - ui)) > 0.015:
        p.fill(np.concatenate([_curve(x, ui), _curve(x, li)[::-1]]), (70, 20, 25))
        teeth_h = 0.05 + 0.03 * ulr
        tt = slice(3, 18)
        tb = np.minimum(ui[tt] + teeth_h, li[tt])
        p.fill(np.concatenate([_curve(x[tt], ui[tt]), _curve(x[tt], tb)[::-1]]),
               (235, 232, 220))
    p.line(_curve(x, ui), _mix(lip, (40, 10, 10), 0.6), 0.014)
    if cl > 0.35 or cr > 0.35:  # dimples at raised corners
        c = _mix(skin, dark, 0.5)
        for idx, sx, v in ((0, -1, cl), (-1, 1, cr)):
            if v > 0.35:
                p.line(np.array([[x[idx] + sx * 0.02, seam[idx] - 0.05],
                                 [x[idx] + sx * 0.035, seam[idx] + 0.0]]), c, 0.012)


def _draw_occluder(p: _Painter, r: Mapping) -> None:
    kind = int(r["occ_type"])
    if kind == 0:
        return
    col = (float(r["occ_r"]), float(r["occ_g"]), float(r["occ_b"]))
    ox, oy = float(r["occ_x"]), float(r["occ_y"])
    w, h, ang = float(r["occ_w"]), float(r["occ_h"]), float(r["occ_angle"])
    if kind == 1:  # hand: palm + fingers
        ox = math.copysign(0.2 + abs(ox) * 0.5, ox)
        oy = 0.2 + 0.4 * (oy + 0.1)
        p.fill(_ellipse(ox, oy, w * 1.2, w * 0.9, angle_deg=ang), col)
        a = math.radians(ang)
        d = np.array([math.cos(a), math.sin(a)])
        n = np.array([-d[1], d[0]])
        for k in range(4):
            base = np.array([ox, oy]) + n * w * (k - 1.5) * 0.45
            tip = base + d * w * 1.5
            p.line(np.array([base, tip]), col, 0.11)
        c = _scaled(col, 0.75)
        for k in range(3):
            base = np.array([ox, oy]) + n * w * (k - 1.0) * 0.45
            p.line(np.array([base + d * w * 0.6, base + d * w * 1.5]), c, 0.01)
    elif kind == 2:  # glasses; sunglasses when occ_fill
        ey, es, ew = float(r["eye_y"]), float(r["eye_spacing"]), float(r["eye_size"])
        for sx in (-1, 1):
            lens = _ellipse(sx * es, ey + 0.01, ew * 1.55, ew * 1.15, n=24)
            if float(r["occ_fill"]) > 0.5:
                p.fill(lens, _scaled(col, 0.5))
            p.line(lens, col, 0.03, closed=True)
        p.line(np.array([[-es + ew * 1.5, ey], [0, ey - 0.03], [es - ew * 1.5, ey]]), col, 0.025)
    else:  # bar: a rotated rectangle, e.g. a microphone or a pen
        a = math.radians(ang)
        d = np.array([math.cos(a), math.sin(a)]) * (w * 2.2)
        n = np.array([-math.sin(a), math.cos(a)]) * (h * 0.35)
        c = np.array([ox, oy + 0.25])
        p.fill(np.array([c - d - n, c + d - n, c + d + n, c - d + n]), col)


def _supersample(size: int) -> int:
    return max(2, math.ceil(96 / size))


def render_face(row: Mapping, size: int) -> np.ndarray:
    """Render one row of `sample_faces` as a (size, size, 3) uint8 RGB image (deterministic)."""
    size = int(size)
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    ss = _supersample(size)
    c = size * ss
    rng = np.random.default_rng(int(row["noise_seed"]))
    img = np.ascontiguousarray(_background(row, c, rng))
    # cv2 puts pixel centres on integer coordinates, so the mirror axis of the canvas is (c-1)/2.
    center = ((c - 1) / 2 + c * float(row["shift_x"]),
              (c - 1) / 2 + c * (float(row["shift_y"]) - 0.03))
    radius = c * 0.41 * float(row["scale"])
    p = _Painter(img, center, radius, float(row["tilt_deg"]))
    _draw_face(p, row)
    _draw_occluder(p, row)
    p.flush()
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)

    blur = float(row["blur"]) * size / 64.0
    if blur > 0.05:
        img = cv2.GaussianBlur(img, (0, 0), blur)
    out = img.astype(np.float32)
    g = np.linspace(-1, 1, size, dtype=np.float32)
    a = float(row["light_angle"])
    light = (1 + float(row["light_strength"]) * (g[None, :] * math.cos(a)
                                                 + g[:, None] * math.sin(a)))
    out *= (light * float(row["brightness"]))[..., None]
    if float(row["noise_std"]) > 0:
        out += rng.standard_normal(out.shape, dtype=np.float32) * float(row["noise_std"])
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def render_faces(table: pd.DataFrame, size: int) -> np.ndarray:
    """Render every row of a `sample_faces` table: (len(table), size, size, 3) uint8 RGB."""
    out = np.empty((len(table), int(size), int(size), 3), dtype=np.uint8)
    for k, row in enumerate(table.to_dict("records")):
        out[k] = render_face(row, size)
    return out


def write_dataset(out, n: int, size: int, seed: int = 0, label_noise: float = 0.05,
                  identities: int = 100):
    """Write `n` faces as PNGs plus `labels.csv` (a `data.source: csv` dataset). Returns the CSV path."""
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    table = sample_faces(n, seed=seed, label_noise=label_noise, identities=identities)
    for i, row in enumerate(table.itertuples(index=False)):
        Image.fromarray(render_face(row._asdict(), size)).save(out / "images" / f"{i:06d}.png")
    labels = pd.DataFrame({"path": [f"images/{i:06d}.png" for i in range(n)],
                           "expression": table["expression"], "valence": table["valence"].round(4),
                           "arousal": table["arousal"].round(4), "subject": table["subject"]})
    atomic_write_text(out / "labels.csv", labels.to_csv(index=False))
    return out / "labels.csv"
