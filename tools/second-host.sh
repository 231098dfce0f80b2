#!/usr/bin/env bash
# second-host.sh - a second libvirt daemon on this machine that acts as another compute
# host, for minivan's tests of moves between hosts without shared storage.
#
#   tools/second-host.sh up DIR [PRIVATE...]   start it; prints its libvirt URI
#   tools/second-host.sh stop DIR              destroy its domains, stop its daemons
#   tools/second-host.sh kill DIR              SIGKILL its libvirtd (guests run on)
#   tools/second-host.sh revive DIR            start that libvirtd again, in its namespace
#
# The daemon (libvirtd 9 + its own virtlogd) runs in a mount namespace of its own
# (unshare -m) with fresh tmpfs over /run/libvirt and /var/lib/libvirt, a copy of
# /etc/libvirt without the first daemon's domains, networks and pools, and a host UUID
# of its own, so libvirt sees two hosts and migrates between them.  Each PRIVATE
# directory (e.g. minivan's data directory) is hidden under a tmpfs of its own there:
# what minivan writes to it, that host cannot see, as with a host on another machine.
# Its socket is DIR/sock/libvirt-sock, outside the namespace, so its URI is
#   qemu+unix:///system?socket=DIR/sock/libvirt-sock
# Its guests join the test network of tools/libvirt-up.sh (MINIVAN_TEST_NET, bridge
# MINIVAN_TEST_BRIDGE) through a libvirt network of the same name in bridge mode, when
# that bridge exists.  PIDs are kept in DIR/libvirtd.pid and DIR/virtlogd.pid.
set -euo pipefail

NET=${MINIVAN_TEST_NET:-minivan-test}
BRIDGE=${MINIVAN_TEST_BRIDGE:-mvtest0}
HOST_UUID=${MINIVAN_SECOND_HOST_UUID:-6d696e69-7661-6e2d-686f-737432000002}

say() { echo "second-host: $*" >&2; }
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# pid_of DIR NAME: the pid in DIR/NAME.pid if it is still that program
pid_of() {
    local pid
    [[ -s $1/$2.pid ]] || return 1
    pid=$(cat "$1/$2.pid")
    [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == "$2" ]] || return 1
    echo "$pid"
}

uri_of() { echo "qemu+unix:///system?socket=$1/sock/libvirt-sock"; }

up() {
    local dir=$1; shift
    local path mounts=""
    if pid_of "$dir" libvirtd >/dev/null; then
        uri_of "$dir"
        return
    fi
    command -v libvirtd >/dev/null || { say "libvirtd is missing: run tools/libvirt-up.sh"; exit 1; }
    mkdir -p "$dir/sock"
    rm -rf "$dir/etc"
    mkdir -p "$dir/etc"
    cp -a /etc/libvirt "$dir/etc/libvirt"
    find "$dir/etc/libvirt/qemu" "$dir/etc/libvirt/storage" -name '*.xml' -delete 2>/dev/null || true
    cat > "$dir/etc/libvirt/libvirtd.conf" <<EOF
unix_sock_dir = "$dir/sock"
host_uuid = "$HOST_UUID"
auth_unix_rw = "none"
auth_unix_ro = "none"
EOF
    for path in "$@"; do
        mkdir -p "$path"
        mounts+="mount -t tmpfs -o mode=0755 tmpfs '$path'; "
    done
    rm -f "$dir/sock/libvirt-sock"
    unshare -m --propagation private sh -ec "
        mount -t tmpfs -o mode=0755 tmpfs /run/libvirt
        mount -t tmpfs -o mode=0755 tmpfs /var/lib/libvirt
        mount --bind '$dir/etc/libvirt' /etc/libvirt
        mkdir -p /var/lib/libvirt/qemu /var/lib/libvirt/images /var/lib/libvirt/dnsmasq
        $mounts
        virtlogd -d -p '$dir/virtlogd.pid'
        libvirtd -d -p '$dir/libvirtd.pid' -f /etc/libvirt/libvirtd.conf
    "
    for _ in $(seq 50); do
        [[ -S $dir/sock/libvirt-sock ]] && virsh -q -c "$(uri_of "$dir")" version >/dev/null 2>&1 && break
        sleep 0.2
    done
    virsh -q -c "$(uri_of "$dir")" version >/dev/null || { say "libvirtd did not start"; exit 1; }
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        cat > "$dir/net.xml" <<EOF
<network><name>$NET</name><forward mode='bridge'/><bridge name='$BRIDGE'/></network>
EOF
        virsh -q -c "$(uri_of "$dir")" net-create "$dir/net.xml" >/dev/null
    fi
    say "up: libvirtd pid $(pid_of "$dir" libvirtd), host UUID $HOST_UUID"
    uri_of "$dir"
}

stop() {
    local dir=$1 pid dom
    if pid_of "$dir" libvirtd >/dev/null; then
        for dom in $(virsh -q -c "$(uri_of "$dir")" list --name 2>/dev/null); do
            virsh -q -c "$(uri_of "$dir")" destroy "$dom" >/dev/null 2>&1 || true
        done
    fi
    for name in libvirtd virtlogd; do
        if pid=$(pid_of "$dir" $name); then
            kill "$pid"
            for _ in $(seq 50); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
            [[ -d /proc/$pid ]] && kill -9 "$pid"
        fi
        rm -f "$dir/$name.pid"
    done
    say "stopped"
}

# kill DIR: what a crash of libvirtd does; its guests and virtlogd keep running
kill_daemon() {
    local pid
    pid=$(pid_of "$1" libvirtd) || { say "its libvirtd is not running"; exit 1; }
    kill -9 "$pid"
    for _ in $(seq 50); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
    say "libvirtd $pid killed"
}

# revive DIR: libvirtd again, in the mount namespace its virtlogd (and guests) live in
revive() {
    local dir=$1 anchor
    pid_of "$dir" libvirtd >/dev/null && { say "its libvirtd is running"; return; }
    anchor=$(pid_of "$dir" virtlogd) || { say "its virtlogd is gone: use up"; exit 1; }
    rm -f "$dir/libvirtd.pid"
    nsenter -t "$anchor" -m libvirtd -d -p "$dir/libvirtd.pid" -f /etc/libvirt/libvirtd.conf
    for _ in $(seq 50); do
        virsh -q -c "$(uri_of "$dir")" version >/dev/null 2>&1 && break
        sleep 0.2
    done
    say "libvirtd revived: pid $(pid_of "$dir" libvirtd)"
}

case ${1:-} in
    up) [[ $# -ge 2 ]] || usage; shift; up "$@" ;;
    stop) [[ $# -eq 2 ]] || usage; stop "$2" ;;
    kill) [[ $# -eq 2 ]] || usage; kill_daemon "$2" ;;
    revive) [[ $# -eq 2 ]] || usage; revive "$2" ;;
    *) usage ;;
esac
