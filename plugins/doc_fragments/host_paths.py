# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

class ModuleDocFragment:
    """Host paths and names shared by several modules; each matches the spec of the same name in
    plugins/module_utils/core/args.py. Every one has a real default: tests pass temporary ones."""

    DOCUMENTATION = r"""
options: {}
"""

    SYSFS = r"""
options:
  sysfs_root:
    description:
      - Where sysfs is mounted (KSM under C(kernel/mm/ksm), network bridges under C(class/net)).
    type: path
    default: /sys
"""

    NAMESPACE = r"""
options:
  namespace_prefix:
    description:
      - Prefix of the networks' gateway namespace names, followed by the VNI in hex; the same in every module
        of a cloud (M(smallcloud.kvm.network) names the namespaces with it).
    type: str
    default: scnet-
"""

    HOST_NETNS = r"""
options:
  host_netns:
    description:
      - Named network namespace that stands for this host; default the namespace the module runs in.
    type: str
"""

    NETWORK_STATE = r"""
options:
  state_dir:
    description:
      - Directory of the networks' gateway state on this host, one subdirectory per network with its dnsmasq
        configuration, static leases (hosts file), leases and pid file.
    type: path
    default: /run/smallcloud/networks
    aliases: [network_state_dir]
"""

    IMAGE_CACHE = r"""
options:
  cache_dir:
    description:
      - Directory of the image cache (see M(smallcloud.kvm.image)); created when an image is fetched into it.
    type: path
    default: /var/lib/smallcloud/images
    aliases: [image_cache_dir]
"""
