#!/usr/bin/env bash
# test.sh - the one test command: installs what the tests need, starts the
# services they use, runs pytest on test_minivan.py, stops what it started.
#
#   tools/test.sh [pytest args...]        e.g. tools/test.sh -k Flavor -x
#
# 1. Debian packages (libvirt, systemd-analyze, openssl, ssh-keygen, curl, rabbitmq-server,
#    nfs-common, openvswitch-switch, sudo; for the Neutron agents of tools/gate.sh haproxy,
#    iputils-ping, iputils-arping, conntrack, radvd and keepalived, as devstack installs them;
#    python3-seccomp and python3-libvirt for the system Python the sandboxed minivan of
#    tools/sandbox.py runs on), when missing
# 2. the virtualenvs of tools/setup-venvs.sh (.venv: clients, tempest; .venv-keystone,
#    .venv-glance, .venv-cinder, .venv-neutron)
# 3. libvirtd + QEMU with an isolated test network (tools/libvirt-up.sh; stopped at the end
#    unless MINIVAN_KEEP_LIBVIRT=1) and a tiny bootable guest image (tools/make-guest.sh)
# 4. a real Keystone, Glance and Cinder on 127.0.0.1 (tools/keystone.sh, tools/glance.sh,
#    tools/cinder.sh: NFS driver on a bind-mounted share, RabbitMQ), with minivan's endpoint
#    in the catalog; MINIVAN_TEST_CINDER_ENV names cinder.sh's env file (CINDER_*).
#    A real Neutron (tools/neutron.sh) runs only during the tests that use it: a compute
#    service started while Neutron is in the catalog uses it.
# 5. pytest, in .venv
# MINIVAN_REQUIRE_E2E=1 (set by .ci/run) fails every end-to-end test that would skip.
# MINIVAN_TEMPEST_LIST=FILE picks the Tempest tests (default tools/tempest-pass.txt).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
VENV=${MINIVAN_VENV:-$REPO/.venv}
export MINIVAN_VENV=$VENV

PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
          qemu-utils systemd openssl openssh-client curl python3-venv gcc genisoimage
          rabbitmq-server nfs-common openvswitch-switch sudo util-linux chromium chromium-driver
          python3-seccomp python3-libvirt haproxy iputils-ping iputils-arping conntrack
          radvd keepalived novnc ovn-central ovn-host mariadb-server ovmf
          swtpm swtpm-tools)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "test.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

tools/setup-venvs.sh
tools/libvirt-up.sh up

free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
WORK=$(mktemp -d /tmp/minivan-test.XXXXXX)
KEYSTONE_PORT=$(free_port)
COMPUTE_PORT=$(free_port)
GLANCE_PORT=$(free_port)
CINDER_PORT=$(free_port)
cleanup() {
    tools/cinder.sh stop "$WORK/cinder" >/dev/null 2>&1 || true
    tools/glance.sh stop "$WORK/keystone" >/dev/null 2>&1 || true
    tools/keystone.sh stop "$WORK/keystone" >/dev/null 2>&1 || true
    [[ ${MINIVAN_KEEP_LIBVIRT:-0} == 1 ]] || tools/libvirt-up.sh stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
tools/keystone.sh start "$WORK/keystone" "$KEYSTONE_PORT" "http://127.0.0.1:$COMPUTE_PORT/v2.1"
tools/glance.sh start "$WORK/keystone" "$GLANCE_PORT" "$WORK/keystone/env"
tools/cinder.sh start "$WORK/cinder" "$CINDER_PORT" "$WORK/keystone/env"
tools/make-guest.sh "$WORK/minivan-guest.qcow2"
export MINIVAN_TEST_GUEST_IMAGE=$WORK/minivan-guest.qcow2
export MINIVAN_TEST_LIBVIRT_NETWORK=${MINIVAN_TEST_NET:-minivan-test}

export MINIVAN_TEST_KEYSTONE_ENV=$WORK/keystone/env
export MINIVAN_TEST_CINDER_ENV=$WORK/cinder/env
export MINIVAN_TEST_WORK=$WORK
export MINIVAN_TEMPEST_LIST=${MINIVAN_TEMPEST_LIST:-$REPO/tools/tempest-pass.txt}
set +e
"$VENV/bin/python" -m pytest -v -rs -p no:cacheprovider test_minivan.py "$@"
status=$?
set -e
exit $status
