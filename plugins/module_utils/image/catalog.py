# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The image catalog: shorthand names (``debian:12``) -> upstream URL and published checksum file.

Users extend or override the built-in table with a mapping (module option ``catalog``) and/or a
YAML or JSON file (``catalog_file``); the task's mapping wins over the file, the file over the table.
"""

import json
import re

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.documents import has_yaml, load_yaml
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput

_DEBIAN = "https://cloud.debian.org/images/cloud/%s/latest/"
_UBUNTU = "https://cloud-images.ubuntu.com/releases/%s/release/"


def _debian(codename, version):
    base = _DEBIAN % codename
    return {"url": base + "debian-%s-generic-amd64.qcow2" % version, "checksum_url": base + "SHA512SUMS"}


def _ubuntu(version):
    base = _UBUNTU % version
    return {"url": base + "ubuntu-%s-server-cloudimg-amd64.img" % version, "checksum_url": base + "SHA256SUMS"}


BUILTIN = {
    "debian:11": _debian("bullseye", "11"),
    "debian:12": _debian("bookworm", "12"),
    "debian:13": _debian("trixie", "13"),
    "debian:bullseye": _debian("bullseye", "11"),
    "debian:bookworm": _debian("bookworm", "12"),
    "debian:trixie": _debian("trixie", "13"),
    "ubuntu:22.04": _ubuntu("22.04"),
    "ubuntu:24.04": _ubuntu("24.04"),
    "ubuntu:jammy": _ubuntu("22.04"),
    "ubuntu:noble": _ubuntu("24.04"),
}

ENTRY_KEYS = ("url", "checksum", "checksum_url", "description")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]*(:[A-Za-z0-9][A-Za-z0-9._+-]*)?$"


def check_name(name):
    """Raise InvalidInput unless ``name`` looks like a catalog name (no paths, no URLs)."""
    if not isinstance(name, str) or len(name) > 128 or not re.match(NAME_PATTERN, name):
        raise InvalidInput(
            "image name %r is not a catalog name: letters, digits, '.', '_', '-', '+' and one ':' (e.g. debian:12)"
            % (name,),
            name=name,
            allowed=NAME_PATTERN,
        )


def normalize_entry(name, entry, origin):
    """One catalog entry as a dict with ``url`` (a bare string is taken as the URL)."""
    if isinstance(entry, str):
        entry = {"url": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("url"), str) or not entry["url"]:
        raise InvalidInput(
            "catalog entry %r in %s needs a 'url' (a string, or a mapping with url and checksum_url)" % (name, origin),
            name=name,
            entry=entry,
        )
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise InvalidInput(
            "catalog entry %r in %s has unknown keys %s; allowed: %s" % (name, origin, unknown, ", ".join(ENTRY_KEYS)),
            name=name,
            allowed=list(ENTRY_KEYS),
        )
    return {key: entry[key] for key in ENTRY_KEYS if entry.get(key) is not None}


def load_file(path):
    """A user catalog from a YAML or JSON file: a mapping of name -> entry."""
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError as error:
        raise InvalidInput(
            "cannot read catalog_file %s: %s; expected a readable YAML or JSON file mapping image names to entries"
            % (path, error.strerror or error), catalog_file=path
        ) from error
    try:
        data = json.loads(text) if path.endswith(".json") or not has_yaml() else load_yaml(text)
    except Exception as error:  # noqa: BLE001 - json and yaml raise different types; both mean bad input
        raise InvalidInput("catalog_file %s is not valid YAML/JSON: %s" % (path, error), catalog_file=path) from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInput("catalog_file %s must hold a mapping of image name -> entry" % path, catalog_file=path)
    return data


def merged(catalog=None, catalog_file=None):
    """The effective catalog: built-in, then the file, then the task's mapping."""
    table = dict(BUILTIN)
    for origin, extra in (("catalog_file %s" % catalog_file, load_file(catalog_file) if catalog_file else None),
                          ("the catalog option", catalog)):
        for name, entry in (extra or {}).items():
            check_name(name)
            table[name] = normalize_entry(name, entry, origin)
    return table


def resolve(name, catalog=None, catalog_file=None):
    """``name`` -> entry dict (url, checksum_url and/or checksum); unknown names list the known ones."""
    check_name(name)
    table = merged(catalog, catalog_file)
    if name not in table:
        known = sorted(table)
        raise InvalidInput(
            "unknown image name %r; known names: %s" % (name, ", ".join(known)), name=name, known=known
        )
    return dict(table[name])
