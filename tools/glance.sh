#!/usr/bin/env bash
# glance.sh - run a real Glance image API (PyPI "glance", v2 only, sqlite,
# "file" store) under gunicorn on 127.0.0.1 for minivan's tests, with
# keystonemiddleware auth against a Keystone started by tools/keystone.sh.
#
#   tools/glance.sh start DIR PORT KEYSTONE_ENV_FILE
#       KEYSTONE_ENV_FILE is keystone.sh's DIR/env (admin OS_* variables).
#       Everything lives in DIR: glance-api.conf, glance-api-paste.ini,
#       glance.db, images/ (the file store), glance_wsgi.py, glance.log,
#       glance.pid.  Creates (idempotently, through keystone's REST API as
#       admin) user "glance"/secret with roles admin+service in project
#       "service", and an "image" service "glance" with public/internal/admin
#       endpoints http://127.0.0.1:PORT in RegionOne.  Returns once glance
#       answers.  Appends to DIR/env (sourceable; created if missing, earlier
#       GLANCE_* lines replaced): GLANCE_URL, GLANCE_IMAGES_DIR.  With GLANCE_METADEFS=1
#       it also loads Glance's metadata definitions, as devstack does.  With
#       GLANCE_QUOTAS=1, as devstack's default GLANCE_ENABLE_QUOTAS: Keystone's unified
#       limits (registered limits for image_size_total, image_stage_total (2000 MiB),
#       image_count_total, image_count_uploading (100)), which Glance enforces through
#       oslo.limit as user glance with the system-scoped reader role.
#       GLANCE_ENFORCE_IMAGE_FORMAT=False (devstack's variable; default True) lets an
#       upload's bytes differ from its disk_format, so that a compute service's own
#       checks of hostile images can be tested.
#   tools/glance.sh stop DIR
#       Stops the gunicorn master in DIR/glance.pid and its workers.
# Re-running start on a stopped DIR keeps its database and images.
# DIR may be keystone.sh's DIR: file names do not clash, env is appended to.
#
# Image import (glance-direct/web-download/copy-image), tasks, caching,
# property protections and notifications (no rabbit) are off.  Uploaded data
# must match disk_format ([image_format] require_image_format_match, the
# default): a "qcow2" image must really be qcow2, else the upload gets 400.
#
# Uses ${MINIVAN_GLANCE_VENV:-REPO/.venv-glance} (tools/setup-venvs.sh);
# ${MINIVAN_GLANCE_WORKERS:-2} sync gunicorn workers.
set -euo pipefail
shopt -s inherit_errexit

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GL_VENV=${MINIVAN_GLANCE_VENV:-$REPO/.venv-glance}
WORKERS=${MINIVAN_GLANCE_WORKERS:-2}
PASSWORD=secret
# shellcheck source=tools/keystone-api.sh
source "$REPO/tools/keystone-api.sh"
LIB_NAME=glance LIB_PASSWORD=$PASSWORD
# shellcheck source=tools/service-lib.sh
source "$REPO/tools/service-lib.sh"     # write_sqlite_fix, auth_options

usage() { echo "usage: $0 start DIR PORT KEYSTONE_ENV_FILE | stop DIR" >&2; exit 2; }

# Succeeds while the process in DIR/glance.pid exists.
running() { [[ -f $1/glance.pid ]] && kill -0 "$(cat "$1/glance.pid")" 2>/dev/null; }

write_config() {  # write_config DIR
    local dir=$1
    cat > "$dir/glance-api.conf" <<EOF
[DEFAULT]
debug = false
# no interoperable image import: only POST /v2/images + PUT .../file
enabled_import_methods = []
show_image_direct_url = false
show_multiple_locations = false
[database]
connection = sqlite:///$dir/glance.db
[glance_store]
stores = file
default_store = file
filesystem_store_datadir = $dir/images/
[paste_deploy]
flavor = keystone
config_file = $dir/glance-api-paste.ini
[keystone_authtoken]
www_authenticate_uri = $OS_AUTH_URL
$(auth_options glance)
# tokens are validated against keystone once, then cached in-process 5 min
token_cache_time = 300
[oslo_messaging_notifications]
driver = noop
[oslo_policy]
# glance's own defaults (new RBAC, project scope): member may create/upload,
# reader may only read, admin sees everything
enforce_new_defaults = true
enforce_scope = true
EOF
    # Our own minimal paste pipeline: no osprofiler, cache or healthcheck.
    cat > "$dir/glance-api-paste.ini" <<'EOF'
[composite:glance-api-keystone]
paste.composite_factory = glance.api:root_app_factory
/: api

[pipeline:api]
pipeline = http_proxy_to_wsgi versionnegotiation authtoken context rootapp

[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app

[app:apiversions]
paste.app_factory = glance.api.versions:create_resource

[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory

[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware:HTTPProxyToWSGI.factory

[filter:versionnegotiation]
paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
delay_auth_decision = true

[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory
EOF
    # glance's wsgi_app.init_app() reads OS_GLANCE_CONFIG_DIR/glance-api.conf
    # (and ignores sys.argv, which under gunicorn holds gunicorn's options).
    write_sqlite_fix "$dir/glance_sqlite.py"
    cat > "$dir/glance_wsgi.py" <<EOF
import os
import sys
sys.argv = sys.argv[:1]
os.environ['OS_GLANCE_CONFIG_DIR'] = '$dir'
sys.path.insert(0, '$dir')

import glance_sqlite  # noqa: E402,F401
from glance.common import wsgi_app
application = wsgi_app.init_app()
EOF
}

# Creates the glance service user and the image catalog entry (idempotently); sets SVC.
register() {
    admin_token glance
    service_user glance "$PASSWORD"
    SVC=$(ensure services "type=image&name=glance" '{"service": {"name": "glance", "type": "image"}}')
    endpoints "$SVC" "$1"
}

# Keystone's registered limits for Glance's quotas and the reader role on the system for
# user glance, as devstack's configure_glance_quotas; prints the [oslo_limit] options.
unified_limits() {
    local name limit user role endpoint
    token '{"auth": {"identity": {"methods": ["password"], "password": {"user":
        {"name": "'"$OS_USERNAME"'", "domain": {"name": "'"$OS_USER_DOMAIN_NAME"'"},
         "password": "'"$OS_PASSWORD"'"}}}, "scope": {"system": {"all": true}}}}'
    [[ -n $TOKEN ]] || { echo "glance: no system-scoped admin token" >&2; exit 1; }
    for limit in image_size_total:2000 image_stage_total:2000 image_count_total:100 \
                 image_count_uploading:100; do
        name=${limit%%:*}
        [[ -n $(api GET "/registered_limits?service_id=$SVC&resource_name=$name" |
                jget registered_limits 0 id) ]] && continue
        api POST /registered_limits '{"registered_limits": [{"service_id": "'"$SVC"'",
            "region_id": "RegionOne", "resource_name": "'"$name"'",
            "default_limit": '"${limit#*:}"'}]}' >/dev/null
    done
    user=$(api GET "/users?name=glance" | jget users 0 id)
    role=$(ensure roles "name=reader" '{"role": {"name": "reader"}}')
    api PUT "/system/users/$user/roles/$role" >/dev/null
    endpoint=$(api GET "/endpoints?service_id=$SVC&interface=public" | jget endpoints 0 id)
    admin_token glance          # (back to the project-scoped token the rest uses)
    printf '%s\n' "[oslo_limit]" "auth_url = $OS_AUTH_URL" "auth_type = password" \
        "username = glance" "password = $PASSWORD" "user_domain_name = Default" \
        "system_scope = all" "endpoint_id = $endpoint"
}

start() {
    local dir port=$2 ks_env=$3 t0=$SECONDS
    mkdir -p "$1"; dir=$(cd "$1" && pwd)
    local url=http://127.0.0.1:$port
    running "$dir" && { echo "glance: already running in $dir" >&2; exit 1; }
    start_checks glance "$GL_VENV" "$ks_env" "$url"
    # shellcheck source=/dev/null
    source "$ks_env"
    : "${OS_AUTH_URL:?not set by $ks_env}"

    register "$url"
    echo "glance: keystone user and catalog ready after $((SECONDS - t0))s"

    mkdir -p "$dir/images"
    write_config "$dir"
    if [[ ${GLANCE_ENFORCE_IMAGE_FORMAT:-True} == False ]]; then
        printf '%s\n' "[image_format]" "require_image_format_match = false" \
            >> "$dir/glance-api.conf"
    fi
    if [[ ${GLANCE_QUOTAS:-0} == 1 ]]; then
        { echo "[DEFAULT]"; echo "use_keystone_limits = true"; unified_limits; } \
            >> "$dir/glance-api.conf"
        echo "glance: unified limits registered in keystone"
    fi
    "$GL_VENV/bin/glance-manage" --config-file "$dir/glance-api.conf" db_sync \
        >>"$dir/glance-manage.log" 2>&1 ||
        { echo "glance: glance-manage db_sync failed, see $dir/glance-manage.log" >&2; exit 1; }
    if [[ ${GLANCE_METADEFS:-0} == 1 ]]; then
        # the metadata definitions devstack loads (namespaces, resource types)
        "$GL_VENV/bin/glance-manage" --config-file "$dir/glance-api.conf" db_load_metadefs \
            "$GL_VENV/etc/glance/metadefs" >>"$dir/glance-manage.log" 2>&1 ||
            { echo "glance: loading the metadefs failed, see $dir/glance-manage.log" >&2; exit 1; }
    fi
    echo "glance: database ready after $((SECONDS - t0))s"

    # Sync workers: an upload or download occupies one for its whole length.
    # setsid: own process group, so nothing here waits on it or signals it.
    # PYTHONWARNINGS: hide eventlet's DeprecationWarning (glance imports it).
    PYTHONWARNINGS=ignore::DeprecationWarning \
    setsid "$GL_VENV/bin/gunicorn" --workers "$WORKERS" --bind "127.0.0.1:$port" \
        --chdir "$dir" --pid "$dir/glance.pid" --timeout 300 \
        --access-logfile - --error-logfile - \
        glance_wsgi:application >>"$dir/glance.log" 2>&1 </dev/null &
    # GET / answers 300 Multiple Choices (the version list), no auth needed
    wait_answer glance $! "$url/" 300 "$dir/glance.log"
    # one authenticated request: proves keystonemiddleware and the database
    if ! curl -sS --fail-with-body -o /dev/null -H "X-Auth-Token: $TOKEN" \
            "$url/v2/images?limit=1"; then
        echo "glance: GET /v2/images failed; tail of $dir/glance.log:" >&2
        tail -n 30 "$dir/glance.log" >&2; exit 1
    fi
    echo "glance: serving $url (pid $(cat "$dir/glance.pid")) after $((SECONDS - t0))s"

    touch "$dir/env"
    sed -i '/^export GLANCE_\(URL\|IMAGES_DIR\)=/d' "$dir/env"
    cat >> "$dir/env" <<EOF
export GLANCE_URL=$url
export GLANCE_IMAGES_DIR=$dir/images
EOF
    echo "glance: GLANCE_URL=$url appended to $dir/env"
}

stop() {
    local dir
    dir=$(cd "$1" && pwd)
    # ours runs in DIR (--chdir).  Its cmdline is no help: gunicorn renames itself
    # "gunicorn: master [...]" (setproctitle is in this venv).
    is_ours() { [[ $(readlink "/proc/$1/cwd" 2>/dev/null) == "$dir" ]] &&
                grep -q '^gunicorn' "/proc/$1/cmdline" 2>/dev/null; }
    stop_gunicorn glance "$dir/glance.pid" is_ours
}

case ${1:-} in
    start) [[ $# == 4 ]] || usage; start "$2" "$3" "$4" ;;
    stop)  [[ $# == 2 ]] || usage; stop "$2" ;;
    *)     usage ;;
esac
