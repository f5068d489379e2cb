"""The smallcloud.kvm.etcd role and the etcd_backup / etcd_restore playbooks against this machine.

Every member the tests create is an instance with its own init script, pid file, ports (free
loopback ports, never 2379/2380) and a scratch directory holding its config, data, logs, TLS files,
tarball install and backups; ``EtcdLab`` removes all of it afterwards. The etcd processes of the
shared fixtures are never touched: instances are stopped through their own pid files.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from harness.ansible import MANAGED_PYTHON
from harness.molecule import molecule_test
from harness.ports import free_port

pytestmark = pytest.mark.e2e

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"


def etcd_version():
    out = subprocess.run([ETCD, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].split()[-1]


class EtcdLab:
    """Scratch inventory of etcd members on this host; ``cleanup()`` stops and removes every one."""

    def __init__(self):
        # /tmp/pytest-of-root is 0700: the etcd user could not reach data dirs below it.
        self.base = Path(tempfile.mkdtemp(prefix="sct-etcd-role-"))
        self.base.chmod(0o755)
        self.token = f"sct{uuid.uuid4().hex[:8]}"
        self.services = []
        self.play = self.base / "site.yml"
        self.play.write_text(
            json.dumps([{"name": "etcd", "hosts": "etcd", "gather_facts": False, "roles": ["smallcloud.kvm.etcd"]}])
        )

    def inventory(self, members, name="inventory.yml", **group_vars):
        """Write an inventory of ``members`` (name -> host vars); returns (path, {name: hostvars})."""
        hosts = {}
        for member, extra in members.items():
            service = f"{self.token}-{member}"
            self.services.append(service)
            hosts[member] = {
                "etcd_service_name": service,
                "etcd_client_port": free_port(),
                "etcd_peer_port": free_port(),
                "etcd_data_dir": str(self.base / member / "data"),
                "etcd_tls_dir": str(self.base / member / "pki"),
                **extra,
            }
        group = {
            "ansible_connection": "local",
            "ansible_python_interpreter": MANAGED_PYTHON,
            "ansible_pipelining": True,
            "etcd_cluster_token": self.token,
            "etcd_address": "127.0.0.1",
            "etcd_config_dir": str(self.base / "etc"),
            "etcd_log_dir": str(self.base / "log"),
            "etcd_tls_ca_dir": str(self.base / "ca"),
            "etcd_backup_dest": str(self.base / "backups"),
            "etcd_backup_remote_dir": str(self.base / "remote"),
            "etcd_restore_remote_dir": str(self.base / "remote"),
            "etcd_health_timeout": 60,
            "etcd_health_delay": 1,
            # Loopback members: plaintext unless a test asks for TLS (the role's default for a cluster).
            "etcd_tls_client": False, "etcd_tls_peer": False, "etcd_tls_client_cert_auth": False,
            **group_vars,
        }
        path = self.base / name
        path.write_text(json.dumps({"all": {"children": {"etcd": {"hosts": hosts, "vars": group}}}}))
        return path, hosts

    def pid(self, service):
        try:
            return int(Path(f"/run/{service}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def cleanup(self):
        for service in self.services:
            script = Path("/etc/init.d") / service
            if script.exists():
                subprocess.run([str(script), "stop"], capture_output=True, timeout=60, check=False)
                subprocess.run(["update-rc.d", "-f", service, "remove"], capture_output=True, check=False)
            stop_pid(self.pid(service))
            script.unlink(missing_ok=True)
            Path(f"/run/{service}.pid").unlink(missing_ok=True)
        shutil.rmtree(self.base, ignore_errors=True)


def stop_pid(pid):
    """Stop an etcd this test started (checked through /proc/PID/exe), waiting until it is gone."""
    if not pid:
        return
    try:
        if not os.readlink(f"/proc/{pid}/exe").endswith("/etcd"):
            return
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            # A stopped daemon whose parent is PID 1 may linger as a zombie: gone for our purpose.
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return
        except OSError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def lab():
    lab = EtcdLab()
    yield lab
    lab.cleanup()


def converge(ansible, lab, inventory, **kwargs):
    return ansible.run_playbook(lab.play, inventory=inventory, **kwargs)


def failure(run):
    """The failed tasks' messages, or the raw output when nothing parsed."""
    messages = [f"{name} on {host}: {message}" for name, host, message in run.failures()]
    return "\n".join(messages) or f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}"


def assert_ok(run):
    assert run.rc == 0 and run.failed_count() == 0, failure(run)


def etcdctl(endpoint, *args, env=None, check=True):
    full_env = {"PATH": os.environ["PATH"], "ETCDCTL_API": "3", "ETCDCTL_ENDPOINTS": endpoint, **(env or {})}
    proc = subprocess.run([ETCDCTL, *args], capture_output=True, text=True, env=full_env, timeout=60, check=False)
    if check:
        assert proc.returncode == 0, f"etcdctl {' '.join(args)}: {proc.stderr}"
    return proc


def endpoint(hostvars, scheme="http"):
    return f"{scheme}://127.0.0.1:{hostvars['etcd_client_port']}"


def rendered(run, task, host="solo"):
    """What a template task would write, from its --diff."""
    (result,) = [r for r in run.results(host) if r["_task"].endswith(task)]
    return result["diff"][0]["after"]


def test_check_mode_creates_nothing_and_bad_input_names_the_value(ansible, lab):
    inventory, hosts = lab.inventory({"solo": {}})
    member = hosts["solo"]
    service = member["etcd_service_name"]

    run = converge(ansible, lab, inventory, check=True, diff=True)
    assert_ok(run)
    assert run.changed_count() > 0
    config = rendered(run, "Write the member configuration")
    assert f"initial-cluster: solo=http://127.0.0.1:{member['etcd_peer_port']}" in config
    assert f"data-dir: {member['etcd_data_dir']}" in config
    assert '--config-file "$CONFIG"' in rendered(run, "Install the init script (no systemd)")

    # Where PID 1 is systemd the member is a notify unit running the same configuration file.
    run = converge(ansible, lab, inventory, check=True, diff=True, extra_vars={"etcd_service_manager": "systemd"})
    assert_ok(run)
    unit = rendered(run, "Install the systemd unit")
    assert "Type=notify" in unit
    assert f"ExecStart={ETCD} --config-file {lab.base}/etc/{service}.conf.yml" in unit

    assert not Path(member["etcd_data_dir"]).exists()
    assert not (lab.base / "etc").exists()
    assert not Path(f"/etc/init.d/{service}").exists()
    assert not Path(f"/etc/systemd/system/{service}.service").exists()
    assert lab.pid(service) is None

    run = converge(ansible, lab, inventory, extra_vars={"etcd_data_dir": "relative/data"})
    assert run.rc != 0
    assert "etcd_data_dir on solo: 'relative/data' must be an absolute path" in failure(run)

    run = converge(ansible, lab, inventory, extra_vars={"etcd_install_method": "rpm"})
    assert run.rc != 0
    assert "rpm" in failure(run) and "tarball" in failure(run)

    run = converge(ansible, lab, inventory, extra_vars={"etcd_install_method": "tarball", "etcd_tarball_url": "x.tgz"})
    assert run.rc != 0
    assert "etcd_tarball_sha256" in failure(run) and "64 hex" in failure(run)


def test_unhealthy_member_fails_with_its_own_error(ansible, lab):
    inventory, hosts = lab.inventory({"busy": {}}, etcd_health_timeout=6)
    member = hosts["busy"]
    # Something else already listens on the member's client port: etcd exits, saying so.
    # Bound without SO_REUSEADDR and not listening: etcd's bind fails, health checks are refused at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", member["etcd_client_port"]))
        run = converge(ansible, lab, inventory)
    assert run.rc != 0
    message = failure(run)
    assert "etcd member busy" in message
    assert "address already in use" in message


def build_tarball(directory, version):
    """An upstream-layout release tarball (etcd-vX.Y.Z-linux-amd64/{etcd,etcdctl}) of Debian's binaries."""
    name = f"etcd-v{version}-linux-amd64"
    path = Path(directory) / f"{name}.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for binary in (ETCD, ETCDCTL):
            tar.add(binary, arcname=f"{name}/{Path(binary).name}")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_tarball_install_with_tls_and_auth(ansible, lab, http_server, tmp_path):
    tarball, sha256 = build_tarball(tmp_path, etcd_version())
    server = http_server(tmp_path)
    password = f"pw-{uuid.uuid4().hex}"
    settings = {
        "etcd_install_method": "tarball",
        "etcd_tarball_url": server.url(tarball.name),
        "etcd_tarball_sha256": sha256,
        "etcd_tarball_install_dir": str(lab.base / "opt"),
        "etcd_tarball_link_dir": str(lab.base / "bin"),
        "etcd_tls_client": True,
        "etcd_tls_peer": True,
        "etcd_tls_client_cert_auth": True,
        "etcd_auth_enabled": True,
        "etcd_root_password": password,
    }
    inventory, hosts = lab.inventory({"secure": {}}, **settings)
    member = hosts["secure"]

    run = converge(ansible, lab, inventory)
    assert_ok(run)
    assert password not in run.stdout
    again = converge(ansible, lab, inventory)
    assert_ok(again)
    assert again.changed_count() == 0, [r["_task"] for r in again.results("secure") if r.get("changed")]
    checked = converge(ansible, lab, inventory, check=True)
    assert_ok(checked)
    assert checked.changed_count() == 0, [r["_task"] for r in checked.results("secure") if r.get("changed")]

    release = lab.base / "opt" / tarball.name.removesuffix(".tar.gz")
    pid = lab.pid(member["etcd_service_name"])
    assert os.readlink(f"/proc/{pid}/exe") == str(release / "etcd")
    assert Path(f"/proc/{pid}").stat().st_uid == int(subprocess.check_output(["id", "-u", "etcd"]))
    assert os.readlink(lab.base / "bin" / "etcdctl") == str(release / "etcdctl")

    pki = Path(member["etcd_tls_dir"])
    tls = {
        "ETCDCTL_CACERT": str(pki / "ca.crt"),
        "ETCDCTL_CERT": str(pki / "member.crt"),
        "ETCDCTL_KEY": str(pki / "member.key"),
    }
    url = endpoint(member, "https")
    root = {**tls, "ETCDCTL_USER": "root", "ETCDCTL_PASSWORD": password}
    etcdctl(url, "put", "/sct/tls", "secret", env=root)
    assert etcdctl(url, "get", "--print-value-only", "/sct/tls", env=root).stdout.strip() == "secret"
    assert etcdctl(url, "get", "/sct/tls", env=tls, check=False).returncode != 0
    no_cert = {"ETCDCTL_CACERT": tls["ETCDCTL_CACERT"], "ETCDCTL_USER": "root", "ETCDCTL_PASSWORD": password}
    assert etcdctl(url, "get", "/sct/tls", "--dial-timeout=3s", env=no_cert, check=False).returncode != 0
    assert etcdctl(endpoint(member), "get", "/sct/tls", "--dial-timeout=3s", check=False).returncode != 0

    # A snapshot of an authenticated TLS cluster needs the root credentials and the client certificate.
    backup = ansible.run_playbook("smallcloud.kvm.etcd_backup", inventory=inventory)
    assert_ok(backup)
    assert password not in backup.stdout
    (snapshot,) = (lab.base / "backups").glob("*.db")
    assert Path(f"{snapshot}.sha256").read_text().split()[0] == hashlib.sha256(snapshot.read_bytes()).hexdigest()

    # A tarball that does not match its sha256 is refused (only the install phase runs: its tag).
    bad = converge(
        ansible,
        lab,
        inventory,
        extra_vars={"etcd_tarball_sha256": "0" * 64, "etcd_tarball_install_dir": str(lab.base / "opt-bad")},
        args=["--tags", "etcd_install"],
    )
    assert bad.rc != 0
    assert "checksum" in failure(bad).lower() and "0" * 64 in failure(bad)
    assert not (lab.base / "opt-bad" / tarball.name).exists()


def test_cluster_backup_delete_restore(ansible, lab):
    inventory, hosts = lab.inventory({"m1": {}, "m2": {}, "m3": {}})
    run = converge(ansible, lab, inventory)
    assert_ok(run)

    urls = [endpoint(h) for h in hosts.values()]
    members = etcdctl(urls[0], "member", "list", "--write-out=json").stdout
    assert sorted(m["name"] for m in json.loads(members)["members"]) == ["m1", "m2", "m3"]
    for i in range(5):
        etcdctl(urls[i % 3], "put", f"/sct/keep/{i}", f"value-{i}")

    backup = ansible.run_playbook("smallcloud.kvm.etcd_backup", inventory=inventory)
    assert_ok(backup)
    snapshots = sorted((lab.base / "backups").glob("*.db"))
    assert len(snapshots) == 1 and snapshots[0].name.startswith(lab.token)
    checksum = Path(f"{snapshots[0]}.sha256").read_text().split()
    assert checksum == [hashlib.sha256(snapshots[0].read_bytes()).hexdigest(), snapshots[0].name]
    assert not list((lab.base / "remote").glob("*")), "the member's copy of the snapshot is left behind"

    etcdctl(urls[1], "del", "--prefix", "/sct/keep/")
    etcdctl(urls[2], "put", "/sct/after-backup", "x")
    assert etcdctl(urls[0], "get", "--prefix", "--keys-only", "/sct/").stdout.split() == ["/sct/after-backup"]

    # A snapshot whose checksum does not match is refused before anything is stopped.
    corrupt = lab.base / "corrupt.db"
    corrupt.write_bytes(snapshots[0].read_bytes() + b"x")
    Path(f"{corrupt}.sha256").write_text(Path(f"{snapshots[0]}.sha256").read_text())
    refused = ansible.run_playbook(
        "smallcloud.kvm.etcd_restore", inventory=inventory, extra_vars={"etcd_restore_snapshot": str(corrupt)}
    )
    assert refused.rc != 0
    assert str(corrupt) in failure(refused) and "sha256" in failure(refused)
    assert etcdctl(urls[0], "get", "--print-value-only", "/sct/after-backup").stdout.strip() == "x"

    restore = ansible.run_playbook(
        "smallcloud.kvm.etcd_restore",
        inventory=inventory,
        extra_vars={"etcd_restore_snapshot": str(snapshots[0])},
    )
    assert_ok(restore)
    for url in urls:
        keys = etcdctl(url, "get", "--prefix", "--keys-only", "/sct/").stdout.split()
        assert keys == [f"/sct/keep/{i}" for i in range(5)]
    members = json.loads(etcdctl(urls[2], "member", "list", "--write-out=json").stdout)["members"]
    assert sorted(m["name"] for m in members) == ["m1", "m2", "m3"]
    status = json.loads(etcdctl(",".join(urls), "endpoint", "health", "--write-out=json").stdout)
    assert all(entry["health"] for entry in status)
    # The replaced data dirs are kept aside, the restored ones belong to etcd.
    for host in hosts.values():
        data = Path(host["etcd_data_dir"])
        assert list(data.parent.glob("data.pre-restore-*"))
        assert data.stat().st_mode & 0o777 == 0o700


def boot_links(service):
    return sorted(str(link) for link in Path("/etc").glob(f"rc?.d/[SK][0-9][0-9]{service}"))


def test_remove_stops_the_member_and_keeps_its_data_unless_asked(ansible, lab):
    inventory, hosts = lab.inventory({"gone": {}})
    member = hosts["gone"]
    service = member["etcd_service_name"]
    assert_ok(converge(ansible, lab, inventory))
    etcdctl(endpoint(member), "put", "/sct/state", "kept")
    pid = lab.pid(service)
    files = [Path(f"/etc/init.d/{service}"), lab.base / "etc" / f"{service}.conf.yml",
             lab.base / "etc" / f"{service}.etcdctl.env", lab.base / "log" / f"{service}.log"]
    assert pid and all(path.exists() for path in files) and boot_links(service)

    check = ansible.run_playbook("smallcloud.kvm.etcd_remove", inventory=inventory, check=True)
    assert_ok(check)
    assert check.changed_count() > 0
    assert lab.pid(service) == pid and all(path.exists() for path in files)
    assert etcdctl(endpoint(member), "get", "--print-value-only", "/sct/state").stdout.strip() == "kept"

    assert_ok(ansible.run_playbook("smallcloud.kvm.etcd_remove", inventory=inventory))
    assert not [path for path in files if path.exists()]
    assert boot_links(service) == []
    assert lab.pid(service) is None and not Path(f"/proc/{pid}/exe").exists()
    assert etcdctl(endpoint(member), "endpoint", "health", check=False).returncode != 0
    assert Path(member["etcd_data_dir"]).is_dir(), "the data dir goes only with etcd_remove_data"

    again = ansible.run_playbook("smallcloud.kvm.etcd_remove", inventory=inventory)
    assert_ok(again)
    assert again.changed_count() == 0

    purge = ansible.run_playbook("smallcloud.kvm.etcd_remove", inventory=inventory,
                                 extra_vars={"etcd_remove_data": True})
    assert_ok(purge)
    assert purge.changed_count() == 1
    assert not Path(member["etcd_data_dir"]).exists()


def test_molecule_scenario(tmp_path):
    """`molecule test -s etcd` from the repository root: converge, idempotence, verify, destroy."""
    run = molecule_test("etcd", tmp_path / "molecule", timeout=900)
    assert run.rc == 0, run.output[-8000:]
    assert run.passed("idempotence") and run.passed("verify")
    assert not Path("/etc/init.d/smallcloud-molecule-etcd").exists()
    assert not Path("/var/tmp/smallcloud-molecule-etcd").exists()
