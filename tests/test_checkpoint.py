"""Loading and saving MMDiT weights: SD3's original single-file layout and taq's own safetensors files."""

import json
import sys

import taq  # noqa: F401  (first: loads a fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from safetensors.numpy import load_file, save_file

from taq.cli import main
from taq.config import MMDiTConfig
from taq.models.checkpoint import (
    SD3_PREFIX,
    CheckpointError,
    load_mmdit,
    load_sd3_checkpoint,
    resolve_checkpoint,
    save_mmdit,
    save_sd3_checkpoint,
    save_taq_weights,
)
from taq.models.mmdit import MMDiT

# Every field that SD3's shapes determine is off its default, so reading it from the file is tested.
CFG = MMDiTConfig(depth=3, hidden_size=128, num_heads=2, patch_size=4, in_channels=3, pos_embed_max_size=6,
                  pooled_dim=40, token_dim=56, frequency_embedding_dim=64, mlp_ratio=2.5)


def sd3_layout_arrays(cfg: MMDiTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """An MMDiT state dict as SD3's reference code names and shapes it (PyTorch layouts), without the prefix."""
    D, out = cfg.hidden_size, cfg.patch_size**2 * cfg.in_channels
    shapes = {
        "pos_embed": (1, cfg.pos_embed_max_size**2, D),
        "x_embedder.proj.weight": (D, cfg.in_channels, cfg.patch_size, cfg.patch_size),  # Conv2d: (out, in, kh, kw)
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, cfg.frequency_embedding_dim), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.mlp.0.weight": (D, cfg.pooled_dim), "y_embedder.mlp.0.bias": (D,),
        "y_embedder.mlp.2.weight": (D, D), "y_embedder.mlp.2.bias": (D,),
        "context_embedder.weight": (D, cfg.token_dim), "context_embedder.bias": (D,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
        "final_layer.linear.weight": (out, D), "final_layer.linear.bias": (out,),
    }
    for i in range(cfg.depth):
        for stream in ("x_block", "context_block"):
            pre_only = stream == "context_block" and i == cfg.depth - 1  # the last text stream stops after qkv
            key = f"joint_blocks.{i}.{stream}."
            mods = (2 if pre_only else 6) * D
            shapes |= {key + "attn.qkv.weight": (3 * D, D), key + "attn.qkv.bias": (3 * D,),
                       key + "adaLN_modulation.1.weight": (mods, D), key + "adaLN_modulation.1.bias": (mods,)}
            if not pre_only:
                shapes |= {key + "attn.proj.weight": (D, D), key + "attn.proj.bias": (D,),
                           key + "mlp.fc1.weight": (cfg.mlp_hidden, D), key + "mlp.fc1.bias": (cfg.mlp_hidden,),
                           key + "mlp.fc2.weight": (D, cfg.mlp_hidden), key + "mlp.fc2.bias": (D,)}
    rng = np.random.default_rng(seed)
    return {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


# Other components of SD3's single-file checkpoints, which the MMDiT loader must leave alone.
OTHER_COMPONENTS = {
    "first_stage_model.decoder.conv_in.weight": np.ones((8, 16, 3, 3), np.float32),
    "first_stage_model.encoder.conv_in.bias": np.ones((8,), np.float32),
    "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": np.ones((4,), np.float32),
}


def write_sd3_file(path, arrays: dict[str, np.ndarray], extra=OTHER_COMPONENTS) -> str:
    save_file({SD3_PREFIX + k: v for k, v in arrays.items()} | extra, str(path))
    return str(path)


def inputs(cfg, batch=2, height=12, width=8, tokens=5, seed=0):
    keys = mx.random.split(mx.random.key(seed), 3)
    return (mx.random.normal((batch, height, width, cfg.in_channels), key=keys[0]),
            mx.array([900.0, 20.0][:batch]),
            mx.random.normal((batch, tokens, cfg.token_dim), key=keys[1]),
            mx.random.normal((batch, cfg.pooled_dim), key=keys[2]))


@pytest.fixture(scope="module")
def sd3_arrays():
    return sd3_layout_arrays(CFG)


@pytest.fixture(scope="module")
def sd3_file(tmp_path_factory, sd3_arrays):
    return write_sd3_file(tmp_path_factory.mktemp("sd3") / "hand_built.safetensors", sd3_arrays)


@pytest.fixture(scope="module")
def random_model():
    mx.random.seed(3)
    return MMDiT(CFG)


# --------------------------------------------------------------------------- SD3 layout


def test_config_is_read_from_the_shapes_of_a_hand_built_file(sd3_file):
    assert load_sd3_checkpoint(sd3_file).config == CFG


def test_config_overrides_set_what_the_shapes_cannot_tell(sd3_file):
    model = load_sd3_checkpoint(sd3_file, gelu="exact", num_heads=4)
    assert model.config == MMDiTConfig(**{**CFG.to_dict(), "gelu": "exact", "num_heads": 4})


def test_every_tensor_lands_in_the_module_of_the_same_name(sd3_file, sd3_arrays):
    loaded = dict(tree_flatten(load_sd3_checkpoint(sd3_file).parameters()))
    assert set(loaded) == set(sd3_arrays)
    for key, value in sd3_arrays.items():
        if key != "x_embedder.proj.weight":
            np.testing.assert_array_equal(np.array(loaded[key]), value, err_msg=key)


def test_patch_embedding_computes_pytorchs_conv_from_the_oihw_weight(sd3_file, sd3_arrays):
    model = load_sd3_checkpoint(sd3_file)
    x = np.random.default_rng(1).standard_normal((2, 12, 8, CFG.in_channels)).astype(np.float32)
    weight, bias, p = sd3_arrays["x_embedder.proj.weight"], sd3_arrays["x_embedder.proj.bias"], CFG.patch_size
    patches = x.reshape(2, 3, p, 2, p, CFG.in_channels)  # (B, h, kh, w, kw, C)
    expected = np.einsum("bhywxc,ocyx->bhwo", patches, weight) + bias  # out[o] = sum W[o, c, kh, kw] x[kh, kw, c]
    got = np.array(model.x_embedder(mx.array(x)))  # (B, h*w, D)
    np.testing.assert_allclose(got, expected.reshape(2, 6, -1), rtol=1e-5, atol=1e-5)


def test_saving_writes_back_the_same_sd3_tensors(tmp_path, sd3_file, sd3_arrays):
    out = tmp_path / "resaved.safetensors"
    save_sd3_checkpoint(load_sd3_checkpoint(sd3_file), out)
    written = load_file(str(out))
    assert set(written) == {SD3_PREFIX + k for k in sd3_arrays}
    for key, value in sd3_arrays.items():
        np.testing.assert_array_equal(written[SD3_PREFIX + key], value, err_msg=key)


def test_sd3_round_trip_gives_the_same_outputs(tmp_path, random_model):
    path = tmp_path / "model.safetensors"
    save_sd3_checkpoint(random_model, path)
    loaded = load_sd3_checkpoint(path)
    args = inputs(CFG)
    assert loaded.config == CFG
    np.testing.assert_array_equal(np.array(loaded(*args)), np.array(random_model(*args)))


def test_sd3_file_in_float16_loads_the_rounded_weights(tmp_path, random_model):
    path = tmp_path / "half.safetensors"
    save_sd3_checkpoint(random_model, path, dtype=mx.float16)
    assert {v.dtype for v in load_file(str(path)).values()} == {np.dtype(np.float16)}
    loaded = load_sd3_checkpoint(path)
    q = loaded.joint_blocks[1].x_block.attn.qkv.weight
    assert q.dtype == mx.float32
    np.testing.assert_array_equal(np.array(q), np.array(random_model.joint_blocks[1].x_block.attn.qkv.weight
                                                        .astype(mx.float16).astype(mx.float32)))
    assert load_sd3_checkpoint(path, dtype=mx.bfloat16).context_embedder.weight.dtype == mx.bfloat16


def test_sd3_file_must_end_in_safetensors(tmp_path, random_model):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_sd3_checkpoint(random_model, tmp_path / "model.npz")


# --------------------------------------------------------------------------- key problems


def load_edited(tmp_path, arrays, edit, **kwargs):
    edited = dict(arrays)
    edit(edited)
    path = write_sd3_file(tmp_path / "edited.safetensors", edited)
    with pytest.raises(CheckpointError) as info:
        load_sd3_checkpoint(path, **kwargs)
    return str(info.value)


def test_unknown_key_is_one_error_naming_key_and_shape(tmp_path, sd3_arrays):
    key = "joint_blocks.0.x_block.attn.norm_q.weight"
    message = load_edited(tmp_path, sd3_arrays, lambda a: a.update({key: np.ones((64,), np.float32)}))
    assert "1 key problem" in message and f"unexpected key {key} (64,)" in message


def test_missing_key_is_one_error_naming_key_and_expected_shape(tmp_path, sd3_arrays):
    key = "joint_blocks.1.x_block.mlp.fc2.bias"
    message = load_edited(tmp_path, sd3_arrays, lambda a: a.pop(key))
    assert "1 key problem" in message and f"missing key {key} (expected (128,))" in message


@pytest.mark.parametrize("key, shape, expected", [
    ("joint_blocks.1.context_block.attn.proj.weight", (128, 127), (128, 128)),
    ("final_layer.linear.bias", (47,), (48,)),
    ("pos_embed", (1, 36, 64), (1, 36, 128)),
])
def test_misshaped_key_is_one_error_naming_key_and_both_shapes(tmp_path, sd3_arrays, key, shape, expected):
    message = load_edited(tmp_path, sd3_arrays, lambda a: a.update({key: np.zeros(shape, np.float32)}))
    assert "1 key problem" in message and f"key {key} has shape {shape}, expected {expected}" in message


def test_conv_weight_of_the_wrong_rank_is_a_checkpoint_error_naming_it(tmp_path, sd3_arrays):
    bad = np.zeros((128, CFG.in_channels, 4), np.float32)
    message = load_edited(tmp_path, sd3_arrays, lambda a: a.update({"x_embedder.proj.weight": bad}), config=CFG)
    assert "x_embedder.proj.weight" in message


def test_a_given_config_that_does_not_fit_lists_the_problems(tmp_path, sd3_file):
    with pytest.raises(CheckpointError, match=r"1 key problem.*context_embedder\.weight has shape \(128, 56\), "
                                              r"expected \(128, 57\)"):
        load_sd3_checkpoint(sd3_file, config=MMDiTConfig(**{**CFG.to_dict(), "token_dim": 57}))


def test_many_problems_are_summarized(sd3_file):
    deeper = MMDiTConfig(**{**CFG.to_dict(), "depth": 5})
    with pytest.raises(CheckpointError, match=r"key problem\(s\): .*; and \d+ more$"):
        load_sd3_checkpoint(sd3_file, config=deeper)


def test_file_without_mmdit_keys_is_rejected(tmp_path):
    path = tmp_path / "vae_only.safetensors"
    save_file(OTHER_COMPONENTS, str(path))
    with pytest.raises(CheckpointError, match=r"no keys under 'model\.diffusion_model\.'"):
        load_sd3_checkpoint(path)


def test_file_missing_what_the_config_is_read_from_is_rejected(tmp_path, sd3_arrays):
    message = load_edited(tmp_path, sd3_arrays, lambda a: a.pop("context_embedder.weight"))
    assert "cannot read the config" in message and "context_embedder.weight" in message


def test_nonexistent_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(CheckpointError, match="nowhere.safetensors does not exist"):
        load_sd3_checkpoint(missing)
    with pytest.raises(CheckpointError, match="nowhere.safetensors does not exist"):
        load_mmdit(missing)


def cut_file(tmp_path, source, keep) -> str:
    data = open(source, "rb").read()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(keep(data))
    return str(path)


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-100], "bytes of data"),  # the last tensor is cut short
    (lambda data: data[:50], "cut short"),  # the header is cut short
    (lambda data: data[:5], "not a safetensors file"),
    (lambda data: bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not a safetensors file"),
    (lambda data: data + b"\0" * 16, "16 bytes after the last tensor belong to none"),
    (lambda data: data[:8] + data[8:].replace(b'"F32"', b'"F99"', 1), "invalid or cut-short entry"),
])
def test_a_damaged_safetensors_file_is_one_checkpoint_error_naming_it(tmp_path, sd3_file, damage, message):
    path = cut_file(tmp_path, sd3_file, damage)
    with pytest.raises(CheckpointError, match=message) as error:
        load_sd3_checkpoint(path)
    assert str(error.value).startswith(path) and "\n" not in str(error.value)


def test_a_truncated_checkpoint_is_one_line_on_the_command_line(tmp_path, sd3_file, capsys):
    path = cut_file(tmp_path, sd3_file, lambda data: data[: len(data) // 2])
    assert main(["generate", "x", "--model", "sd3-medium", "--checkpoint", path,
                 "--output", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"taq generate: error: {path}: ") and "Traceback" not in "".join(err)


def test_integer_tensors_for_float_weights_are_refused(tmp_path, sd3_arrays):
    message = load_edited(tmp_path, sd3_arrays, lambda a: a.update(
        {"context_embedder.bias": a["context_embedder.bias"].view(np.int32)}))
    assert "key context_embedder.bias holds int32, expected floating-point weights" in message


# --------------------------------------------------------------------------- taq's own format


def test_taq_format_round_trip_stores_float16_and_keeps_metadata(tmp_path, random_model):
    path = tmp_path / "taq.safetensors"
    save_mmdit(path, random_model, metadata={"trained_steps": 1200, "note": "unit test"}, dtype=mx.float16)
    stored = load_file(str(path))
    assert {v.dtype for v in stored.values()} == {np.dtype(np.float16)} and all(k.startswith("mmdit.") for k in stored)

    loaded, metadata = load_mmdit(path)
    assert metadata == {"mmdit_config": CFG.to_dict(), "trained_steps": 1200, "note": "unit test"}
    assert loaded.config == CFG
    rounded = MMDiT(CFG)
    rounded.update(tree_map(lambda w: w.astype(mx.float16).astype(mx.float32), random_model.parameters()))
    args = inputs(CFG)
    np.testing.assert_array_equal(np.array(loaded(*args)), np.array(rounded(*args)))


def test_taq_format_keeps_float32_when_no_dtype_is_given(tmp_path, random_model):
    path = tmp_path / "taq32.safetensors"
    save_mmdit(path, random_model)
    loaded, _ = load_mmdit(path, dtype=mx.float16)
    assert loaded.pos_embed.dtype == mx.float16
    np.testing.assert_array_equal(np.array(load_mmdit(path)[0].pos_embed), np.array(random_model.pos_embed))


def test_sd3_file_is_not_a_taq_weights_file(sd3_file):
    with pytest.raises(CheckpointError, match="not a taq weights file"):
        load_mmdit(sd3_file)


def test_taq_file_without_an_mmdit_is_rejected(tmp_path):
    path = tmp_path / "encoder_only.safetensors"
    encoder = MMDiT(CFG).context_embedder
    save_taq_weights(path, {"text_encoder": encoder}, {"note": "no mmdit"})
    with pytest.raises(CheckpointError, match=r"holds no MMDiT \(modules: \['text_encoder'\]\)"):
        load_mmdit(path)


def test_a_changed_byte_in_a_taq_weights_file_fails_its_digest(tmp_path, random_model):
    path = tmp_path / "taq.safetensors"
    save_mmdit(path, random_model, dtype=mx.float16)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor: still a valid safetensors file
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match its taq_sha256 digest"):
        load_mmdit(path)


def test_the_shipped_pocket_weights_pass_their_digest():
    from taq.pocket import DEFAULT_WEIGHTS, load_pocket

    assert load_pocket(DEFAULT_WEIGHTS)[1]["mmdit_config"]["depth"] == 6


def test_taq_file_header_is_json(tmp_path, random_model):
    path = tmp_path / "taq.safetensors"
    save_mmdit(path, random_model, metadata={"prompts": ["a", "b"]})
    _, header = mx.load(str(path), return_metadata=True)
    assert json.loads(header["taq_metadata"])["prompts"] == ["a", "b"]


# --------------------------------------------------------------------------- hf: specs


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Point huggingface_hub at an empty cache (also after it was imported), so the real cache is never read."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf_hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hf_spec_without_huggingface_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(CheckpointError, match=r"need huggingface_hub"):
        load_sd3_checkpoint("hf:")


def test_hf_spec_not_in_the_cache_is_a_clear_error(empty_hf_cache):
    with pytest.raises(CheckpointError, match=r"someone/tiny-sd3/tiny\.safetensors is not in the Hugging Face cache"):
        load_sd3_checkpoint("hf:someone/tiny-sd3/tiny.safetensors")
    with pytest.raises(CheckpointError, match=r"stabilityai/stable-diffusion-3-medium/sd3_medium\.safetensors"):
        resolve_checkpoint("hf:")


def test_hf_spec_without_a_repo_is_rejected_not_replaced_by_sd3_medium(empty_hf_cache):
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint("hf:tiny.safetensors")
    assert "tiny.safetensors" in str(info.value)


def test_hf_spec_finds_the_file_in_the_cache(empty_hf_cache, sd3_arrays):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = empty_hf_cache / "models--someone--tiny-sd3"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    write_sd3_file(snapshot / "tiny.safetensors", sd3_arrays)
    assert load_sd3_checkpoint("hf:someone/tiny-sd3/tiny.safetensors").config == CFG
