# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""YAML parsing on demand: PyYAML costs about 12 ms to import, which a module pays only when it reads YAML
(user-data to check, a catalog file), not on every task."""

import importlib.util

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import MissingLibrary


def has_yaml():
    """Whether PyYAML is importable (without importing it)."""
    return importlib.util.find_spec("yaml") is not None


def load_yaml(text):
    """The data of a YAML document; MissingLibrary when PyYAML is not installed."""
    from ansible.module_utils.common.yaml import HAS_YAML, yaml_load  # noqa: PLC0415 - see the module docstring

    if not HAS_YAML:
        raise MissingLibrary("PyYAML is required to read YAML here (Debian: python3-yaml)", library="PyYAML")
    return yaml_load(text)
