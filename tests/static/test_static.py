"""Linters over the tree: ruff, ansible-test sanity (empty ignore files), ansible-lint (production),
galaxy-importer (Galaxy's checks on the built collection), antsibull-changelog (fragments, CHANGELOG.rst)."""

import os
import re
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
# ... and galaxy-importer one too: its dependencies are pinned tighter than requirements-dev.txt's.
IMPORTER_BIN = ROOT / ".cache" / "galaxy-importer-venv" / "bin"
IMPORTER_CONFIG = Path(__file__).with_name("galaxy-importer.cfg")
# NNN-topic.yml (NNN: the issue number), or VERSION.yml for a release's summary.
FRAGMENT_NAME = re.compile(r"^(\d+-[a-z0-9][a-z0-9_-]*|\d+\.\d+\.\d+)\.yml$")


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


def test_galaxy_importer_has_nothing_to_say(tmp_path):
    """What Galaxy reports on an upload of the collection as `ansible-galaxy collection build` makes it."""
    collection = copy_collection(tmp_path / "tree")  # what a commit would hold, not stray files
    built = run([str(VENV_BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(tmp_path),
                 str(collection)], env=ansible_env())
    assert built.returncode == 0, built.stdout + built.stderr
    (tarball,) = tmp_path.glob("smallcloud-kvm-*.tar.gz")
    env = {
        **os.environ,
        "PATH": f"{IMPORTER_BIN}:{os.environ['PATH']}",  # its ansible-doc and ansible-lint
        "GALAXY_IMPORTER_CONFIG": str(IMPORTER_CONFIG),
        "GALAXY_IMPORTER_ANSIBLE_LOCAL_TMP": str(tmp_path / "ansible-tmp"),
        "GALAXY_IMPORTER_TMP_ROOT_DIR": str(tmp_path),
    }
    # A network namespace of its own, with nothing in it: the importer cannot reach Galaxy or anything else.
    result = run(["unshare", "--map-root-user", "--net", str(IMPORTER_BIN / "python"), "-m", "galaxy_importer.main",
                  str(tarball)], cwd=tmp_path, env=env, timeout=600)  # it writes importer_result.json into cwd
    output = result.stdout + result.stderr
    findings = [line for line in output.splitlines() if line.startswith(("WARNING", "ERROR", "CRITICAL"))]
    assert not findings, "\n".join(findings)
    assert result.returncode == 0 and "Importer processing completed successfully" in output, output[-8000:]


def test_changelog_fragments_lint():
    fragments = sorted(path.name for path in (ROOT / "changelogs" / "fragments").iterdir()
                       if not path.name.startswith("."))
    assert [name for name in fragments if not FRAGMENT_NAME.match(name)] == [], "name fragments NNN-topic.yml"
    lint = run([str(VENV_BIN / "antsibull-changelog"), "lint"], cwd=ROOT)
    assert lint.returncode == 0 and not lint.stdout.strip(), lint.stdout + lint.stderr
    changelog = run([str(VENV_BIN / "antsibull-changelog"), "lint-changelog-yaml", "--strict",
                     str(ROOT / "changelogs" / "changelog.yaml")], cwd=ROOT)
    assert changelog.returncode == 0 and not changelog.stdout.strip(), changelog.stdout + changelog.stderr


def test_changelog_rst_is_generated_from_the_fragments(tmp_path):
    generated = tmp_path / "CHANGELOG.rst"
    result = run([str(ROOT / "scripts" / "changelog"), str(generated)])
    assert result.returncode == 0, result.stdout + result.stderr
    stale = "CHANGELOG.rst is not what scripts/changelog generates: run it"
    assert (ROOT / "CHANGELOG.rst").read_text() == generated.read_text(), stale
