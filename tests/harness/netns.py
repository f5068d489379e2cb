"""Scratch network namespaces that are always deleted, processes inside them included."""

import subprocess
import uuid


def netns_list():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def delete_netns(name):
    """Kill whatever runs in ``name`` (dnsmasq, test servers) and delete it."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout.split()
    for pid in pids:
        subprocess.run(["kill", "-9", pid], check=False)
    subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)


class NetnsFactory:
    """``create()`` makes a namespace with loopback up; ``cleanup()`` deletes every one made."""

    def __init__(self, prefix="sct"):
        self.prefix = prefix
        self.created = []

    def create(self, name=None):
        name = name or f"{self.prefix}-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.created.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    def cleanup(self):
        for name in reversed(self.created):
            delete_netns(name)
        self.created = []
