"""Both halves of the blocking-IO quirk: plain Ansible aborts on a non-blocking handle, smallcloud does not."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness.ansible import ansible_env

pytestmark = pytest.mark.integration

VENV_BIN = Path(sys.executable).parent
ANSIBLE_ERROR = "Ansible requires blocking IO on stdin/stdout/stderr"
LINES = 1500


def run_with_nonblocking(argv, handle, reader_delay=0.0, timeout=600, env=None):
    """Run argv with its stdout or stderr a pipe in O_NONBLOCK mode; return (rc, stdout, stderr).

    ``reader_delay`` holds off reading stdout so the pipe fills up: a writer that still had
    O_NONBLOCK would then hit EAGAIN and lose output.
    """
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    os.set_blocking(out_write if handle == "stdout" else err_write, False)
    env = ansible_env({"ANSIBLE_STDOUT_CALLBACK": "default", "ANSIBLE_FORCE_COLOR": "0", **(env or {})})
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out_write, stderr=err_write, env=env)
    os.close(out_write)
    os.close(err_write)
    captured = {out_read: [], err_read: []}

    def drain(fd, delay):
        time.sleep(delay)
        while chunk := os.read(fd, 65536):
            captured[fd].append(chunk)
        os.close(fd)

    readers = [threading.Thread(target=drain, args=(out_read, reader_delay)),
               threading.Thread(target=drain, args=(err_read, 0))]
    for reader in readers:
        reader.start()
    rc = process.wait(timeout=timeout)
    for reader in readers:
        reader.join(timeout=60)
    return rc, b"".join(captured[out_read]).decode(), b"".join(captured[err_read]).decode()


@pytest.fixture(scope="module")
def long_playbook(tmp_path_factory):
    """A playbook that prints many lines, enough to fill a pipe several times over."""
    path = tmp_path_factory.mktemp("play") / "long.yml"
    path.write_text(
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - name: Print many lines\n      ansible.builtin.debug:\n"
        "        msg: \"line-{{ '%05d' | format(item) }}-" + "x" * 60 + "\"\n"
        f"      loop: \"{{{{ range({LINES}) | list }}}}\"\n"
    )
    return path


@pytest.fixture(scope="module")
def collection_tarball(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [str(VENV_BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(out), str(root)],
        capture_output=True, text=True, check=False, env=ansible_env(),
    )
    assert result.returncode == 0, result.stderr
    return next(out.glob("smallcloud-kvm-*.tar.gz"))


def printed_lines(stdout):
    return {line for line in range(LINES) if f"line-{line:05d}-" in stdout}


@pytest.mark.parametrize("handle", ["stdout", "stderr"])
def test_plain_ansible_playbook_aborts_on_nonblocking_handle(handle, long_playbook):
    rc, out, err = run_with_nonblocking([str(VENV_BIN / "ansible-playbook"), str(long_playbook)], handle)
    assert rc != 0
    assert ANSIBLE_ERROR in out + err


@pytest.mark.parametrize("handle", ["stdout", "stderr"])
def test_smallcloud_playbook_runs_with_every_line_intact(handle, long_playbook):
    rc, out, err = run_with_nonblocking(
        [str(VENV_BIN / "smallcloud"), "playbook", str(long_playbook)], handle, reader_delay=2.0
    )
    assert rc == 0, err[-2000:]
    assert ANSIBLE_ERROR not in out + err
    assert len(printed_lines(out)) == LINES  # nothing lost or truncated on a pipe that filled up
    assert "ok=1" in out.rsplit("PLAY RECAP", maxsplit=1)[-1]


@pytest.mark.parametrize("handle", ["stdout", "stderr"])
def test_galaxy_install_needs_smallcloud_under_nonblocking_handle(handle, collection_tarball, tmp_path):
    plain_path, wrapped_path = tmp_path / "plain", tmp_path / "wrapped"
    install = ["collection", "install", str(collection_tarball), "-p"]
    # A fresh collections path: the checkout's own link must not count as "already installed".
    fresh = {"ANSIBLE_COLLECTIONS_PATH": str(tmp_path / "elsewhere")}
    argv = [str(VENV_BIN / "ansible-galaxy"), *install, str(plain_path)]
    rc, out, err = run_with_nonblocking(argv, handle, env=fresh)
    assert rc != 0 and ANSIBLE_ERROR in out + err
    assert not (plain_path / "ansible_collections").exists()

    argv = [str(VENV_BIN / "smallcloud"), "galaxy", *install, str(wrapped_path)]
    rc, out, err = run_with_nonblocking(argv, handle, env=fresh)
    assert rc == 0, err
    assert "smallcloud.kvm" in out + err
    assert (wrapped_path / "ansible_collections" / "smallcloud" / "kvm" / "MANIFEST.json").is_file()
