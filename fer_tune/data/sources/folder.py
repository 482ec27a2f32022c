"""`folder`: `<root>/<split?>/<class name>/*.jpg` (FER2013, RAF-DB), class names mapped to ids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pandas as pd

from fer_tune import EXPRESSIONS
from fer_tune.data.images import IMAGE_EXTENSIONS, is_image_name
from fer_tune.data.sources._paths import check_file_inside, image_files, rel_posix
from fer_tune.data.sources._registry import Source, register_source
from fer_tune.data.sources._table import EXPRESSION_ALIASES, NAME_TO_ID, NON_IMAGE_FILES
from fer_tune.errors import UserError

SPLIT_FOLDERS = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
"""Split folder names of the ``folder`` source and the split each one means."""


@register_source("folder")
class FolderSource(Source):
    """<root>/[<split>/]<class>/*.{jpg,jpeg,png,bmp,webp}; class folders named after expressions."""

    description = ("[<split>/]<class>/*.jpg folders; classes: "
                   + ", ".join(EXPRESSIONS) + " (or 0..7, or aliases "
                   + ", ".join(EXPRESSION_ALIASES) + "); splits: " + ", ".join(SPLIT_FOLDERS))

    @staticmethod
    def _class_id(name: str) -> Optional[int]:
        text = name.strip().lower()
        if text in NAME_TO_ID:
            return NAME_TO_ID[text]
        if text.isdigit() and int(text) < len(EXPRESSIONS) and str(int(text)) == text:
            return int(text)
        return None

    def _valid_names(self) -> str:
        return (", ".join(EXPRESSIONS) + f" (or 0..{len(EXPRESSIONS) - 1}, or aliases "
                + ", ".join(EXPRESSION_ALIASES) + ")")

    def load(self, data) -> pd.DataFrame:
        root = Path(data.root)
        real_root = os.path.realpath(root)
        dropped = {NON_IMAGE_FILES: 0, "images outside class folders": 0,
                   "subfolders inside class folders (not read)": 0}
        subdirs = self._scan(root, dropped)
        split_dirs = [d for d in subdirs if d.name.lower() in SPLIT_FOLDERS
                      and self._class_id(d.name) is None]
        class_dirs = [d for d in subdirs if self._class_id(d.name) is not None]
        other = [d for d in subdirs if d not in split_dirs and d not in class_dirs]
        if other:
            raise UserError(f"{other[0]}: folder '{other[0].name}' is neither a class nor a split "
                            f"folder; valid class folders: {self._valid_names()}; split folders: "
                            f"{', '.join(SPLIT_FOLDERS)}")
        if split_dirs and class_dirs:
            raise UserError(f"{root}: mixes split folders ({split_dirs[0].name}/) and class "
                            f"folders ({class_dirs[0].name}/); put every class folder inside a "
                            f"split folder ({', '.join(SPLIT_FOLDERS)}) or use no split folders")
        groups: list[tuple[Path, str]] = []
        if split_dirs:
            for split_dir in split_dirs:
                check_file_inside(split_dir, real_root, root)
                inner = self._scan(split_dir, dropped)
                for d in inner:
                    if self._class_id(d.name) is None:
                        raise UserError(f"{d}: folder '{d.name}' is not a class folder; valid "
                                        f"class folders: {self._valid_names()}")
                if not inner:
                    raise UserError(f"{split_dir}: split folder has no class folders; valid class "
                                    f"folders: {self._valid_names()}")
                groups += [(d, SPLIT_FOLDERS[split_dir.name.lower()]) for d in inner]
        else:
            groups = [(d, "") for d in class_dirs]
        rows = []
        for class_dir, split in groups:
            check_file_inside(class_dir, real_root, root)
            label = self._class_id(class_dir.name)
            count = 0
            for path in image_files(class_dir, dropped, real_root, root,
                                     subfolder_reason="subfolders inside class folders (not read)"):
                rows.append((rel_posix(path, root), label, split))
                count += 1
            if count == 0:
                raise UserError(f"{class_dir}: class folder has no images "
                                f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove it")
        table = pd.DataFrame(rows, columns=["image", "expression", "source_split"])
        table.attrs = {"dropped": {k: v for k, v in dropped.items() if v}}
        return table

    @staticmethod
    def _scan(folder: Path, dropped: dict) -> list[Path]:
        """Sub-folders of ``folder`` (hidden ones skipped); counts the files found beside them."""
        dirs = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith(".") or entry.name == "__MACOSX":
                if not entry.is_dir():
                    dropped[NON_IMAGE_FILES] += 1
                continue
            if entry.is_dir():
                dirs.append(Path(entry.path))
            elif is_image_name(entry.name):
                dropped["images outside class folders"] += 1
            else:
                dropped[NON_IMAGE_FILES] += 1
        return dirs
