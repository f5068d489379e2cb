"""What deploying a hypervisor and running a cloud change on this machine, to compare before and after."""

import subprocess
from pathlib import Path

from harness.ksm import KSM
from harness.netns import netns_list

# Links the network module creates (vx-/br-/vg-/ve- + VNI in hex).
CLOUD_LINK_PREFIXES = ("vx-", "br-", "ve-", "vg-")


def virsh(*args):
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=False)


def machine_state():
    """What the hypervisor role changes: KSM settings, IP forwarding, libvirt's default network, /dev/kvm."""
    kvm = Path("/dev/kvm")
    return {
        "ksm": {p.name: p.read_text().strip() for p in sorted(KSM.iterdir()) if p.stat().st_mode & 0o200},
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip(),
        "default_network": virsh("net-info", "default").returncode == 0,
        "dev_kvm": (kvm.stat().st_gid, oct(kvm.stat().st_mode)) if kvm.exists() else None,
    }


def cloud_traces(domain_prefix, processes, files, link_prefixes=(), namespace_prefixes=()):
    """What a cloud run could leave here: gateway namespaces (scnet-*) and ``namespace_prefixes``, cloud
    links and ``link_prefixes``, domains named ``domain_prefix``*, processes whose command line holds all
    the words of one of ``processes`` (tuples), and which of ``files`` exist."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    commands = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    names = [line.split(": ")[1].split("@")[0] for line in links.splitlines()]
    return {
        "namespaces": sorted(n for n in netns_list() if n.startswith(("scnet-", *namespace_prefixes))),
        "links": sorted(n for n in names if n.startswith((*CLOUD_LINK_PREFIXES, *link_prefixes))),
        "domains": sorted(d for d in virsh("list", "--all", "--name").stdout.split() if d.startswith(domain_prefix)),
        "processes": sorted(line for line in commands.splitlines()
                            if any(all(word in line for word in words) for words in processes)),
        "files": sorted(str(path) for path in map(Path, files) if path.exists()),
    }
