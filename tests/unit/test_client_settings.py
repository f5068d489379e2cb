"""Where a module's etcd connection comes from: its options, else the deploy's client file, else loopback."""

import json

import pytest
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.store import DEFAULT_ENDPOINTS, client_settings

pytestmark = pytest.mark.unit

FILE = {"endpoints": ["https://10.0.0.1:2379", "https://10.0.0.2:2379"], "ca_cert": "/etc/smallcloud/pki/ca.crt",
        "cert": "/etc/smallcloud/pki/client.crt", "key": "/etc/smallcloud/pki/client.key"}


def params(path, **given):
    return {"etcd_client_config": str(path), "etcd_endpoints": None, "etcd_ca_cert": None, "etcd_cert": None,
            "etcd_key": None, **given}


def test_without_options_the_client_file_gives_endpoints_and_certificates(tmp_path):
    path = tmp_path / "etcd-client.json"
    path.write_text(json.dumps(FILE))
    assert client_settings(params(path)) == FILE


def test_a_certificate_option_wins_over_the_file_one_by_one(tmp_path):
    path = tmp_path / "etcd-client.json"
    path.write_text(json.dumps(FILE))
    assert client_settings(params(path, etcd_cert="/mine.crt")) == dict(FILE, cert="/mine.crt")


def test_given_endpoints_ignore_the_file_entirely(tmp_path):
    path = tmp_path / "etcd-client.json"
    path.write_text(json.dumps(FILE))
    settings = client_settings(params(path, etcd_endpoints=["http://127.0.0.1:23790"]))
    assert settings == {"endpoints": ["http://127.0.0.1:23790"], "ca_cert": None, "cert": None, "key": None}


def test_without_file_or_options_loopback_etcd(tmp_path):
    assert client_settings(params(tmp_path / "missing.json"))["endpoints"] == DEFAULT_ENDPOINTS


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"endpoints": "https://x:2379"}', '{"endpoint": []}'])
def test_a_file_that_is_not_a_client_file_is_named_in_the_error(tmp_path, content):
    path = tmp_path / "etcd-client.json"
    path.write_text(content)
    with pytest.raises(InvalidInput, match=str(path)):
        client_settings(params(path))
