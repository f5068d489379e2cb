# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
name: cloud
short_description: The instances of a smallcloud cloud, read from its etcd records
version_added: "0.1.0"
author:
  - smallcloud developers (@smallcloud)
description:
  - Makes every instance recorded in the cloud's etcd (C(instances/NAME)) a host named after the instance,
    with the networks, addresses, hypervisor, image, state and floating IPs the cloud recorded for it.
  - "Reads an inventory source file whose name ends in C(.smallcloud.yml) or C(.smallcloud.yaml) and that
    says C(plugin: smallcloud.kvm.cloud)."
  - Sets C(ansible_host) to the instance's floating IP when it has one, else to the fixed IP of its first
    interface.
  - Host variables - C(smallcloud_uuid), C(smallcloud_hypervisor) (the host the instance runs on),
    C(smallcloud_networks) (names), C(smallcloud_interfaces) (a list of C(network), C(ip), C(mac)),
    C(smallcloud_ips), C(smallcloud_macs), C(smallcloud_image), C(smallcloud_state),
    C(smallcloud_floating_ips), C(smallcloud_metadata) (the instance's C(metadata) key/value strings),
    C(smallcloud_security_groups) (the names of its security groups) and
    C(smallcloud_gateways) (per network of the instance - C(vtep), the underlay address of the hypervisor that
    carries the network's gateway, C(namespace), the gateway namespace there, and C(ip), the gateway address
    inside the network).
  - With O(default_groups), every host is in the group C(smallcloud) and in C(network_NAME),
    C(hypervisor_HOST), C(state_STATE) and C(image_IMAGE), sanitized as Ansible sanitizes group names
    (characters not allowed in a group name become C(_)). Then O(compose), O(groups) and O(keyed_groups) apply.
  - The etcd connection options are those of the collection's modules, TLS and authentication included;
    the password is never shown in an error or written to the inventory cache (the cache holds the records).
extends_documentation_fragment:
  - constructed
  - inventory_cache
  - smallcloud.kvm.etcd
  - smallcloud.kvm.host_paths.namespace
options:
  plugin:
    description: The name of this plugin; makes the source file one of this plugin's.
    type: str
    required: true
    choices: [smallcloud.kvm.cloud]
  states:
    description:
      - Only instances in one of these recorded states (for example V(running), V(stopped)); empty for all.
    type: list
    elements: str
    default: []
  networks:
    description: Only instances with an interface on one of these networks; empty for all.
    type: list
    elements: str
    default: []
  hypervisors:
    description: Only instances recorded on one of these hypervisors (host names); empty for all.
    type: list
    elements: str
    default: []
  metadata:
    description:
      - Only instances whose C(metadata) has all of these keys with these values; empty for all.
    type: dict
    default: {}
  gateway_proxy:
    description:
      - Instances without a floating IP get C(ansible_ssh_common_args) with an SSH C(ProxyCommand) through the
        hypervisor that carries their first network's gateway (its underlay address); there the connection
        is made from the gateway namespace with C(ip netns exec NAMESPACE nc HOST PORT) (the hypervisor role
        installs C(nc)). A O(compose) of C(ansible_ssh_common_args) still wins.
    type: bool
    default: false
  gateway_proxy_user:
    description:
      - User the proxy logs in to the hypervisor as; one other than C(root) runs C(sudo -n ip netns exec).
    type: str
    default: root
  gateway_proxy_ssh_args:
    description:
      - Extra options of the proxy's own SSH command (for example C(-i KEY -o StrictHostKeyChecking=no)).
        No double quotes - the value sits inside the double-quoted C(ProxyCommand).
    type: str
    default: ""
  default_groups:
    description:
      - Add the hosts to the groups C(smallcloud), C(network_NAME), C(hypervisor_HOST), C(state_STATE) and
        C(image_IMAGE).
    type: bool
    default: true
notes:
  - An instance without a floating IP has only addresses inside its cloud network, which the controller does
    not route to. Its network's gateway namespace on the hypervisor that carries the gateway does reach it, so
    an SSH C(ProxyCommand) through that hypervisor reaches the guest - O(gateway_proxy) sets it up. The
    collection's end-to-end test logs in to a real guest that way.
  - "With O(cache), the records are read from etcd once and kept in the cache plugin until O(cache_timeout);
    C(--flush-cache) or C(meta: refresh_inventory) reads etcd again and refreshes the cache."
requirements:
  - etcd3gw (on the controller)
"""

EXAMPLES = r"""
# cloud.smallcloud.yml - every instance; etcd from /etc/smallcloud/etcd-client.json or loopback
plugin: smallcloud.kvm.cloud

# web.smallcloud.yml - running instances on the network web, from a TLS etcd cluster
plugin: smallcloud.kvm.cloud
etcd_endpoints:
  - https://10.0.0.1:2379
  - https://10.0.0.2:2379
etcd_ca_cert: /etc/smallcloud/etcd-ca.pem
etcd_cert: /etc/smallcloud/etcd-client.pem
etcd_key: /etc/smallcloud/etcd-client.key
states: [running]
networks: [web]

# groups.smallcloud.yml - Ansible's constructed options and a cache between runs
plugin: smallcloud.kvm.cloud
strict: true
keyed_groups:
  - key: smallcloud_image
    prefix: os
groups:
  exposed: smallcloud_floating_ips | length > 0
compose:
  ansible_user: "'debian'"
cache: true
cache_plugin: ansible.builtin.jsonfile
cache_connection: ~/.cache/smallcloud-inventory
cache_timeout: 300

# proxy.smallcloud.yml - reach instances without a floating IP through their network's gateway: SSH to the
# hypervisor carrying the gateway (its underlay address, as root) and connect from the gateway namespace.
# Instances with a floating IP are reached directly.
plugin: smallcloud.kvm.cloud
gateway_proxy: true
gateway_proxy_ssh_args: -i ~/.ssh/hypervisors
compose:
  ansible_user: "'debian'"

# prod.smallcloud.yml - only the instances a converge tagged with metadata, grouped by role
plugin: smallcloud.kvm.cloud
metadata:
  environment: prod
keyed_groups:
  - key: smallcloud_metadata.role
    prefix: role
"""

import ipaddress

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin, Cacheable, Constructable
from ansible.utils.unsafe_proxy import wrap_var

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import ETCD_ARGS
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import SmallcloudError
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.addressing import gateway_facts
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.devices import (
    DEFAULT_NAMESPACE_PREFIX,
    check_namespace_prefix,
    device_names,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

SOURCE_SUFFIXES = (".smallcloud.yml", ".smallcloud.yaml")


def read_records(store):
    """The three listings the inventory is made of, as plain JSON (what the cache keeps)."""
    return {"instances": records.instances(store), "networks": records.networks(store),
            "floating_ips": records.floating_ips(store)}


def selected(record, states=(), networks=(), hypervisors=(), metadata=None):
    """Whether an instance record passes the filters (an empty filter passes everything)."""
    attached = {nic.get("network") for nic in record.get("interfaces") or []}
    recorded = record.get("metadata") or {}
    return ((not states or record.get("state") in states)
            and (not networks or bool(attached & set(networks)))
            and (not hypervisors or record.get("host") in hypervisors)
            and all(recorded.get(key) == value for key, value in (metadata or {}).items()))


def proxy_args(gateway, user="root", ssh_args=""):
    """``ansible_ssh_common_args`` reaching a guest from its network's gateway namespace on ``gateway``'s host."""
    if not gateway.get("vtep") or not gateway.get("namespace"):
        return None
    sudo = "" if user == "root" else "sudo -n "
    hop = " ".join(part for part in ("ssh", ssh_args.strip(), "-o BatchMode=yes") if part)
    return '-o ProxyCommand="%s %s@%s %sip netns exec %s nc %%h %%p"' % (
        hop, user, gateway["vtep"], sudo, gateway["namespace"])


def gateway_of(network, namespace_prefix):
    """Where a network's gateway lives: the carrying hypervisor's underlay address, namespace and gateway IP
    (named as the network module names them)."""
    vni, cidr = network.get("vni"), network.get("cidr")
    try:
        gateway_ip = gateway_facts(ipaddress.ip_network(cidr, strict=False))["gateway_ip"] if cidr else None
    except ValueError:
        gateway_ip = None  # not a record the network module wrote; the rest of it still helps
    return {"vtep": network.get("gateway_vtep"),
            "namespace": device_names(vni, namespace_prefix)["namespace"] if isinstance(vni, int) else None,
            "ip": gateway_ip}


def host_vars(name, record, networks, floating_ips, namespace_prefix=DEFAULT_NAMESPACE_PREFIX):
    """The host variables of one instance record (``ansible_host`` included)."""
    interfaces = [{"network": nic.get("network"), "ip": nic.get("ip"), "mac": nic.get("mac")}
                  for nic in record.get("interfaces") or []]
    names = [nic["network"] for nic in interfaces]
    floating = records.floating_of(name, interfaces, floating_ips)
    ips = [nic["ip"] for nic in interfaces if nic["ip"]]
    variables = {
        "smallcloud_uuid": record.get("uuid"),
        "smallcloud_hypervisor": record.get("host"),
        "smallcloud_networks": names,
        "smallcloud_interfaces": interfaces,
        "smallcloud_ips": ips,
        "smallcloud_macs": [nic["mac"] for nic in interfaces if nic["mac"]],
        "smallcloud_image": record.get("image"),
        "smallcloud_state": record.get("state"),
        "smallcloud_floating_ips": floating,
        "smallcloud_metadata": dict(record.get("metadata") or {}),
        "smallcloud_security_groups": list(record.get("security_groups") or []),
        "smallcloud_gateways": {network: gateway_of(networks[network], namespace_prefix)
                                for network in names if network in networks},
    }
    address = (floating or ips or [None])[0]
    if address:
        variables["ansible_host"] = address
    return variables


def default_groups(record):
    """The group names (not yet sanitized) an instance belongs to by default."""
    groups = ["smallcloud"]
    groups += ["network_%s" % nic.get("network") for nic in record.get("interfaces") or [] if nic.get("network")]
    for prefix, key in (("hypervisor", "host"), ("state", "state"), ("image", "image")):
        if record.get(key):
            groups.append("%s_%s" % (prefix, record[key]))
    return list(dict.fromkeys(groups))


def inventory_entries(listing, *, states=(), networks=(), hypervisors=(), metadata=None, groups=True,
                      namespace_prefix=DEFAULT_NAMESPACE_PREFIX, proxy=None):
    """``[{"name", "vars", "groups"}]`` of the selected instances of ``listing`` (read_records), sorted by name.

    ``proxy``: ``{"user", "ssh_args"}`` to give instances without a floating IP a gateway proxy command.
    """
    entries = []
    for key, record in sorted((listing.get("instances") or {}).items()):
        if not isinstance(record, dict) or not selected(record, states, networks, hypervisors, metadata):
            continue
        name = record.get("name") or key
        variables = host_vars(name, record, listing.get("networks") or {}, listing.get("floating_ips") or {},
                              namespace_prefix)
        first = (variables["smallcloud_networks"] or [None])[0]
        if proxy is not None and not variables["smallcloud_floating_ips"] and first in variables["smallcloud_gateways"]:
            args = proxy_args(variables["smallcloud_gateways"][first], proxy["user"], proxy["ssh_args"])
            if args:
                variables["ansible_ssh_common_args"] = args
        entries.append({"name": name, "vars": variables, "groups": default_groups(record) if groups else []})
    return entries


class InventoryModule(BaseInventoryPlugin, Constructable, Cacheable):
    """Hosts from the instance records of a smallcloud cloud's etcd."""

    NAME = "smallcloud.kvm.cloud"

    def verify_file(self, path):
        """Only readable files named ``*.smallcloud.yml`` / ``*.smallcloud.yaml``."""
        return super().verify_file(path) and path.endswith(SOURCE_SUFFIXES)

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        self.check_options(self._read_config_data(path), path)
        listing = self._listing(path, cache)
        self.populate(listing)

    def check_options(self, config, path):
        """AnsibleParserError naming the keys of the source file that are no option (Ansible ignores them), or a
        ``namespace_prefix`` the modules would refuse (it ends up in the gateway proxy's command)."""
        unknown = sorted(set(config) - set(self.option_definitions))
        if unknown:
            raise AnsibleParserError("smallcloud.kvm.cloud: %s has unknown option(s) %s; the options are %s"
                                     % (path, ", ".join(map(str, unknown)), ", ".join(sorted(self.option_definitions))))
        try:
            check_namespace_prefix(self.get_option("namespace_prefix"))
        except SmallcloudError as error:
            raise AnsibleParserError("smallcloud.kvm.cloud: %s: %s" % (path, error.msg)) from error

    def _listing(self, path, cache):
        """The records: from the inventory cache when it is on and has them, else from etcd (then cached)."""
        use_cache = self.get_option("cache")
        key = self.get_cache_key(path)
        if use_cache and cache:
            try:
                return self._cache[key]
            except KeyError:
                pass
        listing = self.read_etcd()
        if use_cache:
            self._cache[key] = listing
        return listing

    def etcd_params(self):
        """The etcd options in the shape Store.from_params takes."""
        return {option: self.get_option(option) for option in ETCD_ARGS}

    def read_etcd(self):
        """read_records from the cloud's etcd; AnsibleParserError naming the endpoints (never the password)."""
        params = self.etcd_params()
        try:
            store = Store.from_params(params)  # the client file, when it is the source, is read here once
        except SmallcloudError as error:
            raise AnsibleParserError("smallcloud.kvm.cloud: %s" % error) from error
        try:
            return read_records(store)
        except SmallcloudError as error:
            raise AnsibleParserError(
                "smallcloud.kvm.cloud: cannot read the cloud's records from etcd at %s (etcd_prefix %s): %s"
                % (", ".join(endpoint.url for endpoint in store.gateway.endpoints), params["etcd_prefix"], error)
            ) from error

    def populate(self, listing):
        """Hosts, host variables and groups from the records, then Ansible's constructed options."""
        strict = self.get_option("strict")
        entries = inventory_entries(
            listing, states=self.get_option("states"), networks=self.get_option("networks"),
            hypervisors=self.get_option("hypervisors"), metadata=self.get_option("metadata"),
            groups=self.get_option("default_groups"), namespace_prefix=self.get_option("namespace_prefix"),
            proxy={"user": self.get_option("gateway_proxy_user"), "ssh_args": self.get_option("gateway_proxy_ssh_args")}
            if self.get_option("gateway_proxy") else None,
        )
        for entry in entries:
            host = entry["name"]
            self.inventory.add_host(host)
            for group in entry["groups"]:
                self.inventory.add_child(self.inventory.add_group(self._sanitize_group_name(group)), host)
            for variable, value in entry["vars"].items():
                # etcd holds data, never templates (ansible-core < 2.19 would render a "{{" in a record)
                self.inventory.set_variable(host, variable, wrap_var(value))
            variables = self.inventory.get_host(host).get_vars()
            self._set_composite_vars(self.get_option("compose"), variables, host, strict=strict)
            self._add_host_to_composed_groups(self.get_option("groups"), variables, host, strict=strict)
            self._add_host_to_keyed_groups(self.get_option("keyed_groups"), variables, host, strict=strict)
