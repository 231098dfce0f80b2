#!/usr/bin/env bash
# neutron.sh - run a real Neutron (PyPI "neutron": ML2 with the Open vSwitch mechanism
# driver and agent, sqlite, RabbitMQ) on 127.0.0.1 for minivan's tests, with its own
# Open vSwitch in userspace (the netdev datapath: no kernel module needed) and
# keystonemiddleware auth against a Keystone started by tools/keystone.sh.
#
#   tools/neutron.sh start DIR PORT KEYSTONE_ENV_FILE
#       Creates (idempotently, through keystone's REST API as admin) user
#       "neutron"/secret with roles admin+service in project "service" and a
#       "network" service "neutron" with public/internal/admin endpoints
#       http://127.0.0.1:PORT in RegionOne.  Then starts, as background processes
#       of their own with pid files in DIR:
#         ovsdb-server, ovs-vswitchd   Open vSwitch on /var/run/openvswitch/db.sock
#                                      (where libvirt and the agent look), its
#                                      database in DIR/ovs; bridges br-int and br-phys
#                                      use the netdev (userspace) datapath
#         rabbitmq, epmd               RabbitMQ on 127.0.0.1, free ports
#         neutron-api                  gunicorn serving neutron's WSGI app on PORT
#         neutron-rpc                  neutron's RPC server
#         neutron-ovs-agent            the Open vSwitch agent, as host `hostname -s`
#       and returns once the API answers and the agent is alive.  Makes a shared flat
#       network "minivan-net" on physnet1 (br-phys) with subnet 10.77.0.0/24 (no DHCP
#       agent: addresses are Neutron's fixed IPs).  Projects may make networks of their
#       own (ML2 type "local": on this host only).  For floating IPs (the router
#       service plugin, no L3 agent: addresses are allocated and associated, not routed):
#       an external network "public" (10.78.0.0/24) and a router "minivan-router" from
#       minivan-subnet to it.  Appends to DIR/env (sourceable): NEUTRON_URL,
#       NEUTRON_NETWORK_ID, NEUTRON_NETWORK_NAME, NEUTRON_PUBLIC_NETWORK_ID,
#       NEUTRON_AGENT_HOST.
#       With NEUTRON_AGENTS=all (Nova's gate, inside the namespace of tools/gate.sh) it
#       runs Neutron as devstack does instead: also its DHCP agent (dnsmasq), L3 agent
#       (routers, floating IPs, NAT in namespaces of their own) and metadata agent
#       (haproxy in those namespaces, relaying to the compute service's metadata API at
#       NEUTRON_NOVA_METADATA=HOST:PORT, signed with NEUTRON_METADATA_SECRET), the
#       Open vSwitch firewall (security groups enforced), and instead of minivan-net
#       and the local "public": the external bridge br-ex holding 172.24.4.1/24 and a
#       flat external network "public" on it (subnet 172.24.4.0/24, no router), the
#       default one, with a shared default subnet pool (10.0.0.0/22, /26 subnets) for
#       Neutron's auto-allocated topology, as devstack makes them.
#       With NEUTRON_QOS_BANDWIDTH=KBPS (ML2/OVS) it loads QoS (the qos service and ML2
#       extension) and reports to Placement (the placement service plugin, Placement
#       found in the catalog): the agent's br-phys (physnet1) becomes a resource provider
#       under this host's compute node provider, with KBPS kbit/s of guaranteed egress
#       and ingress bandwidth, so that ports with a minimum-bandwidth rule ask for it.
#       With NEUTRON_AGENTS=ovn it runs ML2/OVN, devstack's default, instead of the
#       agents: OVN's databases and ovn-northd, ovn-controller making this host a
#       gateway chassis (geneve project networks, OVN's own DHCP and routers, NAT and
#       security groups in Open vSwitch), Neutron's OVN maintenance worker and the OVN
#       metadata agent; the same br-ex, "public" network and subnet pool.
#   tools/neutron.sh stop DIR
#       Stops the agents, the RPC server, the API, RabbitMQ, epmd, MariaDB, OVN and
#       Open vSwitch (each by its process group) and removes the "network" service from
#       the catalog, so that a compute service started later sees no Neutron.
#
# The database is sqlite made from neutron's models (its migrations need MySQL) and
# stamped at the migrations' heads; with ML2/OVN, or with NEUTRON_DB=mariadb (as
# devstack's MySQL, whose case-blind comparisons some API filters rely on), a MariaDB of
# its own in DIR with the schema from the migrations (see db_url).  Neutron runs as root: its root helper is
# plain sudo.
# Uses ${MINIVAN_NEUTRON_VENV:-REPO/.venv-neutron} (tools/setup-venvs.sh).
set -euo pipefail
shopt -s inherit_errexit

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NV=${MINIVAN_NEUTRON_VENV:-$REPO/.venv-neutron}
PASSWORD=secret
AGENTS=${NEUTRON_AGENTS:-ovs}
[[ $AGENTS == ovs || $AGENTS == all || $AGENTS == ovn ]] ||
    { echo "neutron: NEUTRON_AGENTS is ovs, all or ovn" >&2; exit 2; }
OVS_RUN=/var/run/openvswitch
# stop order: the broker's clients first, OVN and Open vSwitch last
SERVICES=(neutron-ovn-metadata-agent neutron-metadata-agent neutron-l3-agent neutron-dhcp-agent
          neutron-ovs-agent neutron-ovn-maintenance neutron-rpc neutron-api rabbitmq epmd
          mariadb ovn-controller ovn-northd ovn-sb ovn-nb ovs-vswitchd ovsdb-server)
# shellcheck source=tools/keystone-api.sh
source "$REPO/tools/keystone-api.sh"
LIB_NAME=neutron LIB_PASSWORD=$PASSWORD
# shellcheck source=tools/service-lib.sh
source "$REPO/tools/service-lib.sh"

usage() { echo "usage: $0 start DIR PORT KEYSTONE_ENV_FILE | stop DIR" >&2; exit 2; }

# metadata_relay_options: where either metadata agent relays guests' requests (the compute
# service's metadata API at NEUTRON_NOVA_METADATA) and the secret it signs them with
metadata_relay_options() {
    local metadata=${NEUTRON_NOVA_METADATA:-127.0.0.1:8775}
    printf '%s\n' "nova_metadata_host = ${metadata%:*}" "nova_metadata_port = ${metadata##*:}" \
        "metadata_proxy_shared_secret = ${NEUTRON_METADATA_SECRET:-}" "metadata_workers = 1"
}

write_config() {  # write_config DIR PORT AMQP_PORT
    local dir=$1 port=$2 amqp=$3 section
    cat > "$dir/neutron.conf" <<EOF
[DEFAULT]
debug = false
host = $(hostname -s)
core_plugin = ml2
service_plugins = $([[ $AGENTS == ovn ]] && echo ovn-router || echo router)$(
    [[ -n ${NEUTRON_QOS_BANDWIDTH:-} ]] && echo ",qos,placement")
auth_strategy = keystone
api_paste_config = $dir/api-paste.ini
transport_url = rabbit://neutron:$PASSWORD@127.0.0.1:$amqp/
state_path = $dir/state
bind_host = 127.0.0.1
bind_port = $port
api_workers = 1
rpc_workers = 1
rpc_state_report_workers = 1
# port status changes reach the compute service as os-server-external-events
notify_nova_on_port_status_changes = true
notify_nova_on_port_data_changes = true
# the metadata agent's socket, where the haproxy of each router or DHCP namespace relays
metadata_proxy_socket = $dir/state/metadata_proxy
[database]
connection = $(db_url "$dir")
[oslo_concurrency]
lock_path = $dir/state/lock
[oslo_messaging_notifications]
driver = noop
[oslo_messaging_rabbit]
heartbeat_timeout_threshold = 0
[agent]
root_helper = sudo
$([[ -n ${NEUTRON_QOS_BANDWIDTH:-} ]] && echo "report_interval = 5")
[keystone_authtoken]
www_authenticate_uri = $OS_AUTH_URL
$(auth_options neutron)
token_cache_time = 300
[nova]
$(auth_options neutron)
endpoint_type = public
EOF
    if [[ -n ${NEUTRON_QOS_BANDWIDTH:-} ]]; then
        # QoS with guaranteed minimum bandwidth: the agent's bridge is a resource provider
        # under the compute node's in Placement, as devstack's q-qos with placement
        printf '%s\n' "[placement]" "$(auth_options neutron)" "valid_interfaces = public" \
            >> "$dir/neutron.conf"
    fi
    for section in privsep privsep_link privsep_ovs_vsctl privsep_namespace; do
        printf '[%s]\nhelper_command = sudo %s/bin/privsep-helper --config-file %s --config-file %s\n' \
            "$section" "$NV" "$dir/neutron.conf" "$dir/ml2.ini" >> "$dir/neutron.conf"
    done
    if [[ $AGENTS == ovn ]]; then
        write_ovn_config "$dir"
    else
        cat > "$dir/ml2.ini" <<EOF
[ml2]
type_drivers = flat,local
tenant_network_types = local
mechanism_drivers = openvswitch
extension_drivers = port_security$([[ -n ${NEUTRON_QOS_BANDWIDTH:-} ]] && echo ",qos")
[ml2_type_flat]
flat_networks = physnet1$([[ $AGENTS == all ]] && echo ",public")
[ovs]
bridge_mappings = physnet1:br-phys$([[ $AGENTS == all ]] && echo ",public:br-ex")
$([[ -n ${NEUTRON_QOS_BANDWIDTH:-} ]] && printf '%s\n' \
    "resource_provider_bandwidths = br-phys:$NEUTRON_QOS_BANDWIDTH:$NEUTRON_QOS_BANDWIDTH" \
    "resource_provider_default_hypervisor = $(hostname -s)")
datapath_type = netdev
integration_bridge = br-int
ovsdb_connection = unix:$OVS_RUN/db.sock
[securitygroup]
firewall_driver = $([[ $AGENTS == all ]] && echo openvswitch || echo noop)
[agent]
tunnel_types =
EOF
    fi
    # the agents of NEUTRON_AGENTS=all, as devstack configures them for ML2/OVS
    cat > "$dir/dhcp_agent.ini" <<EOF
[DEFAULT]
interface_driver = openvswitch
ovs_use_veth = ${NEUTRON_OVS_USE_VETH:-False}
dhcp_driver = neutron.agent.linux.dhcp.Dnsmasq
enable_isolated_metadata = true
EOF
    cat > "$dir/l3_agent.ini" <<EOF
[DEFAULT]
interface_driver = openvswitch
ovs_use_veth = ${NEUTRON_OVS_USE_VETH:-False}
EOF
    cat > "$dir/metadata_agent.ini" <<EOF
[DEFAULT]
$(metadata_relay_options)
EOF
    cp "$NV/etc/neutron/api-paste.ini" "$dir/api-paste.ini"
    write_sqlite_fix "$dir/neutron_sqlite.py"
    # the API under gunicorn: neutron's config machinery parses sys.argv
    cat > "$dir/neutron_wsgi.py" <<EOF
import sys
sys.argv = [sys.argv[0], '--config-file', '$dir/neutron.conf', '--config-file', '$dir/ml2.ini']
sys.path.insert(0, '$dir')
import neutron_sqlite  # noqa: E402,F401
from neutron.wsgi.api import application  # noqa: E402,F401
EOF
    # the RPC server and the agent, with the same sqlite fix
    cat > "$dir/neutron_service.py" <<'EOF'
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import neutron_sqlite  # noqa: E402,F401

module, func = {'rpc': ('neutron.cmd.server', 'main_rpc'),
                'ovs-agent': ('neutron.cmd.agents.ovs_neutron_agent', 'main'),
                'dhcp-agent': ('neutron.cmd.agents.dhcp', 'main'),
                'l3-agent': ('neutron.cmd.agents.l3', 'main'),
                'metadata-agent': ('neutron.cmd.agents.metadata', 'main'),
                'ovn-metadata-agent': ('neutron.cmd.agents.ovn_metadata', 'main'),
                'ovn-maintenance': ('neutron.cmd.server', 'main_ovn_maintenance')}[sys.argv.pop(1)]
sys.exit(getattr(importlib.import_module(module), func)())
EOF
    # the schema from neutron's models (its migrations need MySQL), stamped at head
    cat > "$dir/neutron_db.py" <<'EOF'
import sys

import sqlalchemy
from neutron.db.migration.models import head

head.get_metadata().create_all(sqlalchemy.create_engine(sys.argv[1]))
EOF
}

# ML2/OVN as devstack configures it: geneve project networks, OVN's own DHCP and routers
# (NAT in Open vSwitch), security groups as OVN ACLs, and the OVN metadata agent (haproxy
# in an ovnmeta-<network> namespace per network, reached through OVN's DHCP route)
write_ovn_config() {  # write_ovn_config DIR
    local dir=$1
    cat > "$dir/ml2.ini" <<EOF
[ml2]
type_drivers = flat,geneve
tenant_network_types = geneve
mechanism_drivers = ovn
extension_drivers = port_security
overlay_ip_version = 4
[ml2_type_flat]
flat_networks = public
[ml2_type_geneve]
vni_ranges = 1:65536
max_header_size = 38
[ovn]
ovn_nb_connection = unix:$dir/ovn/nb.sock
ovn_sb_connection = unix:$dir/ovn/sb.sock
ovn_metadata_enabled = true
enable_distributed_floating_ip = false
[ovs]
ovsdb_connection = unix:$OVS_RUN/db.sock
[securitygroup]
enable_security_group = true
EOF
    cat > "$dir/ovn_metadata_agent.ini" <<EOF
[DEFAULT]
$(metadata_relay_options)
[ovs]
ovsdb_connection = unix:$OVS_RUN/db.sock
[ovn]
ovn_sb_connection = unix:$dir/ovn/sb.sock
EOF
}

# start_ovn DIR: OVN's northbound and southbound databases, ovn-northd, and this host
# as a chassis (ovn-controller) that can be a router's gateway, with br-ex as the
# bridge of the flat "public" network
start_ovn() {
    local dir=$1 db i
    mkdir -p "$dir/ovn" /var/run/ovn
    for db in nb sb; do
        [[ -f $dir/ovn/$db.db ]] ||
            ovsdb-tool create "$dir/ovn/$db.db" "/usr/share/ovn/ovn-$db.ovsschema"
        spawn "$dir" "ovn-$db" ovsdb-server "$dir/ovn/$db.db" --remote="punix:$dir/ovn/$db.sock" \
            --pidfile="$dir/ovn/$db.pid" --unixctl="$dir/ovn/$db.ctl"
    done
    for i in $(seq 100); do
        [[ -S $dir/ovn/nb.sock && -S $dir/ovn/sb.sock ]] && break
        alive "$dir" ovn-nb && alive "$dir" ovn-sb || exit 1
        sleep 0.1
    done
    ovn-nbctl --db="unix:$dir/ovn/nb.sock" --timeout=10 init
    ovn-sbctl --db="unix:$dir/ovn/sb.sock" --timeout=10 init
    spawn "$dir" ovn-northd ovn-northd --ovnnb-db="unix:$dir/ovn/nb.sock" \
        --ovnsb-db="unix:$dir/ovn/sb.sock" --pidfile="$dir/ovn/northd.pid" \
        --unixctl="$dir/ovn/northd.ctl"
    ovs-vsctl --timeout=10 set Open_vSwitch . external-ids:system-id="$(hostname -s)" \
        external-ids:hostname="$(hostname -s)" external-ids:ovn-remote="unix:$dir/ovn/sb.sock" \
        external-ids:ovn-encap-type=geneve external-ids:ovn-encap-ip=127.0.0.1 \
        external-ids:ovn-bridge=br-int external-ids:ovn-bridge-datapath-type=netdev \
        external-ids:ovn-bridge-mappings=public:br-ex \
        external-ids:ovn-cms-options=enable-chassis-as-gw
    # (its control socket is /var/run/ovn/ovn-controller.PID.ctl: 23.03 has no --unixctl)
    spawn "$dir" ovn-controller ovn-controller "unix:$OVS_RUN/db.sock" \
        --pidfile="$dir/ovn/controller.pid"
    for i in $(seq 100); do
        [[ -n $(ovn-sbctl --db="unix:$dir/ovn/sb.sock" --timeout=2 --bare --columns=name \
                find Chassis name="$(hostname -s)" 2>/dev/null) ]] && return 0
        alive "$dir" ovn-controller && alive "$dir" ovn-northd || exit 1
        sleep 0.2
    done
    echo "neutron: ovn-controller did not register this host as a chassis in 20 s" >&2
    exit 1
}

# db_url DIR: Neutron's database.  sqlite, made from Neutron's models, serves ML2/OVS;
# ML2/OVN needs a server (as devstack's MySQL): its OVSDB connection thread writes to the
# database (the hash ring's heartbeat) while an API request holds a transaction and
# waits for that thread, which sqlite's one database-wide lock turns into a deadlock.
db_url() {
    if [[ $AGENTS == ovn || ${NEUTRON_DB:-sqlite} == mariadb ]]; then
        echo "mysql+pymysql://root@localhost/neutron?unix_socket=$1/mariadb/mysql.sock&charset=utf8mb4"
    else
        echo "sqlite:///$1/neutron.db"
    fi
}

# start_mariadb DIR: a MariaDB of its own (no TCP, a socket in DIR/mariadb), and
# Neutron's schema from its own migrations
start_mariadb() {
    local dir=$1 i
    command -v mariadbd >/dev/null ||
        { echo "neutron: no mariadbd; apt-get install mariadb-server" >&2; exit 1; }
    "$NV/bin/python" -c 'import pymysql' 2>/dev/null ||
        { echo "neutron: no PyMySQL in $NV; run tools/setup-venvs.sh" >&2; exit 1; }
    if [[ ! -d $dir/mariadb/data ]]; then
        mkdir -p "$dir/mariadb"
        chmod 0700 "$dir/mariadb"     # root without a password, on this socket alone
        mariadb-install-db --no-defaults --datadir="$dir/mariadb/data" --user=root \
            --auth-root-authentication-method=normal --skip-test-db >>"$dir/db.log" 2>&1 ||
            { echo "neutron: mariadb-install-db failed, see $dir/db.log" >&2; exit 1; }
    fi
    spawn "$dir" mariadb mariadbd --no-defaults --datadir="$dir/mariadb/data" --user=root \
        --socket="$dir/mariadb/mysql.sock" --skip-networking --pid-file="$dir/mariadb/mariadb.pid"
    for i in $(seq 150); do
        mariadb --no-defaults -S "$dir/mariadb/mysql.sock" -u root -e 'SELECT 1' \
            >/dev/null 2>&1 && break
        alive "$dir" mariadb || exit 1
        sleep 0.2
    done
    mariadb --no-defaults -S "$dir/mariadb/mysql.sock" -u root \
        -e 'CREATE DATABASE IF NOT EXISTS neutron CHARACTER SET utf8mb4' &&
    "$NV/bin/neutron-db-manage" --config-file "$dir/neutron.conf" \
        --config-file "$dir/ml2.ini" upgrade heads >>"$dir/db.log" 2>&1 ||
        { echo "neutron: making the database failed, see $dir/db.log" >&2; exit 1; }
}

start_ovs() {  # start_ovs DIR
    local dir=$1 i
    mkdir -p "$dir/ovs" "$OVS_RUN"
    if [[ ! -f $dir/ovs/conf.db ]]; then
        ovsdb-tool create "$dir/ovs/conf.db" /usr/share/openvswitch/vswitch.ovsschema
    fi
    spawn "$dir" ovsdb-server ovsdb-server "$dir/ovs/conf.db" --remote="punix:$OVS_RUN/db.sock" \
        --pidfile="$dir/ovs/ovsdb-server.pid" --unixctl="$dir/ovs/ovsdb-server.ctl"
    for i in $(seq 100); do
        ovs-vsctl --timeout=2 --no-wait init 2>/dev/null && break
        alive "$dir" ovsdb-server || exit 1
        sleep 0.1
    done
    # the userspace datapath reads guests' packets through AF_PACKET sockets: with
    # virtio-net header support (userspace TSO) it learns which ones carry a checksum
    # still to be filled in (a guest's TCP checksum offload) instead of passing them on
    # with a partial checksum, which the receiver drops
    ovs-vsctl --timeout=2 --no-wait set Open_vSwitch . other_config:userspace-tso-enable=true
    # --monitor: a monitor process starts the switch again if it crashes, as Open
    # vSwitch's own ovs-ctl runs it (3.1's userspace connection tracker can trip an
    # assertion under NAT; the switch then comes back with its ports and flows)
    spawn "$dir" ovs-vswitchd ovs-vswitchd "unix:$OVS_RUN/db.sock" --monitor \
        --pidfile="$dir/ovs/ovs-vswitchd.pid" --unixctl="$dir/ovs/ovs-vswitchd.ctl"
    ovs-vsctl --timeout=30 -- --may-exist add-br br-int -- set bridge br-int datapath_type=netdev \
        -- --may-exist add-br br-phys -- set bridge br-phys datapath_type=netdev
    if [[ $AGENTS == all || $AGENTS == ovn ]]; then
        # the external bridge, with the address devstack gives it: floating IPs are
        # reached from this namespace through it
        ovs-vsctl --timeout=30 -- --may-exist add-br br-ex -- set bridge br-ex datapath_type=netdev
        ip addr replace 172.24.4.1/24 dev br-ex
        ip link set br-ex up
    fi
}

register() {  # register URL
    admin_token neutron
    service_user neutron "$PASSWORD"
    local svc
    svc=$(ensure services "type=network&name=neutron" \
        '{"service": {"name": "neutron", "type": "network"}}')
    endpoints "$svc" "$1"
}

# neutron_api METHOD PATH [JSON]: a call to Neutron with the admin TOKEN.
neutron_api() {
    curl -sS --fail-with-body -X "$1" -H "X-Auth-Token: $TOKEN" \
        -H 'Content-Type: application/json' ${3:+-d "$3"} "$URL/v2.0$2"
}

# wait_agents DIR SERVICE:BINARY...: until each BINARY is an agent Neutron reports alive
# (and each SERVICE, like the API, the RPC server, RabbitMQ and Open vSwitch, still runs)
wait_agents() {
    local dir=$1 i svc agents; shift
    for i in $(seq 240); do
        for svc in neutron-api neutron-rpc "${@%%:*}" rabbitmq ovs-vswitchd; do
            alive "$dir" "$svc" || exit 1
        done
        agents=$(neutron_api GET "/agents" 2>/dev/null || true)
        "$NV/bin/python" -c 'import json, sys
alive = {a["binary"] for a in json.loads(sys.argv[1] or "{}").get("agents", []) if a["alive"]}
sys.exit(not alive.issuperset(sys.argv[2:]))' "$agents" "${@##*:}" && return 0
        sleep 0.5
    done
    echo "neutron: not all of ${*##*:} alive after 120s: $agents; see the logs in $dir" >&2
    exit 1
}

start() {
    local dir port=$2 ks_env=$3 t0=$SECONDS svc i
    mkdir -p "$1"; dir=$(cd "$1" && pwd -P)
    URL=http://127.0.0.1:$port
    [[ -x $NV/bin/gunicorn ]] ||
        { echo "neutron: no $NV/bin/gunicorn; run tools/setup-venvs.sh" >&2; exit 1; }
    [[ -x $RABBIT_BIN ]] || { echo "neutron: no $RABBIT_BIN; apt-get install rabbitmq-server" >&2; exit 1; }
    command -v ovs-vswitchd >/dev/null ||
        { echo "neutron: no ovs-vswitchd; apt-get install openvswitch-switch" >&2; exit 1; }
    command -v sudo >/dev/null || { echo "neutron: no sudo; apt-get install sudo" >&2; exit 1; }
    [[ -f $ks_env ]] || { echo "neutron: no keystone env file $ks_env" >&2; exit 1; }
    for svc in "${SERVICES[@]}"; do
        ours "$dir" "$svc" >/dev/null && { echo "neutron: $svc already running in $dir" >&2; exit 1; }
    done
    if [[ -S $OVS_RUN/db.sock ]] && ovs-vsctl --timeout=2 show >/dev/null 2>&1; then
        echo "neutron: an Open vSwitch already runs on $OVS_RUN/db.sock" >&2; exit 1
    fi
    # shellcheck source=/dev/null
    source "$ks_env"
    : "${OS_AUTH_URL:?not set by $ks_env}"
    cp "$ks_env" "$dir/keystone-env"                # for stop: the catalog entry goes

    local amqp_port dist_port epmd_port
    read -r amqp_port dist_port epmd_port < <(free_ports 3)
    start_rabbit "$dir" "$amqp_port" "$dist_port" "$epmd_port"   # boots meanwhile
    start_ovs "$dir"
    echo "neutron: Open vSwitch (userspace datapath) ready after $((SECONDS - t0))s"
    if [[ $AGENTS == ovn ]]; then
        command -v ovn-controller >/dev/null ||
            { echo "neutron: no ovn-controller; apt-get install ovn-central ovn-host" >&2; exit 1; }
        start_ovn "$dir"
        echo "neutron: OVN (northd, controller) ready after $((SECONDS - t0))s"
    fi
    register "$URL"
    mkdir -p "$dir/state/lock"
    write_config "$dir" "$port" "$amqp_port"
    if [[ $AGENTS == ovn || ${NEUTRON_DB:-sqlite} == mariadb ]]; then
        start_mariadb "$dir"
    elif [[ ! -f $dir/neutron.db ]]; then
        "$NV/bin/python" "$dir/neutron_db.py" "sqlite:///$dir/neutron.db" >>"$dir/db.log" 2>&1 &&
        "$NV/bin/neutron-db-manage" --config-file "$dir/neutron.conf" \
            --config-file "$dir/ml2.ini" stamp heads >>"$dir/db.log" 2>&1 ||
            { echo "neutron: making the database failed, see $dir/db.log" >&2; exit 1; }
    fi
    echo "neutron: database ready after $((SECONDS - t0))s"
    wait_rabbit "$dir" "$amqp_port"
    local config=(--config-file "$dir/neutron.conf" --config-file "$dir/ml2.ini")
    export PYTHONWARNINGS=ignore::DeprecationWarning
    # the API's worker count, which OVN's hash ring reads (from uWSGI or mod_wsgi, or
    # this variable for other servers, as gunicorn here); without it OVN's events (a
    # port going up: network-vif-plugged) are never handled
    export ASGI_WORKERS=1
    spawn "$dir" neutron-api "$NV/bin/gunicorn" --workers 1 --bind "127.0.0.1:$port" \
        --timeout 300 --access-logfile - --error-logfile - neutron_wsgi:application
    spawn "$dir" neutron-rpc "$NV/bin/python" "$dir/neutron_service.py" rpc "${config[@]}"
    if [[ $AGENTS == ovn ]]; then
        spawn "$dir" neutron-ovn-maintenance "$NV/bin/python" "$dir/neutron_service.py" \
            ovn-maintenance "${config[@]}"
        spawn "$dir" neutron-ovn-metadata-agent "$NV/bin/python" "$dir/neutron_service.py" \
            ovn-metadata-agent --config-file "$dir/neutron.conf" \
            --config-file "$dir/ovn_metadata_agent.ini"
        wait_agents "$dir" ovn-controller:ovn-controller \
            neutron-ovn-metadata-agent:neutron-ovn-metadata-agent
    else
        spawn "$dir" neutron-ovs-agent "$NV/bin/python" "$dir/neutron_service.py" ovs-agent \
            "${config[@]}"
        wait_agents "$dir" neutron-ovs-agent:neutron-openvswitch-agent
    fi
    if [[ $AGENTS == all ]]; then
        # only now: the Open vSwitch agent's reports show that the RPC server consumes
        # its queues (a call sent before that is lost and waits out a 60 s timeout)
        for svc in dhcp l3 metadata; do
            spawn "$dir" "neutron-$svc-agent" "$NV/bin/python" "$dir/neutron_service.py" \
                "$svc-agent" "${config[@]}" --config-file "$dir/${svc}_agent.ini"
        done
        wait_agents "$dir" neutron-ovs-agent:neutron-openvswitch-agent \
            neutron-dhcp-agent:neutron-dhcp-agent neutron-l3-agent:neutron-l3-agent \
            neutron-metadata-agent:neutron-metadata-agent
    fi
    echo "neutron: API on $URL, agents alive after $((SECONDS - t0))s"

    # the default security group rule templates Neutron's migrations insert (the schema
    # here is made from its models): egress allowed in every group, and ingress from
    # members of the same group in a project's default group
    if [[ $(neutron_api GET /default-security-group-rules | jget default_security_group_rules 0 id) == "" ]]; then
        local ether
        for ether in IPv4 IPv6; do
            neutron_api POST /default-security-group-rules '{"default_security_group_rule":
                {"direction": "egress", "ethertype": "'$ether'", "used_in_default_sg": true,
                 "used_in_non_default_sg": true}}' >/dev/null
            neutron_api POST /default-security-group-rules '{"default_security_group_rule":
                {"direction": "ingress", "ethertype": "'$ether'", "remote_group_id": "PARENT",
                 "used_in_default_sg": true, "used_in_non_default_sg": false}}' >/dev/null
        done
    fi
    local net public
    if [[ $AGENTS == all || $AGENTS == ovn ]]; then
        public=$(neutron_api GET "/networks?name=public" | jget networks 0 id)
        if [[ -z $public ]]; then
            # as devstack: the default external network, and a shared default subnet
            # pool, which Neutron's auto-allocated topology ("get me a network") needs
            public=$(neutron_api POST /networks '{"network": {"name": "public",
                "router:external": true, "is_default": true, "provider:network_type": "flat",
                "provider:physical_network": "public"}}' | jget network id)
            neutron_api POST /subnetpools '{"subnetpool": {"name":
                "shared-default-subnetpool-v4", "prefixes": ["10.0.0.0/22"],
                "default_prefixlen": 26, "shared": true, "is_default": true}}' >/dev/null
            neutron_api POST /subnets '{"subnet": {"network_id": "'"$public"'",
                "ip_version": 4, "cidr": "172.24.4.0/24", "gateway_ip": "172.24.4.1",
                "allocation_pools": [{"start": "172.24.4.10", "end": "172.24.4.250"}],
                "enable_dhcp": false, "name": "public-subnet"}}' >/dev/null
        fi
        write_env "$dir" "" "" "$public"
        echo "neutron: external network public ($public) on br-ex; env in $dir/env"
        return
    fi
    net=$(neutron_api GET "/networks?name=minivan-net" | jget networks 0 id)
    if [[ -z $net ]]; then
        net=$(neutron_api POST /networks '{"network": {"name": "minivan-net", "shared": true,
            "provider:network_type": "flat", "provider:physical_network": "physnet1"}}' |
            jget network id)
        neutron_api POST /subnets '{"subnet": {"network_id": "'"$net"'", "ip_version": 4,
            "cidr": "10.77.0.0/24", "enable_dhcp": false, "name": "minivan-subnet"}}' >/dev/null
    fi
    # floating IPs: an external network "public" and a router from minivan-net to it (no
    # L3 agent: addresses are allocated and associated, not routed)
    public=$(neutron_api GET "/networks?name=public" | jget networks 0 id)
    if [[ -z $public ]]; then
        public=$(neutron_api POST /networks '{"network": {"name": "public",
            "router:external": true, "provider:network_type": "local"}}' | jget network id)
        local subnet router
        neutron_api POST /subnets '{"subnet": {"network_id": "'"$public"'", "ip_version": 4,
            "cidr": "10.78.0.0/24", "enable_dhcp": false, "name": "public-subnet"}}' >/dev/null
        router=$(neutron_api POST /routers '{"router": {"name": "minivan-router",
            "external_gateway_info": {"network_id": "'"$public"'"}}}' | jget router id)
        subnet=$(neutron_api GET "/subnets?name=minivan-subnet" | jget subnets 0 id)
        neutron_api PUT "/routers/$router/add_router_interface" \
            '{"subnet_id": "'"$subnet"'"}' >/dev/null
    fi
    write_env "$dir" "$net" minivan-net "$public"
    echo "neutron: network minivan-net ($net); NEUTRON_URL=$URL appended to $dir/env"
}

write_env() {  # write_env DIR NETWORK_ID NETWORK_NAME PUBLIC_NETWORK_ID
    touch "$1/env"
    sed -i '/^export NEUTRON_[A-Z_]*=/d' "$1/env"
    cat >> "$1/env" <<EOF
export NEUTRON_URL=$URL
export NEUTRON_NETWORK_ID=$2
export NEUTRON_NETWORK_NAME=$3
export NEUTRON_PUBLIC_NETWORK_ID=$4
export NEUTRON_AGENT_HOST=$(hostname -s)
EOF
}

stop() {
    local dir svc
    dir=$(cd "$1" && pwd -P)
    for svc in "${SERVICES[@]}"; do stop_one "$dir" "$svc"; done
    # what the agents started on their own (dnsmasq, haproxy), each by its pid file
    local pidfile pid
    for pidfile in "$dir"/state/external/pids/*.pid* "$dir"/state/dhcp/*/pid; do
        [[ -s $pidfile ]] || continue
        pid=$(cat "$pidfile")
        if [[ $pid =~ ^[0-9]+$ ]]; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    rm -f "$OVS_RUN/db.sock"
    remove_service neutron network "$dir"
}

case ${1:-} in
    start) [[ $# == 4 ]] || usage; start "$2" "$3" "$4" ;;
    stop)  [[ $# == 2 ]] || usage; stop "$2" ;;
    *)     usage ;;
esac
