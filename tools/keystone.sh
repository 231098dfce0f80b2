#!/usr/bin/env bash
# keystone.sh - run a real Keystone (PyPI "keystone", sqlite, fernet tokens)
# under gunicorn on 127.0.0.1 for minivan's tests.
#
#   tools/keystone.sh start DIR PORT COMPUTE_URL
#       Everything lives in DIR: keystone.conf, keystone.db, fernet keys,
#       keystone_wsgi.py, keystone.log, keystone.pid and "env" (sourceable:
#       OS_* for admin, *_PROJECT_ID, MINIVAN_* service user).  Bootstraps
#       admin/secret in project admin, region RegionOne, then creates:
#         service  project: minivan (admin, service)   - the compute service user,
#                  service_user (service only)
#         demo     project: demo (member, reader), demo_reader (reader only),
#                  demo_manager and demo_manager2 (manager, member, reader)
#         alt_demo project: alt_demo (member)
#       and no_role, a user with no role anywhere (only unscoped tokens)
#       and a "compute" service "nova" with public/internal/admin endpoints =
#       COMPUTE_URL.  Returns once keystone answers.  All passwords: "secret".
#   tools/keystone.sh stop DIR
#       Stops the gunicorn master in DIR/keystone.pid and its workers.
# Re-running start on a stopped DIR reuses its database (ensures, no duplicates).
#
# Uses ${MINIVAN_KEYSTONE_VENV:-REPO/.venv-keystone} (tools/setup-venvs.sh);
# users etc. are made through keystone's REST API with curl.
set -euo pipefail
shopt -s inherit_errexit

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KS_VENV=${MINIVAN_KEYSTONE_VENV:-$REPO/.venv-keystone}
PASSWORD=secret
# shellcheck source=tools/keystone-api.sh
source "$REPO/tools/keystone-api.sh"

usage() { echo "usage: $0 start DIR PORT COMPUTE_URL | stop DIR" >&2; exit 2; }

# Succeeds while the process in DIR/keystone.pid exists.
running() { [[ -f $1/keystone.pid ]] && kill -0 "$(cat "$1/keystone.pid")" 2>/dev/null; }

write_config() {  # write_config DIR
    local dir=$1
    cat > "$dir/keystone.conf" <<EOF
[DEFAULT]
debug = false
[database]
connection = sqlite:///$dir/keystone.db
[identity]
# cheapest bcrypt: password auth then costs ~ms instead of ~250 ms
password_hash_rounds = 4
[token]
provider = fernet
[fernet_tokens]
key_repository = $dir/fernet-keys
[fernet_receipts]
key_repository = $dir/fernet-keys
[credential]
key_repository = $dir/credential-keys
EOF
    # keystone's config machinery parses sys.argv, which under gunicorn holds
    # gunicorn's own options: reset it before the app is built.
    cat > "$dir/keystone_wsgi.py" <<EOF
import sys
sys.argv = sys.argv[:1]
from keystone.server.flask import core
application = core.initialize_application(
    name='public', config_files=['$dir/keystone.conf'])
EOF
}

start() {
    local dir port=$2 compute_url=$3 t0=$SECONDS
    mkdir -p "$1"; dir=$(cd "$1" && pwd)
    local url=http://127.0.0.1:$port/v3
    running "$dir" && { echo "keystone: already running in $dir" >&2; exit 1; }
    if curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$port/"; then
        echo "keystone: something already listens on 127.0.0.1:$port" >&2; exit 1
    fi

    write_config "$dir"
    # keystone-manage is chatty (and warns about eventlet): log to a file.
    manage() {
        "$KS_VENV/bin/keystone-manage" --config-file "$dir/keystone.conf" "$@" \
            >>"$dir/keystone-manage.log" 2>&1 ||
            { echo "keystone: keystone-manage $1 failed, see $dir/keystone-manage.log" >&2; exit 1; }
    }
    manage fernet_setup --keystone-user "$(id -un)" --keystone-group "$(id -gn)"
    manage credential_setup --keystone-user "$(id -un)" --keystone-group "$(id -gn)"
    manage db_sync
    # bootstrap also creates roles reader, member, manager, service and the
    # implications admin > manager > member > reader.
    manage bootstrap --bootstrap-username admin \
        --bootstrap-password "$PASSWORD" --bootstrap-project-name admin \
        --bootstrap-role-name admin --bootstrap-service-name keystone \
        --bootstrap-region-id RegionOne --bootstrap-public-url "$url" \
        --bootstrap-internal-url "$url" --bootstrap-admin-url "$url"
    echo "keystone: database ready after $((SECONDS - t0))s"

    # ONE sync worker: with two, concurrent writes (auth updates
    # user.last_active_at; tempest's dynamic credentials create/delete users)
    # make sqlite fail with "database is locked" -> HTTP 500.
    # setsid: own process group, so nothing here waits on it or signals it.
    setsid "$KS_VENV/bin/gunicorn" --workers 1 --bind "127.0.0.1:$port" \
        --chdir "$dir" --pid "$dir/keystone.pid" --timeout 120 \
        --access-logfile - --error-logfile - \
        keystone_wsgi:application >>"$dir/keystone.log" 2>&1 </dev/null &
    wait_answer keystone $! "$url" 200 "$dir/keystone.log"
    echo "keystone: serving $url (pid $(cat "$dir/keystone.pid")) after $((SECONDS - t0))s"

    cat > "$dir/env" <<EOF
export OS_AUTH_URL=$url
export OS_USERNAME=admin
export OS_PASSWORD=$PASSWORD
export OS_PROJECT_NAME=admin
export OS_USER_DOMAIN_NAME=Default
export OS_PROJECT_DOMAIN_NAME=Default
export OS_IDENTITY_API_VERSION=3
export OS_REGION_NAME=RegionOne
export OS_INTERFACE=public
export COMPUTE_URL=$compute_url
export MINIVAN_USERNAME=minivan
export MINIVAN_PASSWORD=$PASSWORD
export MINIVAN_PROJECT_NAME=service
EOF
    # shellcheck source=/dev/null
    source "$dir/env"
    populate "$compute_url" >>"$dir/env"
    echo "keystone: users, projects and catalog ready after $((SECONDS - t0))s; env in $dir/env"
}

# Creates projects/users/roles/catalog (idempotently) as admin; prints the
# project-id export lines for the env file.
populate() {
    local compute_url=$1 auth
    auth='{"auth": {"identity": {"methods": ["password"], "password": {"user":
        {"name": "admin", "domain": {"id": "default"}, "password": "'$PASSWORD'"}}},
        "scope": {"project": {"name": "admin", "domain": {"id": "default"}}}}}'
    token "$auth"
    declare -A project user role
    local p u r
    for p in admin service demo alt_demo; do
        project[$p]=$(ensure projects "name=$p" '{"project": {"name": "'$p'", "domain_id": "default"}}')
    done
    for u in minivan demo alt_demo demo_reader demo_manager demo_manager2 service_user \
             no_role; do
        user[$u]=$(ensure users "name=$u" \
            '{"user": {"name": "'$u'", "domain_id": "default", "password": "'$PASSWORD'"}}')
    done
    for r in admin manager member reader service; do
        role[$r]=$(ensure roles "name=$r" '{"role": {"name": "'$r'"}}')
    done
    grant() { api PUT "/projects/${project[$1]}/users/${user[$2]}/roles/${role[$3]}" >/dev/null; }
    grant service minivan admin
    grant service minivan service
    grant service service_user service
    grant demo demo member
    grant demo demo reader
    grant alt_demo alt_demo member
    grant demo demo_reader reader
    grant demo demo_manager manager
    grant demo demo_manager member
    grant demo demo_manager reader
    grant demo demo_manager2 manager
    grant demo demo_manager2 member
    grant demo demo_manager2 reader
    local svc
    svc=$(ensure services "name=nova" '{"service": {"name": "nova", "type": "compute"}}')
    endpoints "$svc" "$compute_url"
    echo "export ADMIN_PROJECT_ID=${project[admin]}"
    echo "export DEMO_PROJECT_ID=${project[demo]}"
    echo "export ALT_PROJECT_ID=${project[alt_demo]}"
    echo "export SERVICE_PROJECT_ID=${project[service]}"
}

stop() {
    local dir
    dir=$(cd "$1" && pwd)
    # ours: started with --pid DIR/keystone.pid
    is_ours() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "--pid $dir/keystone.pid"; }
    stop_gunicorn keystone "$dir/keystone.pid" is_ours
}

case ${1:-} in
    start) [[ $# == 4 ]] || usage; start "$2" "$3" "$4" ;;
    stop)  [[ $# == 2 ]] || usage; stop "$2" ;;
    *)     usage ;;
esac
