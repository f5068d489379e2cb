"""Reusable test harness: real daemons and a way to drive modules through Ansible."""
