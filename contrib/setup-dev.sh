#!/usr/bin/env bash
# Set up a Debian 12 machine for vcpud: system packages, a venv in .venv, vcpud installed in it.
# Run as root (vcpud pins other processes' threads); idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
need=(qemu-system-x86 qemu-utils libsystemd-dev pkg-config gcc python3-dev python3-venv util-linux systemd-container prometheus systemd
      libvirt-daemon-system libvirt-clients libvirt-dev
      groff-base man-db zsh
      # the packages and their tests: packaging/build-deb's build dependencies, lintian, rpmbuild; what the
      # .deb depends on, so that apt installs it offline in the overlay container (tests/integration/test_deb.py)
      dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-installer git
      lintian rpm python3-pyudev python3-yaml python3-systemd python3-prometheus-client bash-completion)
missing=()
for p in "${need[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# libvirt-python at the version of the host's libvirt (it builds against its headers)
.venv/bin/python -m pip install -q -e '.[test,libvirt]' "libvirt-python==$(pkg-config --modversion libvirt)"
echo "vcpud installed in $(pwd)/.venv: $(.venv/bin/vcpud --version)"
