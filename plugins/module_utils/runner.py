# -*- coding: utf-8 -*-
# Copyright: smallcloud developers
# Apache License 2.0 (see https://www.apache.org/licenses/LICENSE-2.0)
"""The one place where a typed error becomes a failed task."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

from ansible_collections.smallcloud.kvm.plugins.module_utils.errors import SmallcloudError


def run_module(module, converge):
    """Call ``converge(module)`` -> result dict and exit; a SmallcloudError fails the task."""
    try:
        result = converge(module)
    except SmallcloudError as error:
        module.fail_json(msg=error.msg, error=type(error).__name__, **error.details)
    module.exit_json(**result)
