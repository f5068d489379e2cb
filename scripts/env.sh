# Sourced by scripts/*: the paths every command here agrees on.
SMALLCLOUD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export SMALLCLOUD_ROOT
export SMALLCLOUD_VENV="$SMALLCLOUD_ROOT/.venv"
export SMALLCLOUD_COLLECTIONS="$SMALLCLOUD_ROOT/.cache/collections"
export ANSIBLE_COLLECTIONS_PATH="$SMALLCLOUD_COLLECTIONS"
export PATH="$SMALLCLOUD_VENV/bin:/usr/sbin:/sbin:$PATH"
export PIP_DISABLE_PIP_VERSION_CHECK=1
