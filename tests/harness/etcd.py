"""Real etcd servers (Debian's etcd-server binary) on free loopback ports."""

import json
import shutil
import subprocess
import urllib.request
import uuid
from pathlib import Path

from harness.ports import free_port, wait_for

ETCD_BINARY = shutil.which("etcd") or "/usr/bin/etcd"


class EtcdMember:
    """One etcd process with its own data dir; a member of ``cluster`` (name -> peer URL)."""

    def __init__(self, name, workdir):
        self.name = name
        self.data_dir = Path(workdir) / f"{name}.etcd"
        self.log_path = Path(workdir) / f"{name}.log"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process = None

    @property
    def client_url(self):
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self):
        return f"http://127.0.0.1:{self.peer_port}"

    def argv(self, initial_cluster, token):
        return [
            ETCD_BINARY,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-token", token,
            "--initial-cluster-state", "new",
        ]

    def start(self, initial_cluster, token):
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv(initial_cluster, token), stdout=log, stderr=subprocess.STDOUT)

    def healthy(self):
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=2) as response:
                return json.load(response).get("health") == "true"
        except (OSError, ValueError):
            return False

    def stop(self):
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines=20):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class EtcdCluster:
    """``size`` etcd members on loopback forming one cluster; stop() ends them all."""

    def __init__(self, workdir, size=1):
        Path(workdir).mkdir(parents=True, exist_ok=True)
        token = f"smallcloud-test-{uuid.uuid4().hex[:8]}"
        self.members = [EtcdMember(f"m{i}", workdir) for i in range(size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.start(initial, token)
        try:
            for member in self.members:
                wait_for(member.healthy, 60, what=f"etcd member {member.name} healthy")
        except TimeoutError as error:
            logs = "\n".join(member.log_tail() for member in self.members)
            self.stop()
            raise RuntimeError(f"{error}\n{logs}") from error

    @property
    def endpoints(self):
        return [member.client_url for member in self.members]

    def stop(self):
        for member in self.members:
            member.stop()


def etcd_request(endpoint, path, body):
    """POST one request to etcd's JSON gateway (/v3/...) and return the decoded answer."""
    request = urllib.request.Request(
        endpoint + "/v3/" + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def b64(text):
    import base64

    return base64.b64encode(text.encode()).decode()


def count_keys(endpoint, prefix):
    """How many keys live under ``prefix``."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    answer = etcd_request(endpoint, "kv/range", {"key": b64(prefix), "range_end": b64(end), "count_only": True})
    return int(answer.get("count", 0))


def delete_prefix(endpoint, prefix):
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    etcd_request(endpoint, "kv/deleterange", {"key": b64(prefix), "range_end": b64(end)})
