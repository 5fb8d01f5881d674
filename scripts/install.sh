#!/usr/bin/env bash
# Installs everything dvr needs on Debian 12, from nothing: system packages, then the
# project and its Python dependencies in a virtual environment at .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (apt-get, network namespaces)" >&2
  exit 1
fi

APT_PACKAGES=(
  openvswitch-switch openvswitch-common   # ovsdb-server, ovs-vswitchd, ovs-vsctl/ofctl/appctl
  iproute2 ethtool iputils-ping procps     # namespaces, veths, offloads, ping
  nftables conntrack conntrackd tcpdump    # NAT namespaces, conntrack state, captures
  iperf3                                   # throughput figures
  python3 python3-venv python3-dev gcc     # the agent and its dependencies
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # the package's service cannot start without systemd; the lab runs its own daemons
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || \
    dpkg-query -W openvswitch-switch >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "installed: $(.venv/bin/python --version), $(ovs-vswitchd --version | head -1)"
