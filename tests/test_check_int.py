"""errors.is_int and errors.check_int: the one integer check every layer uses, and the
places that now go through it keep their messages."""
import numpy as np
import pytest

from autopar.context import ParallelContext
from autopar.errors import check_int, is_int
from autopar.strategy import formulas as cost
from autopar.strategy.search import SEARCH_MODES


@pytest.mark.parametrize("value", [0, -3, 7, np.int32(4), np.int64(-1), np.uint8(2)])
def test_ints_are_ints(value):
    assert is_int(value)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 2.0, np.float64(1), "3", None, (1,)])
def test_bools_floats_and_strings_are_not(value):
    assert not is_int(value)


def test_check_int_returns_a_python_int():
    got = check_int("w", "a", np.int64(5), 1)
    assert got == 5 and type(got) is int


@pytest.mark.parametrize("value,minimum,maximum,expected", [
    (0, 1, None, "w: a: expected an int >= 1, got 0"),
    (9, 0, 8, "w: a: expected an int in [0, 8], got 9"),
    (-1, 0, 8, "w: a: expected an int in [0, 8], got -1"),
    (True, 0, None, "w: a: expected an int >= 0, got True"),
    (2.0, None, 3, "w: a: expected an int <= 3, got 2.0"),
])
def test_check_int_names_the_place_the_bounds_and_the_value(value, minimum, maximum, expected):
    with pytest.raises(ValueError) as err:
        check_int("w", "a", value, minimum, maximum)
    assert str(err.value) == expected


def test_wrong_type_and_wrong_value_can_raise_different_errors():
    with pytest.raises(TypeError, match=r"^w: a: expected an int >= 1, got 1.5; use a whole number$"):
        check_int("w", "a", 1.5, 1, fix="use a whole number", type_error=TypeError)
    with pytest.raises(ValueError, match=r"^w: a: expected an int >= 1, got 0; use a whole number$"):
        check_int("w", "a", 0, 1, fix="use a whole number", type_error=TypeError)
    with pytest.raises(IndexError, match=r"^w: i: expected an int in \[0, 4\), got 4$"):
        check_int("w", "i", 4, 0, 3, expected="an int in [0, 4)", error=IndexError)


def test_cost_formulas_reject_bools_and_name_the_count():
    with pytest.raises(ValueError, match=r"^collective_factor: n \(ranks\): expected an int >= 1, got True$"):
        cost.collective_factor("all_reduce", True)
    with pytest.raises(ValueError, match=r"^pipeline_bubble: m: expected an int >= 1, got 0$"):
        cost.pipeline_bubble(4, 0)


def test_context_takes_numpy_ints_and_its_search_modes_are_the_searchs():
    ctx = ParallelContext(device_num=np.int64(8), global_rank=np.int32(3))
    assert (ctx.device_num, ctx.global_rank) == (8, 3) and type(ctx.device_num) is int
    with pytest.raises(ValueError, match=r"^ParallelContext: device_num: expected an int >= 1, got True$"):
        ParallelContext(device_num=True)
    for mode in SEARCH_MODES:
        assert ParallelContext(search_mode=mode).search_mode == mode
    with pytest.raises(ValueError, match="search_mode: expected one of"):
        ParallelContext(search_mode="exhaustive")
