"""Which layers are quantized and at how many weight bits."""

import re

import pytest

import taq  # noqa: F401  (loads OpenBLAS before mlx.core)
from taq.config import get_preset
from taq.models.mmdit import MMDiT
from taq.quant.layers import first_and_last, parse_override, select_layers, weight_bits
from taq.tracing.sites import linear_sites


@pytest.fixture(scope="module")
def pocket_sites():
    return list(linear_sites(MMDiT(get_preset("pocket").mmdit)))


def test_sites_name_every_joint_block_linear_in_model_order(pocket_sites):
    # 6 blocks x (img qkv/proj/fc1/fc2 + adaln) + 5 x (txt ...) + the last text block's qkv and adaln
    assert len(pocket_sites) == 6 * 5 + 5 * 5 + 2
    assert pocket_sites[:5] == ["mm_00_img.qkv", "mm_00_img.proj", "mm_00_img.fc1", "mm_00_img.fc2",
                                "mm_00_img.adaln"]
    assert [s for s in pocket_sites if s.startswith("mm_05_txt")] == ["mm_05_txt.qkv", "mm_05_txt.adaln"]


def test_default_layers_are_qkv_proj_fc1_fc2_and_adaln_only_on_request(pocket_sites):
    default = select_layers(pocket_sites)
    assert len(default) == 6 * 4 + 5 * 4 + 1 and not any(s.endswith(".adaln") for s in default)
    with_adaln = select_layers(pocket_sites, include_adaln=True)
    assert len(with_adaln) == len(default) + 12  # every stream of every block has one


def test_patterns_select_the_union_and_a_pattern_matching_nothing_is_an_error(pocket_sites):
    assert select_layers(pocket_sites, ["mm_*_txt.fc2", "mm_00_img.qkv"]) == (
        ["mm_00_img.qkv"] + [f"mm_{b:02d}_txt.fc2" for b in range(5)])
    with pytest.raises(ValueError, match=re.escape("['mm_*_vid.fc2'] match no layer")):
        select_layers(pocket_sites, ["mm_*_vid.fc2"])


def test_overrides_and_first_last_bits_apply_in_order(pocket_sites):
    layers = select_layers(pocket_sites)
    assert first_and_last(layers) == ["mm_00_img.qkv", "mm_00_txt.qkv", "mm_05_img.fc2"]
    bits = weight_bits(layers, 4, overrides=[("mm_0[12]_*", 6), ("mm_02_img.fc1", 3)], first_last_bits=8)
    assert bits["mm_00_img.qkv"] == bits["mm_00_txt.qkv"] == bits["mm_05_img.fc2"] == 8
    assert bits["mm_01_txt.proj"] == 6 and bits["mm_02_img.fc1"] == 3 and bits["mm_03_img.fc1"] == 4
    with pytest.raises(ValueError, match="matches none of the quantized layers"):
        weight_bits(layers, 4, overrides=[("mm_99_*", 8)])


@pytest.mark.parametrize("text", ["mm_00_*.qkv", "=8", "mm_00_*.qkv=eight"])
def test_a_malformed_override_is_refused(text):
    with pytest.raises(ValueError, match="PATTERN=BITS"):
        parse_override(text)
