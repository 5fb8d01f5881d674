#!/usr/bin/env bash
# Installs everything dvr needs on Debian 12, from nothing: system packages, then the
# project (editable: the checkout is what runs) and its Python dependencies in a virtual
# environment at .venv. One line per step; a failed step prints the end of its output and
# exits non-zero. Running it again changes only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (apt-get, network namespaces)" >&2
  exit 1
fi

LOG=$(mktemp -t dvr-install.XXXXXX)
NOTE=$(mktemp -t dvr-install-note.XXXXXX)
trap 'rm -f "$LOG" "$NOTE"' EXIT

# step DESCRIPTION FUNCTION: runs FUNCTION (errexit on, in a subshell) with its output in
# $LOG, then says ok, with what FUNCTION wrote to fd 3, or shows the end of the output
step() {
  local what=$1 rc
  shift
  printf 'install: %s ... ' "$what"
  set +e
  (set -e; "$@") >"$LOG" 2>&1 3>"$NOTE"
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "failed (exit $rc), the end of its output:"
    tail -n 40 "$LOG" | sed 's/^/  /' >&2
    echo "install: all of it is in $LOG" >&2
    rm -f "$NOTE"
    trap - EXIT
    exit "$rc"
  fi
  if [ -s "$NOTE" ]; then echo "ok ($(cat "$NOTE"))"; else echo ok; fi
}

APT_PACKAGES=(
  openvswitch-switch openvswitch-common   # ovsdb-server, ovs-vswitchd, ovs-vsctl/ofctl/appctl
  iproute2 ethtool iputils-ping procps     # namespaces, veths, offloads, ping
  nftables conntrack conntrackd tcpdump    # NAT namespaces, conntrack state, captures
  iperf3                                   # throughput figures
  mariadb-server                           # Neutron's database (dvr lab up --neutron)
  rabbitmq-server                          # Neutron's agents' messaging (--l2-agent)
  python3 python3-venv python3-dev gcc     # the agent and its dependencies
)
# apt_install PACKAGE...: installs those missing, says which (or that all are present)
apt_install() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    echo "all $# present" >&3
    return 0
  fi
  echo "added ${missing[*]}" >&3
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # a package's service may not start without systemd (Open vSwitch, libvirt): installed
  # all the same, the labs run their own daemons
  apt-get install -y -qq --no-install-recommends "${missing[@]}" || \
    dpkg-query -W "${missing[@]}"
}
apt_packages() { apt_install "${APT_PACKAGES[@]}"; }

# the Vagrant lab on VMs (vagrant/): libvirt and QEMU (its emulation where the CPU has no
# virtualisation), Vagrant with its libvirt provider, and what vagrant/build-box.sh makes
# the box with; vagrant/lab.sh starts libvirt's daemons itself where no systemd runs
VM_PACKAGES=(
  vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 qemu-utils dnsmasq-base debootstrap rsync openssh-client
  e2fsprogs fdisk util-linux
)
vm_packages() { apt_install "${VM_PACKAGES[@]}"; }

PYTHON=${PYTHON:-python3}
# the build backend the project declares, installed in the venv: the editable install and
# tests/unit/test_packaging.py build with it (no isolated build environment to fetch)
python_venv() {
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
  fi
  .venv/bin/python -m pip install --progress-bar off --upgrade pip
  local listed requires
  listed=$(.venv/bin/python -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
  mapfile -t requires <<<"$listed"
  .venv/bin/python -m pip install --progress-bar off "${requires[@]}"
  .venv/bin/python -c 'import platform, setuptools
print(f"Python {platform.python_version()}, setuptools {setuptools.__version__}")' >&3
}

project() {
  .venv/bin/python -m pip install --progress-bar off --no-build-isolation -e '.[test]'
  .venv/bin/python -c 'import agent.version, flows.northbound
assert flows.northbound.SCHEMA.is_file(), flows.northbound.SCHEMA'
}

step "apt packages" apt_packages
step "VM lab packages (vagrant/)" vm_packages
step "python venv (.venv)" python_venv
VERSION=$(.venv/bin/python -c 'import tomllib
print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
step "dvr $VERSION and its dependencies, editable" project
# Neutron (the API, its database migrations, uWSGI) in its own venv, the versions pinned by
# dvr/neutron/constraints.txt, dvr in it for the driver; what `dvr lab up --neutron` runs
neutron_venv() {
  .venv/bin/python -c 'from dvr.neutron import service
print(service.ensure_venv())' >&3
}
step "Neutron venv" neutron_venv
echo "install: ready: dvr $(.venv/bin/python -c 'from agent.version import VERSION; print(VERSION)')," \
  "$(ovs-vswitchd --version | head -1)"
