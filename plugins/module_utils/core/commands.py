# Copyright: smallcloud developers
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Run host commands as argv lists (never through a shell) and raise CommandFailed with the output."""

import subprocess

from ansible_collections.smallcloud.kvm.plugins.module_utils.core.errors import CommandFailed, HostError


def run(argv, check=True, input_text=None, timeout=300, env=None):
    """Run ``argv``; return (rc, stdout, stderr). With ``check``, non-zero exit raises CommandFailed."""
    argv = [str(arg) for arg in argv]
    try:
        process = subprocess.run(
            argv, input=input_text, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except OSError as error:
        raise HostError("cannot run %s: %s" % (argv[0], error), argv=argv) from error
    except subprocess.TimeoutExpired as error:
        raise HostError("%s did not finish within %s seconds" % (" ".join(argv), timeout), argv=argv) from error
    if check and process.returncode != 0:
        output = process.stderr.strip() or process.stdout.strip()
        raise CommandFailed(
            "%s failed (exit %d): %s" % (" ".join(argv), process.returncode, output),
            argv=argv,
            rc=process.returncode,
            stdout=process.stdout,
            stderr=process.stderr,
        )
    return process.returncode, process.stdout, process.stderr
