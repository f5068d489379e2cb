"""Pure logic of the state store: endpoints, keys, address arithmetic, MAC format, picking free values."""

import ipaddress
import random
import re
import subprocess
import sys

import pytest
from harness.paths import ROOT

from ansible_collections.smallcloud.kvm.plugins.module_utils.state import etcd_gateway
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.allocators import (
    MAC_PREFIX,
    AddressPool,
    check_vni,
    normalize_ipv4,
    normalize_mac,
    pick_free,
    pool_key,
    random_mac,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import (
    InvalidInput,
    MissingLibrary,
    StoreUnreachable,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.etcd_gateway import (
    EtcdGateway,
    _short_reason,
    parse_endpoint,
    parse_endpoints,
    range_end,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import (
    Store,
    normalize_path,
    normalize_prefix,
    path_join,
    shared_gateways,
    utc_iso,
)

pytestmark = pytest.mark.unit


# endpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tls", "url"),
    [
        ("http://127.0.0.1:2379", False, "http://127.0.0.1:2379"),
        ("https://etcd1.example:4001", False, "https://etcd1.example:4001"),
        ("127.0.0.1", False, "http://127.0.0.1:2379"),
        ("etcd1:2380", True, "https://etcd1:2380"),
        ("[::1]:2379", False, "http://[::1]:2379"),
        ("http://[fd00::5]", False, "http://[fd00::5]:2379"),
        (" http://10.0.0.1:2379/ ", False, "http://10.0.0.1:2379"),
    ],
)
def test_endpoint_parsing(text, tls, url):
    assert parse_endpoint(text, tls=tls).url == url


@pytest.mark.parametrize("text", ["", "ftp://etcd:2379", "http://etcd:99999", "http://etcd:2379/v3", "http://", None])
def test_bad_endpoint_names_the_value_and_the_allowed_form(text):
    with pytest.raises(InvalidInput) as caught:
        parse_endpoint(text)
    assert repr(text) in caught.value.msg
    assert "http(s)://HOST[:PORT]" in caught.value.msg


def test_endpoints_keep_order_and_drop_duplicates():
    endpoints = parse_endpoints(["http://b:1", "a", "http://b:1", "http://a:2379"])
    assert [endpoint.url for endpoint in endpoints] == ["http://b:1", "http://a:2379"]
    assert [e.url for e in parse_endpoints("a:1,b:2")] == ["http://a:1", "http://b:2"]
    with pytest.raises(InvalidInput, match="etcd_endpoints is empty"):
        parse_endpoints([])


def test_range_end_covers_exactly_the_prefix():
    assert range_end("/p/ipam/") == b"/p/ipam0"
    assert range_end(b"a\xff\xff") == b"b"
    assert range_end(b"\xff") == b"\0"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: /v3/kv/range (Caused by "
            "NewConnectionError('<urllib3.connection.HTTPConnection object at 0x7f>: Failed to establish a new "
            "connection: [Errno 111] Connection refused'))",
            "[Errno 111] Connection refused",
        ),
        ("HTTPConnectionPool(host='h', port=1): Read timed out. (read timeout=10)", "Read timed out"),
        ("", "no answer"),
    ],
)
def test_connection_errors_are_shortened_to_their_reason(text, reason):
    assert _short_reason(text) == reason


# gateway construction: no I/O, clear errors ----------------------------------------------------


def test_store_from_params_connects_lazily():
    store = Store.from_params({"etcd_endpoints": ["http://127.0.0.1:9"], "etcd_prefix": "/cloud/v1/"})
    assert store.prefix == "/cloud/v1"
    assert store.key("networks/web") == "/cloud/v1/networks/web"
    assert store.folder("ipam/web/") == "/cloud/v1/ipam/web/"
    assert store.folder("") == "/cloud/v1/"
    assert store.gateway._clients == {}


def test_stores_share_a_gateway_only_inside_shared_gateways():
    """cloud_plan runs several runners in one process: one HTTP session (one TLS handshake) per endpoint for all."""
    same = {"etcd_endpoints": ["http://127.0.0.1:9"], "etcd_prefix": "/cloud/v1"}
    assert Store.from_params(same).gateway is not Store.from_params(same).gateway
    with shared_gateways():
        first, second = Store.from_params(same), Store.from_params(dict(same, etcd_lock_ttl=5))
        other = Store.from_params(dict(same, etcd_timeout=3))
        assert first.gateway is second.gateway and second.lock_ttl == 5
        assert other.gateway is not first.gateway and other.gateway.timeout == 3
    assert Store.from_params(same).gateway is not first.gateway


@pytest.mark.parametrize(
    ("params", "named"),
    [
        ({"etcd_key": "/etc/hostname"}, "etcd_key"),
        ({"etcd_user": "root"}, "etcd_user"),
        ({"etcd_ca_cert": "/nonexistent/ca.pem"}, "etcd_ca_cert"),
        ({"etcd_timeout": -1}, "etcd_timeout"),
        ({"etcd_lock_ttl": 0}, "etcd_lock_ttl 0"),
        ({"etcd_lock_ttl": -5}, "etcd_lock_ttl -5"),
        ({"etcd_prefix": "smallcloud"}, "etcd_prefix"),
        ({"etcd_endpoints": ["gopher://x"]}, "gopher://x"),
    ],
)
def test_bad_connection_options_name_the_option(params, named):
    with pytest.raises(InvalidInput) as caught:
        Store.from_params(params)
    assert named in caught.value.msg


def test_locks_default_to_the_operators_lock_ttl():
    """etcd_lock_ttl is how long a killed run's locks outlive it: every lock that names no TTL of its own."""
    endpoints = {"etcd_endpoints": ["http://127.0.0.1:9"]}
    assert Store.from_params(endpoints).lock("network/web").ttl == 60
    store = Store.from_params(dict(endpoints, etcd_lock_ttl=3))
    assert store.lock("network/web").ttl == 3
    assert store.lock("host/h1", ttl=30).ttl == 30
    assert store.gateway._clients == {}  # making a lock is no request


def test_password_never_appears_in_errors():
    with pytest.raises(InvalidInput) as caught:
        Store.from_params({"etcd_password": "s3cret-pw"})
    assert "s3cret-pw" not in caught.value.msg + repr(caught.value.details)


def test_unreachable_names_every_endpoint_tried():
    gateway = EtcdGateway(["http://127.0.0.1:1", "http://127.0.0.1:9"], timeout=2)
    with pytest.raises(StoreUnreachable) as caught:
        gateway.call("kv/range", {"key": "eA=="})
    assert caught.value.details["endpoints"] == ["http://127.0.0.1:1", "http://127.0.0.1:9"]
    assert "http://127.0.0.1:1: [Errno 111] Connection refused" in caught.value.msg
    assert "http://127.0.0.1:9" in caught.value.msg


def test_missing_etcd3gw_is_a_typed_error(monkeypatch):
    monkeypatch.setattr(etcd_gateway, "HAS_ETCD3GW", False)
    with pytest.raises(MissingLibrary, match="etcd3gw"):
        Store.from_params({})


def test_module_utils_import_without_etcd3gw():
    code = (
        "import sys; sys.modules['etcd3gw'] = None; sys.path.insert(0, %r)\n"
        "from ansible_collections.smallcloud.kvm.plugins.module_utils.state import store, etcd_gateway\n"
        "assert not etcd_gateway.HAS_ETCD3GW\n"
    ) % str(ROOT / ".cache" / "collections")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


# key paths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "normal"),
    [("networks/web", "networks/web"), ("/networks/web/", "networks/web"), ("ipam/n1/10.0.0.2", "ipam/n1/10.0.0.2")],
)
def test_paths_are_normalised(path, normal):
    assert normalize_path(path) == normal


@pytest.mark.parametrize("path", ["", "/", "a//b", "a/../b", "./a", 5])
def test_bad_paths_are_refused(path):
    with pytest.raises(InvalidInput):
        normalize_path(path)


def test_path_join_refuses_a_slash_inside_a_name():
    assert path_join("ipam", "web", 42) == "ipam/web/42"
    with pytest.raises(InvalidInput, match="'web/../x'"):
        path_join("ipam", "web/../x")
    with pytest.raises(InvalidInput):
        path_join("events", "")


@pytest.mark.parametrize(("prefix", "normal"), [("/smallcloud/v1", "/smallcloud/v1"), ("/a/b/", "/a/b")])
def test_prefix_normalised(prefix, normal):
    assert normalize_prefix(prefix) == normal


@pytest.mark.parametrize("prefix", ["", "/", "smallcloud/v1", "/a//b"])
def test_bad_prefix_refused(prefix):
    with pytest.raises(InvalidInput, match="etcd_prefix"):
        normalize_prefix(prefix)


def test_utc_iso():
    assert utc_iso(0.000006) == "1970-01-01T00:00:00.000006Z"


# address arithmetic ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cidr", "size", "first", "last"),
    [
        ("10.0.0.0/24", 253, "10.0.0.2", "10.0.0.254"),
        ("192.168.8.0/30", 1, "192.168.8.2", "192.168.8.2"),
        ("172.16.0.0/12", 2**20 - 3, "172.16.0.2", "172.31.255.254"),
    ],
)
def test_pool_excludes_network_gateway_and_broadcast(cidr, size, first, last):
    pool = AddressPool(cidr)
    assert pool.size == size
    assert pool.address(0) == first
    assert pool.address(size - 1) == last
    network = ipaddress.IPv4Network(cidr)
    for excluded in (network.network_address, network.network_address + 1, network.broadcast_address):
        assert pool.offset(str(excluded)) is None


@pytest.mark.parametrize("cidr", ["10.0.0.5/24", "10.0.0.0/31", "10.0.0.0/32", "fd00::/64", "10.0.0.0", "x", None])
def test_bad_cidr_names_the_value(cidr):
    with pytest.raises(InvalidInput) as caught:
        AddressPool(cidr)
    assert repr(cidr) in caught.value.msg or str(cidr) in caught.value.msg
    assert "CIDR" in caught.value.msg


@pytest.mark.parametrize("address", ["10.0.0.0", "10.0.0.1", "10.0.0.255", "10.0.1.7", "bogus"])
def test_address_outside_the_assignable_range_is_refused(address):
    with pytest.raises(InvalidInput) as caught:
        AddressPool("10.0.0.0/24").check(address)
    assert "10.0.0.2..10.0.0.254" in caught.value.msg
    assert "gateway 10.0.0.1" in caught.value.msg


def test_pool_offsets_ignore_strays():
    pool = AddressPool("10.0.0.0/29")
    assert pool.offsets(["10.0.0.2", "10.0.0.6", "10.0.0.7", "10.9.9.9", "junk"]) == {0, 4}
    assert pool.check(" 10.0.0.3 ") == "10.0.0.3"
    assert pool_key("10.0.0.0/29") == "10.0.0.0_29"
    assert normalize_ipv4(" 10.0.0.3") == "10.0.0.3"
    with pytest.raises(InvalidInput):
        normalize_ipv4("10.0.0.300")


# picking free values ----------------------------------------------------------------------------


def test_pick_free_finds_the_last_free_offset_and_reports_full():
    rng = random.Random(7)
    assert pick_free(5, {0, 1, 2, 4}, rng) == 3
    assert pick_free(5, {0, 1, 2, 3, 4}, rng) is None
    assert pick_free(1, set(), rng) == 0


def test_pick_free_never_returns_a_taken_offset():
    rng = random.Random(1)
    taken = set(range(0, 1000, 2))
    picks = {pick_free(1000, taken, rng) for _attempt in range(200)}
    assert picks and not picks & taken


def test_pick_free_is_cheap_in_a_huge_sparse_space():
    assert 0 <= pick_free(2**24, {1, 2, 3}, random.Random(3)) < 2**24


# VNIs and MACs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("vni", "number"), [(1, 1), ("42", 42), (16777215, 16777215)])
def test_vni_range(vni, number):
    assert check_vni(vni) == number


@pytest.mark.parametrize("vni", [0, 16777216, -5, "abc", True, 4.5, None])
def test_bad_vni_names_the_value_and_range(vni):
    with pytest.raises(InvalidInput) as caught:
        check_vni(vni)
    assert "1..16777215" in caught.value.msg and repr(vni) in caught.value.msg


def test_random_mac_is_local_unicast_under_the_prefix():
    for _attempt in range(50):
        mac = random_mac()
        assert re.fullmatch(r"02:73:63(:[0-9a-f]{2}){3}", mac)
        first = int(mac[:2], 16)
        assert first & 0x02 and not first & 0x01  # locally administered, unicast
    assert MAC_PREFIX == "02:73:63"


@pytest.mark.parametrize(
    ("mac", "normal"),
    [
        ("AA:BB:CC:00:11:22", "aa:bb:cc:00:11:22"),
        ("02-73-63-0a-0b-0c", "02:73:63:0a:0b:0c"),
        ("525400abcdef", "52:54:00:ab:cd:ef"),
    ],
)
def test_mac_normalised(mac, normal):
    assert normalize_mac(mac) == normal


@pytest.mark.parametrize("mac", ["01:00:5e:00:00:01", "aa:bb:cc:dd:ee", "aa:bb-cc:dd:ee:ff", "zz:bb:cc:dd:ee:ff", 5])
def test_bad_mac_refused(mac):
    with pytest.raises(InvalidInput) as caught:
        normalize_mac(mac)
    assert repr(mac) in caught.value.msg
