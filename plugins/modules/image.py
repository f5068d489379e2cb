#!/usr/bin/python
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

DOCUMENTATION = r"""
---
module: image
short_description: Cache a disk image from a URL or a catalog name on a hypervisor
version_added: 0.1.0
description:
  - Downloads an image once into a cache directory keyed by its URL and keeps it there, so instances
    start from a local copy.
  - One streaming pass reads the source, computes its checksum and decompresses it (xz, lzma, gzip, zlib,
    bz2 and zstd, detected by magic bytes) into a partial file in the cache directory; the result is
    converted with C(qemu-img convert) when it is not in O(format) yet and renamed into place atomically.
  - xz is decompressed by the C(xz) command (multi-threaded), or by Python's lzma where the command is
    missing; zstd needs the C(zstd) command.
  - Data that is not a disk image (an HTML page, or a file qemu-img finds no image in) fails the task, as
    does an image that refers to a backing file.
  - A cached image is revalidated with one conditional request (C(If-None-Match) / C(If-Modified-Since));
    when O(checksum) is given and the cached copy has it, no request is made at all.
  - Runs for the same URL at the same time download once; the others wait for the entry's lock.
  - Metadata beside each image (C(<path>.json)) records the source URL, digests, ETag/Last-Modified,
    sizes and the last use, for M(smallcloud.kvm.image_cache).
author:
  - smallcloud developers (@smallcloud)
extends_documentation_fragment:
  - smallcloud.kvm.attributes
  - smallcloud.kvm.host_paths.image_cache
options:
  url:
    description:
      - URL of the image, C(http://), C(https://) or C(file://).
      - Mutually exclusive with O(name).
    type: str
  name:
    description:
      - Shorthand name from the image catalog, for example C(debian:12) or C(ubuntu:24.04).
      - The built-in catalog knows C(debian:11), C(debian:12), C(debian:13), C(ubuntu:22.04), C(ubuntu:24.04)
        and their code names; O(catalog) and O(catalog_file) add or override names.
      - Mutually exclusive with O(url).
    type: str
  checksum:
    description:
      - Expected digest of the file as served (before decompression), as C(ALGORITHM:HEX); algorithms
        are C(sha1), C(sha224), C(sha256), C(sha384) and C(sha512).
      - C(skip) accepts a remote image without verification; without O(checksum) or O(checksum_url) a
        remote URL is refused. C(file://) URLs need no checksum.
      - Mutually exclusive with O(checksum_url).
    type: str
  checksum_url:
    description:
      - URL of a published checksum file (C(SHA256SUMS), C(SHA512SUMS), GNU or BSD style) that lists the
        image's file name; the algorithm follows from the file name or the digest length.
    type: str
  catalog:
    description:
      - Extra catalog entries, name to C(url) plus C(checksum_url) or C(checksum) (a bare string is the URL).
      - Entries here override O(catalog_file) and the built-in catalog.
    type: dict
  catalog_file:
    description:
      - YAML or JSON file with a mapping of catalog names to entries, like O(catalog).
    type: path
  state:
    description:
      - V(present) caches the image; V(absent) removes it and its metadata from the cache.
    type: str
    choices: [present, absent]
    default: present
  format:
    description:
      - Format of the cached file; other formats are converted with C(qemu-img convert).
    type: str
    choices: [qcow2, raw]
    default: qcow2
  retries:
    description:
      - How many more times to try after a checksum mismatch or a network error (dropped connection,
        timeout, HTTP 5xx). HTTP 4xx and HTML pages are not retried.
    type: int
    default: 3
  timeout:
    description:
      - Seconds to wait for the server to connect or send more data.
    type: int
    default: 60
  force:
    description:
      - Fetch again even when the cached copy is current.
    type: bool
    default: false
notes:
  - Check mode reports what would be fetched or removed and changes nothing, not even the last-use time.
  - Supports C(--diff).
requirements:
  - qemu-img (Debian package C(qemu-utils))
  - xz (Debian package C(xz-utils)), optional, for faster xz decompression
  - zstd, only for zstd-compressed images
seealso:
  - module: smallcloud.kvm.image_cache
"""

EXAMPLES = r"""
- name: Cache Debian 12 (checksum from the published SHA512SUMS)
  smallcloud.kvm.image:
    name: debian:12

- name: Cache an image by URL, pinned to a digest
  smallcloud.kvm.image:
    url: https://images.example.com/tiny.raw.xz
    checksum: sha256:8a3f5b2c0d1e4f6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c
  register: tiny

- name: A site-local catalog name
  smallcloud.kvm.image:
    name: site:tiny
    catalog:
      site:tiny:
        url: http://mirror.example.com/tiny.qcow2.zst
        checksum_url: http://mirror.example.com/SHA256SUMS

- name: Drop it from the cache
  smallcloud.kvm.image:
    url: https://images.example.com/tiny.raw.xz
    state: absent
"""

RETURN = r"""
path:
  description: Path of the cached image file.
  returned: always
  type: str
  sample: /var/lib/smallcloud/images/4f1c...e2.qcow2
url:
  description: The URL the image comes from (resolved from O(name) when given).
  returned: always
  type: str
key:
  description: Cache key of the entry, the sha256 of the URL.
  returned: always
  type: str
format:
  description: Format of the cached file.
  returned: always
  type: str
  sample: qcow2
digest:
  description: Digest of the file as served, C(ALGORITHM:HEX), verified against the checksum when one was given.
  returned: when state is present
  type: str
file_digest:
  description: sha256 of the cached file, C(sha256:HEX), used by M(smallcloud.kvm.image_cache) to check integrity.
  returned: when state is present and the image is cached
  type: str
source_format:
  description: Format qemu-img found in the decompressed source.
  returned: when state is present and the image is cached
  type: str
compression:
  description: Compression of the source (xz, lzma, gzip, zlib, bz2, zstd), or null.
  returned: when state is present and the image is cached
  type: str
virtual_size:
  description: Virtual disk size in bytes.
  returned: when state is present and the image is cached
  type: int
size:
  description: Size of the cached file in bytes.
  returned: when state is present and the image is cached
  type: int
downloaded:
  description: Bytes read from the source in this run (0 on a cache hit).
  returned: always
  type: int
cached:
  description: True when the cached copy was current and nothing was fetched.
  returned: when state is present
  type: bool
actions:
  description: What was done, or would be done in check mode.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.smallcloud.kvm.plugins.module_utils.image.images import MODULE_SPEC, run
from ansible_collections.smallcloud.kvm.plugins.module_utils.core.runner import run_module


def main():
    run_module(AnsibleModule(**MODULE_SPEC), run)


if __name__ == "__main__":
    main()
