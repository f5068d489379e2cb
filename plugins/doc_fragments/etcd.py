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
    type: list
    elements: str
    default: ['http://127.0.0.1:2379']
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
"""
