"""Dataset sources: adapters that turn a dataset on disk into one table, and read its images.

Every source produces ONE `pandas.DataFrame`, one row per image, with the columns in `COLUMNS`:

- ``image``: the image path relative to the dataset root (posix separators); for the synthetic
  source ``"synthetic/000123"``;
- ``expression``: int AffectNet id 0..7 (see `fer_tune.EXPRESSIONS`), -1 when unlabelled;
- ``valence``, ``arousal``: float in [-1, 1], NaN when missing;
- ``subject``: str, ``""`` when unknown;
- ``source_split``: ``"train"``, ``"val"``, ``"test"`` or ``""``: the split the dataset assigns;
- ``face_x``, ``face_y``, ``face_w``, ``face_h``: face box in pixels, NaN when the image is
  already a face crop.

``table.attrs["dropped"]`` maps a reason to the number of rows (or files) left out, and
``table.attrs["tasks"]`` lists the tasks with at least one label, among
``["expression", "valence", "arousal"]``.

Sources live in a timm-style registry: ``@register_source("name")`` on a `Source` subclass (or a
plain ``load(data) -> DataFrame`` function) fills `SOURCES`; `load_table` and `read_image`
dispatch on ``data.source``. ``data`` is the project's ``DataSpec``; only ``data.source``,
``data.root`` and ``data.synthetic.{n,seed,label_noise,identities}`` are used.

Bad input raises `fer_tune.errors.UserError` with a one-line message; an unreadable image raises
`BadImage` (not a UserError: the caller collects those and decides).
"""

from __future__ import annotations

import math
import os
import posixpath
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import pandas as pd

from fer_tune import EXPRESSIONS
from fer_tune.errors import UserError

__all__ = [
    "COLUMNS",
    "TASKS",
    "IMAGE_EXTENSIONS",
    "EXPRESSION_ALIASES",
    "SPLIT_FOLDERS",
    "SOURCES",
    "BadImage",
    "Source",
    "register_source",
    "load_table",
    "read_image",
    "expression_id",
]

COLUMNS = ("image", "expression", "valence", "arousal", "subject", "source_split",
           "face_x", "face_y", "face_w", "face_h")
"""The columns of every source's table, in this order (the synthetic table adds its own after)."""

TASKS = ("expression", "valence", "arousal")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
"""File extensions (case-insensitive) read as images by the folder-scanning sources."""

EXPRESSION_ALIASES = {
    "angry": "anger",
    "surprised": "surprise",
    "happiness": "happy",
    "sadness": "sad",
    "fearful": "fear",
    "disgusted": "disgust",
    "neutrality": "neutral",
}
"""Other names for the classes in `fer_tune.EXPRESSIONS` (matched case-insensitively)."""

SPLIT_FOLDERS = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
"""Split folder names of the ``folder`` source and the split each one means."""

NPY_SPLIT_FOLDERS = {
    "train_set": "train", "train": "train",
    # AffectNet's validation set is the usual held-out test set.
    "val_set": "test", "val": "test", "validation": "test",
    "test_set": "test", "test": "test",
}
"""Split folder names of the ``affectnet-npy`` source and the split each one means."""

AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                     "facial_landmarks", "expression", "valence", "arousal")
AFFECTNET_DROP_EXPRESSION = "expression 8-10 (none/uncertain/no-face)"
AFFECTNET_DROP_VA = "valence/arousal == -2"
NON_IMAGE_FILES = "non-image files"

DEFAULT_SYNTHETIC_SIZE = 64
"""Size the synthetic faces are drawn at when `read_image` gets no ``size``."""

_MAX_LISTED = 5  # how many offending paths a message lists

_NAME_TO_ID = {name: i for i, name in enumerate(EXPRESSIONS)}
_NAME_TO_ID.update({alias: _NAME_TO_ID[name] for alias, name in EXPRESSION_ALIASES.items()})


# ---------------------------------------------------------------------------------------------
# Errors and registry


class BadImage(Exception):
    """An image file that cannot be read: missing, unreadable, truncated or not an image.

    Not a `UserError`: the data pipeline collects these (and may skip them) instead of stopping.
    Picklable, so it survives DataLoader worker processes.
    """

    def __init__(self, path: Any, reason: str):
        super().__init__(str(path), str(reason))
        self.path = str(path)
        self.reason = str(reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class Source:
    """One on-disk format. Subclasses implement `load`; file-based ones inherit `read_image`.

    ``root_kind`` says what ``data.root`` must be: ``"dir"``, ``"file_or_dir"`` or ``None`` (no
    root needed). `load` returns the rows plus an optional internal ``_where`` column (a label
    like ``"labels.csv line 4"`` used in error messages) and ``attrs["dropped"]``;
    `load_table` checks and normalises the result.
    """

    name: str = ""
    root_kind: Optional[str] = "dir"
    description: str = ""

    def load(self, data) -> pd.DataFrame:
        raise NotImplementedError

    def dataset_root(self, data) -> Path:
        """The folder that the ``image`` column is relative to."""
        if data.root is None:
            raise UserError(f"data.root is not set: data.source '{self.name}' needs it; "
                            f"set it with --set data.root=PATH")
        return Path(data.root)

    def read_image(self, data, row, *, size: Optional[int] = None) -> np.ndarray:
        root = self.dataset_root(data)
        rel = str(_field(row, "image"))
        path = root / rel
        real_root = os.path.realpath(root)
        if not _inside(os.path.realpath(path), real_root):
            raise BadImage(path, f"path escapes the dataset root {root}")
        image = _read_rgb(path)
        return _crop(image, row, path)


class _FunctionSource(Source):
    def __init__(self, fn: Callable, root_kind: Optional[str] = "dir"):
        self._fn = fn
        self.root_kind = root_kind
        self.description = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""

    def load(self, data) -> pd.DataFrame:
        return self._fn(data)


SOURCES: dict[str, Source] = {}
"""Registered sources by name (filled by `register_source`)."""


def register_source(name: str, *, root_kind: Optional[str] = "dir"):
    """Decorator registering a `Source` subclass (instantiated without arguments), a `Source`
    instance, or a function ``load(data) -> DataFrame`` (``root_kind`` applies to functions)
    under ``name``. Returns the decorated object unchanged."""

    def decorate(obj):
        if isinstance(obj, type) and issubclass(obj, Source):
            source = obj()
        elif isinstance(obj, Source):
            source = obj
        elif callable(obj):
            source = _FunctionSource(obj, root_kind)
        else:
            raise TypeError(f"register_source({name!r}) needs a Source subclass or a function")
        existing = SOURCES.get(name)
        if existing is not None and _qualname(existing) != _qualname(source):
            raise ValueError(f"source {name!r} is already registered ({_qualname(existing)})")
        source.name = name
        SOURCES[name] = source
        return obj

    return decorate


def _qualname(source: Source) -> str:
    target = source._fn if isinstance(source, _FunctionSource) else type(source)
    return f"{target.__module__}.{target.__qualname__}"


def _get_source(data) -> Source:
    name = data.source
    try:
        return SOURCES[name]
    except (KeyError, TypeError):
        raise UserError(f"data.source: unknown source {name!r}; valid sources: "
                        f"{', '.join(sorted(SOURCES))}") from None


def load_table(data) -> pd.DataFrame:
    """Load the dataset described by ``data`` as one table (see the module docstring)."""
    source = _get_source(data)
    _check_root(data, source)
    raw = source.load(data)
    return _finalize(raw, source, data)


def read_image(data, row, *, size: Optional[int] = None) -> np.ndarray:
    """One row's image as an (H, W, 3) uint8 RGB array, cropped to its face box when it has one.

    ``row`` is a table row (Series, mapping or namedtuple). ``size`` is used by the synthetic
    source only (its faces are drawn at that size); file sources return the stored pixels.
    Raises `BadImage` for a missing, unreadable, truncated or non-image file.
    """
    return _get_source(data).read_image(data, row, size=size)


def expression_id(value: Any) -> Optional[int]:
    """An expression label (id, numeric string or class name/alias, any case) as its id 0..7,
    or None when ``value`` is not a valid label (empty values are not labels either)."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value) if 0 <= int(value) < len(EXPRESSIONS) else None
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value) and value == int(value) and 0 <= value < len(EXPRESSIONS):
            return int(value)
        return None
    text = str(value).strip().lower()
    if text in _NAME_TO_ID:
        return _NAME_TO_ID[text]
    try:
        number = float(text)
    except ValueError:
        return None
    return expression_id(number)


# ---------------------------------------------------------------------------------------------
# Shared checks and helpers


def _check_root(data, source: Source) -> None:
    kind = source.root_kind
    if kind is None:
        return
    root = data.root
    what = "a dataset folder" if kind == "dir" else "a CSV file or a folder holding labels.csv"
    if root is None:
        raise UserError(f"data.root is not set: data.source '{source.name}' needs {what}; "
                        f"set it with --set data.root=PATH")
    root = Path(root)
    if not root.exists():
        raise UserError(f"data.root '{root}' does not exist; point it at {what} with "
                        f"--set data.root=PATH")
    if kind == "dir" and not root.is_dir():
        raise UserError(f"data.root '{root}' is not a directory: data.source '{source.name}' "
                        f"needs {what}; point elsewhere with --set data.root=PATH")
    if kind == "file_or_dir" and not (root.is_dir() or root.is_file()):
        raise UserError(f"data.root '{root}' is neither a file nor a directory: data.source "
                        f"'{source.name}' needs {what}; point elsewhere with --set data.root=PATH")


def _finalize(raw: pd.DataFrame, source: Source, data) -> pd.DataFrame:
    dropped = dict(raw.attrs.get("dropped", {}))
    where = raw["_where"] if "_where" in raw.columns else raw.get("image")
    root = getattr(data, "root", None)
    if len(raw) == 0:
        detail = f" (dropped: {_fmt_dropped(dropped)})" if dropped else ""
        place = f"under {root}" if source.root_kind is not None else f"in source '{source.name}'"
        raise UserError(f"no images found {place}{detail}; data.source '{source.name}' expects "
                        f"{source.description}")
    raw = raw.reset_index(drop=True)
    where = where.reset_index(drop=True) if where is not None else pd.Series(range(len(raw)))

    n = len(raw)
    out: dict[str, Any] = {}
    out["image"] = raw["image"].astype(str).to_numpy(dtype=object)

    expr = pd.to_numeric(raw["expression"], errors="coerce") if "expression" in raw else \
        pd.Series(np.full(n, -1))
    bad = expr.isna() | (expr != expr.round()) | (expr < -1) | (expr >= len(EXPRESSIONS))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{where.iloc[i]}: expression {raw['expression'].iloc[i]!r} is out of "
                        f"range; valid: 0..{len(EXPRESSIONS) - 1} or empty for unlabelled")
    out["expression"] = expr.to_numpy().astype(np.int64)

    for col in ("valence", "arousal"):
        values = pd.to_numeric(raw[col], errors="coerce").to_numpy(dtype=np.float64) \
            if col in raw else np.full(n, np.nan)
        bad = ~np.isnan(values) & ((values < -1) | (values > 1) | ~np.isfinite(values))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"{where.iloc[i]}: {col} {values[i]!r} is outside [-1, 1]")
        out[col] = values

    out["subject"] = _str_column(raw["subject"]) if "subject" in raw else np.full(n, "", object)
    if "source_split" in raw:
        split = _str_column(raw["source_split"])
        bad = ~np.isin(split, ["train", "val", "test", ""])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"{where.iloc[i]}: source_split {split[i]!r} is not one of "
                            f"train, val, test or empty")
        out["source_split"] = split
    else:
        out["source_split"] = np.full(n, "", object)

    box = np.stack([pd.to_numeric(raw[c], errors="coerce").to_numpy(dtype=np.float64)
                    if c in raw else np.full(n, np.nan)
                    for c in ("face_x", "face_y", "face_w", "face_h")], axis=1)
    nan = np.isnan(box)
    partial = nan.any(axis=1) & ~nan.all(axis=1)
    full = ~nan.any(axis=1)
    invalid = partial | (full & ((box[:, 2] <= 0) | (box[:, 3] <= 0) | ~np.isfinite(box).all(1)))
    if invalid.any():
        i = int(np.flatnonzero(invalid)[0])
        raise UserError(f"{where.iloc[i]}: face box (x, y, w, h) = {tuple(box[i].tolist())} is "
                        f"invalid; give all four with w, h > 0, or none for a cropped face")
    for j, c in enumerate(("face_x", "face_y", "face_w", "face_h")):
        out[c] = box[:, j]

    table = pd.DataFrame(out)
    table["image"] = table["image"].astype(str)
    table["subject"] = table["subject"].astype(str)
    table["source_split"] = table["source_split"].astype(str)
    extra = [c for c in raw.columns if c not in COLUMNS and c != "_where"]
    if extra:
        table = pd.concat([table, raw[extra]], axis=1)

    tasks = []
    if (table["expression"] >= 0).any():
        tasks.append("expression")
    for col in ("valence", "arousal"):
        if table[col].notna().any():
            tasks.append(col)
    table.attrs["dropped"] = dropped
    table.attrs["tasks"] = tasks
    return table


def _fmt_dropped(dropped: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in dropped.items())


def _str_column(series: pd.Series) -> np.ndarray:
    values = series.to_numpy(dtype=object)
    return np.array(["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)
                     for v in values], dtype=object)


def _field(row, key: str, default: Any = None) -> Any:
    try:
        return row[key]
    except (KeyError, TypeError, IndexError):
        return getattr(row, key, default)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("._")


def _read_rgb(path: Path, upright: bool = False) -> np.ndarray:
    """RGB uint8 (H, W, 3); `upright` applies a photo's EXIF orientation (for camera photos)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            rgb = (ImageOps.exif_transpose(im) if upright else im).convert("RGB")
    except FileNotFoundError:
        raise BadImage(path, "file not found") from None
    except UnidentifiedImageError:
        raise BadImage(path, "not an image (unknown format)") from None
    except Image.DecompressionBombError as err:
        raise BadImage(path, f"image too large: {err}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise BadImage(path, f"unreadable or truncated image: {err}") from None
    array = np.asarray(rgb, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3 or array.size == 0:
        raise BadImage(path, f"unexpected image shape {array.shape}")
    return np.ascontiguousarray(array)


def _crop(image: np.ndarray, row, path: Path) -> np.ndarray:
    box = []
    for key in ("face_x", "face_y", "face_w", "face_h"):
        value = _field(row, key, None)
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        box.append(value)
    if any(math.isnan(v) for v in box):
        return image
    x, y, w, h = box
    height, width = image.shape[:2]
    x0 = max(0, int(math.floor(x)))
    y0 = max(0, int(math.floor(y)))
    x1 = min(width, int(math.ceil(x + w)))
    y1 = min(height, int(math.ceil(y + h)))
    if x1 <= x0 or y1 <= y0:
        raise BadImage(path, f"face box {tuple(box)} lies outside the {width}x{height} image")
    return np.ascontiguousarray(image[y0:y1, x0:x1])


class _Lines:
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


def _check_paths(root: Path, rel_paths: Iterable[str], where: Any, listed_in: str) -> None:
    """Reject paths whose target (following symlinks) leaves ``root`` and list missing files.

    ``rel_paths`` are already normalised relative posix paths (see `_normalise_rel`). Each folder
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
            if not _inside(os.path.realpath(folder), real_root):
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
            if not _inside(target, real_root):
                raise UserError(f"{where[i]}: path escapes the dataset root {root}: {rel!r} "
                                f"links to {target}")
            if not os.path.exists(target):
                missing.append(rel)
    if missing:
        shown = ", ".join(missing[:_MAX_LISTED])
        more = f", ... ({len(missing) - _MAX_LISTED} more)" if len(missing) > _MAX_LISTED else ""
        raise UserError(f"{listed_in}: {len(missing)} image file(s) listed there do not exist "
                        f"under {root}: {shown}{more}")


def _normalise_all(paths: Iterable[str], root: Path, where: Any) -> list[str]:
    """`_normalise_rel` for every path (``where[i]`` labels row i in messages)."""
    out = []
    for i, path in enumerate(paths):
        text = str(path)
        if (text and text[0] not in "/. " and text[-1] not in "/ " and "\\" not in text
                and "/." not in text and "//" not in text):
            out.append(text)  # already normal: the common case, skip normpath
        else:
            out.append(_normalise_rel(text, root, where[i]))
    return out


def _normalise_rel(path: str, root: Path, label: str) -> str:
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


def _check_file_inside(path: Path, real_root: str, root: Path) -> None:
    """For files found by scanning: a symlink (file or folder) may not point outside the root."""
    target = os.path.realpath(path)
    if not _inside(target, real_root):
        rel = os.path.relpath(path, root)
        raise UserError(f"{path}: path escapes the dataset root {root}: {rel!r} links to {target}")


def _image_files(folder: Path, dropped: dict, real_root: str, root: Path,
                 subfolder_reason: Optional[str] = None) -> Iterable[Path]:
    """Image files directly in `folder`, sorted; other files and subfolders are counted in `dropped`."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            if subfolder_reason:
                dropped[subfolder_reason] += 1
            continue
        if not _is_image_name(entry.name):
            dropped[NON_IMAGE_FILES] += 1
            continue
        path = Path(entry.path)
        if entry.is_symlink():
            _check_file_inside(path, real_root, root)
        yield path


def _rel_posix(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


# ---------------------------------------------------------------------------------------------
# synthetic


_SYNTH_PREFIX = "synth_"
_SYNTH_CLASHES = ("image", "face_x", "face_y", "face_w", "face_h")


@register_source("synthetic")
class SyntheticSource(Source):
    """Procedurally drawn faces from `fer_tune.data.synthetic` (no files)."""

    root_kind = None
    description = "data.synthetic.n > 0 generated faces"

    def load(self, data) -> pd.DataFrame:
        from fer_tune.data.synthetic import sample_faces

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
        from fer_tune.data.synthetic import render_face

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


# ---------------------------------------------------------------------------------------------
# affectnet (official CSVs)


@register_source("affectnet")
class AffectNetSource(Source):
    """AffectNet's official training.csv / validation.csv with Manually_Annotated_Images/."""

    description = ("AffectNet's training.csv / validation.csv in the root or in "
                   "Manually_Annotated_file_lists/, images under the root or "
                   "Manually_Annotated_Images/")

    def load(self, data) -> pd.DataFrame:
        root = Path(data.root)
        found = []
        for name, split in (("training.csv", "train"), ("validation.csv", "test")):
            for folder in (root, root / "Manually_Annotated_file_lists"):
                if (folder / name).is_file():
                    found.append((folder / name, split))
                    break
        if not found:
            raise UserError(f"data.root '{root}': no training.csv or validation.csv in it or in "
                            f"Manually_Annotated_file_lists/; data.source 'affectnet' needs "
                            f"AffectNet's official CSVs (point elsewhere: --set data.root=PATH)")
        parts = []
        dropped: dict[str, int] = {}
        for csv_path, split in found:
            part, part_dropped = self._read_csv(csv_path, split, root)
            parts.append(part)
            for k, v in part_dropped.items():
                dropped[k] = dropped.get(k, 0) + v
        table = pd.concat(parts, ignore_index=True)
        table.attrs = {"dropped": {k: v for k, v in dropped.items() if v}}
        return table

    def _read_csv(self, csv_path: Path, split: str, root: Path):
        try:
            with open(csv_path, encoding="utf-8-sig", errors="replace") as f:
                first = f.readline()
        except OSError as err:
            raise UserError(f"{csv_path}: cannot read: {err}") from None
        has_header = "subdirectory_filepath" in first.lower()
        try:
            raw = pd.read_csv(csv_path, header=0 if has_header else None,
                              names=None if has_header else list(AFFECTNET_COLUMNS),
                              usecols=lambda c: str(c).strip() != "facial_landmarks",
                              dtype=str, keep_default_na=False, skipinitialspace=True,
                              encoding="utf-8-sig")
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
            msg = " ".join(str(err).split())
            raise UserError(f"{csv_path}: not a readable AffectNet CSV: {msg}") from None
        raw.columns = [str(c).strip() for c in raw.columns]
        needed = ["subDirectory_filePath", "expression", "valence", "arousal"]
        missing = [c for c in needed if c not in raw.columns]
        if missing:
            raise UserError(f"{csv_path}: missing column {missing[0]!r}; AffectNet CSVs need "
                            f"{', '.join(AFFECTNET_COLUMNS)}")
        first_line = 2 if has_header else 1
        lines = np.arange(len(raw)) + first_line

        expr_text = raw["expression"].str.strip()
        expr = pd.to_numeric(expr_text, errors="coerce")
        bad = expr.isna() | (expr != expr.round()) | (expr < 0) | (expr > 10)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{csv_path} line {lines[i]}: expression {expr_text.iloc[i]!r} is out "
                            f"of range; valid: 0..7, or 8-10 (none/uncertain/no-face, dropped)")
        va = {}
        for col in ("valence", "arousal"):
            text = raw[col].str.strip()
            values = pd.to_numeric(text, errors="coerce")
            bad = values.isna() & (text != "")
            if bad.any():
                i = int(np.flatnonzero(bad.to_numpy())[0])
                raise UserError(f"{csv_path} line {lines[i]}: {col} {text.iloc[i]!r} is not a "
                                f"number; valid: -1..1 or -2 (missing)")
            va[col] = values.to_numpy(dtype=np.float64)

        drop_expr = (expr >= 8).to_numpy()
        drop_va = ~drop_expr & ((va["valence"] == -2) | (va["arousal"] == -2))
        keep = ~(drop_expr | drop_va)
        for col in ("valence", "arousal"):
            values = va[col]
            bad = keep & ~np.isnan(values) & ((values < -1) | (values > 1))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise UserError(f"{csv_path} line {lines[i]}: {col} {values[i]!r} is outside "
                                f"[-1, 1] (and is not -2, AffectNet's missing marker)")
        dropped = {AFFECTNET_DROP_EXPRESSION: int(drop_expr.sum()),
                   AFFECTNET_DROP_VA: int(drop_va.sum())}

        raw = raw.loc[keep].reset_index(drop=True)
        lines = lines[keep]
        wheres = _Lines(csv_path, lines)
        rels = _normalise_all(raw["subDirectory_filePath"], root, wheres)
        prefix = ""
        if rels and not (root / rels[0]).exists() and \
                (root / "Manually_Annotated_Images" / rels[0]).exists():
            prefix = "Manually_Annotated_Images/"
        rels = [prefix + r for r in rels]
        _check_paths(root, rels, wheres, str(csv_path))

        def box(col):
            if col not in raw:
                return np.full(len(raw), np.nan)
            return pd.to_numeric(raw[col].str.strip(), errors="coerce").to_numpy(dtype=np.float64)

        table = pd.DataFrame({
            "image": rels,
            "expression": expr[keep].to_numpy().astype(np.int64),
            "valence": va["valence"][keep],
            "arousal": va["arousal"][keep],
            "subject": "",
            "source_split": split,
            "face_x": box("face_x"),
            "face_y": box("face_y"),
            "face_w": box("face_width"),
            "face_h": box("face_height"),
            "_where": wheres.series(),
        })
        return table, dropped


# ---------------------------------------------------------------------------------------------
# affectnet-npy


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
            _check_file_inside(folder / "images", real_root, root)
            ann_dir = folder / "annotations"
            if ann_dir.is_dir():
                _check_file_inside(ann_dir, real_root, root)
                ann = set(os.listdir(ann_dir))
            else:
                ann = set()
            for path in _image_files(folder / "images", dropped, real_root, root):
                stem = path.name.rsplit(".", 1)[0]
                exp = self._scalar(ann_dir, f"{stem}_exp.npy", ann, "expression")
                val = self._scalar(ann_dir, f"{stem}_val.npy", ann, "valence")
                aro = self._scalar(ann_dir, f"{stem}_aro.npy", ann, "arousal")
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
                rows.append((_rel_posix(path, root), -1 if exp is None else int(exp),
                             np.nan if val is None else val, np.nan if aro is None else aro,
                             split, str(path)))
        table = pd.DataFrame(rows, columns=["image", "expression", "valence", "arousal",
                                            "source_split", "_where"])
        table.attrs = {"dropped": {k: v for k, v in dropped.items() if v}}
        return table

    @staticmethod
    def _scalar(folder: Path, name: str, present: set, what: str) -> Optional[float]:
        if name not in present:
            return None
        path = folder / name
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise UserError(f"{path}: not a readable .npy file ({' '.join(str(err).split())})") \
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


# ---------------------------------------------------------------------------------------------
# folder


@register_source("folder")
class FolderSource(Source):
    """<root>/[<split>/]<class>/*.{jpg,jpeg,png,bmp,webp}; class folders named after expressions."""

    description = ("[<split>/]<class>/*.jpg folders; classes: "
                   + ", ".join(EXPRESSIONS) + " (or 0..7, or aliases "
                   + ", ".join(EXPRESSION_ALIASES) + "); splits: " + ", ".join(SPLIT_FOLDERS))

    @staticmethod
    def _class_id(name: str) -> Optional[int]:
        text = name.strip().lower()
        if text in _NAME_TO_ID:
            return _NAME_TO_ID[text]
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
                _check_file_inside(split_dir, real_root, root)
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
            _check_file_inside(class_dir, real_root, root)
            label = self._class_id(class_dir.name)
            count = 0
            for path in _image_files(class_dir, dropped, real_root, root,
                                     subfolder_reason="subfolders inside class folders (not read)"):
                rows.append((_rel_posix(path, root), label, split))
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
            elif _is_image_name(entry.name):
                dropped["images outside class folders"] += 1
            else:
                dropped[NON_IMAGE_FILES] += 1
        return dirs


# ---------------------------------------------------------------------------------------------
# csv


@register_source("csv")
class CsvSource(Source):
    """A CSV with columns path, expression[, valence, arousal, subject, face_x, face_y, face_w,
    face_h]; paths relative to the CSV's folder."""

    root_kind = "file_or_dir"
    required = ("path", "expression")
    optional = ("valence", "arousal", "subject", "face_x", "face_y", "face_w", "face_h")
    description = ("a CSV file (or a folder holding labels.csv) with columns path, expression"
                   "[, valence, arousal, subject, face_x, face_y, face_w, face_h]")

    @staticmethod
    def _csv_path(data) -> Path:
        root = Path(data.root)
        return root / "labels.csv" if root.is_dir() else root

    def dataset_root(self, data) -> Path:
        root = super().dataset_root(data)
        return root if root.is_dir() else root.parent

    def load(self, data) -> pd.DataFrame:
        csv_path = self._csv_path(data)
        root = self.dataset_root(data)
        if not csv_path.is_file():
            raise UserError(f"data.root '{data.root}' is a folder without labels.csv; point "
                            f"--set data.root=PATH at the CSV file or a folder holding labels.csv")
        try:
            raw = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                              skipinitialspace=True)
        except pd.errors.EmptyDataError:
            raise UserError(f"{csv_path}: empty file; needs a header with columns "
                            f"{', '.join(self.required)}") from None
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError, OSError) as err:
            msg = " ".join(str(err).split())
            raise UserError(f"{csv_path}: not a readable CSV: {msg}") from None
        raw.columns = [str(c).strip().lower() for c in raw.columns]
        for col in self.required:
            if col not in raw.columns:
                raise UserError(f"{csv_path}: missing column '{col}'; required columns: "
                                f"{', '.join(self.required)} "
                                f"(optional: {', '.join(self.optional)})")
        box_cols = [c for c in ("face_x", "face_y", "face_w", "face_h") if c in raw.columns]
        if box_cols and len(box_cols) != 4:
            absent = [c for c in ("face_x", "face_y", "face_w", "face_h") if c not in raw.columns]
            raise UserError(f"{csv_path}: missing column '{absent[0]}'; a face box needs all of "
                            f"face_x, face_y, face_w, face_h")
        wheres = _Lines(csv_path, np.arange(len(raw)) + 2)
        n = len(raw)

        expression = np.full(n, -1, dtype=np.int64)
        for i, value in enumerate(raw["expression"].to_numpy(dtype=object)):
            text = str(value).strip()
            if text == "":
                continue
            label = expression_id(text)
            if label is None:
                raise UserError(f"{wheres[i]}: expression {text!r} is out of range; valid: "
                                f"0..{len(EXPRESSIONS) - 1}, a class name "
                                f"({', '.join(EXPRESSIONS)}) or empty for unlabelled")
            expression[i] = label

        columns: dict[str, Any] = {"expression": expression}
        for col in ("valence", "arousal", "face_x", "face_y", "face_w", "face_h"):
            if col not in raw.columns:
                continue
            text = raw[col].str.strip()
            values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
            bad = np.isnan(values) & (text != "").to_numpy()
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise UserError(f"{wheres[i]}: {col} {text.iloc[i]!r} is not a number"
                                + ("; valid: -1..1 or empty" if col in ("valence", "arousal")
                                   else ""))
            if col in ("valence", "arousal"):
                bad = ~np.isnan(values) & ((values < -1) | (values > 1))
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise UserError(f"{wheres[i]}: {col} {text.iloc[i]} is outside [-1, 1] "
                                    f"(leave it empty when missing)")
            columns[col] = values
        if "subject" in raw.columns:
            columns["subject"] = raw["subject"].str.strip().to_numpy(dtype=object)

        rels = _normalise_all(raw["path"], root, wheres)
        _check_paths(root, rels, wheres, str(csv_path))
        table = pd.DataFrame({"image": rels, **columns, "_where": wheres.series()})
        table.attrs = {"dropped": {}}
        return table
