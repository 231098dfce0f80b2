#!/usr/bin/env python3
"""minivan: the OpenStack Compute (Nova) API in one file, on libvirt.

Copy this file onto a host, run ``python3 minivan.py`` and point the OpenStack
clients at ``http://127.0.0.1:8774/v2.1``.  Register it as the ``compute``
endpoint in Keystone and ``--auth keystone`` makes it a cloud's compute service.

Needs: Python 3.10 or newer, its standard library, and (for servers) the
libvirt-python binding (Debian/Ubuntu: ``apt install python3-libvirt``).

Files (under the data directory, ``--data-dir``):
    state.json           snapshot of every record minivan keeps (mode 0600)
    state.json.journal   JSON lines appended since the snapshot; replayed at start
    state.lock           held while minivan runs, so two daemons never share a directory
    images/ _base/ instances/<uuid>/   image directory, image cache, per-server files

Map of this file (``grep -n '^# §' minivan.py``):
    §1  configuration         options, defaults, environment, INI file
    §2  utilities             clock, ids, JSON, time formats
    §3  faults                the exceptions handlers raise; fault bodies
    §4  state store           snapshot + journal with group commit
    §5  microversions         negotiation and comparison
    §6  request validation    a small JSON-schema subset with Nova's messages
    §7  identity and policy   noauth, Keystone tokens, default policy personas
    §8  hypervisor driver     libvirt, imported lazily
    §9  quotas                defaults, classes, per-project and per-user limits, usage
    §10 views                 links and pagination
    §11 API: versions, extensions
    §12 API: flavors, extra specs, flavor access
    §13 API: keypairs
    §14 API: limits, quota sets, quota classes
    §15 API: availability zones
    §16 ROUTES and ACTIONS    the dispatch table, one row per Nova route
    §17 HTTP front end        server, handler, dispatcher, TLS, CORS
    §18 systemd and signals
    §19 main
"""

import argparse
import base64
import binascii
import collections
import configparser
import contextvars
import datetime
import errno
import fcntl
import hashlib
import hmac
import http.server
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid

LOG = logging.getLogger("minivan")
MIN_VERSION = (2, 1)
MAX_VERSION = (2, 104)
SCHEMA_VERSION = 1


# § 1 configuration ---------------------------------------------------------

def default_data_dir():
    """systemd's StateDirectory, else /var/lib/minivan as root, else ./minivan-data."""
    if os.environ.get("STATE_DIRECTORY"):
        return os.environ["STATE_DIRECTORY"].split(":")[0]
    if os.geteuid() == 0:
        return "/var/lib/minivan"
    return os.path.abspath("minivan-data")


# (option, default, help).  Every option also reads MINIVAN_<OPTION> and the
# [minivan] section of --config.  Secrets have no command-line flag at all.
OPTIONS = [
    ("data-dir", None, "where state.json, images and instances live "
     "(default: $STATE_DIRECTORY, else /var/lib/minivan as root, else ./minivan-data)"),
    ("bind", None, "address to listen on (default: 127.0.0.1 with --auth noauth, "
     "all addresses with --auth keystone); IPv6 addresses work"),
    ("port", "8774", "TCP port"),
    ("public-url", "", "base URL clients reach minivan at, for links "
     "(default: from X-Forwarded-Proto/Host or Host)"),
    ("tls-cert", "", "PEM certificate file: serve HTTPS"),
    ("tls-key", "", "PEM private key file for --tls-cert"),
    ("cors-allowed-origins", "", "comma-separated origins allowed by CORS ('*' for any)"),
    ("auth", "", "noauth or keystone (default: keystone when --keystone-url is set)"),
    ("noauth-identity", "admin:admin", "user:project for tokens that are not user:project "
     "in noauth mode"),
    ("keystone-url", "", "Keystone v3 URL, e.g. http://controller/identity/v3"),
    ("keystone-username", "nova", "service user that validates tokens"),
    ("keystone-project", "service", "service user's project"),
    ("keystone-user-domain", "Default", "service user's domain name"),
    ("keystone-project-domain", "Default", "service project's domain name"),
    ("keystone-cafile", "", "CA bundle for an HTTPS Keystone"),
    ("token-cache-size", "10000", "validated tokens kept in memory"),
    ("flavors", "", "JSON file of flavors loaded on first start "
     "(default: flavors.json beside minivan.py, else the built-in set)"),
    ("libvirt-uri", "qemu:///system", "libvirt connection URI (test:///default for a trial)"),
    ("virt-type", "", "kvm or qemu (default: kvm where the CPU and /dev/kvm allow it)"),
    ("availability-zone", "nova", "availability zone of this host"),
    ("host", "", "compute host name (default: this machine's host name)"),
    ("max-body-size", "114688", "largest request body accepted, in bytes"),
    ("max-limit", "1000", "largest page a list returns"),
    ("journal-max-bytes", "16777216", "journal size that triggers a new snapshot"),
    ("debug", "false", "log every request and response (tokens and passwords excluded)"),
]
SECRET_OPTIONS = [("keystone-password", "", "service user's password "
                   "(only from MINIVAN_KEYSTONE_PASSWORD or --config)")]
BOOL_TRUE = {"1", "true", "yes", "on"}


class ConfigError(Exception):
    """A setting is missing or wrong; main() prints it as one line."""


def build_arg_parser():
    p = argparse.ArgumentParser(
        prog="minivan.py",
        description="The OpenStack Compute (Nova) API in one process, on libvirt. "
                    "Every option also reads MINIVAN_<NAME> (e.g. MINIVAN_PORT) and "
                    "the [minivan] section of --config.",
        epilog="The Keystone service password comes only from MINIVAN_KEYSTONE_PASSWORD "
               "or the keystone-password key of --config.")
    p.add_argument("--config", help="INI file with a [minivan] section (mode 0600)")
    for name, default, help_text in OPTIONS:
        if name == "debug":
            p.add_argument("--debug", action="store_const", const="true", default=None,
                           help=help_text)
        else:
            shown = f" (default: {default})" if default else ""
            p.add_argument("--" + name, default=None, help=help_text + shown)
    return p


def load_config(argv, environ=None):
    """Command line over environment over INI file over built-in default."""
    environ = os.environ if environ is None else environ
    args = build_arg_parser().parse_args(argv)
    config_path = args.config or environ.get("MINIVAN_CONFIG", "")
    from_file = read_ini(config_path) if config_path else {}
    conf = {}
    for name, default, _ in OPTIONS + SECRET_OPTIONS:
        attr = name.replace("-", "_")
        env_name = "MINIVAN_" + attr.upper()
        value = getattr(args, attr, None)
        if value is None:
            value = environ.get(env_name)
        if value is None:
            value = from_file.get(name, from_file.get(attr))
        conf[attr] = default if value is None else value
    return finish_config(conf)


def read_ini(path):
    """The [minivan] section of an INI file; a file holding a secret must be 0600."""
    try:
        st = os.stat(path)
        parser = configparser.ConfigParser(interpolation=None)
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, configparser.Error) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    section = dict(parser["minivan"]) if parser.has_section("minivan") else {}
    if section.get("keystone-password", section.get("keystone_password")) \
            and st.st_mode & 0o077:
        raise ConfigError(f"config file {path} holds a password but is readable by others: "
                          f"chmod 600 {path}")
    return section


def finish_config(conf):
    """Types, derived defaults and cross-checks."""
    for key in ("port", "max_body_size", "max_limit", "journal_max_bytes", "token_cache_size"):
        try:
            conf[key] = int(conf[key])
        except ValueError:
            raise ConfigError(f"--{key.replace('_', '-')} must be a number, "
                              f"not {conf[key]!r}") from None
    conf["debug"] = str(conf["debug"]).lower() in BOOL_TRUE
    if not conf["auth"]:
        conf["auth"] = "keystone" if conf["keystone_url"] else "noauth"
    if conf["auth"] not in ("noauth", "keystone"):
        raise ConfigError(f"--auth must be noauth or keystone, not {conf['auth']!r}")
    if conf["auth"] == "keystone":
        if not conf["keystone_url"]:
            raise ConfigError("--auth keystone needs --keystone-url "
                              "(e.g. http://controller/identity/v3)")
        if not conf["keystone_password"]:
            raise ConfigError("--auth keystone needs the service user's password in "
                              "MINIVAN_KEYSTONE_PASSWORD or keystone-password in --config")
    if conf["virt_type"] not in ("", "kvm", "qemu"):
        raise ConfigError(f"--virt-type must be kvm or qemu, not {conf['virt_type']!r}")
    if conf["bind"] is None:
        conf["bind"] = "127.0.0.1" if conf["auth"] == "noauth" else "::"
    if ":" not in conf["noauth_identity"]:
        raise ConfigError("--noauth-identity must look like user:project")
    if bool(conf["tls_cert"]) != bool(conf["tls_key"]):
        raise ConfigError("--tls-cert and --tls-key go together")
    conf["data_dir"] = os.path.abspath(conf["data_dir"] or default_data_dir())
    conf["host"] = conf["host"] or socket.gethostname().split(".")[0]
    conf["public_url"] = conf["public_url"].rstrip("/")
    conf["cors_allowed_origins"] = [o.strip() for o in conf["cors_allowed_origins"].split(",")
                                    if o.strip()]
    return conf


def default_config(**overrides):
    """A complete configuration with every default, for tests and embedding."""
    conf = {name.replace("-", "_"): default for name, default, _ in OPTIONS + SECRET_OPTIONS}
    conf.update({k: v for k, v in overrides.items()})
    return finish_config(conf)


# § 2 utilities -------------------------------------------------------------

class Clock:
    """Wall-clock time, replaceable in tests."""

    def now(self):
        return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def isotime(dt):
    """2026-11-30T01:02:03Z, the format of server created/updated."""
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def isotime_us(dt):
    """2026-11-30T01:02:03.123456, the format most admin APIs use."""
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f")


def parse_isotime(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f")


def new_request_id():
    return "req-" + str(uuid.uuid4())


# The request being handled by this thread, for every log line about it.
CURRENT_REQUEST = contextvars.ContextVar("minivan_request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Adds %(request_id)s to every log record: the id of the request being handled."""

    def filter(self, record):
        record.request_id = CURRENT_REQUEST.get()
        return True


def json_bytes(obj):
    return json.dumps(obj).encode("utf-8")


def is_uuid_like(value):
    try:
        return str(uuid.UUID(str(value))).replace("-", "") == str(value).replace("-", "").lower()
    except (ValueError, TypeError, AttributeError):
        return False


def bool_from_string(value, strict=False):
    """oslo's bool_from_string: True/False, or ValueError when strict and unknown."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "t", "true", "on", "y", "yes"):
        return True
    if text in ("0", "f", "false", "off", "n", "no"):
        return False
    if strict:
        raise ValueError(value)
    return False


# § 3 faults ----------------------------------------------------------------

FAULT_NAMES = {
    400: "badRequest", 401: "unauthorized", 403: "forbidden", 404: "itemNotFound",
    405: "badMethod", 409: "conflictingRequest", 413: "overLimit", 415: "badMediaType",
    429: "overLimit", 501: "notImplemented", 503: "serviceUnavailable",
}
STATUS_TEXT = {s.value: s.phrase for s in http.HTTPStatus}


class Fault(Exception):
    """Raised by handlers; the dispatcher turns it into a Nova fault body."""
    code = 500
    default = "An unknown error occurred."

    def __init__(self, message=None, headers=None):
        super().__init__(message or self.default)
        self.message = message or self.default
        self.headers = headers or {}

    def body(self):
        name = FAULT_NAMES.get(self.code, "computeFault")
        inner = {"code": self.code, "message": self.message}
        if self.code in (413, 429) and "Retry-After" in self.headers:
            inner["retryAfter"] = self.headers["Retry-After"]
        return {name: inner}


class BadRequest(Fault):
    code, default = 400, "Bad request."


class Unauthorized(Fault):
    code, default = 401, "The request you have made requires authentication."


class Forbidden(Fault):
    code, default = 403, "Forbidden."


class NotFound(Fault):
    code, default = 404, "The resource could not be found."


class BadMethod(Fault):
    code, default = 405, "The method is not allowed for the requested URL."


class NotAcceptable(Fault):
    code = 406


class Conflict(Fault):
    code = 409


class Gone(Fault):
    code, default = 410, "This resource is no longer available. No forwarding address is given."


class TooLarge(Fault):
    code, default = 413, "Request is too large."


class BadMediaType(Fault):
    code, default = 415, "Unsupported Content-Type"


class NotImplementedFault(Fault):
    code, default = 501, "This API is not implemented by minivan yet."


class Unavailable(Fault):
    code, default = 503, "The service is temporarily unavailable."


def unexpected_error_message(exc):
    return ("Unexpected API Error. Please report this at http://bugs.launchpad.net/nova/ "
            "and attach the Nova API log if possible.\n" + repr(type(exc)))


# § 4 state store -----------------------------------------------------------
#
# Every record lives in one JSON tree (Store.data).  A change is a list of
# operations, each ["set", path, value] or ["del", path], where path is a list
# of keys from the root.  Operations are absolute (never "add one"), so
# applying one twice is harmless; that is what lets a snapshot be taken while
# the journal keeps growing.  commit() applies the change in memory, appends it
# to the journal and returns only once the journal is fsynced; concurrent
# commits share one fsync.

EMPTY_STATE = {
    "flavors": {}, "flavor_access": {}, "keypairs": {}, "quotas": {},
    "user_quotas": {}, "quota_classes": {}, "servers": {}, "server_groups": {},
    "counters": {"keypair": 0, "flavor": 0},
}


class StateError(Exception):
    """The state files cannot be used; minivan refuses to start."""


class Store:
    """In-memory state, durable through a snapshot and a fsynced journal."""

    def __init__(self, data_dir, journal_max_bytes=16 * 1024 * 1024):
        self.dir = data_dir
        self.path = os.path.join(data_dir, "state.json")
        self.journal_path = self.path + ".journal"
        self.journal_max_bytes = journal_max_bytes
        self.cond = threading.Condition()
        self.data = None
        self.seq = 0            # changes applied in memory
        self.durable = 0        # changes known to be on disk
        self.pending = []       # journal lines not yet written
        self.flushing = False
        self.broken = None      # set when a write failed; mutations then fail
        self.journal = None
        self.lock_fd = None

    # -- start-up --------------------------------------------------------
    def open(self):
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._take_lock()
        fresh = not os.path.exists(self.path)
        if fresh:
            self.data = json.loads(json.dumps(EMPTY_STATE))
        else:
            self.data = self._read_snapshot()
        replayed = self._replay_journal()
        self.journal = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if fresh or replayed:
            self.snapshot()
        return fresh

    def _take_lock(self):
        self.lock_fd = os.open(os.path.join(self.dir, "state.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StateError(f"another minivan is using {self.dir} "
                             "(state.lock is held); stop it or pick another --data-dir") from None

    def _read_snapshot(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as e:
            raise StateError(f"{self.path} is unreadable ({e}); it was left untouched — "
                             "restore it from a backup or move it away to start empty") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
            raise StateError(f"{self.path} is not a minivan state file (no 'data' object); "
                             "it was left untouched")
        version = doc.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise StateError(f"{self.path} has schema_version {version!r}; this minivan "
                             f"understands up to {SCHEMA_VERSION} — run a newer minivan")
        return migrate_state(doc["data"], version)

    def _replay_journal(self):
        try:
            with open(self.journal_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise StateError(f"cannot read {self.journal_path}: {e}") from None
        lines = raw.split(b"\n")
        count = 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                ops = record["ops"]
                for op in ops:
                    apply_op(self.data, op)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                torn_tail = number == len(lines) and not raw.endswith(b"\n")
                if torn_tail:
                    LOG.warning("dropping a torn last line of %s (a crash during a write): "
                                "it was never acknowledged", self.journal_path)
                    break
                raise StateError(f"{self.journal_path} line {number} is unreadable ({e}); "
                                 "it was left untouched") from None
            count += 1
        return count

    # -- changes -----------------------------------------------------------
    def commit(self, ops):
        """Apply ops in memory, then return once they are durable on disk."""
        self.transaction(lambda data: ops)

    def transaction(self, plan):
        """Run plan(data) under the state lock; it checks and returns the ops to apply.

        plan may raise a Fault, and then nothing changes.  Returns plan's ops once
        they are durable."""
        with self.cond:
            if self.broken:
                raise Unavailable("minivan cannot write its state: %s" % self.broken)
            ops = plan(self.data)
            if not ops:
                return ops
            line = json.dumps({"ops": ops}, separators=(",", ":")) + "\n"
            for op in ops:
                apply_op(self.data, op)
            self.pending.append(line)
            self.seq += 1
            self._wait_durable(self.seq)
            return ops

    def reading(self):
        """Context manager: a consistent view of data while it is held (no disk waits)."""
        return self.cond

    def _wait_durable(self, mine):
        """Group commit: the first waiter writes everyone's lines, the rest wait."""
        while self.durable < mine:
            if self.broken:
                raise Unavailable("minivan cannot write its state: %s" % self.broken)
            if self.flushing:
                self.cond.wait()
                continue
            self.flushing = True
            batch, upto = self.pending, self.seq
            self.pending = []
            self.cond.release()
            try:
                self._write(b"".join(s.encode("utf-8") for s in batch))
                error = None
            except OSError as e:
                error = e
            finally:
                self.cond.acquire()
            self.flushing = False
            if error:
                self.broken = str(error)
                LOG.error("journal write failed: %s; refusing further changes", error)
            else:
                self.durable = upto
            self.cond.notify_all()
            if not error and self._journal_size() > self.journal_max_bytes:
                self._snapshot_locked()

    def _write(self, payload):
        view = memoryview(payload)
        while view:
            written = os.write(self.journal, view)
            view = view[written:]
        os.fsync(self.journal)

    def _journal_size(self):
        try:
            return os.fstat(self.journal).st_size
        except OSError:
            return 0

    # -- snapshots ---------------------------------------------------------
    def snapshot(self):
        with self.cond:
            while self.flushing:
                self.cond.wait()
            self._snapshot_locked()

    def _snapshot_locked(self):
        """Write state.json atomically, then start an empty journal.  Caller holds cond."""
        if self.pending:        # flush first so nothing is lost with the old journal
            self._write(b"".join(s.encode("utf-8") for s in self.pending))
            self.pending = []
            self.durable = self.seq
        doc = {"schema_version": SCHEMA_VERSION, "saved_at": isotime_us(Clock().now()),
               "data": self.data}
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._fsync_dir()
            if self.journal is not None:
                os.ftruncate(self.journal, 0)
                os.fsync(self.journal)
            else:
                with open(self.journal_path, "w"):
                    pass
        except OSError as e:
            self.broken = str(e)
            LOG.error("snapshot failed: %s; refusing further changes", e)
            raise Unavailable("minivan cannot write its state: %s" % e) from None

    def _fsync_dir(self):
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self):
        """Fold the journal into a snapshot and release the lock."""
        if self.data is not None and not self.broken:
            self.snapshot()
        for fd in (self.journal, self.lock_fd):
            if fd is not None:
                os.close(fd)
        self.journal = self.lock_fd = None


def apply_op(root, op):
    kind, path = op[0], op[1]
    node = root
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if kind == "set":
        node[path[-1]] = op[2]
    elif kind == "del":
        node.pop(path[-1], None)
    else:
        raise ValueError(f"unknown operation {kind!r}")


def migrate_state(data, version):
    """Bring a snapshot of an older schema_version up to date."""
    for key, value in EMPTY_STATE.items():
        data.setdefault(key, json.loads(json.dumps(value)))
    for key, value in EMPTY_STATE["counters"].items():
        data["counters"].setdefault(key, value)
    return data


# § 5 microversions ---------------------------------------------------------

VERSION_RE = re.compile(r"^([1-9]\d*)\.([1-9]\d*|0)$")


def version_text(v):
    return "%d.%d" % v


def parse_version(text):
    """'2.47' -> (2, 47); 'latest' -> the maximum; else BadRequest."""
    if text == "latest":
        return MAX_VERSION
    m = VERSION_RE.match(text or "")
    if not m:
        raise BadRequest(f"API Version String {text} is of invalid format. "
                         "Must be of format MajorNum.MinorNum.")
    return int(m.group(1)), int(m.group(2))


def requested_version_text(headers):
    """The compute version a request asks for, as text, or None.

    OpenStack-API-Version wins over X-OpenStack-Nova-API-Version; repeated headers
    are folded and the last compute entry counts."""
    standard = headers.get_all("OpenStack-API-Version") or []
    found = None
    for entry in ",".join(standard).split(","):
        parts = entry.strip().split(None, 1)
        if len(parts) == 2 and parts[0].lower() == "compute":
            found = parts[1].strip()
    if found is not None:
        return found
    legacy = headers.get_all("X-OpenStack-Nova-API-Version") or []
    values = [v.strip() for v in ",".join(legacy).split(",") if v.strip()]
    return values[-1] if values else None


def negotiate_version(headers):
    """Returns (version tuple, text to echo); raises BadRequest or NotAcceptable."""
    text = requested_version_text(headers)
    if text is None:
        return MIN_VERSION, version_text(MIN_VERSION)
    text = text.strip()
    version = parse_version(text.lower() if text.lower() == "latest" else text)
    if not MIN_VERSION <= version <= MAX_VERSION:
        raise NotAcceptable(f"Version {text} is not supported by the API. Minimum is "
                            f"{version_text(MIN_VERSION)} and maximum is "
                            f"{version_text(MAX_VERSION)}.")
    return version, version_text(version)


def pick(version, table):
    """The entry of {(2, 1): a, (2, 55): b} whose version is the newest <= version."""
    best = None
    for since in sorted(table):
        if since <= version:
            best = table[since]
    return best


# § 6 request validation ----------------------------------------------------
#
# A small subset of JSON Schema (draft 4) written as dicts, with the messages
# Nova's validator gives.  Query strings are dicts of lists, as in Nova.

NAME_RE = re.compile(r"^(?!\s)[^\x00-\x1f\x7f]*(?<!\s)$")
BOOLEAN_STRINGS = [True, "True", "TRUE", "true", "1", "ON", "On", "on", "YES", "Yes", "yes",
                   False, "False", "FALSE", "false", "0", "OFF", "Off", "off", "NO", "No", "no"]
JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


class SchemaError(Exception):
    def __init__(self, path, value, message):
        super().__init__(message)
        self.path, self.value, self.message = path, value, message


def _type_ok(value, kind):
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, JSON_TYPES[kind])


def _repr(value):
    """Python-style repr as jsonschema prints it in messages."""
    return repr(value)


def check_schema(schema, value, path=(), lenient=False):
    """Raise SchemaError for the first problem found (depth first)."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_type_ok(value, k) for k in kinds):
            shown = kinds[0] if len(kinds) == 1 else kinds
            raise SchemaError(path, value, f"{_repr(value)} is not of type {_repr(shown)}")
    if "enum" in schema and not any(value == e and type(value) is type(e)
                                    for e in schema["enum"]):
        raise SchemaError(path, value, f"{_repr(value)} is not one of {_repr(schema['enum'])}")
    if isinstance(value, str):
        _check_string(schema, value, path)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(schema, value, path)
    if isinstance(value, dict):
        _check_object(schema, value, path, lenient)
    if isinstance(value, list):
        _check_array(schema, value, path, lenient)
    for alternative in schema.get("allOf", ()):
        check_schema(alternative, value, path, lenient)


def _check_string(schema, value, path):
    if "minLength" in schema and len(value) < schema["minLength"]:
        raise SchemaError(path, value, f"{_repr(value)} is too short")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        raise SchemaError(path, value, f"{_repr(value)} is too long")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        raise SchemaError(path, value, f"{_repr(value)} does not match {_repr(schema['pattern'])}")
    fmt = schema.get("format")
    if fmt == "name" and not NAME_RE.match(value):
        raise SchemaError(path, value, f"{_repr(value)} is not a 'name'")
    if fmt == "uuid" and not is_uuid_like(value):
        raise SchemaError(path, value, f"{_repr(value)} is not a 'uuid'")


def _check_number(schema, value, path):
    if "minimum" in schema and value < schema["minimum"]:
        raise SchemaError(path, value,
                          f"{_repr(value)} is less than the minimum of {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        raise SchemaError(path, value,
                          f"{_repr(value)} is greater than the maximum of {schema['maximum']}")


def _check_object(schema, value, path, lenient):
    for key in schema.get("required", ()):
        if key not in value:
            raise SchemaError(path, value, f"{_repr(key)} is a required property")
    props = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extra = []
    for key, item in value.items():
        if key in props:
            check_schema(props[key], item, path + (key,), lenient)
            continue
        matched = [p for p in patterns if re.search(p, key)]
        for p in matched:
            check_schema(patterns[p], item, path + (key,), lenient)
        if not matched:
            extra.append(key)
    if extra and schema.get("additionalProperties", True) is False and not lenient:
        if patterns and not props:
            raise SchemaError(path, value, f"Additional properties are not allowed "
                              f"({', '.join(_repr(k) for k in sorted(extra))} do not match "
                              f"any of the regexes: {', '.join(_repr(p) for p in patterns)})")
        was = "was" if len(extra) == 1 else "were"
        raise SchemaError(path, value, "Additional properties are not allowed (%s %s "
                          "unexpected)" % (", ".join(_repr(k) for k in extra), was))


def _check_array(schema, value, path, lenient):
    if "minItems" in schema and len(value) < schema["minItems"]:
        raise SchemaError(path, value, f"{_repr(value)} is too short")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        raise SchemaError(path, value, f"{_repr(value)} is too long")
    if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) \
            != len(value):
        raise SchemaError(path, value, f"{_repr(value)} has non-unique elements")
    if "items" in schema:
        for index, item in enumerate(value):
            check_schema(schema["items"], item, path + (index,), lenient)


def validate_body(req, schema):
    """Check req.body against schema; 400 with Nova's message on the first problem."""
    try:
        check_schema(schema, req.body, (), lenient=req.legacy)
    except SchemaError as e:
        if e.path:
            raise BadRequest(f"Invalid input for field/attribute {e.path[-1]}. "
                             f"Value: {format_value(e.value)}. {e.message}") from None
        raise BadRequest(e.message) from None
    return req.body


def format_value(value):
    if isinstance(value, str):
        return value
    if value is None:
        return "None"
    return repr(value)


def validate_query(req, allowed=(), strict_since=None):
    """Unknown query parameters are dropped, or 400 from strict_since on (Nova's rule)."""
    strict = strict_since is not None and req.since(strict_since) and not req.legacy
    unknown = [k for k in req.query if k not in allowed]
    if unknown and strict:
        raise BadRequest("Additional properties are not allowed (%s %s unexpected)" % (
            ", ".join(repr(k) for k in unknown), "was" if len(unknown) == 1 else "were"))
    return {k: v for k, v in req.query.items() if k in allowed}


def name_schema(max_length=255):
    return {"type": "string", "minLength": 1, "maxLength": max_length, "format": "name"}


def int_or_digits(minimum, maximum=2147483647, negative=False):
    """Nova's 'integer or numeric string' parameter type."""
    return {"type": ["integer", "string"], "minimum": minimum, "maximum": maximum,
            "pattern": r"^-?[0-9]+$" if negative else r"^[0-9]+$"}


def to_int_field(name, value, minimum, maximum=2147483647):
    """An int from an integer or numeric string, range-checked like Nova's validate_integer."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise BadRequest(f"{name} must be an integer.") from None
    if number < minimum:
        raise BadRequest(f"{name} must be >= {minimum}")
    if number > maximum:
        raise BadRequest(f"{name} must be <= {maximum}")
    return number


# § 7 identity and policy ---------------------------------------------------

IMPLIED_ROLES = {"admin": ("manager", "member", "reader"), "manager": ("member", "reader"),
                 "member": ("reader",)}


class Identity:
    """Who is calling: user, project and effective roles (implied roles included)."""

    def __init__(self, user_id, project_id, roles, user_name=None, project_name=None,
                 expires=None, token=None):
        effective = set(roles)
        for role in list(effective):
            effective.update(IMPLIED_ROLES.get(role, ()))
        self.user_id, self.project_id = user_id, project_id
        self.user_name, self.project_name = user_name or user_id, project_name or project_id
        self.roles = effective
        self.expires = expires
        self.token = token

    @property
    def is_admin(self):
        return "admin" in self.roles


class NoAuth:
    """--auth noauth: the token names the caller (user:project), as Nova's noauth2."""

    def __init__(self, default_identity):
        self.default_user, self.default_project = default_identity.split(":", 1)

    def identify(self, token):
        if token is None:
            raise Unauthorized()
        user, sep, project = token.partition(":")
        if not (sep and user and project):
            user, project = self.default_user, self.default_project
        roles = ["admin", "member", "reader"] if user == "admin" else ["member", "reader"]
        return Identity(user, project, roles)

    def www_authenticate(self):
        return None

    def project_exists(self, project_id):
        return True


class KeystoneAuth:
    """--auth keystone: validate X-Auth-Token against Keystone v3 with a service token."""

    def __init__(self, conf, clock):
        self.url = conf["keystone_url"].rstrip("/")
        if not self.url.endswith("/v3"):
            self.url += "/v3"
        self.conf = conf
        self.clock = clock
        self.cache = collections.OrderedDict()   # sha256(token) -> Identity
        self.cache_size = conf["token_cache_size"]
        self.known_projects = {}                  # project id -> when Keystone confirmed it
        self.lock = threading.Lock()
        self.service_token = None
        self.service_expires = None
        self.context = None
        if conf.get("keystone_cafile"):
            self.context = ssl.create_default_context(cafile=conf["keystone_cafile"])

    def www_authenticate(self):
        return 'Keystone uri="%s"' % self.url.rsplit("/v3", 1)[0]

    # -- HTTP ---------------------------------------------------------------
    def _call(self, method, path, headers, body=None):
        data = json_bytes(body) if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        for key, value in headers.items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.context) as resp:
                return resp.status, resp.headers, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            e.read()
            return e.code, e.headers, None
        except (OSError, ValueError) as e:
            LOG.error("Keystone at %s is unreachable: %s", self.url, e)
            raise Unavailable("The identity service is unreachable.") from None

    def _get_service_token(self, force=False):
        with self.lock:
            now = self.clock.now()
            if not force and self.service_token and self.service_expires \
                    and self.service_expires - now > datetime.timedelta(seconds=60):
                return self.service_token
            body = {"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": self.conf["keystone_username"],
                    "domain": {"name": self.conf["keystone_user_domain"]},
                    "password": self.conf["keystone_password"]}}},
                "scope": {"project": {"name": self.conf["keystone_project"],
                                      "domain": {"name": self.conf["keystone_project_domain"]}}}}}
            status, headers, doc = self._call("POST", "/auth/tokens?nocatalog", {}, body)
            if status != 201 or not headers.get("X-Subject-Token"):
                LOG.error("Keystone refused minivan's service user %r (HTTP %s): check "
                          "--keystone-username and the password", self.conf["keystone_username"],
                          status)
                raise Unavailable("minivan cannot authenticate to the identity service.")
            self.service_token = headers["X-Subject-Token"]
            self.service_expires = parse_keystone_time(doc["token"]["expires_at"])
            return self.service_token

    def _service_call(self, method, path, extra=None):
        """A Keystone call with the service token, re-acquired once if rejected."""
        for attempt in (0, 1):
            headers = {"X-Auth-Token": self._get_service_token(force=attempt == 1)}
            headers.update(extra or {})
            status, resp_headers, doc = self._call(method, path, headers)
            if status != 401:
                return status, doc
        return status, doc

    # -- tokens -----------------------------------------------------------------
    def identify(self, token):
        if not token:
            raise Unauthorized()
        key = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
        now = self.clock.now()
        with self.lock:
            ident = self.cache.get(key)
            if ident is not None:
                if ident.expires and ident.expires > now:
                    self.cache.move_to_end(key)
                    return ident
                del self.cache[key]
        ident = self._validate(token)
        with self.lock:
            self.cache[key] = ident
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return ident

    def _validate(self, token):
        if len(token) > 8192 or not token.isprintable():
            raise Unauthorized()
        status, doc = self._service_call("GET", "/auth/tokens?nocatalog",
                                         {"X-Subject-Token": token})
        if status != 200 or not isinstance(doc, dict) or "token" not in doc:
            if status not in (401, 403, 404):
                LOG.error("Keystone answered %s to a token validation", status)
                raise Unavailable("The identity service failed to validate the token.")
            raise Unauthorized()
        info = doc["token"]
        project = info.get("project") or {}
        if not project.get("id"):
            raise Unauthorized("minivan needs a project-scoped token.")
        expires = parse_keystone_time(info.get("expires_at"))
        if expires and expires <= self.clock.now():
            raise Unauthorized()
        roles = [r.get("name", "").lower() for r in info.get("roles", [])]
        user = info.get("user") or {}
        return Identity(user.get("id"), project["id"], roles, user.get("name"),
                        project.get("name"), expires=expires, token=token)

    def project_exists(self, project_id):
        """False only when Keystone says the project does not exist (known ones are cached)."""
        if not re.match(r"^[A-Za-z0-9_-]{1,64}$", project_id or ""):
            return False
        now = self.clock.now()
        with self.lock:
            seen = self.known_projects.get(project_id)
        if seen and now - seen < PROJECT_CACHE_TIME:
            return True
        status, _ = self._service_call("GET", "/projects/" + urllib.parse.quote(project_id))
        if status == 404:
            return False
        with self.lock:
            if len(self.known_projects) >= self.cache_size:
                self.known_projects.clear()
            self.known_projects[project_id] = now
        return True


PROJECT_CACHE_TIME = datetime.timedelta(minutes=10)


def parse_keystone_time(text):
    if not text:
        return None
    text = text.rstrip("Z").split("+")[0]
    for fmt in ("%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S"):
        try:
            return datetime.datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


# Nova's default policy personas.  A route names one; handlers name the target.
def policy_allows(ident, persona, project_id=None, user_id=None):
    if persona in ("any", "none"):
        return True
    if ident.is_admin:
        return True
    if persona == "admin":
        return False
    if persona == "service":
        return "service" in ident.roles
    if persona == "owner":
        return user_id is None or user_id == ident.user_id
    role = {"reader": "reader", "member": "member", "manager": "manager"}[persona]
    return role in ident.roles and (project_id is None or project_id == ident.project_id)


def authorize(req, rule, persona, project_id=None, user_id=None):
    """403 with Nova's message unless the caller passes persona for this target."""
    if not policy_allows(req.ident, persona, project_id, user_id):
        raise Forbidden(f"Policy doesn't allow {rule} to be performed.")


# § 8 hypervisor driver -----------------------------------------------------
#
# libvirt is imported here and nowhere else, so the API runs (and its tests
# run) where libvirt-python is missing; the driver says how to install it.

LIBVIRT_HINT = ("libvirt-python is not installed: on Debian/Ubuntu run "
                "'apt install python3-libvirt' (or 'pip install libvirt-python' "
                "with libvirt-dev and pkg-config present)")


def import_libvirt():
    try:
        import libvirt  # noqa: PLC0415 - only the driver touches libvirt
    except ImportError:
        raise ConfigError(LIBVIRT_HINT) from None
    libvirt.registerErrorHandler(lambda ctx, err: None, None)
    return libvirt


def detect_virt_type(cpuinfo="/proc/cpuinfo", kvm_device="/dev/kvm"):
    """kvm where the CPU has vmx/svm and /dev/kvm opens, else qemu (software emulation)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = re.findall(r"^flags\s*:(.*)$", f.read(), re.M)
        hardware = any({"vmx", "svm"} & set(line.split()) for line in flags)
        if hardware:
            os.close(os.open(kvm_device, os.O_RDWR))
            return "kvm"
    except OSError:
        pass
    return "qemu"


class LibvirtDriver:
    """Nova's ComputeDriver vocabulary over one libvirt connection."""

    def __init__(self, uri, virt_type=""):
        self.uri = uri
        self.virt_type = virt_type or detect_virt_type()
        self.libvirt = import_libvirt()
        self.conn = None
        self.lock = threading.Lock()
        self.last_error = None

    def connect(self):
        """Open the connection if it is closed; True when usable."""
        with self.lock:
            if self.conn is not None:
                try:
                    if self.conn.isAlive():
                        return True
                except self.libvirt.libvirtError:
                    pass
                self.conn = None
            try:
                self.conn = self.libvirt.open(self.uri)
                self.last_error = None
                LOG.info("connected to libvirt at %s (%s, guests as %s)", self.uri,
                         self.conn.getType(), self.virt_type)
                return True
            except self.libvirt.libvirtError as e:
                if self.last_error != str(e):
                    LOG.error("libvirt at %s is unreachable: %s", self.uri, e)
                self.last_error = str(e)
                return False

    @property
    def available(self):
        return self.conn is not None

    def close(self):
        with self.lock:
            if self.conn is not None:
                try:
                    self.conn.close()
                except self.libvirt.libvirtError:
                    pass
                self.conn = None


# § 9 quotas ----------------------------------------------------------------

QUOTA_DEFAULTS = collections.OrderedDict([
    ("instances", 10), ("cores", 20), ("ram", 51200), ("floating_ips", -1),
    ("fixed_ips", -1), ("metadata_items", 128), ("injected_files", 5),
    ("injected_file_content_bytes", 10240), ("injected_file_path_bytes", 255),
    ("key_pairs", 100), ("security_groups", -1), ("security_group_rules", -1),
    ("server_groups", 10), ("server_group_members", 10),
])
NETWORK_QUOTAS = ("floating_ips", "fixed_ips", "security_groups", "security_group_rules")
FILE_QUOTAS = ("injected_files", "injected_file_content_bytes", "injected_file_path_bytes")


def quota_keys(version, classes=False):
    """The quota resources a response carries at this microversion."""
    keys = list(QUOTA_DEFAULTS)
    if version >= (2, 36) or (classes and version >= (2, 50)):
        keys = [k for k in keys if k not in NETWORK_QUOTAS]
    if version >= (2, 57):
        keys = [k for k in keys if k not in FILE_QUOTAS]
    if classes and version < (2, 50):
        keys = [k for k in keys if k not in ("server_groups", "server_group_members")]
    return keys


def class_limits(data, name="default"):
    """Limits of a quota class: the defaults overridden by what was set on it."""
    limits = dict(QUOTA_DEFAULTS)
    if name == "default":
        limits.update(data["quota_classes"].get("default", {}))
    else:
        limits.update(data["quota_classes"].get("default", {}))
        limits.update(data["quota_classes"].get(name, {}))
    return limits


def project_limits(data, project_id, user_id=None):
    limits = class_limits(data)
    limits.update(data["quotas"].get(project_id, {}))
    if user_id is not None:
        limits.update(data["user_quotas"].get(project_id, {}).get(user_id, {}))
    return limits


def usage(data, project_id, user_id=None):
    """Live counts of what a project (or one of its users) holds."""
    used = {k: 0 for k in QUOTA_DEFAULTS}
    for server in data["servers"].values():
        if server.get("project_id") != project_id or server.get("vm_state") == "deleted":
            continue
        if user_id is not None and server.get("user_id") != user_id:
            continue
        used["instances"] += 1
        used["cores"] += server.get("flavor", {}).get("vcpus", 0)
        used["ram"] += server.get("flavor", {}).get("ram", 0)
    for group in data["server_groups"].values():
        if group.get("project_id") == project_id and (
                user_id is None or group.get("user_id") == user_id):
            used["server_groups"] += 1
    if user_id is not None:
        used["key_pairs"] = len(data["keypairs"].get(user_id, {}))
    return used


# § 10 views ----------------------------------------------------------------

class Request:
    """One API call as handlers see it: caller, microversion, body, query, links."""

    def __init__(self, app, method, path, query_pairs, headers, body=None):
        self.app = app
        self.method, self.path = method, path
        self.query_pairs = query_pairs
        self.query = {}
        for key, value in query_pairs:
            self.query.setdefault(key, []).append(value)
        self.headers = headers
        self.body = body
        self.ident = None
        self.version = MIN_VERSION
        self.legacy = False
        self.base_url = ""
        self.project_in_url = None
        self.params = {}
        self.request_id = new_request_id()

    @property
    def store(self):
        return self.app.store

    def since(self, version):
        if isinstance(version, str):
            version = parse_version(version)
        return self.version >= version

    def q(self, name, default=None):
        """Last value of a query parameter."""
        values = self.query.get(name)
        return values[-1] if values else default

    # -- links ---------------------------------------------------------------
    def _prefix(self):
        return "/" + self.project_in_url if self.project_in_url else ""

    def self_link(self, *parts):
        root = "/v2" if self.legacy else "/v2.1"
        return self.base_url + root + self._prefix() + "/" + "/".join(parts)

    def bookmark_link(self, *parts):
        return self.base_url + self._prefix() + "/" + "/".join(parts)

    def links(self, *parts):
        return [{"rel": "self", "href": self.self_link(*parts)},
                {"rel": "bookmark", "href": self.bookmark_link(*parts)}]

    def next_link(self, collection, marker):
        pairs = [(k, v) for k, v in self.query_pairs if k != "marker"] + [("marker", marker)]
        return [{"rel": "next",
                 "href": self.self_link(collection) + "?" + urllib.parse.urlencode(pairs)}]


def limit_param(req):
    """Nova's limit: int >= 0; 0 or above max_limit means max_limit."""
    max_limit = req.app.conf["max_limit"]
    text = req.q("limit")
    if text is None:
        return max_limit, False
    try:
        limit = int(text)
    except ValueError:
        raise BadRequest("limit param must be an integer") from None
    if limit < 0:
        raise BadRequest("limit param must be positive")
    return (min(limit, max_limit) if limit else max_limit), True


def paginate(req, items, key, marker_message="marker [%s] not found"):
    """(page, next-link list or None) for items sorted as the client will see them."""
    limit, _ = limit_param(req)
    marker = req.q("marker")
    if marker is not None:
        for index, item in enumerate(items):
            if key(item) == marker:
                items = items[index + 1:]
                break
        else:
            raise BadRequest(marker_message % marker)
    page = items[:limit]
    more = len(page) == limit and limit > 0
    return page, (key(page[-1]) if more and page else None)


# § 11 API: versions and extensions --------------------------------------------

V20_UPDATED = "2025-07-04T12:00:00Z"
V21_UPDATED = "2013-07-23T11:33:21Z"


def version_entry(base, which, full):
    """The v2.0 or v2.1 object of the version documents."""
    legacy = which == "v2.0"
    doc = {"id": which, "status": "DEPRECATED" if legacy else "CURRENT",
           "version": "" if legacy else version_text(MAX_VERSION),
           "min_version": "" if legacy else version_text(MIN_VERSION),
           "updated": V20_UPDATED if legacy else V21_UPDATED,
           "links": [{"rel": "self", "href": base + ("/v2/" if legacy else "/v2.1/")}]}
    if full:
        doc["links"].append({"rel": "describedby", "type": "text/html",
                             "href": "http://docs.openstack.org/"})
        doc["media-types"] = [{"base": "application/json",
                               "type": "application/vnd.openstack.compute+json;version=%s"
                               % ("2" if legacy else "2.1")}]
    return doc


def versions_root(base):
    """GET /  (no auth)"""
    return {"versions": [version_entry(base, "v2.0", False), version_entry(base, "v2.1", False)]}


def versions_choices(base, path):
    """GET /<anything else>: 300 Multiple Choices."""
    choices = []
    for which, root in (("v2.0", "/v2"), ("v2.1", "/v2.1")):
        entry = version_entry(base, which, True)
        choices.append({"id": which, "status": entry["status"],
                        "links": [{"rel": "self", "href": base + root + path}],
                        "media-types": entry["media-types"]})
    return {"choices": choices}


def versions_project(req):
    """GET /{project_id}/ : the version document, authenticated."""
    return 200, {"version": version_entry(req.base_url, "v2.0" if req.legacy else "v2.1", True)}


def versions_show(req):
    """GET /versions/{id}"""
    which = req.params["id"]
    if which not in ("v2.0", "v2.1"):
        raise NotFound("Version %s could not be found." % which)
    return 200, {"version": version_entry(req.base_url, which, True)}


# The legacy extension list (GET /extensions), as Nova 34.0.0 reports it:
# alias | name | description, with \n for a line break.
EXTENSION_TABLE = r"""
NMN|Multinic|Multiple network support.
OS-DCF|DiskConfig|Disk Management Extension.
OS-EXT-AZ|ExtendedAvailabilityZone|Extended Availability Zone support.
OS-EXT-IMG-SIZE|ImageSize|Adds image size to image listings.
OS-EXT-IPS|ExtendedIps|Adds type parameter to the ip list.
OS-EXT-IPS-MAC|ExtendedIpsMac|Adds mac address parameter to the ip list.
OS-EXT-SRV-ATTR|ExtendedServerAttributes|Extended Server Attributes support.
OS-EXT-STS|ExtendedStatus|Extended Status support.
OS-FLV-DISABLED|FlavorDisabled|Support to show the disabled status of a flavor.
OS-FLV-EXT-DATA|FlavorExtraData|Provide additional data for flavors.
OS-SCH-HNT|SchedulerHints|Pass arbitrary key/value pairs to the scheduler.
OS-SRV-USG|ServerUsage|Adds launched_at and terminated_at on Servers.
os-access-ips|AccessIPs|Access IPs support.
os-admin-actions|AdminActions|Enable admin-only server actions\n\n    Actions include: resetNetwork, injectNetworkInfo, os-resetState\n    
os-admin-password|AdminPassword|Admin password management support.
os-agents|Agents|Agents support.
os-aggregates|Aggregates|Admin-only aggregate administration.
os-assisted-volume-snapshots|AssistedVolumeSnapshots|Assisted volume snapshots.
os-attach-interfaces|AttachInterfaces|Attach interface support.
os-availability-zone|AvailabilityZone|1. Add availability_zone to the Create Server API.\n       2. Add availability zones describing.\n    
os-baremetal-ext-status|BareMetalExtStatus|Add extended status in Baremetal Nodes v2 API.
os-baremetal-nodes|BareMetalNodes|Admin-only bare-metal node administration.
os-block-device-mapping|BlockDeviceMapping|Block device mapping boot support.
os-block-device-mapping-v2-boot|BlockDeviceMappingV2Boot|Allow boot with the new BDM data format.
os-cell-capacities|CellCapacities|Adding functionality to get cell capacities.
os-cells|Cells|Enables cells-related functionality such as adding neighbor cells,\n    listing neighbor cells, and getting the capabilities of the local cell.\n    
os-certificates|Certificates|Certificates support.
os-cloudpipe|Cloudpipe|Adds actions to create cloudpipe instances.\n\n    When running with the Vlan network mode, you need a mechanism to route\n    from the public Internet to your vlans.  This mechanism is known as a\n    cloudpipe.\n\n    At the time of creating this class, only OpenVPN is supported.  Support for\n    a SSH Bastion host is forthcoming.\n    
os-cloudpipe-update|CloudpipeUpdate|Adds the ability to set the vpn ip/port for cloudpipe instances.
os-config-drive|ConfigDrive|Config Drive Extension.
os-console-auth-tokens|ConsoleAuthTokens|Console token authentication support.
os-console-output|ConsoleOutput|Console log output support, with tailing ability.
os-consoles|Consoles|Interactive Console support.
os-create-backup|CreateBackup|Create a backup of a server.
os-create-server-ext|Createserverext|Extended support to the Create Server v1.1 API.
os-deferred-delete|DeferredDelete|Instance deferred delete.
os-evacuate|Evacuate|Enables server evacuation.
os-extended-evacuate-find-host|ExtendedEvacuateFindHost|Enables server evacuation without target host. Scheduler will select one to target.
os-extended-floating-ips|ExtendedFloatingIps|Adds optional fixed_address to the add floating IP command.
os-extended-hypervisors|ExtendedHypervisors|Extended hypervisors support.
os-extended-networks|ExtendedNetworks|Adds additional fields to networks.
os-extended-quotas|ExtendedQuotas|Adds ability for admins to delete quota and optionally force the update Quota command.
os-extended-rescue-with-image|ExtendedRescueWithImage|Allow the user to specify the image to use for rescue.
os-extended-services|ExtendedServices|Extended services support.
os-extended-services-delete|ExtendedServicesDelete|Extended services deletion support.
os-extended-status|ExtendedStatus|Extended Status support.
os-extended-volumes|ExtendedVolumes|Extended Volumes support.
os-fixed-ips|FixedIPs|Fixed IPs support.
os-flavor-access|FlavorAccess|Flavor access support.
os-flavor-extra-specs|FlavorExtraSpecs|Flavors extra specs support.
os-flavor-manage|FlavorManage|Flavor create/delete API support.
os-flavor-rxtx|FlavorRxtx|Support to show the rxtx status of a flavor.
os-flavor-swap|FlavorSwap|Support to show the swap status of a flavor.
os-floating-ip-dns|FloatingIpDns|Floating IP DNS support.
os-floating-ip-pools|FloatingIpPools|Floating IPs support.
os-floating-ips|FloatingIps|Floating IPs support.
os-floating-ips-bulk|FloatingIpsBulk|Bulk handling of Floating IPs.
os-fping|Fping|Fping Management Extension.
os-hide-server-addresses|HideServerAddresses|Support hiding server addresses in certain states.
os-hosts|Hosts|Admin-only host administration.
os-hypervisor-status|HypervisorStatus|Show hypervisor status.
os-hypervisors|Hypervisors|Admin-only hypervisor administration.
os-instance-actions|InstanceActions|View a log of actions and events taken on an instance.
os-instance_usage_audit_log|OSInstanceUsageAuditLog|Admin-only Task Log Monitoring.
os-keypairs|Keypairs|Keypair Support.
os-lock-server|LockServer|Enable lock/unlock server actions.
os-migrate-server|MigrateServer|Enable migrate and live-migrate server actions.
os-migrations|Migrations|Provide data on migrations.
os-multiple-create|MultipleCreate|Allow multiple create in the Create Server v2.1 API.
os-networks|Networks|Admin-only Network Management Extension.
os-networks-associate|NetworkAssociationSupport|Network association support.
os-pause-server|PauseServer|Enable pause/unpause server actions.
os-personality|Personality|Personality support.
os-preserve-ephemeral-rebuild|PreserveEphemeralOnRebuild|Allow preservation of the ephemeral partition on rebuild.
os-quota-class-sets|QuotaClasses|Quota classes management support.
os-quota-sets|Quotas|Quotas management support.
os-rescue|Rescue|Instance rescue mode.
os-security-group-default-rules|SecurityGroupDefaultRules|Default rules for security group support.
os-security-groups|SecurityGroups|Security group support.
os-server-diagnostics|ServerDiagnostics|Allow Admins to view server diagnostics through server action.
os-server-external-events|ServerExternalEvents|Server External Event Triggers.
os-server-group-quotas|ServerGroupQuotas|Adds quota support to server groups.
os-server-groups|ServerGroups|Server group support.
os-server-list-multi-status|ServerListMultiStatus|Allow to filter the servers by a set of status values.
os-server-password|ServerPassword|Server password support.
os-server-sort-keys|ServerSortKeys|Add sorting support in get Server v2 API.
os-server-start-stop|ServerStartStop|Start/Stop instance compute API support.
os-services|Services|Services support.
os-shelve|Shelve|Instance shelve mode.
os-simple-tenant-usage|SimpleTenantUsage|Simple tenant usage extension.
os-suspend-server|SuspendServer|Enable suspend/resume server actions.
os-tenant-networks|OSTenantNetworks|Tenant-based Network Management Extension.
os-used-limits|UsedLimits|Provide data on limited resources that are being used.
os-used-limits-for-admin|UsedLimitsForAdmin|Provide data to admin on limited resources used by other tenants.
os-user-data|UserData|Add user_data to the Create Server API.
os-user-quotas|UserQuotas|Project user quota support.
os-virtual-interfaces|VirtualInterfaces|Virtual interface support.
os-volume-attachment-update|VolumeAttachmentUpdate|Support for updating a volume attachment.
os-volumes|Volumes|Volumes support.
"""
EXTENSION_UPDATED = "2014-12-03T00:00:00Z"
EXTENSION_NAMESPACE = "http://docs.openstack.org/compute/ext/fake_xml"


def extension_view(line):
    alias, name, description = line.split("|", 2)
    description = description.replace("\\n", "\n")
    return {"alias": alias, "description": description, "links": [], "name": name,
            "namespace": EXTENSION_NAMESPACE, "updated": EXTENSION_UPDATED}


EXTENSIONS = [extension_view(line) for line in EXTENSION_TABLE.strip().splitlines()]


def extensions_index(req):
    """GET /extensions"""
    validate_query(req, (), strict_since="2.102")
    return 200, {"extensions": EXTENSIONS}


def extensions_show(req):
    """GET /extensions/{id}"""
    validate_query(req, (), strict_since="2.102")
    for extension in EXTENSIONS:
        if extension["alias"] == req.params["id"]:
            return 200, {"extension": extension}
    raise NotFound("Extension %s could not be found." % req.params["id"])


# § 12 API: flavors, extra specs, flavor access -------------------------------

BUILTIN_FLAVORS = [
    # id, name, ram MB, vcpus, disk GB
    ("1", "m1.tiny", 512, 1, 1), ("2", "m1.small", 2048, 1, 20),
    ("3", "m1.medium", 4096, 2, 40), ("4", "m1.large", 8192, 4, 80),
    ("5", "m1.xlarge", 16384, 8, 160), ("100", "small", 1024, 1, 10),
    ("200", "big", 4096, 2, 20),
]
FLAVOR_SORT_KEYS = {
    "flavorid": "id", "id": "seq", "name": "name", "memory_mb": "ram", "root_gb": "disk",
    "ephemeral_gb": "ephemeral", "swap": "swap", "vcpus": "vcpus", "rxtx_factor": "rxtx_factor",
    "is_public": "is_public", "disabled": "disabled", "created_at": "created_at",
    "updated_at": "created_at", "description": "description", "vcpu_weight": "seq",
}
FLAVOR_ID_PATTERN = r"^(?! )[a-zA-Z0-9. _-]+(?<! )$"
DESCRIPTION_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"


def make_flavor(seq, flavorid, name, ram, vcpus, disk, ephemeral=0, swap=0, rxtx_factor=1.0,
                is_public=True, description=None, extra_specs=None, created_at=None):
    return {"id": str(flavorid), "seq": seq, "name": name, "ram": ram, "vcpus": vcpus,
            "disk": disk, "ephemeral": ephemeral, "swap": swap,
            "rxtx_factor": float(rxtx_factor), "is_public": bool(is_public), "disabled": False,
            "description": description, "extra_specs": dict(extra_specs or {}),
            "created_at": created_at or isotime_us(Clock().now())}


def seed_flavors(path):
    """Flavors for a fresh state: a JSON file (list of objects), else the built-in set."""
    if not path:
        beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flavors.json")
        path = beside if os.path.exists(beside) else ""
    if not path:
        return [make_flavor(i, *row) for i, row in enumerate(BUILTIN_FLAVORS, 1)]
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)
        flavors = []
        for i, row in enumerate(rows, 1):
            flavors.append(make_flavor(
                i, str(row["id"]), row["name"], int(row["ram"]), int(row["vcpus"]),
                int(row["disk"]), int(row.get("ephemeral", 0)), int(row.get("swap", 0)),
                float(row.get("rxtx_factor", 1.0)), bool(row.get("is_public", True)),
                row.get("description"), row.get("extra_specs")))
        return flavors
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot load flavors from {path}: {e}") from None


def flavor_visible(req, flavor):
    if flavor["is_public"] or req.ident.is_admin:
        return True
    return req.ident.project_id in req.store.data["flavor_access"].get(flavor["id"], [])


def find_flavor(req, flavor_id):
    flavor = req.store.data["flavors"].get(flavor_id)
    if flavor is None or not flavor_visible(req, flavor):
        raise NotFound(f"Flavor {flavor_id} could not be found.")
    return flavor


def flavor_view(req, flavor, detail=True):
    """One flavor as the microversion of req shows it."""
    if not detail:
        view = {"id": flavor["id"], "links": req.links("flavors", flavor["id"]),
                "name": flavor["name"]}
        if req.since("2.55"):
            view["description"] = flavor["description"]
        return view
    view = {"id": flavor["id"], "name": flavor["name"], "ram": flavor["ram"],
            "disk": flavor["disk"],
            "swap": flavor["swap"] if (flavor["swap"] or req.since("2.75")) else "",
            "OS-FLV-EXT-DATA:ephemeral": flavor["ephemeral"]}
    if not req.since("2.102"):
        view["OS-FLV-DISABLED:disabled"] = flavor["disabled"]
    view["vcpus"] = flavor["vcpus"]
    view["os-flavor-access:is_public"] = flavor["is_public"]
    if not req.since("2.102"):
        view["rxtx_factor"] = flavor["rxtx_factor"]
    view["links"] = req.links("flavors", flavor["id"])
    if req.since("2.55"):
        view["description"] = flavor["description"]
    if req.since("2.61") and policy_allows(req.ident, "reader", req.ident.project_id):
        view["extra_specs"] = dict(flavor["extra_specs"])
    return view


def flavor_list(req, detail):
    allowed = ["limit", "marker", "is_public", "minRam", "minDisk", "sort_key", "sort_dir"]
    if req.since("2.102"):
        allowed.append("name")
    query = validate_query(req, allowed, strict_since="2.75")
    if not req.since("2.102") and "rxtx_factor" in req.query:
        query["rxtx_factor"] = req.query["rxtx_factor"]
    want_public = True
    if req.ident.is_admin and "is_public" in query:
        text = query["is_public"][-1]
        if text.strip().lower() == "none":
            want_public = None
        else:
            try:
                want_public = bool_from_string(text, strict=True)
            except ValueError:
                raise BadRequest(f"Invalid is_public filter [{text}]") from None
    minimum = {}
    for param, field in (("minRam", "ram"), ("minDisk", "disk")):
        if param in query:
            try:
                minimum[field] = int(query[param][-1])
            except ValueError:
                raise BadRequest(f"Invalid {param} filter [{query[param][-1]}]") from None
    sort_key = (query.get("sort_key") or ["flavorid"])[-1]
    sort_dir = (query.get("sort_dir") or ["asc"])[-1]
    if sort_key not in FLAVOR_SORT_KEYS:
        raise BadRequest(f"Invalid sort_key: {sort_key}")
    if sort_dir not in ("asc", "desc"):
        raise BadRequest(f"Invalid sort_dir: {sort_dir}")
    name = query.get("name", [None])[-1]
    project = req.ident.project_id
    with req.store.reading():
        access = req.store.data["flavor_access"]
        flavors = []
        for f in req.store.data["flavors"].values():
            if want_public is not None and f["is_public"] != want_public and not (
                    want_public and project in access.get(f["id"], [])):
                continue
            if any(f[field] < value for field, value in minimum.items()):
                continue
            if name is not None and f["name"] != name:
                continue
            flavors.append(f)
    field = FLAVOR_SORT_KEYS[sort_key]
    flavors.sort(key=lambda f: (f[field] is None, f[field] if f[field] is not None else 0,
                                f["id"]), reverse=sort_dir == "desc")
    page, marker = paginate(req, flavors, lambda f: f["id"])
    body = {"flavors": [flavor_view(req, f, detail) for f in page]}
    if marker is not None:
        body["flavors_links"] = req.next_link("flavors/detail" if detail else "flavors", marker)
    return 200, body


def flavors_index(req):
    """GET /flavors"""
    return flavor_list(req, detail=False)


def flavors_detail(req):
    """GET /flavors/detail"""
    return flavor_list(req, detail=True)


def flavors_show(req):
    """GET /flavors/{id}"""
    validate_query(req, (), strict_since="2.102")
    return 200, {"flavor": flavor_view(req, find_flavor(req, req.params["id"]))}


def flavor_create_schema(req):
    props = {
        "name": name_schema() if not req.legacy else {"type": "string", "minLength": 1,
                                                      "maxLength": 255},
        "id": {"type": ["string", "number", "null"], "minLength": 1, "maxLength": 255,
               "pattern": FLAVOR_ID_PATTERN},
        "ram": int_or_digits(1), "vcpus": int_or_digits(1), "disk": int_or_digits(0),
        "OS-FLV-EXT-DATA:ephemeral": int_or_digits(0), "swap": int_or_digits(0),
        "os-flavor-access:is_public": {"type": ["boolean", "string"], "enum": BOOLEAN_STRINGS},
    }
    if not req.since("2.102"):
        props["rxtx_factor"] = {"type": ["number", "string"], "minimum": 0,
                                "exclusiveMinimum": True, "maximum": 3.40282e+38,
                                "pattern": r"^[0-9]+(\.[0-9]+)?$"}
    if req.since("2.55"):
        props["description"] = {"type": ["string", "null"], "minLength": 0,
                                "maxLength": 65535, "pattern": DESCRIPTION_PATTERN}
    return {"type": "object", "additionalProperties": False, "required": ["flavor"],
            "properties": {"flavor": {"type": "object", "additionalProperties": False,
                                      "required": ["name", "ram", "vcpus", "disk"],
                                      "properties": props}}}


def flavors_create(req):
    """POST /flavors"""
    spec = validate_body(req, flavor_create_schema(req))["flavor"]
    name = spec["name"].strip()
    flavorid = spec.get("id")
    flavorid = str(uuid.uuid4()) if flavorid is None else str(flavorid).strip()
    if not re.match(FLAVOR_ID_PATTERN, flavorid):
        raise BadRequest("Invalid input received: id must be 1-255 letters, digits, "
                         "'.', '_', '-' or spaces (not at either end)")
    sizes = {}
    for field, key, minimum in (("memory_mb", "ram", 1), ("vcpus", "vcpus", 1),
                                ("root_gb", "disk", 0),
                                ("ephemeral_gb", "OS-FLV-EXT-DATA:ephemeral", 0),
                                ("swap", "swap", 0)):
        try:
            sizes[field] = to_int_field(field, spec.get(key, 0), minimum)
        except BadRequest as e:
            raise BadRequest("Invalid input received: " + e.message) from None
    rxtx = float(spec.get("rxtx_factor", 1.0))
    if rxtx <= 0 or rxtx > 3.40282e+38:
        raise BadRequest("Invalid input received: rxtx_factor must be > 0 and <= 3.40282e+38")
    is_public = bool_from_string(spec.get("os-flavor-access:is_public", True))

    def plan(data):
        if flavorid in data["flavors"]:
            raise Conflict(f"Flavor with ID {flavorid} already exists.")
        if any(f["name"] == name for f in data["flavors"].values()):
            raise Conflict(f"Flavor with name {name} already exists.")
        seq = max(data["counters"]["flavor"], len(data["flavors"])) + 1
        flavor = make_flavor(seq, flavorid, name, sizes["memory_mb"], sizes["vcpus"],
                             sizes["root_gb"], sizes["ephemeral_gb"], sizes["swap"], rxtx,
                             is_public, spec.get("description"),
                             created_at=isotime_us(req.app.clock.now()))
        return [["set", ["flavors", flavorid], flavor], ["set", ["counters", "flavor"], seq]]

    req.store.transaction(plan)
    return 200, {"flavor": flavor_view(req, req.store.data["flavors"][flavorid])}


def flavors_update(req):
    """PUT /flavors/{id}"""
    body = validate_body(req, {
        "type": "object", "additionalProperties": False, "required": ["flavor"],
        "properties": {"flavor": {
            "type": "object", "additionalProperties": False, "required": ["description"],
            "properties": {"description": {"type": ["string", "null"], "maxLength": 65535,
                                           "pattern": DESCRIPTION_PATTERN}}}}})
    flavor_id = req.params["id"]

    def plan(data):
        flavor = find_flavor(req, flavor_id)
        return [["set", ["flavors", flavor_id],
                 dict(flavor, description=body["flavor"]["description"])]]

    req.store.transaction(plan)
    return 200, {"flavor": flavor_view(req, req.store.data["flavors"][flavor_id])}


def flavors_delete(req):
    """DELETE /flavors/{id}"""
    flavor_id = req.params["id"]

    def plan(data):
        find_flavor(req, flavor_id)
        return [["del", ["flavors", flavor_id]], ["del", ["flavor_access", flavor_id]]]

    req.store.transaction(plan)
    return 202, None


def flavor_access_body(flavor_id, projects):
    return {"flavor_access": [{"flavor_id": flavor_id, "tenant_id": p} for p in projects]}


def flavor_access_index(req):
    """GET /flavors/{flavor_id}/os-flavor-access"""
    validate_query(req, (), strict_since="2.102")
    flavor = find_flavor(req, req.params["flavor_id"])
    if flavor["is_public"]:
        raise NotFound("Access list not available for public flavors.")
    projects = req.store.data["flavor_access"].get(flavor["id"], [])
    return 200, flavor_access_body(flavor["id"], projects)


def tenant_access_schema(action):
    return {"type": "object", "additionalProperties": False, "required": [action],
            "properties": {action: {
                "type": "object", "additionalProperties": False, "required": ["tenant"],
                "properties": {"tenant": {"type": "string", "minLength": 1,
                                          "maxLength": 255}}}}}


def flavor_action_add_tenant_access(req):
    """POST /flavors/{id}/action addTenantAccess"""
    tenant = validate_body(req, tenant_access_schema("addTenantAccess"))["addTenantAccess"]["tenant"]
    flavor_id = req.params["id"]
    find_flavor(req, flavor_id)
    if not req.app.auth.project_exists(tenant):
        raise BadRequest(f"Project ID {tenant} is not a valid project.")

    def plan(data):
        flavor = find_flavor(req, flavor_id)
        if flavor["is_public"] and req.since("2.7"):
            raise Conflict("Can not add access to a public flavor.")
        projects = data["flavor_access"].get(flavor_id, [])
        if tenant in projects:
            raise Conflict(f"Flavor access already exists for flavor {flavor_id} and "
                           f"project {tenant} combination.")
        return [["set", ["flavor_access", flavor_id], projects + [tenant]]]

    req.store.transaction(plan)
    return 200, flavor_access_body(flavor_id, req.store.data["flavor_access"][flavor_id])


def flavor_action_remove_tenant_access(req):
    """POST /flavors/{id}/action removeTenantAccess"""
    body = validate_body(req, tenant_access_schema("removeTenantAccess"))
    tenant = body["removeTenantAccess"]["tenant"]
    flavor_id = req.params["id"]

    def plan(data):
        find_flavor(req, flavor_id)
        projects = data["flavor_access"].get(flavor_id, [])
        if tenant not in projects:
            raise NotFound(f"Flavor access not found for {flavor_id} / {tenant} combination.")
        return [["set", ["flavor_access", flavor_id], [p for p in projects if p != tenant]]]

    req.store.transaction(plan)
    return 200, flavor_access_body(flavor_id, req.store.data["flavor_access"][flavor_id])


# Extra-spec validation from 2.86: keys of a namespace Nova knows must be known
# keys with valid values; keys of other namespaces, or with none, pass.
SPEC_BOOL = ("bool",)
SPEC_INT = ("int", 0)
SPEC_POS = ("int", 1)
SPEC_STR = ("str",)
EXTRA_SPEC_RULES = [
    (r"hw:cpu_policy", ("enum", "dedicated", "shared", "mixed")),
    (r"hw:cpu_thread_policy", ("enum", "prefer", "isolate", "require")),
    (r"hw:emulator_threads_policy", ("enum", "share", "isolate")),
    (r"hw:cpu_dedicated_mask|hw:cpu_realtime_mask|hw:cpu_model|hw:cpu_model_extra_flags"
     r"|hw:pmem|hw:mem_page_size|hw:numa_cpus\.\d+|hw:tpm_version|hw:maxphysaddr_mode"
     r"|hw:ephemeral_encryption_format|hw:cpu_mode|hw:vif_model|hw:disk_bus", SPEC_STR),
    (r"hw:cpu_(max_)?(sockets|cores|threads)|hw:numa_mem\.\d+|hw:serial_port_count"
     r"|hw:maxphysaddr_bits", SPEC_INT),
    (r"hw:numa_nodes", SPEC_POS),
    (r"hw:cpu_realtime|hw:hide_hypervisor_id|hw:mem_encryption|hw:pmu|hw:boot_menu"
     r"|hw:vif_multiqueue_enabled|hw:virtio_packed_ring|hw:locked_memory"
     r"|hw:ephemeral_encryption|hw:pci_numa_affinity_policy_strict", SPEC_BOOL),
    (r"hw:watchdog_action", ("enum", "none", "pause", "poweroff", "reset", "disabled")),
    (r"hw:tpm_model", ("enum", "tpm-tis", "tpm-crb")),
    (r"hw:viommu_model", ("enum", "intel", "smmuv3", "virtio", "auto")),
    (r"hw:pci_numa_affinity_policy", ("enum", "required", "preferred", "legacy", "socket")),
    (r"hw:mem_encryption_model", ("enum", "amd-sev", "amd-sev-es")),
    (r"hw_rng:allowed", SPEC_BOOL),
    (r"hw_rng:rate_bytes|hw_rng:rate_period|hw_video:ram_max_mb", SPEC_INT),
    (r"os:secure_boot", ("enum", "required", "disabled", "optional")),
    (r"os:monitors", SPEC_STR),
    (r"quota:(cpu_shares|cpu_period|cpu_quota|cpu_limit|cpu_reservation|cpu_shares_level"
     r"|(disk|vif)_[a-z_]+|memory_[a-z_]+)", SPEC_STR),
    (r"pci_passthrough:alias|accel:device_profile", SPEC_STR),
    (r"resources[a-zA-Z0-9_-]{0,64}:[A-Z0-9_]+", SPEC_INT),
    (r"trait[a-zA-Z0-9_-]{0,64}:[A-Z0-9_]+", ("enum", "required", "forbidden")),
    (r"(aggregate_instance_extra_specs|capabilities):.+", SPEC_STR),
    (r"group_policy", ("enum", "none", "isolate")),
]
EXTRA_SPEC_NAMESPACES = r"hw|hw_rng|hw_video|os|quota|pci_passthrough|accel|powervm|vmware" \
    r"|resources[a-zA-Z0-9_-]{0,64}|trait[a-zA-Z0-9_-]{0,64}|aggregate_instance_extra_specs" \
    r"|capabilities"


def validate_extra_spec(name, value):
    for pattern, rule in EXTRA_SPEC_RULES:
        if re.fullmatch(pattern, name):
            if not extra_spec_value_ok(rule, value):
                raise BadRequest(f"Validation failed; {value!r} is not a valid value for "
                                 f"extra spec '{name}'.")
            return
    if ":" in name and re.fullmatch(EXTRA_SPEC_NAMESPACES, name.split(":", 1)[0]):
        raise BadRequest(f"Validation failed; extra spec '{name}' does not appear to be a "
                         "valid extra spec.")


def extra_spec_value_ok(rule, value):
    kind = rule[0]
    if kind == "enum":
        return value in rule[1:]
    if kind == "bool":
        return value.strip().lower() in ("1", "0", "true", "false", "t", "f", "yes", "no",
                                          "y", "n", "on", "off")
    if kind == "int":
        return re.fullmatch(r"-?\d+", value.strip() or "x") is not None \
            and int(value) >= rule[1]
    return True


EXTRA_SPEC_KEY = r"^[a-zA-Z0-9-_:. ]{1,255}$"
EXTRA_SPEC_VALUE = {"type": ["string", "number"], "maxLength": 255}


def clean_extra_specs(req, specs):
    """Numbers become strings, as Nova stores them; 2.86+ validates the keys."""
    cleaned = {}
    for key, value in specs.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if len(value) > 255:
            raise BadRequest(f"Invalid input for field/attribute {key}. Value: {value}. "
                             f"{value!r} is too long")
        if req.since("2.86"):
            validate_extra_spec(key, value)
        cleaned[key] = value
    return cleaned


def extra_specs_index(req):
    """GET /flavors/{flavor_id}/os-extra_specs"""
    validate_query(req, (), strict_since="2.102")
    flavor = find_flavor(req, req.params["flavor_id"])
    return 200, {"extra_specs": dict(flavor["extra_specs"])}


def extra_specs_create(req):
    """POST /flavors/{flavor_id}/os-extra_specs"""
    body = validate_body(req, {
        "type": "object", "additionalProperties": False, "required": ["extra_specs"],
        "properties": {"extra_specs": {"type": "object", "additionalProperties": False,
                                       "patternProperties": {EXTRA_SPEC_KEY: EXTRA_SPEC_VALUE}}}})
    specs = clean_extra_specs(req, body["extra_specs"])
    return 200, {"extra_specs": set_extra_specs(req, specs)}


def set_extra_specs(req, specs):
    flavor_id = req.params["flavor_id"]

    def plan(data):
        flavor = find_flavor(req, flavor_id)
        merged = dict(flavor["extra_specs"], **specs)
        return [["set", ["flavors", flavor_id, "extra_specs"], merged]]

    req.store.transaction(plan)
    return specs


def extra_specs_show(req):
    """GET /flavors/{flavor_id}/os-extra_specs/{id}"""
    validate_query(req, (), strict_since="2.102")
    flavor = find_flavor(req, req.params["flavor_id"])
    key = req.params["id"]
    if key not in flavor["extra_specs"]:
        raise NotFound(f"Flavor {flavor['id']} has no extra specs with key {key}.")
    return 200, {key: flavor["extra_specs"][key]}


def extra_specs_update(req):
    """PUT /flavors/{flavor_id}/os-extra_specs/{id}"""
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "patternProperties": {EXTRA_SPEC_KEY: EXTRA_SPEC_VALUE}})
    key = req.params["id"]
    if key not in body:
        raise BadRequest("Request body and URI mismatch")
    if len(body) > 1:
        raise BadRequest("Request body contains too many items")
    return 200, set_extra_specs(req, clean_extra_specs(req, body))


def extra_specs_delete(req):
    """DELETE /flavors/{flavor_id}/os-extra_specs/{id}"""
    flavor_id, key = req.params["flavor_id"], req.params["id"]

    def plan(data):
        flavor = find_flavor(req, flavor_id)
        if key not in flavor["extra_specs"]:
            raise NotFound(f"Flavor {flavor_id} has no extra specs with key {key}.")
        return [["del", ["flavors", flavor_id, "extra_specs", key]]]

    req.store.transaction(plan)
    return 200, None


# § 13 API: keypairs --------------------------------------------------------

SSH_KEY_TYPES = {
    "ssh-rsa": ("mpint", "mpint"), "ssh-dss": ("mpint", "mpint", "mpint", "mpint"),
    "ssh-ed25519": ("ed25519",), "ecdsa-sha2-nistp256": ("string", "string"),
    "ecdsa-sha2-nistp384": ("string", "string"), "ecdsa-sha2-nistp521": ("string", "string"),
    "sk-ssh-ed25519@openssh.com": ("ed25519", "string"),
    "sk-ecdsa-sha2-nistp256@openssh.com": ("string", "string", "string"),
}
INVALID_KEY = "Keypair data is invalid: failed to generate fingerprint"


def ssh_fields(blob):
    """The length-prefixed strings of an SSH wire-format blob; ValueError if malformed."""
    fields, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise ValueError("truncated")
        size = int.from_bytes(blob[offset:offset + 4], "big")
        offset += 4
        if size > len(blob) - offset:
            raise ValueError("truncated")
        fields.append(blob[offset:offset + size])
        offset += size
    return fields


def colon_hex(digest):
    return ":".join("%02x" % b for b in digest)


def ssh_fingerprint(public_key):
    """MD5 fingerprint of an OpenSSH public key line; BadRequest if it is not one."""
    parts = public_key.strip().split(None, 2)
    try:
        if len(parts) < 2 or parts[0] not in SSH_KEY_TYPES:
            raise ValueError("unknown key type")
        blob = base64.b64decode(parts[1].encode("ascii"), validate=True)
        fields = ssh_fields(blob)
        shape = SSH_KEY_TYPES[parts[0]]
        if not fields or fields[0].decode("ascii") != parts[0] or len(fields) != 1 + len(shape):
            raise ValueError("key blob does not match its type")
        if "ed25519" in shape and len(fields[1]) != 32:
            raise ValueError("bad ed25519 key")
        if parts[0] == "ssh-rsa" and (int.from_bytes(fields[2], "big") < 2 ** 511):
            raise ValueError("RSA key too small")
    except (ValueError, UnicodeError, binascii.Error):
        raise BadRequest(INVALID_KEY) from None
    return colon_hex(hashlib.md5(blob, usedforsecurity=False).digest())


def x509_fingerprint(public_key):
    """SHA1 fingerprint of a PEM certificate; BadRequest if it is not one."""
    m = re.search(r"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----",
                  public_key, re.S)
    try:
        if not m:
            raise ValueError("no certificate")
        der = base64.b64decode("".join(m.group(1).split()), validate=True)
        if len(der) < 4 or der[0] != 0x30 or der_total_length(der) != len(der):
            raise ValueError("not DER")
    except (ValueError, binascii.Error):
        raise BadRequest("Keypair data is invalid: failed to generate fingerprint") from None
    return colon_hex(hashlib.sha1(der, usedforsecurity=False).digest())


def der_total_length(der):
    first = der[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    return 2 + count + int.from_bytes(der[2:2 + count], "big")


# -- key generation (below 2.92): ssh-keygen where present, else pure Python --

def is_probable_prime(n, rounds=40):
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(rounds):
        x = pow(secrets.randbelow(n - 3) + 2, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def random_prime(bits, e=65537):
    while True:
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if candidate % e != 1 and is_probable_prime(candidate):
            return candidate


def rsa_generate(bits=2048, e=65537):
    """(n, e, d, p, q) of a fresh RSA key."""
    while True:
        p, q = random_prime(bits // 2, e), random_prime(bits // 2, e)
        n = p * q
        if p != q and n.bit_length() == bits:
            d = pow(e, -1, (p - 1) * (q - 1))
            return n, e, d, p, q


def der(tag, content):
    size = len(content)
    if size < 0x80:
        head = bytes([size])
    else:
        raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
        head = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + head + content


def der_int(value):
    return der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def der_seq(*items):
    return der(0x30, b"".join(items))


def der_oid(dotted):
    parts = [int(x) for x in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        chunk = [part & 0x7F]
        part >>= 7
        while part:
            chunk.insert(0, 0x80 | (part & 0x7F))
            part >>= 7
        body += bytes(chunk)
    return der(0x06, body)


def pem(label, data):
    text = base64.encodebytes(data).decode("ascii").replace("\n", "")
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return "-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)


def rsa_private_pem(n, e, d, p, q):
    body = der_seq(der_int(0), der_int(n), der_int(e), der_int(d), der_int(p), der_int(q),
                   der_int(d % (p - 1)), der_int(d % (q - 1)), der_int(pow(q, -1, p)))
    return pem("RSA PRIVATE KEY", body)


def ssh_string(data):
    return len(data).to_bytes(4, "big") + data


def ssh_mpint(value):
    return ssh_string(value.to_bytes(value.bit_length() // 8 + 1, "big"))


def generate_ssh_keypair():
    """(private PEM, 'ssh-rsa ... Generated-by-Nova') of a new RSA-2048 key."""
    keygen = shutil.which("ssh-keygen")
    if keygen:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "key")
            done = subprocess.run([keygen, "-q", "-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "",
                                   "-C", "Generated-by-Nova", "-f", path],
                                  capture_output=True, timeout=60, check=False)
            if done.returncode == 0:
                with open(path, encoding="ascii") as f:
                    private = f.read()
                with open(path + ".pub", encoding="ascii") as f:
                    return private, f.read().strip() + "\n"
            LOG.warning("ssh-keygen failed (%s); generating the key in Python",
                        done.stderr.decode(errors="replace").strip())
    n, e, d, p, q = rsa_generate()
    blob = ssh_string(b"ssh-rsa") + ssh_mpint(e) + ssh_mpint(n)
    public = "ssh-rsa " + base64.b64encode(blob).decode("ascii") + " Generated-by-Nova\n"
    return rsa_private_pem(n, e, d, p, q), public


def generate_x509_keypair(common_name, clock):
    """(private PEM, certificate PEM): a self-signed RSA-2048 certificate, SHA-256."""
    n, e, d, p, q = rsa_generate()
    algorithm = der_seq(der_oid("1.2.840.113549.1.1.11"), der(0x05, b""))
    name = der_seq(der(0x31, der_seq(der_oid("2.5.4.3"), der(0x0C, common_name.encode()))))
    start = clock.now()
    validity = der_seq(der(0x17, start.strftime("%y%m%d%H%M%SZ").encode()),
                       der(0x17, (start + datetime.timedelta(days=3650))
                           .strftime("%y%m%d%H%M%SZ").encode()))
    spki = der_seq(der_seq(der_oid("1.2.840.113549.1.1.1"), der(0x05, b"")),
                   der(0x03, b"\x00" + der_seq(der_int(n), der_int(e))))
    tbs = der_seq(der(0xA0, der_int(2)), der_int(secrets.randbits(63) + 1), algorithm, name,
                  validity, name, spki)
    digest_info = der_seq(der_seq(der_oid("2.16.840.1.101.3.4.2.1"), der(0x05, b"")),
                          der(0x04, hashlib.sha256(tbs).digest()))
    size = (n.bit_length() + 7) // 8
    padded = b"\x00\x01" + b"\xff" * (size - len(digest_info) - 3) + b"\x00" + digest_info
    signature = pow(int.from_bytes(padded, "big"), d, n).to_bytes(size, "big")
    cert = der_seq(tbs, algorithm, der(0x03, b"\x00" + signature))
    return rsa_private_pem(n, e, d, p, q), pem("CERTIFICATE", cert)


# -- handlers --------------------------------------------------------------

def keypair_name_schema(req):
    if req.legacy:
        return {"type": "string", "minLength": 1, "maxLength": 255}
    pattern = r"^[_\-\@\. a-zA-Z0-9]+$" if req.since("2.92") else r"^[_\- a-zA-Z0-9]+$"
    return dict(name_schema(), pattern=pattern)


def keypair_target_user(req, user_id, rule):
    """The user whose keypairs a call touches; another user's needs admin."""
    user_id = user_id or req.ident.user_id
    authorize(req, rule, "owner", user_id=user_id)
    return user_id


def keypair_view(req, kp, kind):
    """kind: 'list', 'create' or 'show' — the three shapes Nova uses."""
    view = {"name": kp["name"], "public_key": kp["public_key"], "fingerprint": kp["fingerprint"]}
    if kind != "list":
        view["user_id"] = kp["user_id"]
    if kind == "show":
        view.update({"deleted": False, "created_at": kp["created_at"], "updated_at": None,
                     "deleted_at": None, "id": kp["id"]})
    if req.since("2.2"):
        view["type"] = kp["type"]
    return view


def keypair_query(req, with_paging):
    allowed = ["user_id"] if req.since("2.10") else []
    if with_paging and req.since("2.35"):
        allowed += ["limit", "marker"]
    query = validate_query(req, allowed, strict_since="2.75")
    return query.get("user_id", [None])[-1]


def keypairs_index(req):
    """GET /os-keypairs"""
    user_id = keypair_target_user(req, keypair_query(req, True), "os_compute_api:os-keypairs:index")
    with req.store.reading():
        pairs = sorted(req.store.data["keypairs"].get(user_id, {}).values(),
                       key=lambda kp: kp["name"])
    marker = None
    if req.since("2.35"):
        pairs, marker = paginate(req, pairs, lambda kp: kp["name"],
                                 "Marker %s could not be found.")
    body = {"keypairs": [{"keypair": keypair_view(req, kp, "list")} for kp in pairs]}
    if marker is not None:
        body["keypairs_links"] = req.next_link("os-keypairs", marker)
    return 200, body


def keypairs_create(req):
    """POST /os-keypairs"""
    props = {"name": keypair_name_schema(req), "public_key": {"type": "string"}}
    if req.since("2.2"):
        props["type"] = {"type": "string", "enum": ["ssh", "x509"]}
    if req.since("2.10"):
        props["user_id"] = {"type": "string"}
    required = ["name", "public_key"] if req.since("2.92") else ["name"]
    body = validate_body(req, {
        "type": "object", "additionalProperties": False, "required": ["keypair"],
        "properties": {"keypair": {"type": "object", "additionalProperties": False,
                                   "required": required, "properties": props}}})["keypair"]
    user_id = keypair_target_user(req, body.get("user_id"), "os_compute_api:os-keypairs:create")
    kind = body.get("type", "ssh")
    name = body["name"]
    private = None
    if "public_key" in body:
        public = body["public_key"]
        fingerprint = x509_fingerprint(public) if kind == "x509" else ssh_fingerprint(public)
    else:
        check_keypair_room(req, user_id, name)
        if kind == "x509":
            private, public = generate_x509_keypair(f"{user_id}-{name}", req.app.clock)
            fingerprint = x509_fingerprint(public)
        else:
            private, public = generate_ssh_keypair()
            fingerprint = ssh_fingerprint(public)

    def plan(data):
        check_keypair_room(req, user_id, name)
        seq = data["counters"]["keypair"] + 1
        record = {"name": name, "public_key": public, "fingerprint": fingerprint, "type": kind,
                  "user_id": user_id, "id": seq,
                  "created_at": isotime_us(req.app.clock.now())}
        return [["set", ["keypairs", user_id, name], record], ["set", ["counters", "keypair"], seq]]

    req.store.transaction(plan)
    view = keypair_view(req, req.store.data["keypairs"][user_id][name], "create")
    if private is not None:
        view["private_key"] = private
    return (201 if req.since("2.2") else 200), {"keypair": view}


def check_keypair_room(req, user_id, name):
    data = req.store.data
    owned = data["keypairs"].get(user_id, {})
    if name in owned:
        raise Conflict(f"Key pair '{name}' already exists.")
    limit = project_limits(data, req.ident.project_id, user_id)["key_pairs"]
    if limit >= 0 and len(owned) + 1 > limit:
        raise Forbidden("Quota exceeded, too many key pairs.")


def find_keypair(req, rule):
    user_id = keypair_target_user(req, keypair_query(req, False), rule)
    name = req.params["id"]
    kp = req.store.data["keypairs"].get(user_id, {}).get(name)
    if kp is None:
        raise NotFound(f"Keypair {name} not found for user {user_id}")
    return user_id, kp


def keypairs_show(req):
    """GET /os-keypairs/{id}"""
    _, kp = find_keypair(req, "os_compute_api:os-keypairs:show")
    return 200, {"keypair": keypair_view(req, kp, "show")}


def keypairs_delete(req):
    """DELETE /os-keypairs/{id}"""
    user_id, kp = find_keypair(req, "os_compute_api:os-keypairs:delete")
    name = kp["name"]

    def plan(data):
        if name not in data["keypairs"].get(user_id, {}):
            raise NotFound(f"Keypair {name} not found for user {user_id}")
        if len(data["keypairs"][user_id]) == 1:
            return [["del", ["keypairs", user_id]]]
        return [["del", ["keypairs", user_id, name]]]

    req.store.transaction(plan)
    return (204 if req.since("2.2") else 202), None


# § 14 API: limits, quota sets, quota classes ---------------------------------

LIMIT_KEYS = [  # (absolute key, quota resource or usage, gone from)
    ("maxImageMeta", "metadata_items", (2, 39)), ("maxPersonality", "injected_files", (2, 57)),
    ("maxPersonalitySize", "injected_file_content_bytes", (2, 57)),
    ("maxSecurityGroupRules", "security_group_rules", (2, 36)),
    ("maxSecurityGroups", "security_groups", (2, 36)),
    ("maxServerMeta", "metadata_items", None), ("maxTotalCores", "cores", None),
    ("maxTotalFloatingIps", "floating_ips", (2, 36)),
    ("maxTotalInstances", "instances", None), ("maxTotalKeypairs", "key_pairs", None),
    ("maxTotalRAMSize", "ram", None), ("maxServerGroups", "server_groups", None),
    ("maxServerGroupMembers", "server_group_members", None),
    ("totalCoresUsed", "used:cores", None), ("totalInstancesUsed", "used:instances", None),
    ("totalRAMUsed", "used:ram", None),
    ("totalSecurityGroupsUsed", "used:security_groups", (2, 36)),
    ("totalFloatingIpsUsed", "used:floating_ips", (2, 36)),
    ("totalServerGroupsUsed", "used:server_groups", None),
]


def limits_index(req):
    """GET /limits"""
    query = validate_query(req, ["tenant_id"], strict_since="2.75")
    project_id = req.ident.project_id
    if "tenant_id" in query:
        project_id = query["tenant_id"][-1]
        authorize(req, "os_compute_api:limits:other_project", "admin", project_id)
    with req.store.reading():
        limits = project_limits(req.store.data, project_id)
        used = usage(req.store.data, project_id)
    absolute = {}
    for key, source, gone in LIMIT_KEYS:
        if gone and req.version >= gone:
            continue
        absolute[key] = used[source[5:]] if source.startswith("used:") else limits[source]
    return 200, {"limits": {"rate": [], "absolute": absolute}}


def quota_target(req, rule, persona, with_user=True):
    """(project, user or None) of an os-quota-sets call, authorized and verified."""
    allowed = ["user_id"] if with_user else []
    query = validate_query(req, allowed, strict_since="2.75" if with_user else "2.102")
    project_id = req.params["id"]
    authorize(req, rule, persona, project_id)
    if not req.app.auth.project_exists(project_id):
        raise BadRequest(f"Project ID {project_id} is not a valid project.")
    return project_id, query.get("user_id", [None])[-1]


def quota_sets_show(req):
    """GET /os-quota-sets/{id}"""
    project_id, user_id = quota_target(req, "os_compute_api:os-quota-sets:show", "reader")
    limits = project_limits(req.store.data, project_id, user_id)
    body = {"id": project_id}
    body.update({k: limits[k] for k in quota_keys(req.version)})
    return 200, {"quota_set": body}


def quota_sets_detail(req):
    """GET /os-quota-sets/{id}/detail"""
    project_id, user_id = quota_target(req, "os_compute_api:os-quota-sets:detail", "reader")
    with req.store.reading():
        limits = project_limits(req.store.data, project_id, user_id)
        used = usage(req.store.data, project_id, user_id)
        if user_id is None:
            used["key_pairs"] = len(req.store.data["keypairs"].get(req.ident.user_id, {}))
    body = {"id": project_id}
    body.update({k: {"in_use": used[k], "limit": limits[k], "reserved": 0}
                 for k in quota_keys(req.version)})
    return 200, {"quota_set": body}


def quota_sets_defaults(req):
    """GET /os-quota-sets/{id}/defaults"""
    project_id, _ = quota_target(req, "os_compute_api:os-quota-sets:defaults", "any",
                                 with_user=False)
    limits = class_limits(req.store.data)
    body = {"id": project_id}
    body.update({k: limits[k] for k in quota_keys(req.version)})
    return 200, {"quota_set": body}


def quota_update_schema(root, keys, with_force):
    props = {k: int_or_digits(-1, negative=True) for k in keys}
    if with_force:
        props["force"] = {"type": ["boolean", "string"], "enum": BOOLEAN_STRINGS}
    return {"type": "object", "additionalProperties": False, "required": [root],
            "properties": {root: {"type": "object", "additionalProperties": False,
                                  "properties": props}}}


def quota_sets_update(req):
    """PUT /os-quota-sets/{id}"""
    project_id, user_id = quota_target(req, "os_compute_api:os-quota-sets:update", "admin")
    body = validate_body(req, quota_update_schema("quota_set", quota_keys(req.version),
                                                  True))["quota_set"]
    force = bool_from_string(body.pop("force", False))
    values = {k: to_int_field(k, v, -1) for k, v in body.items()}

    def plan(data):
        current = project_limits(data, project_id, user_id)
        used = usage(data, project_id, user_id)
        project = project_limits(data, project_id)
        for key, value in values.items():
            if not force and value != -1 and current[key] != value and used[key] > value:
                raise BadRequest(f"Quota limit {value} for {key} must be greater than or "
                                 f"equal to already used and reserved {used[key]}.")
            if user_id is not None and project[key] != -1 and (value == -1 or value > project[key]):
                raise BadRequest(f"Quota limit {value} for {key} must be less than or equal "
                                 f"to {project[key]}.")
        if user_id is None:
            return [["set", ["quotas", project_id],
                     dict(data["quotas"].get(project_id, {}), **values)]]
        mine = data["user_quotas"].get(project_id, {}).get(user_id, {})
        return [["set", ["user_quotas", project_id, user_id], dict(mine, **values)]]

    if values:
        req.store.transaction(plan)
    limits = project_limits(req.store.data, project_id, user_id)
    return 200, {"quota_set": {k: limits[k] for k in quota_keys(req.version)}}


def quota_sets_delete(req):
    """DELETE /os-quota-sets/{id}"""
    project_id, user_id = quota_target(req, "os_compute_api:os-quota-sets:delete", "admin")

    def plan(data):
        if user_id is None:
            return [["del", ["quotas", project_id]], ["del", ["user_quotas", project_id]]]
        return [["del", ["user_quotas", project_id, user_id]]]

    req.store.transaction(plan)
    return 202, None


def quota_class_name(req):
    validate_query(req, (), strict_since="2.102")
    name = req.params["id"]
    if not 1 <= len(name) <= 255:
        raise BadRequest("quota_class_name has a length of 1 to 255 characters.")
    return name


def quota_classes_show(req):
    """GET /os-quota-class-sets/{id}"""
    name = quota_class_name(req)
    limits = class_limits(req.store.data, name)
    body = {"id": name}
    body.update({k: limits[k] for k in quota_keys(req.version, classes=True)})
    return 200, {"quota_class_set": body}


def quota_classes_update(req):
    """PUT /os-quota-class-sets/{id}"""
    name = quota_class_name(req)
    keys = quota_keys(req.version, classes=True)
    if not req.since("2.50"):
        keys += ["server_groups", "server_group_members"]
    body = validate_body(req, quota_update_schema("quota_class_set", keys, False))
    values = {k: to_int_field(k, v, -1) for k, v in body["quota_class_set"].items()}

    def plan(data):
        mine = data["quota_classes"].get(name, {})
        return [["set", ["quota_classes", name], dict(mine, **values)]]

    if values:
        req.store.transaction(plan)
    limits = class_limits(req.store.data, name)
    return 200, {"quota_class_set": {k: limits[k] for k in quota_keys(req.version, classes=True)}}


# § 15 API: availability zones -------------------------------------------------

def availability_zones_index(req):
    """GET /os-availability-zone"""
    validate_query(req, (), strict_since="2.102")
    zone = req.app.conf["availability_zone"]
    return 200, {"availabilityZoneInfo": [{"zoneName": zone, "zoneState": {
        "available": req.app.compute_available()}, "hosts": None}]}


def availability_zones_detail(req):
    """GET /os-availability-zone/detail"""
    validate_query(req, (), strict_since="2.102")
    host = req.app.conf["host"]
    up = req.app.compute_available()
    now = isotime_us(req.app.clock.now())

    def service(alive):
        return {"available": alive, "active": True, "updated_at": now}

    return 200, {"availabilityZoneInfo": [
        {"zoneName": "internal", "zoneState": {"available": True},
         "hosts": {host: {"nova-conductor": service(True), "nova-scheduler": service(True)}}},
        {"zoneName": req.app.conf["availability_zone"], "zoneState": {"available": up},
         "hosts": {host: {"nova-compute": service(up)}}},
    ]}


# § 16 ROUTES and ACTIONS -------------------------------------------------------
#
# One row per route of Nova 34.0.0 (its routes.tsv), in Nova's order:
#   method  path (under /v2.1, also under /v2.1/{project_id})  action key (POST .../action)
#   min and max microversion  policy persona  handler  policy rule named in 403s
# Personas are Nova's defaults: any (authenticated), reader/member/manager (of the
# target project, or admin), owner (the target user, or admin), service, admin.
# Handler "-" is a route not built yet: it answers 501 notImplemented.  "gone"
# is an API Nova removed: 410 at every microversion.

ROUTE_TABLE = """
GET    /                                              -                    2.1  2.104 any     versions_project                 none
GET    /versions/{id}                                 -                    2.1  2.104 any     versions_show                    none
GET    /extensions                                    -                    2.1  2.104 any     extensions_index                 os_compute_api:extensions
GET    /extensions/{id}                               -                    2.1  2.104 any     extensions_show                  os_compute_api:extensions
GET    /flavors                                       -                    2.1  2.104 any     flavors_index                    -
POST   /flavors                                       -                    2.1  2.104 admin   flavors_create                   os_compute_api:os-flavor-manage:create
GET    /flavors/detail                                -                    2.1  2.104 any     flavors_detail                   os_compute_api:os-flavor-extra-specs:index
GET    /flavors/{id}                                  -                    2.1  2.104 any     flavors_show                     os_compute_api:os-flavor-extra-specs:index
PUT    /flavors/{id}                                  -                    2.55 2.104 admin   flavors_update                   os_compute_api:os-flavor-manage:update
DELETE /flavors/{id}                                  -                    2.1  2.104 admin   flavors_delete                   os_compute_api:os-flavor-manage:delete
POST   /flavors/{id}/action                           addTenantAccess      2.1  2.104 admin   flavor_action_add_tenant_access  os_compute_api:os-flavor-access:add_tenant_access
POST   /flavors/{id}/action                           removeTenantAccess   2.1  2.104 admin   flavor_action_remove_tenant_access os_compute_api:os-flavor-access:remove_tenant_access
GET    /flavors/{flavor_id}/os-extra_specs            -                    2.1  2.104 reader  extra_specs_index                os_compute_api:os-flavor-extra-specs:index
POST   /flavors/{flavor_id}/os-extra_specs            -                    2.1  2.104 admin   extra_specs_create               os_compute_api:os-flavor-extra-specs:create
GET    /flavors/{flavor_id}/os-extra_specs/{id}       -                    2.1  2.104 reader  extra_specs_show                 os_compute_api:os-flavor-extra-specs:show
PUT    /flavors/{flavor_id}/os-extra_specs/{id}       -                    2.1  2.104 admin   extra_specs_update               os_compute_api:os-flavor-extra-specs:update
DELETE /flavors/{flavor_id}/os-extra_specs/{id}       -                    2.1  2.104 admin   extra_specs_delete               os_compute_api:os-flavor-extra-specs:delete
GET    /flavors/{flavor_id}/os-flavor-access          -                    2.1  2.104 admin   flavor_access_index              os_compute_api:os-flavor-access
GET    /images                                        -                    2.1  2.35  any     -                                -
GET    /images/detail                                 -                    2.1  2.35  any     -                                -
GET    /images/{id}                                   -                    2.1  2.35  any     -                                -
DELETE /images/{id}                                   -                    2.1  2.35  any     -                                -
GET    /images/{image_id}/metadata                    -                    2.1  2.38  any     -                                -
POST   /images/{image_id}/metadata                    -                    2.1  2.38  any     -                                -
PUT    /images/{image_id}/metadata                    -                    2.1  2.38  any     -                                -
GET    /images/{image_id}/metadata/{id}               -                    2.1  2.38  any     -                                -
PUT    /images/{image_id}/metadata/{id}               -                    2.1  2.38  any     -                                -
DELETE /images/{image_id}/metadata/{id}               -                    2.1  2.38  any     -                                -
GET    /limits                                        -                    2.1  2.104 any     limits_index                     os_compute_api:limits
GET    /os-agents                                     -                    -    -     gone    gone                             -
POST   /os-agents                                     -                    -    -     gone    gone                             -
PUT    /os-agents/{id}                                -                    -    -     gone    gone                             -
DELETE /os-agents/{id}                                -                    -    -     gone    gone                             -
GET    /os-aggregates                                 -                    2.1  2.104 admin   -                                os_compute_api:os-aggregates:index
POST   /os-aggregates                                 -                    2.1  2.104 admin   -                                os_compute_api:os-aggregates:create
GET    /os-aggregates/{id}                            -                    2.1  2.104 admin   -                                os_compute_api:os-aggregates:show
PUT    /os-aggregates/{id}                            -                    2.1  2.104 admin   -                                os_compute_api:os-aggregates:update
DELETE /os-aggregates/{id}                            -                    2.1  2.104 admin   -                                os_compute_api:os-aggregates:delete
POST   /os-aggregates/{id}/action                     add_host             2.1  2.104 admin   -                                os_compute_api:os-aggregates:add_host
POST   /os-aggregates/{id}/action                     remove_host          2.1  2.104 admin   -                                os_compute_api:os-aggregates:remove_host
POST   /os-aggregates/{id}/action                     set_metadata         2.1  2.104 admin   -                                os_compute_api:os-aggregates:set_metadata
POST   /os-aggregates/{id}/images                     -                    2.81 2.104 admin   -                                compute:aggregates:images
POST   /os-assisted-volume-snapshots                  -                    2.1  2.104 service -                                os_compute_api:os-assisted-volume-snapshots:create
DELETE /os-assisted-volume-snapshots/{id}             -                    2.1  2.104 service -                                os_compute_api:os-assisted-volume-snapshots:delete
GET    /os-availability-zone                          -                    2.1  2.104 any     availability_zones_index         os_compute_api:os-availability-zone:list
GET    /os-availability-zone/detail                   -                    2.1  2.104 admin   availability_zones_detail        os_compute_api:os-availability-zone:detail
GET    /os-baremetal-nodes                            -                    2.1  2.35  admin   -                                os_compute_api:os-baremetal-nodes:list
POST   /os-baremetal-nodes                            -                    2.1  2.35  any     -                                -
GET    /os-baremetal-nodes/{id}                       -                    2.1  2.35  admin   -                                os_compute_api:os-baremetal-nodes:show
DELETE /os-baremetal-nodes/{id}                       -                    2.1  2.35  any     -                                -
POST   /os-baremetal-nodes/{id}/action                add_interface        2.1  2.35  any     -                                -
POST   /os-baremetal-nodes/{id}/action                remove_interface     2.1  2.35  any     -                                -
POST   /os-cells                                      -                    -    -     gone    gone                             -
GET    /os-cells                                      -                    -    -     gone    gone                             -
GET    /os-cells/capacities                           -                    -    -     gone    gone                             -
GET    /os-cells/detail                               -                    -    -     gone    gone                             -
GET    /os-cells/info                                 -                    -    -     gone    gone                             -
POST   /os-cells/sync_instances                       -                    -    -     gone    gone                             -
GET    /os-cells/{id}                                 -                    -    -     gone    gone                             -
PUT    /os-cells/{id}                                 -                    -    -     gone    gone                             -
DELETE /os-cells/{id}                                 -                    -    -     gone    gone                             -
GET    /os-cells/{id}/capacities                      -                    -    -     gone    gone                             -
POST   /os-certificates                               -                    -    -     gone    gone                             -
GET    /os-certificates/{id}                          -                    -    -     gone    gone                             -
GET    /os-cloudpipe                                  -                    -    -     gone    gone                             -
POST   /os-cloudpipe                                  -                    -    -     gone    gone                             -
PUT    /os-cloudpipe/{id}                             -                    -    -     gone    gone                             -
GET    /os-console-auth-tokens/{id}                   -                    2.1  2.104 admin   -                                os_compute_api:os-console-auth-tokens
GET    /os-fixed-ips/{id}                             -                    -    -     gone    gone                             -
POST   /os-fixed-ips/{id}/action                      reserve              -    -     gone    gone                             -
POST   /os-fixed-ips/{id}/action                      unreserve            -    -     gone    gone                             -
GET    /os-floating-ip-dns                            -                    -    -     gone    gone                             -
PUT    /os-floating-ip-dns/{id}                       -                    -    -     gone    gone                             -
DELETE /os-floating-ip-dns/{id}                       -                    -    -     gone    gone                             -
GET    /os-floating-ip-dns/{domain_id}/entries/{id}   -                    -    -     gone    gone                             -
PUT    /os-floating-ip-dns/{domain_id}/entries/{id}   -                    -    -     gone    gone                             -
DELETE /os-floating-ip-dns/{domain_id}/entries/{id}   -                    -    -     gone    gone                             -
GET    /os-floating-ip-pools                          -                    2.1  2.35  any     -                                os_compute_api:os-floating-ip-pools
GET    /os-floating-ips                               -                    2.1  2.35  reader  -                                os_compute_api:os-floating-ips:list
POST   /os-floating-ips                               -                    2.1  2.35  member  -                                os_compute_api:os-floating-ips:create
GET    /os-floating-ips/{id}                          -                    2.1  2.35  reader  -                                os_compute_api:os-floating-ips:show
DELETE /os-floating-ips/{id}                          -                    2.1  2.35  member  -                                os_compute_api:os-floating-ips:delete
GET    /os-floating-ips-bulk                          -                    -    -     gone    gone                             -
POST   /os-floating-ips-bulk                          -                    -    -     gone    gone                             -
GET    /os-floating-ips-bulk/{id}                     -                    -    -     gone    gone                             -
PUT    /os-floating-ips-bulk/{id}                     -                    -    -     gone    gone                             -
GET    /os-fping                                      -                    -    -     gone    gone                             -
GET    /os-fping/{id}                                 -                    -    -     gone    gone                             -
GET    /os-hosts                                      -                    2.1  2.42  admin   -                                os_compute_api:os-hosts:list
GET    /os-hosts/{id}                                 -                    2.1  2.42  admin   -                                os_compute_api:os-hosts:show
PUT    /os-hosts/{id}                                 -                    2.1  2.42  admin   -                                os_compute_api:os-hosts:update
GET    /os-hosts/{id}/reboot                          -                    2.1  2.42  admin   -                                os_compute_api:os-hosts:reboot
GET    /os-hosts/{id}/shutdown                        -                    2.1  2.42  admin   -                                os_compute_api:os-hosts:shutdown
GET    /os-hosts/{id}/startup                         -                    2.1  2.42  admin   -                                os_compute_api:os-hosts:start
GET    /os-hypervisors                                -                    2.1  2.104 admin   -                                os_compute_api:os-hypervisors:list
GET    /os-hypervisors/detail                         -                    2.1  2.104 admin   -                                os_compute_api:os-hypervisors:list-detail
GET    /os-hypervisors/statistics                     -                    2.1  2.87  admin   -                                os_compute_api:os-hypervisors:statistics
GET    /os-hypervisors/{id}                           -                    2.1  2.104 admin   -                                os_compute_api:os-hypervisors:show
GET    /os-hypervisors/{id}/search                    -                    2.1  2.52  admin   -                                os_compute_api:os-hypervisors:search
GET    /os-hypervisors/{id}/servers                   -                    2.1  2.52  admin   -                                os_compute_api:os-hypervisors:servers
GET    /os-hypervisors/{id}/uptime                    -                    2.1  2.87  admin   -                                os_compute_api:os-hypervisors:uptime
GET    /os-instance_usage_audit_log                   -                    2.1  2.104 admin   -                                os_compute_api:os-instance-usage-audit-log:list
GET    /os-instance_usage_audit_log/{id}              -                    2.1  2.104 admin   -                                os_compute_api:os-instance-usage-audit-log:show
GET    /os-keypairs                                   -                    2.1  2.104 owner   keypairs_index                   os_compute_api:os-keypairs:index
POST   /os-keypairs                                   -                    2.1  2.104 owner   keypairs_create                  os_compute_api:os-keypairs:create
GET    /os-keypairs/{id}                              -                    2.1  2.104 owner   keypairs_show                    os_compute_api:os-keypairs:show
DELETE /os-keypairs/{id}                              -                    2.1  2.104 owner   keypairs_delete                  os_compute_api:os-keypairs:delete
GET    /os-migrations                                 -                    2.1  2.104 manager -                                os_compute_api:os-migrations:index
GET    /os-networks                                   -                    2.1  2.35  reader  -                                os_compute_api:os-networks:list
POST   /os-networks                                   -                    -    -     gone    gone                             -
POST   /os-networks/add                               -                    -    -     gone    gone                             -
GET    /os-networks/{id}                              -                    2.1  2.35  reader  -                                os_compute_api:os-networks:show
DELETE /os-networks/{id}                              -                    -    -     gone    gone                             -
POST   /os-networks/{id}/action                       disassociate         -    -     gone    gone                             -
POST   /os-networks/{id}/action                       disassociate_host    -    -     gone    gone                             -
POST   /os-networks/{id}/action                       disassociate_project -    -     gone    gone                             -
POST   /os-networks/{id}/action                       associate_host       -    -     gone    gone                             -
GET    /os-quota-class-sets/{id}                      -                    2.1  2.104 admin   quota_classes_show               os_compute_api:os-quota-class-sets:show
PUT    /os-quota-class-sets/{id}                      -                    2.1  2.104 admin   quota_classes_update             os_compute_api:os-quota-class-sets:update
GET    /os-quota-sets/{id}                            -                    2.1  2.104 reader  quota_sets_show                  os_compute_api:os-quota-sets:show
PUT    /os-quota-sets/{id}                            -                    2.1  2.104 admin   quota_sets_update                os_compute_api:os-quota-sets:update
DELETE /os-quota-sets/{id}                            -                    2.1  2.104 admin   quota_sets_delete                os_compute_api:os-quota-sets:delete
GET    /os-quota-sets/{id}/detail                     -                    2.1  2.104 reader  quota_sets_detail                os_compute_api:os-quota-sets:detail
GET    /os-quota-sets/{id}/defaults                   -                    2.1  2.104 any     quota_sets_defaults              os_compute_api:os-quota-sets:defaults
GET    /os-security-group-default-rules               -                    -    -     gone    gone                             -
POST   /os-security-group-default-rules               -                    -    -     gone    gone                             -
GET    /os-security-group-default-rules/{id}          -                    -    -     gone    gone                             -
DELETE /os-security-group-default-rules/{id}          -                    -    -     gone    gone                             -
POST   /os-security-group-rules                       -                    2.1  2.35  member  -                                os_compute_api:os-security-groups:rule:create
DELETE /os-security-group-rules/{id}                  -                    2.1  2.35  member  -                                os_compute_api:os-security-groups:rule:delete
GET    /os-security-groups                            -                    2.1  2.35  reader  -                                os_compute_api:os-security-groups:get
POST   /os-security-groups                            -                    2.1  2.35  member  -                                os_compute_api:os-security-groups:create
GET    /os-security-groups/{id}                       -                    2.1  2.35  reader  -                                os_compute_api:os-security-groups:show
PUT    /os-security-groups/{id}                       -                    2.1  2.35  member  -                                os_compute_api:os-security-groups:update
DELETE /os-security-groups/{id}                       -                    2.1  2.35  member  -                                os_compute_api:os-security-groups:delete
POST   /os-server-external-events                     -                    2.1  2.104 service -                                os_compute_api:os-server-external-events:create
GET    /os-server-groups                              -                    2.1  2.104 reader  -                                os_compute_api:os-server-groups:index
POST   /os-server-groups                              -                    2.1  2.104 member  -                                os_compute_api:os-server-groups:create
GET    /os-server-groups/{id}                         -                    2.1  2.104 reader  -                                os_compute_api:os-server-groups:show
DELETE /os-server-groups/{id}                         -                    2.1  2.104 member  -                                os_compute_api:os-server-groups:delete
GET    /os-services                                   -                    2.1  2.104 admin   -                                os_compute_api:os-services:list
PUT    /os-services/{id}                              -                    2.1  2.104 admin   -                                os_compute_api:os-services:update
DELETE /os-services/{id}                              -                    2.1  2.104 admin   -                                os_compute_api:os-services:delete
GET    /os-simple-tenant-usage                        -                    2.1  2.104 admin   -                                os_compute_api:os-simple-tenant-usage:list
GET    /os-simple-tenant-usage/{id}                   -                    2.1  2.104 reader  -                                os_compute_api:os-simple-tenant-usage:show
GET    /os-snapshots                                  -                    2.1  2.35  reader  -                                os_compute_api:os-volumes:snapshots:list
POST   /os-snapshots                                  -                    2.1  2.35  member  -                                os_compute_api:os-volumes:snapshots:create
GET    /os-snapshots/detail                           -                    2.1  2.35  reader  -                                os_compute_api:os-volumes:snapshots:detail
GET    /os-snapshots/{id}                             -                    2.1  2.35  reader  -                                os_compute_api:os-volumes:snapshots:show
DELETE /os-snapshots/{id}                             -                    2.1  2.35  member  -                                os_compute_api:os-volumes:snapshots:delete
GET    /os-tenant-networks                            -                    2.1  2.35  reader  -                                os_compute_api:os-tenant-networks:list
POST   /os-tenant-networks                            -                    -    -     gone    gone                             -
GET    /os-tenant-networks/{id}                       -                    2.1  2.35  reader  -                                os_compute_api:os-tenant-networks:show
DELETE /os-tenant-networks/{id}                       -                    -    -     gone    gone                             -
GET    /os-volumes                                    -                    2.1  2.35  reader  -                                os_compute_api:os-volumes:list
POST   /os-volumes                                    -                    2.1  2.35  member  -                                os_compute_api:os-volumes:create
GET    /os-volumes/detail                             -                    2.1  2.35  reader  -                                os_compute_api:os-volumes:detail
GET    /os-volumes/{id}                               -                    2.1  2.35  reader  -                                os_compute_api:os-volumes:show
DELETE /os-volumes/{id}                               -                    2.1  2.35  member  -                                os_compute_api:os-volumes:delete
GET    /os-volumes_boot                               -                    2.1  2.102 reader  -                                os_compute_api:servers:index
POST   /os-volumes_boot                               -                    2.1  2.102 member  -                                os_compute_api:servers:create
GET    /os-volumes_boot/detail                        -                    2.1  2.102 reader  -                                os_compute_api:servers:detail
GET    /os-volumes_boot/{id}                          -                    2.1  2.102 reader  -                                os_compute_api:servers:show
PUT    /os-volumes_boot/{id}                          -                    2.1  2.102 member  -                                os_compute_api:servers:update
DELETE /os-volumes_boot/{id}                          -                    2.1  2.102 member  -                                os_compute_api:servers:delete
POST   /os-volumes_boot/{id}/action                   confirmResize        2.1  2.102 member  -                                os_compute_api:servers:confirm_resize
POST   /os-volumes_boot/{id}/action                   revertResize         2.1  2.102 member  -                                os_compute_api:servers:revert_resize
POST   /os-volumes_boot/{id}/action                   reboot               2.1  2.102 member  -                                os_compute_api:servers:reboot
POST   /os-volumes_boot/{id}/action                   resize               2.1  2.102 member  -                                os_compute_api:servers:resize
POST   /os-volumes_boot/{id}/action                   rebuild              2.1  2.102 member  -                                os_compute_api:servers:rebuild
POST   /os-volumes_boot/{id}/action                   createImage          2.1  2.102 member  -                                os_compute_api:servers:create_image
POST   /os-volumes_boot/{id}/action                   os-start             2.1  2.102 member  -                                os_compute_api:servers:start
POST   /os-volumes_boot/{id}/action                   os-stop              2.1  2.102 member  -                                os_compute_api:servers:stop
POST   /os-volumes_boot/{id}/action                   trigger_crash_dump   2.17 2.102 member  -                                os_compute_api:servers:trigger_crash_dump
GET    /servers                                       -                    2.1  2.104 reader  -                                os_compute_api:servers:index
POST   /servers                                       -                    2.1  2.104 member  -                                os_compute_api:servers:create
GET    /servers/detail                                -                    2.1  2.104 reader  -                                os_compute_api:servers:detail
GET    /servers/{server_id}                           -                    2.1  2.104 reader  -                                os_compute_api:servers:show
PUT    /servers/{server_id}                           -                    2.1  2.104 member  -                                os_compute_api:servers:update
DELETE /servers/{server_id}                           -                    2.1  2.104 member  -                                os_compute_api:servers:delete
POST   /servers/{server_id}/action                    confirmResize        2.1  2.104 member  -                                os_compute_api:servers:confirm_resize
POST   /servers/{server_id}/action                    revertResize         2.1  2.104 member  -                                os_compute_api:servers:revert_resize
POST   /servers/{server_id}/action                    reboot               2.1  2.104 member  -                                os_compute_api:servers:reboot
POST   /servers/{server_id}/action                    resize               2.1  2.104 member  -                                os_compute_api:servers:resize
POST   /servers/{server_id}/action                    rebuild              2.1  2.104 member  -                                os_compute_api:servers:rebuild
POST   /servers/{server_id}/action                    createImage          2.1  2.104 member  -                                os_compute_api:servers:create_image
POST   /servers/{server_id}/action                    os-start             2.1  2.104 member  -                                os_compute_api:servers:start
POST   /servers/{server_id}/action                    os-stop              2.1  2.104 member  -                                os_compute_api:servers:stop
POST   /servers/{server_id}/action                    trigger_crash_dump   2.17 2.104 member  -                                os_compute_api:servers:trigger_crash_dump
POST   /servers/{server_id}/action                    resetNetwork         -    -     gone    gone                             -
POST   /servers/{server_id}/action                    injectNetworkInfo    2.1  2.104 admin   -                                os_compute_api:os-admin-actions:inject_network_info
POST   /servers/{server_id}/action                    os-resetState        2.1  2.104 admin   -                                os_compute_api:os-admin-actions:reset_state
POST   /servers/{server_id}/action                    changePassword       2.1  2.104 member  -                                os_compute_api:os-admin-password
POST   /servers/{server_id}/action                    os-getConsoleOutput  2.1  2.104 member  -                                os_compute_api:os-console-output
POST   /servers/{server_id}/action                    createBackup         2.1  2.104 member  -                                os_compute_api:os-create-backup
POST   /servers/{server_id}/action                    restore              2.1  2.104 member  -                                os_compute_api:os-deferred-delete:restore
POST   /servers/{server_id}/action                    forceDelete          2.1  2.104 member  -                                os_compute_api:os-deferred-delete:force
POST   /servers/{server_id}/action                    evacuate             2.1  2.104 admin   -                                os_compute_api:os-evacuate
POST   /servers/{server_id}/action                    addFloatingIp        2.1  2.43  member  -                                os_compute_api:os-floating-ips:add
POST   /servers/{server_id}/action                    removeFloatingIp     2.1  2.43  member  -                                os_compute_api:os-floating-ips:remove
POST   /servers/{server_id}/action                    lock                 2.1  2.104 member  -                                os_compute_api:os-lock-server:lock
POST   /servers/{server_id}/action                    unlock               2.1  2.104 member  -                                os_compute_api:os-lock-server:unlock
POST   /servers/{server_id}/action                    migrate              2.1  2.104 manager -                                os_compute_api:os-migrate-server:migrate
POST   /servers/{server_id}/action                    os-migrateLive       2.1  2.104 manager -                                os_compute_api:os-migrate-server:migrate_live
POST   /servers/{server_id}/action                    addFixedIp           2.1  2.43  member  -                                os_compute_api:os-multinic:add
POST   /servers/{server_id}/action                    removeFixedIp        2.1  2.43  member  -                                os_compute_api:os-multinic:remove
POST   /servers/{server_id}/action                    pause                2.1  2.104 member  -                                os_compute_api:os-pause-server:pause
POST   /servers/{server_id}/action                    unpause              2.1  2.104 member  -                                os_compute_api:os-pause-server:unpause
POST   /servers/{server_id}/action                    os-getVNCConsole     2.1  2.5   member  -                                os_compute_api:os-remote-consoles
POST   /servers/{server_id}/action                    os-getSPICEConsole   2.1  2.5   member  -                                os_compute_api:os-remote-consoles
POST   /servers/{server_id}/action                    os-getRDPConsole     -    -     gone    gone                             -
POST   /servers/{server_id}/action                    os-getSerialConsole  2.1  2.5   member  -                                os_compute_api:os-remote-consoles
POST   /servers/{server_id}/action                    rescue               2.1  2.104 member  -                                os_compute_api:os-rescue
POST   /servers/{server_id}/action                    unrescue             2.1  2.104 member  -                                os_compute_api:os-unrescue
POST   /servers/{server_id}/action                    addSecurityGroup     2.1  2.104 member  -                                os_compute_api:os-security-groups:add
POST   /servers/{server_id}/action                    removeSecurityGroup  2.1  2.104 member  -                                os_compute_api:os-security-groups:remove
POST   /servers/{server_id}/action                    shelve               2.1  2.104 member  -                                os_compute_api:os-shelve:shelve
POST   /servers/{server_id}/action                    shelveOffload        2.1  2.104 admin   -                                os_compute_api:os-shelve:shelve_offload
POST   /servers/{server_id}/action                    unshelve             2.1  2.104 member  -                                os_compute_api:os-shelve:unshelve
POST   /servers/{server_id}/action                    suspend              2.1  2.104 member  -                                os_compute_api:os-suspend-server:suspend
POST   /servers/{server_id}/action                    resume               2.1  2.104 member  -                                os_compute_api:os-suspend-server:resume
GET    /servers/{server_id}/consoles                  -                    -    -     gone    gone                             -
POST   /servers/{server_id}/consoles                  -                    -    -     gone    gone                             -
GET    /servers/{server_id}/consoles/{id}             -                    -    -     gone    gone                             -
DELETE /servers/{server_id}/consoles/{id}             -                    -    -     gone    gone                             -
GET    /servers/{server_id}/diagnostics               -                    2.1  2.104 admin   -                                os_compute_api:os-server-diagnostics
GET    /servers/{server_id}/ips                       -                    2.1  2.104 reader  -                                os_compute_api:ips:index
GET    /servers/{server_id}/ips/{id}                  -                    2.1  2.104 reader  -                                os_compute_api:ips:show
GET    /servers/{server_id}/metadata                  -                    2.1  2.104 reader  -                                os_compute_api:server-metadata:index
POST   /servers/{server_id}/metadata                  -                    2.1  2.104 member  -                                os_compute_api:server-metadata:create
PUT    /servers/{server_id}/metadata                  -                    2.1  2.104 member  -                                os_compute_api:server-metadata:update_all
GET    /servers/{server_id}/metadata/{id}             -                    2.1  2.104 reader  -                                os_compute_api:server-metadata:show
PUT    /servers/{server_id}/metadata/{id}             -                    2.1  2.104 member  -                                os_compute_api:server-metadata:update
DELETE /servers/{server_id}/metadata/{id}             -                    2.1  2.104 member  -                                os_compute_api:server-metadata:delete
GET    /servers/{server_id}/migrations                -                    2.23 2.104 manager -                                os_compute_api:servers:migrations:index
GET    /servers/{server_id}/migrations/{id}           -                    2.23 2.104 admin   -                                os_compute_api:servers:migrations:show
DELETE /servers/{server_id}/migrations/{id}           -                    2.24 2.104 manager -                                os_compute_api:servers:migrations:delete
POST   /servers/{server_id}/migrations/{id}/action    force_complete       2.22 2.104 manager -                                os_compute_api:servers:migrations:force_complete
GET    /servers/{server_id}/os-instance-actions       -                    2.1  2.104 reader  -                                os_compute_api:os-instance-actions:list
GET    /servers/{server_id}/os-instance-actions/{id}  -                    2.1  2.104 reader  -                                os_compute_api:os-instance-actions:show
GET    /servers/{server_id}/os-interface              -                    2.1  2.104 reader  -                                os_compute_api:os-attach-interfaces:list
POST   /servers/{server_id}/os-interface              -                    2.1  2.104 member  -                                os_compute_api:os-attach-interfaces:create
GET    /servers/{server_id}/os-interface/{id}         -                    2.1  2.104 reader  -                                os_compute_api:os-attach-interfaces:show
DELETE /servers/{server_id}/os-interface/{id}         -                    2.1  2.104 member  -                                os_compute_api:os-attach-interfaces:delete
GET    /servers/{server_id}/os-server-password        -                    2.1  2.104 reader  -                                os_compute_api:os-server-password:show
DELETE /servers/{server_id}/os-server-password        -                    2.1  2.104 member  -                                os_compute_api:os-server-password:clear
GET    /servers/{server_id}/os-virtual-interfaces     -                    -    -     gone    gone                             -
GET    /servers/{server_id}/os-volume_attachments     -                    2.1  2.104 reader  -                                os_compute_api:os-volumes-attachments:index
POST   /servers/{server_id}/os-volume_attachments     -                    2.1  2.104 member  -                                os_compute_api:os-volumes-attachments:create
GET    /servers/{server_id}/os-volume_attachments/{id} -                    2.1  2.104 reader  -                                os_compute_api:os-volumes-attachments:show
PUT    /servers/{server_id}/os-volume_attachments/{id} -                    2.1  2.104 member  -                                os_compute_api:os-volumes-attachments:update
DELETE /servers/{server_id}/os-volume_attachments/{id} -                    2.1  2.104 member  -                                os_compute_api:os-volumes-attachments:delete
POST   /servers/{server_id}/remote-consoles           -                    2.6  2.104 member  -                                os_compute_api:os-remote-consoles
GET    /servers/{server_id}/os-security-groups        -                    2.1  2.104 reader  -                                os_compute_api:os-security-groups:list
GET    /servers/{server_id}/shares                    -                    2.97 2.104 reader  -                                os_compute_api:os-server-shares:index
POST   /servers/{server_id}/shares                    -                    2.97 2.104 member  -                                os_compute_api:os-server-shares:create
GET    /servers/{server_id}/shares/{id}               -                    2.97 2.104 reader  -                                os_compute_api:os-server-shares:show
DELETE /servers/{server_id}/shares/{id}               -                    2.97 2.104 member  -                                os_compute_api:os-server-shares:delete
GET    /servers/{server_id}/tags                      -                    2.26 2.104 reader  -                                os_compute_api:os-server-tags:index
PUT    /servers/{server_id}/tags                      -                    2.26 2.104 member  -                                os_compute_api:os-server-tags:update_all
DELETE /servers/{server_id}/tags                      -                    2.26 2.104 member  -                                os_compute_api:os-server-tags:delete_all
GET    /servers/{server_id}/tags/{id}                 -                    2.26 2.104 reader  -                                os_compute_api:os-server-tags:show
PUT    /servers/{server_id}/tags/{id}                 -                    2.26 2.104 member  -                                os_compute_api:os-server-tags:update
DELETE /servers/{server_id}/tags/{id}                 -                    2.26 2.104 member  -                                os_compute_api:os-server-tags:delete
GET    /servers/{server_id}/topology                  -                    2.78 2.104 reader  -                                compute:server:topology:index
"""


class Route:
    """One row of ROUTE_TABLE."""

    def __init__(self, line):
        method, path, action, low, high, persona, handler, rule = line.split()
        self.method, self.path = method, path
        self.action = None if action == "-" else action
        self.segments = [s for s in path.split("/") if s]
        self.gone = handler == "gone"
        self.min = parse_version(low) if low != "-" else MIN_VERSION
        self.max = parse_version(high) if high != "-" else MAX_VERSION
        self.persona = persona
        self.rule = rule
        self.handler_name = handler
        self.handler = None if handler in ("-", "gone") else globals()[handler]

    @property
    def built(self):
        return self.handler is not None

    def match(self, segments):
        """{param: value} when the segments fit this path, else None."""
        if len(segments) != len(self.segments):
            return None
        params = {}
        for want, got in zip(self.segments, segments):
            if want.startswith("{"):
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params

    def specificity(self):
        return tuple(not s.startswith("{") for s in self.segments)


ROUTES = [Route(line) for line in ROUTE_TABLE.strip().splitlines()]
# (path, action key) -> Route, for POST .../action bodies
ACTIONS = {(r.path, r.action): r for r in ROUTES if r.action}
KNOWN_ROOTS = {r.segments[0] for r in ROUTES if r.segments}


def find_routes(segments):
    """(routes of the most specific matching path, params) or ([], None)."""
    best, best_key, params = [], None, None
    for route in ROUTES:
        got = route.match(segments)
        if got is None:
            continue
        key = route.specificity()
        if best_key is None or key > best_key:
            best, best_key, params = [route], key, got
        elif key == best_key and route.path == best[0].path:
            best.append(route)
    return best, params


# § 17 HTTP front end ----------------------------------------------------------

JSON_TYPES_ALLOWED = ("", "text/plain", "application/json", "application/vnd.openstack.compute+json")
SECRET_FIELDS = re.compile(r'("(?:private_key|adminPass|password|auth_token|token)"\s*:\s*)'
                           r'"(?:[^"\\]|\\.)*"')
CORS_EXPOSE = ("x-openstack-request-id, x-compute-request-id, OpenStack-API-Version, "
               "X-OpenStack-Nova-API-Version")


def mask_secrets(payload):
    """A body for the debug log, with passwords, tokens and private keys blanked."""
    return SECRET_FIELDS.sub(r'\1"***"', payload.decode("utf-8", "replace"))


MAX_JSON_DEPTH = 64


def reject_constant(name):
    """NaN and Infinity are not JSON: such a body is malformed."""
    raise ValueError(name)


def json_depth(doc):
    """How deeply a parsed body nests (without recursion)."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(
            node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


class Response:
    def __init__(self, status, body=None, headers=None, content_type="application/json"):
        self.status = status
        self.headers = list(headers or [])
        if body is None:
            self.payload = b""
        elif isinstance(body, bytes):
            self.payload = body
        else:
            self.payload = json_bytes(body)
        self.content_type = content_type


class App:
    """Everything a request needs: configuration, state, identity, hypervisor."""

    def __init__(self, conf, store, auth=None, driver=None, clock=None):
        self.conf = conf
        self.store = store
        self.clock = clock or Clock()
        self.auth = auth or NoAuth(conf["noauth_identity"])
        self.driver = driver
        self.started_at = self.clock.now()
        self.stopping = False

    def compute_available(self):
        return self.driver is not None and self.driver.available

    # -- entry point -------------------------------------------------------------
    def handle(self, method, target, headers, body=b"", secure=False):
        """One HTTP request in, one Response out; never raises.

        body is None when the client sent more than --max-body-size (413)."""
        split = urllib.parse.urlsplit(target)
        path = split.path or "/"
        base = self.base_url(headers, secure)
        if path == "/healthcheck":
            return Response(200, b"OK", content_type="text/plain")
        if body is None and not path.startswith("/v2"):
            return Response(413, TooLarge().body())
        if path in ("", "/"):
            return Response(200, versions_root(base))
        for root, legacy in (("/v2.1", False), ("/v2", True)):
            if path == root or path.startswith(root + "/"):
                return self.handle_api(method, path[len(root):], split.query, headers, body,
                                       base, legacy)
        return Response(300, versions_choices(base, path))

    def base_url(self, headers, secure):
        if self.conf["public_url"]:
            return self.conf["public_url"]
        proto = (headers.get("X-Forwarded-Proto") or ("https" if secure else "http"))
        proto = proto.split(",")[0].strip().lower()
        host = headers.get("X-Forwarded-Host") or headers.get("Host")
        if not host:
            host = "%s:%s" % (self.conf["bind"], self.conf["port"])
        host = host.split(",")[0].strip()
        if proto not in ("http", "https") or not re.match(r"^[A-Za-z0-9.:\[\]_-]+$", host):
            proto, host = ("https" if secure else "http"), "%s:%s" % (self.conf["bind"],
                                                                       self.conf["port"])
        return f"{proto}://{host}"

    def handle_api(self, method, rest, query, headers, body, base, legacy):
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        req = Request(self, method, rest, pairs, headers)
        req.legacy, req.base_url = legacy, base
        echo = version_text(MIN_VERSION)
        started = time.monotonic()
        token = CURRENT_REQUEST.set(req.request_id)
        global_id = headers.get("X-OpenStack-Request-ID", "")
        if re.match(r"^req-[0-9a-f-]{36}$", global_id):
            LOG.info("global request id %s", global_id)
        if self.conf["debug"]:
            LOG.debug("request %s %s%s%s body: %s", method, "/v2" if legacy else "/v2.1", rest,
                      "?" + query if query else "", mask_secrets(body or b""))
        try:
            if not legacy:
                try:
                    req.version, echo = negotiate_version(headers)
                except NotAcceptable:
                    echo = (requested_version_text(headers) or "").strip()
                    raise
            if body is None:
                raise TooLarge()
            if self.stopping:
                raise Unavailable("minivan is shutting down.")
            resp = self.route(req, method, rest, body)
        except Fault as fault:
            resp = self.fault_response(fault, req)
        except Exception as exc:  # noqa: BLE001 - the daemon keeps serving
            LOG.exception("unexpected error in %s %s", method, rest)
            resp = Response(500, {"computeFault": {"code": 500,
                                                   "message": unexpected_error_message(exc)}})
        resp.headers += [("x-openstack-request-id", req.request_id),
                         ("x-compute-request-id", req.request_id)]
        if not legacy:
            resp.headers += [("OpenStack-API-Version", "compute " + echo),
                             ("X-OpenStack-Nova-API-Version", echo),
                             ("Vary", "OpenStack-API-Version"),
                             ("Vary", "X-OpenStack-Nova-API-Version")]
        who = f"{req.ident.user_id} {req.ident.project_id}" if req.ident else "- -"
        LOG.info("%s \"%s %s%s\" status: %s len: %s time: %.4f", who, method,
                 "/v2" if legacy else "/v2.1", rest, resp.status, len(resp.payload),
                 time.monotonic() - started)
        if self.conf["debug"]:
            LOG.debug("response body: %s", mask_secrets(resp.payload))
        CURRENT_REQUEST.reset(token)
        return resp

    def fault_response(self, fault, req):
        headers = []
        if fault.code == 401:
            challenge = self.auth.www_authenticate()
            if challenge:
                headers.append(("WWW-Authenticate", challenge))
        for key, value in fault.headers.items():
            headers.append((key, value))
        if fault.code >= 500:
            LOG.warning("%s", fault.message)
        return Response(fault.code, fault.body(), headers)

    def route(self, req, method, rest, body):
        if rest.endswith(".json"):
            rest = rest[:-5]
        if rest in ("", "/"):
            if method not in ("GET", "HEAD"):
                raise BadMethod(headers={"Allow": "GET"})
            return Response(200, {"version": version_entry(req.base_url,
                                                           "v2.0" if req.legacy else "v2.1", True)})
        req.ident = self.auth.identify(req.headers.get("X-Auth-Token"))
        segments = [urllib.parse.unquote(s) for s in rest.split("/") if s]
        if segments and segments[0] not in KNOWN_ROOTS:
            project = segments.pop(0)
            if project != req.ident.project_id:
                raise BadRequest(f"Malformed request URL: URL's project_id '{project}' doesn't "
                                 f"match Context's project_id '{req.ident.project_id}'")
            req.project_in_url = project
        routes, params = find_routes(segments)
        if not routes:
            raise NotFound()
        want = "GET" if method == "HEAD" else method
        candidates = [r for r in routes if r.method == want]
        if not candidates:
            allow = sorted({r.method for r in routes} | ({"HEAD"} if any(
                r.method == "GET" for r in routes) else set()))
            raise BadMethod(headers={"Allow": ", ".join(allow)})
        req.params = params
        if method in ("POST", "PUT"):
            req.body = self.parse_body(req, body)
        route = self.pick_action(req, candidates) if candidates[0].action else candidates[0]
        return self.call(req, route, method)

    def parse_body(self, req, body):
        ctype = (req.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype not in JSON_TYPES_ALLOWED:
            raise BadMediaType()
        if not body:
            return None
        try:
            doc = json.loads(body.decode("utf-8"), parse_constant=reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest("Malformed request body") from None
        if json_depth(doc) > MAX_JSON_DEPTH:
            raise BadRequest("Malformed request body")
        return doc

    def pick_action(self, req, candidates):
        if not isinstance(req.body, dict) or len(req.body) != 1:
            raise BadRequest("Malformed request body")
        key = next(iter(req.body))
        route = ACTIONS.get((candidates[0].path, key))
        if route is None:
            raise BadRequest(f"There is no such action: {key}")
        return route

    def call(self, req, route, method):
        if route.gone:
            raise Gone()
        if not route.min <= req.version <= route.max:
            raise NotFound()
        if route.persona in ("admin", "any", "reader", "member", "manager", "service"):
            authorize(req, route.rule, route.persona, req.ident.project_id)
        if route.handler is None:
            raise NotImplementedFault(f"{route.method} {route.path}"
                                      f"{' ' + route.action if route.action else ''} is not "
                                      "implemented by minivan yet.")
        result = route.handler(req)
        status, body = result[0], result[1]
        headers = list(result[2].items()) if len(result) > 2 else []
        if method == "HEAD":
            return Response(status, json_bytes(body) if body is not None else None, headers)
        return Response(status, body, headers)


class Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; every answer, errors included, is JSON with a length."""

    protocol_version = "HTTP/1.1"
    server_version = "minivan"
    sys_version = ""
    timeout = 75

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    def setup(self):
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, ssl.SSLError, socket.timeout, TimeoutError):
            self.close_connection = True

    def dispatch(self):
        app = self.server.app
        self.server.begin_request()
        try:
            body = self.read_body()
            if body is False:
                return
            resp = app.handle(self.command, self.path, self.headers, body,
                              secure=isinstance(self.connection, ssl.SSLSocket))
            if app.stopping:
                self.close_connection = True
            self.cors(resp)
            self.write(resp, head=self.command == "HEAD")
        finally:
            self.server.end_request()

    def read_body(self):
        """The request body; None when over the size limit, False after a protocol error."""
        limit = self.server.app.conf["max_body_size"]
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self.read_chunked(limit)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.send_error(400, "Bad Content-Length")
            return False
        if length > limit:
            self.close_connection = True
            return None
        return self.rfile.read(length)

    def read_chunked(self, limit):
        chunks, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.send_error(400, "Bad chunked encoding")
                return False
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            total += size
            if total > limit:
                self.close_connection = True
                return None
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def cors(self, resp):
        origin = self.headers.get("Origin")
        allowed = self.server.app.conf["cors_allowed_origins"]
        if not origin or not allowed or ("*" not in allowed and origin not in allowed):
            return
        resp.headers += [("Access-Control-Allow-Origin", origin),
                         ("Access-Control-Expose-Headers", CORS_EXPOSE)]
        if self.command == "OPTIONS" and self.headers.get("Access-Control-Request-Method"):
            resp.status, resp.payload = 200, b""
            resp.headers += [
                ("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, HEAD, OPTIONS"),
                ("Access-Control-Allow-Headers", self.headers.get(
                    "Access-Control-Request-Headers") or "Content-Type, X-Auth-Token"),
                ("Access-Control-Max-Age", "3600")]
            if origin != "*":
                resp.headers.append(("Vary", "Origin"))

    def write(self, resp, head=False):
        lines = ["%s %d %s" % (self.protocol_version, resp.status, STATUS_TEXT.get(resp.status, ""))]
        if resp.status != 204 or resp.payload:
            ctype = resp.content_type
            if resp.status >= 400 and ctype == "application/json":
                ctype += "; charset=UTF-8"
            lines.append("Content-Type: " + ctype)
        lines.append("Content-Length: %d" % len(resp.payload))
        for key, value in resp.headers:
            lines.append(f"{key}: {value}")
        lines.append("Date: " + self.date_time_string())
        lines.append("Server: minivan")
        if self.close_connection:
            lines.append("Connection: close")
        head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        self.wfile.write(head_bytes + (b"" if head else resp.payload))
        self.wfile.flush()
        self.log_request(resp.status, len(resp.payload))

    def send_error(self, code, message=None, explain=None):
        """The stdlib's HTML error page, replaced by a JSON fault."""
        if self.request_version == "HTTP/0.9" or not getattr(self, "request_version", None):
            self.request_version = "HTTP/1.1"
        self.close_connection = True
        fault = Fault(message or STATUS_TEXT.get(code, "Error"))
        fault.code = code
        try:
            self.write(Response(code, fault.body()))
        except OSError:
            pass

    def log_request(self, code="-", size="-"):
        pass  # App.handle logs each API call with its request id

    def log_message(self, fmt, *args):
        LOG.debug("%s %s", self.address_string(), fmt % args)


class Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer over IPv4 or IPv6 that counts requests in flight."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, app, bind, port, tls_context=None):
        self.app = app
        self.in_flight = 0
        self.idle = threading.Condition()
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        self.address_family = family
        super().__init__((bind, port), Handler, bind_and_activate=False)
        if family == socket.AF_INET6 and bind == "::":
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise
        if tls_context is not None:
            self.socket = tls_context.wrap_socket(self.socket, server_side=True,
                                                  do_handshake_on_connect=False)

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)   # no reverse DNS lookup of the address
        self.server_name, self.server_port = self.server_address[:2]

    def begin_request(self):
        with self.idle:
            self.in_flight += 1

    def end_request(self):
        with self.idle:
            self.in_flight -= 1
            self.idle.notify_all()

    def drain(self, timeout=30):
        """Wait until no request is being handled (after shutdown stopped accepting)."""
        deadline = time.monotonic() + timeout
        with self.idle:
            while self.in_flight and time.monotonic() < deadline:
                self.idle.wait(deadline - time.monotonic())

    def handle_error(self, request, client_address):
        LOG.exception("error while serving %s", client_address)


# § 18 systemd and signals -----------------------------------------------------

def sd_notify(message, environ=None):
    """Tell systemd (Type=notify) something; a no-op outside systemd."""
    environ = os.environ if environ is None else environ
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
        except OSError as e:
            LOG.warning("cannot notify systemd at %s: %s", environ.get("NOTIFY_SOCKET"), e)
            return False
    return True


def watchdog_loop(stop, environ=None):
    """Pings systemd's watchdog at half its interval, while the process is healthy."""
    environ = os.environ if environ is None else environ
    try:
        interval = int(environ.get("WATCHDOG_USEC", "0")) / 2e6
    except ValueError:
        return
    while interval and not stop.wait(interval):
        sd_notify("WATCHDOG=1", environ)


def reconnect_loop(driver, stop, interval=5.0):
    """Keeps the hypervisor connection open; reads go on while it is down."""
    while not stop.is_set():
        driver.connect()
        stop.wait(interval)


# § 19 main ----------------------------------------------------------------------

def open_store(conf):
    store = Store(conf["data_dir"], conf["journal_max_bytes"])
    fresh = store.open()
    if fresh or not store.data["flavors"]:
        flavors = seed_flavors(conf["flavors"])
        ops = [["set", ["flavors", f["id"]], f] for f in flavors]
        ops.append(["set", ["counters", "flavor"], len(flavors)])
        store.commit(ops)
        LOG.info("loaded %d flavors into a new state in %s", len(flavors), conf["data_dir"])
    return store


def listen(app, conf):
    """The Server on --bind; '::' falls back to 0.0.0.0 on a host without IPv6."""
    try:
        return Server(app, conf["bind"], conf["port"], tls_context(conf))
    except OSError as e:
        if conf["bind"] != "::" or e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
        LOG.warning("no IPv6 on this host: listening on 0.0.0.0 instead of ::")
        conf["bind"] = "0.0.0.0"
        return Server(app, conf["bind"], conf["port"], tls_context(conf))


def tls_context(conf):
    if not conf["tls_cert"]:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(conf["tls_cert"], conf["tls_key"])
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load --tls-cert/--tls-key: {e}") from None
    return context


def setup_logging(debug):
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def main(argv=None):
    """Run the daemon; returns the process exit code."""
    try:
        conf = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"minivan: {e}", file=sys.stderr)
        return 2
    setup_logging(conf["debug"])
    stop = threading.Event()
    try:
        driver = LibvirtDriver(conf["libvirt_uri"], conf["virt_type"])
        store = open_store(conf)
    except (ConfigError, StateError) as e:
        print(f"minivan: {e}", file=sys.stderr)
        return 2
    auth = KeystoneAuth(conf, Clock()) if conf["auth"] == "keystone" else None
    app = App(conf, store, auth=auth, driver=driver)
    try:
        server = listen(app, conf)
    except (OSError, ConfigError) as e:
        store.close()
        print(f"minivan: cannot listen on [{conf['bind']}]:{conf['port']}: {e}", file=sys.stderr)
        return 2
    if conf["auth"] == "noauth":
        LOG.warning("AUTHENTICATION IS OFF (--auth noauth): any caller is admin by default; "
                    "listening on %s only", conf["bind"])
    threading.Thread(target=reconnect_loop, args=(driver, stop), daemon=True,
                     name="libvirt-reconnect").start()
    threading.Thread(target=watchdog_loop, args=(stop,), daemon=True, name="watchdog").start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    scheme = "https" if conf["tls_cert"] else "http"
    LOG.info("minivan serving the compute API %s-%s on %s://[%s]:%d/v2.1 (auth %s, data %s)",
             version_text(MIN_VERSION), version_text(MAX_VERSION), scheme, conf["bind"],
             server.server_port, conf["auth"], conf["data_dir"])
    sd_notify("READY=1\nSTATUS=serving the compute API")
    stop.wait()
    sd_notify("STOPPING=1")
    LOG.info("stopping: no new connections, finishing requests in flight")
    app.stopping = True
    server.shutdown()
    server.server_close()
    server.drain()
    store.close()
    driver.close()
    LOG.info("stopped; state saved in %s", conf["data_dir"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
