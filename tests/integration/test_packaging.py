"""Packaging: the Python package builds with the newest pip, and the collection builds and installs."""

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from harness.ansible import ansible_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PACKAGE_FILES = ("pyproject.toml", "README.md", "src")


def run(argv, **kwargs):
    return subprocess.run([str(arg) for arg in argv], capture_output=True, text=True, check=False, **kwargs)


def copy_project(destination, files=PACKAGE_FILES):
    """The files a Python source distribution of smallcloud holds, outside the checkout."""
    destination.mkdir()
    for name in files:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, destination / name)
    return destination


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A virtualenv with nothing but the newest pip: what a user who runs `pip install .` has."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    assert run(["/usr/bin/python3", "-m", "venv", venv]).returncode == 0
    upgrade = run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--upgrade", "pip"])
    assert upgrade.returncode == 0, upgrade.stderr
    return venv


def test_pip_install_and_wheel_use_the_isolated_pep517_build(fresh_venv, tmp_path):
    project = copy_project(tmp_path / "project")
    pip = [fresh_venv / "bin" / "python", "-m", "pip"]
    installed = run([*pip, "install", project])
    assert installed.returncode == 0, installed.stdout + installed.stderr
    wheel = run([*pip, "wheel", "--no-deps", "-w", tmp_path / "wheels", project])
    assert wheel.returncode == 0, wheel.stdout + wheel.stderr
    wheels = list((tmp_path / "wheels").glob("smallcloud-*.whl"))
    assert len(wheels) == 1

    version = run([fresh_venv / "bin" / "smallcloud", "version"])
    assert version.returncode == 0 and version.stdout.startswith("smallcloud ")


def test_installed_command_without_ansible_says_what_to_install(fresh_venv, tmp_path):
    project = copy_project(tmp_path / "project")
    assert run([fresh_venv / "bin" / "python", "-m", "pip", "install", "-q", project]).returncode == 0
    env = {**os.environ, "PATH": f"{fresh_venv / 'bin'}:/usr/bin:/bin"}  # no Ansible anywhere on it
    result = run([fresh_venv / "bin" / "smallcloud", "playbook", "site.yml"], env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "pip install ansible-core" in result.stderr


def test_newest_pip_refuses_the_project_without_its_pyproject(fresh_venv, tmp_path):
    """The other half of the quirk: with no build-system declared there is nothing pip can build."""
    project = copy_project(tmp_path / "bare", files=("README.md", "src"))
    refused = run([fresh_venv / "bin" / "python", "-m", "pip", "install", project])
    assert refused.returncode != 0
    assert "pyproject.toml" in refused.stderr or "setup.py" in refused.stderr


@pytest.fixture(scope="module")
def built_collection(tmp_path_factory):
    out = tmp_path_factory.mktemp("galaxy-build")
    result = run([VENV_BIN / "ansible-galaxy", "collection", "build", "--output-path", out, ROOT], env=ansible_env())
    assert result.returncode == 0, result.stderr
    return next(out.glob("smallcloud-kvm-*.tar.gz"))


def test_built_collection_leaves_development_files_out(built_collection):
    with tarfile.open(built_collection) as archive:
        top = {name.split("/")[0] for name in archive.getnames()}
    assert {"plugins", "meta", "galaxy.yml", "MANIFEST.json", "README.md"} <= top | {"galaxy.yml"}
    assert not top & {"tests", "bench", "molecule", "src", ".venv", ".cache", "scripts", ".ci"}


def test_built_collection_installs_and_documents_every_module(built_collection, tmp_path):
    env = ansible_env({"ANSIBLE_COLLECTIONS_PATH": str(tmp_path)})
    install = run([VENV_BIN / "ansible-galaxy", "collection", "install", built_collection, "-p", tmp_path], env=env)
    assert install.returncode == 0, install.stderr
    installed = tmp_path / "ansible_collections" / "smallcloud" / "kvm"
    assert (installed / "MANIFEST.json").is_file()

    modules = sorted(path.stem for path in (ROOT / "plugins" / "modules").glob("*.py") if path.stem != "__init__")
    listed = run([VENV_BIN / "ansible-doc", "-t", "module", "-l", "smallcloud.kvm"], env=env)
    assert listed.returncode == 0, listed.stderr
    assert sorted(line.split()[0].split(".")[-1] for line in listed.stdout.splitlines() if line.strip()) == modules


def test_execution_environment_build_context(tmp_path):
    """ansible-builder turns execution-environment.yml into a build context with our dependency files."""
    context = tmp_path / "context"
    result = run([VENV_BIN / "ansible-builder", "create", "-f", ROOT / "execution-environment.yml", "-c", context,
                  "--output-filename", "Containerfile"])
    assert result.returncode == 0, result.stdout + result.stderr
    containerfile = (context / "Containerfile").read_text()
    assert "FROM" in containerfile
    build_files = {path.name for path in (context / "_build").iterdir()}
    assert {"requirements.txt", "bindep.txt"} <= build_files
    assert "etcd3gw" in (context / "_build" / "requirements.txt").read_text()
