"""`molecule test` (the default scenario): deploy + converge through the collection's playbooks, an
idempotent second converge, verify (DHCP addresses against etcd, HTTP through the floating IP), and a
destroy that leaves this machine exactly as it was."""

from pathlib import Path

import pytest
from harness.host import cloud_traces, machine_state
from harness.molecule import molecule_test

pytestmark = pytest.mark.e2e

SCRATCH = "/var/tmp/smallcloud-molecule-cloud"
ETCD_SERVICE = "smallcloud-molecule-cloud-etcd"


def scenario_traces():
    """What the scenario could leave behind, and what it changes on the machine."""
    return {
        **cloud_traces("mol-", processes=[(ETCD_SERVICE,), ("http.server", "8098"), ("dnsmasq", "smallcloud")],
                       files=[SCRATCH, f"/etc/init.d/{ETCD_SERVICE}", f"/run/{ETCD_SERVICE}.pid"],
                       link_prefixes=("scmol",), namespace_prefixes=("smallcloud-molecule",)),
        "machine": machine_state(),
    }


@pytest.mark.timeout(1500)
def test_default_scenario_converges_idempotently_verifies_and_leaves_nothing(libvirtd, ksm_lock, tmp_path):
    before = scenario_traces()
    run = molecule_test("default", tmp_path / "molecule", timeout=1400)
    assert run.rc == 0, run.output[-8000:]
    for step in ("create", "converge", "idempotence", "verify", "destroy"):
        assert run.passed(step), f"molecule did not report {step} successful:\n{run.output[-8000:]}"
    # verify.yml ran its checks on both guests, not an empty list.
    assert "ok: [cloud-molecule] => (item=mol-web2)" in run.output
    assert scenario_traces() == before


@pytest.mark.timeout(1500)
def test_multihost_scenario_runs_the_cloud_on_a_lab_idempotently_and_leaves_nothing(tmp_path):
    from test_lab import machine_traces  # noqa: PLC0415 - the lab's own trace list

    before = {"lab": machine_traces(), "image": Path("/var/lib/smallcloud-lab-image").exists()}
    run = molecule_test("multihost", tmp_path / "molecule", timeout=1400)
    assert run.rc == 0, run.output[-8000:]
    for step in ("create", "converge", "idempotence", "verify", "destroy"):
        assert run.passed(step), f"molecule did not report {step} successful:\n{run.output[-8000:]}"
    assert "ok: [h3] => (item=lab-web3)" in run.output and "ok: [h2] => (item=lab-web2)" in run.output
    assert {"lab": machine_traces(), "image": Path("/var/lib/smallcloud-lab-image").exists()} == before
