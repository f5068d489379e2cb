"""Network converge cost per network at 100 and 200 networks, the no-op re-converge, and a shell baseline.

Starts its own etcd (tests/harness EtcdCluster, temporary data dir) and a scratch "hypervisor" network
namespace with an underlay veth; everything is removed afterwards. In one run it measures:
  baseline   plain iproute2 per network (ip link add vxlan + bridge, master, up, bridge fdb append x2):
             what a hand-written script does, with no state, no checks, no etcd
  create@N   networks.run in-process for N new networks (etcd record, VNI allocation, lock, observe,
             plan, apply), for N = 100 and N = 200 (fresh each time)
  noop@200   the same converge again over the 200 networks, nothing to change
and prints ms per network, the ratio create@200 / create@100 per network (1.0: cost grows linearly),
create / baseline and noop / create.

    .venv/bin/python bench/networks.py               # 100 and 200 networks, VXLAN + bridge + 2 peers (~2-4 min)
    .venv/bin/python bench/networks.py --gateway     # also namespace + dnsmasq per network (slower)
    .venv/bin/python bench/networks.py --sizes 10 20 # quick
    .venv/bin/python bench/networks.py --json
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / ".cache" / "collections"))

from harness.etcd import EtcdCluster  # noqa: E402
from harness.module_stub import ModuleStub  # noqa: E402
from harness.netns import delete_netns  # noqa: E402

from ansible_collections.smallcloud.kvm.plugins.module_utils.network import networks  # noqa: E402

PEERS = ["10.98.0.2", "10.98.0.3"]


# Every option of the network module, defaults included, as AnsibleModule would fill them.
NETWORK_SPEC = networks.MODULE_SPEC


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


def make_hypervisor(tag):
    """A namespace with underlay ul0 (10.98.0.1/24)."""
    ns = "scb-hv-%s" % tag
    ip("netns", "add", ns)
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "link", "add", "ul0", "type", "veth", "peer", "name", "ul0p")
    ip("-n", ns, "addr", "add", "10.98.0.1/24", "dev", "ul0")
    ip("-n", ns, "link", "set", "ul0", "up")
    ip("-n", ns, "link", "set", "ul0p", "up")
    return ns


def baseline(ns, count):
    """Seconds for ``count`` networks set up by plain iproute2 commands, then removed (not timed)."""
    start = time.perf_counter()
    for index in range(count):
        vni = 0x100000 + index
        vx, br = "bx-%x" % vni, "bb-%x" % vni
        ip("-n", ns, "link", "add", br, "type", "bridge")
        ip("-n", ns, "link", "add", vx, "type", "vxlan", "id", str(vni), "local", "10.98.0.1", "dev", "ul0",
           "dstport", "4789")
        ip("-n", ns, "link", "set", vx, "master", br, "mtu", "1450", "up")
        ip("-n", ns, "link", "set", br, "mtu", "1450", "up")
        for peer in PEERS:
            subprocess.run(["bridge", "-n", ns, "fdb", "append", "00:00:00:00:00:00", "dev", vx, "dst", peer],
                           check=True, capture_output=True)
    elapsed = time.perf_counter() - start
    for index in range(count):
        ip("-n", ns, "link", "del", "bx-%x" % (0x100000 + index))
        ip("-n", ns, "link", "del", "bb-%x" % (0x100000 + index))
    return elapsed


def converge_all(common, count, state="present"):
    """Seconds to converge ``count`` networks; the number that reported a change."""
    changed = 0
    start = time.perf_counter()
    for index in range(count):
        result = networks.run(ModuleStub(NETWORK_SPEC, **dict(
            common, name="b%d" % index, state=state, cidr="10.%d.%d.0/24" % (100 + index // 256, index % 256))))
        changed += bool(result["changed"])
    return time.perf_counter() - start, changed


def run(sizes, gateway):
    """Measure everything; a dict of results."""
    tag = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix="scb-networks-"))
    cluster = EtcdCluster(workdir / "etcd", size=1)
    ns = make_hypervisor(tag)
    out = {"gateway": gateway, "sizes": {}}
    try:
        common = dict(etcd_endpoints=cluster.endpoints, etcd_prefix="/smallcloud-bench/%s/v1" % tag, host_netns=ns,
                      underlay_interface="ul0", mesh_peers=PEERS, gateway=gateway, namespace_prefix="scb%s-" % tag,
                      state_dir=str(workdir / "state"))
        out["baseline_ms"] = 1000 * baseline(ns, sizes[0]) / sizes[0]
        for count in sizes:
            created, changed = converge_all(common, count)
            assert changed == count
            entry = {"create_ms": 1000 * created / count}
            if count == sizes[-1]:
                noop, changed = converge_all(common, count)
                assert changed == 0, "%d networks changed on a no-op re-converge" % changed
                entry["noop_ms"] = 1000 * noop / count
            converge_all(common, count, state="absent")
            out["sizes"][count] = entry
    finally:
        delete_netns(ns)
        cluster.stop()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    small, large = out["sizes"][sizes[0]], out["sizes"][sizes[-1]]
    out["growth_ratio"] = large["create_ms"] / small["create_ms"]
    out["create_vs_baseline"] = small["create_ms"] / out["baseline_ms"]
    out["noop_vs_create"] = large["noop_ms"] / large["create_ms"]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[100, 200])
    parser.add_argument("--gateway", action="store_true", help="also namespace + dnsmasq per network")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.sizes, args.gateway)
    if args.json:
        print(json.dumps(result))
        return
    print("baseline (plain ip commands): %.1f ms/network" % result["baseline_ms"])
    for count, entry in sorted(result["sizes"].items()):
        line = "create %d networks: %.1f ms/network" % (count, entry["create_ms"])
        if "noop_ms" in entry:
            line += "; no-op re-converge: %.1f ms/network" % entry["noop_ms"]
        print(line)
    growth = (args.sizes[1], args.sizes[0], result["growth_ratio"])
    print("per-network cost at %d / at %d: %.2f (1.0 = linear)" % growth)
    print("create / baseline: %.2f; no-op / create: %.2f" % (result["create_vs_baseline"], result["noop_vs_create"]))


if __name__ == "__main__":
    main()
