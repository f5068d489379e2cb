# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What runs inside a network's gateway namespace: the namespace itself, sysctls, nftables, dnsmasq.

All commands are argv lists through module_utils.commands; ``netns=None`` means the caller's namespace.
"""

import json
import os
import signal
import time

from ansible_collections.smallcloud.kvm.plugins.module_utils.core import commands
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.files import read_text
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError, InvalidInput

NETNS_DIR = "/run/netns"  # where `ip netns` keeps named namespaces
NFT_TABLE = "smallcloud"
FLOATING_DNAT = "floating_dnat"
FLOATING_SNAT = "floating_snat"


def in_netns(netns, argv):
    """``argv`` run inside ``netns`` (unchanged for the caller's namespace)."""
    return (["ip", "netns", "exec", netns] + list(argv)) if netns else list(argv)


# namespaces ------------------------------------------------------------------------------------


def netns_exists(name):
    """True when the named namespace exists: its file is a mount of the namespace, not the bare file that an
    ``ip netns add`` killed half way leaves (which cannot be opened as a namespace)."""
    return os.path.ismount(os.path.join(NETNS_DIR, name))


def netns_add(name):
    """Create namespace ``name`` with loopback up (over the bare file of a killed ``ip netns add``)."""
    path = os.path.join(NETNS_DIR, name)
    if os.path.lexists(path) and not os.path.ismount(path):
        os.unlink(path)
    commands.run(["ip", "netns", "add", name])
    commands.run(["ip", "-n", name, "link", "set", "lo", "up"])


def netns_delete(name):
    """Delete namespace ``name`` (its links and nftables go with it) if it exists."""
    if netns_exists(name):
        commands.run(["ip", "netns", "delete", name])


# sysctls ---------------------------------------------------------------------------------------


def sysctl_get(netns, key):
    """The value of sysctl ``key`` in ``netns`` as a string."""
    return commands.run(in_netns(netns, ["sysctl", "-n", key]))[1].strip()


def sysctl_set(netns, key, value):
    """Set sysctl ``key`` in ``netns``."""
    commands.run(in_netns(netns, ["sysctl", "-q", "-w", "%s=%s" % (key, value)]))


# nftables --------------------------------------------------------------------------------------


def nft_base_script(lan, wan, cidr, egress_address):
    """The nft script that (re)writes the network's own chains; floating chains are kept, not flushed.

    Every rule carries a comment naming what it does; observation compares those comments.
    """
    rules = nft_base_rules(lan, wan, cidr, egress_address)
    lines = [
        "add table ip %s" % NFT_TABLE,
        "add chain ip %s %s" % (NFT_TABLE, FLOATING_DNAT),
        "add chain ip %s %s" % (NFT_TABLE, FLOATING_SNAT),
        "add chain ip %s prerouting { type nat hook prerouting priority dstnat; policy accept; }" % NFT_TABLE,
        "add chain ip %s postrouting { type nat hook postrouting priority srcnat; policy accept; }" % NFT_TABLE,
        "add chain ip %s forward { type filter hook forward priority filter; policy accept; }" % NFT_TABLE,
        "flush chain ip %s prerouting" % NFT_TABLE,
        "flush chain ip %s postrouting" % NFT_TABLE,
        "flush chain ip %s forward" % NFT_TABLE,
    ]
    for chain, body, comment in rules:
        lines.append('add rule ip %s %s %s comment "%s"' % (NFT_TABLE, chain, body, comment))
    return "\n".join(lines) + "\n"


def nft_base_rules(lan, wan, cidr, egress_address):
    """(chain, rule, comment) of the network's own rules, in order."""
    return [
        ("prerouting", "jump %s" % FLOATING_DNAT, "floating dnat"),
        ("postrouting", "jump %s" % FLOATING_SNAT, "floating snat"),
        ("postrouting", 'oifname "%s" ip saddr %s snat to %s' % (wan, cidr, egress_address),
         "egress %s via %s" % (cidr, egress_address)),
        ("forward", 'iifname "%s" oifname "%s" ct state established,related accept' % (wan, lan), "replies in"),
        ("forward", 'iifname "%s" oifname "%s" ct status dnat accept' % (wan, lan), "floating in"),
        ("forward", 'iifname "%s" drop' % wan, "isolate %s" % cidr),
    ]


def nft_table(netns):
    """``{chain: [rule comment, ...]}`` of table ip smallcloud in ``netns``, or None when there is none."""
    rc, out, _err = commands.run(in_netns(netns, ["nft", "-j", "list", "table", "ip", NFT_TABLE]), check=False)
    if rc != 0:
        return None
    chains = {}
    for item in json.loads(out).get("nftables", []):
        if "chain" in item:
            chains.setdefault(item["chain"]["name"], [])
        elif "rule" in item:
            rule = item["rule"]
            chains.setdefault(rule["chain"], []).append(_rule_comment(rule))
    return chains


def _rule_comment(rule):
    """A rule's comment, or a short rendering of its handle for rules someone else added."""
    return rule.get("comment") or "unmanaged rule %s" % rule.get("handle")


def nft_rule_handles(netns, chain):
    """``{comment: [handle, ...]}`` of the rules in ``chain``."""
    rc, out, _err = commands.run(
        in_netns(netns, ["nft", "-j", "list", "chain", "ip", NFT_TABLE, chain]), check=False
    )
    if rc != 0:
        return {}
    handles = {}
    for item in json.loads(out).get("nftables", []):
        if "rule" in item:
            handles.setdefault(_rule_comment(item["rule"]), []).append(item["rule"]["handle"])
    return handles


def nft_apply(netns, script):
    """Run an nft script atomically in ``netns`` (all of it or nothing)."""
    commands.run(in_netns(netns, ["nft", "-f", "-"]), input_text=script)


def nft_delete_table(netns):
    """Remove table ip smallcloud from ``netns`` if present."""
    if nft_table(netns) is not None:
        nft_apply(netns, "delete table ip %s\n" % NFT_TABLE)


# dnsmasq ---------------------------------------------------------------------------------------

# Debian's dnsmasq package makes this user; nogroup owns nothing.
DNSMASQ_USER, DNSMASQ_GROUP = "dnsmasq", "nogroup"


def dnsmasq_conf(state_dir, interface, network, *, gateway_ip, mtu, dns_servers, dns=False, lease_time="12h"):
    """dnsmasq.conf text: static DHCP leases from the hosts file, option 26 = ``mtu``, and DNS.

    With ``dns`` and no ``dns_servers`` the gateway answers DNS on ``interface``: the network's instance
    names (the names file, re-read on SIGHUP like the leases) and everything else forwarded to the
    resolvers of the namespace's resolv.conf; DHCP hands out the gateway. With ``dns_servers`` DHCP hands
    out those instead and dnsmasq serves DHCP only.
    """
    gateway_dns = dns and not dns_servers
    lines = [
        "# written by smallcloud.kvm.network; changes are overwritten",
        "interface=%s" % interface,
        "bind-interfaces",
        # Its own view only: no names from the gateway host's /etc/hosts.
        "no-hosts",
        "dhcp-authoritative",
        # Unprivileged once it has bound its sockets and opened its lease and pid files: what a guest can
        # make it do, it does without root. It re-reads the hosts and names files on SIGHUP as this user,
        # so they are world-readable and state_dir must be reachable (check_reachable_by_dnsmasq).
        "user=%s" % DNSMASQ_USER,
        "group=%s" % DNSMASQ_GROUP,
        "pid-file=%s" % os.path.join(state_dir, "dnsmasq.pid"),
        "dhcp-leasefile=%s" % os.path.join(state_dir, "leases"),
        "dhcp-hostsfile=%s" % os.path.join(state_dir, "hosts"),
        "dhcp-range=%s,static,%s,%s" % (network.network_address, network.netmask, lease_time),
        "dhcp-option=option:router,%s" % gateway_ip,
        # Forced: many clients (busybox udhcpc among them) do not ask for option 26.
        "dhcp-option-force=option:mtu,%d" % mtu,
    ]
    if gateway_dns:
        lines += [
            "addn-hosts=%s" % os.path.join(state_dir, "names"),
            # Bare names stay inside the network; private reverse lookups are not forwarded.
            "domain-needed",
            "bogus-priv",
            "dhcp-option=option:dns-server,%s" % gateway_ip,
        ]
    else:
        lines += ["port=0", "no-resolv"]
        if dns_servers:
            lines.append("dhcp-option=option:dns-server,%s" % ",".join(dns_servers))
    return "\n".join(lines) + "\n"


def check_reachable_by_dnsmasq(state_dir):
    """InvalidInput naming the first existing directory above ``state_dir`` that other users cannot enter:
    dnsmasq, unprivileged, could not re-read its hosts files there."""
    path = os.path.dirname(os.path.abspath(state_dir))
    while True:
        if os.path.isdir(path) and not os.stat(path).st_mode & 0o001:
            raise InvalidInput("state_dir %s is below %s (mode %o), which dnsmasq's user %s cannot enter; choose a "
                               "state_dir whose parents other users can enter (e.g. the default /run/smallcloud/"
                               "networks)" % (state_dir, path, os.stat(path).st_mode & 0o7777, DNSMASQ_USER),
                               state_dir=state_dir)
        if path == os.path.dirname(path):
            return
        path = os.path.dirname(path)


def dnsmasq_hosts(leases):
    """dhcp-hostsfile text from ``[(mac, ip, hostname or None)]``, sorted by address for stable output."""
    lines = []
    for mac, ip, hostname in _by_address(leases):
        lines.append(",".join([mac.lower(), ip] + ([hostname] if hostname else [])))
    return "".join(line + "\n" for line in lines)


def dnsmasq_names(leases):
    """addn-hosts text (``ip name``) for the leases that have a hostname, sorted by address."""
    return "".join("%s %s\n" % (ip, hostname) for _mac, ip, hostname in _by_address(leases) if hostname)


def _by_address(leases):
    return sorted(leases, key=lambda lease: tuple(int(part) for part in lease[1].split(".")))


def dnsmasq_pid(state_dir):
    """The pid of the dnsmasq serving ``state_dir`` when it is alive, else None."""
    text = read_text(os.path.join(state_dir, "dnsmasq.pid"))
    if not text or not text.strip().isdigit():
        return None
    pid = int(text.strip())
    cmdline = read_text("/proc/%d/cmdline" % pid) or ""
    # A recycled pid belongs to someone else: ours names our conf file.
    if os.path.join(state_dir, "dnsmasq.conf") not in cmdline.replace("\0", " "):
        return None
    return pid


def dnsmasq_start(netns, state_dir):
    """Start dnsmasq in ``netns`` with ``state_dir``/dnsmasq.conf; it daemonises and writes its pid file."""
    conf = os.path.join(state_dir, "dnsmasq.conf")
    commands.run(in_netns(netns, ["dnsmasq", "--conf-file=%s" % conf]))
    if dnsmasq_pid(state_dir) is None:
        raise HostError("dnsmasq did not start in namespace %s (conf %s)" % (netns, conf), conf=conf)


def dnsmasq_reload(state_dir):
    """SIGHUP: dnsmasq re-reads its dhcp-hostsfile and addn-hosts."""
    pid = dnsmasq_pid(state_dir)
    if pid is not None:
        os.kill(pid, signal.SIGHUP)


def dnsmasq_stop(state_dir, timeout=10):
    """Stop the dnsmasq of ``state_dir`` and wait for it to exit."""
    pid = dnsmasq_pid(state_dir)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def _alive(pid):
    """True while ``pid`` runs (a zombie counts as gone)."""
    stat = read_text("/proc/%d/stat" % pid)
    return bool(stat) and stat.rsplit(")", 1)[-1].split()[0] != "Z"


def remove_state_dir(state_dir):
    """Remove the files this module writes in ``state_dir`` and the directory itself."""
    if not os.path.isdir(state_dir):
        return
    for name in os.listdir(state_dir):
        os.unlink(os.path.join(state_dir, name))
    os.rmdir(state_dir)
