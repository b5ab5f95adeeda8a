"""The container every taq data file uses: a versioned .npz with a JSON metadata record, written atomically.

Every file taq writes carries `__meta__` (a JSON string) with at least `kind` and `format_version`, so a reader
can refuse a file of the wrong kind or version with a clear message instead of failing later on a missing key.
`read_meta` reads that record alone (one zip member), so callers that need the metadata never load the arrays.
Reading checks every member's CRC-32 (zip's), so a changed byte is refused rather than read as other numbers.

Writes are atomic (a temporary file renamed over the target) and honour the umask; a failed write (a full disk)
is a `WriteError` naming the file, and leaves the target as it was.
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


class WriteError(OSError):
    """Writing a file failed (e.g. the disk is full); the message names the file."""


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds. The file gets the
    mode a plain open() would give it (0666 less the umask; mkstemp's own is 0600)."""
    path = Path(path)
    if not path.parent.exists():
        raise TaqFormatError(f"{path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except OSError as exc:
            if isinstance(exc, WriteError):
                raise
            error = WriteError(f"cannot write {path}: {exc.strerror or exc}")
            error.errno = exc.errno
            raise error from None
    finally:
        tmp.unlink(missing_ok=True)


def check_input_file(path: str | os.PathLike, what: str) -> Path:
    """`path` must be a readable file; the error says which of that it is not, naming `what` ("prompts file")."""
    path = Path(path)
    if path.is_dir():
        raise TaqFormatError(f"{what} {path} is a directory, not a file")
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():
        raise TaqFormatError(f"{what} {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{what} {path} is not readable")
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: equal once symlinks and relative parts are resolved, or hard links."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet
        return False


def check_outputs_spare_inputs(outputs: dict[str, str | os.PathLike | None],
                               inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse to run when an output ({what: path}) is, or resolves to, one of the inputs: it would be destroyed."""
    for out_name, output in outputs.items():
        for in_name, source in inputs.items():
            if output is not None and source is not None and same_file(output, source):
                raise ValueError(f"{out_name} {output} is {in_name} {source}; writing it would destroy that input "
                                 "(choose another output)")


def check_outputs_in_spare(directory: str | os.PathLike, patterns: tuple[str, ...],
                           inputs: dict[str, str | os.PathLike | None]) -> None:
    """The same for a command that writes files matching `patterns` (globs) into `directory`."""
    outputs = [path for pattern in patterns for path in Path(directory).glob(pattern)]
    for name, source in inputs.items():
        if source is not None and any(same_file(source, path) for path in outputs):
            raise ValueError(f"{name} {source} is among the files written into {directory} ({', '.join(patterns)}); "
                             "writing them would destroy that input (choose another directory)")


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


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict, *, kind: str, version: int,
             compress: bool = False) -> None:
    """Write `arrays` and `meta` (JSON-serializable) to `path` atomically; `compress`: deflate every array (for
    large, sparse ones such as per-group histograms)."""
    record = {"kind": kind, "format_version": version, **meta}
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    payload[META_KEY] = np.array(json.dumps(record, sort_keys=True))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **payload)


ZIP_MAGIC = b"PK\x03\x04"  # every .npz is a zip archive


def _reason(exc: Exception) -> str:
    """A reader's error as a reason; numpy's advice to load with allow_pickle does not apply to taq's files."""
    text = str(exc)
    return "it holds object (pickled) arrays, which taq never writes" if "pickle" in text else text


def _open(path: Path):
    if path.is_dir():
        raise TaqFormatError(f"{path}: is a directory, not a taq .npz file")
    if not path.is_file():
        raise TaqFormatError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            magic = f.read(len(ZIP_MAGIC))
    except OSError as exc:
        raise TaqFormatError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if magic != ZIP_MAGIC:
        raise TaqFormatError(f"{path}: not a taq .npz file (it is not a zip archive)")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # zip or npy errors come in many types
        raise TaqFormatError(f"{path}: not a readable .npz file ({_reason(exc)})") from None


def _check_meta(path: Path, data, kind: str, version: int) -> dict:
    if META_KEY not in data.files:
        raise TaqFormatError(f"{path}: no {META_KEY} record; not a taq {kind} file")
    try:
        meta = json.loads(str(data[META_KEY]))
    except Exception as exc:
        raise TaqFormatError(f"{path}: unreadable {META_KEY} record ({_reason(exc)})") from None
    if not isinstance(meta, dict):
        raise TaqFormatError(f"{path}: its {META_KEY} record is not a JSON object")
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
            raise TaqFormatError(f"{path}: not a readable .npz file ({_reason(exc)})") from None
    for key, ndim in required.items():
        if key not in arrays:
            raise TaqFormatError(f"{path}: missing key {key!r}")
        if arrays[key].ndim != ndim:
            raise TaqFormatError(f"{path}: {key!r} has shape {arrays[key].shape}, expected {ndim} dimensions")
    return arrays, meta


def content_digest(record: str, tensors) -> str:
    """SHA-256 of a metadata record (its JSON text) and of (name, dtype, shape, raw bytes) of every tensor, in
    name order: what a .safetensors file of taq's stores, as it has no checksum of its own."""
    digest = hashlib.sha256(record.encode())
    for name, dtype, shape, data in sorted(tensors, key=lambda tensor: tensor[0]):
        digest.update(f"\0{name}\0{dtype}\0{tuple(shape)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
