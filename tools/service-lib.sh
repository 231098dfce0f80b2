# shellcheck shell=bash
# Process, RabbitMQ and sqlite helpers shared by tools/cinder.sh, tools/neutron.sh and
# tools/glance.sh (sourced, not run).  The sourcing script sets LIB_NAME (its name in
# messages, and the RabbitMQ node and user name) and LIB_PASSWORD (the RabbitMQ user's
# password); its services run in DIR, each a process group of its own with DIR/NAME.pid
# and DIR/NAME.log.

RABBIT_BIN=/usr/lib/rabbitmq/bin/rabbitmq-server

# ours DIR NAME: prints the pid in DIR/NAME.pid if that process is still one we
# started: every process here runs with DIR (or, like MariaDB's, a directory below it)
# as its working directory (a stale pid may have been reused; cmdlines are rewritten by
# setproctitle).
ours() {
    local pid cwd
    [[ -f $1/$2.pid ]] || return 1
    pid=$(cat "$1/$2.pid")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    cwd=$(readlink "/proc/$pid/cwd" 2>/dev/null) || return 1
    [[ $cwd == "$1" || $cwd == "$1"/* ]] || return 1
    echo "$pid"
}

# free_ports N: N distinct free TCP ports on 127.0.0.1.
free_ports() {
    python3 -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# spawn DIR NAME CMD...: runs CMD in the background, in DIR, in a session (and
# process group) of its own, output to DIR/NAME.log; its pid to DIR/NAME.pid.
spawn() {
    local dir=$1 name=$2 pid i; shift 2
    (cd "$dir" && exec setsid "$@" >>"$dir/$name.log" 2>&1 </dev/null) &
    pid=$!
    echo "$pid" > "$dir/$name.pid"
    # returns once it runs in DIR (what ours() checks) or has ended: a check right after
    # would otherwise find it still in the caller's directory and call it dead
    for i in $(seq 250); do
        ours "$dir" "$name" >/dev/null || [[ ! -d /proc/$pid ]] && break
        sleep 0.02
    done
}

# alive DIR NAME: fails, with the tail of its log, if NAME has died.
alive() {
    ours "$1" "$2" >/dev/null && return 0
    echo "$LIB_NAME: $2 died; tail of $1/$2.log:" >&2
    tail -n 30 "$1/$2.log" >&2
    return 1
}

write_rabbit_config() {  # write_rabbit_config DIR AMQP_PORT
    local rdir=$1/rabbitmq
    mkdir -p "$rdir/log"
    rm -rf "$rdir/mnesia"            # a fresh broker each start
    cat > "$rdir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$2
default_user = $LIB_NAME
default_pass = $LIB_PASSWORD
default_vhost = /
log.file.level = warning
EOF
    echo '[].' > "$rdir/enabled_plugins"
    : > "$rdir/rabbitmq-env.conf"
}

start_rabbit() {  # start_rabbit DIR AMQP_PORT DIST_PORT EPMD_PORT
    local dir=$1 rdir=$1/rabbitmq
    write_rabbit_config "$dir" "$2"
    # our own epmd, loopback only, on its own port: no clash with another run
    spawn "$dir" epmd epmd -port "$4" -address 127.0.0.1
    # the real start script (not Debian's wrapper, which su's to "rabbitmq")
    spawn "$dir" rabbitmq env HOME="$rdir" \
        ERL_EPMD_PORT="$4" ERL_EPMD_ADDRESS=127.0.0.1 ERL_CRASH_DUMP="$rdir/erl_crash.dump" \
        RABBITMQ_NODENAME=$LIB_NAME@localhost \
        RABBITMQ_CONF_ENV_FILE="$rdir/rabbitmq-env.conf" \
        RABBITMQ_CONFIG_FILE="$rdir/rabbitmq.conf" \
        RABBITMQ_ADVANCED_CONFIG_FILE="$rdir/advanced.config" \
        RABBITMQ_ENABLED_PLUGINS_FILE="$rdir/enabled_plugins" \
        RABBITMQ_MNESIA_BASE="$rdir/mnesia" \
        RABBITMQ_LOG_BASE="$rdir/log" \
        RABBITMQ_PID_FILE="$rdir/rabbit.pid" \
        RABBITMQ_DIST_PORT="$3" \
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
        "$RABBIT_BIN"
}

wait_rabbit() {  # wait_rabbit DIR AMQP_PORT
    local i
    for i in $(seq 120); do
        # the AMQP listener opens last, once the broker has booted
        (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && return 0
        alive "$1" rabbitmq || exit 1
        alive "$1" epmd || exit 1
        sleep 0.5
    done
    echo "$LIB_NAME: RabbitMQ not listening on 127.0.0.1:$2 after 60s; see $1/rabbitmq.log" >&2
    exit 1
}

# group_alive PGID: some process of group PGID is still running (orphans are
# reaped by pid 1 only now and then: zombies do not count).
group_alive() {
    local pids
    pids=$(pgrep -g "$1" | paste -sd, -) || return 1
    ps -o stat= -p "$pids" | grep -qv '^Z'
}

# stop_one DIR NAME: TERM to the process group of DIR/NAME.pid (the service,
# its workers or children, privsep daemons), then KILL after 20s.
stop_one() {
    local dir=$1 name=$2 pid i
    if pid=$(ours "$dir" "$name"); then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
        for i in $(seq 200); do
            group_alive "$pid" || break
            sleep 0.1
        done
        if group_alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
        echo "$LIB_NAME: stopped $name (pid $pid)"
    elif [[ -f $dir/$name.pid ]]; then
        echo "$LIB_NAME: $name (pid $(cat "$dir/$name.pid")) is not running"
    fi
    rm -f "$dir/$name.pid"
}

# write_sqlite_fix FILE: a Python module that, imported before a service opens its
# database, makes sqlite usable by several processes at once.
write_sqlite_fix() {
    # sqlite shared by several processes (and API workers): oslo.db opens
    # every transaction with a plain (deferred) BEGIN, so two that read and
    # then write deadlock and one fails at once with "database is locked".
    # BEGIN IMMEDIATE takes the write lock up front, so they queue
    # (busy_timeout) instead.  The listener is class-level, so it runs before
    # oslo.db's per-engine one, which then sees "in_transaction".
    cat > "$1" <<'EOF'
import sqlalchemy
from sqlalchemy.engine import Engine


@sqlalchemy.event.listens_for(Engine, 'connect')
def _sqlite_busy_timeout(dbapi_con, con_record):
    if type(dbapi_con).__module__.startswith('sqlite3'):
        dbapi_con.execute('PRAGMA busy_timeout = 60000')


@sqlalchemy.event.listens_for(Engine, 'begin')
def _sqlite_begin_immediate(conn):
    if conn.dialect.name == 'sqlite' and 'in_transaction' not in conn.info:
        conn.exec_driver_sql('BEGIN IMMEDIATE')
        conn.info['in_transaction'] = True
EOF
}

# auth_options USER: the options of a config section that authenticates as USER
# (password LIB_PASSWORD, project "service") against OS_AUTH_URL.
auth_options() {
    printf '%s\n' "auth_url = $OS_AUTH_URL" "auth_type = password" "username = $1" \
        "password = $LIB_PASSWORD" "project_name = service" "user_domain_name = Default" \
        "project_domain_name = Default" "region_name = RegionOne"
}
