#!/usr/bin/env bash
# Installs everything, brings up the built-in lab (two hypervisors, one network node, two
# networks on one distributed router) and shows routed traffic between the hypervisors.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
DVR=.venv/bin/dvr
$DVR lab up
$DVR lab status
echo
echo "== vm1 (compute1, blue 10.1.0.11) -> vm2 (compute2, red 10.2.0.12): routed on compute1"
$DVR lab exec vm1 -- ping -c 3 -i 0.2 10.2.0.12
echo
echo "== the same path in compute1's switch (ofproto/trace): routed, then one tunnel"
read -r MAC GWMAC < <($DVR lab status --json | .venv/bin/python -c 'import json, sys
st = json.load(sys.stdin)
print(st["vms"]["vm1"]["mac"], st["routers"]["r1"]["interfaces"]["blue"]["mac"])')
$DVR lab node compute1 -- ovs-appctl ofproto/trace br-int \
  "in_port=tapvm1,icmp,dl_src=$MAC,dl_dst=$GWMAC,nw_src=10.1.0.11,nw_dst=10.2.0.12,nw_ttl=64" \
  | grep -E "^ *[0-9]+\.|^Datapath actions" || true
echo
echo "The lab keeps running: 'sudo .venv/bin/dvr lab down' removes it."
