"""``smallcloud lab up|status|down``: a lab of hypervisor hosts on one machine.

Each lab host is an anchor process in its own network, mount and UTS namespaces. In its mount namespace
``/run`` is a fresh tmpfs and the directories two hosts must not share (libvirt's, smallcloud's, etcd's,
logs) are bind mounts of the host's own directories under the lab directory. It runs its own ``sshd`` (key
only, with a key made for the lab), ``virtlogd`` and ``libvirtd``. An underlay bridge in the root namespace
joins the hosts (MTU 1600, so VXLAN keeps an inner MTU of 1550) and an "outside" namespace on it plays the
uplink router. Ansible reaches every host over SSH as it reaches a real machine: the session lands in the
host's own view. ``up`` writes an inventory and is idempotent; ``down`` leaves nothing behind.
"""

import argparse
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from smallcloud.stdio import make_blocking

DEFAULT_DIR = "/var/lib/smallcloud-lab"
DEFAULT_HOSTS = 3
MAX_HOSTS = 16
UNDERLAY_CIDR = ipaddress.ip_network("10.250.0.0/24")
UNDERLAY_MTU = 1600
BRIDGE = "sclab-br"
OUTSIDE = "sclab-outside"
OUTSIDE_ADDRESS = str(UNDERLAY_CIDR.broadcast_address - 1)
NETNS_PREFIX = "sclab-"
# What a lab host keeps to itself: bind-mounted from <lab>/<host>/<name>.
# The boot-time configuration directories a deploy writes to (init scripts and their runlevel links, sysctl,
# tmpfiles, modprobe) start as copies of the machine's, so no host's deploy lands on the machine itself.
COPIED_DIRS = ("/etc/init.d", "/etc/rcS.d", *("/etc/rc%d.d" % level for level in range(7)), "/etc/sysctl.d",
               "/etc/tmpfiles.d", "/etc/modprobe.d")
PRIVATE_DIRS = ("/var/lib/libvirt", "/etc/libvirt", "/var/cache/libvirt", "/var/lib/smallcloud", "/var/lib/etcd",
                "/etc/etcd", "/etc/smallcloud", "/var/log", *COPIED_DIRS)
# Directories whose tree (directories only, same owner and mode) a fresh host needs, e.g. libvirt's qemu dirs.
SKELETONS = ("/var/lib/libvirt", "/var/cache/libvirt", "/var/log")
WAIT_SECONDS = 60


class LabError(Exception):
    """A lab request that cannot be carried out; the message names the value and what is allowed."""


def run(argv, check=True, **options):
    """Run a command (argv list); LabError with its output when it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **options)
    if check and result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise LabError("%s failed (exit %d): %s" % (" ".join(argv), result.returncode, output))
    return result


class Lab:
    """The lab in ``directory``: hosts h1..hN, their addresses, and the files ``up`` writes."""

    def __init__(self, directory=DEFAULT_DIR):
        self.dir = Path(directory)
        self.state_file = self.dir / "lab.json"
        self.key = self.dir / "id_ed25519"
        self.inventory = self.dir / "inventory.ini"

    # naming ------------------------------------------------------------------------------------

    @staticmethod
    def host_names(count):
        return ["h%d" % index for index in range(1, count + 1)]

    @staticmethod
    def address(index):
        """The underlay address of host ``index`` (1-based); .1 is the root namespace, .254 the outside."""
        return str(UNDERLAY_CIDR.network_address + 10 + index)

    @staticmethod
    def netns(name):
        return NETNS_PREFIX + name

    def host_dir(self, name):
        return self.dir / name

    def recorded(self):
        """The hosts ``up`` recorded, or None when there is no lab."""
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    # up ----------------------------------------------------------------------------------------

    def up(self, count):
        """Bring up ``count`` hosts (the ones already up are left alone); the actions taken."""
        if not 1 <= count <= MAX_HOSTS:
            raise LabError("--hosts %r is out of range: allowed 1..%d" % (count, MAX_HOSTS))
        recorded = self.recorded()
        if recorded is not None and recorded["count"] != count:
            raise LabError("a lab of %d hosts is up in %s; run 'smallcloud lab down' before asking for %d"
                           % (recorded["count"], self.dir, count))
        missing = [tool for tool in ("sshd", "libvirtd", "virtlogd", "unshare", "nsenter", "ip", "ssh-keygen")
                   if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
        if missing:
            raise LabError("the lab needs %s (Debian: openssh-server, libvirt-daemon-system, iproute2)"
                           % ", ".join(missing))
        actions = []
        self.dir.mkdir(parents=True, exist_ok=True)
        made = (recorded or {}).get("mountpoints_made") or self.make_mountpoints()
        if not self.key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "smallcloud-lab", "-f", str(self.key)])
            actions.append("made the lab's SSH key")
        actions += self.underlay()
        hosts = {}
        for index, name in enumerate(self.host_names(count), start=1):
            hosts[name] = self.host_up(index, name, actions)
        self.state_file.write_text(json.dumps({"count": count, "hosts": hosts, "mountpoints_made": made}, indent=2,
                                              sort_keys=True))
        self.write_inventory(hosts)
        for name, host in hosts.items():
            wait_until(lambda host=host: ssh_answers(host["address"]), "sshd of %s" % name)
            wait_until(lambda host=host: self.libvirt_answers(host), "libvirtd of %s" % name)
        return actions

    @staticmethod
    def make_mountpoints():
        """The private directories missing on this machine, made as mount points; ``down`` removes them again."""
        made = [path for path in PRIVATE_DIRS if not Path(path).exists()]
        for path in made:
            os.makedirs(path, 0o755)
        return made

    def underlay(self):
        """The bridge joining the hosts, and the outside namespace on it."""
        actions = []
        if not Path("/sys/class/net", BRIDGE).exists():
            run(["ip", "link", "add", BRIDGE, "mtu", str(UNDERLAY_MTU), "type", "bridge"])
            run(["ip", "addr", "add", "%s/%d" % (UNDERLAY_CIDR.network_address + 1, UNDERLAY_CIDR.prefixlen),
                 "dev", BRIDGE])
            run(["ip", "link", "set", BRIDGE, "up"])
            actions.append("created the underlay bridge %s" % BRIDGE)
        if OUTSIDE not in netns_list():
            run(["ip", "netns", "add", OUTSIDE])
            self.veth_into(OUTSIDE, "sclab-out", OUTSIDE_ADDRESS, gateway=None)
            # A router between the hosts too: a host reaches a floating IP (routed to the gateway host) via it.
            run(["ip", "netns", "exec", OUTSIDE, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
            actions.append("created the outside namespace %s" % OUTSIDE)
        return actions

    def veth_into(self, netns, host_end, address, gateway=OUTSIDE_ADDRESS):
        """A veth from the underlay bridge into ``netns`` (inside: eth0 with ``address``), both ends up.

        Hosts route by default to the outside namespace, the uplink router, which forwards only between the
        underlay's own routes and has no default route: guest traffic to anywhere else ends there instead of
        leaving through this machine."""
        run(["ip", "link", "add", host_end, "mtu", str(UNDERLAY_MTU), "type", "veth", "peer", "name", "eth0",
             "mtu", str(UNDERLAY_MTU), "netns", netns])
        run(["ip", "link", "set", host_end, "master", BRIDGE, "up"])
        inside = ["ip", "-n", netns]
        run(inside + ["addr", "add", "%s/%d" % (address, UNDERLAY_CIDR.prefixlen), "dev", "eth0"])
        run(inside + ["link", "set", "eth0", "up"])
        run(inside + ["link", "set", "lo", "up"])
        if gateway:
            run(inside + ["route", "add", "default", "via", gateway])

    def host_up(self, index, name, actions):
        """One host: its anchor, namespaces, private directories, underlay port and daemons."""
        host = {"name": name, "address": self.address(index), "netns": self.netns(name)}
        previous = (self.recorded() or {}).get("hosts", {}).get(name)
        if previous and pid_alive(previous["pid"]) and host["netns"] in netns_list():
            host["pid"] = previous["pid"]
        else:
            host["pid"] = self.start_anchor(name)
            run(["ip", "netns", "attach", host["netns"], str(host["pid"])])
            self.veth_into(host["netns"], "sclab-%s" % name, host["address"])
            actions.append("started lab host %s (%s)" % (name, host["address"]))
        for daemon, argv in self.daemons(name).items():
            if not self.daemon_alive(host, daemon):
                self.enter(host, argv)
                actions.append("started %s on %s" % (daemon, name))
        return host

    def start_anchor(self, name):
        """The process that holds a host's namespaces: mounts its private view, then sleeps."""
        root = self.host_dir(name)
        mounts = ["mount -t tmpfs -o mode=0755 tmpfs /run", "mkdir -p /run/sshd /run/libvirt /run/lock",
                  # sysfs shows the network devices of the namespace that mounts it: a fresh one gives this host
                  # its own /sys/class/net (the rest of /sys, cgroups included, stays the machine's).
                  "mkdir -p /run/sysfs && mount -t sysfs sysfs /run/sysfs",
                  "mount --bind /run/sysfs/class/net /sys/class/net",
                  "mount --bind /run/sysfs/devices/virtual/net /sys/devices/virtual/net"]
        for path in PRIVATE_DIRS:
            private = root / path.strip("/").replace("/", "_")
            if not private.exists():
                private.mkdir(parents=True)
                if path == "/etc/libvirt" and Path(path).is_dir():
                    seed_libvirt_config(private)
                elif path in COPIED_DIRS and Path(path).is_dir():
                    shutil.copytree(path, private, dirs_exist_ok=True, symlinks=True)
                elif path in SKELETONS and Path(path).is_dir():
                    copy_skeleton(Path(path), private)
            mounts.append("mkdir -p %s && mount --bind %s %s" % (path, private, path))
        # Its own name resolves without DNS (libvirtd looks it up; the lab's uplink answers no DNS).
        hosts_file = root / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n127.0.1.1 %s\n" % name)
        mounts.append("mount --bind %s /etc/hosts" % hosts_file)
        script = " && ".join(["hostname %s" % name, *mounts, "echo ready", "exec sleep infinity"])
        process = subprocess.Popen(  # noqa: S603 - argv list; the script is ours
            ["unshare", "--mount", "--net", "--uts", "--propagation", "private", "--", "sh", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        line = process.stdout.readline().strip()
        if line != "ready":
            process.kill()
            raise LabError("lab host %s did not start: %s" % (name, process.stderr.read().strip()))
        return process.pid

    def daemons(self, name):
        """The daemons of a host and how to start them (each detaches and writes its pid file in /run)."""
        config = self.host_dir(name) / "sshd_config"
        host_key = self.host_dir(name) / "ssh_host_ed25519_key"
        if not host_key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)])
        authorized = self.dir / "authorized_keys"
        authorized.write_text(Path(str(self.key) + ".pub").read_text())
        authorized.chmod(0o600)
        config.write_text("\n".join([
            "Port 22", "ListenAddress 0.0.0.0", "HostKey %s" % host_key, "PidFile /run/sshd.pid",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "AuthorizedKeysFile %s" % authorized, "UsePAM no", "StrictModes no",
            "Subsystem sftp internal-sftp", "AcceptEnv LANG LC_*", ""]))
        return {
            "virtlogd": ["virtlogd", "-d"],
            "libvirtd": ["libvirtd", "-d"],
            "sshd": ["/usr/sbin/sshd", "-f", str(config)],
        }

    @staticmethod
    def enter(host, argv, check=True):
        """Run ``argv`` in the host's namespaces."""
        return run(["nsenter", "-t", str(host["pid"]), "-m", "-n", "-u", "--", *argv], check=check, timeout=30)

    @staticmethod
    def daemon_pid(host, daemon):
        """The pid a daemon wrote in the host's /run, or None."""
        try:
            return int(Path("/proc/%d/root/run/%s.pid" % (host["pid"], daemon)).read_text().strip())
        except (OSError, ValueError):
            return None

    def daemon_alive(self, host, daemon):
        pid = self.daemon_pid(host, daemon)
        return pid is not None and pid_alive(pid)

    def libvirt_answers(self, host):
        return self.enter(host, ["virsh", "-c", "qemu:///system", "version"], check=False).returncode == 0

    def write_inventory(self, hosts):
        """An Ansible inventory: every host in the etcd and hypervisors groups, reached over SSH."""
        lines = []
        for group in ("etcd", "hypervisors"):
            lines.append("[%s]" % group)
            lines += ["%s ansible_host=%s" % (name, host["address"]) for name, host in sorted(hosts.items())]
            lines.append("")
        lines += [
            "[all:vars]", "ansible_user=root", "ansible_ssh_private_key_file=%s" % self.key,
            "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
            "-o LogLevel=ERROR'", "ansible_python_interpreter=/usr/bin/python3", "ansible_pipelining=true",
            # The cluster CA lives with the lab, so `down` takes it away too.
            "etcd_tls_ca_dir=%s" % (self.dir / "etcd-ca"),
            # The lab's hosts share one kernel, whose KSM is the machine's: the lab leaves it alone.
            "hypervisor_ksm_enabled=false",
            "smallcloud_lab_outside_netns=%s" % OUTSIDE, ""]
        self.inventory.write_text("\n".join(lines))

    # status ------------------------------------------------------------------------------------

    def status(self):
        """``{host: {"address", "anchor", "sshd", "libvirtd"}}`` for every recorded host (empty: no lab)."""
        recorded = self.recorded()
        if recorded is None:
            return {}
        report = {}
        for name, host in sorted(recorded["hosts"].items()):
            alive = pid_alive(host["pid"])
            report[name] = {"address": host["address"], "anchor": alive,
                            "sshd": alive and ssh_answers(host["address"], timeout=2),
                            "libvirtd": alive and self.libvirt_answers(host)}
        return report

    # down --------------------------------------------------------------------------------------

    def down(self):
        """Stop every daemon and anchor, delete namespaces and links, remove the lab directory."""
        recorded = self.recorded() or {"hosts": {}}
        actions = []
        for name, host in sorted(recorded["hosts"].items()):
            if pid_alive(host["pid"]):
                for daemon in ("sshd", "libvirtd", "virtlogd"):
                    pid = self.daemon_pid(host, daemon)
                    if pid is not None and pid_alive(pid):
                        os.kill(pid, signal.SIGTERM)
                        wait_until(lambda pid=pid: not pid_alive(pid), "%s of %s to stop" % (daemon, name))
                # Anything else still in the host's namespaces (a guest's QEMU, a network's dnsmasq) goes with it.
                for pid in pids_in_netns_of(host["pid"]):
                    if pid != host["pid"]:
                        os.kill(pid, signal.SIGKILL)
                os.kill(host["pid"], signal.SIGTERM)
                wait_until(lambda host=host: not pid_alive(host["pid"]), "lab host %s to stop" % name)
                actions.append("stopped lab host %s" % name)
        for netns in [ns for ns in netns_list() if ns.startswith(NETNS_PREFIX)]:
            run(["ip", "netns", "delete", netns], check=False)
            actions.append("deleted namespace %s" % netns)
        for link in [link for link in os.listdir("/sys/class/net") if link.startswith("sclab-")]:
            run(["ip", "link", "delete", link], check=False)
            actions.append("deleted link %s" % link)
        for path in reversed(recorded.get("mountpoints_made") or []):
            with contextlib.suppress(OSError):  # kept when something was put there since
                os.rmdir(path)
                actions.append("removed mount point %s" % path)
        if self.dir.exists():
            shutil.rmtree(self.dir)
            actions.append("removed %s" % self.dir)
        return actions


def seed_libvirt_config(private):
    """A host's /etc/libvirt: the machine's, without networks that would autostart on every host."""
    shutil.copytree("/etc/libvirt", private, dirs_exist_ok=True, symlinks=True)
    autostart = private / "qemu" / "networks" / "autostart"
    if autostart.exists():
        shutil.rmtree(autostart)


def copy_skeleton(source, target):
    """The directories below ``source`` (not the files), with their owners and modes, under ``target``."""
    for directory, subdirs, _files in os.walk(source):
        for sub in subdirs:
            origin = Path(directory, sub)
            made = target / origin.relative_to(source)
            if origin.is_symlink():
                continue
            made.mkdir(exist_ok=True)
            stat = origin.stat()
            os.chown(made, stat.st_uid, stat.st_gid)
            made.chmod(stat.st_mode & 0o7777)


def netns_list():
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def pids_in_netns_of(pid):
    """Every process in ``pid``'s network namespace or in one the host made (its /run/netns, e.g. a
    network's dnsmasq in its gateway namespace)."""
    try:
        targets = {os.readlink("/proc/%d/ns/net" % pid)}
    except OSError:
        return []
    nested = Path("/proc/%d/root/run/netns" % pid)
    with contextlib.suppress(OSError):
        targets |= {"net:[%d]" % entry.stat().st_ino for entry in nested.iterdir()}
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink("/proc/%s/ns/net" % entry) in targets:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return Path("/proc/%d" % pid).exists() and "zombie" not in Path("/proc/%d/status" % pid).read_text().lower()


def ssh_answers(address, timeout=1):
    """Whether something accepts TCP on port 22 of ``address``."""
    try:
        with socket.create_connection((address, 22), timeout=timeout) as connection:
            return connection.recv(4).startswith(b"SSH")
    except OSError:
        return False


def healthy(report):
    """Whether a ``Lab.status()`` report has hosts and every one of them answers on every count."""
    return bool(report) and all(all(state.values()) for state in report.values())


def wait_until(condition, what, seconds=WAIT_SECONDS):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise LabError("gave up waiting for %s after %d s" % (what, seconds))
        time.sleep(0.2)


DEMO_HOSTS = 3
DEMO_IMAGE_DIR = DEFAULT_DIR + "-image"  # playbooks/vars/demo_lab.yml: demo_lab_image_dir


def demo_up():
    """The lab of ``smallcloud demo --lab`` (3 hosts in the default directory); its inventory's path."""
    lab = Lab()
    lab.up(DEMO_HOSTS)
    return lab.inventory


def demo_down(ansible_playbook, extra_args):
    """``smallcloud demo --lab --teardown``: the cloud torn down while the lab answers, the image server
    stopped, the lab taken down. Exit status of the teardown playbook, or 0."""
    lab = Lab()
    status = 0
    if healthy(lab.status()):
        make_blocking()
        status = subprocess.run([ansible_playbook, "-i", str(lab.inventory), "smallcloud.kvm.teardown",  # noqa: S603
                                 *extra_args], check=False).returncode
    run(["start-stop-daemon", "--stop", "--oknodo", "--retry", "5", "--remove-pidfile", "--pidfile",
         DEMO_IMAGE_DIR + "/http.pid"], check=False)
    shutil.rmtree(DEMO_IMAGE_DIR, ignore_errors=True)
    print(json.dumps({"changed": True, "actions": lab.down()}))
    return status


def main(args):
    """``smallcloud lab up [--hosts N] | status | down`` (``--dir`` for another lab directory)."""
    parser = argparse.ArgumentParser(prog="smallcloud lab", description="A lab of hypervisor hosts on this machine.")
    parser.add_argument("action", choices=["up", "status", "down"])
    parser.add_argument("--hosts", type=int, default=DEFAULT_HOSTS, help="number of hosts (1..%d)" % MAX_HOSTS)
    parser.add_argument("--dir", default=DEFAULT_DIR, help="the lab's directory (default %(default)s)")
    options = parser.parse_args(args)
    if os.geteuid() != 0:
        sys.stderr.write("smallcloud lab: needs root (namespaces, mounts, links)\n")
        return 2
    lab = Lab(options.dir)
    try:
        if options.action == "up":
            actions = lab.up(options.hosts)
            print(json.dumps({"changed": bool(actions), "actions": actions, "inventory": str(lab.inventory)}))
            print("use it with: smallcloud playbook -i %s smallcloud.kvm.deploy" % lab.inventory, file=sys.stderr)
        elif options.action == "status":
            report = lab.status()
            print(json.dumps({"hosts": report}, indent=2))
            return 0 if healthy(report) else 1
        else:
            actions = lab.down()
            print(json.dumps({"changed": bool(actions), "actions": actions}))
    except LabError as error:
        sys.stderr.write("smallcloud lab: %s\n" % error)
        return 2
    return 0
