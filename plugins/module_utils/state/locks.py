# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Locks on etcd leases: the lock key lives as long as its lease, so a killed holder frees it after the TTL."""

import json
import os
import socket
import threading
import time

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput, LockTimeout, StoreError
from ansible_collections.smallcloud.kvm.plugins.module_utils.state.etcd_gateway import b64, unb64

_POLL_MIN = 0.05
_POLL_MAX = 0.5


def holder_id():
    """Who holds a lock, for the operator reading a LockTimeout: ``host:pid``."""
    return "%s:%d" % (socket.gethostname(), os.getpid())


class Lock:
    """An exclusive lock on ``key``, held through an etcd lease of ``ttl`` seconds renewed in the background.

    Use as a context manager (``with store.lock("network/web"):``) or call acquire()/release().
    ``lost`` turns True when a renewal found the lease gone (e.g. the host was paused past the TTL).
    """

    def __init__(self, gateway, key, name, ttl=30, timeout=60):
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise InvalidInput("lock ttl %r is not valid; expected whole seconds >= 1" % (ttl,), ttl=ttl)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise InvalidInput("lock timeout %r is not valid; expected seconds >= 0" % (timeout,), timeout=timeout)
        self._gateway = gateway
        self.key = key
        self.name = name
        self.ttl = ttl
        self.timeout = timeout
        self.lease_id = None
        self.lost = False
        self._stop = threading.Event()
        self._keeper = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        lost = self.lost
        self.release()
        if lost and exc_type is None:
            raise StoreError(
                "lock %s was lost while held: its lease expired before it was renewed" % self.name, lock=self.name
            )
        return False

    @property
    def held(self):
        """True between a successful acquire() and release()."""
        return self.lease_id is not None

    def acquire(self):
        """Wait up to ``timeout`` s for the lock; LockTimeout names the lock and its current holder."""
        if self.held:
            raise StoreError("lock %s is already held by this process" % self.name, lock=self.name)
        deadline = time.monotonic() + self.timeout
        self._grant()
        delay = _POLL_MIN
        try:
            while True:
                holder = self._try_create()
                if holder is None:
                    return self
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LockTimeout(
                        "lock %s not acquired within %s s: held by %s" % (self.name, self.timeout, holder),
                        lock=self.name,
                        holder=holder,
                    )
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, _POLL_MAX)
        except BaseException:
            self.release()
            raise

    def release(self):
        """Give the lock up (idempotent): stop renewing and revoke the lease, which deletes the key."""
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join()
            self._keeper = None
        self._revoke()

    def _grant(self):
        """A fresh lease, renewed from now on so that waiting longer than the TTL does not lose it."""
        answer = self._gateway.call("lease/grant", {"TTL": self.ttl, "ID": 0})
        if answer.get("error") or not answer.get("ID"):
            raise StoreError("etcd granted no lease for lock %s: %s" % (self.name, answer.get("error")), lock=self.name)
        self.lease_id = answer["ID"]
        self.lost = False
        self._stop.clear()
        # Its own sessions: the keep-alive thread must not share HTTP connections with the caller's thread.
        self._keeper = threading.Thread(
            target=self._keep_alive, args=(self._gateway.clone(),), name="lock-" + self.name
        )
        self._keeper.daemon = True
        self._keeper.start()

    def _try_create(self):
        """Create the lock key on our lease if absent; None on success, else the current holder."""
        record = json.dumps({"holder": holder_id(), "time": time.time()}, sort_keys=True)
        key = b64(self.key)
        answer = self._gateway.call(
            "kv/txn",
            {
                "compare": [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
                "success": [{"request_put": {"key": key, "value": b64(record), "lease": self.lease_id}}],
                "failure": [{"request_range": {"key": key}}],
            },
        )
        if answer.get("succeeded"):
            return None
        kvs = answer["responses"][0]["response_range"].get("kvs") or []
        if not kvs:
            return "nobody (freed just now)"
        try:
            return json.loads(unb64(kvs[0].get("value")).decode("utf-8")).get("holder", "unknown")
        except (ValueError, AttributeError):
            return "unknown"

    def _keep_alive(self, gateway):
        """Renew the lease every third of its TTL until released; mark the lock lost if the lease is gone."""
        interval = max(self.ttl / 3.0, 0.2)
        lease_id = self.lease_id
        while not self._stop.wait(interval):
            try:
                answer = gateway.call("lease/keepalive", {"ID": lease_id})
            except StoreError:
                continue  # etcd briefly unreachable: retry; the TTL is the real deadline
            if int(answer.get("result", {}).get("TTL", 0) or 0) <= 0:
                self.lost = True
                return

    def _revoke(self):
        """Revoke the lease if there is one; the key goes with it."""
        lease_id, self.lease_id = self.lease_id, None
        if lease_id is None:
            return
        try:
            self._gateway.call("lease/revoke", {"ID": lease_id})
        except StoreError:
            pass  # etcd unreachable: the lease, and so the lock, expires by itself after the TTL
