"""`synthetic`: the built-in procedural faces of `fer_tune.data.synthetic` (no files)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from fer_tune.data.sources._registry import Source, register_source
from fer_tune.data.synthetic import render_face, sample_faces

DEFAULT_SYNTHETIC_SIZE = 64
"""Size the synthetic faces are drawn at when `read_image` gets no ``size``."""

_SYNTH_PREFIX = "synth_"
_SYNTH_CLASHES = ("image", "face_x", "face_y", "face_w", "face_h")


@register_source("synthetic")
class SyntheticSource(Source):
    """Procedurally drawn faces from `fer_tune.data.synthetic` (no files)."""

    root_kind = None
    description = "data.synthetic.n > 0 generated faces"

    def load(self, data) -> pd.DataFrame:
        spec = data.synthetic
        faces = sample_faces(spec.n, spec.seed, spec.label_noise, spec.identities)
        faces = faces.reset_index(drop=True)
        # Renderer parameters whose names clash with the table's own columns (the renderer's
        # face_w / face_h are face-shape ratios, not a face box) are kept as synth_<name>;
        # read_image hands them back to the renderer under their own names.
        clash = {c: _SYNTH_PREFIX + c for c in faces.columns if c in _SYNTH_CLASHES}
        table = faces.rename(columns=clash)
        table["image"] = [f"synthetic/{i:06d}" for i in range(len(faces))]
        if "source_split" not in table:
            table["source_split"] = ""
        if "subject" not in table:
            table["subject"] = ""
        table.attrs = {"dropped": dict(faces.attrs.get("dropped", {}))}
        return table

    def dataset_root(self, data) -> Path:
        return Path("synthetic")

    def read_image(self, data, row, *, size: Optional[int] = None) -> np.ndarray:
        if hasattr(row, "to_dict"):
            params = row.to_dict()
        elif hasattr(row, "_asdict"):
            params = row._asdict()
        else:
            params = dict(row)
        for name in _SYNTH_CLASHES:
            if _SYNTH_PREFIX + name in params:
                params[name] = params[_SYNTH_PREFIX + name]
        image = render_face(params, int(size) if size else DEFAULT_SYNTHETIC_SIZE)
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return np.ascontiguousarray(image.astype(np.uint8, copy=False))
