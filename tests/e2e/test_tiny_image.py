"""The tiny guest image: built from Debian packages, cached, and booted for real under QEMU/TCG."""

import hashlib
import lzma
import subprocess
import urllib.request
import uuid

import pytest
from harness.ports import free_port, wait_for
from tinyimage import (
    BOOT,
    BUILD_SCRIPT,
    HOSTNAME,
    IP,
    READY,
    SEED,
    LibvirtGuest,
    QemuGuest,
    make_seed,
    overlay,
    tap_net,
    user_net,
)

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024


def sha256_of(stream):
    digest = hashlib.sha256()
    for block in iter(lambda: stream.read(MIB), b""):
        digest.update(block)
    return digest.hexdigest()


def test_image_set_is_small_and_checksummed(tiny_image):
    assert 10 * MIB <= tiny_image.raw.stat().st_size <= 100 * MIB  # tens of MB
    sums = tiny_image.checksums()
    assert set(sums) == {"tiny.raw", "tiny.qcow2", "tiny.raw.xz"}
    for name, digest in sums.items():
        with open(tiny_image.directory / name, "rb") as stream:
            assert sha256_of(stream) == digest, name
    with lzma.open(tiny_image.xz) as stream:
        assert sha256_of(stream) == sums["tiny.raw"]  # the xz is the raw disk, compressed
    info = subprocess.run(["qemu-img", "info", "--output=json", str(tiny_image.qcow2)],
                          capture_output=True, text=True, check=True).stdout
    assert '"format": "qcow2"' in info
    assert f'"virtual-size": {tiny_image.raw.stat().st_size}' in info


def test_disk_is_an_mbr_with_an_active_fat_partition_holding_kernel_and_initramfs(tiny_image):
    with open(tiny_image.raw, "rb") as disk:
        mbr = disk.read(512)
    assert mbr[510:512] == b"\x55\xaa"
    assert mbr[446] == 0x80  # active: syslinux's mbr.bin boots it
    listing = subprocess.run(["mdir", "-a", "-b", "-i", f"{tiny_image.raw}@@1M", "::"],
                             capture_output=True, text=True, check=True).stdout
    for name in ("vmlinuz", "initrd.gz", "syslinux.cfg", "ldlinux.sys"):
        assert f"::/{name}" in listing
    info = tiny_image.info
    assert info["kernel"].endswith("-amd64")
    assert {"virtio_pci", "virtio_blk", "virtio_net", "isofs", "vfat", "sr_mod", "ata_piix", "ahci"} <= set(
        info["modules"] + info["built_in"])


def test_unchanged_inputs_do_not_rebuild(tiny_image):
    before = {path.name: path.stat().st_mtime_ns for path in tiny_image.directory.iterdir()}
    result = subprocess.run([str(BUILD_SCRIPT), str(tiny_image.directory)],
                            capture_output=True, text=True, timeout=300, check=True)
    assert "up to date" in result.stderr
    assert {path.name: path.stat().st_mtime_ns for path in tiny_image.directory.iterdir()} == before


def http_get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode().strip()
    except OSError:
        return None


def test_boots_under_tcg_takes_dhcp_and_serves_the_seeded_hostname(tiny_image, tmp_path):
    seed = make_seed(tmp_path / "seed.iso", "tiny-e2e.example.test")
    port = free_port()
    with QemuGuest(tmp_path, overlay(tiny_image.qcow2, tmp_path / "disk.qcow2"), seed=seed,
                   seed_bus="ide", nets=[user_net(port)]) as guest:
        ready = guest.console.wait_for(READY)
        console = guest.console
        assert console.wait_for(BOOT).startswith(f"{BOOT} 6.")
        assert console.lines(SEED)[0].startswith(f"{SEED} /dev/sr")  # the IDE cdrom
        assert console.lines(HOSTNAME) == [f"{HOSTNAME} tiny-e2e"]  # short name, like cloud-init
        assert console.lines(IP) == [f"{IP} eth0 10.0.2.15"]  # QEMU user networking's DHCP
        assert ready == f"{READY} tiny-e2e"
        text = console.text()
        assert text.index(BOOT) < text.index(HOSTNAME) < text.index(IP) < text.index(READY)
        # hostfwd accepts before the guest answers; poll until httpd's reply comes through.
        assert wait_for(lambda: http_get(f"http://127.0.0.1:{port}/"), 60, interval=0.5,
                        what="HTTP answer from the guest") == "tiny-e2e"


def run_in(netns, *argv, timeout=30):
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True,
                          timeout=timeout, check=False)


def start_dhcp_server(netns, tmp_path):
    """A tap device in ``netns`` with dnsmasq serving 10.99.0.50-60 on it, as a cloud network would."""
    run_in(netns, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap").check_returncode()
    run_in(netns, "ip", "addr", "add", "10.99.0.1/24", "dev", "tap0").check_returncode()
    run_in(netns, "ip", "link", "set", "tap0", "up").check_returncode()
    # The netns fixture kills everything inside the namespace, dnsmasq included.
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
         "--interface=tap0", "--bind-interfaces", "--dhcp-range=10.99.0.50,10.99.0.60,1h",
         f"--dhcp-leasefile={tmp_path / 'leases'}", "--pid-file"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_dhcp_on_every_nic_ping_and_http_in_a_namespace_with_a_vfat_seed(tiny_image, tmp_path, netns):
    """Two NICs (dnsmasq on a tap in a namespace, and QEMU user networking), a vfat seed on a
    virtio disk whose #cloud-config hostname wins over meta-data, ping and HTTP from the namespace."""
    namespace = netns.create()
    dnsmasq = start_dhcp_server(namespace, tmp_path)
    user_data = "#cloud-config\nhostname: from-user-data\n"
    seed = make_seed(tmp_path / "seed.img", "from-meta-data", user_data=user_data, fs="vfat")
    try:
        with QemuGuest(tmp_path, overlay(tiny_image.qcow2, tmp_path / "disk.qcow2"), seed=seed, seed_bus="virtio",
                       nets=[tap_net("tap0"), user_net()], netns=namespace) as guest:
            assert guest.console.wait_for(READY) == f"{READY} from-user-data"
            # vdb, or vdb1: mformat also writes a partition entry spanning the whole floppy image.
            assert guest.console.lines(SEED)[0].startswith(f"{SEED} /dev/vdb")
            leases = dict(line.split()[1:] for line in guest.console.lines(IP))
            assert set(leases) == {"eth0", "eth1"}
            assert leases["eth0"].startswith("10.99.0.")
            assert leases["eth1"] == "10.0.2.15"
            assert run_in(namespace, "busybox", "ping", "-c", "1", "-W", "5", leases["eth0"]).returncode == 0
            answer = run_in(namespace, "curl", "-s", "-m", "10", f"http://{leases['eth0']}/")
            assert answer.stdout.strip() == "from-user-data"
    finally:
        dnsmasq.kill()
        dnsmasq.wait(timeout=30)


def test_boots_through_libvirt_with_the_seed_on_a_sata_cdrom_and_shuts_down_on_acpi(tiny_image, libvirtd):
    name = f"smallcloud-tiny-{uuid.uuid4().hex[:8]}"
    guest = LibvirtGuest(libvirtd.uri, tiny_image, lambda path: make_seed(path, "tiny-libvirt"), name)
    try:
        assert guest.console.wait_for(READY) == f"{READY} tiny-libvirt"
        assert guest.console.lines(SEED)[0].startswith(f"{SEED} /dev/sr")
        assert guest.console.lines(HOSTNAME) == [f"{HOSTNAME} tiny-libvirt"]
        # The ACPI power button (virsh shutdown) powers the guest off; a transient domain then vanishes.
        subprocess.run(["virsh", "-c", libvirtd.uri, "shutdown", name], capture_output=True, check=True)
        wait_for(lambda: not guest.running(), 120, interval=0.5, what="guest powered off by virsh shutdown")
    finally:
        guest.destroy()
    listing = subprocess.run(["virsh", "-c", libvirtd.uri, "list", "--all", "--name"],
                             capture_output=True, text=True, check=True).stdout.split()
    assert name not in listing
    assert not guest.directory.exists()
