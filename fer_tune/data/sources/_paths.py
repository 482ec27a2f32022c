"""Path safety: every image path a dataset lists or holds stays inside its root, symlinks included."""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd

from fer_tune.data.images import is_image_name
from fer_tune.data.sources._table import NON_IMAGE_FILES
from fer_tune.errors import UserError

MAX_LISTED = 5  # how many offending paths a message lists


def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Lines:
    """Lazy "FILE line N" labels for error messages (formatted only when one is needed)."""

    def __init__(self, file: Any, lines: np.ndarray):
        self.file = str(file)
        self.lines = np.asarray(lines)

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> str:
        return f"{self.file} line {int(self.lines[i])}"

    def series(self) -> pd.Series:
        return (self.file + " line ") + pd.Series(self.lines, dtype="int64").astype(str)


def check_paths(root: Path, rel_paths: Iterable[str], where: Any, listed_in: str) -> None:
    """Reject paths whose target (following symlinks) leaves ``root`` and list missing files.

    ``rel_paths`` are already normalised relative posix paths (see `normalise_rel`). Each folder
    is listed once (fast for AffectNet's ~400k files); only symlinks are resolved one by one.
    """
    real_root = os.path.realpath(root)
    root_str = str(root)
    folders: dict[str, Optional[dict[str, bool]]] = {}  # parent -> {name: is_symlink}
    missing: list[str] = []
    for i, rel in enumerate(rel_paths):
        parent, _, name = rel.rpartition("/")
        entries = folders.get(parent, False)
        if entries is False:
            folder = os.path.join(root_str, parent) if parent else root_str
            if not inside(os.path.realpath(folder), real_root):
                raise UserError(f"{where[i]}: path escapes the dataset root {root}: {rel!r}")
            try:
                with os.scandir(folder) as it:
                    entries = {e.name: e.is_symlink() for e in it}
            except OSError:
                entries = None
            folders[parent] = entries
        if entries is None or name not in entries:
            missing.append(rel)
        elif entries[name]:  # a symlink: where does it land?
            target = os.path.realpath(os.path.join(root_str, rel))
            if not inside(target, real_root):
                raise UserError(f"{where[i]}: path escapes the dataset root {root}: {rel!r} "
                                f"links to {target}")
            if not os.path.exists(target):
                missing.append(rel)
    if missing:
        shown = ", ".join(missing[:MAX_LISTED])
        more = f", ... ({len(missing) - MAX_LISTED} more)" if len(missing) > MAX_LISTED else ""
        raise UserError(f"{listed_in}: {len(missing)} image file(s) listed there do not exist "
                        f"under {root}: {shown}{more}")


def normalise_all(paths: Iterable[str], root: Path, where: Any) -> list[str]:
    """`normalise_rel` for every path (``where[i]`` labels row i in messages)."""
    out = []
    for i, path in enumerate(paths):
        text = str(path)
        if (text and text[0] not in "/. " and text[-1] not in "/ " and "\\" not in text
                and "/." not in text and "//" not in text):
            out.append(text)  # already normal: the common case, skip normpath
        else:
            out.append(normalise_rel(text, root, where[i]))
    return out


def normalise_rel(path: str, root: Path, label: str) -> str:
    """A CSV path as a normalised posix path relative to ``root``; UserError if it leaves it."""
    text = str(path).strip().replace("\\", "/")
    if not text:
        raise UserError(f"{label}: empty image path")
    if posixpath.isabs(text) or os.path.isabs(text):
        candidates = {str(root), os.path.realpath(root)}
        norm = posixpath.normpath(text)
        for base in candidates:
            base = base.rstrip("/")
            if norm.startswith(base + "/"):
                return norm[len(base) + 1:]
        raise UserError(f"{label}: path escapes the dataset root {root}: {path!r}")
    norm = posixpath.normpath(text)
    if norm == "." or norm == ".." or norm.startswith("../"):
        raise UserError(f"{label}: path escapes the dataset root {root}: {path!r}")
    return norm


def check_file_inside(path: Path, real_root: str, root: Path) -> None:
    """For files found by scanning: a symlink (file or folder) may not point outside the root."""
    target = os.path.realpath(path)
    if not inside(target, real_root):
        rel = os.path.relpath(path, root)
        raise UserError(f"{path}: path escapes the dataset root {root}: {rel!r} links to {target}")


def image_files(folder: Path, dropped: dict, real_root: str, root: Path,
                 subfolder_reason: Optional[str] = None) -> Iterable[Path]:
    """Image files directly in `folder`, sorted; other files and subfolders are counted in `dropped`."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            if subfolder_reason:
                dropped[subfolder_reason] += 1
            continue
        if not is_image_name(entry.name):
            dropped[NON_IMAGE_FILES] += 1
            continue
        path = Path(entry.path)
        if entry.is_symlink():
            check_file_inside(path, real_root, root)
        yield path


def rel_posix(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()
