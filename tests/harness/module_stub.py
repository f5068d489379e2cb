"""A stand-in for AnsibleModule, for code that calls module_utils' converge functions in-process
(benches, edge-case tests, worker processes): what those functions read from the real one."""


class ModuleStub:
    """``params`` as AnsibleModule would fill them (the argument spec's defaults, then the given values),
    ``check_mode``, and ``warn()`` collected in ``warnings``."""

    def __init__(self, spec, check_mode=False, **params):
        spec = spec.get("argument_spec", spec)  # a runner's MODULE_SPEC, or an argument spec
        self.params = {name: option.get("default") for name, option in spec.items()}
        self.params.update(params)
        self.check_mode = check_mode
        self.warnings = []

    def warn(self, text):
        self.warnings.append(text)
