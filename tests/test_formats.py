"""The file container: read_meta reads the metadata record alone; kinds and versions are checked."""

import errno
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
from taq.formats import TaqFormatError, WriteError, check_outputs_spare_inputs
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


def test_a_plain_text_file_is_not_a_taq_npz_file(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("just some text\n")
    with pytest.raises(TaqFormatError) as error:
        read_meta(path, kind="k", version=1)
    assert str(error.value) == f"{path}: not a taq .npz file (it is not a zip archive)"


def test_a_directory_is_called_a_directory(tmp_path):
    with pytest.raises(TaqFormatError, match="is a directory, not a taq .npz file"):
        load_npz(tmp_path, kind="k", version=1, required={})


def test_pickled_arrays_are_refused_without_advice_to_unpickle(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, __meta__=np.array('{"kind": "k", "format_version": 1}'), a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(TaqFormatError) as error:
        load_npz(path, kind="k", version=1, required={})
    assert "object (pickled) arrays, which taq never writes" in str(error.value)
    assert "allow_pickle" not in str(error.value)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_mode_open_would_give_them(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        save_npz(tmp_path / "f.npz", {}, {}, kind="k", version=1)
    finally:
        os.umask(previous)
    assert (tmp_path / "f.npz").stat().st_mode & 0o777 == mode


def test_a_failed_write_names_the_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "f.npz"
    save_npz(path, {"a": np.zeros(2)}, {}, kind="k", version=1)
    before = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(WriteError) as error:
        save_npz(path, {"a": np.ones(2)}, {}, kind="k", version=1)
    assert str(error.value) == f"cannot write {path}: No space left on device" and error.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["f.npz"]


@pytest.mark.parametrize("alias", ["same", "relative", "symlink", "hard link", "other"])
def test_an_output_that_resolves_to_an_input_is_refused(tmp_path, monkeypatch, alias):
    source = tmp_path / "in.npz"
    source.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    output = {"same": source, "relative": Path("./in.npz"), "other": tmp_path / "out.npz"}.get(alias, tmp_path / "l")
    if alias == "symlink":
        output.symlink_to(source)
    elif alias == "hard link":
        os.link(source, output)
    if alias == "other":
        check_outputs_spare_inputs({"--output": output}, {"--input": source})
        return
    with pytest.raises(ValueError, match=f"--output {output} is --input {source}; writing it would destroy"):
        check_outputs_spare_inputs({"--output": output}, {"--input": source})
