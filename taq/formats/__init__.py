"""taq's file formats, one module per file kind: keys, version, validation, read/write and a cheap `read_meta`.

`container` is what they share (versioned .npz + JSON metadata, atomic writes honouring the umask, input and
output checks, TaqFormatError, WriteError).
"""

from taq.formats.container import (TaqFormatError, WriteError, atomic_path, check_input_file, check_output_path,
                                   check_outputs_in_spare, check_outputs_spare_inputs, file_sha256, same_file)

__all__ = ["TaqFormatError", "WriteError", "atomic_path", "check_input_file", "check_output_path",
           "check_outputs_in_spare", "check_outputs_spare_inputs", "file_sha256", "same_file"]
