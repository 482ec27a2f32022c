"""Files in and out: atomic writes (a temporary file beside the target, renamed over it) and
safe YAML reading.

A crash mid-write leaves the old file (or none), never a half-written one that a later run trusts.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from fer_tune.errors import UserError
from fer_tune.yaml_text import safe_yaml


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


LOCK_FILE = ".fer-tune.lock"


@contextlib.contextmanager
def folder_lock(out: Path) -> Iterator[None]:
    """Hold `out` for this command: a second fer-tune command on the same folder refuses at once.

    An advisory `flock` on out/.fer-tune.lock, released when the command ends, however it ends
    (the kernel drops it with the process), so a crashed run never leaves the folder locked.
    """
    import fcntl

    path = Path(out) / LOCK_FILE
    try:  # never through a symlink: a folder someone else made could point it at any file
        handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
    except OSError as err:
        raise UserError(f"{path}: cannot lock the experiment folder ({err.strerror or err}); a symlink is refused: "
                        f"remove it, or use another --out") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{out} is in use by another fer-tune command ({holder}); wait for it to end, "
                            f"or use another --out") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()


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
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes is not a spec (they are a few kB; the limit is "
                            f"{MAX_SPEC_BYTES:,})")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                        f"{err.start}); a spec must be a UTF-8 YAML file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read spec file ({err.strerror or err})") from None
    try:
        raw = safe_yaml(text, str(path))
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


MAX_SPEC_BYTES = 1_000_000
"""A spec or config.yaml is a few kB; reading and parsing a file past this is refused."""
