"""Files in and out: atomic writes (a temporary file beside the target, renamed over it) and
safe YAML reading.

A crash mid-write leaves the old file (or none), never a half-written one that a later run trusts.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from fer_tune.errors import UserError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=True) + "\n")


def atomic_save_npy(path: Path, array) -> None:
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, write)


def check_writable(out: Path) -> None:
    """Create the output folder `out` if needed and prove a file can be written in it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output folder is an existing file, not a folder; choose another with --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{out}: output folder is not writable ({err.strerror or err}); choose another with --out") from None


def read_yaml(path: Path) -> dict:
    """A YAML file of sections (a spec, a config.yaml), read with `yaml.safe_load` (no tags run)."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such spec file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a spec YAML file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                        f"{err.start}); a spec must be a UTF-8 YAML file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read spec file ({err.strerror or err})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}: invalid YAML{line}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections (data:, model:, ...), got {type(raw).__name__}")
    return raw
