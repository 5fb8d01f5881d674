#!/usr/bin/env bash
# The Vagrant lab checked with real packets, through vagrant/lab.sh (the `dvr lab` verbs):
#
#   vagrant/test.sh [--keep]     (as root; --keep leaves the lab up at the end)
#
# From a clean state: the lab up with tests/lab/topologies/ha.yaml (two compute nodes, two
# network nodes, two routers with gateways and floating IPs: five VMs with the external
# host), then:
#   1. tests/lab/contract.sh on the VMs and on a `dvr lab` of the same topology (the VMs'
#      own copy, tunnel addresses included): every check passes on both (east-west routed
#      once on the source node, TTL 63, one tunnel crossing; a floating IP reached from the
#      external host with its real source; SNAT through the network node; isolation
#      between routers) and both give the same answers and the same offline traces;
#   2. the database's connections between the VMs are TLS and compute1's certificate may
#      not change the desired state (RBAC); then an agent restart on compute1 under a ping
#      every 20 ms: no packet lost;
#   3. an OVS restart on compute1 (flow-restore-wait, the kernel datapath) under the same
#      ping: no packet lost;
#   4. net1, the network node serving r1's SNAT, killed (as a power cut): vm2's traffic to
#      the outside goes on through net2, still from r1's address; net1 started again:
#      everything is back (the interruptions are printed);
# then `lab.sh down`, after which nothing of the lab is left in libvirt or on the host (no
# domain, network, storage pool, volume, firewall chain). Prints the figures: `up` time
# (box cached or built), memory per VM, packets lost across each restart. Says loudly and
# exits 0 without testing when this machine cannot run VMs (no QEMU or libvirt); any
# failed check exits non-zero with one line.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
LAB=$HERE/lab.sh
DVR=$ROOT/.venv/bin/dvr
keep=no
[[ ${1:-} == --keep ]] && keep=yes

say() { echo "vagrant/test.sh: $*"; }
fail() { echo "vagrant/test.sh: FAILED: $*" >&2; exit 1; }
gaps() {  # gaps FILE: "LOST SENT LONGEST-GAP-MS" of a `ping -D` log
  python3 - "$1" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
times = [float(t) for t in re.findall(r"^\[([0-9.]+)\] \d+ bytes from", text, re.M)]
m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
sent, got = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
print(sent - got, sent, round(max((b - a for a, b in zip(times, times[1:])), default=0) * 1e3))
EOF
}

if ! command -v qemu-system-x86_64 >/dev/null || ! command -v vagrant >/dev/null \
   || ! command -v libvirtd >/dev/null || ! vagrant plugin list 2>/dev/null | grep -q libvirt; then
  say "SKIPPED: this machine cannot run the Vagrant lab (needs vagrant, vagrant-libvirt,"
  say "SKIPPED: libvirt and QEMU: see vagrant/README.md)"
  exit 0
fi
[[ -x $DVR ]] || DVR=dvr

cd "$ROOT"
TMP=$(mktemp -d)
SIDE=vgt$$   # the namespace lab run beside the VMs
started=$SECONDS
"$LAB" down >/dev/null
cleanup() {
  local rc=$?
  "$DVR" lab --prefix "$SIDE" down >/dev/null 2>&1 || true
  [[ $keep == yes ]] || "$LAB" down >/dev/null || true
  if [[ $rc -eq 0 ]]; then
    rm -rf "$TMP"
  else
    echo "vagrant/test.sh: what the checks captured: $TMP" >&2
  fi
}
trap cleanup EXIT
up=$("$LAB" up tests/lab/topologies/ha.yaml) || fail "lab.sh up failed"
say "figure: $up"

# memory per VM: the QEMU process on the host, and what the guest uses
for vm in $(cd "$HERE" && vagrant status --machine-readable | awk -F, '$3 == "state" {print $2}'); do
  pid=$(pgrep -f -- "guest=dvr-lab-$vm," | head -n 1 || true)
  rss=$([[ -n $pid ]] && ps -o rss= -p "$pid" | awk '{printf "%d", $1 / 1024}' || echo "?")
  used=$("$LAB" node "$vm" -- free -m 2>/dev/null | awk '$1 == "Mem:" {print $3}' || echo "?")
  say "figure: memory of $vm: QEMU $rss MB on the host, $used MB used in the guest"
done

# 1. the same checks, the same answers, on the VMs and on the namespace lab
"$LAB" node compute1 -- cat /etc/dvr/topology.yaml >"$TMP/topology.yaml"
"$DVR" lab --prefix "$SIDE" up "$TMP/topology.yaml" >/dev/null || fail "dvr lab up failed"
tests/lab/contract.sh --trace "$DVR trace --prefix $SIDE" "$DVR" lab --prefix "$SIDE" \
  >"$TMP/namespaces" || fail "the checks fail on dvr lab: $(grep FAILED "$TMP/namespaces")"
# the namespace lab's figures for the same events, in this run: the baselines of 3 and 4
"$DVR" lab --prefix "$SIDE" exec vm1 -- ping -D -n -c 300 -i 0.02 10.2.0.12 \
  >"$TMP/side-ovs" 2>&1 &
pid=$!
sleep 1
"$DVR" lab --prefix "$SIDE" restart-ovs compute1 >/dev/null
wait "$pid" || true
"$DVR" lab --prefix "$SIDE" exec vm2 -- ping -D -n -c 400 -i 0.02 203.0.113.1 \
  >"$TMP/side-snat" 2>&1 &
pid=$!
sleep 1
"$DVR" lab --prefix "$SIDE" kill net1 >/dev/null
wait "$pid" || true
read -r lost sent longest < <(gaps "$TMP/side-ovs")
say "figure: dvr lab (userspace datapath), this run: OVS restart on compute1: $lost of $sent" \
    "pings at 20 ms lost to vm2, longest gap $longest ms"
read -r lost sent longest < <(gaps "$TMP/side-snat")
say "figure: dvr lab, this run: net1 killed: vm2's SNAT traffic lost $lost of $sent pings at" \
    "20 ms, longest gap $longest ms"
"$DVR" lab --prefix "$SIDE" down >/dev/null
tests/lab/contract.sh --trace "$LAB trace" "$LAB" >"$TMP/vms" \
  || fail "the checks fail on the VMs: $(grep FAILED "$TMP/vms" | head -n 3 | tr '\n' ' ')"
diff -u "$TMP/namespaces" "$TMP/vms" >"$TMP/diff" \
  || fail "dvr lab and the VMs answer differently: $(grep '^[-+]a' "$TMP/diff" | head -n 4)"
grep -v '^answer: trace' "$TMP/vms" | sed 's/^answer: /ok: /' | while read -r l; do say "$l"; done
say "ok: the same $(grep -c '^answer: trace' "$TMP/vms") lines of offline trace and the same\
 $(grep -vc '^answer: trace' "$TMP/vms") answers on dvr lab and on the VMs"

# the database over TLS between the VMs, each agent limited to its own report: compute1's
# certificate may rewrite its own Agent row but not compute2's, nor remove a VM's port
c1="-p /etc/dvr/pki/compute1-privkey.pem -c /etc/dvr/pki/compute1-cert.pem -C /etc/dvr/pki/cacert.pem"
nbc=$("$LAB" node compute1 -- sed -n 's/^nb_connection = //p' /etc/dvr/agent.ini)
[[ $nbc == ssl:* ]] || fail "compute1's agent is not on TLS: nb_connection = $nbc"
first=${nbc%%,*}
conns=$("$LAB" node compute1 -- ss -tnH state established "( dport = :6641 )")
[[ -n $conns ]] || fail "compute1's agent holds no connection to the database"
if "$LAB" node compute1 -- /opt/dvr/venv/bin/dvr nb --db "$first" $c1 vm-del vm1 \
    >"$TMP/forged" 2>&1; then
  fail "compute1's certificate removed vm1's port"
fi
grep -q 'permission error: RBAC rules for client "compute1" role "dvr-agent"' "$TMP/forged" \
  || fail "no RBAC refusal for compute1's certificate: $(tail -n 1 "$TMP/forged")"
shown=$("$LAB" node compute1 -- /opt/dvr/venv/bin/dvr nb --db "$first" $c1 show)
grep -q '^vm vm1 ' <<<"$shown" || fail "vm1's port is gone"
if "$LAB" node compute1 -- /opt/dvr/venv/bin/dvr nb --db "${first/ssl:/tcp:}" show \
    >/dev/null 2>&1; then
  fail "the database answers plain TCP on $first"
fi
say "ok: the database is TLS between the VMs ($nbc); compute1's certificate is refused\
 removing a port (RBAC), plain TCP gets no answer"

# lost_across VERB NODE: pings every 20 ms from vm1 to vm2 (on compute2: through the
# tunnel) and to vm3 (on compute1 too) across the verb: "SENT GOT SENT GOT"
lost_across() {
  "$LAB" exec vm1 -- ping -q -n -c 500 -i 0.02 10.2.0.12 >"$TMP/ping2" 2>&1 &
  local far=$!
  "$LAB" exec vm1 -- ping -q -n -c 500 -i 0.02 10.2.0.13 >"$TMP/ping3" 2>&1 &
  local near=$!
  sleep 2
  "$LAB" "$1" "$2"
  wait "$far" "$near" || true
  sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) received.*/\1 \2/p' \
    "$TMP/ping2" "$TMP/ping3" | tr '\n' ' '
  echo
}

# 2. an agent restart costs nothing
read -r sent got sent3 got3 < <(lost_across restart-agent compute1)
say "figure: agent restart on compute1: $((sent - got)) of $sent pings at 20 ms lost to vm2," \
    "$((sent3 - got3)) of $sent3 to vm3"
[[ $sent -gt 0 && $sent -eq $got && $sent3 -gt 0 && $sent3 -eq $got3 ]] \
  || fail "agent restart: pings lost: $(tail -qn 2 "$TMP/ping2" "$TMP/ping3" | tr '\n' ' ')"
say "ok: agent restart on compute1 lost nothing"

# 3. an OVS restart on the kernel datapath: what stays on the node loses nothing; what
#    crosses the tunnel loses what ovs-vswitchd's re-creation of its VXLAN device costs
#    (OVS 3.1 deletes vxlan_sys_4789 at start and makes it again, flow-restore-wait or
#    not: about 0.1 s), nothing like the second of a datapath flushed
read -r sent got sent3 got3 < <(lost_across restart-ovs compute1)
say "figure: OVS restart on compute1 (kernel datapath, flow-restore-wait):" \
    "$((sent3 - got3)) of $sent3 pings at 20 ms lost to vm3 (on the node)," \
    "$((sent - got)) of $sent to vm2 (through the tunnel)"
[[ $sent3 -gt 0 && $sent3 -eq $got3 ]] \
  || fail "OVS restart: $((sent3 - got3)) of $sent3 pings lost on the node: $(tail -qn 2 "$TMP/ping3")"
[[ $sent -gt 0 && $((sent - got)) -le 15 ]] \
  || fail "OVS restart: $((sent - got)) of $sent pings lost through the tunnel (at most 15)"
say "ok: OVS restart on compute1: nothing lost on the node, $((sent - got)) through the tunnel"

# 4. the network node serving r1's SNAT killed, then started again, under a ping every
#    20 ms from vm2 (no floating IP: SNATed by r1) to the external host, run on compute2
"$LAB" exec vm2 -- sh -c 'nohup ping -D -n -i 0.02 203.0.113.1 >/tmp/snat-ping 2>&1 &
                          echo $! >/tmp/snat-ping.pid'
sleep 2
"$LAB" kill net1
sleep 5
capture=$("$LAB" ext -- timeout 6 tcpdump -n -l -c 1 -i eth1 'icmp[icmptype] == icmp-echo' \
          2>/dev/null) || true
grep -q '203.0.113.10 > 203.0.113.1' <<<"$capture" \
  || fail "with net1 killed, vm2's traffic does not leave from r1's 203.0.113.10: ${capture:-none}"
snat=$("$LAB" status --json | python3 -c 'import json,sys
print(",".join(n for n, v in json.load(sys.stdin)["nodes"].items()
               if "r1" in (v["agent"].get("snat") or [])))')
[[ $snat == net2 ]] || fail "with net1 killed, r1's SNAT is on '${snat}', not net2"
say "ok: net1 killed: r1's SNAT on net2, vm2's traffic still leaves from 203.0.113.10"
t0=$SECONDS
"$LAB" start net1
say "figure: net1 back and converged $((SECONDS - t0)) s after start"
sleep 3
"$LAB" exec vm2 -- sh -c 'kill -INT "$(cat /tmp/snat-ping.pid)"; sleep 0.5; cat /tmp/snat-ping' \
  >"$TMP/snat-ping"
read -r lost sent longest < <(gaps "$TMP/snat-ping")
say "figure: net1 killed and started again: vm2's SNAT traffic lost $lost of $sent pings at" \
    "20 ms, longest gap $longest ms"
"$LAB" exec vm2 -- ping -n -c 3 -i 0.2 -W 2 203.0.113.1 >/dev/null \
  || fail "vm2 cannot reach the external host after net1 came back"
"$LAB" exec vm1 -- ping -n -c 3 -i 0.2 -W 2 10.2.0.12 >/dev/null \
  || fail "vm1 cannot reach vm2 after net1 came back"
say "ok: net1 started again: east-west and SNAT work"

if [[ $keep == no ]]; then
  trap - EXIT
  rm -rf "$TMP"
  "$LAB" down >/dev/null
  V() { virsh -c qemu:///system "$@" 2>/dev/null; }
  leftovers() {
    if V version >/dev/null; then   # another user's libvirtd is running: look into it
      V list --all --name | grep '^dvr-lab-' | sed 's/^/domain /'
      V net-list --all --name | grep '^dvr-' | sed 's/^/network /'
      V pool-list --all --name | grep '^dvr-lab$' | sed 's/^/pool /'
      for pool in $(V pool-list --name); do
        V vol-list "$pool" | awk 'NR > 2 && NF {print $1}' | grep -E '^(dvr-lab-|dvr-VAGRANTSLASH-)' |
          sed "s|^|volume $pool/|"
      done
    else                             # lab.sh stopped the libvirtd it started: nothing of it
      iptables -S | grep -- '-N LIBVIRT_' | sed 's/^-N /chain filter /'
      iptables -t nat -S | grep -- '-N LIBVIRT_' | sed 's/^-N /chain nat /'
      ip -o link show | awk -F': ' '{print $2}' | grep -E '^virbr' | sed 's/^/link /'
    fi
    [[ -e /var/lib/libvirt/dvr-lab ]] && echo "directory /var/lib/libvirt/dvr-lab"
    return 0
  }
  left=$(leftovers 2>/dev/null | tr '\n' ' ')
  [[ -z $left ]] || fail "left after down: $left"
  say "ok: down leaves no domain, network, pool, volume, firewall chain or bridge of the lab"
fi
say "passed in $((SECONDS - started)) s"
