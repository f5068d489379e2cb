"""A copy of the working tree laid out as ansible_collections/smallcloud/kvm, for ansible-test."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def tree_files(root=ROOT):
    """Files git tracks plus untracked ones it does not ignore: what a commit would hold."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root, capture_output=True, check=True,
    ).stdout
    return [name for name in out.decode().split("\0") if name and (root / name).is_file()]


def copy_collection(destination):
    """Copy the tree to DESTINATION/ansible_collections/smallcloud/kvm and return that path."""
    target = Path(destination) / "ansible_collections" / "smallcloud" / "kvm"
    for name in tree_files():
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, path)
    return target
