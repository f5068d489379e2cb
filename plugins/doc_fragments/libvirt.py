# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

class ModuleDocFragment:
    """The libvirt connection option shared by modules that talk to libvirtd."""

    DOCUMENTATION = r"""
options:
  uri:
    description:
      - libvirt connection URI of the hypervisor.
      - C(test:///default) is libvirt's in-memory test driver, useful to check definitions without a host.
    type: str
    default: qemu:///system
"""
