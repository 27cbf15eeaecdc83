"""`MergeTiming`, the policy of merged passes (a server's decode steps, a client's LM head), on plain times."""

import pytest

from swarmllm.balancing.merging import ARRIVAL_SLACK, MergeTiming


def test_a_pass_waits_only_for_callers_expected_before_the_wait_ends():
    timing: MergeTiming[str] = MergeTiming(max_wait_s=0.01, active_s=1.0)
    assert timing.wait_s() == 0.0  # no pass yet: nothing to bound a wait by
    timing.arrive("a", 0.0)
    assert timing.due({"a"}, 0.0, 0.0)  # alone: at once
    timing.ran(["a"], 0.0, 0.02)
    assert timing.wait_s() == 0.01  # the budget, as the last pass took longer
    timing.arrive("b", 0.03)
    timing.ran(["b"], 0.03, 0.035)
    assert timing.wait_s() == pytest.approx(0.005)  # never longer than the last pass took
    # a and b step every 0.1 s from now on; b comes half a period after a
    for t_a in (0.1, 0.2):
        timing.arrive("a", t_a)
        timing.ran(["a"], t_a, t_a + 0.005)
        timing.arrive("b", t_a + 0.05)
        timing.ran(["b"], t_a + 0.05, t_a + 0.055)
    timing.arrive("a", 0.3)
    assert timing.due({"a"}, 0.3, 0.3 + timing.wait_s())  # b is due at 0.35 - slack: not waited for
    assert not timing.due({"a"}, 0.3, 0.35)  # a wait ending at b's arrival waits for it
    assert not timing.due({"a"}, 0.3, 0.25 + (1 - ARRIVAL_SLACK) * 0.1)  # (its slack included)
    timing.forget("b")
    assert timing.due({"a"}, 0.3, 0.35)  # gone: no wait


def test_a_caller_with_one_arrival_is_waited_for_and_an_idle_one_expires():
    timing: MergeTiming[str] = MergeTiming(max_wait_s=0.01, active_s=1.0)
    timing.arrive("a", 0.0)
    timing.arrive("b", 0.0)
    timing.ran(["a", "b"], 0.0, 0.01)
    timing.arrive("a", 0.5)
    assert not timing.due({"a"}, 0.5, 0.51)  # b's interval is unknown: it may be in step, so it is waited for
    assert timing.due({"a"}, 1.02, 1.03)  # no pass for b within active_s: it stopped stepping
    timing.arrive("c", 0.0)
    timing.ran(["c"], 0.0, 0.01)
    timing.arrive("c", 4.0)  # back after a pause (no look in between)
    timing.ran(["c"], 4.0, 4.01)
    timing.arrive("a", 4.02)
    assert not timing.due({"a"}, 4.02, 4.03)  # c's interval is unknown again: waited for
    timing.forget("c")
    timing.arrive("b", 5.0)  # back after a pause, which is no interval between steps
    timing.ran(["b"], 5.0, 5.01)
    timing.arrive("a", 5.02)
    assert not timing.due({"a"}, 5.02, 5.03)
