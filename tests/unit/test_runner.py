"""core/runner.py: run_module is the one place a typed error becomes a failed task."""

import pytest

from ansible_collections.smallcloud.kvm.plugins.module_utils.core import errors
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module

pytestmark = pytest.mark.unit


class Exited(Exception):
    def __init__(self, kwargs):
        super().__init__("exit_json")
        self.kwargs = kwargs


class Failed(Exception):
    def __init__(self, kwargs):
        super().__init__("fail_json")
        self.kwargs = kwargs


class FakeModule:
    """exit_json/fail_json end the call as AnsibleModule's do, raising what they were given."""

    def __init__(self):
        self.params = {"name": "web1"}
        self.check_mode = False

    def exit_json(self, **kwargs):
        raise Exited(kwargs)

    def fail_json(self, **kwargs):
        raise Failed(kwargs)


@pytest.mark.parametrize("result", [
    pytest.param({"changed": False}, id="an unchanged result exits as it is"),
    pytest.param({"changed": True, "diff": {"before": {}, "after": {"a": 1}}, "actions": ["x"], "name": "web1"},
                 id="a changed result with diff, actions and facts exits as it is"),
])
def test_a_converge_returning_a_dict_exits_with_it(result):
    module = FakeModule()
    with pytest.raises(Exited) as caught:
        run_module(module, lambda m: dict(result) if m is module else None)
    assert caught.value.kwargs == result


@pytest.mark.parametrize("error, expected", [
    pytest.param(errors.InvalidInput("memory 9 MiB is out of range", memory=9, allowed=">= 32"),
                 {"msg": "memory 9 MiB is out of range", "error": "InvalidInput", "memory": 9, "allowed": ">= 32"},
                 id="InvalidInput fails naming the value and what is allowed"),
    pytest.param(errors.CommandFailed("nft failed", argv=["nft", "-f", "-"], rc=1, stdout="", stderr="syntax"),
                 {"msg": "nft failed", "error": "CommandFailed", "argv": ["nft", "-f", "-"], "rc": 1, "stdout": "",
                  "stderr": "syntax"},
                 id="CommandFailed fails with the tool's argv, rc and output"),
    pytest.param(errors.PoolExhausted("pool web is exhausted", pool="web"),
                 {"msg": "pool web is exhausted", "error": "PoolExhausted", "pool": "web"},
                 id="a StoreError subclass fails with its own class name"),
    pytest.param(errors.Conflict("VNI 5 is taken by network:a", value="5", owner="network:a"),
                 {"msg": "VNI 5 is taken by network:a", "error": "Conflict", "value": "5", "owner": "network:a"},
                 id="Conflict fails naming the owner"),
    pytest.param(errors.MissingLibrary("libvirt is required"),
                 {"msg": "libvirt is required", "error": "MissingLibrary"},
                 id="an error without details fails with msg and error only"),
    pytest.param(errors.SmallcloudError("base"), {"msg": "base", "error": "SmallcloudError"},
                 id="the base class itself fails the task too"),
])
def test_a_smallcloud_error_becomes_fail_json(error, expected):
    def converge(module):
        raise error

    with pytest.raises(Failed) as caught:
        run_module(FakeModule(), converge)
    assert caught.value.kwargs == expected


def test_a_subclass_defined_elsewhere_is_named_by_its_own_class():
    class LeaseLost(errors.StoreError):
        pass

    def converge(module):
        raise LeaseLost("lease lost", lease=7)

    with pytest.raises(Failed) as caught:
        run_module(FakeModule(), converge)
    assert caught.value.kwargs == {"msg": "lease lost", "error": "LeaseLost", "lease": 7}


@pytest.mark.parametrize("error", [
    pytest.param(ValueError("bug"), id="a ValueError propagates as a bug"),
    pytest.param(KeyError("name"), id="a KeyError propagates as a bug"),
    pytest.param(RuntimeError("x is read before the step that allocates it ran"),
                 id="a Pending read too early propagates as a bug"),
])
def test_other_exceptions_propagate(error):
    def converge(module):
        raise error

    with pytest.raises(type(error)) as caught:
        run_module(FakeModule(), converge)
    assert caught.value is error
