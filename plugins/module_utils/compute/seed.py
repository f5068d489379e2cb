# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The cloud-init NoCloud seed of an instance: meta-data, user-data, vendor-data, network-config on an ISO
labelled cidata.

The files are pure functions of the instance's settings (``seed_files``); their digest is kept in the
instance's record, so a re-run knows whether the ISO is current without reading it. The ISO is built
with ``genisoimage -V cidata -J -r`` into a temporary file and renamed into place.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile

from ansible_collections.smallcloud.kvm.plugins.module_utils.core import commands
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.documents import has_yaml, load_yaml
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput, MissingLibrary

VOLUME_LABEL = "cidata"
SCRATCH_PREFIX = ".seed-"  # the temporary directory in which write_iso builds a seed
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)%s(\.%s)*$" % (_LABEL, _LABEL))
CLOUD_CONFIG = "#cloud-config"
SSH_KEY_TYPES = ("ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-")


def check_hostname(hostname):
    """``hostname`` if it is a valid DNS name (labels of letters, digits, '-'), else InvalidInput."""
    if not isinstance(hostname, str) or not HOSTNAME_RE.match(hostname):
        raise InvalidInput(
            "hostname %r is not valid: use DNS labels of 1-63 letters, digits or '-' (not at either end), "
            "separated by '.'" % (hostname,), hostname=hostname)
    return hostname


def hostname_for(name):
    """A valid hostname derived from an instance name ('_' and '.' become '-')."""
    return re.sub(r"[^A-Za-z0-9-]", "-", name)[:63].strip("-") or "instance"


def check_ssh_keys(keys):
    """The keys as a list of one-line strings; InvalidInput naming the first that is not an OpenSSH public key."""
    checked = []
    for key in keys or []:
        text = key.strip() if isinstance(key, str) else key
        if not isinstance(text, str) or "\n" in text or not text.startswith(SSH_KEY_TYPES) or len(text.split()) < 2:
            raise InvalidInput(
                "ssh_keys entry %r is not an OpenSSH public key line (e.g. 'ssh-ed25519 AAAA... user@host')"
                % (key,), ssh_key=key)
        checked.append(text)
    return checked


def check_user_data(text):
    """The user-data to write: a script (``#!``) as is, or cloud-config (a YAML mapping) with its header.

    InvalidInput names what is wrong when the text is neither a script nor a YAML mapping.
    """
    if text is None or text == "":
        return CLOUD_CONFIG + "\n"
    if not isinstance(text, str):
        raise InvalidInput("user_data must be text (cloud-config YAML or a #! script), got %r" % (text,))
    if text.startswith("#!"):
        return text if text.endswith("\n") else text + "\n"
    if not has_yaml():
        raise MissingLibrary("PyYAML is required to check user_data (Debian: python3-yaml)", library="PyYAML")
    try:
        data = load_yaml(text)
    except Exception as error:  # yaml's errors have no common importable base here
        raise InvalidInput("user_data is not valid YAML: %s" % error, user_data=text[:200]) from None
    if data is not None and not isinstance(data, dict):
        raise InvalidInput(
            "user_data is not cloud-config: expected a YAML mapping (or a #! script), got %s" % type(data).__name__,
            user_data=text[:200])
    if not text.lstrip().startswith(CLOUD_CONFIG):
        text = CLOUD_CONFIG + "\n" + text
    return text if text.endswith("\n") else text + "\n"


def meta_data(instance_id, hostname, ssh_keys):
    """NoCloud meta-data (YAML; strings JSON-quoted, which YAML reads as they are)."""
    lines = ["instance-id: %s" % json.dumps(instance_id), "local-hostname: %s" % json.dumps(hostname)]
    if ssh_keys:
        lines.append("public-keys:")
        lines.extend("  - %s" % json.dumps(key) for key in ssh_keys)
    return "\n".join(lines) + "\n"


def network_config(macs):
    """Netplan v2 network-config: every NIC (by MAC, in order eth0, eth1, ...) takes DHCP."""
    ethernets = {}
    for index, mac in enumerate(macs):
        ethernets["eth%d" % index] = {"match": {"macaddress": mac}, "set-name": "eth%d" % index, "dhcp4": True}
    return json.dumps({"version": 2, "ethernets": ethernets}, indent=2, sort_keys=True) + "\n"


# The cloud's defaults for every guest; cloud-init merges user-data over vendor-data, so user-data that says
# otherwise wins. manage_etc_hosts: the guest's own name resolves (``hostname -f``, sudo) without DNS.
VENDOR_DATA = CLOUD_CONFIG + "\nmanage_etc_hosts: true\n"


def seed_files(instance_id, hostname, ssh_keys, user_data, macs):
    """``{file name: text}`` of the seed."""
    return {
        "meta-data": meta_data(instance_id, hostname, ssh_keys),
        "user-data": check_user_data(user_data),
        "vendor-data": VENDOR_DATA,
        "network-config": network_config(macs),
    }


def digest(files):
    """sha256 over the seed files (names and contents), as ``sha256:HEX``."""
    hasher = hashlib.sha256()
    for name in sorted(files):
        hasher.update(name.encode("utf-8") + b"\0" + files[name].encode("utf-8") + b"\0")
    return "sha256:" + hasher.hexdigest()


def write_iso(path, files):
    """Build the seed ISO at ``path`` (atomically: temporary file, then rename)."""
    directory = os.path.dirname(path)
    for name in os.listdir(directory):
        if name.startswith(SCRATCH_PREFIX):  # a run killed while writing one left it (runs hold the instance's lock)
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=directory)
    try:
        content = os.path.join(scratch, "content")
        os.mkdir(content)
        for name, text in files.items():
            with open(os.path.join(content, name), "w") as handle:
                handle.write(text)
        partial = os.path.join(scratch, "seed.iso")
        commands.run(["genisoimage", "-quiet", "-output", partial, "-volid", VOLUME_LABEL, "-joliet", "-rock",
                      content])
        os.chmod(partial, 0o644)
        os.rename(partial, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
