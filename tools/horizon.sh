#!/usr/bin/env bash
# horizon.sh - run Horizon (PyPI "horizon", the OpenStack dashboard) on 127.0.0.1 against
# the Keystone of tools/keystone.sh, for minivan's tests.
#
#   tools/horizon.sh start DIR PORT KEYSTONE_ENV_FILE
#       Writes Horizon's local_settings.py (Keystone from the env file's OS_AUTH_URL,
#       signed-cookie sessions, no Neutron routers or floating IPs), collects and
#       compresses its static files into DIR/static, and serves it with Django's server
#       on 127.0.0.1:PORT (static files too).  Returns once the login page answers.
#       Log: DIR/horizon.log, PID: DIR/horizon.pid.
#   tools/horizon.sh stop DIR
#       Stops that server.
#
# Uses ${MINIVAN_HORIZON_VENV:-REPO/.venv-horizon} (tools/setup-venvs.sh).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HV=${MINIVAN_HORIZON_VENV:-$REPO/.venv-horizon}

usage() { echo "usage: $0 start DIR PORT KEYSTONE_ENV_FILE | stop DIR" >&2; exit 2; }

stop() {
    local dir=$1
    if [[ -f $dir/horizon.pid ]]; then
        kill "$(cat "$dir/horizon.pid")" 2>/dev/null || true
        rm -f "$dir/horizon.pid"
    fi
}

start() {
    local dir=$1 port=$2 envfile=$3 t0=$SECONDS
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    local auth_url
    auth_url=$(sed -n 's/^export OS_AUTH_URL=//p' "$envfile")
    [[ -n $auth_url ]] || { echo "horizon: no OS_AUTH_URL in $envfile" >&2; exit 1; }
    local dashboard
    dashboard=$("$HV/bin/python" -c 'import os, openstack_dashboard; print(os.path.dirname(openstack_dashboard.__file__))')
    cat > "$dashboard/local/local_settings.py" <<SETTINGS
# written by minivan's tools/horizon.sh
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
SECRET_KEY = "minivan-test-horizon"
OPENSTACK_HOST = "127.0.0.1"
OPENSTACK_KEYSTONE_URL = "$auth_url"
OPENSTACK_KEYSTONE_DEFAULT_ROLE = "member"
SESSION_ENGINE = "django.contrib.sessions.backends.signed_cookies"
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
COMPRESS_OFFLINE = True
STATIC_ROOT = "$dir/static"
OPENSTACK_NEUTRON_NETWORK = {"enable_router": False, "enable_quotas": False,
                             "enable_distributed_router": False, "enable_ha_router": False,
                             "enable_fip_topology_check": False}
LAUNCH_INSTANCE_DEFAULTS = {"create_volume": False}
SETTINGS
    export DJANGO_SETTINGS_MODULE=openstack_dashboard.settings
    "$HV/bin/django-admin" collectstatic --noinput >"$dir/static.log" 2>&1
    "$HV/bin/django-admin" compress --force >>"$dir/static.log" 2>&1
    stop "$dir"
    setsid "$HV/bin/django-admin" runserver --insecure --noreload "127.0.0.1:$port" \
        >"$dir/horizon.log" 2>&1 < /dev/null &
    echo $! > "$dir/horizon.pid"
    for _ in $(seq 1 120); do
        if curl -sf -o /dev/null "http://127.0.0.1:$port/auth/login/"; then
            echo "horizon: serving http://127.0.0.1:$port after $((SECONDS - t0))s"
            return
        fi
        kill -0 "$(cat "$dir/horizon.pid")" 2>/dev/null || break
        sleep 0.5
    done
    echo "horizon: did not answer; see $dir/horizon.log" >&2
    stop "$dir"
    exit 1
}

case ${1:-} in
    start) [[ $# -eq 4 ]] || usage; start "$2" "$3" "$4" ;;
    stop) [[ $# -eq 2 ]] || usage; stop "$2" ;;
    *) usage ;;
esac
