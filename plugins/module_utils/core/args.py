# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Argument specs shared by several modules; each matches a doc fragment of the same name.

One option name for one thing in every module: the image cache is ``cache_dir`` and the networks'
state directory ``state_dir`` everywhere (the older names stay as aliases).
"""

from ansible.module_utils.common.arg_spec import ArgumentSpecValidator

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput

# The keys of a MODULE_SPEC that constrain options together (AnsibleModule's, ArgumentSpecValidator's).
CONSTRAINTS = ("mutually_exclusive", "required_together", "required_one_of", "required_if", "required_by")

# Matches plugins/doc_fragments/etcd.py.
ETCD_ARGS = dict(
    etcd_endpoints=dict(type="list", elements="str"),
    etcd_client_config=dict(type="path", default="/etc/smallcloud/etcd-client.json"),
    etcd_prefix=dict(type="str", default="/smallcloud/v1"),
    etcd_ca_cert=dict(type="path"),
    etcd_cert=dict(type="path"),
    etcd_key=dict(type="path", no_log=False),
    etcd_user=dict(type="str"),
    etcd_password=dict(type="str", no_log=True),
    etcd_timeout=dict(type="int", default=10),
    etcd_lock_ttl=dict(type="int", default=60),
)

# Matches plugins/doc_fragments/libvirt.py.
LIBVIRT_ARGS = dict(
    uri=dict(type="str", default="qemu:///system"),
)

# Each matches the fragment of the same name in plugins/doc_fragments/host_paths.py.
SYSFS_ARGS = dict(sysfs_root=dict(type="path", default="/sys"))
NAMESPACE_ARGS = dict(namespace_prefix=dict(type="str", default="scnet-"))
HOST_NETNS_ARGS = dict(host_netns=dict(type="str"))
NETWORK_STATE_ARGS = dict(
    state_dir=dict(type="path", default="/run/smallcloud/networks", aliases=["network_state_dir"]),
)
IMAGE_CACHE_ARGS = dict(
    cache_dir=dict(type="path", default="/var/lib/smallcloud/images", aliases=["image_cache_dir"]),
)


def with_common(spec, *common):
    """A new argument spec: ``spec`` plus each shared spec in ``common``."""
    merged = {}
    for part in common:
        merged.update(part)
    merged.update(spec)
    return merged


def validated_options(spec, options, label, **details):
    """``options`` checked as AnsibleModule checks a module's: against ``spec`` (a MODULE_SPEC-shaped dict:
    ``argument_spec`` and its constraints), types coerced and defaults filled in. For options that arrive
    inside another option (a batch entry, a plan entry); InvalidInput names ``label`` and what is wrong."""
    validator = ArgumentSpecValidator(spec["argument_spec"], **{key: spec[key] for key in CONSTRAINTS if key in spec})
    result = validator.validate(dict(options))
    if result.error_messages:
        raise InvalidInput("%s: %s" % (label, "; ".join(result.error_messages)), **details)
    return result.validated_parameters
