# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Observe -> desired -> plan -> apply, with one check-mode gate.

A runner fills a Plan with what differs (for ``--diff``) and the steps that would fix it
(``actions``); ``apply`` runs the steps only outside check mode, and is the only code that reads
check mode. ``changed`` is derived from the steps, so check mode and a real run agree on it.

Every step runs a function; no step only describes. A value that only exists once a step ran (an
allocation from etcd) is a ``Pending`` that ``allocate`` returns: later steps take it as an argument
and read it when they run, and the diff and result show it filled in after the apply, or as
``(allocated on apply)`` in check mode. Steps that can only be planned once such a value exists
(names derived from an allocated VNI) are a sub-plan that ``expand`` builds on apply and merges.
A step may register how to undo itself (``undo``); when a later step fails, ``apply`` undoes what
ran, newest first, and re-raises the first error.
"""

import contextlib

NOT_YET = "(allocated on apply)"


class Pending:
    """A value a step fills in when the plan is applied; ``NOT_YET`` until then."""

    def __init__(self, label):
        self.label = label
        self._value = None
        self.known = False

    def fill(self, value):
        self._value = value
        self.known = True
        return value

    @property
    def value(self):
        """The filled-in value; reading it before its step ran is a bug in the plan's order."""
        if not self.known:
            raise RuntimeError("%s is read before the step that allocates it ran" % self.label)
        return self._value

    def __repr__(self):
        return repr(self._value) if self.known else NOT_YET


def resolved(value, unknown=NOT_YET):
    """``value`` with every Pending in it (nested in dicts, lists, tuples) replaced by its value, or by
    ``unknown`` while it is not filled in."""
    if isinstance(value, Pending):
        return value._value if value.known else unknown
    if isinstance(value, dict):
        return {key: resolved(item, unknown) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(resolved(item, unknown) for item in value)
    return value


def _read(arguments):
    """Positional or keyword arguments with each top-level Pending replaced by its value."""
    if isinstance(arguments, dict):
        return {key: item.value if isinstance(item, Pending) else item for key, item in arguments.items()}
    return [item.value if isinstance(item, Pending) else item for item in arguments]


def unresolved(value):
    """Whether ``value`` holds (nested in dicts, lists, tuples) a Pending not filled in yet."""
    if isinstance(value, Pending):
        return not value.known
    if isinstance(value, dict):
        return any(unresolved(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(unresolved(item) for item in value)
    return False


class _Step:
    """One queued step: what it does (``description``), the call, and its optional undo."""

    def __init__(self, description, function, args, kwargs):
        if not callable(function):
            raise TypeError("plan step %r has no function to run" % description)
        self.description = description
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.undo = None
        self.pending = None
        self.expands = False

    def undone_by(self, function, *args, **kwargs):
        """Have this step undone by ``function(*args, **kwargs)`` when a later step of the same apply fails."""
        self.undo = lambda: function(*_read(args), **_read(kwargs))
        return self

    def run(self):
        """Call the function with each Pending argument read now; fill this step's own Pending."""
        outcome = self.function(*_read(self.args), **_read(self.kwargs))
        if self.pending is not None:
            self.pending.fill(outcome)
        return outcome


class Plan:
    """Differences and the ordered steps that converge them."""

    def __init__(self):
        self.before = {}
        self.after = {}
        self._steps = []
        self._undo = []
        self._bookkeeping = []

    # planning ------------------------------------------------------------------------------------

    def compare(self, key, observed, desired):
        """Record ``key`` in the diff when ``observed`` differs from ``desired``; return whether it does."""
        if observed == desired:
            return False
        self.before[key] = observed
        self.after[key] = desired
        return True

    def add(self, description, function, *args, **kwargs):
        """Queue a step that calls ``function(*args, **kwargs)``; returns it (see ``_Step.undone_by``).

        A Pending argument is read when the step runs; one nested in a dict or list is the function's to
        read (``resolved``), so functions that fill in a dict they were given keep working on that dict.
        """
        step = _Step(description, function, args, kwargs)
        self._steps.append(step)
        return step

    def allocate(self, description, function, *args, **kwargs):
        """Queue a step whose return value (an allocation) fills the Pending returned here.

        ``release``, when given, is called with the value to undo the allocation if a later step fails.
        """
        release = kwargs.pop("release", None)
        step = self.add(description, function, *args, **kwargs)
        step.pending = Pending(description)
        if release is not None:
            step.undo = lambda: release(step.pending.value)
        return step.pending

    def expand(self, description, build):
        """Queue a step that calls ``build()`` -> Plan on apply, then runs that plan's steps as its own.

        For steps that can only be planned once an earlier step filled in a value.
        """
        step = self.add(description, build)
        step.expands = True
        return step

    def after_apply(self, function, *args, **kwargs):
        """Bookkeeping run after a real apply that is no change of desired state (an image's last-use time):
        neither listed nor counted in ``changed``, and skipped in check mode like every step."""
        self._bookkeeping.append((function, args, kwargs))

    def merge(self, other):
        """Take over ``other``'s steps (after this plan's), its diff and its bookkeeping."""
        self._splice(len(self._steps), other)

    # reading -------------------------------------------------------------------------------------

    @property
    def actions(self):
        """Human-readable descriptions of the steps, in order (including expanded ones once applied)."""
        return [step.description for step in self._steps]

    @property
    def changed(self):
        return bool(self._steps)

    @property
    def diff(self):
        return {"before": resolved(self.before), "after": resolved(self.after)}

    def result(self, **extra):
        """The task result: changed, diff, actions, plus ``extra`` (a Pending not filled in is None there)."""
        result = {"changed": self.changed, "diff": self.diff, "actions": self.actions}
        result.update(resolved(extra, unknown=None))
        return result

    # the one check-mode gate ---------------------------------------------------------------------

    def apply(self, check_mode):
        """Run every step unless in check mode; on a failure undo what ran (newest first) and re-raise."""
        if check_mode:
            return
        index = 0
        try:
            while index < len(self._steps):
                step = self._steps[index]
                index += 1
                outcome = step.run()
                if step.undo is not None:
                    self._undo.append(step.undo)
                if step.expands and outcome is not None:
                    self._splice(index, outcome)
        except BaseException:
            self.rollback()
            raise
        self._undo = []
        for function, args, kwargs in self._bookkeeping:
            function(*args, **kwargs)

    @staticmethod
    def held_while_applying(check_mode, hold):
        """``hold()`` (a context manager) in a real run, nothing in check mode.

        For what must be held from observing to applying and is itself a change on the host, such as an
        image entry's lock file, so that check mode stays free of it.
        """
        return contextlib.nullcontext() if check_mode else hold()

    def _splice(self, index, sub):
        """Insert ``sub``'s steps at ``index`` and take over its diff and bookkeeping (``sub`` is left empty)."""
        self._steps[index:index] = sub._steps
        self._bookkeeping.extend(sub._bookkeeping)
        self.before.update(sub.before)
        self.after.update(sub.after)
        sub._steps, sub._bookkeeping = [], []

    def rollback(self):
        """Undo the steps that ran, newest first; keep going past a failing undo (the first error counts)."""
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception:  # noqa: S110 - keep undoing: the error the task reports is the first one
                pass
