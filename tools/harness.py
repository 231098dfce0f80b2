#!/usr/bin/env python3
"""minivan's reliability harness: hostile input, crash storms and load.

    python3 tools/harness.py [--profile short|full] [--seed N] [--json F] [fuzz|crash|load]...

Each part starts its own minivan (noauth, a free loopback port, a fresh data directory,
libvirt's test hypervisor) and prints its figures; with no part named, all three run.
With --keystone ENV (the env file tools/keystone.sh writes) minivan validates tokens with
that Keystone and the parts run as its admin; with Glance in the catalog the fuzz works
on an image of its own there and deletes what it made in Glance at the end.

  fuzz   every route of minivan's dispatch table with malformed JSON, wrong types, huge,
         negative and zero numbers, NaN and infinities, long strings, control characters,
         lone surrogates, invalid UTF-8, NUL bytes, duplicate keys, deep nesting, unknown
         fields, bad microversions, hostile path segments (.., %2f, long ids) and query
         strings (repeated, unknown, hostile values).  Every answer must be a 4xx with
         Nova's fault body (501 only for routes not built), within 10 s; a rejected
         request must leave the state files byte for byte as they were; the daemon must
         stay up.  Reproducible: --seed picks the cases.
  crash  several clients create servers, run actions, set metadata and delete servers
         while minivan is killed with SIGKILL at random moments and restarted.  After
         each restart: the state file parses; every acknowledged change is there (a
         change in flight may or may not be); no server is left half-way (each settles
         in ACTIVE, SHUTOFF or ERROR with a fault); each server's state agrees with its
         domain; no instance directory is left that no server owns.
  load   50 clients mixing reads and writes, and slow clients that trickle headers
         byte by byte or never finish a body: no 5xx, no dropped connection; p50 and p99
         of the mixed requests.

Profiles: short (CI, about a minute: 1,500 fuzz cases, 5 kills, 20 s of load) and full
(5,000 fuzz cases, 25 kills over 1,000+ operations, 60 s of load).  Exit status 1 when
any check fails; the figures go to stdout (and --json).
"""
import argparse
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
import minivan                                  # noqa: E402  the route table
from bench import Daemon, make_image            # noqa: E402  the daemon, an image

PROFILES = {"short": {"fuzz": 1500, "kills": 5, "ops": 250, "load_s": 20, "clients": 50},
            "full": {"fuzz": 5000, "kills": 25, "ops": 1000, "load_s": 60, "clients": 50}}
REAL_PROFILES = {"short": {"kills": 5, "ops": 40}, "full": {"kills": 10, "ops": 120}}
REAL = {}                               # --real-guest: the image, the libvirt network
REAL_SERVERS_PER_CLIENT = 2             # real guests each crash client keeps at most
TOKEN = "admin:admin"                   # the caller; --keystone: a real admin token
PROJECT = "admin"                       # the caller's project
DAEMON_ENV = {}                         # --keystone: minivan's Keystone settings
GLANCE = {}                             # --keystone with Glance: its URL, the fuzz's image
CLIENT_TIMEOUT = 5                      # the load part's minivan --client-timeout
MAX_BODY = 114688                       # minivan's default --max-body-size


class Failure(Exception):
    pass


def raw_call(port, method, path, body=b"", headers=None, timeout=10, host="127.0.0.1"):
    """(status, parsed JSON body or None, raw bytes) over a fresh connection."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        hdrs = {"X-Auth-Token": TOKEN, "Content-Type": "application/json"}
        hdrs.update(headers or {})
        hdrs = {k: v.encode("utf-8") for k, v in hdrs.items()}    # any header bytes
        conn.request(method, path, body=body if body else None, headers=hdrs)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return resp.status, parsed, raw
    finally:
        conn.close()


def call(port, method, path, body=None, version=None, timeout=30):
    headers = {"OpenStack-API-Version": "compute " + version} if version else {}
    data = json.dumps(body).encode() if body is not None else b""
    status, parsed, _ = raw_call(port, method, "/v2.1" + path, data, headers, timeout)
    return status, parsed


def start_daemon(data, extra=None):
    if REAL:
        os.makedirs(os.path.join(data, "images"), exist_ok=True)
        shutil.copy(REAL["image"], os.path.join(data, "images", "guest.qcow2"))
    else:
        make_image(os.path.join(data, "images"))
    daemon = Daemon(data, env=dict(DAEMON_ENV, **(extra or {})))
    daemon.start()
    return daemon


def finish(data, ok):
    """Remove a part's data directory, or keep it (and say where) when a check failed."""
    if ok:
        shutil.rmtree(data, ignore_errors=True)
    else:
        print(f"  (minivan's data directory and log are kept in {data})")


def use_keystone(path):
    """Run as the admin of the Keystone in tools/keystone.sh's env file."""
    global TOKEN, PROJECT
    env = {}
    with open(path) as f:
        for line in f:
            if line.startswith("export ") and "=" in line:
                key, value = line[len("export "):].strip().split("=", 1)
                env[key] = value
    body = json.dumps({"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": env["OS_USERNAME"], "domain": {"name": "Default"},
        "password": env["OS_PASSWORD"]}}}, "scope": {"project": {
            "name": env["OS_PROJECT_NAME"], "domain": {"name": "Default"}}}}})
    url = urllib.parse.urlsplit(env["OS_AUTH_URL"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("POST", url.path.rstrip("/") + "/auth/tokens", body,
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    doc = json.loads(resp.read())
    if resp.status != 201:
        raise Failure(f"Keystone refused the admin: {resp.status} {doc}")
    TOKEN = resp.getheader("X-Subject-Token")
    PROJECT = doc["token"]["project"]["id"]
    DAEMON_ENV.update(MINIVAN_AUTH="keystone", MINIVAN_KEYSTONE_URL=env["OS_AUTH_URL"],
                      MINIVAN_KEYSTONE_USERNAME=env["MINIVAN_USERNAME"],
                      MINIVAN_KEYSTONE_PASSWORD=env["MINIVAN_PASSWORD"],
                      MINIVAN_KEYSTONE_PROJECT=env["MINIVAN_PROJECT_NAME"])
    if env.get("GLANCE_URL"):
        GLANCE["url"] = env["GLANCE_URL"].rstrip("/")


def glance(method, path, body=None, data=None):
    """(status, JSON) of one call to the Keystone's Glance, as the admin."""
    url = urllib.parse.urlsplit(GLANCE["url"] + path)
    headers = {}
    if body is not None:
        data = json.dumps(body).encode()
    elif data is not None:
        headers["Content-Type"] = "application/octet-stream"
    status, parsed, _ = raw_call(url.port, method, url.path + (
        f"?{url.query}" if url.query else ""), data or b"", headers, 60, url.hostname)
    return status, parsed


def glance_image(directory):
    """The fuzz's own image in Glance (made again when the fuzz deleted it)."""
    if GLANCE.get("image") and glance("GET", "/v2/images/" + GLANCE["image"])[0] == 200:
        return GLANCE["image"]
    status, doc = glance("POST", "/v2/images", {
        "name": "harness-fuzz", "disk_format": "qcow2", "container_format": "bare"})
    if status != 201:
        raise Failure(f"Glance refused the fuzz's image: {status} {doc}")
    make_image(directory)
    with open(os.path.join(directory, "bench.qcow2"), "rb") as f:
        status, _ = glance("PUT", f"/v2/images/{doc['id']}/file", data=f.read())
    if status != 204:
        raise Failure(f"Glance refused the fuzz's image data: {status}")
    GLANCE["image"] = doc["id"]
    GLANCE.setdefault("made", set()).add(doc["id"])
    return doc["id"]


def glance_cleanup(servers_before):
    """Delete the Glance images the fuzz made: its own, and snapshots of its servers."""
    status, doc = glance("GET", "/v2/images?limit=1000")
    for image in (doc or {}).get("images", []) if status == 200 else []:
        if image["id"] in GLANCE.get("made", ()) or (
                image.get("instance_uuid") and image.get("owner") == PROJECT
                and image["instance_uuid"] not in servers_before):
            glance("DELETE", "/v2/images/" + image["id"])


def unlimited(port):
    """No quota on servers for the caller's project; returns the image to boot."""
    call(port, "PUT", f"/os-quota-sets/{PROJECT}", {"quota_set": {
        "instances": -1, "cores": -1, "ram": -1}})
    _, images = call(port, "GET", "/images", version="2.35")
    return images["images"][0]["id"]


def state_digest(data):
    h = hashlib.sha256()
    for name in ("state.json", "state.json.journal"):
        try:
            with open(os.path.join(data, name), "rb") as f:
                h.update(f.read())
        except FileNotFoundError:
            h.update(b"-")
    return h.hexdigest()


def settle(data, quiet=0.4, limit=15):
    """Wait until the state files stop changing (background work of an accepted request)."""
    last, since = state_digest(data), time.monotonic()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = state_digest(data)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


# -- fuzz ------------------------------------------------------------------------------

HOSTILE = [None, True, False, 0, -1, 1, 2 ** 31, 2 ** 63, -2 ** 63, 10 ** 40, 0.5, -0.0,
           "", " ", "x" * 256, "x" * 70000, "\x00", "a\x00b", "\x07\x1b[2J", "\u202e\u200b",
           "<domain type='kvm'/>", "]]><x/>", "'; rm -rf / #", "$(reboot)", "`id`",
           "../../etc/passwd", "%2f..%2f", "\\\\server\\share", "\ud800", "\udfff",
           "😀" * 100, [], {}, [None], {"": None}, {"a": {"b": {"c": []}}}, "1e999",
           "-1", "0", "true", "null", "2.1", "auto", "none", "ACTIVE", "::1", "0.0.0.0",
           "00000000-0000-0000-0000-000000000000", "1" * 1000]
RAW_NUMBERS = ["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1" * 5000, "0x10",
               "01", "1.", ".5", "-"]
VERSIONS = [None, "2.1", "2.37", "2.60", "2.74", "2.96", "latest", "2.104", "2.105",
            "2.0", "3.0", "1.1", "2.", "abc", "2.1 ", " latest", "2.1.1", "-2.5", "2.99999",
            "\u0662.\u0661"]
PATH_HOSTILE = ["..", "%2f", "%2F..%2F", "%00", "%ff", "x" * 1000, "%c0%af", "%20",
                "00000000-0000-0000-0000-00000000000", "a" * 37, "%25", "%u002e", "~",
                "%E2%80%AE", "-1", "0", "99999999999999999999", "none", ";", "'", "%22"]
QUERY_KEYS = ["limit", "marker", "sort_key", "sort_dir", "all_tenants", "changes-since",
              "changes-before", "status", "name", "deleted", "tags", "not-tags", "host",
              "flavor", "image", "ip", "project_id", "user_id", "detailed", "start", "end",
              "minDisk", "minRam", "is_public", "hypervisor_hostname_pattern", "with_servers",
              "instance_uuid", "migration_type", "source_compute", "zz-unknown", "", "%00"]
QUERY_VALUES = ["", "0", "-1", "1", "1001", "99999999999999999999", "abc", "true", "false",
                "2026-13-45T99:99:99Z", "2026-11-30T00:00:00Z", "created_at", "asc", "desc",
                "%00", "%ff", "x" * 3000, "..", "(", "*", "[a-", "\\", "%2f", "none"]
TEMPLATES = {
    ("POST", "/servers"): {"server": {"name": "fz", "imageRef": "{image}", "flavorRef": "1",
                                      "networks": "none", "metadata": {"k": "v"}}},
    ("PUT", "/servers/{id}"): {"server": {"name": "fz2", "description": "d"}},
    ("POST", "/flavors"): {"flavor": {"name": "fzf", "ram": 64, "vcpus": 1, "disk": 1}},
    ("POST", "/os-keypairs"): {"keypair": {"name": "fzk", "type": "ssh"}},
    ("POST", "/os-aggregates"): {"aggregate": {"name": "fza", "availability_zone": "z"}},
    ("POST", "/os-server-groups"): {"server_group": {"name": "fzg", "policy": "affinity"}},
    ("PUT", "/os-quota-sets/{id}"): {"quota_set": {"cores": 10, "instances": 5}},
    ("POST", "/servers/{server_id}/metadata"): {"metadata": {"a": "b"}},
    ("PUT", "/servers/{server_id}/metadata"): {"metadata": {"a": "b"}},
    ("PUT", "/servers/{server_id}/metadata/{id}"): {"meta": {"k1": "v"}},
    ("POST", "/os-server-external-events"): {"events": [{"name": "network-changed",
                                                         "server_uuid": "{server}"}]},
}
ACTION_BODIES = {"resize": {"flavorRef": "2"}, "rebuild": {"imageRef": "{image}"},
                 "reboot": {"type": "SOFT"}, "createImage": {"name": "snap"},
                 "os-migrateLive": {"host": None, "block_migration": "auto"},
                 "evacuate": {}, "changePassword": {"adminPass": "x"},
                 "createBackup": {"name": "b", "backup_type": "daily", "rotation": 1},
                 "addSecurityGroup": {"name": "default"}, "rescue": {}, "migrate": None,
                 "os-getConsoleOutput": {"length": 10}, "lock": None}


class World:
    """Real objects for the path parameters, made through the API."""

    def __init__(self, port, data):
        self.port = port
        self.data = data
        self.refresh()

    def first(self, path, key, make, version=None):
        """The first of a list, made (through the API) when the list is empty."""
        _, listed = call(self.port, "GET", path, version=version)
        if not listed[key]:
            call(self.port, "POST", path, make, version=version)
            _, listed = call(self.port, "GET", path, version=version)
        return listed[key][0]

    def refresh(self):
        port = self.port
        if GLANCE:
            self.image = glance_image(self.data)
        else:
            _, images = call(port, "GET", "/images", version="2.35")
            self.image = images["images"][0]["id"]
        _, servers = call(port, "GET", "/servers")
        if not servers["servers"]:
            status, made = call(port, "POST", "/servers", {"server": {
                "name": "fuzz-world", "imageRef": self.image, "flavorRef": "1",
                "networks": "none"}}, version="2.37")
            if status != 202:
                raise Failure(f"cannot make the fuzz world's server: {status} {made}")
            self.server = made["server"]["id"]
            wait_server(port, self.server, ("ACTIVE",))
            call(port, "PUT", f"/servers/{self.server}/metadata/k1", {"meta": {"k1": "v1"}})
            call(port, "PUT", f"/servers/{self.server}/tags/t1", version="2.26")
        else:
            self.server = servers["servers"][0]["id"]
        self.keypair = self.first("/os-keypairs", "keypairs", {"keypair": {
            "name": "fuzz-key"}})["keypair"]["name"]
        self.group = self.first("/os-server-groups", "server_groups", {"server_group": {
            "name": "fuzz-group", "policy": "anti-affinity"}}, version="2.64")["id"]
        self.aggregate = str(self.first("/os-aggregates", "aggregates", {"aggregate": {
            "name": "fuzz-agg"}})["id"])
        _, actions = call(port, "GET", f"/servers/{self.server}/os-instance-actions")
        self.request = actions["instanceActions"][0]["request_id"] if actions and \
            actions.get("instanceActions") else "req-x"

    def real(self, segments, index):
        """A real value for the parameter at segments[index]."""
        before = segments[index - 1] if index else ""
        return {"servers": self.server, "flavors": "1", "os-keypairs": self.keypair,
                "images": self.image, "os-server-groups": self.group,
                "os-aggregates": self.aggregate, "metadata": "k1", "tags": "t1",
                "os-hypervisors": "1", "os-instance-actions": self.request,
                "os-quota-sets": PROJECT, "os-simple-tenant-usage": PROJECT,
                "os-availability-zone": "nova", "extra_specs": "hw:cpu_policy",
                "os-flavor-access": "1", "versions": "v2.1"}.get(before, "1")


def fill(value, world):
    if isinstance(value, str):
        return value.replace("{image}", world.image).replace("{server}", world.server)
    if isinstance(value, dict):
        return {k: fill(v, world) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, world) for v in value]
    return value


def mutate(rng, value, depth=0):
    """The value with one part replaced, removed, added or re-typed."""
    if isinstance(value, dict) and value and rng.random() < 0.8 and depth < 6:
        key = rng.choice(sorted(value))
        out = dict(value)
        roll = rng.random()
        if roll < 0.15:
            del out[key]
        elif roll < 0.3:
            out[rng.choice(["zz_unknown", "", "\x00", "x" * 300])] = rng.choice(HOSTILE)
        else:
            out[key] = mutate(rng, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.6 and depth < 6:
        out = list(value)
        out[rng.randrange(len(out))] = mutate(rng, out[0], depth + 1)
        return out
    return rng.choice(HOSTILE)


def encode(rng, body):
    """Bytes for a body: JSON, or JSON made hostile in ways json.dumps cannot."""
    roll = rng.random()
    if roll < 0.55:
        return json.dumps(body).encode("utf-8", "surrogatepass")
    text = json.dumps(body)
    if roll < 0.65 and text.startswith("{") and len(text) > 2:    # a key twice
        return ("{" + text[1:-1] + "," + text[1:-1] + "}").encode("utf-8", "surrogatepass")
    if roll < 0.72:
        return text.encode()[:max(1, rng.randrange(len(text)))]       # cut short
    if roll < 0.78:
        return b'{"x": "\xff\xfe\xc0\xaf"}' if rng.random() < 0.5 else \
            text.encode().replace(b'"', b'"\xc3\x28', 1)               # invalid UTF-8
    if roll < 0.84:
        depth = rng.choice([100, 1000, 100000])
        return b"[" * depth + b"]" * depth if rng.random() < 0.5 else \
            b'{"a":' * depth + b"1" + b"}" * depth
    if roll < 0.9:
        number = rng.choice(RAW_NUMBERS)
        return text.replace("1", number, 1).encode() if "1" in text else \
            ('{"x": %s}' % number).encode()
    return rng.choice([b"", b"null", b"[]", b"\x00\x00", b"not json", b'"str"', b"{",
                       b"\xef\xbb\xbf{}", b"{}" * 1000, b" " * 10000])


def fault_ok(status, parsed):
    """Nova's fault body: {"name": {"code": status, "message": "..."}}."""
    if not isinstance(parsed, dict) or len(parsed) != 1:
        return False
    inner = next(iter(parsed.values()))
    return isinstance(inner, dict) and inner.get("code") == status and \
        isinstance(inner.get("message"), str)


def fuzz(profile, seed, report):
    rng = random.Random(seed)
    data = tempfile.mkdtemp(prefix="minivan-fuzz-")
    daemon = start_daemon(data, {"MINIVAN_SYNC_POWER_STATE_INTERVAL": "3600"})
    failures, statuses = [], {}
    accepted = 0
    servers_before = set()
    try:
        if GLANCE:
            status, doc = glance("GET", "/v2/images?limit=1000")
            servers_before = {i.get("instance_uuid") for i in (doc or {}).get("images", [])}
        world = World(daemon.port, data)
        baseline = settle(data)
        routes = list(minivan.ROUTES)
        n = profile["fuzz"]
        started = time.monotonic()
        for case in range(n):
            route = routes[case % len(routes)] if case < len(routes) * 2 else rng.choice(routes)
            segments = list(route.segments)
            hostile_path = rng.random() < 0.3
            for i, seg in enumerate(segments):
                if seg.startswith("{"):
                    segments[i] = rng.choice(PATH_HOSTILE) if hostile_path or (
                        route.method == "DELETE" and rng.random() < 0.9) else \
                        world.real(route.segments, i)
            path = "/v2.1/" + "/".join(segments) if segments else "/v2.1/"
            if rng.random() < 0.5:
                pairs = [(rng.choice(QUERY_KEYS), rng.choice(QUERY_VALUES))
                         for _ in range(rng.randrange(1, 4))]
                if rng.random() < 0.3:
                    pairs += pairs                                     # repeated
                path += "?" + "&".join(f"{k}={v}" for k, v in pairs)
            body = b""
            if route.method in ("POST", "PUT"):
                key = (route.method, route.path)
                if route.action:
                    template = {route.action: ACTION_BODIES.get(route.action)}
                else:
                    template = TEMPLATES.get(key, {"x": 1})
                body = encode(rng, mutate(rng, fill(template, world)))
            version = rng.choice(VERSIONS)
            headers = {}
            if version is not None:
                if rng.random() < 0.5:
                    headers["OpenStack-API-Version"] = "compute " + version
                else:
                    headers["X-OpenStack-Nova-API-Version"] = version
            if rng.random() < 0.05:
                headers["Content-Type"] = rng.choice(["text/plain", "application/xml", ""])
            what = f"case {case}: {route.method} {path[:200]} {body[:120]!r} {headers}"
            try:
                status, parsed, raw = raw_call(daemon.port, route.method, path, body, headers)
            except (OSError, http.client.HTTPException) as e:
                if daemon.proc.poll() is not None:
                    failures.append(f"{what}: the daemon died")
                    break
                if len(body) > MAX_BODY and isinstance(e, (BrokenPipeError,
                                                           ConnectionResetError)):
                    # minivan answered 413 and closed before the body was all sent
                    statuses[413] = statuses.get(413, 0) + 1
                    continue
                failures.append(f"{what}: no answer ({e})")
                continue
            statuses[status] = statuses.get(status, 0) + 1
            if status >= 500 and not (status == 501 and not route.built):
                failures.append(f"{what}: {status} {raw[:300]!r}")
            elif status >= 400 and not fault_ok(status, parsed) and route.method != "HEAD":
                failures.append(f"{what}: {status} without Nova's fault body: {raw[:200]!r}")
            if status >= 400:
                now = state_digest(data)
                if now != baseline:
                    failures.append(f"{what}: rejected ({status}) but the state changed")
                    baseline = settle(data)
            else:
                accepted += 1
                baseline = settle(data, quiet=0.15)
                if case % 50 == 0 or route.method == "DELETE":
                    try:
                        world.refresh()
                        baseline = settle(data, quiet=0.15)
                    except (Failure, KeyError, TypeError, OSError) as e:
                        failures.append(f"after {what}: the world is broken: {e}")
                        break
        took = time.monotonic() - started
    finally:
        daemon.stop()
        if GLANCE:
            glance_cleanup(servers_before)
    finish(data, not failures)
    report["fuzz"] = {"seed": seed, "cases": n, "accepted": accepted,
                      "statuses": dict(sorted(statuses.items())),
                      "5xx": sum(v for k, v in statuses.items() if k >= 500 and k != 501),
                      "failures": len(failures), "seconds": round(took, 1)}
    print(f"fuzz: {n} cases (seed {seed}) in {took:.1f} s; statuses "
          f"{report['fuzz']['statuses']}; {accepted} accepted; {len(failures)} failures")
    for line in failures[:30]:
        print("  FAIL " + line)
    return not failures


# -- crash storm ----------------------------------------------------------------------

def wait_server(port, server_id, wanted, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = call(port, "GET", "/servers/" + server_id)
        if status == 200 and body["server"]["status"] in wanted:
            return body["server"]
        time.sleep(0.02)
    raise Failure(f"server {server_id} not {wanted} after {timeout} s")


class Ledger:
    """What the clients were told was done, and what was in flight when it died."""

    def __init__(self):
        self.lock = threading.Lock()
        self.created = set()          # acknowledged creates
        self.deleting = set()         # deletes sent (acknowledged or not)
        self.deleted = set()          # acknowledged deletes
        self.meta = {}                # (server, key) -> acknowledged value
        self.meta_inflight = {}       # (server, key) -> values sent since that ack
        self.ops = 0
        self.acked = 0


def crash_client(port_box, ledger, image, rng, stop, pause):
    mine = []
    while not stop.is_set():
        if pause.is_set():
            time.sleep(0.02)
            continue
        port = port_box[0]
        roll = rng.random()
        if REAL:
            time.sleep(0.3)                   # real guests: a few operations a second
        try:
            if (roll < 0.3 or len(mine) < 2) and not (
                    REAL and len(mine) >= REAL_SERVERS_PER_CLIENT):
                status, body = call(port, "POST", "/servers", {"server": {
                    "name": f"storm-{rng.randrange(10 ** 6)}", "imageRef": image,
                    "flavorRef": "1", "networks": "none"}}, version="2.37", timeout=10)
                with ledger.lock:
                    ledger.ops += 1
                if status == 202:
                    with ledger.lock:
                        ledger.created.add(body["server"]["id"])
                        ledger.acked += 1
                    mine.append(body["server"]["id"])
            elif roll < 0.65 and mine:
                server_id = rng.choice(mine)
                key, value = f"k{rng.randrange(5)}", str(rng.randrange(10 ** 9))
                with ledger.lock:
                    ledger.ops += 1
                    ledger.meta_inflight.setdefault((server_id, key), set()).add(value)
                status, _ = call(port, "PUT", f"/servers/{server_id}/metadata/{key}",
                                 {"meta": {key: value}}, timeout=10)
                if status == 200:
                    with ledger.lock:
                        ledger.meta[(server_id, key)] = value
                        ledger.meta_inflight[(server_id, key)] = set()
                        ledger.acked += 1
            elif roll < 0.85 and mine:
                server_id = rng.choice(mine)
                action = rng.choice([{"os-stop": None}, {"os-start": None},
                                     {"reboot": {"type": "HARD"}}])
                with ledger.lock:
                    ledger.ops += 1
                status, _ = call(port, "POST", f"/servers/{server_id}/action", action,
                                 timeout=10)
                if status == 202:
                    with ledger.lock:
                        ledger.acked += 1
            elif mine:
                server_id = mine.pop(rng.randrange(len(mine)))
                with ledger.lock:
                    ledger.ops += 1
                    ledger.deleting.add(server_id)
                status, _ = call(port, "DELETE", "/servers/" + server_id, timeout=10)
                if status == 204:
                    with ledger.lock:
                        ledger.deleted.add(server_id)
                        ledger.acked += 1
        except (OSError, http.client.HTTPException, ValueError):
            time.sleep(0.05)                  # killed under us: unacknowledged


def list_all(port):
    """{id: server} of every server, page after page."""
    servers, marker = {}, None
    while True:
        status, body = call(port, "GET", "/servers/detail?all_tenants=1&limit=1000" +
                            (f"&marker={marker}" if marker else ""), version="2.60")
        if status != 200:
            raise Failure(f"listing the servers: {status} {body}")
        servers.update((s["id"], s) for s in body["servers"])
        if not body.get("servers_links") or not body["servers"]:
            return servers
        marker = body["servers"][-1]["id"]


def verify_after_restart(port, data, ledger):
    """The checks of one restart; returns a list of problems."""
    problems = []
    try:
        with open(os.path.join(data, "state.json")) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"state.json does not parse: {e}")
    # every server settles: no task left half-way
    deadline = time.monotonic() + 60
    while True:
        servers = list_all(port)
        busy = [s["id"] for s in servers.values() if s["OS-EXT-STS:task_state"] is not None
                or s["status"] not in ("ACTIVE", "SHUTOFF", "ERROR")]
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    problems += [f"server {i} stuck in {servers[i]['status']}/"
                 f"{servers[i]['OS-EXT-STS:task_state']}" for i in busy]
    with ledger.lock:
        created, deleting, deleted = set(ledger.created), set(ledger.deleting), \
            set(ledger.deleted)
        meta = dict(ledger.meta)
        inflight = {k: set(v) for k, v in ledger.meta_inflight.items()}
    for server_id in created - deleting:
        if server_id not in servers:
            problems.append(f"acknowledged server {server_id} is lost")
    for server_id in deleted:
        if server_id in servers:
            problems.append(f"deleted server {server_id} came back")
    for server_id, server in servers.items():
        if server["status"] == "ERROR" and not server.get("fault"):
            problems.append(f"server {server_id} in ERROR without a fault")
    for (server_id, key), value in meta.items():
        if server_id not in servers or server_id in deleting:
            continue
        got = servers[server_id]["metadata"].get(key)
        if got != value and got not in inflight.get((server_id, key), ()):
            problems.append(f"server {server_id} metadata {key}: {got!r}, acknowledged "
                            f"{value!r}")
    # the domains agree with the records
    for server_id, server in servers.items():
        if server["status"] not in ("ACTIVE", "SHUTOFF"):
            continue
        status, diag = call(port, "GET", f"/servers/{server_id}/diagnostics", version="2.48")
        want = "running" if server["status"] == "ACTIVE" else "shutdown"
        if status != 200 or diag.get("state") != want:
            problems.append(f"server {server_id} is {server['status']} but its domain is "
                            f"{diag.get('state') if status == 200 else status}")
    # no instance directory without a server
    instances = os.path.join(data, "instances")
    deadline = time.monotonic() + 10
    while True:
        orphans = sorted(set(os.listdir(instances) if os.path.isdir(instances) else ())
                         - set(servers))
        if not orphans or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    problems += [f"instance directory {name} has no server" for name in orphans]
    if REAL:
        problems += [f"domain {uuid} has no server" for uuid in
                     sorted(set(real_domains(data)) - set(servers))]
    return problems, len(servers)


def delete_real_guests(port, data):
    """Delete every server; then no domain of this data directory may be left."""
    for server_id in list_all(port):
        call(port, "DELETE", "/servers/" + server_id)
    deadline = time.monotonic() + 120
    while list_all(port) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = real_domains(data)
    return [f"after deleting every server: domain {uuid} has no server" for uuid in left]


def real_domains(data):
    """{uuid: running?} of the libvirt domains whose disks are in this data directory."""
    libvirt = minivan.import_libvirt()
    conn = libvirt.open(REAL["uri"])
    found = {}
    try:
        for dom in conn.listAllDomains():
            try:
                if f"file='{data}/" in dom.XMLDesc(0):
                    found[dom.UUIDString()] = bool(dom.isActive())
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise            # (another user's domain may go while it is listed)
        return found
    finally:
        conn.close()


def crash(profile, seed, report):
    rng = random.Random(seed)
    data = tempfile.mkdtemp(prefix="minivan-crash-")
    extra = {"MINIVAN_SYNC_POWER_STATE_INTERVAL": "2"}
    if REAL:
        os.chmod(data, 0o711)                 # QEMU, as its own user, reaches the disks
        extra.update(MINIVAN_LIBVIRT_URI=REAL["uri"], MINIVAN_VIRT_TYPE="qemu",
                     MINIVAN_NETWORK=REAL["network"], MINIVAN_SHUTDOWN_TIMEOUT="5")
    daemon = start_daemon(data, extra)
    image = unlimited(daemon.port)
    ledger, stop, pause = Ledger(), threading.Event(), threading.Event()
    port_box = [daemon.port]
    clients = [threading.Thread(target=crash_client, daemon=True,
                                args=(port_box, ledger, image, random.Random(seed + k), stop,
                                      pause)) for k in range(2 if REAL else 4)]
    for thread in clients:
        thread.start()
    problems, kills, restarts, servers_seen = [], 0, [], 0
    started = time.monotonic()
    try:
        while kills < profile["kills"] or ledger.ops < profile["ops"]:
            time.sleep(rng.uniform(0.2, 1.5))
            os.kill(daemon.proc.pid, signal.SIGKILL)
            daemon.proc.wait()
            kills += 1
            pause.set()
            time.sleep(0.1)
            t0 = time.monotonic()
            daemon = Daemon(data, env=dict(DAEMON_ENV, **extra))
            daemon.port = port_box[0]
            try:
                daemon.start()
            except RuntimeError as e:
                problems.append(f"restart {kills} failed: {e}")
                break
            restarts.append(time.monotonic() - t0)
            found, servers_seen = verify_after_restart(daemon.port, data, ledger)
            problems += [f"after kill {kills}: {p}" for p in found]
            pause.clear()
            if kills > 4 * profile["kills"]:
                break
    finally:
        stop.set()
        for thread in clients:
            thread.join(15)
        if REAL:
            problems += delete_real_guests(daemon.port, data)
        daemon.stop()
    finish(data, not problems)
    took = time.monotonic() - started
    lost = sum("is lost" in p or "metadata" in p for p in problems)
    leaked = sum("directory" in p and "has no server" in p for p in problems)
    leaked_domains = sum("domain" in p and "has no server" in p for p in problems)
    report["crash"] = {"seed": seed, "operations": ledger.ops, "acknowledged": ledger.acked,
                       "kills": kills, "lost_changes": lost, "leaked_dirs": leaked,
                       "leaked_domains": leaked_domains, "real_guests": bool(REAL),
                       "problems": len(problems), "servers_at_end": servers_seen,
                       "restart_s_median": round(statistics.median(restarts), 3)
                       if restarts else None, "seconds": round(took, 1)}
    print(f"crash{' (real QEMU guests)' if REAL else ''}: {ledger.ops} operations "
          f"({ledger.acked} acknowledged), {kills} kills "
          f"in {took:.1f} s; lost changes {lost}, leaked directories {leaked}, "
          f"leaked domains {leaked_domains}, "
          f"{len(problems)} problems; restart median "
          f"{report['crash']['restart_s_median']} s")
    for line in problems[:30]:
        print("  FAIL " + line)
    return not problems


# -- load -------------------------------------------------------------------------------

def load_client(port, seconds, image, rng, out):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"X-Auth-Token": TOKEN, "Content-Type": "application/json",
               "OpenStack-API-Version": "compute 2.37"}
    latencies, errors, mine = [], [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        roll = rng.random()
        if roll < 0.5:
            method, path, body = "GET", rng.choice(["/v2.1/flavors/detail", "/v2.1/servers",
                                                    "/v2.1/servers/detail?limit=20",
                                                    "/v2.1/os-keypairs", "/v2.1/limits"]), None
        elif roll < 0.6 or not mine:
            method, path, body = "POST", "/v2.1/servers", {"server": {
                "name": "load", "imageRef": image, "flavorRef": "1", "networks": "none"}}
        elif roll < 0.85:
            method, path = "PUT", f"/v2.1/servers/{rng.choice(mine)}/metadata/k"
            body = {"meta": {"k": str(rng.random())}}
        elif roll < 0.95:
            method, path, body = "GET", f"/v2.1/servers/{rng.choice(mine)}", None
        else:
            method, path, body = "DELETE", f"/v2.1/servers/{mine.pop()}", None
        t0 = time.perf_counter()
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None,
                         headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            errors.append(f"{method} {path}: dropped ({e})")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        latencies.append(time.perf_counter() - t0)
        if resp.status >= 500:
            errors.append(f"{method} {path}: {resp.status} {raw[:200]!r}")
        elif method == "POST" and resp.status == 202:
            mine.append(json.loads(raw)["server"]["id"])
    conn.close()
    out.append((latencies, errors))


def slow_client(port, kind, stop, out):
    """Trickle a request byte by byte, or promise a body and never send it; records how
    long minivan let each such connection hang."""
    held = []
    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        except OSError:
            time.sleep(0.1)
            continue
        t0 = time.monotonic()
        try:
            if kind == "trickle":
                sock.settimeout(0.5)
                for byte in b"GET /v2.1/flavors HTTP/1.1\r\nHost: x\r\nX-Auth-Token: a\r\n" * 20:
                    if stop.is_set():
                        break
                    sock.send(bytes([byte]))
                    try:
                        if not sock.recv(100):         # closed on us
                            break
                    except socket.timeout:
                        pass
            else:
                sock.send(b"PUT /v2.1/servers/x HTTP/1.1\r\nHost: x\r\nX-Auth-Token: a\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
                sock.settimeout(120)
                sock.recv(100)
        except OSError:
            pass
        finally:
            sock.close()
        if not stop.is_set():
            held.append(time.monotonic() - t0)
    out.append(held)


def load(profile, seed, report):
    data = tempfile.mkdtemp(prefix="minivan-load-")
    daemon = start_daemon(data, {"MINIVAN_CLIENT_TIMEOUT": str(CLIENT_TIMEOUT)})
    image = unlimited(daemon.port)
    out, slow_out, stop = [], [], threading.Event()
    slow = [threading.Thread(target=slow_client, args=(daemon.port, kind, stop, slow_out),
                             daemon=True) for kind in ("trickle", "stall") * 10]
    for thread in slow:
        thread.start()
    threads = [threading.Thread(target=load_client, daemon=True, args=(
        daemon.port, profile["load_s"], image, random.Random(seed + k), out))
        for k in range(profile["clients"])]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(profile["load_s"] + 120)
    took = time.monotonic() - started
    stop.set()
    try:
        alive = call(daemon.port, "GET", "/flavors")[0] == 200
    except OSError:
        alive = False
    threads_now = len(os.listdir(f"/proc/{daemon.proc.pid}/task"))
    for thread in slow:
        thread.join(CLIENT_TIMEOUT + 10)
    daemon.stop()
    latencies = sorted(x for lat, _ in out for x in lat)
    errors = [e for _, errs in out for e in errs]
    five = sum(" 5" in e[:30] or ": 5" in e for e in errors if "dropped" not in e)
    dropped = sum("dropped" in e for e in errors)
    pct = (lambda q: round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] *
                           1000, 2)) if latencies else (lambda q: None)
    holds = [h for held in slow_out for h in held]
    longest = round(max(holds), 1) if holds else None
    if longest is None or longest > CLIENT_TIMEOUT + 3:
        errors.append(f"slow clients were held {longest} s (--client-timeout "
                      f"{CLIENT_TIMEOUT})")
    report["load"] = {"clients": profile["clients"], "slow_clients": len(slow),
                      "slow_connections_cut": len(holds), "slow_longest_s": longest,
                      "seconds": round(took, 1), "requests": len(latencies), "5xx": five,
                      "dropped": dropped, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                      "daemon_threads_at_end": threads_now, "alive": alive}
    print(f"load: {profile['clients']} clients + {len(slow)} slow ones for {took:.1f} s: "
          f"{len(latencies)} requests, {five} 5xx, {dropped} dropped, p50 {pct(0.5)} ms, "
          f"p99 {pct(0.99)} ms; {len(holds)} slow connections cut after at most "
          f"{longest} s; {threads_now} daemon threads at the end; "
          f"{'answering' if alive else 'NOT answering'}")
    for line in errors[:20]:
        print("  FAIL " + line)
    finish(data, not errors and alive)
    return not errors and alive


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts", nargs="*", metavar="fuzz|crash|load",
                   help="the parts to run (default: all three)")
    p.add_argument("--profile", choices=sorted(PROFILES), default="full")
    p.add_argument("--seed", type=int, default=None, help="default: random, printed")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--keystone", metavar="ENV",
                   help="run behind this Keystone (the env file of tools/keystone.sh)")
    p.add_argument("--real-guest", metavar="IMAGE",
                   help="crash: real QEMU guests booted from this image (tools/make-guest.sh) "
                        "on --libvirt-uri, fewer operations and kills")
    p.add_argument("--libvirt-uri", default="qemu:///system",
                   help="with --real-guest (default: qemu:///system)")
    p.add_argument("--network", default="minivan-test",
                   help="with --real-guest: the isolated libvirt network the guests join "
                        "(default: minivan-test, from tools/libvirt-up.sh)")
    opts = p.parse_args()
    for part in opts.parts:
        if part not in ("fuzz", "crash", "load"):
            p.error(f"no part {part!r}: fuzz, crash or load")
    seed = opts.seed if opts.seed is not None else random.randrange(10 ** 6)
    profile = PROFILES[opts.profile]
    if opts.real_guest:
        REAL.update(image=os.path.abspath(opts.real_guest), uri=opts.libvirt_uri,
                    network=opts.network)
        profile = dict(profile, **REAL_PROFILES[opts.profile])
    parts = opts.parts or ["fuzz", "crash", "load"]
    if opts.keystone:
        use_keystone(opts.keystone)
    print(f"harness: profile {opts.profile}, seed {seed}, parts {' '.join(parts)}"
          + (f", behind Keystone {DAEMON_ENV['MINIVAN_KEYSTONE_URL']}" if opts.keystone
             else ""))
    report, ok = {"profile": opts.profile, "seed": seed}, True
    for part in parts:
        ok = {"fuzz": fuzz, "crash": crash, "load": load}[part](profile, seed, report) and ok
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=2)
    print("harness: " + ("all checks passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
