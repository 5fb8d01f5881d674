#!/usr/bin/env bash
# The Vagrant lab checked with real packets, through vagrant/lab.sh (the `dvr lab` verbs):
#
#   vagrant/test.sh [--keep]     (as root; --keep leaves the lab up at the end)
#
# From a clean state: the lab up with tests/lab/topologies/northsouth.yaml (two routers with
# gateways, floating IPs on both compute nodes), then:
#   1. east-west: vm1 (compute1, blue) to vm2 (compute2, red), routed on the source node:
#      TTL 63 at the destination;
#   2. a floating IP reached from the external host (203.0.113.50, vm1's), the reply from
#      it;
#   3. SNAT: vm2 (no floating IP) reaches the external gateway, seen there from r1's
#      external address (through net1);
#   4. an agent restart on compute1 under a ping every 20 ms: no packet lost;
#   5. an OVS restart on compute1 (flow-restore-wait, the kernel datapath) under the same
#      ping: the loss is printed (the figure; not asserted yet);
# then `lab.sh down` and nothing of the lab left in libvirt (no domain, no network).
# Says loudly and exits 0 without testing when this machine cannot run VMs (no QEMU or
# libvirt); any failed check exits non-zero with one line.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
LAB=$HERE/lab.sh
keep=no
[[ ${1:-} == --keep ]] && keep=yes

say() { echo "vagrant/test.sh: $*"; }
fail() { echo "vagrant/test.sh: FAILED: $*" >&2; exit 1; }

if ! command -v qemu-system-x86_64 >/dev/null || ! command -v vagrant >/dev/null \
   || ! command -v libvirtd >/dev/null; then
  say "SKIPPED: this machine cannot run the Vagrant lab (needs vagrant, vagrant-libvirt,"
  say "SKIPPED: libvirt and QEMU: see vagrant/README.md)"
  exit 0
fi

cd "$ROOT"
started=$SECONDS
"$LAB" down >/dev/null
"$LAB" up tests/lab/topologies/northsouth.yaml
say "lab up in $((SECONDS - started)) s"
cleanup() { [[ $keep == yes ]] || "$LAB" down >/dev/null || true; }
trap cleanup EXIT

# 1. east-west, routed once
out=$("$LAB" exec vm1 -- ping -n -c 3 -i 0.2 -W 2 10.2.0.12) || fail "vm1 cannot reach vm2"
grep -q 'ttl=63' <<<"$out" || fail "vm1 -> vm2 not routed once: $(grep ttl= <<<"$out" | head -1)"
say "ok: east-west vm1 -> vm2, TTL 63"

# 2. a floating IP from the external host
"$LAB" ext -- ping -n -c 3 -i 0.2 -W 2 203.0.113.50 >/dev/null \
  || fail "the external host cannot reach vm1's floating IP 203.0.113.50"
say "ok: 203.0.113.50 (vm1) reached from the external host"

# 3. SNAT through the network node: the external host sees r1's address
cap=$("$LAB" ext -- timeout 6 tcpdump -n -l -c 1 -i eth1 'icmp[icmptype] == icmp-echo' \
      2>/dev/null & sleep 2; "$LAB" exec vm2 -- ping -n -c 2 -W 2 203.0.113.1 >/dev/null; wait) \
  || true
grep -q '203.0.113.10 > 203.0.113.1' <<<"$cap" \
  || fail "vm2's ping did not leave SNATed to r1's 203.0.113.10: ${cap:-nothing captured}"
say "ok: vm2 -> 203.0.113.1 SNATed to 203.0.113.10 (r1, through net1)"

lost_across() {  # lost_across VERB NODE: pings lost from vm1 to vm2 across the verb
  local log
  log=$(mktemp)
  "$LAB" exec vm1 -- ping -q -n -c 500 -i 0.02 10.2.0.12 >"$log" 2>&1 &
  local ping=$!
  sleep 2
  "$LAB" "$1" "$2"
  wait "$ping" || true
  sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) received.*/\1 \2/p' "$log"
  rm -f "$log"
}

# 4. an agent restart costs nothing
read -r sent got < <(lost_across restart-agent compute1)
[[ $sent -gt 0 && $sent -eq $got ]] || fail "agent restart: $((sent - got)) of $sent pings lost"
say "ok: agent restart on compute1, 0 of $sent pings lost"

# 5. an OVS restart on the kernel datapath: the figure
read -r sent got < <(lost_across restart-ovs compute1)
say "figure: OVS restart on compute1 (kernel datapath): $((sent - got)) of $sent pings at 20 ms lost"

if [[ $keep == no ]]; then
  trap - EXIT
  "$LAB" down >/dev/null
  left=$(virsh -c qemu:///system list --all --name | grep -E '^vagrant_(compute|net|ext)' || true)
  [[ -z $left ]] || fail "domains left after down: $left"
  left=$(virsh -c qemu:///system net-list --all --name | grep -E '^dvr-' || true)
  [[ -z $left ]] || fail "networks left after down: $left"
  say "ok: down leaves no domain and no network of the lab"
fi
say "passed in $((SECONDS - started)) s"
