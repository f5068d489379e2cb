"""Stand-in for the get-pip.py that ansible-test downloads from a host outside the package registries.

ansible-test runs this file (saved in its cache as get_pip_<version>.py) inside a fresh virtualenv with
pip's command-line options and the packages to install. The stdlib's ensurepip provides pip, then pip
itself installs what was asked for from the package index, as get-pip.py would.
"""

import ensurepip
import subprocess
import sys

GET_PIP_ONLY_OPTIONS = {"--no-setuptools", "--no-wheel"}

ensurepip.bootstrap(upgrade=True)
arguments = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY_OPTIONS]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *arguments]))
