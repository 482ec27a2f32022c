"""`affectnet-npy`: the common 8-class release, `<split>/images/<id>.jpg` with `<split>/annotations/<id>_exp.npy`."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from fer_tune.data.sources._paths import check_file_inside, image_files, rel_posix
from fer_tune.data.sources._registry import Source, register_source
from fer_tune.data.sources._table import NON_IMAGE_FILES
from fer_tune.data.sources.affectnet import AFFECTNET_DROP_EXPRESSION, AFFECTNET_DROP_VA
from fer_tune.errors import UserError, one_line

NPY_SPLIT_FOLDERS = {
    "train_set": "train", "train": "train",
    # AffectNet's validation set is the usual held-out test set.
    "val_set": "test", "val": "test", "validation": "test",
    "test_set": "test", "test": "test",
}
"""Split folder names of the ``affectnet-npy`` source and the split each one means."""


@register_source("affectnet-npy")
class AffectNetNpySource(Source):
    """AffectNet as [<split>/]images/<id>.jpg with annotations/<id>_{exp,val,aro}.npy."""

    description = ("[<split>/]images/<id>.jpg with [<split>/]annotations/<id>_exp.npy, "
                   "<id>_val.npy, <id>_aro.npy (split folders: "
                   + ", ".join(NPY_SPLIT_FOLDERS) + ")")

    def load(self, data) -> pd.DataFrame:
        root = Path(data.root)
        groups: list[tuple[Path, str]] = []
        if (root / "images").is_dir():
            groups.append((root, ""))
        for child in sorted(root.iterdir()):
            if not child.is_dir() or child.name.startswith(".") or child.name == "images":
                continue
            split = NPY_SPLIT_FOLDERS.get(child.name.lower())
            if split is not None:
                if (child / "images").is_dir():
                    groups.append((child, split))
                else:
                    raise UserError(f"{child}: split folder has no images/ folder; expected "
                                    f"{child.name}/images/<id>.jpg and {child.name}/annotations/")
            elif (child / "images").is_dir():
                raise UserError(f"{child}: '{child.name}' is not a split folder name; valid: "
                                f"{', '.join(NPY_SPLIT_FOLDERS)}")
        if not groups:
            raise UserError(f"no images found under {root}: data.source 'affectnet-npy' expects "
                            f"{self.description}")
        real_root = os.path.realpath(root)
        rows = []
        dropped = {NON_IMAGE_FILES: 0, AFFECTNET_DROP_EXPRESSION: 0, AFFECTNET_DROP_VA: 0}
        for folder, split in groups:
            check_file_inside(folder / "images", real_root, root)
            ann_dir = folder / "annotations"
            if ann_dir.is_dir():
                check_file_inside(ann_dir, real_root, root)
                ann = set(os.listdir(ann_dir))
            else:
                ann = set()
            for path in image_files(folder / "images", dropped, real_root, root):
                stem = path.name.rsplit(".", 1)[0]
                exp = self._scalar(ann_dir, f"{stem}_exp.npy", ann, "expression", real_root, root)
                val = self._scalar(ann_dir, f"{stem}_val.npy", ann, "valence", real_root, root)
                aro = self._scalar(ann_dir, f"{stem}_aro.npy", ann, "arousal", real_root, root)
                if exp is not None and 8 <= exp <= 10 and exp == int(exp):
                    dropped[AFFECTNET_DROP_EXPRESSION] += 1
                    continue
                if val == -2 or aro == -2:
                    dropped[AFFECTNET_DROP_VA] += 1
                    continue
                where = ann_dir / f"{stem}_exp.npy"
                if exp is not None and not (0 <= exp <= 7 and exp == int(exp)):
                    raise UserError(f"{where}: expression {exp!r} is out of range; valid: 0..7 "
                                    f"(8-10 none/uncertain/no-face are dropped)")
                for name, v, suffix in (("valence", val, "_val"), ("arousal", aro, "_aro")):
                    if v is not None and not (-1 <= v <= 1):
                        raise UserError(f"{ann_dir / (stem + suffix + '.npy')}: {name} {v!r} is "
                                        f"outside [-1, 1] (and is not -2, the missing marker)")
                rows.append((rel_posix(path, root), -1 if exp is None else int(exp),
                             np.nan if val is None else val, np.nan if aro is None else aro,
                             split, str(path)))
        table = pd.DataFrame(rows, columns=["image", "expression", "valence", "arousal",
                                            "source_split", "_where"])
        table.attrs = {"dropped": {k: v for k, v in dropped.items() if v}}
        return table

    @staticmethod
    def _scalar(folder: Path, name: str, present: set, what: str, real_root: str, root: Path) -> Optional[float]:
        if name not in present:
            return None
        path = folder / name
        if path.is_symlink():  # an annotation is data read from the dataset too: it stays inside it
            check_file_inside(path, real_root, root)
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise UserError(f"{path}: not a readable .npy file ({one_line(err, limit=10_000)})") \
                from None
        value = np.asarray(value)
        if value.size != 1:
            raise UserError(f"{path}: expected one {what} value, found an array of shape "
                            f"{value.shape}")
        item = value.reshape(()).item()
        if isinstance(item, bytes):
            item = item.decode("utf-8", errors="replace")
        if isinstance(item, str):
            item = item.strip()
            if item == "":
                return None
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise UserError(f"{path}: {what} {item!r} is not a number") from None
        if math.isnan(number):
            return None
        return number
