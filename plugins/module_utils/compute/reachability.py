# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""``wait_for: ssh``: wait until the guests of a batch answer with an SSH banner, as a user would reach them.

A guest is probed on its first interface's address from that network's gateway namespace when the gateway
runs on this host (the path the inventory plugin's proxy command takes), else on its floating IP from this
host. A guest with neither cannot be reached from here: that is an InvalidInput before any wait.
"""

import sys
import time

from ansible_collections.smallcloud.kvm.plugins.module_utils.core import commands
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError, InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import netns_services as svc
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.devices import device_names
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records

SSH_PORT = 22
POLL_SECONDS = 2
# Run by the module's own interpreter, inside the gateway namespace: exit 0 when the port sends an SSH banner.
BANNER_PROBE = (
    "import socket, sys\n"
    "try:\n"
    "    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
    "    s.settimeout(float(sys.argv[3]))\n"
    "    sys.exit(0 if s.recv(64).startswith(b'SSH-') else 1)\n"
    "except OSError:\n"
    "    sys.exit(1)\n"
)


def ssh_banner(address, port=SSH_PORT, timeout=POLL_SECONDS, netns=None):
    """True when ``address:port`` answers with an SSH banner (from namespace ``netns`` when given)."""
    argv = [sys.executable, "-c", BANNER_PROBE, address, str(port), str(timeout)]
    returncode, _out, _err = commands.run(svc.in_netns(netns, argv), check=False, timeout=timeout + 10)
    return returncode == 0


def gateway_namespace(network_name, networks, namespace_prefix):
    """The gateway namespace of ``network_name`` (in the ``networks`` listing) when it is on this host, else None."""
    network = networks.get(network_name) or {}
    if network.get("vni") is None:
        return None
    namespace = device_names(network["vni"], namespace_prefix)["namespace"]
    return namespace if svc.netns_exists(namespace) else None


def check_reachable(name, network_names, networks, floating_ips, namespace_prefix):
    """Refuse, before any change, to wait for a guest this host has no way to reach."""
    if network_names and gateway_namespace(network_names[0], networks, namespace_prefix):
        return
    if records.floating_of(name, [], floating_ips):
        return
    raise InvalidInput(
        "wait_for ssh: instance %s cannot be reached from this host: %s, and it has no floating IP; wait on "
        "the host of its first network's gateway, or give it a floating IP first"
        % (name, "its network %s has its gateway on another host" % network_names[0] if network_names
           else "it has no network"), instance=name)


def probe_route(name, record, networks, floating_ips, namespace_prefix):
    """``(address, namespace or None, description)`` this host can probe instance ``name`` on.

    ``networks`` and ``floating_ips`` are the listings of those records, read once for a whole batch.
    """
    interfaces = [nic for nic in (record or {}).get("interfaces") or [] if nic.get("ip")]
    namespace = gateway_namespace(interfaces[0]["network"], networks, namespace_prefix) if interfaces else None
    if namespace:
        return interfaces[0]["ip"], namespace, "%s from namespace %s" % (interfaces[0]["ip"], namespace)
    floating = records.floating_of(name, interfaces, floating_ips)
    if floating:
        return floating[0], None, "floating IP %s" % floating[0]
    check_reachable(name, [nic["network"] for nic in interfaces], networks, floating_ips, namespace_prefix)  # raises
    return None


def wait_for_ssh(routes, timeout, clock=time.monotonic, sleep=time.sleep):
    """Probe every ``{name: (address, netns, description)}`` until all answer; ``{name: seconds}`` it took.

    Raises HostError naming the guests still silent after ``timeout`` seconds.
    """
    start, waited, pending = clock(), {}, dict(routes)
    while True:
        for name, (address, netns, _description) in sorted(pending.items()):
            if ssh_banner(address, netns=netns):
                waited[name] = round(clock() - start, 1)
                del pending[name]
        if not pending or clock() - start >= timeout:
            break
        sleep(POLL_SECONDS)
    if pending:
        raise HostError("wait_for ssh: no SSH banner within %d s from %s" % (
            timeout, "; ".join("%s (%s)" % (name, route[2]) for name, route in sorted(pending.items()))),
            instances=sorted(pending))
    return waited
