# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Small text files the modules keep on hosts (dnsmasq hosts, tmpfiles.d): read, and replace atomically."""

import os

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError


def read_text(path):
    """A file's text, or None when it does not exist."""
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def write_text(path, text, mode=0o644):
    """Write ``text`` to ``path`` atomically (temporary file + rename), creating its directory."""
    directory = os.path.dirname(path) or "."
    try:
        if not os.path.isdir(directory):
            os.makedirs(directory, 0o755)
        # Per process, so two runs writing the same file never share a temporary file.
        temporary = "%s.%d.tmp" % (path, os.getpid())
        with open(temporary, "w") as handle:
            handle.write(text)
        os.chmod(temporary, mode)
        os.rename(temporary, path)
    except OSError as error:
        raise HostError("cannot write %s: %s" % (path, error), path=path) from error
