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
"""
import argparse
import http.client
import json
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
                   # the simulated host (8 GB, a few CPUs) must hold 10,000 servers
                   MINIVAN_CPU_ALLOCATION_RATIO="10000", MINIVAN_RAM_ALLOCATION_RATIO="10000",
                   MINIVAN_DISK_ALLOCATION_RATIO="10000")
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


# -- clients --------------------------------------------------------------------------

class Client:
    """One keep-alive HTTP connection."""

    def __init__(self, port):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def call(self, method, path, body=None, version=None):
        headers = dict(HEADERS)
        if version:
            headers["OpenStack-API-Version"] = "compute " + version
        data = json.dumps(body) if body is not None else None
        for attempt in (0, 1):
            try:
                self.conn.request(method, "/v2.1" + path, data, headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
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
            time.sleep(0.002)
        raise RuntimeError(f"server {server_id} not {wanted} after {timeout}s")


def timed_gets(args):
    """Worker: GET path count times; returns the latencies in seconds."""
    port, path, version, count = args
    client = Client(port)
    latencies = []
    for _ in range(count):
        t0 = time.perf_counter()
        status, _ = client.call("GET", path, version=version)
        latencies.append(time.perf_counter() - t0)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status}")
    return latencies


def create_servers(args):
    """Worker: create count servers, each waited to ACTIVE; returns their ids."""
    port, image, count, prefix = args
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
    deadline = time.perf_counter() + 600
    while time.perf_counter() < deadline:
        status, body = client.call("GET", "/servers/detail?status=BUILD&limit=1",
                                   version="2.37")
        if not body["servers"]:
            return
        time.sleep(0.2)
    raise RuntimeError("the filled servers did not all become ACTIVE")


def first_image(port):
    status, body = Client(port).call("GET", "/images", version="2.35")
    return body["images"][0]["id"]


def make_image(directory):
    os.makedirs(directory, exist_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                    os.path.join(directory, "bench.qcow2"), "64M"], check=True)


def run_size(n, opts, pool):
    data = tempfile.mkdtemp(prefix=f"minivan-bench-{n}-")
    make_image(os.path.join(data, "images"))
    daemon = Daemon(data)
    out = {"servers": n}
    try:
        daemon.start()
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
        pool.map(create_servers, [(daemon.port, image, per, f"burst{k}") for k in range(8)])
        out["burst_creates"] = per * 8
        out["burst_all_active_s"] = round(time.perf_counter() - t0, 2)
        out["rss_after_mb"] = round(daemon.rss(), 1)
        out["state_bytes"] = daemon.state_bytes()
        daemon.stop()
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="0,100,1000,10000",
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
    opts = p.parse_args(argv)
    if opts.smoke:
        opts.sizes, opts.seconds, opts.creates, opts.burst, opts.repeat = "0,20", 0.2, 3, 16, 2
    if not shutil.which("qemu-img"):
        print("bench: qemu-img is missing (apt install qemu-utils)", file=sys.stderr)
        return 2
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
