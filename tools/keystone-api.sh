# shellcheck shell=bash
# Keystone REST helpers shared by tools/keystone.sh and tools/glance.sh
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
