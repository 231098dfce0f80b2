#!/usr/bin/env bash
# libvirt-up.sh - real libvirt + QEMU for minivan's guest tests, on a Debian 12 host
# without systemd (a container or sandbox where you are root).  Idempotent.
#
#   tools/libvirt-up.sh [up]     install packages when missing, start virtlogd and
#                                libvirtd when not running, define + start the
#                                isolated test network
#   tools/libvirt-up.sh status   show the daemons and the test network
#   tools/libvirt-up.sh stop     destroy running domains and the test network, then stop
#                                the daemons this script started (by their recorded PID)
#
# The test network (no <forward>: no NAT, no routing, ip_forward untouched):
#   MINIVAN_TEST_NET     name     (default minivan-test)
#   MINIVAN_TEST_BRIDGE  bridge   (default mvtest0)
#   MINIVAN_TEST_PREFIX  /24      (default 192.168.199 -> host 192.168.199.1, DHCP .10-.250)
# The bridge also holds 169.254.169.254/32, where a minivan with --metadata-listen
# 169.254.169.254:80 answers the guests' metadata requests.
# PIDs of the daemons it starts are kept in /run/minivan-libvirt/{virtlogd,libvirtd}.pid.
# Debian's NAT network 'default' is never started: its autostart link is removed.
set -euo pipefail

URI=qemu:///system
NET=${MINIVAN_TEST_NET:-minivan-test}
BRIDGE=${MINIVAN_TEST_BRIDGE:-mvtest0}
PREFIX=${MINIVAN_TEST_PREFIX:-192.168.199}
STATE=/run/minivan-libvirt
LOGDIR=/var/log/libvirt

# Host side: libvirt + QEMU (TCG or KVM), dnsmasq + iptables for libvirt networks,
# genisoimage for config drives, libvirt-dev + pkg-config for the libvirt-python binding.
# Guest image builder (tools/make-guest.sh): busybox, syslinux, mtools, dosfstools, fdisk,
# cpio, kmod.  Not libvirt-daemon-system (pulls systemd) and not
# libvirt-daemon-config-network (Debian's NAT 'default' network).
PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients dnsmasq-base iptables
          qemu-system-x86 qemu-utils libvirt-dev pkg-config genisoimage
          busybox-static syslinux syslinux-common mtools dosfstools fdisk cpio kmod iproute2)

T0=$(date +%s.%N)
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f s", b - a }'; }
say() { echo "libvirt-up: $*"; }
virsh_() { virsh -q -c "$URI" "$@"; }

# A PID counts as running when /proc/PID/stat exists and its state is not Z: PID 1 here
# does not always reap orphans at once, so a stopped daemon can stay a zombie for a while
# (kill -0 would still succeed on it).
pid_alive() {
    local pid=$1 stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}
pidfile_alive() { [[ -s $1 ]] && pid_alive "$(cat "$1")"; }
# PID of the process named $2 whose pid file is $1, if alive and really that program
daemon_pid() {
    local pid
    pidfile_alive "$1" || return 1
    pid=$(cat "$1")
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    echo "$pid"
}

packages() {
    local missing=() p t
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        say "packages: all ${#PACKAGES[@]} installed"
        return
    fi
    t=$(now)
    say "packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    say "packages: installed in $(took "$t")"
}

prepare() {
    # libvirtd's QEMU driver looks up its built-in user/group libvirt-qemu at start-up even
    # when qemu.conf names another (libvirt-daemon-system's postinst would create them).
    getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
    getent passwd libvirt-qemu >/dev/null ||
        useradd --system -g libvirt-qemu -d /var/lib/libvirt -M -s /usr/sbin/nologin libvirt-qemu
    mkdir -p "$LOGDIR/qemu" /var/lib/libvirt/images /var/lib/libvirt/dnsmasq "$STATE"
    # QEMU runs as root: it can read images and write console logs anywhere root can,
    # with no chown/ACL dance.  No AppArmor/SELinux here, so no security driver either.
    local conf=/etc/libvirt/qemu.conf
    if ! grep -qs '^user *= *"root"' "$conf"; then
        mkdir -p /etc/libvirt
        printf '# minivan test host (tools/libvirt-up.sh)\nuser = "root"\ngroup = "root"\n' >> "$conf"
    fi
    # swtpm too: libvirtd otherwise picks "tss" when that user exists at its start and root
    # when not, and swtpm_localca's lock file made by one is not writable by the other.
    if ! grep -qs '^swtpm_user *=' "$conf"; then
        printf 'swtpm_user = "root"\nswtpm_group = "root"\n' >> "$conf"
    fi
    # Keep Debian's NAT network 'default' (libvirt-daemon-config-network) from starting.
    local link=/etc/libvirt/qemu/networks/autostart/default.xml
    if [[ -e $link || -L $link ]]; then
        rm -f "$link"
        say "removed $link (no NAT network on a test host)"
    fi
}

wait_for_libvirtd() {
    local i
    for ((i = 0; i < 600; i++)); do
        virsh -c "$URI" version >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    say "libvirtd did not answer on $URI within 30 s; see $LOGDIR/libvirtd.log" >&2
    return 1
}

start_daemons() {
    local t pid
    t=$(now)
    if pid=$(daemon_pid /run/virtlogd.pid virtlogd); then
        say "virtlogd already running, pid $pid"
    else
        virtlogd -d
        pid=$(cat /run/virtlogd.pid)
        echo "$pid" > "$STATE/virtlogd.pid"
        say "virtlogd started, pid $pid"
    fi
    if pid=$(daemon_pid /run/libvirtd.pid libvirtd); then
        say "libvirtd already running, pid $pid"
    elif virsh -c "$URI" version >/dev/null 2>&1; then
        say "a libvirt daemon already answers on $URI (not started here)"
    else
        # No systemd and no D-Bus: libvirtd logs harmless complaints about both
        # (and about dmidecode) at warning level; keep errors only.
        LIBVIRT_LOG_OUTPUTS="3:file:$LOGDIR/libvirtd.log" libvirtd -d
        pid=$(cat /run/libvirtd.pid)
        echo "$pid" > "$STATE/libvirtd.pid"
        say "libvirtd started, pid $pid"
    fi
    wait_for_libvirtd
    say "daemons ready in $(took "$t"): $(virsh -c "$URI" version 2>/dev/null | sed -n 's/^Running hypervisor: //p')"
    # Should anything have started the NAT network anyway, take it down.
    if virsh_ net-list --name 2>/dev/null | grep -qx default &&
       virsh_ net-dumpxml default | grep -q '<forward'; then
        virsh_ net-autostart --disable default >/dev/null || true
        virsh_ net-destroy default >/dev/null
        say "stopped the NAT network 'default'"
    fi
}

# no-ping: dnsmasq otherwise pings a new address and waits 3 s for an answer before
# offering it; on a throwaway isolated test bridge that only slows every guest boot.
net_xml() {  # [uuid]
    cat <<EOF
<network xmlns:dnsmasq='http://libvirt.org/schemas/network/dnsmasq/1.0'>
  <name>$NET</name>${1:+
  <uuid>$1</uuid>}
  <bridge name='$BRIDGE' stp='off' delay='0'/>
  <domain name='$NET' localOnly='yes'/>
  <ip address='$PREFIX.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='$PREFIX.10' end='$PREFIX.250'/>
    </dhcp>
  </ip>
  <dnsmasq:options>
    <dnsmasq:option value='no-ping'/>
  </dnsmasq:options>
</network>
EOF
}

network() {
    local t xml
    t=$(now)
    xml=$(mktemp)
    if ! virsh_ net-info "$NET" >/dev/null 2>&1; then
        net_xml > "$xml"
        virsh_ net-define "$xml" >/dev/null
        say "network $NET defined"
    fi
    # Refuse a same-named network that forwards: tests must stay on an isolated bridge.
    if virsh_ net-dumpxml --inactive "$NET" | grep -q '<forward'; then
        rm -f "$xml"
        say "network $NET exists with a <forward> element; refusing to use it" >&2
        return 1
    fi
    # A definition from an older libvirt-up.sh (no no-ping): update it, and restart the
    # network when no guest is running (guests on it would lose their bridge port).
    if ! virsh_ net-dumpxml --inactive "$NET" | grep -q "value='no-ping'"; then
        net_xml "$(virsh_ net-uuid "$NET")" > "$xml"
        virsh_ net-define "$xml" >/dev/null
        say "network $NET redefined with dnsmasq no-ping"
        if virsh_ net-list --name | grep -qx "$NET"; then
            if [[ -z $(virsh_ list --name) ]]; then
                virsh_ net-destroy "$NET" >/dev/null
            else
                say "network $NET: restart it when no guest runs to apply no-ping"
            fi
        fi
    fi
    rm -f "$xml"
    virsh_ net-autostart "$NET" >/dev/null
    if virsh_ net-list --name | grep -qx "$NET"; then
        say "network $NET already active"
    else
        # (libvirtd may be autostarting it right now: a failed start is fine if it is up)
        virsh_ net-start "$NET" >/dev/null 2>&1 || virsh_ net-list --name | grep -qx "$NET" ||
            virsh_ net-start "$NET" >/dev/null
        say "network $NET started in $(took "$t")"
    fi
    # The metadata service's link-local address, on the bridge, for minivan's
    # --metadata-listen 169.254.169.254:80 (guests reach it on-link, nothing is routed).
    local bridge
    bridge=$(virsh_ net-info "$NET" | awk '/^Bridge:/ {print $2}')
    ip -4 addr show dev "$bridge" | grep -q ' 169.254.169.254/' ||
        ip addr add 169.254.169.254/32 dev "$bridge"
    say "network $NET: bridge $(virsh_ net-info "$NET" | awk '/^Bridge:/ {print $2}')," \
        "$PREFIX.0/24, host $PREFIX.1 and 169.254.169.254, DHCP $PREFIX.10-$PREFIX.250," \
        "no forwarding"
}

status() {
    local d pid
    for d in virtlogd libvirtd; do
        if pid=$(daemon_pid "/run/$d.pid" "$d"); then
            if [[ -s $STATE/$d.pid && $(cat "$STATE/$d.pid") == "$pid" ]]; then
                say "$d running, pid $pid (started by libvirt-up.sh)"
            else
                say "$d running, pid $pid"
            fi
        else
            say "$d not running"
        fi
    done
    if virsh -c "$URI" version >/dev/null 2>&1; then
        virsh -c "$URI" net-list --all
        virsh -c "$URI" list --all
    fi
}

stop_pid() {  # name pid: SIGTERM, wait up to 10 s, then SIGKILL
    local name=$1 pid=$2 i
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        pid_alive "$pid" || { say "$name (pid $pid) stopped"; return 0; }
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    say "$name (pid $pid) killed"
}

stop() {
    local t d ours pid
    t=$(now)
    for d in libvirtd virtlogd; do
        ours=
        [[ -s $STATE/$d.pid ]] && ours=$(cat "$STATE/$d.pid")
        if [[ -z $ours ]] || ! pid_alive "$ours" ||
           [[ $(cat "/proc/$ours/comm" 2>/dev/null) != "$d" ]]; then
            say "$d: nothing started by libvirt-up.sh is running"
            rm -f "$STATE/$d.pid"
            continue
        fi
        if [[ $d == libvirtd ]]; then
            # Guests and the network's dnsmasq would outlive libvirtd: end them first.
            for pid in $(virsh_ list --name 2>/dev/null); do
                virsh_ destroy "$pid" >/dev/null && say "destroyed domain $pid"
            done
            if virsh_ net-list --name 2>/dev/null | grep -qx "$NET"; then
                virsh_ net-destroy "$NET" >/dev/null && say "network $NET stopped (still defined)"
            fi
        fi
        stop_pid "$d" "$ours"
        rm -f "$STATE/$d.pid"
    done
    say "stop done in $(took "$t")"
}

case "${1:-up}" in
    up)
        [[ $(id -u) == 0 ]] || { say "must run as root" >&2; exit 1; }
        packages
        prepare
        start_daemons
        network
        say "up in $(took "$T0") (libvirtd pid $(cat /run/libvirtd.pid 2>/dev/null || echo '?')," \
            "virtlogd pid $(cat /run/virtlogd.pid 2>/dev/null || echo '?'))"
        ;;
    stop) stop ;;
    status) status ;;
    -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) echo "usage: $0 [up|status|stop]" >&2; exit 2 ;;
esac
