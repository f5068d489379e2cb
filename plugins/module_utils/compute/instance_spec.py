# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What the ``instance`` module is asked for: its options, and every instance of a call validated and
normalised before anything is observed (pure: no etcd, no libvirt, no host)."""

import re

from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import disks as disk_ops
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import domain as dom_xml
from ansible_collections.smallcloud.kvm.plugins.module_utils.compute import seed as seed_ops
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.args import (
    ETCD_ARGS,
    IMAGE_CACHE_ARGS,
    LIBVIRT_ARGS,
    NAMESPACE_ARGS,
    NETWORK_STATE_ARGS,
    SYSFS_ARGS,
    validated_options,
    with_common,
)
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import InvalidInput
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.names import check_name
from ansible_collections.smallcloud.kvm.plugins.module_utils.network.addressing import parse_address

CPUS_MAX = 255
MEMORY_MIN = 32  # MiB: the tiny guest needs about this much
STATES = ("running", "stopped", "absent")

# Per-instance options: top-level values are the defaults of every entry of ``instances``.
INSTANCE_OPTIONS = dict(
    name=dict(type="str"),
    image=dict(type="str"),
    image_checksum=dict(type="str"),
    cpus=dict(type="int"),
    memory=dict(type="int"),
    disk_size=dict(type="str"),
    ephemeral_disks=dict(type="list", elements="str"),
    networks=dict(type="list", elements="raw"),
    ssh_keys=dict(type="list", elements="str", no_log=False),
    user_data=dict(type="str"),
    hostname=dict(type="str"),
    state=dict(type="str", choices=list(STATES)),
    virt_type=dict(type="str", choices=["auto", "kvm", "qemu"]),
    shutdown_timeout=dict(type="int"),
    autostart=dict(type="bool"),
    metadata=dict(type="dict"),
    security_groups=dict(type="list", elements="str"),
)
DEFAULTS = dict(cpus=1, memory=512, ephemeral_disks=[], networks=[], ssh_keys=[], state="running",
                virt_type="auto", shutdown_timeout=60, autostart=False, metadata={}, security_groups=[])
METADATA_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")
WAIT_FOR = ("none", "ssh")

MODULE_SPEC = dict(
    argument_spec=with_common(
        dict(
            {key: dict(spec, default=DEFAULTS[key]) if key in DEFAULTS else spec
             for key, spec in INSTANCE_OPTIONS.items()},
            instances=dict(type="list", elements="dict"),
            detected_virt_type=dict(type="str", choices=["kvm", "qemu"]),
            instances_dir=dict(type="path", default="/var/lib/smallcloud/instances"),
            wait_for=dict(type="str", default="none", choices=list(WAIT_FOR)),
            wait_timeout=dict(type="int", default=300),
        ),
        ETCD_ARGS,
        LIBVIRT_ARGS,
        IMAGE_CACHE_ARGS,
        NETWORK_STATE_ARGS,
        NAMESPACE_ARGS,
        SYSFS_ARGS,
    ),
    mutually_exclusive=[["name", "instances"]],
    required_one_of=[["name", "instances"]],
    supports_check_mode=True,
)


# validation (pure) -----------------------------------------------------------------------------


def parse_networks(entries, name):
    """``[(network, ip or None)]`` from names or ``{name, ip}`` dicts; InvalidInput naming a bad entry."""
    parsed = []
    for item in entries or []:
        entry = {"name": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or set(entry) - {"name", "ip"} or not entry.get("name"):
            raise InvalidInput("instance %s: networks entry %r is not a network name or {name: NET, ip: ADDRESS}"
                               % (name, entry), network=entry)
        check_name("network", entry["name"])
        address = entry.get("ip")
        if address is not None:
            address = str(parse_address(address, "ip"))
        parsed.append((entry["name"], address))
    names = [network for network, _ip in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidInput("instance %s: network %s is listed more than once" % (name, duplicates[0]),
                           network=duplicates[0])
    return parsed


def resolve_virt_type(virt_type, detected):
    """``kvm`` or ``qemu``: the one asked for, else the detected one, else qemu (TCG works everywhere)."""
    if virt_type in dom_xml.VIRT_TYPES:
        return virt_type
    return detected if detected in dom_xml.VIRT_TYPES else "qemu"


def check_metadata(metadata, name):
    """The metadata as a plain ``{str: str}``; InvalidInput naming the first key or value that is not one."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidInput("instance %s: metadata must be a mapping of strings, got %r" % (name, metadata),
                           metadata=metadata)
    for key, value in metadata.items():
        if not isinstance(key, str) or not METADATA_KEY_RE.match(key):
            raise InvalidInput("instance %s: metadata key %r is not allowed: use 1-63 letters, digits, '_', '.' "
                               "or '-' (not starting with '.' or '-')" % (name, key), key=key)
        if not isinstance(value, str):
            raise InvalidInput("instance %s: metadata value of %s is %r (%s); metadata values must be strings "
                               "(quote it in YAML)" % (name, key, value, type(value).__name__), key=key)
    return dict(metadata)


def check_wait(params):
    """Refuse a negative wait_timeout (0 means one probe, no waiting)."""
    if params.get("wait_timeout") is not None and params["wait_timeout"] < 0:
        raise InvalidInput("wait_timeout %r must be >= 0 seconds" % params["wait_timeout"],
                           wait_timeout=params["wait_timeout"])


def expand(params):
    """The validated desired state of every instance: a list of dicts (top-level options as defaults)."""
    check_wait(params)
    entries = params["instances"] if params.get("instances") is not None else [{"name": params["name"]}]
    wanted = []
    for index, entry in enumerate(entries):
        merged = {key: params.get(key) for key in INSTANCE_OPTIONS}
        merged.update(_validated_entry(entry, index))
        wanted.append(desired_instance(merged, params.get("detected_virt_type")))
    check_batch(wanted)
    return wanted


def _validated_entry(entry, index):
    """One entry of ``instances`` type-checked against INSTANCE_OPTIONS; only the keys it sets."""
    if not isinstance(entry, dict):
        raise InvalidInput("instances[%d] is not a dict: %r" % (index, entry), entry=entry)
    unknown = sorted(set(entry) - set(INSTANCE_OPTIONS))
    if unknown:
        raise InvalidInput("instances[%d] has unknown keys %s; allowed: %s"
                           % (index, ", ".join(unknown), ", ".join(sorted(INSTANCE_OPTIONS))), keys=unknown)
    checked = validated_options({"argument_spec": INSTANCE_OPTIONS}, entry,
                                "instances[%d] (%s)" % (index, entry.get("name")), entry=entry.get("name"))
    return {key: value for key, value in checked.items() if key in entry}


def desired_instance(opts, detected_virt_type):
    """Check one instance's options and return its normalised desired state."""
    name = check_name("instance", opts.get("name"))
    state = opts.get("state") or "running"
    want = {"name": name, "state": state, "shutdown_timeout": opts.get("shutdown_timeout")}
    if want["shutdown_timeout"] is None or want["shutdown_timeout"] < 0:
        raise InvalidInput("instance %s: shutdown_timeout %r must be >= 0 seconds" % (name, opts.get(
            "shutdown_timeout")), shutdown_timeout=opts.get("shutdown_timeout"))
    if state == "absent":
        return want
    cpus, memory = opts.get("cpus"), opts.get("memory")
    if cpus is None or not 1 <= cpus <= CPUS_MAX:
        raise InvalidInput("instance %s: cpus %r is out of range: allowed 1..%d" % (name, cpus, CPUS_MAX),
                           cpus=cpus, allowed="1..%d" % CPUS_MAX)
    if memory is None or memory < MEMORY_MIN:
        raise InvalidInput("instance %s: memory %r MiB is out of range: at least %d MiB" % (name, memory, MEMORY_MIN),
                           memory=memory, allowed=">= %d" % MEMORY_MIN)
    if not opts.get("image"):
        raise InvalidInput("instance %s: image is required unless state is absent" % name, name=name)
    hostname = opts.get("hostname") or seed_ops.hostname_for(name)
    want.update(
        image=opts["image"], image_checksum=opts.get("image_checksum"), cpus=cpus, memory=memory,
        disk_size=disk_ops.parse_size(opts["disk_size"]) if opts.get("disk_size") else None,
        ephemeral_disks=[disk_ops.parse_size(size, "ephemeral_disks") for size in opts.get("ephemeral_disks") or []],
        networks=parse_networks(opts.get("networks"), name),
        ssh_keys=seed_ops.check_ssh_keys(opts.get("ssh_keys")),
        user_data=seed_ops.check_user_data(opts.get("user_data")),
        hostname=seed_ops.check_hostname(hostname),
        virt_type=resolve_virt_type(opts.get("virt_type"), detected_virt_type),
        autostart=bool(opts.get("autostart")),
        metadata=check_metadata(opts.get("metadata"), name),
        security_groups=list(dict.fromkeys(check_name("security group", group)
                                           for group in opts.get("security_groups") or [])),
    )
    return want


def check_batch(wanted):
    """Refuse a batch naming one instance twice or giving one fixed IP to two interfaces."""
    seen, fixed = set(), {}
    for want in wanted:
        if want["name"] in seen:
            raise InvalidInput("instance %s is listed more than once" % want["name"], name=want["name"])
        seen.add(want["name"])
        for network, address in want.get("networks") or []:
            if address is None:
                continue
            other = fixed.get((network, address))
            if other is not None:
                raise InvalidInput("ip %s on network %s is requested by both %s and %s"
                                   % (address, network, other, want["name"]), ip=address, network=network)
            fixed[(network, address)] = want["name"]
