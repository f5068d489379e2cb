# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What one call of the ``instance`` module observes, once for the whole batch: the instance records, the
domains on this host, the networks, the host's memory and the cached images. Nothing here changes anything."""

import os
import socket

from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import domain as dom_xml
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute.connection import libvirt
from ansible_collections.smallcloud.kvm.plugins.module_utils.state import records


class Observation:
    """One libvirt connection, one Store, and what the batch read once."""

    def __init__(self, params, store, conn):
        self.params = params
        self.store = store
        self.conn = conn
        self.host = socket.gethostname()
        self.records = records.instances(store)
        self.domains = {domain.name(): domain for domain in conn.listAllDomains(0)}
        self.warnings = []
        self._networks = None
        self._security_groups = None
        self._host_memory = None
        self._images = {}

    def networks(self):
        """The ``networks/`` records, read once when first needed."""
        if self._networks is None:
            self._networks = records.networks(self.store)
        return self._networks

    def security_groups(self):
        """The ``security_groups/`` records, read once when first needed."""
        if self._security_groups is None:
            self._security_groups = records.security_groups(self.store)
        return self._security_groups

    def host_memory(self):
        """The host's memory in MiB (libvirt's node info), read once."""
        if self._host_memory is None:
            self._host_memory = int(self.conn.getInfo()[1])
        return self._host_memory

    def bridge_present(self, bridge):
        """Whether ``bridge`` is a bridge on this host (sysfs)."""
        return os.path.isdir(os.path.join(self.params["sysfs_root"], "class", "net", bridge, "bridge"))

    def domain(self, name):
        """The domain's normalised definition, live definition, state and autostart (None when undefined)."""
        domain = self.domains.get(name)
        if domain is None:
            return None
        active = bool(domain.isActive())
        return {
            "definition": dom_xml.observe(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)),
            "live": dom_xml.observe(domain.XMLDesc(0)) if active else None,
            "state": "running" if active else "stopped",
            "autostart": bool(domain.autostart()),
        }

    def image(self, want):
        """``(image, plan)`` for ``want``'s image: ``{"path", "format", "virtual_size"}`` and the plan that
        fetches it, that plan only for the first instance of the batch that needs it (None afterwards).

        ``virtual_size`` is None while the image is not cached yet.
        """
        key = (want["image"], want.get("image_checksum"))
        if key in self._images:
            return self._images[key], None
        # Imported here: only a creation needs the image cache, and its fetch code (http, yaml for the catalog)
        # is a third of the module's start-up that a re-run of existing instances should not pay.
        from ansible_collections.smallcloud.kvm.plugins.module_utils.image import cached  # noqa: PLC0415

        request, entry = cached.request_for(want["image"], want.get("image_checksum"), self.params["cache_dir"])
        plan, facts = cached.plan_cached(request, entry)
        self.warnings.extend(request.warnings)
        found = facts()
        self._images[key] = {"path": found["path"], "format": found["format"],
                             "virtual_size": found.get("virtual_size")}
        return self._images[key], plan
