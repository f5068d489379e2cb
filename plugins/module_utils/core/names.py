# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Names the cloud gives its objects: one rule, since a name is an etcd path segment, a file name and a
libvirt domain name at once."""

import re

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def check_name(kind, name):
    """``name`` when it may name a ``kind`` (network, instance, ...); InvalidInput naming it otherwise."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInput(
            "%s name %r is not allowed: use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
            % (kind, name), name=name, allowed=NAME_RE.pattern)
    return name
