# -*- coding: utf-8 -*-
# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Observe -> desired -> plan -> apply, with one check-mode gate.

A runner fills a Plan with what differs (for ``--diff``) and the steps that would fix it
(``actions``); ``apply`` runs the steps only outside check mode. ``changed`` is derived from
the steps, so check mode and a real run always agree on it.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class Plan(object):
    """Differences and the ordered steps that converge them."""

    def __init__(self):
        self.before = {}
        self.after = {}
        self._steps = []

    def compare(self, key, observed, desired):
        """Record ``key`` in the diff; return True when it differs."""
        self.before[key] = observed
        self.after[key] = desired
        return observed != desired

    def add(self, description, function=None, *args, **kwargs):
        """Queue a step; ``function`` may be None for steps that only describe."""
        self._steps.append((description, function, args, kwargs))

    @property
    def actions(self):
        """Human-readable descriptions of the queued steps, in order."""
        return [step[0] for step in self._steps]

    @property
    def changed(self):
        return bool(self._steps)

    @property
    def diff(self):
        return {"before": self.before, "after": self.after}

    def apply(self, check_mode):
        """Run every queued step unless in check mode."""
        if check_mode:
            return
        for _description, function, args, kwargs in self._steps:
            if function is not None:
                function(*args, **kwargs)

    def result(self, **extra):
        """The task result: changed, diff, actions, plus ``extra``."""
        result = {"changed": self.changed, "diff": self.diff, "actions": self.actions}
        result.update(extra)
        return result
