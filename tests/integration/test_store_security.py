"""The store against etcd with authentication and with client-certificate TLS (each its own etcd)."""

import json
import ssl
import subprocess
import urllib.request

import pytest
from harness.ansible import VENV_BIN, ansible_env, local_inventory
from harness.etcd import ETCD_BINARY, EtcdCluster, EtcdMember
from harness.ports import wait_for

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import StoreAuthError
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import Store

pytestmark = pytest.mark.integration

PASSWORD = "pw-Xq93-secret"


# authentication ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory):
    """A single etcd with user root (PASSWORD) and authentication enabled."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd-auth"), size=1)
    try:
        for argv in (["user", "add", "root:" + PASSWORD], ["auth", "enable"]):
            subprocess.run(["etcdctl", "--endpoints", cluster.endpoints[0], *argv], check=True, capture_output=True)
        yield cluster
    finally:
        cluster.stop()


def _auth_store(cluster, **params):
    """A Store on the auth etcd with ``params`` as the connection options."""
    return Store.from_params({"etcd_endpoints": cluster.endpoints, "etcd_prefix": "/auth-test/v1", **params})


def test_user_and_password_are_used(auth_etcd):
    store = _auth_store(auth_etcd, etcd_user="root", etcd_password=PASSWORD)
    store.put("networks/a", {"ok": True})
    assert store.get("networks/a") == {"ok": True}
    vni = store.allocate_vni("network/a")
    with store.lock("network/a", ttl=2, timeout=2):
        assert store.release_vni(vni)
    assert store.delete_prefix("networks") == 1
    assert store.keys("") == []


def test_expired_token_is_renewed(auth_etcd):
    store = _auth_store(auth_etcd, etcd_user="root", etcd_password=PASSWORD)
    assert store.get("networks/none") is None
    # What etcd answers once a token expired (simple tokens live 5 minutes): renewed, request repeated.
    store.gateway._clients[store.gateway._current].session.headers["Authorization"] = "expired.1"
    assert store.get("networks/none") is None


@pytest.mark.parametrize(
    ("params", "said"),
    [
        ({"etcd_user": "root", "etcd_password": "wrong"}, "authentication failed"),
        ({"etcd_user": "nobody", "etcd_password": PASSWORD}, "authentication failed"),
        ({}, "user name is empty"),
    ],
)
def test_refused_credentials_are_a_typed_error_without_the_password(auth_etcd, params, said):
    with pytest.raises(StoreAuthError) as caught:
        _auth_store(auth_etcd, **params).get("networks/a")
    assert said in caught.value.msg and auth_etcd.endpoints[0] in caught.value.msg
    assert PASSWORD not in caught.value.msg + repr(caught.value.details)


def _run_tasks_verbosely(tasks, tmp_path, diff=True):
    """``ansible-playbook -vvv --diff`` of ``tasks`` on localhost; everything it printed."""
    play = tmp_path / "play.json"
    play.write_text(json.dumps([{"hosts": "localhost", "gather_facts": False, "tasks": tasks}]))
    env = dict(ansible_env(), ANSIBLE_STDOUT_CALLBACK="default")
    run = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(local_inventory(tmp_path)), "-vvv", str(play)]
                         + (["--diff"] if diff else []), capture_output=True, text=True, env=env, timeout=300,
                         check=False)
    return run.stdout + run.stderr


def test_the_etcd_password_appears_in_no_output_diff_error_or_record(auth_etcd, tmp_path):
    """Issue 15: every result and log line of runs that succeed, preview, diff and fail (wrong password, etcd
    down) is free of the password, and so is every key and value the modules wrote into etcd."""
    connection = {"etcd_endpoints": auth_etcd.endpoints, "etcd_prefix": "/nolog-test/v1", "etcd_user": "root",
                  "etcd_password": PASSWORD}
    store = Store.from_params(connection)
    store.put("hosts/hv1", {"name": "hv1", "state": "active", "capacity": {"vcpus": 2, "memory_mb": 2048,
                                                                           "disk_gb": 10}})
    placement = {"smallcloud.kvm.placement": dict(connection, instances=[{"name": "nolog", "memory": 256}])}
    wrong = {"smallcloud.kvm.placement": dict(connection, etcd_password=PASSWORD[::-1],
                                              instances=[{"name": "nolog", "memory": 256}]),
             "ignore_errors": True}
    down = {"smallcloud.kvm.instance_move": dict(connection, step="list", from_host="hv1",
                                                 etcd_endpoints=["http://127.0.0.1:9"]), "ignore_errors": True}
    listed = {"smallcloud.kvm.instance_move": dict(connection, step="list", from_host="hv1")}
    preview = _run_tasks_verbosely([dict(placement, check_mode=True)], tmp_path)
    output = preview + _run_tasks_verbosely([placement, listed, wrong, down], tmp_path)
    assert "place instance nolog on hv1" in output and "authentication failed" in output
    assert "StoreUnreachable" in output  # every kind of run happened
    assert PASSWORD not in output and PASSWORD[::-1] not in output
    written = store.list("")
    assert written and PASSWORD not in json.dumps(written)
    store.delete_prefix("hosts")
    store.delete_prefix("placement")


# TLS --------------------------------------------------------------------------------------------------


def _openssl(*argv, cwd):
    subprocess.run(["openssl", *argv], cwd=cwd, check=True, capture_output=True)


EC_KEY = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"


def _make_ca(directory, name):
    """A throwaway CA: ``name``.pem / ``name``.key in ``directory``."""
    _openssl(*f"req -x509 {EC_KEY} -days 2 -keyout {name}.key -out {name}.pem -subj /CN={name}".split(), cwd=directory)


def _make_cert(directory, ca, name, usage):
    """A certificate ``name``.pem / ``name``.key for 127.0.0.1 signed by ``ca``."""
    (directory / (name + ".ext")).write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=%s\n" % usage)
    _openssl(*f"req {EC_KEY} -keyout {name}.key -out {name}.csr -subj /CN={name}".split(), cwd=directory)
    sign = f"x509 -req -in {name}.csr -CA {ca}.pem -CAkey {ca}.key -CAcreateserial -days 2 -out {name}.pem"
    _openssl(*sign.split(), "-extfile", name + ".ext", cwd=directory)


class TlsMember(EtcdMember):
    """An etcd member serving clients over https and requiring a client certificate signed by its CA."""

    def __init__(self, workdir, pki):
        super().__init__("tls0", workdir)
        self.pki = pki

    @property
    def client_url(self):
        return f"https://127.0.0.1:{self.client_port}"

    def argv(self, initial_cluster, token):
        pki = self.pki
        tls = f"--cert-file {pki}/server.pem --key-file {pki}/server.key --trusted-ca-file {pki}/ca.pem"
        tls += " --client-cert-auth"
        return super().argv(initial_cluster, token) + tls.split()

    def healthy(self):
        context = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        context.load_cert_chain(str(self.pki / "client.pem"), str(self.pki / "client.key"))
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=2, context=context) as response:
                return b'"health":"true"' in response.read()
        except OSError:
            return False


@pytest.fixture(scope="module")
def tls_etcd(tmp_path_factory):
    """``(endpoint, pki directory)`` of an etcd that wants TLS with client certificates."""
    pki = tmp_path_factory.mktemp("pki")
    _make_ca(pki, "ca")
    _make_ca(pki, "other-ca")
    _make_cert(pki, "ca", "server", "serverAuth,clientAuth")  # etcd's gateway dials itself with it
    _make_cert(pki, "ca", "client", "clientAuth")
    _make_cert(pki, "other-ca", "stranger", "clientAuth")
    member = TlsMember(tmp_path_factory.mktemp("etcd-tls"), pki)
    assert ETCD_BINARY
    member.start(f"{member.name}={member.peer_url}", "smallcloud-tls-test")
    try:
        wait_for(member.healthy, 60, what="TLS etcd healthy")
        yield member.client_url, pki
    finally:
        member.stop()


def _tls_store(endpoint, pki, ca="ca", cert="client"):
    """A Store over TLS with the given CA and client certificate names (None: leave out)."""
    params = {"etcd_endpoints": [endpoint], "etcd_prefix": "/tls-test/v1", "etcd_ca_cert": str(pki / (ca + ".pem"))}
    if cert:
        params.update(etcd_cert=str(pki / (cert + ".pem")), etcd_key=str(pki / (cert + ".key")))
    return Store.from_params(params)


def test_client_certificate_tls(tls_etcd):
    endpoint, pki = tls_etcd
    store = _tls_store(endpoint, pki)
    store.put("hosts/h1", {"tls": True})
    assert store.get("hosts/h1") == {"tls": True}
    assert store.delete_prefix("hosts") == 1
    # Without a scheme, an endpoint with TLS options is https.
    bare = _tls_store(endpoint.replace("https://", ""), pki)
    assert bare.gateway.endpoint.url == endpoint and bare.get("hosts/h1") is None


@pytest.mark.parametrize(("ca", "cert"), [("other-ca", "client"), ("ca", "stranger"), ("ca", None)])
def test_tls_failures_are_auth_errors_naming_the_endpoint(tls_etcd, ca, cert):
    endpoint, pki = tls_etcd
    with pytest.raises(StoreAuthError) as caught:
        _tls_store(endpoint, pki, ca=ca, cert=cert).get("hosts/h1")
    assert "TLS" in caught.value.msg and endpoint in caught.value.msg


def test_inventory_plugin_over_tls_reads_the_cloud_and_a_wrong_ca_is_a_clear_error(tls_etcd, tmp_path):
    """The inventory plugin speaks the modules' TLS options; a CA that did not sign etcd's certificate is
    refused naming the endpoint, and no inventory comes out of it."""
    endpoint, pki = tls_etcd
    store = _tls_store(endpoint, pki)
    store.put("instances/tls-vm", {"name": "tls-vm", "state": "running", "host": "hv", "interfaces": [
        {"network": "n", "mac": "02:73:63:00:20:01", "ip": "10.30.0.5"}], "metadata": {"role": "db"}})
    try:
        def inventory(ca):
            source = tmp_path / ("%s.smallcloud.yml" % ca)
            source.write_text(json.dumps({
                "plugin": "smallcloud.kvm.cloud", "etcd_endpoints": [endpoint], "etcd_prefix": "/tls-test/v1",
                "etcd_ca_cert": str(pki / (ca + ".pem")), "etcd_cert": str(pki / "client.pem"),
                "etcd_key": str(pki / "client.key"), "metadata": {"role": "db"}}))
            return subprocess.run([str(VENV_BIN / "ansible-inventory"), "-i", str(source), "--list"],
                                  capture_output=True, text=True, timeout=120, check=False,
                                  env=ansible_env({"ANSIBLE_INVENTORY_UNPARSED_FAILED": "1"}))

        good = inventory("ca")
        assert good.returncode == 0, good.stderr
        assert "tls-vm" in json.loads(good.stdout)["_meta"]["hostvars"]
        wrong = inventory("other-ca")
        assert wrong.returncode != 0
        output = wrong.stdout + wrong.stderr
        assert "smallcloud.kvm.cloud" in output and endpoint in output and "TLS" in output, output
    finally:
        store.delete_prefix("instances")
