# shellcheck shell=bash
# Keystone REST helpers and a gunicorn stopper shared by tools/keystone.sh, tools/glance.sh and
# tools/cinder.sh
# (sourced, not run).  Needs OS_AUTH_URL; `token` sets TOKEN for `api`.

# token AUTH_JSON: sets TOKEN to a token issued for the POST /auth/tokens body.
token() {
    TOKEN=$(curl -sS --fail-with-body -o /dev/null -D - -H 'Content-Type: application/json' \
        -d "$1" "$OS_AUTH_URL/auth/tokens" | tr -d '\r' | sed -n 's/^x-subject-token: //ip')
}
# api METHOD PATH [JSON]: prints the response body, fails on HTTP errors.
api() {
    curl -sS --fail-with-body -X "$1" -H "X-Auth-Token: $TOKEN" \
        -H 'Content-Type: application/json' ${3:+-d "$3"} "$OS_AUTH_URL$2"
}
# jget KEY...: walks JSON from stdin by keys/indexes; prints "" if absent.
jget() {
    python3 -c 'import json, sys
d = json.load(sys.stdin)
try:
    for k in sys.argv[1:]: d = d[int(k) if k.isdigit() else k]
except (KeyError, IndexError): d = ""
print(d)' "$@"
}
# ensure COLLECTION QUERY JSON: id of the first match of GET ?QUERY, else POSTs JSON.
ensure() {
    local id
    id=$(api GET "/$1?$2" | jget "$1" 0 id)
    [[ -n $id ]] || id=$(api POST "/$1" "$3" | jget "${1%s}" id)
    echo "$id"
}
# admin_token CALLER: TOKEN for the admin of KEYSTONE_ENV_FILE's OS_* variables.
admin_token() {
    token '{"auth": {"identity": {"methods": ["password"], "password": {"user":
        {"name": "'"$OS_USERNAME"'", "domain": {"name": "'"$OS_USER_DOMAIN_NAME"'"},
         "password": "'"$OS_PASSWORD"'"}}},
        "scope": {"project": {"name": "'"$OS_PROJECT_NAME"'",
                  "domain": {"name": "'"$OS_PROJECT_DOMAIN_NAME"'"}}}}}'
    [[ -n $TOKEN ]] || { echo "$1: cannot get an admin token from $OS_AUTH_URL" >&2; exit 1; }
}
# service_user NAME PASSWORD: user NAME with roles admin and service in project "service".
service_user() {
    local project user r
    project=$(ensure projects "name=service" '{"project": {"name": "service", "domain_id": "default"}}')
    user=$(ensure users "name=$1" \
        '{"user": {"name": "'"$1"'", "domain_id": "default", "password": "'"$2"'"}}')
    for r in admin service; do
        r=$(ensure roles "name=$r" '{"role": {"name": "'$r'"}}')
        api PUT "/projects/$project/users/$user/roles/$r" >/dev/null
    done
}
# endpoints SERVICE_ID URL: its public, internal and admin endpoints in RegionOne are URL.
endpoints() {
    local iface ep body
    for iface in public internal admin; do
        body='{"endpoint": {"service_id": "'"$1"'", "interface": "'"$iface"'",
               "region_id": "RegionOne", "url": "'"$2"'"}}'
        ep=$(api GET "/endpoints?service_id=$1&interface=$iface" | jget endpoints 0 id)
        if [[ -n $ep ]]; then api PATCH "/endpoints/$ep" "$body" >/dev/null
        else api POST /endpoints "$body" >/dev/null; fi
    done
}
# start_checks NAME VENV KEYSTONE_ENV URL: exits with a one-line reason where a service
# cannot start: no gunicorn in VENV, no KEYSTONE_ENV file, or something answers at URL.
start_checks() {
    [[ -x $2/bin/gunicorn ]] ||
        { echo "$1: no $2/bin/gunicorn; run tools/setup-venvs.sh" >&2; exit 1; }
    [[ -f $3 ]] || { echo "$1: no keystone env file $3" >&2; exit 1; }
    if curl -s -o /dev/null --max-time 2 "$4/"; then
        echo "$1: something already listens on ${4#http://}" >&2; exit 1
    fi
}
# wait_answer NAME PID URL CODE LOG: returns once GET URL answers HTTP CODE; exits (with the
# tail of LOG) if process PID dies first or after 60 s.
wait_answer() {
    local i
    for i in $(seq 120); do
        [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$3") == "$4" ]] && return 0
        if ! kill -0 "$2" 2>/dev/null; then
            echo "$1: gunicorn died; tail of $5:" >&2
            tail -n 30 "$5" >&2; exit 1
        fi
        sleep 0.5
    done
    echo "$1: no answer on $3 after 60s" >&2; exit 1
}
# remove_service NAME TYPE DIR: as the admin of DIR/keystone-env (when there is one),
# removes the catalog's TYPE service, so that a compute service started later sees none.
remove_service() {
    local svc
    [[ -f $3/keystone-env ]] || return 0
    # shellcheck source=/dev/null
    source "$3/keystone-env"
    admin_token "$1"
    svc=$(api GET "/services?type=$2" | jget services 0 id)
    if [[ -n $svc ]]; then
        api DELETE "/services/$svc" >/dev/null
        echo "$1: $2 service removed from the catalog"
    fi
}
# stop_gunicorn NAME PIDFILE IS_OURS: TERM the gunicorn master in PIDFILE when the command
# IS_OURS PID says it is still ours (a stale pid may be reused), KILL it and its workers
# if it is not gone after 10 s.
stop_gunicorn() {
    local name=$1 pidfile=$2 is_ours=$3 pid kids
    [[ -f $pidfile ]] || { echo "$name: no $pidfile" >&2; return 0; }
    pid=$(cat "$pidfile")
    if "$is_ours" "$pid"; then
        kids=$(pgrep -P "$pid" || true)     # gunicorn workers, by parent pid
        kill -TERM "$pid"
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        # shellcheck disable=SC2086
        kill -0 "$pid" $kids 2>/dev/null && kill -KILL "$pid" $kids 2>/dev/null
        echo "$name: stopped (pid $pid)"
    else
        echo "$name: pid $pid from $pidfile is not running"
    fi
    rm -f "$pidfile"
}
