"""``smallcloud`` — run ansible-playbook, ansible-galaxy and ansible-runner with blocking stdio."""

import os
import shutil
import sys

from smallcloud import __version__
from smallcloud.stdio import make_blocking

TOOLS = {
    "playbook": "ansible-playbook",
    "galaxy": "ansible-galaxy",
    "runner": "ansible-runner",
}

USAGE = f"""usage: smallcloud COMMAND [ARGS...]

Runs Ansible for smallcloud.kvm after setting stdin/stdout/stderr back to blocking mode
(ansible-core >= 2.14 aborts when a handle is non-blocking, as it often is under CI).

commands:
  playbook ARGS...   ansible-playbook ARGS...   e.g. smallcloud playbook smallcloud.kvm.deploy -i hosts
  galaxy ARGS...     ansible-galaxy ARGS...     e.g. smallcloud galaxy collection install smallcloud-kvm-0.1.0.tar.gz
  runner ARGS...     ansible-runner ARGS...     e.g. smallcloud runner run /srv/awx-job -p converge.yml
  demo [--teardown]  run the smallcloud.kvm.demo playbook on this machine (or tear it down)
  demo --lab [--teardown]
                     the demo across a lab of 3 hosts: lab up, then smallcloud.kvm.demo_lab on its inventory
                     (--teardown: smallcloud.kvm.teardown, the image server stopped, lab down)
  lab up [--hosts N] | status | down
                     a lab of N hypervisor hosts on this machine (namespaces, sshd, libvirtd) and its inventory
  version            print the version

smallcloud {__version__}"""


def find_tool(name):
    """Prefer the tool installed next to this Python (same virtualenv), then PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which(name)


def fail(message):
    """One line on stderr and exit status 2, the convention for usage errors."""
    sys.stderr.write(f"smallcloud: {message}\n")
    return 2


def exec_tool(tool, args):
    """Replace this process with TOOL ARGS, stdio made blocking first."""
    path = find_tool(tool)
    if path is None:
        package = "ansible-runner" if tool == "ansible-runner" else "ansible-core"
        return fail(f"{tool} not found on PATH or beside {sys.executable}; install it with 'pip install {package}'")
    make_blocking()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(path, [path, *args])  # noqa: S606 - exec'ing the tool is the point
    return 0  # not reached


def demo_args(args):
    """Translate ``smallcloud demo [--teardown] [extra ansible-playbook args]``."""
    state = "absent" if "--teardown" in args else "present"
    rest = [arg for arg in args if arg != "--teardown"]
    return ["smallcloud.kvm.demo", "-e", f"demo_state={state}", *rest]


def demo(args):
    """``smallcloud demo [--teardown]`` on this machine, or ``--lab``: across a lab of 3 hosts."""
    if "--lab" not in args:
        return exec_tool("ansible-playbook", demo_args(args))
    from smallcloud import lab  # noqa: PLC0415 - only the lab needs it

    rest = [arg for arg in args if arg not in ("--lab", "--teardown")]
    try:
        if "--teardown" in args:
            return lab.demo_down(find_tool("ansible-playbook"), rest)
        inventory = lab.demo_up()
    except lab.LabError as error:
        return fail(str(error))
    return exec_tool("ansible-playbook", ["-i", str(inventory), "smallcloud.kvm.demo_lab", *rest])


def main(argv=None):
    """Entry point of the ``smallcloud`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    if command in TOOLS:
        return exec_tool(TOOLS[command], args)
    if command == "demo":
        return demo(args)
    if command == "lab":
        from smallcloud import lab  # noqa: PLC0415 - only this command needs it

        return lab.main(args)
    if command in ("version", "--version"):
        print(f"smallcloud {__version__}")
        return 0
    known = ", ".join([*TOOLS, "demo", "lab", "version"])
    return fail(f"unknown command '{command}'; run 'smallcloud --help' (commands: {known})")


if __name__ == "__main__":
    sys.exit(main())
