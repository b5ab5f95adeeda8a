"""The file container: read_meta reads the metadata record alone; kinds and versions are checked."""

import zipfile

import numpy as np
import pytest

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
from taq.formats import TaqFormatError
from taq.formats import calibration as calibration_format
from taq.formats.container import load_npz, read_meta, save_npz


def test_read_meta_is_the_load_metadata_without_touching_the_arrays(tmp_path):
    path = tmp_path / "f.npz"
    save_npz(path, {"big": np.arange(100_000, dtype=np.float32)}, {"note": "x"}, kind="k", version=2)
    _, meta = load_npz(path, kind="k", version=2, required={"big": 1})
    assert read_meta(path, kind="k", version=2) == meta == {"kind": "k", "format_version": 2, "note": "x"}
    with zipfile.ZipFile(path) as archive:  # corrupt the array member only
        members = {name: archive.read(name) for name in archive.namelist()}
    members["big.npy"] = members["big.npy"][:100]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    assert read_meta(path, kind="k", version=2)["note"] == "x"
    with pytest.raises(TaqFormatError, match="not a readable .npz"):
        load_npz(path, kind="k", version=2, required={"big": 1})


def test_read_meta_checks_kind_and_version(tmp_path):
    path = tmp_path / "f.npz"
    save_npz(path, {}, {}, kind="k", version=1)
    with pytest.raises(TaqFormatError, match="is a taq 'k' file, expected 'taq-calibration'"):
        calibration_format.read_meta(path)
    with pytest.raises(TaqFormatError, match="format version 1, this taq reads version 3"):
        read_meta(path, kind="k", version=3)
    with pytest.raises(TaqFormatError, match="no such file"):
        read_meta(tmp_path / "absent.npz", kind="k", version=1)
