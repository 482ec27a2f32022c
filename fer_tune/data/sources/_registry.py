"""The source registry, timm-style: `@register_source("name")` fills `SOURCES`; `load_table` and
`read_image` dispatch on `data.source`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from fer_tune.data.images import BadImage, crop_face_box, read_rgb, row_value
from fer_tune.data.sources._paths import inside
from fer_tune.data.sources._table import check_root, finalize
from fer_tune.errors import UserError


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
        rel = str(row_value(row, "image"))
        path = root / rel
        real_root = os.path.realpath(root)
        if not inside(os.path.realpath(path), real_root):
            raise BadImage(path, f"path escapes the dataset root {root}")
        image = read_rgb(path)
        return crop_face_box(image, row, path)


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


def get_source(data) -> Source:
    name = data.source
    try:
        return SOURCES[name]
    except (KeyError, TypeError):
        raise UserError(f"data.source: unknown source {name!r}; valid sources: "
                        f"{', '.join(sorted(SOURCES))}") from None


def load_table(data) -> pd.DataFrame:
    """Load the dataset described by ``data`` as one table (see the module docstring)."""
    source = get_source(data)
    check_root(data, source)
    raw = source.load(data)
    return finalize(raw, source, data)


def read_image(data, row, *, size: Optional[int] = None) -> np.ndarray:
    """One row's image as an (H, W, 3) uint8 RGB array, cropped to its face box when it has one.

    ``row`` is a table row (Series, mapping or namedtuple). ``size`` is used by the synthetic
    source only (its faces are drawn at that size); file sources return the stored pixels.
    Raises `BadImage` for a missing, unreadable, truncated or non-image file.
    """
    return get_source(data).read_image(data, row, size=size)
