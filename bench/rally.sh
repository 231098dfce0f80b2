#!/usr/bin/env bash
# rally.sh - Rally, the benchmark OpenStack operators run against a cloud, against minivan
# behind the real Keystone.
#
#   bench/rally.sh [OUT_DIR] [TIMES]
#
# Starts, in OUT_DIR (default ./rally-out, made fresh), a real Keystone (tools/keystone.sh)
# and a minivan that uses it, on free loopback ports: libvirt's test hypervisor as two
# compute hosts, its local image directory holding a small qcow2 image named
# cirros-0.6.2-x86_64-disk, and its own image service (/image) in the catalog as "image".
# Then Rally (tools/setup-venvs.sh rally) runs bench/rally-task.yaml: Rally's standard
# NovaServers, NovaKeypair and NovaFlavors scenarios with the arguments of its own samples,
# TIMES iterations each (default 10), every one required to succeed.  Keeps Rally's HTML
# report as OUT_DIR/rally-report.html and its JSON as OUT_DIR/rally-report.json, prints a
# table of each scenario's iterations, failures and durations, and stops what it started.
set -euo pipefail
shopt -s inherit_errexit

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$(realpath -m "${1:-rally-out}")
TIMES=${2:-10}
RALLY_VENV=${MINIVAN_RALLY_VENV:-$REPO/.venv-rally}
PY=${MINIVAN_TEST_PYTHON:-$REPO/.venv/bin/python}     # has libvirt-python

command -v qemu-img >/dev/null || { echo "rally.sh: qemu-img is missing (apt install qemu-utils)" >&2; exit 1; }
"$REPO/tools/setup-venvs.sh" rally
rm -rf "$OUT"
mkdir -p "$OUT/data/images"

read -r KS_PORT MV_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
MV_URL=http://127.0.0.1:$MV_PORT

MV_PID=
cleanup() {
    if [[ -n $MV_PID ]] && kill -0 "$MV_PID" 2>/dev/null; then
        kill "$MV_PID"; wait "$MV_PID" 2>/dev/null || true
    fi
    "$REPO/tools/keystone.sh" stop "$OUT/keystone" >/dev/null 2>&1 || true
}
trap cleanup EXIT

"$REPO/tools/keystone.sh" start "$OUT/keystone" "$KS_PORT" "$MV_URL/v2.1" >/dev/null
# shellcheck disable=SC1091
source "$OUT/keystone/env"
# shellcheck source=tools/keystone-api.sh
source "$REPO/tools/keystone-api.sh"
admin_token rally.sh
image_service=$(ensure services "type=image" \
    '{"service": {"name": "glance", "type": "image", "description": "minivan /image"}}')
endpoints "$image_service" "$MV_URL/image"

# the image Rally's samples look for, and two simulated compute hosts (a resize moves)
qemu-img create -q -f qcow2 "$OUT/data/images/cirros-0.6.2-x86_64-disk.qcow2" 64M
echo '{"name": "cirros-0.6.2-x86_64-disk"}' > "$OUT/data/images/cirros-0.6.2-x86_64-disk.qcow2.json"
hosts=
for n in 1 2; do
    cat > "$OUT/data/cmp$n.xml" <<'NODE'
<node>
  <cpu><mhz>2000</mhz><model>x86_64</model><active>16</active><nodes>1</nodes>
    <sockets>1</sockets><cores>16</cores><threads>1</threads></cpu>
  <memory>33554432</memory>
</node>
NODE
    hosts+="${hosts:+,}cmp$n=test://$OUT/data/cmp$n.xml"
done

MINIVAN_DATA_DIR=$OUT/data MINIVAN_PORT=$MV_PORT MINIVAN_BIND=127.0.0.1 \
MINIVAN_KEYSTONE_URL=$OS_AUTH_URL MINIVAN_KEYSTONE_USERNAME=$MINIVAN_USERNAME \
MINIVAN_KEYSTONE_PASSWORD=$MINIVAN_PASSWORD MINIVAN_COMPUTE_HOSTS=$hosts \
MINIVAN_INSTANCE_NAME_TEMPLATE="rally$MV_PORT-%08x" MINIVAN_FIREWALL=none MINIVAN_GLANCE_URL=local \
    "$PY" "$REPO/minivan.py" > "$OUT/minivan.log" 2>&1 &
MV_PID=$!
for _ in $(seq 300); do
    curl -sf -o /dev/null "$MV_URL/healthcheck" && break
    kill -0 "$MV_PID" 2>/dev/null || { echo "rally.sh: minivan exited; see $OUT/minivan.log" >&2; exit 1; }
    sleep 0.1
done

cat > "$OUT/rally.conf" <<EOF
[database]
connection = sqlite:///$OUT/rally.sqlite
EOF
rally() { "$RALLY_VENV/bin/rally" --config-file "$OUT/rally.conf" "$@"; }
rally db create >/dev/null
OS_IDENTITY_API_VERSION=3 rally env create --name minivan --from-sysenv >/dev/null
rally env check
status=0
rally task start "$REPO/bench/rally-task.yaml" --task-args "{\"times\": $TIMES}" \
    > "$OUT/rally-task.log" 2>&1 || status=$?
rally task report --html --out "$OUT/rally-report.html" >/dev/null
rally task report --json --out "$OUT/rally-report.json" >/dev/null
"$PY" - "$OUT/rally-report.json" <<'PYEOF' | tee "$OUT/rally-summary.txt"
import json, sys
report = json.load(open(sys.argv[1]))
print(f"{'scenario (Rally: seconds per iteration)':<40}{'iterations':>11}{'success':>9}"
      f"{'min':>8}{'median':>8}{'90%ile':>8}{'max':>8}")
for task in report["tasks"]:
    for sub in task["subtasks"]:
        for wl in sub["workloads"]:
            total = wl["statistics"]["durations"]["total"]["data"]
            print(f"{sub['title']:<40}{total['iteration_count']:>11}{total['success']:>9}"
                  + "".join(f"{total[k]:>8}" for k in ("min", "median", "90%ile", "max")))
PYEOF
echo "rally.sh: HTML report $OUT/rally-report.html; Rally's log $OUT/rally-task.log"
if [[ $status -ne 0 ]] || grep -q '"pass_sla": false' "$OUT/rally-report.json"; then
    echo "rally.sh: a scenario failed or broke its SLA; see $OUT/rally-task.log" >&2
    exit 1
fi
