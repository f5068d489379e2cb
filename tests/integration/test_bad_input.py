"""Bad input to every module, role and the inventory plugin is refused, names itself, and changes nothing.

One table holds the cases: names with shell or path characters, numbers out of range, wrong types,
options that exclude each other, and references to things that do not exist (a network, an instance, a
host). Each case must fail, with a message holding the bad value and a word of what is allowed (the
case's needles), before anything is changed.

To stay fast, the table runs in four batches at once: the module cases as tasks of two playbooks (half
each, ``ignore_errors``), every role case as an ``include_role`` in a block whose rescue records the
refusal (only the roles' preflight tags, in check mode), and every inventory case as one source of a single
``ansible-inventory`` run. One snapshot before and one after the batches shows that nothing changed:
every etcd key and value under the test's prefix, the links, nftables tables of the sandbox namespace that
the modules take as their host (``host_netns``), the namespaces with the test's prefix, the files under the
test's directories (a copy of the KSM sysfs directory, the image cache, instance and state directories),
and the host's links and libvirt domains. Machine-wide listings are narrowed to names this file's input
could produce (its token or a name from the table), so that other tests running at the same time do not
count as changes.

Cases marked xfail are product gaps: a message that lacks the value or what is allowed in a file this test
may not edit, or a check that does not exist yet. Each says what it should be. So is the last test: a network
refused for its state_dir keeps the record the run wrote before it found out.
"""

import base64
import concurrent.futures
import hashlib
import json
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass

import pytest
import yaml
from harness.ansible import VENV_BIN, ansible_env, run_playbook, run_tasks
from harness.etcd import b64, delete_prefix, etcd_request
from harness.host import virsh
from harness.ksm import KSM
from harness.netns import NetnsFactory, delete_netns, netns_list
from harness.paths import ROOT
from harness.ports import free_port

from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

pytestmark = pytest.mark.integration

# Names this file's sandbox: its namespaces, scratch service names, valid-looking instance names.
TOKEN = "sbi" + uuid.uuid4().hex[:5]
LONG_NAME = "n" * 64
POOL = "198.51.100.0/24"
# Records seeded under the test's etcd prefix, for the cases that refer to something existing or not.
SEEN_NET = {"name": "seen-net", "cidr": "10.240.0.0/24", "vni": 0xBAD01, "mtu": 1450, "dhcp": True, "dns": True,
            "dns_servers": [], "nat": True, "egress_pool": POOL, "egress_address": None, "vteps": [],
            "gateway_vtep": "127.0.0.1"}
QUIET_NET = dict(SEEN_NET, name="quiet-net", cidr="10.241.0.0/24", vni=0xBAD02, nat=False, egress_pool=None)
SEEN_HOST = {"name": "hv-seen", "hostname": "hv-seen.example", "underlay_interface": "lo",
             "underlay_address": "127.0.0.1", "virt_type": "qemu", "state": "active",
             "capacity": {"vcpus": 2, "memory_mb": 4096, "disk_gb": 20}, "allocation_ratios": {}}
SEEN_VM = {"name": "seen-vm", "uuid": "5eed0000-0000-4000-8000-000000000001", "host": "hv-seen.example",
           "state": "stopped", "image": "file:///nonexistent.qcow2", "cpus": 1, "memory": 64,
           "interfaces": [{"network": "seen-net", "mac": "02:73:63:00:99:01", "ip": "10.240.0.5"}]}
NAME_RULE = "letters, digits"  # what check_name says is allowed
MODULES = ("ksm", "ksm_info", "image", "image_cache", "network", "floating_ip", "instance", "cloud_info", "cloud_plan",
           "host", "placement", "instance_move", "security_group")
ROLES = ("etcd", "hypervisor", "cloud")


@dataclass(frozen=True)
class Case:
    """One bad input: which kind of thing it goes to (module, role, inventory), the arguments, and the
    substrings its refusal must hold."""

    id: str
    kind: str
    target: str
    args: dict
    needles: tuple


def case(kind, target, case_id, args, needles, xfail=None):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(Case(case_id, kind, target, args, tuple(needles)), id=case_id, marks=marks)


def module(target, case_id, args, *needles, xfail=None):
    return case("module", target, case_id, args, needles, xfail)


def role(target, case_id, variables, *needles, xfail=None):
    return case("role", target, case_id, variables, needles, xfail)


def inventory(case_id, options, *needles, xfail=None):
    return case("inventory", "cloud", case_id, options, needles, xfail)


def instance(name, **options):
    return {"name": name, "image": "file:///nonexistent.qcow2", **options}


CASES = [
    # ksm: on a copy of the real KSM directory; bad values fail before sysfs is read.
    module("ksm", "ksm-negative-pages", {"pages_to_scan": -1}, "pages_to_scan=-1", "from 0 to 4294967295"),
    module("ksm", "ksm-sleep-over-uint", {"sleep_millisecs": 2 ** 32}, "4294967296", "from 0 to 4294967295"),
    module("ksm", "ksm-max-page-sharing-1", {"max_page_sharing": 1}, "max_page_sharing=1", "from 2 to"),
    module("ksm", "ksm-run-choice", {"run": "fast"}, "fast", "stopped, running, unmerge"),
    module("ksm", "ksm-pages-not-a-number", {"pages_to_scan": "lots"}, "'lots'", "int"),
    module("ksm", "ksm-bool-not-a-bool", {"use_zero_pages": "maybe"}, "'maybe'", "Valid booleans"),
    # ksm_info
    module("ksm_info", "ksm-info-unknown-option", {"sysfs": "/sys"}, "sysfs",
           "Supported parameters include: sysfs_root"),
    # image
    module("image", "image-url-and-name", {"url": "file:///x.qcow2", "name": "debian:12"}, "mutually exclusive",
           "url|name"),
    module("image", "image-neither-url-nor-name", {}, "one of the following is required", "url, name"),
    module("image", "image-checksum-without-algorithm", {"url": "http://127.0.0.1:9/x.qcow2", "checksum": "abc123"},
           "'abc123'", "ALGORITHM:HEX"),
    module("image", "image-checksum-md5", {"url": "http://127.0.0.1:9/x.qcow2", "checksum": "md5:" + "0" * 32},
           "'md5'", "sha256"),
    module("image", "image-checksum-short-digest", {"url": "http://127.0.0.1:9/x.qcow2", "checksum": "sha256:abcd"},
           "sha256:abcd", "64 hex digits"),
    module("image", "image-url-shell", {"url": "$(reboot)", "checksum": "skip"}, "'$(reboot)'",
           "http, https or file URL"),
    module("image", "image-name-path", {"name": "../../etc/passwd"}, "'../../etc/passwd'", NAME_RULE),
    module("image", "image-name-unknown", {"name": "debian:99"}, "'debian:99'", "known names", "debian:12"),
    module("image", "image-remote-without-checksum", {"url": "http://127.0.0.1:9/x.qcow2"},
           "http://127.0.0.1:9/x.qcow2", "set checksum"),
    module("image", "image-negative-retries", {"url": "file:///x.qcow2", "retries": -1}, "-1", ">= 0"),
    module("image", "image-catalog-entry-unknown-key",
           {"name": "site:tiny", "catalog": {"site:tiny": {"url": "file:///x.qcow2", "sha": "x"}}},
           "['sha']", "allowed: url, checksum, checksum_url, description"),
    module("image", "image-catalog-file-missing", {"name": "site:tiny", "catalog_file": "/nonexistent/catalog.yml"},
           "/nonexistent/catalog.yml", "YAML or JSON file"),
    # image_cache
    module("image_cache", "image-cache-max-age-words", {"max_age": "30 days"}, "'30 days'", "s, m, h, d or w"),
    module("image_cache", "image-cache-negative-max-age", {"max_age": "-1d"}, "'-1d'", "s, m, h, d or w"),
    module("image_cache", "image-cache-remove-path", {"remove": ["../../etc/passwd"]}, "'../../etc/passwd'",
           "64 hex digits"),
    # network: in the sandbox namespace (host_netns)
    module("network", "network-name-shell", {"name": "a;b", "cidr": "10.250.0.0/24"}, "'a;b'", NAME_RULE),
    module("network", "network-name-64-chars", {"name": LONG_NAME, "cidr": "10.250.0.0/24"}, LONG_NAME, "1-63"),
    module("network", "network-vni-0", {"name": "n-vni", "cidr": "10.250.0.0/24", "vni": 0}, "VNI 0",
           "1..16777215"),
    module("network", "network-vni-over-24-bits", {"name": "n-vni", "cidr": "10.250.0.0/24", "vni": 2 ** 24},
           "VNI 16777216", "1..16777215"),
    module("network", "network-cidr-prefix-33", {"name": "n-cidr", "cidr": "10.250.0.0/33"}, "'10.250.0.0/33'",
           "e.g. 10.0.0.0/24"),
    module("network", "network-cidr-ipv6", {"name": "n-cidr", "cidr": "fd00::/64"}, "'fd00::/64'",
           "only IPv4 networks"),
    module("network", "network-cidr-too-small", {"name": "n-cidr", "cidr": "10.250.0.0/30"}, "10.250.0.0/30",
           "at most /29"),
    module("network", "network-mtu-100", {"name": "n-mtu", "cidr": "10.250.0.0/24", "mtu": 100}, "mtu 100",
           "576..9000"),
    module("network", "network-dns-server-shell", {"name": "n-dns", "cidr": "10.250.0.0/24",
                                                   "dns_servers": ["8.8.8.8;reboot"]},
           "'8.8.8.8;reboot'", "IPv4 address"),
    module("network", "network-namespace-prefix-shell", {"name": "n-ns", "cidr": "10.250.0.0/24",
                                                         "namespace_prefix": "x;y"}, "'x;y'", "1-32 letters"),
    module("network", "network-egress-address-outside-pool",
           {"name": "n-egress", "cidr": "10.250.0.0/24", "nat": True, "egress_pool": POOL,
            "egress_address": "203.0.113.5"}, "203.0.113.5", "allowed 198.51.100.2..198.51.100.254"),
    module("network", "network-egress-address-without-pool",
           {"name": "n-egress", "cidr": "10.250.0.0/24", "egress_address": "198.51.100.5"},
           "198.51.100.5", "egress_pool"),
    module("network", "network-cidr-overlaps-existing", {"name": "n-overlap", "cidr": "10.240.0.128/25",
                                                         "underlay_interface": "lo"},
           "10.240.0.128/25", "overlaps network seen-net (10.240.0.0/24)"),
    module("network", "network-existing-cidr-changed", {"name": "seen-net", "cidr": "10.242.0.0/24",
                                                        "underlay_interface": "lo"},
           "cidr 10.242.0.0/24", "exists with cidr 10.240.0.0/24"),
    # floating_ip: seen-net has nat; the references are checked before the gateway namespace
    module("floating_ip", "floating-ip-instance-and-fixed-ip",
           {"pool": POOL, "network": "seen-net", "instance": "seen-vm", "fixed_ip": "10.240.0.5"},
           "mutually exclusive", "instance|fixed_ip"),
    module("floating_ip", "floating-ip-pool-prefix-31", {"pool": "198.51.100.0/31", "network": "seen-net",
                                                         "instance": "seen-vm"}, "198.51.100.0/31", "at most /30"),
    module("floating_ip", "floating-ip-address-outside-pool",
           {"pool": POOL, "network": "seen-net", "instance": "seen-vm", "address": "203.0.113.9"},
           "203.0.113.9", "allowed 198.51.100.2..198.51.100.254"),
    module("floating_ip", "floating-ip-network-name-shell", {"pool": POOL, "network": "x;y", "instance": "seen-vm"},
           "'x;y'", NAME_RULE),
    module("floating_ip", "floating-ip-unknown-network", {"pool": POOL, "network": "ghost-net", "instance": "seen-vm"},
           "network ghost-net does not exist", "known: quiet-net, seen-net"),
    module("floating_ip", "floating-ip-unknown-instance", {"pool": POOL, "network": "seen-net", "instance": "ghost-vm"},
           "instance ghost-vm has no address on network seen-net", "fixed_ip (an address of 10.240.0.0/24)"),
    module("floating_ip", "floating-ip-fixed-ip-outside-network",
           {"pool": POOL, "network": "seen-net", "fixed_ip": "10.9.9.9"}, "fixed_ip 10.9.9.9", "10.240.0.0/24"),
    module("floating_ip", "floating-ip-network-without-nat", {"pool": POOL, "network": "quiet-net",
                                                              "fixed_ip": "10.241.0.5"},
           "network quiet-net", "floating IPs need nat"),
    # instance
    module("instance", "instance-unknown-security-group", instance(f"{TOKEN}-sg", security_groups=["nowhere"]),
           "security group nowhere does not exist", "existing groups"),
    module("instance", "instance-security-group-name-shell", instance(f"{TOKEN}-sg", security_groups=["a;b"]),
           "'a;b'", NAME_RULE),
    # security_group
    module("security_group", "sg-name-shell", {"name": "a;b"}, "'a;b'", NAME_RULE),
    module("security_group", "sg-port-out-of-range", {"name": "sg1", "rules": [{"protocol": "tcp", "port": 70000}]},
           "70000", "1..65535"),
    module("security_group", "sg-port-without-tcp-or-udp", {"name": "sg1", "rules": [{"port": 22}]}, "port 22",
           "tcp or udp"),
    module("security_group", "sg-port-range-reversed", {"name": "sg1", "rules": [{"protocol": "udp", "port": "90-80"}]},
           "'90-80'", "FIRST-LAST"),
    module("security_group", "sg-cidr-host-bits", {"name": "sg1", "rules": [{"cidr": "10.0.0.1/8"}]}, "'10.0.0.1/8'",
           "IPv4 network"),
    module("security_group", "sg-unknown-remote-group", {"name": "sg1", "rules": [{"group": "nowhere"}]},
           "'nowhere', which does not exist", "existing groups"),
    module("security_group", "sg-protocol-unknown", {"name": "sg1", "rules": [{"protocol": "gre"}]}, "gre",
           "tcp, udp, icmp, any"),
    module("instance", "instance-name-path", instance("../etc"), "'../etc'", NAME_RULE),
    module("instance", "instance-name-space", instance("a b"), "'a b'", NAME_RULE),
    module("instance", "instance-0-cpus", instance(f"{TOKEN}-cpus", cpus=0), "cpus 0", "allowed 1..255"),
    module("instance", "instance-negative-memory", instance(f"{TOKEN}-mem", memory=-512), "memory -512 MiB",
           "at least 32 MiB"),
    module("instance", "instance-memory-beyond-host", instance(f"{TOKEN}-mem", memory=2 ** 30),
           "memory 1073741824 MiB", "this host has"),
    module("instance", "instance-name-and-instances", dict(instance(f"{TOKEN}-x"), instances=[{"name": "y"}]),
           "mutually exclusive", "name|instances"),
    module("instance", "instance-disk-size-words", instance(f"{TOKEN}-disk", disk_size="ten gigs"), "'ten gigs'",
           "e.g. 10G, 512M or 20GiB"),
    module("instance", "instance-ephemeral-1k", instance(f"{TOKEN}-disk", ephemeral_disks=["1K"]), "'1K'",
           "at least 1M"),
    module("instance", "instance-on-unknown-network", instance(f"{TOKEN}-net", networks=["ghost-net"]),
           "network ghost-net does not exist", "known: quiet-net, seen-net"),
    module("instance", "instance-network-name-shell", instance(f"{TOKEN}-net", networks=["x;y"]), "'x;y'",
           NAME_RULE),
    module("instance", "instance-fixed-ip-not-an-address",
           instance(f"{TOKEN}-net", networks=[{"name": "seen-net", "ip": "10.240.0.999"}]), "'10.240.0.999'",
           "IPv4 address"),
    module("instance", "instance-hostname-underscore", instance(f"{TOKEN}-host", hostname="bad_host!"),
           "'bad_host!'", "DNS labels"),
    module("instance", "instance-ssh-key-not-a-key", instance(f"{TOKEN}-key", ssh_keys=["hunter2"]), "'hunter2'",
           "OpenSSH public key"),
    module("instance", "instance-metadata-number", instance(f"{TOKEN}-meta", metadata={"role": 5}),
           "role is 5 (int)", "must be strings"),
    module("instance", "instance-negative-shutdown-timeout", instance(f"{TOKEN}-stop", shutdown_timeout=-1),
           "shutdown_timeout -1", ">= 0 seconds"),
    module("instance", "instance-image-checksum-format",
           instance(f"{TOKEN}-img", image="http://127.0.0.1:9/x.qcow2", image_checksum="sha256:xyz"),
           "sha256:xyz", "64 hex digits"),
    module("instance", "instance-batch-unknown-key", {"instances": [{"name": f"{TOKEN}-k", "cpu": 2}]},
           "unknown keys cpu", "allowed: autostart"),
    module("instance", "instance-batch-cpus-not-a-number", {"instances": [{"name": f"{TOKEN}-k", "cpus": "many"}]},
           "'many'", "int"),
    module("instance", "instance-batch-same-fixed-ip",
           {"image": "file:///nonexistent.qcow2", "instances": [
               {"name": f"{TOKEN}-a", "networks": [{"name": "seen-net", "ip": "10.240.0.9"}]},
               {"name": f"{TOKEN}-b", "networks": [{"name": "seen-net", "ip": "10.240.0.9"}]}]},
           "ip 10.240.0.9 on network seen-net is requested by both"),
    # cloud_info
    module("cloud_info", "cloud-info-endpoint-ftp", {"etcd_endpoints": ["ftp://127.0.0.1:2379"]},
           "'ftp://127.0.0.1:2379'", "http(s)://HOST[:PORT]"),
    module("cloud_info", "cloud-info-relative-prefix", {"etcd_prefix": "smallcloud/v1"}, "'smallcloud/v1'",
           "absolute key path"),
    module("cloud_info", "cloud-info-negative-etcd-timeout", {"etcd_timeout": -5}, "etcd_timeout -5",
           "seconds > 0"),
    module("cloud_info", "cloud-info-libvirt-uri", {"uri": "bogus:///x"}, "bogus:///x", "qemu:///system"),
    # cloud_plan: each entry is checked against its own module
    module("cloud_plan", "cloud-plan-network-vni-0", {"networks": [{"name": "n-plan", "cidr": "10.250.0.0/24",
                                                                    "vni": 0}]},
           "networks[0]", "VNI 0", "1..16777215"),
    module("cloud_plan", "cloud-plan-image-unknown-option", {"images": [{"url": "file:///x.qcow2", "sha": "1"}]},
           "images[0]", "sha", "Supported parameters include"),
    module("cloud_plan", "cloud-plan-floating-ip-without-network", {"floating_ips": [{"pool": POOL,
                                                                                      "instance": "seen-vm"}]},
           "network is required", "state=present"),
    module("cloud_plan", "cloud-plan-placement-without-host",
           {"placement": {"instances": [], "hosts": ["hv-seen"], "first_host": "hv-seen"}},
           "missing required arguments: host", "placement"),
    # host: the underlay is read in the sandbox namespace
    module("host", "host-name-shell", {"name": "hv;reboot"}, "'hv;reboot'", NAME_RULE),
    module("host", "host-unknown-underlay", {"name": f"{TOKEN}-hv", "underlay_interface": "eth-ghost"},
           "eth-ghost does not exist", "interfaces: lo"),
    module("host", "host-ratio-below-1", {"name": f"{TOKEN}-hv", "underlay_interface": "lo",
                                          "cpu_allocation_ratio": 0.5}, "cpu_allocation_ratio 0.5", ">= 1"),
    module("host", "host-status-choice", {"name": f"{TOKEN}-hv", "status": "retired"}, "retired",
           "active, draining, drained"),
    module("host", "host-drain-last-active", {"name": "hv-seen", "underlay_interface": "lo", "status": "draining"},
           "host hv-seen is the last active host", "activate another host first"),
    module("host", "host-remove-with-instances", {"name": "hv-seen", "state": "absent"},
           "host hv-seen still has instances: seen-vm", "remove or move them first"),
    # placement
    module("placement", "placement-pinned-to-unknown-host", {"instances": [{"name": "p1", "host": "hv-ghost"}]},
           "host hv-ghost is not a registered hypervisor", "registered: hv-seen (active)"),
    module("placement", "placement-0-cpus", {"instances": [{"name": "p1", "cpus": 0}]}, "cpus 0", "at least 1"),
    module("placement", "placement-anti-affinity-shell", {"instances": [{"name": "p1", "anti_affinity": "g;1"}]},
           "'g;1'", NAME_RULE),
    module("placement", "placement-ratio-not-a-number", {"instances": [{"name": "p1"}], "cpu_allocation_ratio": "lots"},
           "cpu_allocation_ratio 'lots'", ">= 1"),
    module("placement", "placement-unknown-key", {"instances": [{"name": "p1", "hosts": ["hv-seen"]}]},
           "unknown keys hosts", "allowed: affinity"),
    module("placement", "placement-beyond-every-host", {"instances": [{"name": "p1", "memory": 10 ** 8}]},
           "100000000 MiB memory", "hv-seen, has"),
    # instance_move
    module("instance_move", "move-step-choice", {"step": "teleport"}, "teleport",
           "list, reserve, export, import, commit, cleanup"),
    module("instance_move", "move-reserve-without-name", {"step": "reserve", "from_host": "hv-seen"},
           "step is reserve", "missing: name"),
    module("instance_move", "move-from-unknown-host", {"step": "list", "from_host": "hv-ghost"},
           "host hv-ghost is not a registered hypervisor", "registered: hv-seen"),
    module("instance_move", "move-unknown-instance", {"step": "reserve", "name": "ghost-vm", "from_host": "hv-seen"},
           "instance ghost-vm has no record", "recorded: seen-vm"),
    module("instance_move", "move-from-active-host", {"step": "reserve", "name": "seen-vm", "from_host": "hv-seen"},
           "host hv-seen is active", "drain it first"),
    module("instance_move", "move-negative-shutdown-timeout", {"step": "export", "name": "seen-vm",
                                                               "shutdown_timeout": -1},
           "shutdown_timeout -1", ">= 0 seconds"),
    # roles: argument specs and preflight, in check mode, preflight tags only
    role("etcd", "etcd-name-shell", {"etcd_name": "m1;reboot"}, "'m1;reboot' is not a member name", NAME_RULE),
    role("etcd", "etcd-client-port-70000", {"etcd_client_port": 70000}, "70000", "a port 1-65535"),
    role("etcd", "etcd-relative-data-dir", {"etcd_data_dir": "../data"}, "'../data'", "absolute path"),
    role("etcd", "etcd-install-method-choice", {"etcd_install_method": "docker"}, "docker", "package, tarball"),
    role("etcd", "etcd-tarball-checksum", {"etcd_install_method": "tarball", "etcd_tarball_sha256": "abc",
                                           "etcd_tarball_url": "https://example.com/etcd-v3.5.0-linux-amd64.tar.gz"},
         "etcd_tarball_sha256='abc'", "64 hex digit sha256"),
    role("hypervisor", "hypervisor-virt-type-choice", {"hypervisor_virt_type": "xen"}, "xen", "auto, kvm, qemu"),
    role("hypervisor", "hypervisor-mtu-100", {"hypervisor_network_mtu": 100}, "hypervisor_network_mtu=100",
         "576-9000"),
    role("hypervisor", "hypervisor-probe-timeout-0", {"hypervisor_kvm_probe_timeout": 0},
         "hypervisor_kvm_probe_timeout=0", "1-300"),
    role("hypervisor", "hypervisor-relative-sysctl-file", {"hypervisor_sysctl_file": "sysctl.conf"},
         "hypervisor_sysctl_file='sysctl.conf'", "absolute paths"),
    role("hypervisor", "hypervisor-ksm-run-choice", {"hypervisor_ksm_run": "fast"}, "fast",
         "stopped, running, unmerge"),
    role("cloud", "cloud-state-choice", {"cloud_state": "gone"}, "gone", "present, absent"),
    role("cloud", "cloud-wait-for-choice", {"cloud_wait_for": "ping"}, "ping", "none, ssh"),
    role("cloud", "cloud-wait-timeout-not-a-number", {"cloud_wait_timeout": "soon"}, "'soon'", "int"),
    role("cloud", "cloud-floating-ip-without-target",
         {"cloud_networks": [{"name": "fnet", "cidr": "10.250.0.0/24"}],
          "cloud_floating_ips": [{"network": "fnet", "pool": POOL}]},
         "floating IP {'network': 'fnet', 'pool': '198.51.100.0/24'} is incomplete", "`instance` or `fixed_ip`"),
    # the inventory plugin: one source file each
    inventory("inventory-misspelt-option", {"etcd_endpoint": ["http://127.0.0.1:2379"]},
              "unknown option(s) etcd_endpoint", "etcd_endpoints"),
    inventory("inventory-endpoint-ftp", {"etcd_endpoints": ["ftp://127.0.0.1:2379"]}, "'ftp://127.0.0.1:2379'",
              "http(s)://HOST[:PORT]"),
    inventory("inventory-endpoint-with-path", {"etcd_endpoints": ["http://127.0.0.1:2379/v3/kv"]},
              "'http://127.0.0.1:2379/v3/kv'", "http(s)://HOST[:PORT]"),
    inventory("inventory-relative-prefix", {"etcd_prefix": "smallcloud/v1"}, "'smallcloud/v1'",
              "absolute key path"),
    inventory("inventory-negative-etcd-timeout", {"etcd_timeout": -3}, "etcd_timeout -3", "seconds > 0"),
    inventory("inventory-namespace-prefix-shell", {"namespace_prefix": "x;reboot;", "gateway_proxy": True},
              "'x;reboot;'", "1-32 letters"),
]


def table():
    """The Case of every entry of CASES."""
    return [param.values[0] for param in CASES]


def strings_in(value):
    """Every string inside ``value`` (nested dicts and lists)."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(set(map(str, value)), *(strings_in(item) for item in value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(*(strings_in(item) for item in value))
    return set()


# Any name a case hands over, which a module that let it through could have given a domain or a link.
CASE_NAMES = frozenset().union(*(strings_in(item.args) for item in table()))


def ours(name):
    """Whether a machine-wide object of this name could come from this file's cases."""
    return name.startswith(TOKEN) or name in CASE_NAMES


# The sandbox ------------------------------------------------------------------------------------------


class Sandbox:
    """The test's own etcd prefix (with the seeded records), namespace, directories and copy of KSM's sysfs."""

    def __init__(self, etcd_server, work, inputs):
        self.endpoint = etcd_server.endpoints[0]
        self.inputs = inputs  # the plays and inventory sources, outside the snapshot
        self.etcd = {"etcd_endpoints": etcd_server.endpoints, "etcd_prefix": f"/smallcloud-test/{TOKEN}/v1"}
        self.work = work
        self.namespace_prefix = f"{TOKEN}-"
        self.namespaces = NetnsFactory(prefix=TOKEN)
        self.netns = self.namespaces.create(f"{TOKEN}-sandbox")
        for directory in ("cache", "instances", "state"):
            (work / directory).mkdir()
        self.sysfs_root = work / "sys"
        copy_ksm_settings(self.sysfs_root / "kernel" / "mm" / "ksm")
        self.seed()

    def path(self, name):
        return str(self.work / name)

    def seed(self):
        store = Store.from_params(self.etcd)
        for record in (SEEN_NET, QUIET_NET):
            store.put(records.network_key(record["name"]), record)
        store.put(records.host_key(SEEN_HOST["name"]), SEEN_HOST)
        store.put(records.instance_key(SEEN_VM["name"]), SEEN_VM)

    def module_options(self, target):
        """What every case of module ``target`` gets: the etcd prefix and the sandbox's paths and namespace."""
        host = {"host_netns": self.netns}
        paths = {
            "ksm": {"sysfs_root": str(self.sysfs_root)},
            "ksm_info": {},
            "image": {"cache_dir": self.path("cache")},
            "image_cache": {"cache_dir": self.path("cache"), "instance_dirs": [self.path("instances")]},
            "network": {**host, "namespace_prefix": self.namespace_prefix, "state_dir": self.path("state")},
            "floating_ip": {**host, "namespace_prefix": self.namespace_prefix},
            "instance": {"namespace_prefix": self.namespace_prefix, "instances_dir": self.path("instances"),
                         "cache_dir": self.path("cache"), "state_dir": self.path("state")},
            "cloud_info": {"namespace_prefix": self.namespace_prefix},
            "cloud_plan": {},
            "host": {**host, "instances_dir": self.path("instances")},
            "placement": {},
            "instance_move": {"cache_dir": self.path("cache"), "instances_dir": self.path("instances")},
            "security_group": {},
        }[target]
        etcd = {} if target in ("ksm", "ksm_info", "image", "image_cache") else self.etcd
        return {**etcd, **paths}

    def role_vars(self, target):
        """What every case of role ``target`` gets: scratch names, ports and paths, loopback etcd."""
        return {
            "etcd": {
                "etcd_address": "127.0.0.1", "etcd_service_manager": "sysv", "etcd_service_name": f"{TOKEN}-etcd",
                "etcd_client_port": free_port(), "etcd_peer_port": free_port(), "etcd_tls_client": False,
                "etcd_tls_peer": False, "etcd_tls_client_cert_auth": False, "etcd_cluster_token": TOKEN,
                **{f"etcd_{name}_dir": self.path(f"etcd/{name}")
                   for name in ("data", "config", "log", "tls", "tls_ca", "client")},
            },
            "hypervisor": {
                "hypervisor_service_manager": "sysv", "hypervisor_sysfs_root": str(self.sysfs_root),
                "hypervisor_sysctl_file": self.path("sysctl.conf"),
                "hypervisor_modprobe_file": self.path("modprobe.conf"),
                "hypervisor_ksm_persist_path": self.path("ksm.conf"),
            },
            "cloud": {
                "cloud_etcd_endpoints": self.etcd["etcd_endpoints"], "cloud_etcd_prefix": self.etcd["etcd_prefix"],
                "cloud_image_cache_dir": self.path("cache"), "cloud_instances_dir": self.path("instances"),
            },
        }[target]

    def remove(self):
        """Delete the prefix, the namespace, the directories, and whatever a case might have left."""
        delete_prefix(self.endpoint, self.etcd["etcd_prefix"] + "/")
        self.namespaces.cleanup()
        for name in netns_list():
            if name.startswith(self.namespace_prefix):
                delete_netns(name)
        for domain in domain_names():
            if ours(domain):
                virsh("destroy", domain)
                virsh("undefine", domain)
        shutil.rmtree(self.work, ignore_errors=True)


def copy_ksm_settings(directory):
    """The real KSM directory's files as plain files, so that the ksm cases see today's values and could not
    change the real ones."""
    directory.mkdir(parents=True)
    for path in KSM.iterdir():
        (directory / path.name).write_text(path.read_text())


# Snapshots -------------------------------------------------------------------------------------------


def etcd_items(endpoint, prefix):
    """Every key under ``prefix`` with its value."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    answer = etcd_request(endpoint, "kv/range", {"key": b64(prefix), "range_end": b64(end)})
    return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in answer.get("kvs", [])}


def command(*argv, netns=None):
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, check=True).stdout


def links(netns=None):
    """``(name, flags, mtu, address)`` of every link in ``netns`` (the host's namespace by default)."""
    found = json.loads(command("ip", "-j", "link", netns=netns) or "[]")
    return sorted((link["ifname"], tuple(link.get("flags", [])), link.get("mtu"), link.get("address"))
                  for link in found)


def domain_names():
    return virsh("list", "--all", "--name").stdout.split()


def files_under(top):
    """Every path under ``top``, relative, with the sha256 of each file's content."""
    found = {}
    for path in sorted(top.rglob("*")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "directory"
        found[str(path.relative_to(top))] = digest
    return found


def snapshot(box):
    """What a case could change, as comparable data."""
    return {
        "etcd": etcd_items(box.endpoint, box.etcd["etcd_prefix"] + "/"),
        "namespaces": sorted(name for name in netns_list() if name.startswith(box.namespace_prefix)),
        "sandbox links": links(box.netns),
        "sandbox nft tables": command("nft", "list", "tables", netns=box.netns).split("\n"),
        "host links": [link for link in links() if ours(link[0])],
        "domains": sorted(name for name in domain_names() if ours(name)),
        "files": files_under(box.work),
    }


# The batches ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """Whether a case was refused, and every message of its refusal as one text."""

    failed: bool
    message: str


def run_module_cases(cases, box):
    """The module ``cases`` as the tasks of one playbook, each named by its case; ``{case id: Outcome}``."""
    tasks = [{"name": item.id, f"smallcloud.kvm.{item.target}": {**box.module_options(item.target), **item.args},
              "ignore_errors": True} for item in cases]
    run = run_tasks(tasks)
    results = {result["_task"]: result for result in run.results()}
    missing = {"msg": f"no result (rc={run.rc}): {run.stderr[-2000:]}"}
    return {item.id: Outcome(bool(results.get(item.id, missing).get("failed")), results.get(item.id, missing)["msg"])
            for item in cases}


def role_case_task(item, box):
    """A block running the role with the case's variables; its rescue records the refusal as a fact."""
    return {
        "name": f"case {item.id}",
        "tags": ["always"],
        "block": [{"name": f"run {item.target}",
                   "ansible.builtin.include_role": {"name": f"smallcloud.kvm.{item.target}"},
                   "vars": {**box.role_vars(item.target), **item.args}}],
        "rescue": [{"name": f"refused {item.id}", "ansible.builtin.set_fact": {
            "bad_input_refusal": {"task": "{{ ansible_failed_task.name }}", "result": "{{ ansible_failed_result }}"}}}],
    }


def refusal_messages(result):
    """The messages of a failed task result, one per failed loop item."""
    items = [item for item in result.get("results", []) if item.get("failed")]
    return [str(item.get("msg", "")) for item in items or [result]]


def run_role_cases(cases, box):
    """Every role case in one play on localhost: check mode, the roles' preflight only; ``{case id: Outcome}``."""
    play = box.inputs / "roles.yml"
    play.write_text(json.dumps([{"name": "bad input to the roles", "hosts": "localhost", "gather_facts": False,
                                 "tasks": [role_case_task(item, box) for item in cases]}]))
    run = run_playbook(play, check=True, args=["--tags", "etcd_preflight,hypervisor_preflight,cloud_preflight"])
    facts = {result["_task"]: result.get("ansible_facts", {}).get("bad_input_refusal") for result in run.results()}
    outcomes = {}
    for item in cases:
        refusal = facts.get(f"refused {item.id}")
        if refusal is None:
            outcomes[item.id] = Outcome(False, f"not refused (rc={run.rc}): {run.stderr[-2000:]}")
        else:
            message = " | ".join(refusal_messages(refusal["result"]))
            outcomes[item.id] = Outcome(True, f"{refusal['task']}: {message}")
    return outcomes


def run_inventory_cases(cases, box):
    """Every inventory case as one source of one ``ansible-inventory`` run; ``{case id: Outcome}``.

    Ansible warns once per source it cannot parse, the plugin's message first, then "Unable to parse SOURCE".
    """
    sources = {}
    for item in cases:
        path = box.inputs / f"{item.id}.smallcloud.yml"
        path.write_text(yaml.safe_dump({"plugin": "smallcloud.kvm.cloud", **box.etcd, **item.args}))
        sources[str(path)] = item.id
    argv = [str(VENV_BIN / "ansible-inventory"), "--list"] + [arg for path in sources for arg in ("-i", path)]
    run = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120,
                         env=ansible_env({"ANSIBLE_INVENTORY_ENABLED": "smallcloud.kvm.cloud"}))
    parts = re.split(r"\[WARNING\]: Unable to parse (\S+) as an inventory source\n", run.stderr)
    refused = dict(zip(parts[1::2], parts[0::2]))
    return {item_id: Outcome(path in refused, refused.get(path, f"parsed: {run.stdout[-1000:]}"))
            for path, item_id in sources.items()}


def batches():
    """``(runner, cases)`` of each batch: the module cases in two playbooks (they are most of the time), the
    role cases in one, the inventory cases in one ansible-inventory run."""
    of_kind = {kind: [item for item in table() if item.kind == kind] for kind in ("module", "role", "inventory")}
    return [(run_module_cases, of_kind["module"][0::2]), (run_module_cases, of_kind["module"][1::2]),
            (run_role_cases, of_kind["role"]), (run_inventory_cases, of_kind["inventory"])]


@dataclass
class Batch:
    outcomes: dict
    before: dict
    after: dict


@pytest.fixture(scope="module")
def sandbox(etcd_server, libvirtd, tmp_path_factory):
    inputs = tmp_path_factory.mktemp(f"{TOKEN}-inputs")
    box = Sandbox(etcd_server, tmp_path_factory.mktemp(TOKEN), inputs)
    yield box
    box.remove()
    shutil.rmtree(inputs, ignore_errors=True)


@pytest.fixture(scope="module")
def batch(sandbox):
    """Every case run, between two snapshots. The batches run at once: each is one ansible process that
    mostly waits for its children, and the machine has two cores."""
    before = snapshot(sandbox)
    with concurrent.futures.ThreadPoolExecutor(len(batches())) as pool:
        runs = [pool.submit(runner, cases, sandbox) for runner, cases in batches()]
        outcomes = {case_id: outcome for run in runs for case_id, outcome in run.result().items()}
    return Batch(outcomes, before, snapshot(sandbox))


# The tests ----------------------------------------------------------------------------------------------


def test_the_table_covers_every_module_role_and_the_inventory_plugin():
    covered = {(item.kind, item.target) for item in table()}
    assert {("module", name) for name in MODULES} | {("role", name) for name in ROLES} | {("inventory", "cloud")} \
        == covered
    assert {path.stem for path in (ROOT / "plugins" / "modules").glob("*.py")} >= set(MODULES)
    assert {path.name for path in (ROOT / "roles").iterdir() if path.is_dir()} == set(ROLES)
    assert len(CASES) >= 60 and len({item.id for item in table()}) == len(CASES)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_naming_the_value_and_what_is_allowed(batch, case):
    outcome = batch.outcomes[case.id]
    assert outcome.failed, f"{case.id} was not refused: {outcome.message}"
    missing = [needle for needle in case.needles if needle not in outcome.message]
    assert not missing, f"{case.id}: the message lacks {missing}: {outcome.message}"


@pytest.mark.parametrize("part", ["etcd", "namespaces", "sandbox links", "sandbox nft tables", "host links",
                                  "domains", "files"])
def test_the_refused_cases_changed_nothing(batch, part):
    assert batch.after[part] == batch.before[part]


class LeftBehind(AssertionError):
    """A refused task that changed something all the same."""


def test_a_network_refused_for_its_state_dir_leaves_no_record(batch, sandbox, ansible):
    # Runs after the batch (it asks for it), so that its leftover cannot count against the table.
    private = sandbox.work / "private"
    private.mkdir(mode=0o700)  # dnsmasq's user cannot enter it
    before = snapshot(sandbox)
    options = {"name": f"{TOKEN}-state", "cidr": "10.250.15.0/24", "vni": 0xBAD0F, "underlay_interface": "lo",
               "state_dir": str(private / "state")}
    result = ansible.run_module("network", {**sandbox.module_options("network"), **options})

    assert result.get("failed") and "state_dir %s" % (private / "state") in result["msg"], result
    assert "choose a state_dir whose parents other users can enter" in result["msg"], result
    after = snapshot(sandbox)
    assert {part: after[part] for part in after if part != "etcd"} == {part: before[part] for part in before
                                                                       if part != "etcd"}
    if after["etcd"] != before["etcd"]:
        raise LeftBehind(sorted(set(after["etcd"].items()) - set(before["etcd"].items())))
