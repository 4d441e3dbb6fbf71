# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Stand-in for ansible-test's pip bootstrap script (get-pip.py).

ansible-test downloads get-pip.py from ci-files.testing.ansible.com, which a host without that name
(this lab, an air-gapped CI) cannot reach. This does the same job from what Python ships: ensurepip,
then pip installs the pinned packages ansible-test passes (pip==X first among them) from the index the
host's pip configuration names. `make sanity` copies it to ~/.ansible/test/cache/get_pip_<version>.py
when no real one is there.
"""

import subprocess
import sys

# A child process: ensurepip blanks the pip configuration (PIP_CONFIG_FILE=/dev/null) of the process
# it runs in, and the install below needs the host's index, certificates and constraints.
subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade"], stdout=subprocess.DEVNULL)
# get-pip's own flags; ansible-test then uninstalls what it does not want, so they are safe to drop.
args = [arg for arg in sys.argv[1:] if arg not in ("--no-setuptools", "--no-wheel")]
sys.exit(subprocess.call([sys.executable, "-m", "pip", "install", *args]))
