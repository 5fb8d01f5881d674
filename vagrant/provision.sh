#!/bin/bash
# Provision one node of the dvr cloud on a Debian 12 VM (run by Vagrant as root; safe to
# re-run with `vagrant provision`).
#
#   provision.sh NODE UNDERLAY SRC [TOPOLOGY]
#
#   NODE      this node's name, as under `nodes:` in the topology (compute1, compute2, net1)
#   UNDERLAY  every node's tunnel endpoint: compute1=198.18.0.11,compute2=198.18.0.12,...
#   SRC       the project's source tree inside the VM (rsynced by Vagrant)
#   TOPOLOGY  topology file, relative to SRC (default: dvr/examples/default.yaml)
#
# Result: Open vSwitch with br-int (kernel datapath), the project in a venv, the topology
# with each node's tunnel_ip in /etc/dvr/topology.yaml, /etc/dvr/agent.ini, the
# dvr-agent.service unit running, and this node's VMs (network namespaces named after the
# VMs, as `dvr lab` plays them) plugged into br-int the way Nova/os-vif plug them.
set -euo pipefail

NODE=${1:?usage: provision.sh NODE UNDERLAY SRC [TOPOLOGY]}
UNDERLAY=${2:?usage: provision.sh NODE UNDERLAY SRC [TOPOLOGY]}
SRC=${3:?usage: provision.sh NODE UNDERLAY SRC [TOPOLOGY]}
TOPOLOGY=${4:-dvr/examples/default.yaml}

VENV=/opt/dvr/venv
ETC=/etc/dvr
STATE=/var/lib/dvr
BRIDGE=br-int
export DEBIAN_FRONTEND=noninteractive

log() { echo "dvr-provision[$NODE]: $*"; }
die() { echo "dvr-provision[$NODE]: error: $*" >&2; exit 1; }

LOCAL_IP=""
declare -A IP_OF=()
NODES=()
IFS=, read -ra pairs <<<"$UNDERLAY"
for pair in "${pairs[@]}"; do
    IP_OF[${pair%%=*}]=${pair#*=}
    NODES+=("${pair%%=*}")
    [[ $pair == "$NODE="* ]] && LOCAL_IP=${pair#*=}
done
[[ -n $LOCAL_IP ]] || die "no underlay address for $NODE in '$UNDERLAY'"

# the northbound database: a RAFT cluster, one member per node named here, the first
# creating it; agents reach every member on NB_PORT, schedulers on NB_SCHEDULER_PORT (each
# remote with its role: docs/security.md), members talk RAFT on NB_RAFT_PORT; all TLS with
# the lab's PKI (vagrant/lab.sh makes it, the Vagrantfile copies this node's files to
# /tmp/dvr-pki), plain TCP only with DVR_NB_TCP=1 (no roles then: one remote for all)
NB_PORT=6641
NB_SCHEDULER_PORT=6642
NB_ADMIN_PORT=6644
NB_RAFT_PORT=6643
PKI=$ETC/pki
if [[ ${DVR_NB_TCP:-0} == 1 ]]; then
    PROTO=tcp
    NB_SCHEDULER_PORT=$NB_PORT
else
    PROTO=ssl
fi
IFS=, read -ra NB_MEMBERS <<<"${DVR_NB_MEMBERS:-$(IFS=,; echo "${NODES[*]}")}"
NB_REMOTES=""
NB_SCHEDULER_REMOTES=""
NB_MEMBER=no
for m in "${NB_MEMBERS[@]}"; do
    [[ -n ${IP_OF[$m]:-} ]] || die "northbound member $m has no underlay address"
    NB_REMOTES+="${NB_REMOTES:+,}$PROTO:${IP_OF[$m]}:$NB_PORT"
    NB_SCHEDULER_REMOTES+="${NB_SCHEDULER_REMOTES:+,}$PROTO:${IP_OF[$m]}:$NB_SCHEDULER_PORT"
    [[ $m == "$NODE" ]] && NB_MEMBER=yes
done
NB_FIRST_IP=${IP_OF[${NB_MEMBERS[0]}]}
[[ -f $SRC/pyproject.toml ]] || die "no project at $SRC (is the rsync synced folder there?)"
[[ -f $SRC/$TOPOLOGY ]] || die "no topology file $SRC/$TOPOLOGY"

log "packages"
PACKAGES=(openvswitch-switch iproute2 nftables tcpdump ethtool iperf3 python3-venv)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then   # the dvr/debian12 box has them all: nothing fetched
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
systemctl enable --now openvswitch-switch

log "the project into $VENV"
if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
fi
WHEEL=$(ls "$SRC"/vagrant/.wheel/dvr-*.whl 2>/dev/null | head -n 1 || true)
if [[ -n $WHEEL ]]; then
    # the wheel the Vagrantfile built from the checkout; its dependencies are the box's
    # (vagrant/build-box.sh): nothing is fetched
    "$VENV/bin/pip" install -q --no-deps --no-index --force-reinstall "$WHEEL"
    "$VENV/bin/pip" check -q >/dev/null || die "dvr's dependencies are missing from $VENV: \
rebuild the box (vagrant/build-box.sh --add)"
else
    reinstall=$("$VENV/bin/pip" show -q dvr >/dev/null 2>&1 && echo yes || echo no)
    "$VENV/bin/pip" install -q "$SRC"
    if [[ $reinstall == yes ]]; then   # same version number: make pip take the synced code
        "$VENV/bin/pip" install -q --no-deps --force-reinstall "$SRC"
    fi
fi
ln -sf "$VENV/bin/dvr" /usr/local/bin/dvr
ln -sf "$VENV/bin/dvr-agent" /usr/local/bin/dvr-agent

log "integration bridge $BRIDGE"
ovs-vsctl --may-exist add-br "$BRIDGE" -- set Bridge "$BRIDGE" datapath_type=system \
    fail_mode=secure protocols=OpenFlow10,OpenFlow13,OpenFlow14,OpenFlow15

EXT_IF=${DVR_EXTERNAL_IF:-eth2}
log "provider bridge br-ex (uplink $EXT_IF when the VM has one)"
ovs-vsctl --may-exist add-br br-ex -- set Bridge br-ex datapath_type=system
if ip link show "$EXT_IF" >/dev/null 2>&1; then
    ovs-vsctl --may-exist add-port br-ex "$EXT_IF"
    ip link set "$EXT_IF" up
    # up again after a reboot (`lab.sh kill` and `start`), with no address
    cat >"/etc/network/interfaces.d/dvr-$EXT_IF" <<EOF
# the uplink of br-ex to the provider network: up, no address (vagrant/provision.sh)
auto $EXT_IF
iface $EXT_IF inet manual
    up ip link set \$IFACE up
EOF
fi

log "topology $ETC/topology.yaml (from $TOPOLOGY, with each node's tunnel_ip)"
install -d -m 755 "$ETC" "$STATE"
TLS_ARGS=()
if [[ $PROTO == ssl ]]; then
    log "TLS identity $PKI/$NODE-cert.pem (CN $NODE)"
    install -d -m 700 "$PKI"
    for f in cacert.pem "$NODE-cert.pem" "$NODE-privkey.pem"; do
        if [[ -f /tmp/dvr-pki/$f ]]; then
            install -m "$([[ $f == *privkey* ]] && echo 600 || echo 644)" "/tmp/dvr-pki/$f" "$PKI/$f"
        fi
        [[ -f $PKI/$f ]] || die "no $f for $NODE: bring the lab up with vagrant/lab.sh up (it \
makes the lab's PKI), or set DVR_NB_TCP=1 for plain TCP"
    done
    rm -rf /tmp/dvr-pki
    TLS_ARGS=(--private-key="$PKI/$NODE-privkey.pem" --certificate="$PKI/$NODE-cert.pem"
              --ca-cert="$PKI/cacert.pem")
fi
"$VENV/bin/python" - "$SRC/$TOPOLOGY" "$UNDERLAY" "$ETC/topology.yaml" <<'EOF'
import os, sys, yaml
from flows.model import TopologyError, parse_topology

src, underlay, dst = sys.argv[1:]
ips = dict(p.split("=", 1) for p in underlay.split(","))
data = yaml.safe_load(open(src))
missing = [n for n in data.get("nodes") or {} if n not in ips]
if missing:
    sys.exit(f"topology nodes without an underlay address: {', '.join(missing)}")
for name, spec in data["nodes"].items():
    spec = spec if isinstance(spec, dict) else {}
    spec["tunnel_ip"] = ips[name]
    data["nodes"][name] = spec
text = (f"# generated by vagrant/provision.sh from {src}: edit that file and re-provision\n"
        + yaml.safe_dump(data, sort_keys=False))
try:
    parse_topology(text, dst)  # every rule, before the agents see it
except TopologyError as exc:
    sys.exit(f"invalid topology: {exc}")
with open(dst + ".tmp", "w") as f:
    f.write(text)
os.replace(dst + ".tmp", dst)
EOF

if [[ $NB_MEMBER == yes ]]; then
    log "northbound database member (RAFT, ${#NB_MEMBERS[@]} members: ${NB_MEMBERS[*]})"
    install -d -m 755 /var/log/dvr
    if [[ ! -f $STATE/nb.db ]]; then
        if [[ $LOCAL_IP == "$NB_FIRST_IP" ]]; then
            ovsdb-tool create-cluster "$STATE/nb.db" "$SRC/flows/nb.ovsschema" \
                "$PROTO:$LOCAL_IP:$NB_RAFT_PORT"
        else
            ovsdb-tool join-cluster "$STATE/nb.db" DVR_Northbound \
                "$PROTO:$LOCAL_IP:$NB_RAFT_PORT" "$PROTO:$NB_FIRST_IP:$NB_RAFT_PORT"
        fi
    fi
    cat >/etc/systemd/system/dvr-nb.service <<EOF
[Unit]
Description=dvr: member of the clustered northbound database (the desired state)
Documentation=file://$SRC/vagrant/README.md
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
RuntimeDirectory=dvr
RuntimeDirectoryPreserve=yes
ExecStart=/usr/sbin/ovsdb-server $STATE/nb.db $(if [[ $PROTO == ssl ]]; then
    echo "--remote=db:DVR_Northbound,NB_Global,connections ${TLS_ARGS[*]}"
else
    echo "--remote=ptcp:$NB_PORT:$LOCAL_IP"; fi) \\
    --remote=punix:/run/dvr/nb.sock --unixctl=/run/dvr/nb.ctl \\
    --log-file=/var/log/dvr/nb.log --no-chdir -vconsole:off
Restart=on-failure
RestartSec=1

[Install]
WantedBy=multi-user.target
EOF
    systemctl daemon-reload
    systemctl enable dvr-nb.service
    systemctl restart dvr-nb.service
    # the machines come up in parallel: under emulation the member that creates the cluster
    # may still be minutes behind this one, so wait long, and say so
    log "waiting for this member to join the cluster (through ${NB_MEMBERS[0]}, $NB_FIRST_IP)"
    joined=no
    started=$SECONDS
    while (( SECONDS - started < ${DVR_NB_JOIN_TIMEOUT:-900} )); do
        if ovs-appctl -t /run/dvr/nb.ctl cluster/status DVR_Northbound 2>/dev/null |
            grep -q '^Status: cluster member'; then
            joined=yes
            break
        fi
        (( (SECONDS - started) % 60 == 59 )) && log "still joining after $((SECONDS - started)) s"
        sleep 1
    done
    if [[ $joined != yes ]]; then
        ovs-appctl -t /run/dvr/nb.ctl cluster/status DVR_Northbound 2>&1 | sed 's/^/    /' >&2 || true
        die "not a member of the northbound cluster after $((SECONDS - started)) s"
    fi
    log "joined the cluster in $((SECONDS - started)) s"
    # the project's schema is newer than the database's: convert it in place
    if [[ $(ovsdb-client needs-conversion unix:/run/dvr/nb.sock \
            "$SRC/flows/nb.ovsschema") == yes ]]; then
        log "converting the northbound database to the project's schema"
        ovsdb-client convert unix:/run/dvr/nb.sock "$SRC/flows/nb.ovsschema"
    fi
    if [[ $PROTO == ssl && $LOCAL_IP == "$NB_FIRST_IP" ]]; then
        # the members' remotes and the roles of their clients (rows of the database: every
        # member listens on them); the roleless one on each member's loopback only
        log "the members' TLS remotes: agents :$NB_PORT, schedulers :$NB_SCHEDULER_PORT"
        "$VENV/bin/dvr" nb --db unix:/run/dvr/nb.sock set-connection \
            role=dvr-agent "pssl:$NB_PORT" role=dvr-scheduler "pssl:$NB_SCHEDULER_PORT" \
            role= "pssl:$NB_ADMIN_PORT:127.0.0.1"
    fi
fi

# the desired state is written through a remote without a role: a member's own unix socket
# (with TLS, the nodes' certificates may write only their agents' reports)
if [[ $PROTO == tcp ]]; then
    LOAD_DB=$NB_REMOTES
elif [[ $NB_MEMBER == yes ]]; then
    LOAD_DB=unix:/run/dvr/nb.sock
else
    LOAD_DB=""
fi
if [[ -z $LOAD_DB ]]; then
    log "desired state: loaded by the northbound members (not one here)"
else
log "desired state into the northbound database ($LOAD_DB)"
loaded=no
started=$SECONDS
while (( SECONDS - started < ${DVR_NB_JOIN_TIMEOUT:-900} )); do   # a leader may still be elected,
    if "$VENV/bin/dvr" nb --db "$LOAD_DB" load "$ETC/topology.yaml"; then   # or members be joining
        loaded=yes
        break
    fi
    sleep 2
done
[[ $loaded == yes ]] || die "cannot load the topology into the northbound database \
after $((SECONDS - started)) s"
fi

log "agent configuration $ETC/agent.ini (from the package's sample)"
# the sample oslo-config-generator made of the agent's options, each value set in place
install -m 0644 "$SRC/agent/etc/agent.ini.sample" "$ETC/agent.ini.sample"
cp "$ETC/agent.ini.sample" "$ETC/agent.ini"
set_opt() {  # SECTION KEY VALUE: uncomment and set KEY in SECTION of agent.ini
  "$VENV/bin/python" - "$ETC/agent.ini" "$@" <<'PY'
import re, sys
path, section, key, value = sys.argv[1:]
out, current, done = [], None, False
for line in open(path).read().split("\n"):
    m = re.match(r"^\[(.+)\]$", line)
    if m:
        current = m.group(1)
    if current == section and not done and re.match(rf"^#?{re.escape(key)} =", line):
        line, done = f"{key} = {value}", True
    out.append(line)
if not done:
    sys.exit(f"agent.ini.sample has no option [{section}] {key}")
open(path, "w").write("\n".join(out))
PY
}
set_opt DEFAULT node "$NODE"
set_opt ovs ovsdb_connection unix:/var/run/openvswitch/db.sock
set_opt ovs integration_bridge "$BRIDGE"
set_opt ovs datapath_type system
set_opt ovs tunnel_type vxlan
set_opt ovs local_ip "$LOCAL_IP"
# the desired state: the northbound database's members (the file is what was loaded there)
set_opt topology source nb
set_opt topology nb_connection "$NB_REMOTES"
set_opt topology file "$ETC/topology.yaml"
if [[ $PROTO == ssl ]]; then
    set_opt northbound private_key "$PKI/$NODE-privkey.pem"
    set_opt northbound certificate "$PKI/$NODE-cert.pem"
    set_opt northbound ca_cert "$PKI/cacert.pem"
fi
set_opt agent status_file "$STATE/agent-status.json"
set_opt metrics bind_host 127.0.0.1

log "dvr-agent.service (the package's unit)"
install -m 0644 "$SRC/agent/etc/dvr-agent.service" /etc/systemd/system/dvr-agent.service
mkdir -p /etc/systemd/system/dvr-agent.service.d
cat >/etc/systemd/system/dvr-agent.service.d/lab.conf <<EOF
# this lab's northbound database member runs on the node: start after it
[Unit]
After=dvr-nb.service
EOF

log "ovs-vswitchd starts holding its datapath until the agent's flows are in"
# at boot as at a restart: with flow-restore-wait the switch forwards nothing and answers no
# BFD until the agent has put every flow back and cleared it, so a rebooted node draws no
# traffic (no compute node steers SNAT to it) before it can serve it
mkdir -p /etc/systemd/system/ovs-vswitchd.service.d
cat >/etc/systemd/system/ovs-vswitchd.service.d/dvr.conf <<EOF
[Service]
ExecStartPre=-/usr/bin/ovs-vsctl --no-wait set Open_vSwitch . other_config:flow-restore-wait=true
EOF

ROLE=$("$VENV/bin/python" -c 'import sys
from flows.model import load_topology
print(load_topology(sys.argv[1]).nodes[sys.argv[2]].role)' "$ETC/topology.yaml" "$NODE")
if [[ $ROLE == network ]]; then
    log "dvr-scheduler.service (the package's unit; a network node)"
    install -m 0644 "$SRC/agent/etc/dvr-scheduler.service" /etc/systemd/system/dvr-scheduler.service
    mkdir -p /etc/systemd/system/dvr-scheduler.service.d
    cat >/etc/systemd/system/dvr-scheduler.service.d/lab.conf <<EOF
[Service]
Environment=DVR_NB=$NB_SCHEDULER_REMOTES
$(if [[ $PROTO == ssl ]]; then
    echo "Environment=DVR_NB_PRIVATE_KEY=$PKI/$NODE-privkey.pem"
    echo "Environment=DVR_NB_CERTIFICATE=$PKI/$NODE-cert.pem"
    echo "Environment=DVR_NB_CA_CERT=$PKI/cacert.pem"
fi)
EOF
fi

log "VM plugging (dvr-vms.service)"
cat >/usr/local/sbin/dvr-plug-vms <<EOF
#!/bin/bash
# Plug this node's VMs into $BRIDGE: each VM is a network namespace named after it, with
# eth0 carrying the VM's MAC, IP, MTU and default route, its peer tap<VM> on $BRIDGE with
# external_ids:iface-id set as Nova/os-vif set it. Idempotent.
set -euo pipefail
"$VENV/bin/python" - "$ETC/agent.ini" <<'PY' |
import configparser, sys
from flows.model import load_topology

conf = configparser.ConfigParser()
conf.read(sys.argv[1])
node = conf["DEFAULT"]["node"]
topo = load_topology(conf["topology"]["file"])
for vm in sorted(topo.vms_on(node), key=lambda v: v.name):
    net = topo.networks[vm.network]
    gw = net.gateway_ip if topo.router_of(vm.network) else "-"
    print(vm.name, vm.mac, f"{vm.ip}/{net.cidr.prefixlen}", gw, net.mtu, vm.port_id)
PY
while read -r name mac addr gw mtu port; do
    tap="tap\$name"
    [[ -e /run/netns/\$name ]] || ip netns add "\$name"
    if ! ip link show "\$tap" >/dev/null 2>&1; then
        ip link add "\$tap" type veth peer name eth0 netns "\$name"
    fi
    ip link set "\$tap" mtu "\$mtu" up
    ip -n "\$name" link set lo up
    ip -n "\$name" link set eth0 address "\$mac" mtu "\$mtu" up
    ip -n "\$name" addr replace "\$addr" dev eth0
    if [[ \$gw != - ]]; then
        ip -n "\$name" route replace default via "\$gw" dev eth0
    fi
    ovs-vsctl --may-exist add-port $BRIDGE "\$tap" -- set Interface "\$tap" \\
        external_ids:iface-id="\$port" external_ids:attached-mac="\$mac" \\
        external_ids:iface-status=active external_ids:vm-uuid="\$(uuidgen --sha1 --namespace @dns --name \$name)"
    echo "plugged \$name (\$addr, \$mac) into $BRIDGE as \$tap"
done
EOF
chmod 755 /usr/local/sbin/dvr-plug-vms

cat >/etc/systemd/system/dvr-vms.service <<EOF
[Unit]
Description=dvr: plug this node's VMs (network namespaces) into $BRIDGE
Wants=openvswitch-switch.service
After=openvswitch-switch.service ovs-vswitchd.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/dvr-plug-vms

[Install]
WantedBy=multi-user.target
EOF

systemctl daemon-reload
systemctl enable dvr-agent.service dvr-vms.service
if [[ $ROLE == network ]]; then
    systemctl enable dvr-scheduler.service
    systemctl restart dvr-scheduler.service
fi
rm -f "$STATE/agent-status.json"    # wait below for this run's report
systemctl restart dvr-agent.service   # picks up a re-installed project and new config
systemctl restart dvr-vms.service

log "waiting for the agent to report"
for _ in $(seq 1 100); do
    if [[ -s $STATE/agent-status.json ]] &&
        "$VENV/bin/python" -c 'import json,sys; sys.exit(0 if json.load(open(sys.argv[1])).get("converged") else 1)' \
            "$STATE/agent-status.json" 2>/dev/null; then
        log "agent converged: $(cat "$STATE/agent-status.json")"
        exit 0
    fi
    sleep 0.3
done
log "agent has not converged yet (the other nodes may still be coming up):"
cat "$STATE/agent-status.json" 2>/dev/null || true
journalctl -u dvr-agent.service -n 20 --no-pager || true
