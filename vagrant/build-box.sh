#!/usr/bin/env bash
# Builds the Vagrant box of the dvr lab (provider libvirt) from nothing but Debian's
# packages: a Debian 12 root made by debootstrap, on a bootable qcow2 disk, with the
# `vagrant` user Vagrant expects, Open vSwitch (kernel datapath) and every package dvr needs,
# and dvr's Python dependencies already in /opt/dvr/venv, so that provisioning under
# emulation only installs dvr's own wheel.
#
#   vagrant/build-box.sh [--check] [--add] [--force]
#
#   (none)   build the box unless one with the same content is cached; print its path
#   --check  then boot it once under QEMU (TCG: no hardware virtualisation needed), log in
#            over ssh with Vagrant's insecure key, and check sudo, Open vSwitch and its
#            kernel module
#   --add    then `vagrant box add` it as dvr/debian12 (replacing an older one)
#   --force  build even if cached
#
# The box is cached by content: the name carries a digest of this script, the package list
# and dvr's Python dependencies (pyproject.toml), so a change to any of them builds anew and
# running it again otherwise does nothing. Cache: $DVR_BOX_CACHE (/var/cache/dvr-vagrant);
# the packages debootstrap fetched stay there too. Mirror: $DVR_DEBIAN_MIRROR. Needs root
# (debootstrap, a loop device for the boot loader). Exits non-zero with one line on stderr
# when a step fails; nothing half-built is left in the cache.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
CACHE=${DVR_BOX_CACHE:-/var/cache/dvr-vagrant}
MIRROR=${DVR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
BOX_NAME=dvr/debian12
DISK_GB=4
VENV=/opt/dvr/venv
# in the guest: the boot, the network, ssh, and what dvr and its lab use
PACKAGES=(
  systemd-sysv udev dbus linux-image-amd64 grub-pc initramfs-tools kmod
  ifupdown isc-dhcp-client openssh-server sudo ca-certificates
  openvswitch-switch openvswitch-common conntrack conntrackd nftables iproute2
  iputils-ping tcpdump ethtool iperf3 procps less rsync
  python3 python3-venv
)
# on this machine
HOST_PACKAGES=(debootstrap qemu-utils e2fsprogs fdisk util-linux)

check=no add=no force=no
for arg in "$@"; do
  case $arg in
    --check) check=yes ;;
    --add) add=yes ;;
    --force) force=yes ;;
    *) echo "build-box.sh: unknown argument $arg (see the head of $0)" >&2; exit 2 ;;
  esac
done

say() { echo "build-box: $*"; }
die() { echo "build-box: error: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "run as root (debootstrap, loop devices)"

# --- what the box is made of, and its name ------------------------------------------------
python_deps() {
  python3 - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))
EOF
}
DEPS=$(python_deps) || die "cannot read dvr's dependencies from $ROOT/pyproject.toml"
DIGEST=$( { cat "$0"; printf '%s\n' "${PACKAGES[@]}" "$SUITE"; echo "$DEPS"; } \
          | sha256sum | cut -c1-12)
BOX=$CACHE/dvr-debian12-$DIGEST.box

vagrant_key() {
  # Vagrant's well-known insecure key pair, as the vagrant package ships it
  local dir
  for dir in /usr/share/rubygems-integration/all/gems/vagrant-*/keys \
             /opt/vagrant/embedded/gems/gems/vagrant-*/keys; do
    [[ -f $dir/vagrant.pub ]] && { echo "$dir"; return 0; }
  done
  return 1
}

host_packages() {
  local missing=() p
  for p in "${HOST_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$p")
  done
  vagrant_key >/dev/null || missing+=(vagrant)
  [[ $check == yes ]] && ! command -v qemu-system-x86_64 >/dev/null && missing+=(qemu-system-x86)
  if [[ ${#missing[@]} -gt 0 ]]; then
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || die "apt-get install ${missing[*]} failed"
  fi
}

# --- the build ------------------------------------------------------------------------------
WORK="" LOOP="" MNT=""
cleanup() {
  set +e
  if [[ -n $MNT ]]; then
    for m in dev/pts dev proc sys; do umount "$MNT/$m" 2>/dev/null; done
    umount "$MNT" 2>/dev/null
  fi
  [[ -n $LOOP ]] && { partx -d "$LOOP" 2>/dev/null; losetup -d "$LOOP"; }
  [[ -n $WORK ]] && rm -rf "$WORK"
}
trap cleanup EXIT

in_root() { chroot "$MNT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
              DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 HOME=/root "$@"; }

build() {
  local keys started=$SECONDS
  keys=$(vagrant_key) || die "Vagrant's insecure key not found (is the vagrant package installed?)"
  install -d "$CACHE/debs"
  WORK=$(mktemp -d "$CACHE/build.XXXXXX")
  MNT=$WORK/root

  # a disk of one bootable partition, its file system made on a loop device (no udev here:
  # the partition's device comes from partx, not from `losetup -P`)
  truncate -s "${DISK_GB}G" "$WORK/disk.raw"
  echo 'start=2048, type=83, bootable' | sfdisk -q "$WORK/disk.raw" >/dev/null
  LOOP=$(losetup -f --show "$WORK/disk.raw")
  partx -a "$LOOP" 2>/dev/null || true
  [[ -b ${LOOP}p1 ]] || die "no partition device ${LOOP}p1 after partx"
  mkfs.ext4 -q -L root "${LOOP}p1"
  mkdir -p "$MNT"
  mount "${LOOP}p1" "$MNT"

  say "debootstrap $SUITE from $MIRROR"
  debootstrap --variant=minbase --cache-dir="$CACHE/debs" \
    --include="$(IFS=,; echo "${PACKAGES[*]}")" "$SUITE" "$MNT" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 || { tail -n 20 "$WORK/debootstrap.log" >&2; \
                                       die "debootstrap failed"; }
  for m in dev dev/pts proc sys; do mount --bind "/$m" "$MNT/$m"; done

  say "configuring the guest"
  echo dvr >"$MNT/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 dvr\n' >"$MNT/etc/hosts"
  echo 'LABEL=root / ext4 errors=remount-ro 0 1' >"$MNT/etc/fstab"
  cat >"$MNT/etc/network/interfaces" <<'EOF'
# the first NIC is Vagrant's management network (DHCP); the lab's networks are set up by
# vagrant/provision.sh
source /etc/network/interfaces.d/*
auto lo
iface lo inet loopback
allow-hotplug eth0
iface eth0 inet dhcp
EOF
  cp /etc/resolv.conf "$MNT/etc/resolv.conf"
  # every VM made from the box gets its own machine-id (DHCP client id) and ssh host keys
  : >"$MNT/etc/machine-id"
  rm -f "$MNT"/etc/ssh/ssh_host_*
  cat >"$MNT/etc/systemd/system/ssh-host-keys.service" <<'EOF'
[Unit]
Description=Generate the ssh host keys of a new machine
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
  in_root systemctl enable -q ssh-host-keys.service openvswitch-switch.service
  echo 'UseDNS no' >"$MNT/etc/ssh/sshd_config.d/dvr.conf"
  # the vagrant user: the insecure key (Vagrant replaces it on first `vagrant up`),
  # password-less sudo
  in_root useradd -m -s /bin/bash vagrant
  install -d -m 700 -o 1000 -g 1000 "$MNT/home/vagrant/.ssh"
  install -m 600 -o 1000 -g 1000 "$keys/vagrant.pub" "$MNT/home/vagrant/.ssh/authorized_keys"
  echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$MNT/etc/sudoers.d/vagrant"
  chmod 440 "$MNT/etc/sudoers.d/vagrant"
  # the serial console (QEMU's -nographic, libvirt's console) and eth0 as the NIC's name
  cat >"$MNT/etc/default/grub" <<'EOF'
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200 net.ifnames=0 biosdevname=0"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_DISABLE_LINUX_UUID=true
GRUB_DISABLE_OS_PROBER=true
EOF
  echo openvswitch >"$MNT/etc/modules-load.d/openvswitch.conf"

  say "dvr's Python dependencies into $VENV"
  # as wheels made here, with this machine's pip and its index and certificates (the guest
  # has neither), then installed in the guest from them alone; both are Python 3.11
  local pip=$ROOT/.venv/bin/pip deps
  if [[ ! -x $pip ]]; then
    python3 -m venv "$WORK/pip" && pip=$WORK/pip/bin/pip
  fi
  mapfile -t deps <<<"$DEPS"
  mkdir -p "$MNT/tmp/wheels"
  "$pip" wheel -q -w "$MNT/tmp/wheels" "${deps[@]}" >"$WORK/pip.log" 2>&1 \
    || { tail -n 20 "$WORK/pip.log" >&2; die "pip wheel of dvr's dependencies failed"; }
  in_root python3 -m venv "$VENV"
  in_root "$VENV/bin/pip" install -q --no-index --find-links /tmp/wheels "${deps[@]}" \
    >>"$WORK/pip.log" 2>&1 \
    || { tail -n 20 "$WORK/pip.log" >&2; die "pip install of dvr's dependencies failed"; }
  rm -rf "$MNT/tmp/wheels"

  say "boot loader"
  in_root grub-install --target=i386-pc "$LOOP" >"$WORK/grub.log" 2>&1 \
    || { tail -n 20 "$WORK/grub.log" >&2; die "grub-install failed"; }
  in_root update-grub >>"$WORK/grub.log" 2>&1 || die "update-grub failed"
  # the disk is /dev/vda in the guest, not this loop device: the root by its label
  sed -i "s#root=${LOOP}p1#root=LABEL=root#g" "$MNT/boot/grub/grub.cfg"
  grep -q 'root=LABEL=root' "$MNT/boot/grub/grub.cfg" || die "grub.cfg names no root=LABEL=root"

  in_root apt-get clean
  rm -f "$MNT/etc/resolv.conf"
  for m in dev/pts dev proc sys; do umount "$MNT/$m"; done
  umount "$MNT"
  MNT=""
  partx -d "$LOOP" 2>/dev/null || true
  losetup -d "$LOOP"
  LOOP=""

  say "qcow2 image and box"
  qemu-img convert -c -O qcow2 "$WORK/disk.raw" "$WORK/box.img"
  rm -f "$WORK/disk.raw"
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$DISK_GB" \
    >"$WORK/metadata.json"
  cat >"$WORK/Vagrantfile" <<'EOF'
# the box's defaults; the lab's vagrant/Vagrantfile sets the rest
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.disk_bus = "virtio"
    lv.nic_model_type = "virtio"
  end
end
EOF
  tar -cf "$WORK/box" -C "$WORK" metadata.json Vagrantfile box.img
  mv "$WORK/box" "$BOX"   # whole, or not at all
  ln -sf "$(basename "$BOX")" "$CACHE/dvr-debian12.box"
  say "built $BOX ($(du -m "$BOX" | cut -f1) MB) in $((SECONDS - started)) s"
}

# --- one boot under QEMU ------------------------------------------------------------------------
boot_check() {
  local keys dir port pid ok=no started=$SECONDS
  keys=$(vagrant_key)
  dir=$(mktemp -d "$CACHE/check.XXXXXX")
  tar -xf "$BOX" -C "$dir" box.img
  qemu-img create -q -f qcow2 -F qcow2 -b "$dir/box.img" "$dir/disk.qcow2"
  cp "$keys/vagrant" "$dir/key" && chmod 600 "$dir/key"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  local accel=(-accel tcg -cpu max)
  grep -qE '\b(vmx|svm)\b' /proc/cpuinfo && [[ -w /dev/kvm ]] && accel=(-accel kvm -cpu host)
  qemu-system-x86_64 "${accel[@]}" -m 1024 -smp 1 -display none -serial "file:$dir/console.log" \
    -drive "file=$dir/disk.qcow2,if=virtio" \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=n0 \
    -pidfile "$dir/qemu.pid" -daemonize >/dev/null
  pid=$(cat "$dir/qemu.pid")
  local ssh=(ssh -q -i "$dir/key" -p "$port" -o StrictHostKeyChecking=no
             -o UserKnownHostsFile=/dev/null -o ConnectTimeout=5 -o BatchMode=yes
             vagrant@127.0.0.1)
  say "booting it under QEMU (${accel[*]}), ssh on 127.0.0.1:$port"
  while (( SECONDS - started < 600 )); do
    if "${ssh[@]}" true 2>/dev/null; then ok=yes; break; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 3
  done
  if [[ $ok == yes ]]; then
    say "logged in after $((SECONDS - started)) s"
    "${ssh[@]}" 'sudo -n true && sudo modprobe openvswitch && sudo ovs-vsctl --version | head -1 \
      && sudo ovs-vsctl add-br br-check -- set bridge br-check datapath_type=system \
      && sudo ovs-dpctl show | head -1 && sudo ovs-vsctl del-br br-check \
      && /opt/dvr/venv/bin/python -c "import os_ken, ovsdbapp, oslo_config, scapy; print(\"python deps: ok\")"' \
      || ok=no
  fi
  kill "$pid" 2>/dev/null || true
  local i
  for i in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
  if [[ $ok != yes ]]; then
    tail -n 30 "$dir/console.log" >&2
    rm -rf "$dir"
    die "the box did not boot to a working login (console above)"
  fi
  rm -rf "$dir"
  say "check passed: boot, ssh with Vagrant's key, sudo, Open vSwitch on the kernel datapath"
}

host_packages
if [[ -f $BOX && $force == no ]]; then
  say "cached: $BOX"
else
  build
fi
[[ $check == yes ]] && boot_check
if [[ $add == yes ]]; then
  vagrant box add -f --name "$BOX_NAME" "$BOX" >/dev/null || die "vagrant box add failed"
  say "added as $BOX_NAME"
fi
echo "$BOX"
