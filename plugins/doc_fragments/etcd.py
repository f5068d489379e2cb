# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

class ModuleDocFragment:
    """etcd connection options shared by every module that keeps state in etcd."""

    DOCUMENTATION = r"""
options:
  etcd_endpoints:
    description:
      - etcd client URLs, tried in order; the next one is used when one does not answer.
      - Set once for every module with C(module_defaults) and the C(group/smallcloud.kvm.cloud) action group.
      - When not set, the endpoints of O(etcd_client_config); without that file, V(http://127.0.0.1:2379).
    type: list
    elements: str
  etcd_client_config:
    description:
      - JSON file with the etcd client settings of this host, written on every hypervisor by the
        C(smallcloud.kvm.deploy) playbook (the C(client) tasks of the C(smallcloud.kvm.etcd) role) -
        C(endpoints) (a list of client URLs) and the C(ca_cert), C(cert) and C(key) file paths.
      - Read when it exists and O(etcd_endpoints) is not set; O(etcd_ca_cert), O(etcd_cert) and O(etcd_key)
        given to the module win over the file's values one by one.
    type: path
    default: /etc/smallcloud/etcd-client.json
  etcd_prefix:
    description:
      - Key prefix under which the cloud's records live; one prefix is one cloud.
    type: str
    default: /smallcloud/v1
  etcd_ca_cert:
    description: CA certificate file used to verify the etcd servers (https endpoints).
    type: path
  etcd_cert:
    description: Client certificate file for etcd client-certificate authentication.
    type: path
  etcd_key:
    description: Private key file belonging to O(etcd_cert).
    type: path
  etcd_user:
    description: etcd user name when etcd authentication is enabled.
    type: str
  etcd_password:
    description: Password of O(etcd_user).
    type: str
  etcd_timeout:
    description: Seconds to wait for one etcd request before trying the next endpoint.
    type: int
    default: 10
  etcd_lock_ttl:
    description:
      - Seconds a lock this module takes in etcd (on a network, an instance, a floating IP) outlives the run
        holding it when that run dies (killed, host lost); a live run renews it every third of this time.
      - A run killed while it held a lock makes the next run wait up to this long; a lock is lost (and the
        run fails) when its holder cannot reach etcd for this long.
      - At least V(1).
    type: int
    default: 60
"""
