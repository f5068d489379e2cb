# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Typed errors. Lower layers raise these; only a module's main() turns one into fail_json."""


class SmallcloudError(Exception):
    """Base of every error the collection raises on purpose.

    ``msg`` is the one line an operator reads; ``details`` are extra keys for the task result
    (the offending value, what is allowed, tool output).
    """

    def __init__(self, msg, **details):
        super().__init__(msg)
        self.msg = msg
        self.details = details


class InvalidInput(SmallcloudError):
    """An option value that cannot be used; raised before anything is changed."""


class MissingLibrary(SmallcloudError):
    """A Python library the module needs is not importable on the managed host."""


class HostError(SmallcloudError):
    """The host refused or lacks something (sysfs file, device, interface)."""


class CommandFailed(HostError):
    """An external command exited non-zero; carries argv, rc, stdout and stderr."""


class StoreError(SmallcloudError):
    """The state store (etcd) failed."""


class StoreUnreachable(StoreError):
    """No etcd endpoint answered; ``endpoints`` names every one tried."""


class StoreAuthError(StoreError):
    """etcd refused the credentials or the TLS handshake."""


class PoolExhausted(StoreError):
    """An allocator found no free value; ``pool`` names the pool."""


class Conflict(StoreError):
    """A record or value is taken by someone else (VNI, fixed IP, name)."""


class ChangedMeanwhile(Conflict):
    """A record changed between a run's look and its lock: another run did the same work meanwhile."""


class LockTimeout(StoreError):
    """A lock could not be acquired in time; ``lock`` names it."""
