"""Domain XML: build, read libvirt's normalised XML back, compare field by field (test:///default)."""

import xml.etree.ElementTree as ET

import pytest

from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import domain

pytestmark = pytest.mark.unit

SPEC = {
    "name": "sct-unit",
    "uuid": "6f0c9a54-3f5e-4b8e-9a55-0d6c1a2b3c4d",
    "virt_type": "qemu",
    "cpus": 2,
    "memory": 256,
    "disks": [
        {"device": "disk", "target": "vda", "bus": "virtio", "path": "/srv/i/root.qcow2", "format": "qcow2"},
        {"device": "disk", "target": "vdb", "bus": "virtio", "path": "/srv/i/ephemeral-0.qcow2", "format": "qcow2"},
        {"device": "cdrom", "target": "sda", "bus": "scsi", "path": "/srv/i/seed.iso", "format": "raw"},
    ],
    "nics": [{"mac": "02:73:63:00:00:01", "bridge": "br-a1", "model": "virtio"}],
    "console_log": "/srv/i/console.log",
}


def test_build_then_observe_round_trips():
    observed = domain.observe(domain.build_xml(SPEC))
    assert observed["managed"] is True
    assert domain.differences(observed, SPEC) == {}
    assert observed["uuid"] == SPEC["uuid"]


def test_kvm_gets_host_cpu_and_qemu_does_not():
    assert "host-passthrough" in domain.build_xml(dict(SPEC, virt_type="kvm"))
    assert "host-passthrough" not in domain.build_xml(SPEC)


@pytest.mark.parametrize("field, value", [
    ("cpus", 4),
    ("memory", 512),
    ("virt_type", "kvm"),
    ("console_log", "/elsewhere/console.log"),
    ("nics", [{"mac": "02:73:63:00:00:02", "bridge": "br-a1", "model": "virtio"}]),
    ("nics", [{"mac": "02:73:63:00:00:01", "bridge": "br-b2", "model": "virtio"}]),
    ("nics", []),
    ("disks", SPEC["disks"][:1] + SPEC["disks"][2:]),
])
def test_each_changed_field_is_reported_alone(field, value):
    observed = domain.observe(domain.build_xml(SPEC))
    desired = dict(SPEC, **{field: value})
    changed = domain.differences(observed, desired)
    assert list(changed) == [field]
    assert changed[field] == (observed[field], value)
    assert domain.restart_needed(changed)


def test_unset_desired_fields_are_not_compared():
    observed = domain.observe(domain.build_xml(SPEC))
    assert domain.differences(observed, {"cpus": 2}) == {}
    assert domain.differences(observed, {"nics": [{"mac": "02:73:63:00:00:01", "bridge": "br-a1"}]}) == {}


@pytest.mark.parametrize("xml, mib", [
    ("<memory unit='KiB'>262144</memory>", 256),
    ("<memory>262144</memory>", 256),
    ("<memory unit='MiB'>256</memory>", 256),
    ("<memory unit='GiB'>1</memory>", 1024),
    ("<memory unit='bytes'>268435456</memory>", 256),
])
def test_memory_units_normalise_to_mib(xml, mib):
    import xml.etree.ElementTree as ET

    assert domain.memory_mib(ET.fromstring(xml)) == mib


@pytest.mark.parametrize("count, names", [
    (1, ["vda"]),
    (3, ["vda", "vdb", "vdc"]),
    (28, None),
])
def test_disk_targets(count, names):
    targets = domain.disk_targets(count)
    assert len(targets) == len(set(targets)) == count
    if names:
        assert targets == names
    else:
        assert targets[25:28] == ["vdz", "vdaa", "vdab"]


def test_observe_reads_a_foreign_domain_as_unmanaged():
    xml = "<domain type='kvm'><name>other</name><memory>1048576</memory><vcpu>1</vcpu></domain>"
    observed = domain.observe(xml)
    assert observed["managed"] is False and observed["disks"] == [] and observed["memory"] == 1024


def libvirt_normalised(spec):
    """The inactive XML libvirt's test driver keeps for the definition of ``spec``."""
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXML(domain.build_xml(spec))
        try:
            return dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_libvirt_normalised_definition_matches_the_spec():
    normalised = libvirt_normalised(SPEC)
    assert "<memory unit='KiB'>262144</memory>" in normalised  # libvirt rewrote the unit
    observed = domain.observe(normalised)
    assert domain.differences(observed, SPEC) == {}
    assert domain.differences(observed, dict(SPEC, cpus=1)) == {"cpus": (2, 1)}


def test_seed_cdrom_sits_on_a_virtio_scsi_controller():
    """Debian's cloud kernel has no AHCI driver: the seed must not need one (libvirt's default SCSI is lsilogic)."""
    normalised = libvirt_normalised(SPEC)
    root = ET.fromstring(normalised)
    controllers = [c.get("model") for c in root.findall("devices/controller[@type='scsi']")]
    assert controllers == ["virtio-scsi"]
    cdrom = root.find("devices/disk[@device='cdrom']/target")
    assert cdrom.get("bus") == "scsi"
    assert "ahci" not in normalised and "sata" not in normalised


def test_the_cloud_view_leaves_out_a_domain_undefined_while_it_lists():
    """Another run may undefine a domain between the listing and its read: cloud_info (every teardown's first
    step) must list the others instead of failing on it."""
    libvirt = pytest.importorskip("libvirt")
    from ansible_collections.smallcloud.kvm.plugins.module_utils.views.cloud_view import host_domains

    conn = libvirt.open("test:///default")
    vanishing = conn.defineXML(domain.build_xml(dict(SPEC, name="vanishing")))

    class UndefinedWhileListing:
        def listAllDomains(self, flags):
            listing = conn.listAllDomains(flags)
            vanishing.undefine()
            return listing

    try:
        found = host_domains(UndefinedWhileListing())
        assert "vanishing" not in found and found  # the test driver's own domain is still listed
    finally:
        conn.close()
