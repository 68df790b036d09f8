"""Pipeline schedules: every item once, dependencies respected, 1F1B's in-flight bound,
and the bubble (p - 1) / (m + p - 1)."""
import pytest

from autopar.strategy.pipeline.schedule import gpipe, make_schedule, one_f_one_b

CASES = [(p, m) for p in (1, 2, 3, 4, 8) for m in (1, 2, 4, 7, 16) if m >= p or p <= 2]


def clock_of(sched, stage, item):
    return sched.table[stage].index(item)


@pytest.mark.parametrize("make", [gpipe, one_f_one_b], ids=["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", CASES)
def test_every_item_once_and_dependencies_hold(make, p, m):
    s = make(p, m)
    for st in range(p):
        items = [i for i in s.table[st] if i is not None]
        assert sorted(items) == sorted([("F", k) for k in range(m)] + [("B", k) for k in range(m)])
        for k in range(m):
            f, b = clock_of(s, st, ("F", k)), clock_of(s, st, ("B", k))
            assert f < b
            if st > 0:
                assert clock_of(s, st - 1, ("F", k)) < f
            if st < p - 1:
                assert clock_of(s, st + 1, ("B", k)) < b


@pytest.mark.parametrize("p, m", [(p, m) for p, m in CASES if m >= p])
def test_1f1b_holds_at_most_p_minus_s_and_gpipe_holds_all(p, m):
    f, g = one_f_one_b(p, m), gpipe(p, m)
    for st in range(p):
        assert f.in_flight(st) == min(p - st, m)
        assert g.in_flight(st) == m


@pytest.mark.parametrize("make", [gpipe, one_f_one_b], ids=["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", [(p, m) for p, m in CASES if m >= p])
def test_bubble_matches_the_formula(make, p, m):
    s = make(p, m)
    assert s.clocks == 2 * (m + p - 1)
    assert s.bubble() == pytest.approx((p - 1) / (m + p - 1))


def test_table_prints():
    text = str(one_f_one_b(2, 3))
    assert text.splitlines()[1].split() == ["s0", "F0", "F1", ".", "B0", "F2", "B1", ".", "B2"]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"micro: expected an int >= 1, got 0"):
        gpipe(2, 0)


@pytest.mark.parametrize("make", [gpipe, one_f_one_b], ids=["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m", CASES)
def test_phases_cover_every_clock_in_order(make, p, m):
    s = make(p, m)
    for st in range(p):
        phases = s.phases(st)
        assert [c for ph in phases for c in ph.clocks] == list(range(s.clocks))
        row = s.table[st]
        for ph in phases:
            kinds = {row[t][0] for t in ph.clocks if row[t] is not None}
            if ph.name == "warm-up":
                assert kinds <= {"F"}
            if ph.name == "cool-down":
                assert kinds <= {"B"}


def test_named_phases_of_1f1b_and_gpipe():
    f = one_f_one_b(3, 4)      # stage 0: F0 F1 F2 . . B0 F3 B1 . B2 . B3
    assert [(ph.name, ph.clocks) for ph in f.phases(0)] == [
        ("warm-up", (0, 1, 2, 3, 4)), ("steady", (5, 6)), ("cool-down", (7, 8, 9, 10, 11))]
    assert [ph.name for ph in gpipe(3, 4).phases(1)] == ["warm-up", "cool-down"]


def test_schedule_by_name():
    assert make_schedule("1f1b", 2, 3).table == one_f_one_b(2, 3).table
    assert make_schedule("gpipe", 2, 3).table == gpipe(2, 3).table
    with pytest.raises(ValueError, match=r"name: expected one of \['1f1b', 'gpipe'\], got 'pipedream'"):
        make_schedule("pipedream", 2, 3)


def test_makespan_takes_one_time_per_stage():
    """Per-stage times replay the table with each stage's own forward and backward: the last
    stage slowest gives the slowest stage's m items and the others' fill and drain."""
    table = make_schedule("1f1b", 3, 4)
    assert table.makespan([1.0, 1.0, 2.0], [2.0, 2.0, 4.0]) == pytest.approx(4 * 6.0 + 3.0 + 3.0)
    with pytest.raises(ValueError, match="makespan: expected one forward and one backward time per stage"):
        table.makespan([1.0, 1.0], 2.0)


def test_replay_takes_each_items_own_time():
    """GPipe p=2 m=2 with stage 0's items F 1 s, B 2 s and stage 1's F 3 s, B 5 s, by hand:
    s0 F0 0-1, F1 1-2; s1 F0 1-4, F1 4-7, B0 7-12, B1 12-17; s0 B0 12-14, B1 17-19."""
    times = {0: {"F": 1.0, "B": 2.0}, 1: {"F": 3.0, "B": 5.0}}
    assert make_schedule("gpipe", 2, 2).replay(lambda s, item: times[s][item[0]]) == 19.0

