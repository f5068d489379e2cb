"""Put the standard handles back into blocking mode before Ansible sees them.

ansible-core >= 2.14 refuses to start ("Ansible requires blocking IO on stdin/stdout/stderr")
when any of fd 0/1/2 has O_NONBLOCK set. CI runners and some terminals (node-based tools,
a parent that used asyncio) leave it set. The flag lives on the open file description, which
the child shares with us, so clearing it here fixes it for the exec'd Ansible process too.
"""

import os

STANDARD_FDS = (0, 1, 2)


def make_blocking(fds=STANDARD_FDS):
    """Clear O_NONBLOCK on each open fd; return the fds that were changed."""
    changed = []
    for fd in fds:
        try:
            if not os.get_blocking(fd):
                os.set_blocking(fd, True)
                changed.append(fd)
        except OSError:
            continue  # closed handle: nothing to fix, Ansible will complain on its own
    return changed
