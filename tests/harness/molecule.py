"""Run a molecule scenario of this repository the way a developer does: `molecule test -s NAME`."""

import subprocess
from dataclasses import dataclass

from harness.ansible import VENV_BIN, ansible_env
from harness.paths import ROOT


@dataclass
class MoleculeRun:
    rc: int
    output: str

    def passed(self, step):
        """Whether molecule reported the step (converge, idempotence, verify, ...) successful."""
        return f"{step}: Executed: Successful" in self.output


def molecule_test(scenario, ephemeral_dir, timeout=1100):
    """`molecule test -s SCENARIO` from the repository root with molecule's state in ``ephemeral_dir``;
    the checkout is the collection, output is plain text (stdout and stderr together)."""
    env = ansible_env({"ANSIBLE_FORCE_COLOR": "0", "NO_COLOR": "1", "PY_COLORS": "0",
                       "MOLECULE_EPHEMERAL_DIRECTORY": str(ephemeral_dir)})
    # Molecule reads the human output of ansible-playbook, not the JSON callback the other tests use.
    for key in ("ANSIBLE_STDOUT_CALLBACK", "ANSIBLE_LOAD_CALLBACK_PLUGINS"):
        env.pop(key)
    env["PATH"] = f"{VENV_BIN}:/usr/sbin:/sbin:{env['PATH']}"
    run = subprocess.run([str(VENV_BIN / "molecule"), "test", "-s", scenario], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)
    return MoleculeRun(run.returncode, run.stdout)
