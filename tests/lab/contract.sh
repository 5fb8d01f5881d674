#!/usr/bin/env bash
# The packet checks of tests/lab/topologies/northsouth.yaml, through nothing but the lab
# contract's verbs (../shared/topology.md), so that the same checks drive either lab:
#
#   tests/lab/contract.sh [--trace CMD] LAB...
#   tests/lab/contract.sh --trace 'dvr trace --prefix t1' dvr lab --prefix t1
#   tests/lab/contract.sh --trace 'vagrant/lab.sh trace' vagrant/lab.sh
#
# LAB... is the lab's command (`dvr lab --prefix t1`, `vagrant/lab.sh`) and CMD the one that
# traces offline what the lab holds (given `--summary --offline VM PACKET`). Each check
# prints one `answer:` line, the same on every lab that runs the topology correctly, so two
# labs' outputs can be compared line by line:
#   - the offline trace of each packet below (what the planned flows do with it);
#   - east-west vm1 -> vm2 routed once on the source node (TTL 63 at vm2);
#   - vm1's floating IP 203.0.113.50 reached from the external host, seen by vm1 from the
#     external host's own address (no SNAT on the way in);
#   - vm2 (no floating IP) reaching the external host, seen there from r1's 203.0.113.10;
#   - isolation between routers: vm2 (r1) cannot reach vm5 (r2, green), and vm5 sees none of
#     its packets.
# A check that fails prints `FAILED:` and one line why, and the script exits non-zero.
set -uo pipefail

TRACE=""
if [[ ${1:-} == --trace ]]; then
  TRACE=$2
  shift 2
fi
[[ $# -ge 1 ]] || { echo "usage: contract.sh [--trace CMD] LAB..." >&2; exit 2; }
LAB=("$@")

failed=0
answer() { echo "answer: $*"; }
fail() { echo "FAILED: $*"; failed=1; }
lab() { "${LAB[@]}" "$@" </dev/null; }  # no command reads the checks' own input

TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$TMP"' EXIT

# capture NAME WHERE FILTER: tcpdump (one ICMP echo request matching FILTER, 8 s at most) on
# WHERE (`exec VM` or `ext`) in the background; returns once it listens
capture() {
  local name=$1 where=$2 filter=$3 i
  # shellcheck disable=SC2086
  lab $where -- timeout 8 tcpdump -n -l -c 1 -i any "$filter" >"$TMP/$name" 2>&1 &
  echo $! >"$TMP/$name.pid"
  for i in $(seq 100); do
    grep -q 'listening on' "$TMP/$name" 2>/dev/null && return 0
    sleep 0.1
  done
}
captured() {  # captured NAME: what the capture saw, once it ended
  wait "$(cat "$TMP/$1.pid")" 2>/dev/null
  grep -v -e 'listening on' -e 'packets captured' -e 'packets received' \
          -e 'packets dropped' -e '^tcpdump:' "$TMP/$1" || true
}

# --- the offline trace of each packet the checks send --------------------------------------
if [[ -n $TRACE ]]; then
  while read -r vm packet; do
    # shellcheck disable=SC2086
    if out=$($TRACE --summary --offline "$vm" "$packet" 2>&1 </dev/null); then
      # the ends and the hops (node, table, flow): the same topology gives the same lines
      grep -E '^(delivered|dropped|  -> |[a-z0-9-]+ \(br-|  *[0-9]+ [a-z_]+:)' <<<"$out" |
        sed "s|^|answer: trace $vm $packet: |"
    else
      fail "trace $vm $packet: $out"
    fi
  done <<'EOF'
vm1 icmp, ip.dst=10.2.0.12
ext icmp, ip.dst=203.0.113.50
vm2 icmp, ip.dst=203.0.113.1
vm2 icmp, ip.dst=10.3.0.15
EOF
fi

# --- east-west, routed once on the source node ----------------------------------------------
if out=$(lab exec vm1 -- ping -n -c 3 -i 0.2 -W 2 10.2.0.12 2>&1); then
  ttl=$(sed -n 's/.* ttl=\([0-9]*\).*/\1/p' <<<"$out" | sort -u | tr '\n' ' ')
  answer "east-west vm1 -> vm2 (10.2.0.12): replies, ttl ${ttl% }"
  [[ ${ttl% } == 63 ]] || fail "vm1 -> vm2 not routed exactly once: ttl $ttl"
else
  fail "vm1 cannot reach vm2: $(tail -n 2 <<<"$out" | tr '\n' ' ')"
fi

# --- a floating IP from outside, with the real source ---------------------------------------
capture fip "exec vm1" "icmp[icmptype] == icmp-echo"
if lab ext -- ping -n -c 3 -i 0.2 -W 2 203.0.113.50 >/dev/null 2>&1; then
  seen=$(captured fip | sed -n 's/.* IP \([0-9.]*\) > \([0-9.]*\): ICMP echo request.*/\1 > \2/p')
  answer "floating IP 203.0.113.50 from the external host: replies, vm1 sees ${seen:-nothing}"
  [[ $seen == "203.0.113.1 > 10.1.0.11" ]] \
    || fail "vm1 did not see the external host's 203.0.113.1 DNATed to 10.1.0.11: ${seen:-nothing}"
else
  captured fip >/dev/null
  fail "the external host cannot reach vm1's floating IP 203.0.113.50"
fi

# --- SNAT on the network node ----------------------------------------------------------------
capture snat ext "icmp[icmptype] == icmp-echo and dst host 203.0.113.1"
lab exec vm2 -- ping -n -c 2 -i 0.2 -W 2 203.0.113.1 >/dev/null 2>&1
ok=$?
seen=$(captured snat | sed -n 's/.* IP \([0-9.]*\) > \([0-9.]*\): ICMP echo request.*/\1 > \2/p')
answer "SNAT vm2 -> 203.0.113.1: $([[ $ok == 0 ]] && echo replies || echo 'no reply'), the external host sees ${seen:-nothing}"
[[ $ok == 0 && $seen == "203.0.113.10 > 203.0.113.1" ]] \
  || fail "vm2 did not reach the external host SNATed to r1's 203.0.113.10: ${seen:-nothing}"

# --- isolation between routers -----------------------------------------------------------------
capture iso "exec vm5" "icmp and src host 10.2.0.12"
if lab exec vm2 -- ping -n -c 2 -i 0.2 -W 1 10.3.0.15 >/dev/null 2>&1; then
  reply=replies
  fail "vm2 (router r1) reached vm5 (router r2, 10.3.0.15)"
else
  reply="no reply"
fi
seen=$(captured iso | sed -n 's/.* IP \([0-9.]*\) > \([0-9.]*\): ICMP.*/\1 > \2/p')
answer "isolation vm2 (r1) -> vm5 (r2, 10.3.0.15): $reply, vm5 sees ${seen:-nothing}"
[[ -z $seen ]] || fail "vm5 saw vm2's packet across routers: $seen"

exit $failed
