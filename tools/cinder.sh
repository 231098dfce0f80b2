#!/usr/bin/env bash
# cinder.sh - run a real Cinder block storage service (PyPI "cinder", v3 API,
# sqlite, RabbitMQ, the NFS volume driver) on 127.0.0.1 for minivan's tests,
# with keystonemiddleware auth against a Keystone started by tools/keystone.sh.
#
#   tools/cinder.sh start DIR PORT KEYSTONE_ENV_FILE
#       KEYSTONE_ENV_FILE is keystone.sh's DIR/env (admin OS_* variables).
#       Creates (idempotently, through keystone's REST API as admin) user
#       "cinder"/secret with roles admin+service in project "service", a
#       "volumev3" service "cinderv3" and a "block-storage" service "cinder",
#       both with public/internal/admin endpoints
#       http://127.0.0.1:PORT/v3/%(project_id)s in RegionOne.  Then starts, as
#       background processes of their own with pid files in DIR:
#         rabbitmq.pid      epmd + RabbitMQ (Debian's rabbitmq-server) on
#                           127.0.0.1, free ports, node/mnesia/logs in DIR/rabbitmq
#         cinder-api.pid    gunicorn serving cinder's WSGI app on 127.0.0.1:PORT
#         cinder-scheduler.pid, cinder-volume.pid
#       and returns once the API answers, the volume service reports "up" in
#       os-services and the scheduler knows its pool (a volume can be created).
#       Appends to DIR/env (sourceable; created if missing, earlier CINDER_*
#       lines replaced): CINDER_URL, CINDER_NFS_SHARE, CINDER_MOUNT_BASE,
#       CINDER_MOUNT_POINT, CINDER_EXPORT_DIR.
#       With CINDER_FIXED_KEY=HEX, encrypted volume types work as devstack has them
#       without Barbican: Cinder's fixed-key manager holds that one key (the compute
#       service needs the same one).
#   tools/cinder.sh stop DIR
#       Stops cinder-volume, cinder-scheduler, cinder-api, RabbitMQ and epmd
#       (each by the process group of the pid in its pid file) and unmounts
#       the share.
# Re-running start on a stopped DIR keeps its database and volume files (the
# broker's state is thrown away: RPC messages do not outlive a run).
#
# Backend: cinder's real NFS driver (cinder.volume.drivers.nfs.NfsDriver) with
# the share CINDER_NFS_SHARE=127.0.0.1:DIR/nfs-export.  This machine has no
# NFS in its kernel, so cinder.sh mounts DIR/nfs-export itself, as a bind
# mount, on the directory os-brick would mount the share on:
#   CINDER_MOUNT_POINT = CINDER_MOUNT_BASE/md5(CINDER_NFS_SHARE)
# (CINDER_MOUNT_BASE = DIR/mnt = the driver's nfs_mount_point_base); os-brick
# finds it in /proc/mounts and mounts nothing.  A volume is then the sparse
# raw file CINDER_MOUNT_POINT/volume-<volume id> (snapshots add
# volume-<id>.<snapshot id> qcow2 overlays and a volume-<id>.info file; "name"
# is then the newest overlay).  The attachments API (v3.44: POST /attachments
# with a connector) returns connection_info flat:
#   {"driver_volume_type": "nfs", "export": CINDER_NFS_SHARE,
#    "name": "volume-<id>", "format": "raw" (or "qcow2"), "options": null,
#    "mount_point_base": CINDER_MOUNT_BASE, "access_mode": "rw", ...}
# (os-initialize_connection nests export/name/format/options under "data"),
# so the file is mount_point_base/md5(export)/name.  mount.nfs must exist
# (Debian's nfs-common) although it is never run for a mount: the driver
# refuses to start without it.  Cinder runs as root, so no sudo, rootwrap or
# privsep-helper via sudo is needed (privsep's helper_command is set).
#
# Uses ${MINIVAN_CINDER_VENV:-REPO/.venv-cinder} (tools/setup-venvs.sh);
# ${MINIVAN_CINDER_WORKERS:-2} sync gunicorn workers for the API.
set -euo pipefail
shopt -s inherit_errexit

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CI_VENV=${MINIVAN_CINDER_VENV:-$REPO/.venv-cinder}
WORKERS=${MINIVAN_CINDER_WORKERS:-2}
PASSWORD=secret
# stop order: clients of the broker first
SERVICES=(cinder-volume cinder-scheduler cinder-api rabbitmq epmd)
# shellcheck source=tools/keystone-api.sh
source "$REPO/tools/keystone-api.sh"
LIB_NAME=cinder LIB_PASSWORD=$PASSWORD
# shellcheck source=tools/service-lib.sh
source "$REPO/tools/service-lib.sh"

usage() { echo "usage: $0 start DIR PORT KEYSTONE_ENV_FILE | stop DIR" >&2; exit 2; }

write_config() {  # write_config DIR PORT AMQP_PORT
    local dir=$1 port=$2 amqp=$3
    local privsep="$CI_VENV/bin/privsep-helper --config-file $dir/cinder.conf"
    cat > "$dir/cinder.conf" <<EOF
[DEFAULT]
debug = false
host = minivan
my_ip = 127.0.0.1
state_path = $dir/cinder-state
transport_url = rabbit://cinder:$PASSWORD@127.0.0.1:$amqp/
auth_strategy = keystone
api_paste_config = $dir/cinder-api-paste.ini
osapi_volume_listen = 127.0.0.1
osapi_volume_listen_port = $port
enabled_backends = nfs
# which GET query filters non-admins may use (the file ships in the venv)
resource_query_filters_file = $CI_VENV/etc/cinder/resource_filters.json
# images come from the "image" endpoint in the user's service catalog
# (glance_catalog_info = image:glance:publicURL, the default)
[database]
connection = sqlite:///$dir/cinder.db
[oslo_concurrency]
lock_path = $dir/cinder-state/lock
[oslo_messaging_notifications]
driver = noop
[oslo_messaging_rabbit]
# no AMQP heartbeats: the API's sync gunicorn workers would miss them while idle
heartbeat_timeout_threshold = 0
[coordination]
backend_url = file://$dir/cinder-state
[keystone_authtoken]
www_authenticate_uri = $OS_AUTH_URL
$(auth_options cinder)
service_token_roles_required = true
# tokens are validated against keystone once, then cached in-process 5 min
token_cache_time = 300
[nova]
# cinder -> nova calls (volume-extended events, assisted snapshots)
$(auth_options cinder)
interface = public
# we run as root: privsep daemons start without sudo/rootwrap
$([[ -n ${CINDER_FIXED_KEY:-} ]] && printf '[key_manager]\nbackend = cinder.keymgr.conf_key_mgr.ConfKeyManager\nfixed_key = %s\n' "$CINDER_FIXED_KEY")
[cinder_sys_admin]
helper_command = $privsep
[privsep_osbrick]
helper_command = $privsep
[privsep]
helper_command = $privsep
[nfs]
volume_driver = cinder.volume.drivers.nfs.NfsDriver
volume_backend_name = nfs
nfs_shares_config = $dir/nfs-shares
nfs_mount_point_base = $dir/mnt
nfs_sparsed_volumes = true
nfs_qcow2_volumes = false
nfs_snapshot_support = true
# root owns the share: "auto" would pick "true" on a new install, and secure
# file operations rule out snapshots.  Files are mode 666 (qemu may be a user).
nas_secure_file_operations = false
nas_secure_file_permissions = false
EOF
    echo "127.0.0.1:$dir/nfs-export" > "$dir/nfs-shares"
    # Our own minimal paste pipeline: v3 API only, no osprofiler, no CORS.
    cat > "$dir/cinder-api-paste.ini" <<'EOF'
[composite:osapi_volume]
use = call:cinder.api:root_app_factory
/: versions
/v3: v3

[pipeline:versions]
pipeline = request_id http_proxy_to_wsgi faultwrap versionsapp

[pipeline:v3]
pipeline = request_id http_proxy_to_wsgi faultwrap sizelimit authtoken keystonecontext v3app

[app:versionsapp]
paste.app_factory = cinder.api.versions:Versions.factory

[app:v3app]
paste.app_factory = cinder.api.v3.router:APIRouter.factory

[filter:request_id]
paste.filter_factory = cinder.api.middleware.request_id:RequestId.factory

[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware.http_proxy_to_wsgi:HTTPProxyToWSGI.factory

[filter:faultwrap]
paste.filter_factory = cinder.api.middleware.fault:FaultWrapper.factory

[filter:sizelimit]
paste.filter_factory = oslo_middleware.sizelimit:RequestBodySizeLimiter.factory

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory

[filter:keystonecontext]
paste.filter_factory = cinder.api.middleware.auth:CinderKeystoneContext.factory
EOF
    write_sqlite_fix "$dir/cinder_sqlite.py"
    # The API under gunicorn: cinder's config machinery parses sys.argv,
    # which there holds gunicorn's own options.
    cat > "$dir/cinder_wsgi.py" <<EOF
import sys
sys.argv = [sys.argv[0], '--config-file', '$dir/cinder.conf']
sys.path.insert(0, '$dir')

import cinder_sqlite  # noqa: F401
from cinder.wsgi import wsgi
import warnings
# cinder.wsgi.wsgi shows each DeprecationWarning once: they flood the log
warnings.simplefilter('ignore', DeprecationWarning)
application = wsgi.initialize_application()
EOF
    # cinder-scheduler / cinder-volume with the same sqlite fix; eventlet
    # monkey patching first, as cinder's own entry points do.
    cat > "$dir/cinder_service.py" <<'EOF'
import importlib
import os
import sys

from cinder import monkey_patch
monkey_patch.patch()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cinder_sqlite  # noqa: E402,F401

cmd = importlib.import_module('cinder.cmd.' + sys.argv.pop(1))
sys.exit(cmd.main())
EOF
}

# Creates the cinder service user and the block storage catalog entries.
register() {
    local svc type name
    admin_token cinder
    service_user cinder "$PASSWORD"
    for svc in volumev3:cinderv3 block-storage:cinder; do
        type=${svc%%:*} name=${svc#*:}
        svc=$(ensure services "type=$type&name=$name" \
            '{"service": {"name": "'"$name"'", "type": "'"$type"'"}}')
        endpoints "$svc" "$1/v3/%(project_id)s"
    done
}

# mount_share DIR: bind-mounts DIR/nfs-export on the share's mount point.
mount_share() {
    local dir=$1 mp
    mp=$(mount_point "$dir")
    mkdir -p "$dir/nfs-export" "$mp"
    mounted "$mp" || mount --bind "$dir/nfs-export" "$mp"
}
mount_point() { echo "$1/mnt/$(printf '%s' "127.0.0.1:$1/nfs-export" | md5sum | cut -d' ' -f1)"; }
# mounted PATH: PATH is a mount point in /proc/mounts (os-brick's test too).
mounted() { awk -v p="$1" '$2 == p {f = 1} END {exit !f}' /proc/mounts; }

start() {
    local dir port=$2 ks_env=$3 t0=$SECONDS
    mkdir -p "$1"; dir=$(cd "$1" && pwd -P)
    local url=http://127.0.0.1:$port svc
    [[ -x $CI_VENV/bin/gunicorn ]] ||
        { echo "cinder: no $CI_VENV/bin/gunicorn; run tools/setup-venvs.sh" >&2; exit 1; }
    [[ -x $RABBIT_BIN ]] || { echo "cinder: no $RABBIT_BIN; apt-get install rabbitmq-server" >&2; exit 1; }
    [[ -x /sbin/mount.nfs ]] || { echo "cinder: no /sbin/mount.nfs; apt-get install nfs-common" >&2; exit 1; }
    command -v qemu-img >/dev/null || { echo "cinder: no qemu-img; apt-get install qemu-utils" >&2; exit 1; }
    [[ -f $ks_env ]] || { echo "cinder: no keystone env file $ks_env" >&2; exit 1; }
    for svc in "${SERVICES[@]}"; do
        ours "$dir" "$svc" >/dev/null && { echo "cinder: $svc already running in $dir" >&2; exit 1; }
    done
    if curl -s -o /dev/null --max-time 2 "$url/"; then
        echo "cinder: something already listens on 127.0.0.1:$port" >&2; exit 1
    fi
    # shellcheck source=/dev/null
    source "$ks_env"
    : "${OS_AUTH_URL:?not set by $ks_env}" "${ADMIN_PROJECT_ID:?not set by $ks_env}"

    local amqp_port dist_port epmd_port
    read -r amqp_port dist_port epmd_port < <(free_ports 3)
    start_rabbit "$dir" "$amqp_port" "$dist_port" "$epmd_port"   # boots meanwhile

    register "$url"
    echo "cinder: keystone user and catalog ready after $((SECONDS - t0))s"

    mkdir -p "$dir/cinder-state/lock"
    write_config "$dir" "$port" "$amqp_port"
    mount_share "$dir"
    "$CI_VENV/bin/cinder-manage" --config-file "$dir/cinder.conf" db sync \
        >>"$dir/cinder-manage.log" 2>&1 ||
        { echo "cinder: cinder-manage db sync failed, see $dir/cinder-manage.log" >&2; exit 1; }
    echo "cinder: database ready after $((SECONDS - t0))s"
    wait_rabbit "$dir" "$amqp_port"
    echo "cinder: RabbitMQ on 127.0.0.1:$amqp_port after $((SECONDS - t0))s"

    # PYTHONWARNINGS: hide eventlet's and others' DeprecationWarnings.
    export PYTHONWARNINGS=ignore::DeprecationWarning
    spawn "$dir" cinder-api "$CI_VENV/bin/gunicorn" --workers "$WORKERS" \
        --bind "127.0.0.1:$port" --timeout 300 \
        --access-logfile - --error-logfile - cinder_wsgi:application
    spawn "$dir" cinder-scheduler "$CI_VENV/bin/python" "$dir/cinder_service.py" scheduler \
        --config-file "$dir/cinder.conf"
    spawn "$dir" cinder-volume "$CI_VENV/bin/python" "$dir/cinder_service.py" volume \
        --config-file "$dir/cinder.conf"

    local i services pools
    for i in $(seq 240); do
        for svc in cinder-api cinder-scheduler cinder-volume rabbitmq; do alive "$dir" "$svc" || exit 1; done
        # GET / answers 300 Multiple Choices (the version list), no auth needed
        [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url/") == 300 ]] && break
        [[ $i == 240 ]] && { echo "cinder: no answer on $url after 120s" >&2; exit 1; }
        sleep 0.5
    done
    echo "cinder: API answers on $url after $((SECONDS - t0))s"
    # ready = the volume service is up and the scheduler has its pool
    for i in $(seq 240); do
        for svc in cinder-api cinder-scheduler cinder-volume rabbitmq; do alive "$dir" "$svc" || exit 1; done
        services=$(curl -sS -H "X-Auth-Token: $TOKEN" \
            "$url/v3/$ADMIN_PROJECT_ID/os-services?binary=cinder-volume" || true)
        pools=$(curl -sS -H "X-Auth-Token: $TOKEN" \
            "$url/v3/$ADMIN_PROJECT_ID/scheduler-stats/get_pools" || true)
        if [[ $services == *'"state": "up"'* && $pools == *'"name": "'* ]]; then break; fi
        if [[ $i == 240 ]]; then
            echo "cinder: volume service not ready after 120s: $services $pools;" \
                "see $dir/cinder-volume.log, $dir/cinder-scheduler.log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "cinder: serving $url, volume service up after $((SECONDS - t0))s"

    touch "$dir/env"
    sed -i '/^export CINDER_[A-Z_]*=/d' "$dir/env"
    cat >> "$dir/env" <<EOF
export CINDER_URL=$url
export CINDER_NFS_SHARE=127.0.0.1:$dir/nfs-export
export CINDER_MOUNT_BASE=$dir/mnt
export CINDER_MOUNT_POINT=$(mount_point "$dir")
export CINDER_EXPORT_DIR=$dir/nfs-export
EOF
    echo "cinder: CINDER_URL=$url appended to $dir/env"
}

stop() {
    local dir svc mp
    dir=$(cd "$1" && pwd -P)
    for svc in "${SERVICES[@]}"; do stop_one "$dir" "$svc"; done
    mp=$(mount_point "$dir")
    if mounted "$mp"; then
        # lazily if busy (a guest may still hold a volume file open)
        umount "$mp" 2>/dev/null || umount -l "$mp"
        echo "cinder: unmounted $mp"
    fi
}

case ${1:-} in
    start) [[ $# == 4 ]] || usage; start "$2" "$3" "$4" ;;
    stop)  [[ $# == 2 ]] || usage; stop "$2" ;;
    *)     usage ;;
esac
