"""The smallcloud command's own logic: dispatch, errors, making handles blocking."""

import os

import pytest
from smallcloud import cli
from smallcloud.stdio import make_blocking

pytestmark = pytest.mark.unit


def test_unknown_command_is_one_line_naming_it_and_what_to_run(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown command 'frobnicate'" in err and "smallcloud --help" in err


def test_help_and_no_arguments(capsys):
    assert cli.main(["--help"]) == 0
    assert "playbook ARGS" in capsys.readouterr().out
    assert cli.main([]) == 2  # no command is a usage error, but still shows the usage


def test_missing_ansible_says_what_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(cli.sys, "executable", str(tmp_path / "python"))
    assert cli.main(["playbook", "site.yml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "ansible-playbook not found" in err and "pip install ansible-core" in err
    assert cli.main(["runner", "run", "x"]) == 2
    assert "pip install ansible-runner" in capsys.readouterr().err


def test_make_blocking_clears_only_non_blocking_handles():
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(write_end, False)
        assert make_blocking((read_end, write_end)) == [write_end]
        assert os.get_blocking(write_end)
        assert make_blocking((read_end, write_end)) == []  # second call: nothing left to fix
    finally:
        os.close(read_end)
        os.close(write_end)


def test_make_blocking_skips_closed_handles():
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    assert make_blocking((write_end,)) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["smallcloud.kvm.demo", "-e", "demo_state=present"]),
        (["--teardown"], ["smallcloud.kvm.demo", "-e", "demo_state=absent"]),
        (["--teardown", "-v"], ["smallcloud.kvm.demo", "-e", "demo_state=absent", "-v"]),
    ],
)
def test_demo_arguments(args, expected):
    assert cli.demo_args(args) == expected
