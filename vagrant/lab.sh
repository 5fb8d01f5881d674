#!/usr/bin/env bash
# The `dvr lab` contract (../shared/topology.md, "The same contract on VMs") on the Vagrant
# lab: the same verbs with the same meanings, so that one check can drive either lab.
#
#   vagrant/lab.sh up [TOPOLOGY] | down | status [--json]
#   vagrant/lab.sh exec VM -- CMD... | node NODE -- CMD... | ext -- CMD...
#   vagrant/lab.sh kill NODE | start NODE | restart-agent NODE | restart-ovs NODE
#   vagrant/lab.sh trace [--summary|--json|...] --offline VM PACKET
#
# `trace --offline` is `dvr trace --offline` of the topology the nodes hold (run on a node).
# The lab's libvirt resources carry its name: domains dvr-lab-NODE, networks dvr-*, the
# storage pool dvr-lab (its volumes: the box's copy and the VMs' disks); `down` removes them
# all, and what libvirt added on the host when lab.sh started it (its firewall chains,
# net.ipv4.ip_forward) goes back as it was.
# Commands run over ssh with one persistent connection per VM (ControlMaster), not through
# `vagrant ssh -c` (5 s a call under emulation); CMD gets the caller's standard input,
# output and exit status. Needs root (libvirt). Exits non-zero with a one-line reason.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
STATE=$HERE/.vagrant/dvr-lab
SSHCFG=$STATE/ssh_config
STATUS=/var/lib/dvr/agent-status.json
TOPOLOGY_IN_VM=/etc/dvr/topology.yaml

die() { echo "lab.sh: $*" >&2; exit 1; }
usage() { sed -n '5,8p' "$0" | sed 's/^# *//' >&2; exit 2; }

CALLER=$PWD  # a topology is named from where lab.sh is called
cd "$HERE"

# --- libvirt without systemd (as on this kind of machine) ------------------------------------
RUN=/run/dvr-vagrant-lab     # what lab.sh started or changed on the host, to undo at down
POOL=dvr-lab
POOL_DIR=/var/lib/libvirt/dvr-lab
V() { virsh -c qemu:///system "$@"; }

libvirt_ready() {
  mkdir -p "$RUN"
  # libvirt turns forwarding on for its NAT network: put it back as it was at down
  [[ -f $RUN/ip_forward ]] || sysctl -n net.ipv4.ip_forward >"$RUN/ip_forward"
  V version >/dev/null 2>&1 && return 0
  if ! pgrep -x virtlogd >/dev/null; then
    virtlogd -d
    touch "$RUN/virtlogd.started"
  fi
  if grep -qE '\b(vmx|svm)\b' /proc/cpuinfo; then
    libvirtd -d
  else
    # a /dev/kvm without hardware virtualisation only slows libvirtd's probing down: hide it
    unshare -m sh -c 'mount --bind /dev/null /dev/kvm 2>/dev/null; exec libvirtd -d'
  fi
  touch "$RUN/libvirtd.started"
  local i
  for i in $(seq 50); do
    V version >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "libvirtd does not answer"
}

pool_ready() {  # the lab's own storage pool (the box's volume and the VMs' disks)
  if ! V pool-info "$POOL" >/dev/null 2>&1; then
    mkdir -p "$POOL_DIR"
    V pool-define-as "$POOL" dir --target "$POOL_DIR" >/dev/null || die "cannot define pool $POOL"
  fi
  V pool-info "$POOL" | grep -q '^State: *running' || V pool-start "$POOL" >/dev/null \
    || V pool-info "$POOL" | grep -q '^State: *running' || die "cannot start pool $POOL"
}

pool_remove() {
  V pool-info "$POOL" >/dev/null 2>&1 || return 0
  local vol
  V pool-refresh "$POOL" >/dev/null 2>&1 || true
  for vol in $(V vol-list "$POOL" 2>/dev/null | awk 'NR > 2 && NF {print $1}'); do
    V vol-delete --pool "$POOL" "$vol" >/dev/null || die "cannot delete volume $vol of pool $POOL"
  done
  V pool-destroy "$POOL" >/dev/null 2>&1 || true
  V pool-undefine "$POOL" >/dev/null || die "cannot undefine pool $POOL"
  rm -rf "$POOL_DIR"   # the lab's own directory: nothing else is in it
}

host_restore() {  # what libvirt added on the host, once no libvirt network of anyone is left
  [[ -d $RUN ]] || return 0
  if V version >/dev/null 2>&1 && [[ -n $(V net-list --name 2>/dev/null | grep -v '^$') ]]; then
    return 0   # another user's libvirt network is running: its chains stay
  fi
  local f pid
  for f in libvirtd virtlogd; do
    [[ -f $RUN/$f.started ]] || continue
    pid=$(cat "/run/$f.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$f" ]]; then
      kill "$pid"
      for _ in $(seq 50); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    fi
    rm -f "$RUN/$f.started"
  done
  if pgrep -x libvirtd >/dev/null; then
    return 0   # a libvirtd lab.sh did not start: it owns its chains
  fi
  # the chains libvirt's networks made (libvirt 9: iptables, filter, nat and mangle tables)
  local cmd table chain parent
  for cmd in iptables ip6tables; do
    command -v "$cmd" >/dev/null || continue
    for table in filter nat mangle; do
      for chain in $("$cmd" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^LIBVIRT_/ {print $2}'); do
        for parent in $("$cmd" -t "$table" -S 2>/dev/null |
                        awk -v c="$chain" '$1 == "-A" && $0 ~ ("-j " c "$") {print $2}'); do
          "$cmd" -t "$table" -D "$parent" -j "$chain" 2>/dev/null || true
        done
        "$cmd" -t "$table" -F "$chain" 2>/dev/null || true
        "$cmd" -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
  [[ -f $RUN/ip_forward ]] && sysctl -q -w net.ipv4.ip_forward="$(cat "$RUN/ip_forward")"
  rm -rf "$RUN"
}

machines() {  # the lab's VMs, as the Vagrantfile defines them (kept at up: concurrent
  # `vagrant status` calls lock each other out, and each costs seconds)
  if [[ -s $STATE/machines ]]; then
    cat "$STATE/machines"
  else
    vagrant status --machine-readable 2>/dev/null | awk -F, '$3 == "state" {print $2}'
  fi
}

domain_of() {  # a VM's libvirt domain (its UUID, as vagrant-libvirt recorded it)
  local id=$HERE/.vagrant/machines/$1/libvirt/id
  [[ -s $id ]] || die "no VM $1 in this lab (is it up?)"
  cat "$id"
}

# --- ssh, one persistent connection a VM ------------------------------------------------------
ssh_config() {
  mkdir -p "$STATE"
  vagrant ssh-config >"$SSHCFG.tmp" 2>/dev/null || die "vagrant ssh-config failed (is the lab up?)"
  {
    echo "Host *"
    echo "  ControlMaster auto"
    echo "  ControlPath $STATE/cm-%h"
    echo "  ControlPersist 30m"
    echo "  ServerAliveInterval 5"
    echo "  LogLevel ERROR"
    cat "$SSHCFG.tmp"
  } >"$SSHCFG"
  rm -f "$SSHCFG.tmp"
}

# on NODE -- CMD...: CMD as root on the VM, its arguments kept as given
on() {
  local node=$1
  shift
  [[ -f $SSHCFG ]] || ssh_config
  grep -q "^Host $node\$" "$SSHCFG" || die "no VM $node in this lab"
  local cmd="" a
  for a in "$@"; do cmd+=" $(printf '%q' "$a")"; done
  ssh -F "$SSHCFG" "$node" "sudo -n${cmd}"
}

vm_node() {  # the node a tenant VM is on, from the topology the nodes hold (kept at up)
  local node
  if [[ ! -s $STATE/vms ]]; then
    on "$(machines | grep -v '^ext$' | head -n 1)" /opt/dvr/venv/bin/python -c '
import sys, yaml
vms = (yaml.safe_load(open(sys.argv[1])) or {}).get("vms") or {}
print("\n".join(name + " " + spec["node"] for name, spec in vms.items()))
' "$TOPOLOGY_IN_VM" >"$STATE/vms.$$" 2>/dev/null || die "cannot read the lab's topology"
    mv "$STATE/vms.$$" "$STATE/vms"
  fi
  node=$(awk -v vm="$1" '$1 == vm {print $2}' "$STATE/vms")
  [[ -n $node ]] || die "no VM $1 in the lab's topology"
  echo "$node"
}

# --- status ---------------------------------------------------------------------------------
status_json() {
  local node first=yes
  printf '{"nodes": {'
  for node in $(machines); do
    [[ $node == ext ]] && continue
    [[ $first == yes ]] || printf ', '
    first=no
    printf '"%s": ' "$node"
    on "$node" python3 - "$STATUS" <<'EOF' 2>/dev/null || printf '{"agent": {"alive": false}}'
import json, os, subprocess, sys
try:
    st = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    st = {}
alive = subprocess.run(["systemctl", "is-active", "-q", "dvr-agent"]).returncode == 0
print(json.dumps({"agent": {"alive": alive, "converged": bool(st.get("converged")),
                            "pid": st.get("pid"), "flows": st.get("flows"),
                            "metrics": st.get("metrics"), "vms": st.get("vms", []),
                            "snat": st.get("snat", []), "error": st.get("error")}}), end="")
EOF
  done
  printf '}}\n'
}

failed_machines() {  # the machines a vagrant log reports an error for
  sed -n "s/^An error occurred while executing the action on the '\([^']*\)'.*/\1/p" "$1" | sort -u
}

up_failed() {  # WHAT: say which machines failed, with their own last lines from the log
  local m
  tail -n 12 "$STATE.up.log" >&2
  for m in $(failed_machines "$STATE.up.log"); do
    echo "lab.sh: $1: $m failed; its last lines:" >&2
    grep -E "^ *$m: " "$STATE.up.log" | tail -n 30 >&2 || true
  done
}

wait_converged() {
  local deadline=$((SECONDS + ${1:-600})) out
  while (( SECONDS < deadline )); do
    out=$(status_json)
    python3 -c 'import json,sys; n=json.loads(sys.argv[1])["nodes"]; sys.exit(0 if n and all(v["agent"].get("alive") and v["agent"].get("converged") for v in n.values()) else 1)' "$out" && return 0
    sleep 2
  done
  die "the agents did not all converge: $out"
}

# --- verbs ------------------------------------------------------------------------------------
[[ $# -ge 1 ]] || usage
[[ $(id -u) -eq 0 ]] || die "run as root (libvirt)"
verb=$1
shift
case $verb in
  up)
    [[ $# -le 1 ]] || usage
    libvirt_ready
    if [[ $# -eq 1 ]]; then
      topo=$(cd "$CALLER" && realpath "$1") || die "no topology file $1"
      [[ $topo == "$(dirname "$HERE")"/* ]] || die "the topology must be inside the project \
(it is copied into the VMs with it): $1"
      export DVR_TOPOLOGY=${topo#"$(dirname "$HERE")"/}
    fi
    # the Vagrantfile makes one VM per node of it, in this command and the lab's later ones
    mkdir -p "$STATE"
    rm -f "$STATE/machines" "$STATE/vms"
    echo "${DVR_TOPOLOGY:-dvr/examples/default.yaml}" >"$STATE/topology"
    started=$SECONDS box="box cached"
    if ! vagrant box list 2>/dev/null | grep -q '^dvr/debian12 '; then
      "$HERE/build-box.sh" --add >/dev/null || die "cannot build the box (vagrant/build-box.sh)"
      box="box built in $((SECONDS - started)) s"
    fi
    pool_ready
    if [[ ${DVR_NB_TCP:-0} != 1 ]]; then   # the lab's PKI: a CA, a certificate per node
      py=$(dirname "$HERE")/.venv/bin/python
      [[ -x $py ]] || py=python3
      topo_file=$(dirname "$HERE")/$(cat "$STATE/topology")
      nodes=$(cd "$(dirname "$HERE")" && "$py" -c 'import sys, yaml
print(" ".join(yaml.safe_load(open(sys.argv[1]))["nodes"]))' "$topo_file") ||
        die "cannot read the nodes of $topo_file"
      # shellcheck disable=SC2086
      (cd "$(dirname "$HERE")" && "$py" -m dvr.lab.pki "$STATE/pki" $nodes admin) ||
        die "cannot make the lab's PKI in $STATE/pki"
    fi
    if ! vagrant up --provider=libvirt >"$STATE.up.log" 2>&1; then
      up_failed "vagrant up"
      # a machine whose provisioning failed is up: provision it once more (provision.sh is
      # idempotent), loudly, so that a slow start of another machine does not sink the lab
      for m in $(failed_machines "$STATE.up.log"); do
        echo "lab.sh: provisioning $m again" >&2
        vagrant provision "$m" >>"$STATE.up.log.$m" 2>&1 || {
          sed "s/^/    /" "$STATE.up.log.$m" | tail -n 40 >&2
          die "provisioning $m failed twice (all of it: $STATE.up.log, $STATE.up.log.$m)"; }
        echo "lab.sh: $m provisioned at the second attempt" >&2
      done
      # anything else (a machine not created, not booted) is not retried
      vagrant up --provider=libvirt --no-provision >>"$STATE.up.log" 2>&1 ||
        { up_failed "vagrant up --no-provision"; die "vagrant up failed (all of it: $STATE.up.log)"; }
    fi
    machines >"$STATE/machines.tmp" && mv "$STATE/machines.tmp" "$STATE/machines"
    rm -f "$STATE/vms"
    ssh_config
    wait_converged
    echo "lab up: $(machines | tr '\n' ' ' | sed 's/ $//') in $((SECONDS - started)) s ($box)"
    ;;
  down)
    [[ $# -eq 0 ]] || usage
    if [[ -f $SSHCFG ]]; then
      for cm in "$STATE"/cm-*; do
        [[ -S $cm ]] && ssh -F "$SSHCFG" -O exit -o ControlPath="$cm" x 2>/dev/null || true
      done
    fi
    if V version >/dev/null 2>&1 || [[ -f $RUN/libvirtd.started ]]; then
      libvirt_ready
      vagrant destroy -f >/dev/null 2>&1 || die "vagrant destroy failed"
      for net in $(V net-list --all --name 2>/dev/null | grep '^dvr-' || true); do
        V net-destroy "$net" >/dev/null 2>&1 || true
        V net-undefine "$net" >/dev/null || die "cannot remove network $net"
      done
      pool_remove
    fi
    host_restore
    rm -rf "$STATE" "$STATE".up.log* "$HERE/.wheel"
    echo "lab down"
    ;;
  status)
    if [[ ${1:-} == --json ]]; then
      status_json
    else
      status_json | python3 -c '
import json, sys
for name, n in json.load(sys.stdin)["nodes"].items():
    a = n["agent"]
    state = "converged" if a.get("converged") else ("alive" if a.get("alive") else "down")
    vms, snat = ",".join(a.get("vms") or []) or "-", ",".join(a.get("snat") or []) or "-"
    flows = a.get("flows")
    print(f"{name:10} agent {state:9} flows {flows}  vms {vms}  snat {snat}")'
    fi
    ;;
  node)
    [[ $# -ge 3 && $2 == -- ]] || usage
    node=$1
    shift 2
    on "$node" "$@"
    ;;
  exec)
    [[ $# -ge 3 && $2 == -- ]] || usage
    vm=$1
    shift 2
    node=$(vm_node "$vm") || exit 1
    on "$node" ip netns exec "$vm" "$@"
    ;;
  ext)
    [[ $# -ge 2 && $1 == -- ]] || usage
    shift
    machines | grep -qx ext || die "this lab has no external host"
    on ext "$@"
    ;;
  kill)
    [[ $# -eq 1 ]] || usage
    V destroy "$(domain_of "$1")" >/dev/null || die "cannot kill $1"
    rm -f "$STATE/cm-$1"
    ;;
  start)
    [[ $# -eq 1 ]] || usage
    V start "$(domain_of "$1")" >/dev/null || die "cannot start $1"
    deadline=$((SECONDS + 600))
    until on "$1" true 2>/dev/null; do
      (( SECONDS < deadline )) || die "$1 did not come back"
      sleep 2
    done
    wait_converged
    ;;
  restart-agent)
    [[ $# -eq 1 ]] || usage
    on "$1" systemctl restart dvr-agent
    ;;
  trace)
    # the offline trace of what the nodes hold (a live trace drives the namespace lab's
    # switches directly: not on VMs)
    args=() offline=no
    for a in "$@"; do
      if [[ $a == --offline ]]; then
        offline=yes
        args+=(--offline "$TOPOLOGY_IN_VM")
      else
        args+=("$a")
      fi
    done
    [[ $offline == yes ]] || die "on VMs only the offline trace runs: trace --offline VM PACKET"
    on "$(machines | grep -v '^ext$' | head -n 1)" dvr trace "${args[@]}"
    ;;
  restart-ovs)
    [[ $# -eq 1 ]] || usage
    # as an upgrade restarts it: the new ovs-vswitchd forwards nothing until the agent has
    # put every flow back and cleared the flag
    on "$1" sh -c 'ovs-vsctl set Open_vSwitch . other_config:flow-restore-wait=true &&
                   systemctl restart ovs-vswitchd'
    ;;
  *) usage ;;
esac
