#!/usr/bin/env bash
# gate.sh - Nova's integrated gate job run against minivan: a whole cloud, real QEMU guests
# and Tempest with validation on, all inside one network and mount namespace of its own.
#
#   tools/gate.sh ovs|ovn [tempest run args...]
#       ovs: ML2/OVS, the Open vSwitch agent with the DHCP, L3 and metadata agents
#       ovn: ML2/OVN (devstack's default): OVN's northd and controller, its own DHCP
#            and routers, and the OVN metadata agent
#   With no tempest arguments it runs what Tempest's job tempest-integrated-compute runs
#   (tox -e integrated-compute): the API tests and then, serially, the scenario and
#   serial tests, slow ones left out, with the job's exclude list (tools/gate-exclude.txt).
#   Arguments replace that selection, e.g.
#       tools/gate.sh ovn --include-list tools/gate-ci.txt
#
# The namespace (unshare --net --mount): its own loopback and no other interface, so no
# route leads out of it; fresh tmpfs over /run and /var/lib/libvirt, a copy of /etc/libvirt
# and its own /var/log/libvirt, so its libvirtd, Open vSwitch and the network namespaces
# Neutron makes are its own even on a host that runs others.  Inside it run: libvirtd
# (tools/libvirt-up.sh), Keystone, Glance, Cinder (tools/keystone.sh, glance.sh,
# cinder.sh, each with its RabbitMQ), Neutron with NEUTRON_AGENTS=all or ovn
# (tools/neutron.sh: br-ex holds 172.24.4.1/24, the floating IPs' gateway), Open vSwitch
# and OVN on the userspace datapath, minivan on qemu:///system, and
# Tempest, which reaches the guests through their floating IPs.  Nothing in the host's
# own namespace ever sends to a guest address.
#
# Everything stays in GATE_WORK (default: a new /tmp/minivan-gate.XXXXXX, printed):
# logs of every service, tempest/ with tempest.conf, tempest.log and the stestr
# results.  GATE_HOLD=1 keeps the cloud running after Tempest until the file WORK/hold
# is removed (it holds the PID to enter the namespace with: nsenter -t PID -n -m).
# Env: TEMPEST_CONCURRENCY (default 2: this is a job for 2-core machines; the
# upstream job uses 4).  Tempest's ImagesFormatTest reads os-test-images' corpus, made
# by tools/test-images.py as devstack makes it; GLANCE_ENFORCE_IMAGE_FORMAT=False (as
# devstack's) lets those images into Glance whatever their bytes, so that the test's
# compute half boots them on minivan.  Exits with Tempest's status.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MINIVAN_VENV:-$REPO/.venv}
say() { echo "gate: $*"; }
usage() { sed -n '2,/^set /s/^# \{0,1\}//p' "$0" | sed '$d' >&2; exit 2; }

if [[ ${1:-} != --inside ]]; then
    [[ ${1:-} == ovs || ${1:-} == ovn ]] || usage
    [[ $(id -u) == 0 ]] || { say "needs root (namespaces, libvirtd, Open vSwitch)"; exit 1; }
    command -v unshare >/dev/null || { say "no unshare; apt-get install util-linux"; exit 1; }
    WORK=${GATE_WORK:-$(mktemp -d /tmp/minivan-gate.XXXXXX)}
    mkdir -p "$WORK"
    chmod 0755 "$WORK"     # dnsmasq, as nobody, re-reads its hosts files below it
    say "work directory $WORK"
    exec unshare --net --mount --propagation private -- "$0" --inside "$(cd "$WORK" && pwd)" "$@"
fi

shift
WORK=$1 BACKEND=$2
shift 2
# list files given relative to where gate.sh was called (Tempest runs in its workspace)
args=()
while (($#)); do
    args+=("$1")
    if [[ $1 == --include-list || $1 == --exclude-list ]] && (($# > 1)); then
        args+=("$(realpath "$2")")
        shift
    fi
    shift
done
set -- "${args[@]}"
cd "$REPO"

# --- the namespace's own loopback, /run, libvirt state and configuration
ip link set lo up
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lock /run/netns /run/openvswitch
mount -t tmpfs -o mode=0755 tmpfs /var/lib/libvirt
mkdir -p "$WORK/libvirt-log" "$WORK/etc-libvirt"
mount --bind "$WORK/libvirt-log" /var/log/libvirt
rm -rf "$WORK/etc-libvirt"
cp -a /etc/libvirt "$WORK/etc-libvirt"
find "$WORK/etc-libvirt/qemu" "$WORK/etc-libvirt/storage" -name '*.xml' -delete 2>/dev/null || true
find "$WORK/etc-libvirt" -path '*autostart*' -delete 2>/dev/null || true
mount --bind "$WORK/etc-libvirt" /etc/libvirt

LIB_NAME=gate
# shellcheck source=tools/service-lib.sh
source "$REPO/tools/service-lib.sh"       # free_ports
MINIVAN_PID= TEMPEST_PID=
cleanup() {
    set +e
    if [[ -n $TEMPEST_PID ]]; then kill -TERM -- "-$TEMPEST_PID" 2>/dev/null; fi
    if [[ -n $MINIVAN_PID ]]; then
        kill -TERM "$MINIVAN_PID" 2>/dev/null
        for _ in $(seq 100); do [[ -d /proc/$MINIVAN_PID ]] || break; sleep 0.2; done
        kill -KILL "$MINIVAN_PID" 2>/dev/null
    fi
    tools/neutron.sh stop "$WORK/neutron" >/dev/null 2>&1
    tools/cinder.sh stop "$WORK/cinder" >/dev/null 2>&1
    tools/glance.sh stop "$WORK/keystone" >/dev/null 2>&1
    tools/keystone.sh stop "$WORK/keystone" >/dev/null 2>&1
    tools/libvirt-up.sh stop >/dev/null 2>&1
    umount -l "$WORK/minivan/mnt/"* 2>/dev/null
}
trap cleanup EXIT
trap 'exit 143' TERM INT

T0=$SECONDS
tools/libvirt-up.sh up
read -r KEYSTONE_PORT COMPUTE_PORT GLANCE_PORT CINDER_PORT NEUTRON_PORT METADATA_PORT VNC_PORT \
    SERIAL_PORT < <(free_ports 8)
METADATA_SECRET=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
# as devstack without Barbican: Cinder and the compute service share one volume key
FIXED_KEY=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
tools/keystone.sh start "$WORK/keystone" "$KEYSTONE_PORT" "http://127.0.0.1:$COMPUTE_PORT/v2.1"
GLANCE_METADEFS=1 GLANCE_QUOTAS=1 tools/glance.sh start "$WORK/keystone" "$GLANCE_PORT" "$WORK/keystone/env"
CINDER_FIXED_KEY=$FIXED_KEY tools/cinder.sh start "$WORK/cinder" "$CINDER_PORT" "$WORK/keystone/env"
# MariaDB for both back ends, as devstack's MySQL (Tempest filters agents by a type
# whose case differs from Neutron's: MySQL's comparison does not mind, sqlite's does)
NEUTRON_AGENTS=$([[ $BACKEND == ovn ]] && echo ovn || echo all) NEUTRON_DB=mariadb \
    NEUTRON_NOVA_METADATA=127.0.0.1:$METADATA_PORT NEUTRON_METADATA_SECRET=$METADATA_SECRET \
    tools/neutron.sh start "$WORK/neutron" "$NEUTRON_PORT" "$WORK/keystone/env"
tools/make-guest.sh "$WORK/guest.qcow2"
# shellcheck source=/dev/null
source "$WORK/keystone/env"
# shellcheck source=/dev/null
source "$WORK/cinder/env"
# shellcheck source=/dev/null
source "$WORK/neutron/env"

# --- minivan, as devstack configures nova-compute for this job (config drive forced)
mkdir -p "$WORK/minivan"
(
    export MINIVAN_DATA_DIR=$WORK/minivan MINIVAN_PORT=$COMPUTE_PORT MINIVAN_BIND=127.0.0.1
    export MINIVAN_KEYSTONE_URL=$OS_AUTH_URL MINIVAN_KEYSTONE_USERNAME=$MINIVAN_USERNAME
    export MINIVAN_KEYSTONE_PASSWORD=$MINIVAN_PASSWORD MINIVAN_KEYSTONE_PROJECT=$MINIVAN_PROJECT_NAME
    export MINIVAN_LIBVIRT_URI=qemu:///system MINIVAN_VIRT_TYPE=qemu
    export MINIVAN_HOST=$NEUTRON_AGENT_HOST MINIVAN_FORCE_CONFIG_DRIVE=true
    export MINIVAN_METADATA_LISTEN=127.0.0.1:$METADATA_PORT MINIVAN_SERVICE_METADATA_PROXY=true
    export MINIVAN_METADATA_PROXY_SHARED_SECRET=$METADATA_SECRET MINIVAN_FIXED_KEY=$FIXED_KEY
    export MINIVAN_VNC_LISTEN=127.0.0.1:$VNC_PORT MINIVAN_SERIAL_CONSOLE_LISTEN=127.0.0.1:$SERIAL_PORT
    exec "$VENV/bin/python" minivan.py >"$WORK/minivan.log" 2>&1
) &
MINIVAN_PID=$!
for i in $(seq 150); do
    curl -sf "http://127.0.0.1:$COMPUTE_PORT/" >/dev/null && break
    [[ -d /proc/$MINIVAN_PID ]] || { say "minivan exited:"; tail -20 "$WORK/minivan.log"; exit 1; }
    [[ $i == 150 ]] && { say "minivan did not answer in 30 s"; exit 1; }
    sleep 0.2
done
# Cinder's share where minivan looks for it (this kernel has no NFS client: the export is
# bind-mounted, as os-brick finds a share already mounted)
POINT=$("$VENV/bin/python" -c 'import sys, minivan
print(minivan.nfs_mount_point(sys.argv[1], sys.argv[2]))' "$WORK/minivan/mnt" "$CINDER_NFS_SHARE")
mkdir -p "$POINT"
mount --bind "$CINDER_EXPORT_DIR" "$POINT"

# --- what devstack makes for Tempest: the image and the nano/micro flavors
OPENSTACK=("$VENV/bin/openstack")
IMAGE=$("${OPENSTACK[@]}" image create --disk-format qcow2 --container-format bare --public \
    --file "$WORK/guest.qcow2" minivan-guest -f value -c id)
# a second one, as devstack's two cirros images: Tempest's image_ref_alt
IMAGE_ALT=$("${OPENSTACK[@]}" image create --disk-format qcow2 --container-format bare \
    --public --file "$WORK/guest.qcow2" minivan-guest-alt -f value -c id)
"${OPENSTACK[@]}" flavor create --id 42 --ram 128 --disk 1 --vcpus 1 m1.nano >/dev/null
"${OPENSTACK[@]}" flavor create --id 84 --ram 192 --disk 1 --vcpus 1 m1.micro >/dev/null
say "cloud ready after $((SECONDS - T0)) s (image $IMAGE)"

# --- Tempest
export TEMPEST_GATE=1 TEMPEST_IMAGE_REF=$IMAGE TEMPEST_IMAGE_REF_ALT=$IMAGE_ALT
export TEMPEST_IMAGE_FILE=$WORK/guest.qcow2
"$VENV/bin/python" tools/test-images.py "$WORK/test-images" >/dev/null
export TEMPEST_IMAGES_MANIFEST=$WORK/test-images/manifest.yaml
export TEMPEST_DYNAMIC_CREDENTIALS=True TEMPEST_CONCURRENCY=${TEMPEST_CONCURRENCY:-2}
export TEMPEST_PUBLIC_NETWORK_ID=$NEUTRON_PUBLIC_NETWORK_ID TEMPEST_ATTACH_ENCRYPTED=True
TEMPEST_NETWORK_EXTENSIONS=$("${OPENSTACK[@]}" extension list --network -c Alias -f value |
    paste -sd, -)
export TEMPEST_NETWORK_EXTENSIONS
# run_tempest ARGS...: tools/tempest.sh in a process group of its own, which the clean-up
# stops if this script is stopped first
run_tempest() {
    local rc=0
    setsid tools/tempest.sh "$WORK/tempest" "$WORK/keystone/env" - "$@" &
    TEMPEST_PID=$!
    wait "$TEMPEST_PID" || rc=$?
    TEMPEST_PID=
    return "$rc"
}
status=0
if (($#)); then
    run_tempest "$@" || status=$?
else
    EXCLUDE=$REPO/tools/gate-exclude.txt
    run_tempest --regex '(?!.*\[.*\bslow\b.*\])(^tempest\.api)' --exclude-list "$EXCLUDE" ||
        status=$?
    TEMPEST_CONCURRENCY=1 run_tempest \
        --regex '(?!.*\[.*\bslow\b.*\])(^tempest\.scenario)|(^tempest\.serial_tests)' \
        --exclude-list "$EXCLUDE" || status=$?
fi
say "Tempest done after $((SECONDS - T0)) s, status $status; results in $WORK/tempest"
if [[ ${GATE_HOLD:-0} == 1 ]]; then
    echo $$ > "$WORK/hold"
    say "holding the cloud: enter it with 'nsenter -t $$ -n -m', end with 'rm $WORK/hold'"
    while [[ -f $WORK/hold ]]; do sleep 2; done
fi
exit $status
