"""taq's file formats, one module per file kind: keys, version, validation, read/write and a cheap `read_meta`.

`container` is what they share (versioned .npz + JSON metadata, atomic writes, TaqFormatError).
"""

from taq.formats.container import TaqFormatError, atomic_path, check_output_path, file_sha256

__all__ = ["TaqFormatError", "atomic_path", "check_output_path", "file_sha256"]
