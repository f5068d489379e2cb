"""Fixtures every test tier shares. Each starts real things and always cleans them up."""

import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # tests/harness/paths.py has it for test modules
# The checkout is linked as ansible_collections/smallcloud/kvm by scripts/bootstrap, so tests
# import module_utils by the same names the modules use.
sys.path.insert(0, str(ROOT / ".cache" / "collections"))

from harness import ansible as ansible_harness  # noqa: E402
from harness.etcd import EtcdCluster, count_keys, delete_prefix  # noqa: E402
from harness.httpserver import HttpServer  # noqa: E402
from harness.libvirtd import Libvirtd, kvm_device_for_qemu  # noqa: E402
from harness.netns import NetnsFactory  # noqa: E402


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """One real single-member etcd for the session (Debian's etcd binary, temporary data dir)."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1)
    yield cluster
    cluster.stop()


class EtcdScope:
    """A private key prefix on the session's etcd; connection options ready for a module."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.endpoints = cluster.endpoints
        self.prefix = f"/smallcloud-test/{uuid.uuid4().hex[:12]}/v1"

    @property
    def module_args(self):
        return {"etcd_endpoints": self.endpoints, "etcd_prefix": self.prefix}

    def key_count(self):
        return count_keys(self.endpoints[0], self.prefix + "/")


@pytest.fixture
def etcd(etcd_server):
    """A fresh, empty key prefix on the session etcd; removed afterwards."""
    scope = EtcdScope(etcd_server)
    yield scope
    delete_prefix(etcd_server.endpoints[0], scope.prefix + "/")


@pytest.fixture
def etcd_cluster(tmp_path):
    """Factory: ``etcd_cluster(3)`` starts a 3-member loopback cluster, stopped afterwards."""
    clusters = []

    def make(size=3):
        cluster = EtcdCluster(tmp_path / f"cluster{len(clusters)}", size=size)
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.stop()


@pytest.fixture(scope="session")
def libvirtd():
    """A libvirtd answering on qemu:///system; stopped afterwards only if this fixture started it."""
    daemon = Libvirtd()
    yield daemon
    daemon.stop()


@pytest.fixture
def kvm_device(libvirtd):
    """/dev/kvm usable by libvirt's QEMU user, as on a deployed hypervisor; put back afterwards."""
    with kvm_device_for_qemu():
        yield


@pytest.fixture
def netns():
    """Factory of scratch network namespaces: ``netns.create()``; all deleted afterwards."""
    factory = NetnsFactory()
    yield factory
    factory.cleanup()


@pytest.fixture
def http_server():
    """Factory: ``http_server(directory)`` serves it on a loopback port; stopped afterwards."""
    servers = []

    def serve(directory, handler=None):
        server = HttpServer(directory) if handler is None else HttpServer(directory, handler)
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.stop()


@pytest.fixture
def ansible():
    """The Ansible driver: ``ansible.run_module(name, args, check=, diff=)``, ``run_playbook``, ``run_tasks``."""
    return ansible_harness
