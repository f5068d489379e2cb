"""The ``smallcloud`` command: runs the smallcloud.kvm collection through Ansible."""

__version__ = "0.1.0"
