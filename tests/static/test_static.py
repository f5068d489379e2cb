"""Linters over the tree: ruff, ansible-test sanity (empty ignore files), ansible-lint (production)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from collection_copy import ROOT, copy_collection
from harness.ansible import ansible_env

pytestmark = pytest.mark.static

VENV_BIN = Path(sys.executable).parent
# scripts/bootstrap gives ansible-test a virtualenv of its own, with the linters this ansible-core pins.
SANITY_BIN = ROOT / ".cache" / "ansible-test-venv" / "bin"
SANITY_PYTHON = "3.11"


def run(argv, **kwargs):
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)


def test_ruff_is_clean():
    result = run([str(VENV_BIN / "ruff"), "check", "--no-cache", str(ROOT)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_sanity_ignore_files_are_empty():
    ignores = sorted((ROOT / "tests" / "sanity").glob("ignore-*.txt"))
    assert ignores, "tests/sanity/ignore-*.txt must exist (and stay empty)"
    assert all(path.read_text().strip() == "" for path in ignores)


def test_ansible_test_sanity_is_clean(tmp_path):
    collection = copy_collection(tmp_path)
    result = run(
        [str(SANITY_BIN / "ansible-test"), "sanity", "--python", SANITY_PYTHON, "--color", "no"],
        cwd=collection, timeout=1500, env={**os.environ, "PATH": f"{SANITY_BIN}:{os.environ['PATH']}"},
    )
    findings = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith(("ERROR", "FATAL"))]
    assert result.returncode == 0, "\n".join(findings) or result.stderr[-8000:]


def ansible_lint_targets():
    return [str(path) for path in (ROOT / "roles", ROOT / "playbooks") if any(path.glob("*"))]


def test_ansible_lint_production_profile():
    targets = ansible_lint_targets()
    if not targets:
        pytest.skip("no roles or playbooks yet")
    result = run(
        [str(VENV_BIN / "ansible-lint"), "--profile", "production", "--offline", "--nocolor", *targets],
        cwd=ROOT, timeout=900, env=ansible_env(),  # the checkout as smallcloud.kvm, whoever runs pytest
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
