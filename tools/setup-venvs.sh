#!/usr/bin/env bash
# setup-venvs.sh - create (or bring up to date) the nine virtualenvs minivan's
# tests use:
#   ${MINIVAN_VENV:-REPO/.venv}                   <- tools/requirements-test.txt
#       (pytest, openstack/nova clients, tempest, libvirt-python, ...)
#   ${MINIVAN_KEYSTONE_VENV:-REPO/.venv-keystone} <- tools/requirements-keystone.txt
#       (keystone + gunicorn, kept apart so its pins cannot clash with tempest's)
#   ${MINIVAN_GLANCE_VENV:-REPO/.venv-glance}     <- tools/requirements-glance.txt
#       (glance + gunicorn for tools/glance.sh, apart for the same reason)
#   ${MINIVAN_CINDER_VENV:-REPO/.venv-cinder}     <- tools/requirements-cinder.txt
#       (cinder + gunicorn for tools/cinder.sh, apart for the same reason)
#   ${MINIVAN_NEUTRON_VENV:-REPO/.venv-neutron}   <- tools/requirements-neutron.txt
#       (neutron + gunicorn for tools/neutron.sh, apart for the same reason)
#   ${MINIVAN_ANSIBLE_VENV:-REPO/.venv-ansible}   <- tools/requirements-ansible.txt
#       (ansible with its openstack.cloud collection, and the openstacksdk it works with)
#   ${MINIVAN_HORIZON_VENV:-REPO/.venv-horizon}   <- tools/requirements-horizon.txt
#       (Horizon and Selenium, for tools/horizon.sh and the browser test)
#   ${MINIVAN_NOVA_VENV:-REPO/.venv-nova}         <- tools/requirements-nova.txt
#       (Nova 34 and the fixtures of its own tests, for tools/nova-guest.py)
#   ${MINIVAN_PLACEMENT_VENV:-REPO/.venv-placement} <- tools/requirements-placement.txt
#       (openstack-placement + gunicorn for tools/placement.sh)
# and, only when called as "setup-venvs.sh rally", just this one:
#   ${MINIVAN_RALLY_VENV:-REPO/.venv-rally}       <- tools/requirements-rally.txt
#       (rally and rally-openstack, for bench/rally.sh)
# Idempotent: a venv whose stamp file matches the hash of (python version +
# requirement file) is left alone.  Python: ${MINIVAN_PYTHON:-python3} on PATH.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${MINIVAN_PYTHON:-python3}

# make_venv DIR REQUIREMENTS_FILE
make_venv() {
    local dir=$1 req=$2 stamp t0=$SECONDS
    stamp=$( { "$PY" -VV; cat "$req"; } | sha256sum | cut -d' ' -f1)
    if [[ -x $dir/bin/python && -f $dir/.minivan-stamp &&
          $(cat "$dir/.minivan-stamp") == "$stamp" ]]; then
        echo "setup-venvs: $dir is up to date"
        return
    fi
    echo "setup-venvs: installing $req into $dir ..."
    rm -f "$dir/.minivan-stamp"
    "$PY" -m venv "$dir"
    # -qq: this machine's pip.conf names missing local indexes; hide those warnings
    "$dir/bin/python" -m pip install -qq --upgrade pip setuptools wheel
    "$dir/bin/python" -m pip install -qq -r "$req"
    echo "$stamp" > "$dir/.minivan-stamp"
    echo "setup-venvs: $dir ready in $((SECONDS - t0))s"
}

# Rally and its OpenStack plugins, for bench/rally.sh only: tools/setup-venvs.sh rally
if [[ ${1:-} == rally ]]; then
    make_venv "${MINIVAN_RALLY_VENV:-$REPO/.venv-rally}" "$REPO/tools/requirements-rally.txt"
    exit 0
fi
make_venv "${MINIVAN_VENV:-$REPO/.venv}" "$REPO/tools/requirements-test.txt"
# Nova's own policy defaults (nova/policies imports with oslo.policy alone): the oracle of
# NovaPolicyTests, beside the test venv, without Nova's dependencies
NOVA_POLICIES=${MINIVAN_VENV:-$REPO/.venv}/nova-34.0.0
if [[ ! -f $NOVA_POLICIES/nova/policies/__init__.py ]]; then
    "${MINIVAN_VENV:-$REPO/.venv}/bin/python" -m pip install -qq --no-deps \
        --target "$NOVA_POLICIES" nova==34.0.0
fi
# Nova 34 itself with its dependencies: tools/nova-guest.py has its libvirt driver write the
# domains GuestShapeOracleTests compare minivan's with
make_venv "${MINIVAN_NOVA_VENV:-$REPO/.venv-nova}" "$REPO/tools/requirements-nova.txt"
make_venv "${MINIVAN_KEYSTONE_VENV:-$REPO/.venv-keystone}" "$REPO/tools/requirements-keystone.txt"
make_venv "${MINIVAN_GLANCE_VENV:-$REPO/.venv-glance}" "$REPO/tools/requirements-glance.txt"
make_venv "${MINIVAN_CINDER_VENV:-$REPO/.venv-cinder}" "$REPO/tools/requirements-cinder.txt"
make_venv "${MINIVAN_NEUTRON_VENV:-$REPO/.venv-neutron}" "$REPO/tools/requirements-neutron.txt"
make_venv "${MINIVAN_ANSIBLE_VENV:-$REPO/.venv-ansible}" "$REPO/tools/requirements-ansible.txt"
make_venv "${MINIVAN_HORIZON_VENV:-$REPO/.venv-horizon}" "$REPO/tools/requirements-horizon.txt"
make_venv "${MINIVAN_PLACEMENT_VENV:-$REPO/.venv-placement}" "$REPO/tools/requirements-placement.txt"
