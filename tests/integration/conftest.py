"""Fixtures of the integration tier."""

import pytest
from harness.instances import instance_world


@pytest.fixture
def cloud(etcd, kvm_device):
    """Scratch dir with a base image, a bridge, a network record (harness.instances); removed afterwards."""
    with instance_world(etcd) as world:
        yield world
