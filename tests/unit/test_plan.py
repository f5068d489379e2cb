"""core/plan.py: the diff, the steps, the one check-mode gate, allocations, undo, expand and merge."""

import contextlib

import pytest

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.plan import (
    NOT_YET,
    Pending,
    Plan,
    resolved,
    unresolved,
)

pytestmark = pytest.mark.unit


class Boom(Exception):
    """The error a failing step or undo raises in these tests."""


class Log:
    """Functions for steps that append what they were called with to one shared log."""

    def __init__(self):
        self.calls = []

    def step(self, name, returns=None, fails=False):
        def function(*args, **kwargs):
            self.calls.append((name,) + args + tuple(sorted(kwargs.items())))
            if fails:
                raise Boom(name)
            return returns

        return function

    @property
    def names(self):
        return [call[0] for call in self.calls]


# compare -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("observed, desired, differs", [
    pytest.param(1, 1, False, id="equal numbers are not recorded"),
    pytest.param({"a": [1, 2]}, {"a": [1, 2]}, False, id="equal nested values are not recorded"),
    pytest.param(None, None, False, id="two Nones are not recorded"),
    pytest.param(1, 2, True, id="different numbers are recorded"),
    pytest.param(None, "x", True, id="an absent value against a wanted one is recorded"),
    pytest.param([1, 2], [2, 1], True, id="lists in another order are recorded"),
    pytest.param("512", 512, True, id="a string and a number are not normalised by compare"),
])
def test_compare_records_a_key_only_when_the_values_differ(observed, desired, differs):
    plan = Plan()
    assert plan.compare("key", observed, desired) is differs
    expected = ({"key": observed}, {"key": desired}) if differs else ({}, {})
    assert (plan.before, plan.after) == expected
    assert plan.diff == {"before": expected[0], "after": expected[1]}


def test_compare_keeps_only_the_keys_that_differ_among_many():
    plan = Plan()
    for key, observed, desired in [("cpus", 1, 1), ("memory", 512, 1024), ("name", "a", "a"), ("disk", None, 10)]:
        plan.compare(key, observed, desired)
    assert plan.diff == {"before": {"memory": 512, "disk": None}, "after": {"memory": 1024, "disk": 10}}
    assert not plan.changed, "a diff without steps is no change"


# add, actions, changed -----------------------------------------------------------------------------


@pytest.mark.parametrize("function", [
    pytest.param(None, id="None is refused as a step function"),
    pytest.param("rm -rf /", id="a string is refused as a step function"),
    pytest.param(42, id="a number is refused as a step function"),
])
def test_add_refuses_a_step_without_a_function(function):
    plan = Plan()
    with pytest.raises(TypeError, match="'describe only' has no function"):
        plan.add("describe only", function)
    assert plan.actions == [] and not plan.changed


@pytest.mark.parametrize("descriptions, bookkeeping, changed", [
    pytest.param([], False, False, id="an empty plan is unchanged with no actions"),
    pytest.param(["one"], False, True, id="one step is a change listed as its description"),
    pytest.param(["first", "second", "third"], False, True, id="steps are listed in the order they were added"),
    pytest.param([], True, False, id="bookkeeping alone is no change and no action"),
])
def test_changed_and_actions_come_from_the_steps(descriptions, bookkeeping, changed):
    plan, log = Plan(), Log()
    for description in descriptions:
        plan.add(description, log.step(description))
    if bookkeeping:
        plan.after_apply(log.step("touch"))
    assert plan.actions == descriptions
    assert plan.changed is changed
    result = plan.result(extra="fact")
    assert result == {"changed": changed, "diff": {"before": {}, "after": {}}, "actions": descriptions,
                      "extra": "fact"}


# the check-mode gate -------------------------------------------------------------------------------


def test_check_mode_runs_no_step_and_no_bookkeeping():
    plan, log = Plan(), Log()
    plan.add("step", log.step("step"))
    address = plan.allocate("allocate", log.step("allocate", returns="10.0.0.2"), release=log.step("release"))
    plan.expand("expand", log.step("build"))
    plan.after_apply(log.step("touch"))
    plan.apply(check_mode=True)
    assert log.calls == []
    assert not address.known
    assert plan.changed and plan.actions == ["step", "allocate", "expand"]


def test_a_real_apply_runs_the_steps_in_order_with_their_arguments_then_the_bookkeeping():
    plan, log = Plan(), Log()
    plan.add("one", log.step("one"), 1, flag=True)
    plan.add("two", log.step("two"), "a", "b")
    plan.after_apply(log.step("touch"), "entry")
    plan.add("three", log.step("three"))
    plan.apply(check_mode=False)
    assert log.calls == [("one", 1, ("flag", True)), ("two", "a", "b"), ("three",), ("touch", "entry")]
    assert plan.actions == ["one", "two", "three"]


# allocate and Pending ------------------------------------------------------------------------------


@pytest.mark.parametrize("check_mode, result_value, diff_value", [
    pytest.param(False, "10.0.0.2", "10.0.0.2", id="after a real apply the result and diff show the allocated value"),
    pytest.param(True, None, NOT_YET, id="in check mode the result shows None and the diff says allocated on apply"),
])
def test_an_allocation_fills_in_the_result_and_the_diff(check_mode, result_value, diff_value):
    plan, log = Plan(), Log()
    address = plan.allocate("allocate an IP", log.step("allocate", returns="10.0.0.2"))
    plan.compare("interfaces", [], [{"ip": address}])
    plan.apply(check_mode)
    result = plan.result(address=address, addresses=[address])
    assert result["address"] == result_value and result["addresses"] == [result_value]
    assert result["diff"] == {"before": {"interfaces": []}, "after": {"interfaces": [{"ip": diff_value}]}}
    assert isinstance(address, Pending)


@pytest.mark.parametrize("pass_as", [
    pytest.param("positional", id="a later step gets the allocated value as a positional argument"),
    pytest.param("keyword", id="a later step gets the allocated value as a keyword argument"),
])
def test_a_later_step_receives_the_allocation_already_filled_in(pass_as):
    plan, log = Plan(), Log()
    mac = plan.allocate("allocate a MAC", log.step("allocate", returns="02:73:63:00:00:01"))
    if pass_as == "positional":
        plan.add("define", log.step("define"), "web1", mac)
        expected = ("define", "web1", "02:73:63:00:00:01")
    else:
        plan.add("define", log.step("define"), "web1", mac=mac)
        expected = ("define", "web1", ("mac", "02:73:63:00:00:01"))
    plan.apply(check_mode=False)
    assert log.calls == [("allocate",), expected]
    assert mac.known and mac.value == "02:73:63:00:00:01" and repr(mac) == repr("02:73:63:00:00:01")


def test_a_pending_nested_in_a_dict_argument_is_left_for_the_function_to_resolve():
    plan, seen = Plan(), []
    ip = plan.allocate("allocate", lambda: "10.0.0.9")
    plan.add("record", lambda record: seen.append((record["ip"], resolved(record))), {"ip": ip})
    plan.apply(check_mode=False)
    assert seen[0][0] is ip and seen[0][1] == {"ip": "10.0.0.9"}


def test_a_pending_read_before_its_step_ran_raises_naming_it():
    pending = Pending("allocate a MAC for network web")
    assert repr(pending) == NOT_YET
    with pytest.raises(RuntimeError, match="allocate a MAC for network web is read before"):
        pending.value  # noqa: B018 - reading it is the test


def test_a_step_reading_a_pending_of_a_later_step_fails_the_apply_and_undoes():
    plan, log = Plan(), Log()
    plan.add("first", log.step("first")).undone_by(log.step("undo first"))
    later = Pending("allocated later")
    plan.add("too early", log.step("too early"), later)
    with pytest.raises(RuntimeError, match="allocated later is read before"):
        plan.apply(check_mode=False)
    assert log.names == ["first", "undo first"]


@pytest.mark.parametrize("value, is_unresolved, as_resolved, as_none", [
    pytest.param("plain", False, "plain", "plain", id="a plain value is resolved to itself"),
    pytest.param(Pending("p"), True, NOT_YET, None, id="an unfilled Pending resolves to the unknown marker"),
    pytest.param({"a": [1, (Pending("p"),)]}, True, {"a": [1, (NOT_YET,)]}, {"a": [1, (None,)]},
                 id="a Pending nested in a dict, list and tuple is found and resolved"),
    pytest.param({"a": [1, (2,)]}, False, {"a": [1, (2,)]}, {"a": [1, (2,)]},
                 id="nested containers without a Pending are resolved unchanged"),
])
def test_resolved_and_unresolved(value, is_unresolved, as_resolved, as_none):
    assert unresolved(value) is is_unresolved
    assert resolved(value) == as_resolved
    assert resolved(value, unknown=None) == as_none


def test_a_filled_pending_is_resolved_to_its_value_even_when_it_is_falsy():
    pending = Pending("p")
    pending.fill(0)
    assert not unresolved([pending]) and resolved([pending]) == [0] and pending.value == 0


# undo ----------------------------------------------------------------------------------------------

UNDO_CASES = [
    pytest.param(
        [("a", "ok", "undo"), ("b", "ok", None), ("c", "ok", "undo"), ("d", "fail", None)],
        ["a", "b", "c", "d", "undo c", "undo a"], "d",
        id="a failing step undoes the steps that ran newest first and skips those without an undo"),
    pytest.param(
        [("a", "ok", "undo"), ("b", "fail", "undo"), ("c", "ok", "undo")],
        ["a", "b", "undo a"], "b",
        id="the failing step is not undone and the steps after it never run"),
    pytest.param(
        [("a", "ok", "undo"), ("b", "ok", "failing undo"), ("c", "ok", "undo"), ("d", "fail", None)],
        ["a", "b", "c", "d", "undo c", "failing undo b", "undo a"], "d",
        id="a failing undo does not stop the rollback and the step's error is re-raised"),
    pytest.param(
        [("a", "alloc", "release"), ("b", "alloc", "release"), ("c", "fail", None)],
        ["a", "b", "c", "release b", "release a"], "c",
        id="allocations are released with their values newest first"),
    pytest.param(
        [("a", "alloc", None), ("b", "fail", None)],
        ["a", "b"], "b",
        id="an allocation without a release is not undone"),
    pytest.param(
        [("a", "ok", "undo"), ("b", "ok", "undo")],
        ["a", "b"], None,
        id="a successful apply undoes nothing"),
]


def build_undo_plan(specs, log):
    """A plan of ``(name, kind, undo)`` steps: kind ok/alloc/fail; undo undo/failing undo/release/None."""
    plan = Plan()
    for name, kind, undo in specs:
        if kind == "alloc":
            release = log.step("release " + name) if undo == "release" else None
            if release is None:
                plan.allocate(name, log.step(name, returns="value of " + name))
            else:
                plan.allocate(name, log.step(name, returns="value of " + name), release=release)
            continue
        step = plan.add(name, log.step(name, fails=kind == "fail"))
        if undo:
            step.undone_by(log.step("%s %s" % (undo, name), fails=undo == "failing undo"))
    return plan


@pytest.mark.parametrize("specs, order, error", UNDO_CASES)
def test_a_failing_apply_undoes_what_ran(specs, order, error):
    log = Log()
    plan = build_undo_plan(specs, log)
    if error is None:
        plan.apply(check_mode=False)
    else:
        with pytest.raises(Boom) as caught:
            plan.apply(check_mode=False)
        assert str(caught.value) == error
    assert log.names == order


def test_a_release_gets_the_allocated_value_and_an_undo_its_pending_arguments():
    plan, log = Plan(), Log()
    mac = plan.allocate("allocate", log.step("allocate", returns="02:00:00:00:00:01"),
                        release=log.step("release"))
    plan.add("define", log.step("define"), mac).undone_by(log.step("undefine"), mac, force=True)
    plan.add("start", log.step("start", fails=True))
    with pytest.raises(Boom):
        plan.apply(check_mode=False)
    assert log.calls[-2:] == [("undefine", "02:00:00:00:00:01", ("force", True)), ("release", "02:00:00:00:00:01")]


def test_bookkeeping_does_not_run_when_the_apply_fails():
    plan, log = Plan(), Log()
    plan.after_apply(log.step("touch"))
    plan.add("fail", log.step("fail", fails=True))
    with pytest.raises(Boom):
        plan.apply(check_mode=False)
    assert log.names == ["fail"]


# expand --------------------------------------------------------------------------------------------


def expanding_plan(log, sub_steps=("rule", "route"), sub_diff=True, fail_in_sub=False):
    """allocate -> expand (a sub-plan of ``sub_steps`` naming the allocated value) -> a last step."""
    plan = Plan()
    address = plan.allocate("allocate", log.step("allocate", returns="203.0.113.2"), release=log.step("release"))

    def build():
        log.calls.append(("build", address.value))
        sub = Plan()
        if sub_diff:
            sub.compare("rules", [], ["fip %s" % address.value])
        for name in sub_steps:
            sub.add("%s %s" % (name, address.value), log.step(name, fails=fail_in_sub and name == sub_steps[-1]),
                    address.value)
        sub.after_apply(log.step("sub bookkeeping"))
        return sub

    plan.expand("map the new address", build)
    plan.add("last", log.step("last"))
    return plan, address


def test_expand_in_check_mode_builds_nothing_and_lists_only_its_own_step():
    log = Log()
    plan, _address = expanding_plan(log)
    plan.apply(check_mode=True)
    assert log.calls == []
    assert plan.actions == ["allocate", "map the new address", "last"]
    assert plan.diff == {"before": {}, "after": {}}


def test_expand_runs_its_sub_plan_right_after_its_step_and_lists_and_merges_it():
    log = Log()
    plan, _address = expanding_plan(log)
    plan.apply(check_mode=False)
    assert log.calls == [("allocate",), ("build", "203.0.113.2"), ("rule", "203.0.113.2"),
                         ("route", "203.0.113.2"), ("last",), ("sub bookkeeping",)]
    assert plan.actions == ["allocate", "map the new address", "rule 203.0.113.2", "route 203.0.113.2", "last"]
    assert plan.diff == {"before": {"rules": []}, "after": {"rules": ["fip 203.0.113.2"]}}


def test_an_expand_that_builds_nothing_adds_no_step():
    plan, log = Plan(), Log()
    plan.expand("nothing to map", log.step("build", returns=None))
    plan.add("last", log.step("last"))
    plan.apply(check_mode=False)
    assert log.names == ["build", "last"] and plan.actions == ["nothing to map", "last"]


def test_a_failing_expanded_step_undoes_the_allocation_made_before_the_expand():
    log = Log()
    plan, _address = expanding_plan(log, fail_in_sub=True)
    with pytest.raises(Boom, match="route"):
        plan.apply(check_mode=False)
    assert log.names == ["allocate", "build", "rule", "route", "release"]


def test_an_expanded_plan_may_expand_again():
    plan, log = Plan(), Log()

    def inner():
        sub = Plan()
        sub.add("innermost", log.step("innermost"))
        return sub

    def outer():
        sub = Plan()
        sub.expand("inner expand", inner)
        sub.add("after inner", log.step("after inner"))
        return sub

    plan.expand("outer expand", outer)
    plan.apply(check_mode=False)
    assert plan.actions == ["outer expand", "inner expand", "innermost", "after inner"]
    assert log.names == ["innermost", "after inner"]


# merge ---------------------------------------------------------------------------------------------


def test_merge_takes_over_the_other_plans_steps_diff_and_bookkeeping():
    plan, other, log = Plan(), Plan(), Log()
    plan.compare("mine", 1, 10)
    plan.add("mine", log.step("mine"))
    other.compare("theirs", 2, 20)
    other.add("theirs", log.step("theirs"))
    other.after_apply(log.step("their bookkeeping"))
    plan.merge(other)
    assert plan.actions == ["mine", "theirs"]
    assert plan.diff == {"before": {"mine": 1, "theirs": 2}, "after": {"mine": 10, "theirs": 20}}
    assert other.actions == [] and not other.changed
    plan.apply(check_mode=False)
    assert log.names == ["mine", "theirs", "their bookkeeping"]


# after_apply and held_while_applying ----------------------------------------------------------------


@pytest.mark.parametrize("check_mode, runs", [
    pytest.param(False, True, id="bookkeeping runs after a real apply"),
    pytest.param(True, False, id="bookkeeping is skipped in check mode"),
])
def test_after_apply_is_neither_listed_nor_a_change(check_mode, runs):
    plan, log = Plan(), Log()
    plan.after_apply(log.step("touch"), "entry", when="now")
    assert plan.actions == [] and not plan.changed
    plan.apply(check_mode)
    assert log.calls == ([("touch", "entry", ("when", "now"))] if runs else [])
    assert plan.result() == {"changed": False, "diff": {"before": {}, "after": {}}, "actions": []}


@pytest.mark.parametrize("check_mode, held", [
    pytest.param(False, ["enter", "inside", "exit"], id="a real run holds the context around the apply"),
    pytest.param(True, ["inside"], id="check mode does not even call the hold function"),
])
def test_held_while_applying_holds_only_outside_check_mode(check_mode, held):
    events = []

    @contextlib.contextmanager
    def hold():
        events.append("enter")
        yield
        events.append("exit")

    with Plan.held_while_applying(check_mode, hold):
        events.append("inside")
    assert events == held
