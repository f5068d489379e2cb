# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The libvirt connection: opened with an error naming the URI, and libvirt's errors turned into ours."""

import contextlib
import time

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import HostError, MissingLibrary

try:
    import libvirt

    HAS_LIBVIRT = True
except ImportError:  # pragma: no cover - depends on the managed host
    libvirt = None
    HAS_LIBVIRT = False

REOPEN_WAIT = 30  # seconds to wait for a restarted libvirtd (it starts in a few)
UNDEFINE_FLAGS = ("VIR_DOMAIN_UNDEFINE_MANAGED_SAVE", "VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA",
                  "VIR_DOMAIN_UNDEFINE_NVRAM", "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA")


def open_libvirt(uri):
    """A libvirt connection to ``uri``; HostError naming it when libvirtd does not answer."""
    if not HAS_LIBVIRT:
        raise MissingLibrary("the libvirt Python bindings are required on the managed host (Debian: python3-libvirt)",
                             library="libvirt")
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as error:
        raise HostError("cannot connect to libvirt at %s (uri: a libvirt URI such as qemu:///system): %s"
                        % (uri, error), uri=uri) from error


def reopen_libvirt(uri, timeout=REOPEN_WAIT):
    """A new connection to ``uri``, waiting up to ``timeout`` s for a libvirtd that restarted to answer again."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return open_libvirt(uri)
        except HostError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


@contextlib.contextmanager
def host_errors(name):
    """Turn a libvirt or file system error while changing instance ``name`` into HostError naming it."""
    try:
        yield
    except OSError as error:
        raise HostError("instance %s: %s" % (name, error), name=name, path=getattr(error, "filename", None)) from error
    except Exception as error:
        if HAS_LIBVIRT and isinstance(error, libvirt.libvirtError):
            raise HostError("instance %s: libvirt refused: %s" % (name, error), name=name) from error
        raise


def wait_stopped(domain, deadline):
    """Wait until ``domain`` is off or ``deadline`` (time.time()) passed, then force it off."""
    while time.time() < deadline and domain.isActive():
        time.sleep(0.2)
    if domain.isActive():
        try:
            domain.destroy()
        except libvirt.libvirtError:
            if domain.isActive():
                raise


def undefine_flags():
    """Flags that let undefine succeed with managed save, snapshots, NVRAM or checkpoints present."""
    flags = 0
    for name in UNDEFINE_FLAGS:
        flags |= getattr(libvirt, name, 0)
    return flags
