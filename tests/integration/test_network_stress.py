"""Leaks and races: the runners called in-process (Ansible's ~2 s per task would make these take an hour).

The modules' main() only builds the AnsibleModule and calls these same converge functions.
"""

import json
import os
import subprocess
import sys

import pytest
from harness.module_stub import ModuleStub
from harness.netns import netns_list
from harness.paths import ROOT
from test_network import POOL, in_ns, lab_context, links

from ansible_collections.smallcloud.kvm.plugins.module_utils.network import floating_ips, networks
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records

pytestmark = pytest.mark.integration
lab_fixture = pytest.fixture(lab_context, name="lab")


def run_network(**params):
    return networks.run(ModuleStub(networks.MODULE_SPEC, **params))


def run_floating(**params):
    return floating_ips.run(ModuleStub(floating_ips.MODULE_SPEC, **params))


def snapshot(hv, state_dir, tag):
    """Everything a cycle could leak on the host side."""
    # Our dnsmasq processes name our state dir on their command line (zombies have none).
    pgrep = ["pgrep", "-f", "dnsmasq.*%s" % state_dir]
    dnsmasq = subprocess.run(pgrep, capture_output=True, text=True, check=False).stdout.split()
    return {
        "links": links(hv),
        "addresses": in_ns(hv, "ip", "-4", "-o", "addr").stdout,
        "routes": in_ns(hv, "ip", "route").stdout,
        "nft": in_ns(hv, "nft", "list", "ruleset").stdout,
        "namespaces": sorted(name for name in netns_list() if tag in name),  # others run tests too
        "dnsmasq": len(dnsmasq),
    }


CYCLES = 100


def test_cycles_of_network_and_floating_ip_leave_nothing(etcd, lab):
    hv = lab.hypervisor()
    lab.outside(hv)
    common = dict(etcd.module_args, host_netns=hv, namespace_prefix=lab.prefix)
    net = dict(common, name="cyc", cidr="10.40.0.0/24", underlay_interface="ul0", nat=True, egress_pool=POOL,
               state_dir=lab.state_dir)
    before = snapshot(hv, lab.state_dir, lab.tag)
    for cycle in range(CYCLES):
        created = run_network(**net)
        assert created["changed"], cycle
        fip = run_floating(**dict(common, pool=POOL, network="cyc", fixed_ip="10.40.0.%d" % (2 + cycle % 200)))
        assert fip["address"], cycle
        assert run_floating(**dict(common, address=fip["address"], state="absent"))["changed"], cycle
        assert run_network(**dict(net, state="absent"))["changed"], cycle
    assert snapshot(hv, lab.state_dir, lab.tag) == before
    assert etcd.key_count() == 0


WORKER = """
import json, os, sys
sys.path[:0] = sys.argv[1].split(os.pathsep)
from harness.module_stub import ModuleStub
from ansible_collections.smallcloud.kvm.plugins.module_utils.network import networks
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records

common, worker, state = json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
out = []
for index in range(8):
    args = dict(common, name="p%d-%d" % (worker, index), cidr="10.%d.%d.0/24" % (100 + worker, index), state=state)
    result = networks.run(ModuleStub(networks.MODULE_SPEC, **args))
    out.append([result.get("vni"), result.get("vxlan"), result.get("bridge")])
print(json.dumps(out))
"""


def run_workers(common, state):
    """Eight separate processes (eight 'controllers') converging eight networks each, all at once."""
    # The worker imports the collection and the test harness.
    search_path = os.pathsep.join([str(ROOT / ".cache" / "collections"), str(ROOT / "tests")])
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, search_path, json.dumps(common), str(worker), state],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for worker in range(8)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    failed = ["worker %d (%s) exited %d:\n%s" % (worker, state, proc.returncode, err[-3000:])
              for worker, (proc, (_out, err)) in enumerate(zip(procs, outputs)) if proc.returncode != 0]
    if failed:  # pytest.fail: an assert's message would be cut to a few lines, and this one is the diagnosis
        pytest.fail("\n".join(failed), pytrace=False)
    return [item for out, _err in outputs for item in json.loads(out)]


def test_eight_parallel_runs_get_distinct_vnis_and_names(etcd, lab):
    hv = lab.hypervisor()
    common = dict(etcd.module_args, host_netns=hv, namespace_prefix=lab.prefix, underlay_interface="ul0",
                  gateway=False, state_dir=lab.state_dir)
    results = run_workers(common, "present")
    assert len(results) == 64
    assert len({vni for vni, _vx, _br in results}) == 64
    names = [name for _vni, vx, br in results for name in (vx, br)]
    assert len(set(names)) == 128 and set(names) <= set(links(hv))
    assert len(records.networks(networks.Store.from_params(common))) == 64
    run_workers(common, "absent")
    assert not [name for name in links(hv) if name.startswith(("vx-", "br-"))]
    assert etcd.key_count() == 0
