"""An in-memory stand-in for the few ``Store`` methods the planners call, for unit tests of planning.

Not a model of etcd: no revisions, leases or transactions. Allocations are recorded as
``{"owner": OWNER}`` at the same paths the real Store uses, so ``records.holder`` reads them the same way,
and the lowest free address is handed out, so tests can name it.
"""

import contextlib
import copy

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import Conflict, PoolExhausted
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.allocators import AddressPool, pool_key


class MemoryStore:
    """``{path: value}`` with get/list/put/create/delete, a no-op lock, and floating-IP allocation."""

    def __init__(self, data=None):
        self.data = copy.deepcopy(dict(data or {}))
        self.locked = []  # names of the locks taken, in order

    def get(self, path):
        return copy.deepcopy(self.data.get(path.strip("/")))

    def list(self, path_prefix):
        folder = path_prefix.strip("/") + "/"
        return {key[len(folder):]: copy.deepcopy(value) for key, value in self.data.items() if key.startswith(folder)}

    def put(self, path, value):
        self.data[path.strip("/")] = copy.deepcopy(value)

    def create(self, path, value):
        if path.strip("/") in self.data:
            return False
        self.put(path, value)
        return True

    def delete(self, path, mod_revision=None):
        return self.data.pop(path.strip("/"), None) is not None

    @contextlib.contextmanager
    def lock(self, name, ttl=30, timeout=60):
        self.locked.append(name)
        yield

    def held_by(self, folder_path, owner):
        return sorted(key for key, value in self.list(folder_path).items()
                      if "/" not in key and isinstance(value, dict) and value.get("owner") == owner)

    def allocate_floating(self, pool_cidr, owner, requested=None):
        pool = AddressPool(pool_cidr, what="floating pool")
        folder = "floating/%s/" % pool_key(pool_cidr)
        if requested is not None:
            address = pool.check(requested)
            holder = (self.data.get(folder + address) or {}).get("owner")
            if holder not in (None, owner):
                raise Conflict("address %s is taken by %s" % (address, holder), owner=holder)
            self.data[folder + address] = {"owner": owner}
            return address
        for offset in range(pool.size):
            address = pool.address(offset)
            if folder + address not in self.data:
                self.data[folder + address] = {"owner": owner}
                return address
        raise PoolExhausted("pool %s is exhausted" % pool_cidr, pool=pool_cidr)

    def release_floating(self, pool_cidr, address, owner=None):
        return self.data.pop("floating/%s/%s" % (pool_key(pool_cidr), address), None) is not None
