import pytest
from hypothesis import given
from hypothesis import strategies as st

from taq.sampling.selection import DEFAULT_RULE, RULES, select_steps


@st.composite
def steps_and_selected(draw):
    num_steps = draw(st.integers(min_value=1, max_value=1000))
    return num_steps, draw(st.integers(min_value=1, max_value=num_steps))


@pytest.mark.parametrize("rule", RULES)
@given(case=steps_and_selected())
def test_exactly_k_distinct_sorted_indices_within_range(rule, case):
    num_steps, num_selected = case
    indices = select_steps(num_steps, num_selected, rule)
    assert len(indices) == num_selected
    assert indices == sorted(set(indices))
    assert 0 <= indices[0] and indices[-1] < num_steps
    assert all(type(i) is int for i in indices)


@given(case=steps_and_selected())
def test_stride_picks_multiples_of_floor_n_over_k_from_zero(case):
    num_steps, num_selected = case
    stride = num_steps // num_selected
    assert select_steps(num_steps, num_selected, "stride") == [i * stride for i in range(num_selected)]


@given(case=steps_and_selected().filter(lambda case: case[1] >= 2))
def test_linspace_includes_first_and_last_step(case):
    indices = select_steps(*case, "linspace")
    assert indices[0] == 0 and indices[-1] == case[0] - 1


@given(num_steps=st.integers(min_value=1, max_value=1000))
def test_selecting_every_step_gives_every_step(num_steps):
    for rule in RULES:
        assert select_steps(num_steps, num_steps, rule) == list(range(num_steps))


def test_taq_dit_official_stride_for_25_of_100():
    assert select_steps(100, 25) == list(range(0, 100, 4))
    assert DEFAULT_RULE == "stride"


def test_seed_linspace_for_25_of_100_differs_from_stride_at_17_indices():
    stride, linspace = select_steps(100, 25, "stride"), select_steps(100, 25, "linspace")
    assert linspace[:9] == [0, 4, 8, 12, 16, 20, 24, 28, 33] and linspace[-1] == 99
    assert sum(a != b for a, b in zip(stride, linspace)) == 17


def test_uneven_stride_leaves_the_tail_unchosen():
    assert select_steps(10, 4, "stride") == [0, 2, 4, 6]


def test_unknown_rule_is_rejected_by_name():
    with pytest.raises(ValueError, match="'uniform'"):
        select_steps(100, 25, "uniform")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    "num_steps, num_selected, match",
    [(10, 11, "num_selected"), (10, 0, "num_selected"), (10, -2, "num_selected"), (0, 0, "num_steps"),
     (10.0, 5, "integer"), (10, True, "integer")],
)
def test_bad_counts_are_rejected(rule, num_steps, num_selected, match):
    with pytest.raises(ValueError, match=match):
        select_steps(num_steps, num_selected, rule)
