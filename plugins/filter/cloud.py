# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters of the cloud role: the role's data turned into the options of the modules it calls on a host.

The role's tasks and its one-call plan (smallcloud.kvm.cloud_plan) both take their options from here, so
what the plan checks is what the tasks would do.
"""

from ansible_collections.smallcloud.kvm.plugins.module_utils.host.placing import instances_on_host

# Keys of the role's network entries that are the role's, not the network module's.
NETWORK_ROLE_KEYS = ("gateway_host",)


def cloud_network_calls(networks, gateway_networks, mesh_hosts, underlay_interface=""):
    """The smallcloud.kvm.network options of every declared network on one host.

    ``gateway`` is whether the network's gateway runs on this host (``gateway_networks``); the mesh is
    ``mesh_hosts`` unless the network names its own ``mesh_peers``; ``underlay_interface`` is the host's
    default unless the network sets one. The role's own key ``gateway_host`` is left out.
    """
    calls = []
    for network in networks or []:
        call = {key: value for key, value in network.items() if key not in NETWORK_ROLE_KEYS}
        call["gateway"] = network.get("name") in (gateway_networks or [])
        if "mesh_peers" not in network:
            call["mesh_hosts"] = list(mesh_hosts or [])
        if underlay_interface and "underlay_interface" not in network:
            call["underlay_interface"] = underlay_interface
        calls.append(call)
    return calls


def cloud_unused_security_groups(groups, instances, keep_groups, keep_instances):
    """Sorted names of the recorded security ``groups`` a prune removes: not in ``keep_groups``, no kept instance
    in them (``instances``: the records by name) and no kept group's rule naming them."""
    kept = set(keep_groups or [])
    used = {group for name, record in (instances or {}).items() if name in (keep_instances or [])
            for group in (record or {}).get("security_groups") or []}
    used |= {rule.get("group") for name, record in (groups or {}).items() if name in kept
             for rule in (record or {}).get("rules") or []}
    return sorted(set(groups or {}) - kept - used)


class FilterModule:
    """smallcloud.kvm's filters."""

    def filters(self):
        return {"cloud_network_calls": cloud_network_calls, "cloud_host_instances": instances_on_host,
                "cloud_unused_security_groups": cloud_unused_security_groups}
