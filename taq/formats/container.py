"""The container every taq data file uses: a versioned .npz with a JSON metadata record, written atomically.

Every file taq writes carries `__meta__` (a JSON string) with at least `kind` and `format_version`, so a reader
can refuse a file of the wrong kind or version with a clear message instead of failing later on a missing key.
`read_meta` reads that record alone (one zip member), so callers that need the metadata never load the arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

META_KEY = "__meta__"


class TaqFormatError(ValueError):
    """A file is missing, of the wrong kind or version, or its contents fail validation."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    if not path.parent.exists():
        raise TaqFormatError(f"{path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_output_path(output: str | os.PathLike) -> Path:
    """The output file must be creatable: its directory exists and is writable, and it is not a directory."""
    output = Path(output)
    parent = output.parent
    if output.is_dir():
        raise ValueError(f"output {output} is a directory; give a file name")
    if not parent.exists():
        raise FileNotFoundError(f"output directory {parent} does not exist")
    if not parent.is_dir():
        raise ValueError(f"output directory {parent} is not a directory")
    try:  # a real probe: os.access says yes to root even on read-only file systems
        tempfile.TemporaryFile(dir=parent).close()
    except OSError:
        raise PermissionError(f"output directory {parent} is not writable") from None
    return output


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict, *, kind: str, version: int) -> None:
    """Write `arrays` and `meta` (JSON-serializable) to `path` atomically."""
    record = {"kind": kind, "format_version": version, **meta}
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    payload[META_KEY] = np.array(json.dumps(record, sort_keys=True))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **payload)


def _open(path: Path):
    if not path.is_file():
        raise TaqFormatError(f"{path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # zip or npy errors come in many types
        raise TaqFormatError(f"{path}: not a readable .npz file ({exc})") from exc


def _check_meta(path: Path, data, kind: str, version: int) -> dict:
    if META_KEY not in data.files:
        raise TaqFormatError(f"{path}: no {META_KEY} record; not a taq {kind} file")
    try:
        meta = json.loads(str(data[META_KEY]))
    except Exception as exc:
        raise TaqFormatError(f"{path}: unreadable {META_KEY} record ({exc})") from exc
    if meta.get("kind") != kind:
        raise TaqFormatError(f"{path}: is a taq {meta.get('kind')!r} file, expected {kind!r}")
    if meta.get("format_version") != version:
        raise TaqFormatError(f"{path}: format version {meta.get('format_version')}, this taq reads version {version}")
    return meta


def read_meta(path: str | os.PathLike, *, kind: str, version: int) -> dict:
    """The metadata record of a taq .npz file (kind and version checked) without reading its arrays."""
    path = Path(path)
    with _open(path) as data:
        return _check_meta(path, data, kind, version)


def load_npz(path: str | os.PathLike, *, kind: str, version: int, required: dict[str, int]) -> tuple[dict[str, np.ndarray], dict]:
    """Read a taq .npz file, checking its kind, version and that `required` keys have the given ndim."""
    path = Path(path)
    with _open(path) as data:
        meta = _check_meta(path, data, kind, version)
        try:
            arrays = {k: data[k] for k in data.files if k != META_KEY}
        except Exception as exc:
            raise TaqFormatError(f"{path}: not a readable .npz file ({exc})") from exc
    for key, ndim in required.items():
        if key not in arrays:
            raise TaqFormatError(f"{path}: missing key {key!r}")
        if arrays[key].ndim != ndim:
            raise TaqFormatError(f"{path}: {key!r} has shape {arrays[key].shape}, expected {ndim} dimensions")
    return arrays, meta


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
