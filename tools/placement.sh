#!/usr/bin/env bash
# placement.sh - run a real Placement (PyPI "openstack-placement", sqlite, gunicorn) on
# 127.0.0.1 for minivan's tests, with keystonemiddleware auth against a Keystone started
# by tools/keystone.sh.
#
#   tools/placement.sh start DIR PORT KEYSTONE_ENV_FILE
#       Creates (idempotently, through keystone's REST API as admin) user
#       "placement"/secret with roles admin+service in project "service" and a
#       "placement" service with public/internal/admin endpoints http://127.0.0.1:PORT
#       in RegionOne; syncs the database (DIR/placement.db, with the standard traits and
#       resource classes) and serves Placement's WSGI app under gunicorn on PORT, its
#       pid in DIR/placement.pid.  Returns once an authenticated request answers.
#       Appends PLACEMENT_URL to DIR/env.
#   tools/placement.sh stop DIR
#       Stops it and removes the "placement" service from the catalog, so that a compute
#       service started later sees no Placement.
# Uses ${MINIVAN_PLACEMENT_VENV:-REPO/.venv-placement} (tools/setup-venvs.sh).
set -euo pipefail
shopt -s inherit_errexit

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PV=${MINIVAN_PLACEMENT_VENV:-$REPO/.venv-placement}
PASSWORD=secret
LIB_NAME=placement
LIB_PASSWORD=$PASSWORD
# shellcheck source=tools/keystone-api.sh
source "$REPO/tools/keystone-api.sh"
# shellcheck source=tools/service-lib.sh
source "$REPO/tools/service-lib.sh"     # auth_options

usage() {
    echo "usage: $0 start DIR PORT KEYSTONE_ENV_FILE | stop DIR" >&2
    exit 2
}

write_config() {  # write_config DIR
    local dir=$1
    cat > "$dir/placement.conf" <<EOF
[DEFAULT]
debug = false
[api]
auth_strategy = keystone
[placement_database]
connection = sqlite:///$dir/placement.db
[keystone_authtoken]
www_authenticate_uri = $OS_AUTH_URL
$(auth_options placement)
token_cache_time = 300
EOF
    cat > "$dir/placement_wsgi.py" <<EOF
import os
import sys
sys.argv = sys.argv[:1]
os.environ['OS_PLACEMENT_CONFIG_DIR'] = '$dir'
from placement.wsgi.api import application  # noqa: E402,F401
EOF
}

start() {
    local dir port=$2 ks_env=$3 t0=$SECONDS
    mkdir -p "$1"; dir=$(cd "$1" && pwd)
    local url=http://127.0.0.1:$port
    start_checks placement "$PV" "$ks_env" "$url"
    cp "$ks_env" "$dir/keystone-env"
    # shellcheck source=/dev/null
    source "$ks_env"
    : "${OS_AUTH_URL:?not set by $ks_env}"

    admin_token placement
    service_user placement "$PASSWORD"
    local svc
    svc=$(ensure services "type=placement&name=placement" \
        '{"service": {"name": "placement", "type": "placement"}}')
    endpoints "$svc" "$url"

    write_config "$dir"
    rm -f "$dir/placement.db"
    "$PV/bin/placement-manage" --config-file "$dir/placement.conf" db sync \
        >>"$dir/placement-manage.log" 2>&1 ||
        { echo "placement: db sync failed, see $dir/placement-manage.log" >&2; exit 1; }

    # one worker: two would race each other over sqlite to fill in the standard traits
    setsid "$PV/bin/gunicorn" --workers 1 --bind "127.0.0.1:$port" \
        --chdir "$dir" --pid "$dir/placement.pid" --timeout 120 \
        --access-logfile - --error-logfile - \
        placement_wsgi:application >>"$dir/placement.log" 2>&1 </dev/null &
    wait_answer placement $! "$url/" 200 "$dir/placement.log"
    if ! curl -sS --fail-with-body -o /dev/null -H "X-Auth-Token: $TOKEN" \
            -H 'OpenStack-API-Version: placement 1.39' "$url/resource_providers"; then
        echo "placement: GET /resource_providers failed; tail of $dir/placement.log:" >&2
        tail -n 30 "$dir/placement.log" >&2; exit 1
    fi
    echo "placement: serving $url (pid $(cat "$dir/placement.pid")) after $((SECONDS - t0))s"
    touch "$dir/env"
    sed -i '/^export PLACEMENT_URL=/d' "$dir/env"
    echo "export PLACEMENT_URL=$url" >> "$dir/env"
}

stop() {
    local dir
    dir=$(cd "$1" && pwd)
    # (no setproctitle in its venv: the command line is python's, running bin/gunicorn)
    is_ours() { [[ $(readlink "/proc/$1/cwd" 2>/dev/null) == "$dir" ]] &&
                grep -q 'bin/gunicorn' "/proc/$1/cmdline" 2>/dev/null; }
    stop_gunicorn placement "$dir/placement.pid" is_ours
    remove_service placement placement "$dir"
}

case ${1:-} in
    start) [[ $# == 4 ]] || usage; start "$2" "$3" "$4" ;;
    stop)  [[ $# == 2 ]] || usage; stop "$2" ;;
    *)     usage ;;
esac
