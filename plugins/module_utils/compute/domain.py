# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Domain XML for an instance: build it, read libvirt's normalised definition back, compare field by field.

``build_xml(spec)`` writes the definition we want; ``observe(xml)`` reads the fields we manage out of
what libvirt returns for ``XMLDesc(VIR_DOMAIN_XML_INACTIVE)`` (units, defaults and device order as
libvirt normalised them); ``differences(observed, desired)`` lists the fields that differ. The raw XML
we wrote is never compared with libvirt's: only these normalised fields are.

A spec (and an observation) is a dict::

    {"name", "uuid", "virt_type": "kvm"|"qemu", "cpus": int, "memory": MiB,
     "disks": [{"device": "disk"|"cdrom", "target", "bus", "path", "format"}],
     "nics": [{"mac", "bridge", "model"}], "console_log": path}
"""

import xml.etree.ElementTree as ET

XMLNS = "https://smallcloud.dev/xmlns/instance/1"
VIRT_TYPES = ("kvm", "qemu")
NIC_MODEL = "virtio"
DISK_BUS = "virtio"
# The seed is a cdrom on a virtio-scsi controller: Debian's cloud kernel (linux-image-cloud-amd64, as in
# its genericcloud images) has no AHCI driver, so a SATA seed is invisible to it; every cloud kernel and the
# tiny guest have virtio_scsi. The controller is named explicitly: libvirt's default SCSI model is lsilogic.
SEED_BUS = "scsi"
SCSI_CONTROLLER_MODEL = "virtio-scsi"
COMPARED = ("virt_type", "cpus", "memory", "disks", "nics", "console_log")
# Changing these on a running domain only takes effect after the guest is restarted.
NEXT_BOOT = ("virt_type", "cpus", "memory", "disks", "nics", "console_log")
_UNIT_KIB = {"b": 1.0 / 1024, "bytes": 1.0 / 1024, "k": 1, "kib": 1, "kb": 1000.0 / 1024, "m": 1024,
             "mib": 1024, "mb": 1000.0 ** 2 / 1024, "g": 1024 ** 2, "gib": 1024 ** 2, "gb": 1000.0 ** 3 / 1024}


def disk_targets(count, prefix="vd"):
    """``count`` target device names vda, vdb, ... (aa after z, like libvirt)."""
    names = []
    for index in range(count):
        suffix = ""
        number = index
        while True:
            suffix = chr(ord("a") + number % 26) + suffix
            number = number // 26 - 1
            if number < 0:
                break
        names.append(prefix + suffix)
    return names


def _sub(parent, tag, text=None, **attributes):
    """Append ``<tag attributes>text</tag>`` to ``parent`` and return it."""
    element = ET.SubElement(parent, tag, {k: str(v) for k, v in attributes.items()})
    if text is not None:
        element.text = str(text)
    return element


def build_xml(spec):
    """The domain XML (text) for ``spec``."""
    domain = ET.Element("domain", {"type": spec["virt_type"]})
    _sub(domain, "name", spec["name"])
    if spec.get("uuid"):
        _sub(domain, "uuid", spec["uuid"])
    metadata = _sub(domain, "metadata")
    ET.SubElement(metadata, "{%s}instance" % XMLNS)
    _sub(domain, "memory", spec["memory"], unit="MiB")
    _sub(domain, "currentMemory", spec["memory"], unit="MiB")
    _sub(domain, "vcpu", spec["cpus"], placement="static")
    os_element = _sub(domain, "os")
    _sub(os_element, "type", "hvm", arch="x86_64")
    _sub(os_element, "boot", dev="hd")
    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if spec["virt_type"] == "kvm":
        _sub(domain, "cpu", mode="host-passthrough")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")
    devices = _sub(domain, "devices")
    if any(disk["bus"] == "scsi" for disk in spec["disks"]):
        _sub(devices, "controller", type="scsi", index=0, model=SCSI_CONTROLLER_MODEL)
    for disk in spec["disks"]:
        _disk_xml(devices, disk)
    for nic in spec["nics"]:
        interface = _sub(devices, "interface", type="bridge")
        _sub(interface, "mac", address=nic["mac"])
        _sub(interface, "source", bridge=nic["bridge"])
        _sub(interface, "model", type=nic.get("model") or NIC_MODEL)
    serial = _sub(devices, "serial", type="pty")
    if spec.get("console_log"):
        _sub(serial, "log", file=spec["console_log"], append="on")
    _sub(serial, "target", port=0)
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port=0)
    _sub(devices, "memballoon", model="virtio")
    ET.register_namespace("smallcloud", XMLNS)
    return ET.tostring(domain, encoding="unicode")


def _disk_xml(devices, disk):
    """One ``<disk>`` element: a file-backed disk or read-only cdrom."""
    element = _sub(devices, "disk", type="file", device=disk["device"])
    driver = {"name": "qemu", "type": disk["format"]}
    if disk["device"] == "disk":
        driver["discard"] = "unmap"
    _sub(element, "driver", **driver)
    _sub(element, "source", file=disk["path"])
    _sub(element, "target", dev=disk["target"], bus=disk["bus"])
    if disk["device"] == "cdrom":
        _sub(element, "readonly")


def memory_mib(element):
    """An element's amount (``unit`` attribute, KiB by default) in whole MiB."""
    if element is None or element.text is None:
        return None
    factor = _UNIT_KIB.get((element.get("unit") or "KiB").lower(), 1)
    return int(round(int(element.text.strip()) * factor / 1024.0))


def observe(xml_text):
    """The managed fields of a (normalised) domain XML, in the shape of a spec."""
    root = ET.fromstring(xml_text)  # noqa: S314 - libvirt's own output, not untrusted input
    devices = root.find("devices")
    if devices is None:
        devices = ET.Element("devices")
    vcpu = root.find("vcpu")
    serial = devices.find("serial")
    log = serial.find("log") if serial is not None else None
    return {
        "name": root.findtext("name"),
        "uuid": root.findtext("uuid"),
        "virt_type": root.get("type"),
        "cpus": int(vcpu.text.strip()) if vcpu is not None and vcpu.text else None,
        "memory": memory_mib(root.find("memory")),
        "disks": [_observe_disk(disk) for disk in devices.findall("disk")],
        "nics": [_observe_nic(nic) for nic in devices.findall("interface")],
        "console_log": log.get("file") if log is not None else None,
        "managed": root.find("metadata/{%s}instance" % XMLNS) is not None,
    }


def _observe_disk(disk):
    """A ``<disk>`` as {device, target, bus, path, format}."""
    source, target, driver = disk.find("source"), disk.find("target"), disk.find("driver")
    return {
        "device": disk.get("device", "disk"),
        "target": target.get("dev") if target is not None else None,
        "bus": target.get("bus") if target is not None else None,
        "path": (source.get("file") or source.get("dev")) if source is not None else None,
        "format": driver.get("type") if driver is not None else None,
    }


def _observe_nic(nic):
    """An ``<interface>`` as {mac, bridge, model}."""
    mac, source, model = nic.find("mac"), nic.find("source"), nic.find("model")
    return {
        "mac": mac.get("address").lower() if mac is not None else None,
        "bridge": source.get("bridge") if source is not None else None,
        "model": model.get("type") if model is not None else None,
    }


def differences(observed, desired):
    """``{field: (observed, desired)}`` for every compared field that differs; unset desired means don't care."""
    found = {}
    for field in COMPARED:
        want = desired.get(field)
        if want is None:
            continue
        have = observed.get(field) if observed else None
        if field == "nics":
            want = [dict(nic, model=nic.get("model") or NIC_MODEL) for nic in want]
        if have != want:
            found[field] = (have, want)
    return found


def restart_needed(changed_fields):
    """True when any of ``changed_fields`` only applies once the guest restarts."""
    return any(field in NEXT_BOOT for field in changed_fields)
