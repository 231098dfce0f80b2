#!/usr/bin/env python3
"""minivan's benchmark: latency, throughput, durability and footprint as the cloud grows.

    python3 bench/bench.py [--sizes 0,100,1000,10000] [--json bench.json] [--smoke]

For each size N it starts its own minivan (noauth, a free loopback port, a fresh data
directory, its normal INFO access log to a file, libvirt's test hypervisor), fills it
with N servers through the API, and measures from separate client processes over
keep-alive HTTP (http.client):

  flavors/detail, servers/{id}     p50/p90 latency; requests/s with 1 and 8 clients
  servers/detail at 2.1, latest    p50/p90 of the default page (up to 1,000 servers)
  create -> ACTIVE                 p50/p90 of single creates
  stop, start, reboot              p50/p90 of each action to its end state
  500 concurrent creates           wall time until all are ACTIVE (8 clients)
  durable mutations/s              metadata sets and create+delete pairs (8 clients)
  start-up                         seconds from exec to the first answer, and RSS then
  RSS                              of the daemon at idle and after the run
  state file                       size of state.json + journal

Each figure is a median over the repetitions (--repeat), with the spread (min-max)
where it is measured more than once.  The table goes to stdout, the same figures as
JSON to --json.  --smoke runs a few seconds (CI): sizes 0 and 20, short loops.

Other modes:

  --peer    the same workload against the real Nova 34 as well (bench/nova_peer.py in
            Nova's virtualenv), by default at 0 and 100 servers with 48 concurrent
            creates; prints both side by side with the ratio, --json keeps both,
            --svg draws the ratios as bars on a log scale
  --wire    p50 of servers/detail, flavors/detail and server show at --wire-servers
            servers, beside a bare http.server that sends back the same bytes
  --tail    at 0, 1,000, 10,000 and 100,000 servers: p50 and p99 of reads while a
            writer sets metadata and snapshots are taken every --tail-journal bytes;
            start-up, RSS and durable mutations at each size
"""
import argparse
import html
import http.client
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MINIVAN = os.path.join(HERE, "..", "minivan.py")
SIZES = "0,100,1000,10000"
HEADERS = {"X-Auth-Token": "admin:admin", "Content-Type": "application/json"}


# -- the daemon -----------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    """Resident set size of a process, in MB (from /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Daemon:
    """A minivan process on its own data directory."""

    name = "minivan"

    def __init__(self, data, env=None):
        self.data = data
        self.port = free_port()
        self.proc = None
        self.env = env or {}          # MINIVAN_* settings over the ones below

    def start(self):
        env = dict(os.environ, MINIVAN_DATA_DIR=self.data, MINIVAN_PORT=str(self.port),
                   MINIVAN_LIBVIRT_URI="test:///default", MINIVAN_AUTH="noauth",
                   MINIVAN_BIND="127.0.0.1", MINIVAN_SYNC_POWER_STATE_INTERVAL="60",
                   MINIVAN_FIREWALL="none",
                   # the simulated host (8 GB, a few CPUs) must hold 100,000 servers
                   MINIVAN_CPU_ALLOCATION_RATIO="100000",
                   MINIVAN_RAM_ALLOCATION_RATIO="100000",
                   MINIVAN_DISK_ALLOCATION_RATIO="100000")
        env.update(self.env)
        log = open(os.path.join(self.data, "minivan.log"), "a")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, MINIVAN], env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/healthcheck")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("minivan exited; see " + os.path.join(self.data,
                                                                         "minivan.log"))
            time.sleep(0.005)
        return time.perf_counter() - t0

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss(self):
        return rss_mb(self.proc.pid)

    def state_bytes(self):
        return sum(os.path.getsize(os.path.join(self.data, name))
                   for name in ("state.json", "state.json.journal")
                   if os.path.exists(os.path.join(self.data, name)))


class NovaPeer:
    """The real Nova (bench/nova_peer.py in Nova's virtualenv), on a free loopback port.

    Its databases live in temporary files that go with the process, so it always
    starts empty."""

    name = "nova"

    def __init__(self, python, computes=3):
        self.python = python
        self.computes = computes
        self.port = free_port()
        self.proc = None
        self.log = tempfile.NamedTemporaryFile(prefix="nova-peer-", suffix=".log",
                                               delete=False).name

    def start(self):
        t0 = time.perf_counter()
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [self.python, os.path.join(HERE, "nova_peer.py"), "--port", str(self.port),
                 "--computes", str(self.computes)], stdout=log, stderr=subprocess.STDOUT)
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/v2.1/flavors", headers=HEADERS)
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("the Nova peer exited; see " + self.log)
            time.sleep(0.02)
        return time.perf_counter() - t0

    def stop(self):
        Daemon.stop(self)

    def rss(self):
        return rss_mb(self.proc.pid)

    def state_bytes(self):
        return None


# -- clients --------------------------------------------------------------------------

class Client:
    """One keep-alive HTTP connection."""

    poll = 0.002            # seconds between GETs while waiting for a status

    def __init__(self, port):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def call(self, method, path, body=None, version=None, parse=True):
        headers = dict(HEADERS)
        if version:
            headers["OpenStack-API-Version"] = "compute " + version
        data = json.dumps(body) if body is not None else None
        for attempt in (0, 1):
            try:
                self.conn.request(method, "/v2.1" + path, data, headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw and parse else raw)
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
                if attempt:
                    raise
        raise RuntimeError("unreachable")

    def wait_status(self, server_id, wanted, timeout=120):
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            status, body = self.call("GET", "/servers/" + server_id)
            if status == 200 and body["server"]["status"] in wanted:
                return body["server"]["status"]
            if status == 200 and body["server"]["status"] == "ERROR":
                raise RuntimeError(f"server {server_id}: ERROR {body['server'].get('fault')}")
            time.sleep(self.poll)
        raise RuntimeError(f"server {server_id} not {wanted} after {timeout}s")


def timed_gets(args):
    """Worker: GET path count times; returns the latencies in seconds.  With a server
    id after count, that server's metadata is changed (untimed) before each GET."""
    port, path, version, count, *change = args
    client = Client(port)
    latencies = []
    for i in range(count):
        if change:
            status, _ = client.call("PUT", f"/servers/{change[0]}/metadata/bench",
                                    {"meta": {"bench": str(i % 10)}})
            if status != 200:
                raise RuntimeError(f"metadata set: {status}")
        t0 = time.perf_counter()
        status, _ = client.call("GET", path, version=version, parse=False)
        latencies.append(time.perf_counter() - t0)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status}")
    return latencies


def create_servers(args):
    """Worker: create count servers, each waited to ACTIVE (unless wait is False);
    returns their ids."""
    port, image, count, prefix, *wait = args
    client = Client(port)
    ids = []
    for i in range(count):
        status, body = client.call("POST", "/servers", {"server": {
            "name": f"{prefix}-{i}", "imageRef": image, "flavorRef": "1",
            "networks": "none"}}, version="2.37")
        if status != 202:
            raise RuntimeError(f"create: {status} {body}")
        ids.append(body["server"]["id"])
    for server_id in ids:
        if wait != [False]:
            client.wait_status(server_id, ("ACTIVE",))
    return ids


def mutations(args):
    """Worker: durable changes for `seconds`; returns how many were acknowledged."""
    port, kind, server_id, image, seconds = args
    client = Client(port)
    done, n = 0, 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        n += 1
        if kind == "metadata":
            status, _ = client.call("PUT", f"/servers/{server_id}/metadata/k{n % 50}",
                                    {"meta": {f"k{n % 50}": str(n)}})
            done += status == 200
        else:
            status, body = client.call("POST", "/servers", {"server": {
                "name": f"m-{os.getpid()}-{n}", "imageRef": image, "flavorRef": "1",
                "networks": "none"}}, version="2.37")
            if status == 202:
                status, _ = client.call("DELETE", "/servers/" + body["server"]["id"])
                done += 2 * (status == 204)
    return done


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_figures(latencies):
    return {"p50_ms": round(percentile(latencies, 0.5) * 1000, 3),
            "p90_ms": round(percentile(latencies, 0.9) * 1000, 3)}


def throughput(pool, port, path, version, clients, seconds_per_client):
    """Requests/s of `clients` processes each sending GETs for about that long."""
    probe = timed_gets((port, path, version, 20))
    per_call = max(statistics.median(probe), 1e-5)
    count = max(20, int(seconds_per_client / per_call))
    t0 = time.perf_counter()
    results = pool.map(timed_gets, [(port, path, version, count)] * clients)
    wall = time.perf_counter() - t0
    latencies = [x for r in results for x in r]
    return dict(latency_figures(latencies), rps=round(len(latencies) / wall, 1))


# -- one size -------------------------------------------------------------------------

def fill(pool, port, image, n):
    """N servers, created through the API in batches of up to 1,000 (multiple create)."""
    client = Client(port)
    client.call("PUT", "/os-quota-sets/admin", {"quota_set": {
        "instances": -1, "cores": -1, "ram": -1}})
    made = 0
    while made < n:
        batch = min(1000, n - made)
        status, body = client.call("POST", "/servers", {"server": {
            "name": f"fill-{made}", "imageRef": image, "flavorRef": "1",
            "networks": "none", "min_count": batch, "max_count": batch,
            "return_reservation_id": True}}, version="2.37")
        if status != 202:
            raise RuntimeError(f"fill: {status} {body}")
        made += batch
    wait_built(client, 0.2)


def wait_built(client, poll=None):
    """Until no server is building (one client asks, every poll seconds)."""
    deadline = time.perf_counter() + 1800
    while time.perf_counter() < deadline:
        status, body = client.call("GET", "/servers?status=BUILD&limit=1", version="2.37")
        if not body["servers"]:
            status, body = client.call("GET", "/servers?status=ERROR&limit=1",
                                       version="2.37")
            if body["servers"]:
                bad = body["servers"][0]["id"]
                fault = client.call("GET", "/servers/" + bad)[1]["server"].get("fault")
                raise RuntimeError(f"server {bad} went to ERROR: {fault}")
            return
        time.sleep(poll or max(client.poll, 0.01))
    raise RuntimeError("the servers did not all become ACTIVE")


def first_image(port):
    status, body = Client(port).call("GET", "/images", version="2.35")
    return body["images"][0]["id"]


def make_image(directory):
    os.makedirs(directory, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                    os.path.join(directory, "bench.qcow2"), "64M"], check=True)


def run_size(n, opts, pool, peer_python=None):
    """Every figure at n servers, of minivan or (peer_python given) of the real Nova."""
    data = tempfile.mkdtemp(prefix=f"minivan-bench-{n}-")
    make_image(os.path.join(data, "images"))
    daemon = NovaPeer(peer_python) if peer_python else Daemon(data)
    out = {"servers": n, "target": daemon.name}
    try:
        out["startup_empty_s"] = round(daemon.start(), 3)
        time.sleep(0.5)
        out["rss_idle_mb"] = round(daemon.rss(), 1)
        image = first_image(daemon.port)
        t0 = time.perf_counter()
        fill(pool, daemon.port, image, n)
        out["fill_s"] = round(time.perf_counter() - t0, 2)
        client = Client(daemon.port)
        some = client.call("GET", "/servers?limit=1")[1]["servers"]
        server_id = some[0]["id"] if some else create_servers(
            (daemon.port, image, 1, "probe"))[0]
        secs = opts.seconds
        for name, path, version in (("flavors_detail", "/flavors/detail", None),
                                    ("server_show", "/servers/" + server_id, None)):
            for clients in (1, 8):
                out[f"{name}_{clients}c"] = throughput(pool, daemon.port, path, version,
                                                       clients, secs)
        for version in ("2.1", "latest"):
            count = max(5, min(200, int(secs * 20)))
            out[f"servers_detail_{version}"] = dict(
                latency_figures(timed_gets((daemon.port, "/servers/detail", version,
                                            count))), count=count)
        creates = []
        for i in range(opts.creates):
            t0 = time.perf_counter()
            create_servers((daemon.port, image, 1, f"single-{i}"))
            creates.append(time.perf_counter() - t0)
        out["create_active"] = latency_figures(creates)
        times = {"stop": [], "start": [], "reboot": []}
        steps = (("stop", {"os-stop": None}, "SHUTOFF"), ("start", {"os-start": None}, "ACTIVE"),
                 ("reboot", {"reboot": {"type": "SOFT"}}, "ACTIVE"))
        for _ in range(opts.creates):
            for name, body, wanted in steps:
                t0 = time.perf_counter()
                status, _ = client.call("POST", f"/servers/{server_id}/action", body)
                if status != 202:
                    raise RuntimeError(f"{name}: {status}")
                client.wait_status(server_id, (wanted,))
                times[name].append(time.perf_counter() - t0)
        for name, values in times.items():
            out[f"action_{name}"] = latency_figures(values)
        for kind in ("metadata", "create_delete"):
            t0 = time.perf_counter()
            done = sum(pool.map(mutations, [(daemon.port, kind, server_id, image,
                                              secs)] * 8))
            out[f"mutations_{kind}_per_s"] = round(done / (time.perf_counter() - t0), 1)
        t0 = time.perf_counter()
        per = max(1, opts.burst // 8)
        pool.map(create_servers, [(daemon.port, image, per, f"burst{k}", False)
                                  for k in range(8)])
        wait_built(client)
        out["burst_creates"] = per * 8
        out["burst_all_active_s"] = round(time.perf_counter() - t0, 2)
        out["rss_after_mb"] = round(daemon.rss(), 1)
        out["state_bytes"] = daemon.state_bytes()
        daemon.stop()
        if peer_python:               # Nova's databases went with its process
            return out
        starts, rss = [], []
        for _ in range(opts.repeat):
            starts.append(daemon.start())
            rss.append(daemon.rss())
            daemon.stop()
        out["startup_s"] = {"median": round(statistics.median(starts), 3),
                            "min": round(min(starts), 3), "max": round(max(starts), 3)}
        out["rss_at_start_mb"] = round(statistics.median(rss), 1)
    finally:
        daemon.stop()
        shutil.rmtree(data, ignore_errors=True)
    return out


def table(results):
    rows = [("servers in state", lambda r: r["servers"]),
            ("flavors/detail p50 ms (1c)", lambda r: r["flavors_detail_1c"]["p50_ms"]),
            ("flavors/detail req/s 1c / 8c", lambda r: f"{r['flavors_detail_1c']['rps']} / "
                                                        f"{r['flavors_detail_8c']['rps']}"),
            ("server show p50 ms (1c)", lambda r: r["server_show_1c"]["p50_ms"]),
            ("server show req/s 1c / 8c", lambda r: f"{r['server_show_1c']['rps']} / "
                                                     f"{r['server_show_8c']['rps']}"),
            ("servers/detail 2.1 p50/p90 ms", lambda r: "{p50_ms} / {p90_ms}".format(
                **r["servers_detail_2.1"])),
            ("servers/detail latest p50/p90 ms", lambda r: "{p50_ms} / {p90_ms}".format(
                **r["servers_detail_latest"])),
            ("create->ACTIVE p50/p90 ms", lambda r: "{p50_ms} / {p90_ms}".format(
                **r["create_active"])),
            ("stop / start / reboot p50 ms", lambda r: " / ".join(
                str(r[f"action_{a}"]["p50_ms"]) for a in ("stop", "start", "reboot"))),
            ("concurrent creates: all ACTIVE s", lambda r: f"{r['burst_creates']} in "
                                                             f"{r['burst_all_active_s']}"),
            ("metadata sets /s (8c)", lambda r: r["mutations_metadata_per_s"]),
            ("creates+deletes /s (8c)", lambda r: r["mutations_create_delete_per_s"]),
            ("start-up s (median, min-max)", lambda r: "{median} ({min}-{max})".format(
                **r["startup_s"])),
            ("RSS MB idle / after / at start", lambda r: f"{r['rss_idle_mb']} / "
                                                          f"{r['rss_after_mb']} / "
                                                          f"{r['rss_at_start_mb']}"),
            ("state file bytes", lambda r: r["state_bytes"]),
            ("filling took s", lambda r: r["fill_s"])]
    width = max(len(label) for label, _ in rows)
    lines = []
    for label, get in rows:
        cells = []
        for r in results:
            try:
                cells.append(str(get(r)))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"{label:<{width}}  " + "  ".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


# -- near the wire ------------------------------------------------------------------------

class Floor:
    """A bare http.server, in its own process, that sends back exactly the bytes
    minivan sent for a GET: the least any Python HTTP server can take for them."""

    SCRIPT = r"""
import http.server, sys
status, headers, body = int(sys.argv[2]), eval(sys.argv[3]), open(sys.argv[4], "rb").read()
head = "".join(f"{k}: {v}\r\n" for k, v in headers)
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.wfile.write(f"HTTP/1.1 {status} OK\r\n{head}\r\n".encode() + body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

    def __init__(self, port, path, version):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = dict(HEADERS)
        if version:
            headers["OpenStack-API-Version"] = "compute " + version
        conn.request("GET", "/v2.1" + path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        self.body_bytes = len(body)
        self.file = tempfile.NamedTemporaryFile(prefix="minivan-floor-", delete=False)
        self.file.write(body)
        self.file.close()
        kept = [(k, v) for k, v in resp.getheaders()
                if k.lower() not in ("server", "date", "connection")]
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(self.port),
                                      str(resp.status), repr(kept), self.file.name])
        for _ in range(500):
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                time.sleep(0.01)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        os.unlink(self.file.name)


def run_wire(opts, pool):
    """servers/detail (default page), flavors/detail and server show at --wire-servers
    servers: minivan's p50 beside the floor's, for the same bytes."""
    n = opts.wire_servers
    data = tempfile.mkdtemp(prefix=f"minivan-wire-{n}-")
    make_image(os.path.join(data, "images"))
    daemon = Daemon(data)
    rows = []
    try:
        daemon.start()
        image = first_image(daemon.port)
        fill(pool, daemon.port, image, n)
        server_id = Client(daemon.port).call("GET", "/servers?limit=1")[1]["servers"][0]["id"]
        count = max(20, int(opts.seconds * 100))
        # the last: a server changes before each request, so the page is made again
        # from kept views (and the changed server's new one)
        for label, path, version, change in (
                ("servers/detail, latest", "/servers/detail", "latest", ()),
                ("servers/detail, 2.1", "/servers/detail", "2.1", ()),
                ("flavors/detail", "/flavors/detail", None, ()),
                ("server show, latest", "/servers/" + server_id, "latest", ()),
                ("servers/detail, latest, a server changed before each", "/servers/detail",
                 "latest", (server_id,))):
            if change:
                Client(daemon.port).call("PUT", f"/servers/{server_id}/metadata/bench",
                                         {"meta": {"bench": "0"}})
            floor = Floor(daemon.port, path, version)
            try:
                mine, bare = [], []
                for _ in range(opts.repeat):      # interleaved, so both see the same noise
                    mine.append(percentile(timed_gets((daemon.port, path, version, count,
                                                       *change)), 0.5))
                    bare.append(percentile(timed_gets((floor.port, path, version, count)),
                                           0.5))
            finally:
                floor.stop()
            a, b = statistics.median(mine) * 1000, statistics.median(bare) * 1000
            rows.append({"figure": label, "bytes": floor.body_bytes,
                         "minivan_p50_ms": round(a, 3), "floor_p50_ms": round(b, 3),
                         "times_floor": round(a / b, 2)})
    finally:
        daemon.stop()
        shutil.rmtree(data, ignore_errors=True)
    print(f"near the wire, {n} servers in state (medians of {opts.repeat} runs' p50):")
    print(f"{'figure':<54}{'bytes':>10}{'minivan ms':>12}{'floor ms':>10}{'x floor':>9}")
    for r in rows:
        print(f"{r['figure']:<54}{r['bytes']:>10}{r['minivan_p50_ms']:>12}"
              f"{r['floor_p50_ms']:>10}{r['times_floor']:>9}")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"python": sys.version.split()[0], "cpus": os.cpu_count(),
                       "servers": n, "wire": rows}, f, indent=1)
    return 0


# -- no tail, and 100,000 servers -------------------------------------------------------

def writer(args):
    """Worker: metadata sets on one server until stop_file exists; returns how many."""
    port, server_id, stop_file = args
    client = Client(port)
    n = 0
    while not os.path.exists(stop_file):
        n += 1
        status, _ = client.call("PUT", f"/servers/{server_id}/metadata/w{n % 20}",
                                {"meta": {f"w{n % 20}": str(n)}})
        if status != 200:
            raise RuntimeError(f"metadata set: {status}")
    return n


def snapshots_logged(data):
    with open(os.path.join(data, "minivan.log"), errors="replace") as f:
        return sum("written in the background" in line for line in f)


def run_tail_size(n, opts, pool):
    """At n servers (made through the API): start-up, memory, then each read's p50 and
    p99 with a writer going and snapshots taken every --tail-journal bytes of journal."""
    data = tempfile.mkdtemp(prefix=f"minivan-tail-{n}-")
    make_image(os.path.join(data, "images"))
    daemon = Daemon(data)
    out = {"servers": n}
    try:
        daemon.start()
        image = first_image(daemon.port)
        t0 = time.perf_counter()
        fill(pool, daemon.port, image, n)
        out["fill_s"] = round(time.perf_counter() - t0, 1)
        daemon.stop()
        out["state_bytes"] = daemon.state_bytes()
        daemon.env = {"MINIVAN_JOURNAL_MAX_BYTES": str(opts.tail_journal)}
        out["startup_s"] = round(daemon.start(), 3)
        out["rss_at_start_mb"] = round(daemon.rss(), 1)
        time.sleep(opts.settle)
        out["rss_settled_mb"] = round(daemon.rss(), 1)
        out["rss_per_state_byte"] = round(out["rss_settled_mb"] * 2 ** 20 / out["state_bytes"], 2)
        out["rss_at_start_per_state_byte"] = round(
            out["rss_at_start_mb"] * 2 ** 20 / out["state_bytes"], 2)
        client = Client(daemon.port)
        some = client.call("GET", "/servers?limit=1")[1]["servers"]
        server_id = some[0]["id"] if some else create_servers(
            (daemon.port, image, 1, "probe"))[0]
        t0 = time.perf_counter()
        done = sum(pool.map(mutations, [(daemon.port, "metadata", server_id, image,
                                          opts.seconds)] * 8))
        out["durable_mutations_per_s"] = round(done / (time.perf_counter() - t0), 1)
        reads = (("server show", "/servers/" + server_id, "latest"),
                 ("servers/detail default page", "/servers/detail", "latest"),
                 ("flavors/detail", "/flavors/detail", None))
        runs = {label: [] for label, _, _ in reads}
        written = 0
        snapshots = snapshots_logged(data)
        for run in range(opts.repeat):
            stop = os.path.join(data, f"stop-writer-{run}")
            pending = pool.apply_async(writer, ((daemon.port, server_id, stop),))
            t0 = time.perf_counter()
            for label, path, version in reads:
                probe = timed_gets((daemon.port, path, version, 5))
                count = max(50, min(5000, int(opts.seconds / max(statistics.median(probe),
                                                                1e-4))))
                latencies = timed_gets((daemon.port, path, version, count))
                runs[label].append((percentile(latencies, 0.5), percentile(latencies, 0.99),
                                    count))
            open(stop, "w").close()
            written += pending.get()
            out.setdefault("measured_s", 0)
            out["measured_s"] += time.perf_counter() - t0
        out["snapshots_during"] = snapshots_logged(data) - snapshots
        out["writer_sets_per_s"] = round(written / out.pop("measured_s"), 1)
        for label, values in runs.items():
            p50 = statistics.median(v[0] for v in values) * 1000
            p99 = statistics.median(v[1] for v in values) * 1000
            bound = max(2 * p50, p50 + 5)
            out[label] = {"p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
                          "bound_ms": round(bound, 3), "within": p99 <= bound,
                          "gets_per_run": values[0][2]}
    finally:
        daemon.stop()
        shutil.rmtree(data, ignore_errors=True)
    return out


DOMAIN_COST = """
import uuid, libvirt
def rss():
    with open("/proc/self/status") as f:
        return [int(l.split()[1]) for l in f if l.startswith("VmRSS:")][0]
conn = libvirt.open("test:///default")
before, n = rss(), 2000
for i in range(n):
    u = str(uuid.uuid4())
    conn.defineXML(f\"\"\"<domain type='test'><name>instance-{i:08x}</name><uuid>{u}</uuid>
<metadata><m:instance xmlns:m="urn:bench"><m:name>fill-{i}</m:name><m:owner project="p"
 user="u"/><m:flavor name="m1.tiny" id="1" memory="512" vcpus="1" disk="1"/></m:instance>
</metadata><memory unit='KiB'>524288</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type>
</os><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source
 file='/tmp/{u}/disk'/><target dev='vda' bus='virtio'/></disk><serial type='file'><source
 path='/tmp/{u}/console.log'/></serial></devices></domain>\"\"\").create()
print(round((rss() - before) / n, 1))
"""


def simulated_domain_kb():
    """kB of memory libvirt's test driver takes per running domain shaped like a
    simulated server's (a disk, a serial file, metadata), measured in a child."""
    try:
        return float(subprocess.run([sys.executable, "-c", DOMAIN_COST], check=True,
                                    capture_output=True, text=True, timeout=300).stdout)
    except (subprocess.SubprocessError, ValueError, OSError):
        return float("nan")


def run_tail(opts, pool):
    sizes = [int(x) for x in opts.sizes.split(",") if x.strip()]
    results = []
    for n in sizes:
        t0 = time.perf_counter()
        results.append(run_tail_size(n, opts, pool))
        print(f"bench: {n} servers measured in {time.perf_counter() - t0:.0f}s",
              file=sys.stderr, flush=True)
    rows = [("servers in state", lambda r: r["servers"]),
            ("filled through the API in s", lambda r: r["fill_s"]),
            ("state file MB", lambda r: round(r["state_bytes"] / 2 ** 20, 1)),
            ("start-up s", lambda r: r["startup_s"]),
            ("RSS MB at start / settled", lambda r: f"{r['rss_at_start_mb']} / "
                                                    f"{r['rss_settled_mb']}"),
            ("RSS / state file at start / settled",
             lambda r: f"{r['rss_at_start_per_state_byte']} / {r['rss_per_state_byte']}"),
            ("durable metadata sets/s (8c)", lambda r: r["durable_mutations_per_s"])]
    for label in ("server show", "servers/detail default page", "flavors/detail"):
        rows.append((f"{label} p50 / p99 ms", lambda r, k=label: "{p50_ms} / {p99_ms}{m}".format(
            m="" if r[k]["within"] else " !", **r[k])))
    rows += [("writer's sets/s while reading", lambda r: r["writer_sets_per_s"]),
             ("snapshots while reading", lambda r: r["snapshots_during"])]
    width = max(len(label) for label, _ in rows)
    print(f"no tail: medians of {opts.repeat} runs; '!' marks a p99 above "
          "max(2 x p50, p50 + 5 ms)")
    for label, get in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{str(get(r)):>20}" for r in results))
    domain_kb = simulated_domain_kb()
    print(f"settled includes libvirt's test driver, which holds minivan's simulated domains "
          f"in minivan's own process: {domain_kb} kB each (after a restart they are "
          f"defined again in the background)")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"python": sys.version.split()[0], "cpus": os.cpu_count(),
                       "journal_max_bytes": opts.tail_journal, "tail": results,
                       "test_driver_kb_per_domain": domain_kb}, f, indent=1)
    return 0 if all(r[k]["within"] for r in results for k in
                    ("server show", "servers/detail default page", "flavors/detail")) else 1


# -- beside the real Nova ------------------------------------------------------------------

# (label, figure, True where more is better)
PEER_FIGURES = (
    ("flavors/detail p50 ms", lambda r: r["flavors_detail_1c"]["p50_ms"], False),
    ("flavors/detail req/s, 1 client", lambda r: r["flavors_detail_1c"]["rps"], True),
    ("flavors/detail req/s, 8 clients", lambda r: r["flavors_detail_8c"]["rps"], True),
    ("server show p50 ms", lambda r: r["server_show_1c"]["p50_ms"], False),
    ("server show req/s, 1 client", lambda r: r["server_show_1c"]["rps"], True),
    ("server show req/s, 8 clients", lambda r: r["server_show_8c"]["rps"], True),
    ("servers/detail p50 ms, 2.1", lambda r: r["servers_detail_2.1"]["p50_ms"], False),
    ("servers/detail p50 ms, latest", lambda r: r["servers_detail_latest"]["p50_ms"], False),
    ("create -> ACTIVE p50 ms", lambda r: r["create_active"]["p50_ms"], False),
    ("stop -> SHUTOFF p50 ms", lambda r: r["action_stop"]["p50_ms"], False),
    ("start -> ACTIVE p50 ms", lambda r: r["action_start"]["p50_ms"], False),
    ("reboot -> ACTIVE p50 ms", lambda r: r["action_reboot"]["p50_ms"], False),
    ("concurrent creates, all ACTIVE s", lambda r: r["burst_all_active_s"], False),
    ("metadata sets/s, 8 clients", lambda r: r["mutations_metadata_per_s"], True),
    ("creates+deletes/s, 8 clients", lambda r: r["mutations_create_delete_per_s"], True),
    ("filling the servers s", lambda r: r["fill_s"], False),
    ("start-up, empty, s", lambda r: r["startup_empty_s"], False),
    ("RSS after the run MB", lambda r: r["rss_after_mb"], False),
)


def peer_rows(pairs):
    """[(size, label, minivan, nova, advantage)]: advantage > 1 where minivan is better."""
    rows = []
    for mine, nova in pairs:
        for label, get, more_better in PEER_FIGURES:
            a, b = get(mine), get(nova)
            if a and b:
                advantage = a / b if more_better else b / a
            else:
                advantage = None
            rows.append((mine["servers"], label, a, b,
                         round(advantage, 2) if advantage else None))
    return rows


def peer_table(rows, burst):
    width = max(len(label) for _, label, *_ in rows) + 2
    lines = [f"{'servers':>7}  {'figure':<{width}}{'minivan':>12}{'Nova':>12}"
             f"{'minivan is':>18}"]
    for size, label, a, b, adv in rows:
        label = label.replace("concurrent creates", f"{burst} concurrent creates")
        lines.append(f"{size:>7}  {label:<{width}}{a:>12}{b:>12}"
                     f"{(f'{adv:g}x better' if adv else '-'):>18}")
    return "\n".join(lines)


def peer_svg(rows, path, burst):
    """Bars on a log scale: how many times better minivan is than Nova, per figure."""
    bar_h, gap, left, right, top = 16, 6, 330, 300, 40
    lo, hi = 0.1, 10000.0
    span = math.log10(hi) - math.log10(lo)

    def x(v):
        return left + right * (math.log10(min(max(v, lo), hi)) - math.log10(lo)) / span

    height = top + len(rows) * (bar_h + gap) + 40
    width = left + right + 260
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           '<text x="10" y="20" font-size="14" font-weight="bold">minivan beside Nova 34 '
           '(fake virt driver), same machine and run: times better, log scale</text>']
    for decade in range(-1, 5):
        xv = x(10 ** decade)
        out.append(f'<line x1="{xv:.1f}" y1="{top - 6}" x2="{xv:.1f}" y2="{height - 30}" '
                   f'stroke="{"#000" if decade == 0 else "#ddd"}"/>')
        out.append(f'<text x="{xv:.1f}" y="{height - 14}" text-anchor="middle">'
                   f'{10 ** decade:g}x</text>')
    y = top
    for size, label, a, b, adv in rows:
        label = label.replace("concurrent creates", f"{burst} concurrent creates")
        out.append(f'<text x="{left - 8}" y="{y + 12}" text-anchor="end">'
                   f'{html.escape(label)} ({size} servers)</text>')
        if adv:
            x0, x1 = sorted((x(1), x(adv)))
            colour = "#2a7" if adv >= 1 else "#c33"
            out.append(f'<rect x="{x0:.1f}" y="{y}" width="{max(x1 - x0, 1):.1f}" '
                       f'height="{bar_h}" fill="{colour}"/>')
        out.append(f'<text x="{left + right + 10}" y="{y + 12}">'
                   f'{f"{adv:g}x" if adv else "-"}  (minivan {a}, Nova {b})</text>')
        y += bar_h + gap
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def run_peer(opts, pool):
    """The same workload against minivan and the real Nova, size by size."""
    python = opts.nova_python
    if not os.path.exists(python):
        print(f"bench: {python} is missing; tools/setup-venvs.sh makes Nova's virtualenv "
              "(or give --nova-python)", file=sys.stderr)
        return 2
    pairs = []
    for n in [int(x) for x in opts.sizes.split(",") if x.strip()]:
        t0 = time.perf_counter()
        mine = run_size(n, opts, pool)
        nova = run_size(n, opts, pool, peer_python=python)
        pairs.append((mine, nova))
        print(f"bench: {n} servers measured on both in {time.perf_counter() - t0:.0f}s",
              file=sys.stderr, flush=True)
    rows = peer_rows(pairs)
    print(peer_table(rows, opts.burst))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"python": sys.version.split()[0], "cpus": os.cpu_count(),
                       "burst": opts.burst, "minivan": [m for m, _ in pairs],
                       "nova": [n for _, n in pairs],
                       "table": [dict(zip(("servers", "figure", "minivan", "nova",
                                           "minivan_better_x"), row)) for row in rows]},
                      f, indent=1)
    if opts.svg:
        peer_svg(rows, opts.svg, opts.burst)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=SIZES,
                   help="servers in state, comma-separated (default: 0,100,1000,10000)")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="seconds each client spends per throughput figure (default 2)")
    p.add_argument("--creates", type=int, default=20,
                   help="single creates and actions timed per size (default 20)")
    p.add_argument("--burst", type=int, default=500,
                   help="concurrent creates over 8 clients (default 500)")
    p.add_argument("--repeat", type=int, default=5, help="start-ups timed (default 5)")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--smoke", action="store_true",
                   help="a few seconds in all (CI): sizes 0,20, short loops")
    p.add_argument("--peer", action="store_true",
                   help="run the same workload against the real Nova as well, and print "
                        "both side by side (default sizes 0,100; burst 48)")
    p.add_argument("--nova-python", default=os.path.join(HERE, "..", ".venv-nova", "bin",
                                                         "python"),
                   help="Python of Nova's virtualenv, for --peer (default .venv-nova)")
    p.add_argument("--wire", action="store_true",
                   help="near the wire: p50 of servers/detail, flavors/detail and server "
                        "show beside a bare http.server sending the same bytes")
    p.add_argument("--wire-servers", type=int, default=500,
                   help="servers in state for --wire (default 500)")
    p.add_argument("--tail", action="store_true",
                   help="no tail: p50 and p99 of reads with a writer going and snapshots "
                        "every --tail-journal bytes (default sizes 0,1000,10000,100000); "
                        "also start-up, memory and durable mutations at each size")
    p.add_argument("--tail-journal", type=int, default=51200,
                   help="--journal-max-bytes of minivan under --tail (default 51200)")
    p.add_argument("--settle", type=float, default=10.0,
                   help="seconds after start-up before the settled RSS (default 10)")
    p.add_argument("--svg", default="", help="with --peer: draw the table to this SVG file")
    opts = p.parse_args(argv)
    if opts.peer and opts.sizes == SIZES:
        opts.sizes, opts.burst, opts.creates = "0,100", 48, 10
    if opts.smoke:
        opts.sizes, opts.seconds, opts.creates, opts.burst, opts.repeat = "0,20", 0.2, 3, 16, 2
        if opts.peer:
            opts.sizes, opts.creates, opts.burst = "2", 2, 8
    if not shutil.which("qemu-img"):
        print("bench: qemu-img is missing (apt install qemu-utils)", file=sys.stderr)
        return 2
    if opts.tail:
        if opts.sizes == SIZES:
            opts.sizes = "0,1000,10000,100000"
        if opts.smoke:
            opts.sizes, opts.settle = "20", 0.5
        with multiprocessing.Pool(9) as pool:
            return run_tail(opts, pool)
    if opts.wire:
        with multiprocessing.Pool(8) as pool:
            return run_wire(opts, pool)
    if opts.peer:
        Client.poll = 0.01        # both answer status polls at the same pace
        with multiprocessing.Pool(8) as pool:
            return run_peer(opts, pool)
    sizes = [int(x) for x in opts.sizes.split(",") if x.strip()]
    results = []
    with multiprocessing.Pool(8) as pool:
        for n in sizes:
            t0 = time.perf_counter()
            results.append(run_size(n, opts, pool))
            print(f"bench: {n} servers measured in {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr, flush=True)
    print(table(results))
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"python": sys.version.split()[0], "cpus": os.cpu_count(),
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
