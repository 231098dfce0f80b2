"""Tests of minivan.py.

In-process tests call App.handle directly (fast); socket tests run the real
HTTP server on port 0 and talk to it with http.client; end-to-end tests drive
the real OpenStack clients (openstackclient, openstacksdk, novaclient) and
Tempest against a running minivan, in noauth mode and behind a real Keystone.

Run everything with tools/test.sh.  MINIVAN_REQUIRE_E2E=1 turns every skip of
an end-to-end test (a client or Keystone missing) into a failure.
"""

import base64
import uuid
import collections
import contextlib
import datetime
import email.message
import errno
import functools
import hashlib
import http.client
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ElementTree

import minivan

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRE_E2E = os.environ.get("MINIVAN_REQUIRE_E2E") == "1"
SAMPLE_KEY = (
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC1HTrHCbb9NawNLSV8N6tSa8i637+EC2dA+lsdHHfQlT54t+N0"
    "nHhJPlKWDLhc579j87vp6RDFriFJ/smsTnDnf64O12z0kBaJpJPH2zXrBkZFK6q2rmxydURzX/z0yLSCP77SFJ0fd"
    "XWH2hMsAusflGyryHGX20n+mZK6mDrxVzGxEz228dwQ5G7Az5OoZDWygH2pqPvKjkifRw0jwUKf3BbkP0QvANACOk"
    "26cv16mNFpFJfI1N3OC5lUsZQtKGR01ptJoWijYKccqhkAKuo902tg/qup58J5kflNm7I61sy1mJon6SGqNUSfoQa"
    "gqtBH6vd/tU1jnlwZ03uUroAL Generated-by-Nova")
SAMPLE_FINGERPRINT = "44:fe:29:6e:23:14:b9:53:5b:65:82:58:1c:fe:5a:c3"


def skip_or_fail(test, reason):
    """End-to-end prerequisites missing: a skip, or a failure under MINIVAN_REQUIRE_E2E=1."""
    if REQUIRE_E2E:
        test.fail("required end-to-end prerequisite missing: " + reason)
    test.skipTest(reason)


class FakeClock(minivan.Clock):
    def __init__(self):
        self.t = datetime.datetime(2026, 11, 30, 12, 0, 0)

    def now(self):
        return self.t


# -- response checker: every response of every test passes through it ---------

def check_response(test, pipeline, status, headers, body, content_length=None):
    """Header rules of Nova's pipelines, JSON bodies, exact Content-Length."""
    get = {k.lower(): v for k, v in headers}
    all_vary = [v for k, v in headers if k.lower() == "vary"]
    if content_length is not None:
        test.assertEqual(int(get["content-length"]), len(body), "Content-Length is exact")
    if pipeline == "health":
        test.assertTrue(get.get("content-type", "").startswith("text/plain"))
        return
    if body:
        test.assertTrue(get.get("content-type", "").startswith("application/json"),
                        f"JSON content type for {status}")
        json.loads(body)
    if pipeline == "root":
        test.assertNotIn("openstack-api-version", get)
        test.assertNotIn("x-openstack-request-id", get)
        return
    rid = get.get("x-openstack-request-id", "")
    test.assertTrue(rid.startswith("req-"), "request id present")
    if pipeline == "image":                  # Glance's headers: no compute ones
        test.assertNotIn("openstack-api-version", get)
        return
    test.assertEqual(rid, get.get("x-compute-request-id"))
    if pipeline == "v2.1":
        test.assertTrue(get.get("openstack-api-version", "").startswith("compute "))
        test.assertEqual(get["openstack-api-version"].split()[1],
                         get["x-openstack-nova-api-version"])
        test.assertIn("OpenStack-API-Version", all_vary)
        test.assertIn("X-OpenStack-Nova-API-Version", all_vary)
    else:
        test.assertNotIn("openstack-api-version", get)
        test.assertNotIn("x-openstack-nova-api-version", get)


def pipeline_of(path):
    if path.startswith("/healthcheck"):
        return "health"
    if path.startswith("/v2.1"):
        return "v2.1"
    if path.startswith("/image/"):
        return "image"
    if path == "/v2" or path.startswith("/v2/"):
        return "v2"
    return "root"


class Reply:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.raw = status, headers, body

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self):
        return json.loads(self.raw) if self.raw else None


def make_headers(pairs):
    msg = email.message.Message()
    for k, v in pairs.items():
        msg[k] = v
    return msg


TEST_NODE_XML = """<node>
  <cpu><mhz>2000</mhz><model>x86_64</model><active>4</active><nodes>1</nodes>
    <sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>
  <memory>8388608</memory>
  <network><name>default</name><uuid>7f3b2a4c-8d1e-4f6a-9b2c-3d4e5f6a7b8c</uuid>
    <bridge name='virbr0'/><ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp></ip></network>
</node>
"""
TEST_NETWORK_ID = "7f3b2a4c-8d1e-4f6a-9b2c-3d4e5f6a7b8c"


def have_libvirt():
    try:
        minivan.import_libvirt()
        return True
    except minivan.ConfigError:
        return False


def assert_fault(test, reply, status, name, message=None):
    """The reply is Nova's fault body {name: {code, message}} with this status."""
    test.assertEqual(reply.status, status, reply.raw)
    body = reply.json()
    test.assertEqual(list(body), [name], body)
    test.assertEqual(body[name]["code"], status)
    if message is not None:
        test.assertIn(message, body[name]["message"])
    return body[name]["message"]


def compute_request(test, port, method, path, token, body=None, version=None, timeout=30):
    """One compute API call to a minivan on 127.0.0.1:port over a real socket."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"X-Auth-Token": token} if token else {}
    if version:
        headers["OpenStack-API-Version"] = "compute " + version
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, "/v2.1" + path, json.dumps(body) if body is not None else None,
                 headers)
    resp = conn.getresponse()
    data = resp.read()
    if test is not None:
        check_response(test, "v2.1", resp.status, resp.getheaders(), data,
                       content_length=True)
    conn.close()
    return Reply(resp.status, resp.getheaders(), data)


class AppTestCase(unittest.TestCase):
    """An App on a temporary data directory, called in-process, on its own simulated
    libvirt host (libvirt's test driver) when libvirt-python is installed."""

    conf = {}
    with_driver = True

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="minivan-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.clock = FakeClock()
        self.node_xml = os.path.join(self.tmp, "node.xml")
        with open(self.node_xml, "w") as f:
            f.write(TEST_NODE_XML)
        self.start_app()

    def start_app(self):
        conf = minivan.default_config(data_dir=self.tmp, port="8774",
                                      libvirt_uri="test://" + self.node_xml, **self.conf)
        self.store = minivan.open_store(conf)
        driver = None
        if self.with_driver and have_libvirt():
            driver = minivan.LibvirtDriver(conf["libvirt_uri"], "qemu", conf["network"],
                                           conf["instances_dir"], conf["volume_mount_base"])
            driver.connect()
        self.app = minivan.App(conf, self.store, driver=driver, clock=self.clock)

    def restart_app(self):
        self.app.compute.wait_idle()
        self.store.close()
        self.start_app()

    def tearDown(self):
        self.app.compute.wait_idle()
        self.store.close()

    def call(self, method, path, body=None, token="admin:admin", version=None, headers=None,
             raw=None, content_type="application/json"):
        pairs = {"Host": "127.0.0.1:8774"}
        if token is not None:
            pairs["X-Auth-Token"] = token
        if version is not None:
            pairs["OpenStack-API-Version"] = "compute " + version
        if body is not None or raw is not None:
            pairs["Content-Type"] = content_type
        pairs.update(headers or {})
        payload = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                               else b"")
        resp = self.app.handle(method, path, make_headers(pairs), payload)
        ctype = resp.content_type + ("; charset=UTF-8" if resp.status >= 400 else "")
        hdrs = [("Content-Type", ctype)] + resp.headers if resp.payload else resp.headers
        check_response(self, pipeline_of(path), resp.status, hdrs, resp.payload)
        return Reply(resp.status, hdrs, resp.payload)

    def get(self, path, **kw):
        return self.call("GET", path, **kw)

    def post(self, path, body, **kw):
        return self.call("POST", path, body, **kw)

    def put(self, path, body, **kw):
        return self.call("PUT", path, body, **kw)

    def delete(self, path, **kw):
        return self.call("DELETE", path, **kw)

    def assertFault(self, reply, status, name, message=None):
        return assert_fault(self, reply, status, name, message)


# -- configuration --------------------------------------------------------------

class ConfigTests(unittest.TestCase):
    def test_defaults_need_no_arguments(self):
        """With no arguments every setting has a default; noauth binds loopback only."""
        conf = minivan.load_config([], environ={})
        self.assertEqual(conf["port"], 8774)
        self.assertEqual(conf["auth"], "noauth")
        self.assertEqual(conf["bind"], "127.0.0.1")
        self.assertEqual(conf["libvirt_uri"], "qemu:///system")
        self.assertTrue(conf["data_dir"])

    def test_environment_and_command_line_precedence(self):
        """MINIVAN_* environment variables are read; the command line wins over them."""
        conf = minivan.load_config(["--port", "9000"], environ={"MINIVAN_PORT": "9001",
                                                                "MINIVAN_MAX_LIMIT": "5"})
        self.assertEqual(conf["port"], 9000)
        self.assertEqual(conf["max_limit"], 5)

    def test_keystone_mode_binds_all_addresses_and_needs_password(self):
        """A Keystone URL selects keystone auth, which needs the service password."""
        with self.assertRaises(minivan.ConfigError) as e:
            minivan.load_config(["--keystone-url", "http://k/v3"], environ={})
        self.assertIn("MINIVAN_KEYSTONE_PASSWORD", str(e.exception))
        conf = minivan.load_config(["--keystone-url", "http://k/v3"],
                                   environ={"MINIVAN_KEYSTONE_PASSWORD": "pw"})
        self.assertEqual(conf["auth"], "keystone")
        self.assertEqual(conf["bind"], "::")

    def test_config_file_with_password_must_be_private(self):
        """An INI file holding the password is refused unless it is mode 0600."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "minivan.conf")
            with open(path, "w") as f:
                f.write("[minivan]\nkeystone-url = http://k/v3\nkeystone-password = s3cret\n")
            os.chmod(path, 0o644)
            with self.assertRaises(minivan.ConfigError):
                minivan.load_config(["--config", path], environ={})
            os.chmod(path, 0o600)
            conf = minivan.load_config(["--config", path], environ={})
            self.assertEqual(conf["keystone_password"], "s3cret")

    def test_no_password_flag_on_command_line(self):
        """The Keystone password has no command-line flag."""
        with self.assertRaises(SystemExit):
            with open(os.devnull, "w") as devnull:
                old, sys.stderr = sys.stderr, devnull
                try:
                    minivan.load_config(["--keystone-password", "x"], environ={})
                finally:
                    sys.stderr = old

    def test_bad_values_are_one_line_errors(self):
        """A wrong value gives a ConfigError naming the option."""
        for argv in (["--port", "http"], ["--auth", "magic"], ["--tls-cert", "x"],
                     ["--noauth-identity", "nobody"], ["--instance-name-template", "vm"],
                     ["--instance-name-template", "%s-%s"],
                     ["--instance-name-template", "%(name)s"],
                     ["--instance-name-template", "vm-%(hostname)s"],
                     ["--instance-name-template", "a/%08x"]):
            with self.assertRaises(minivan.ConfigError):
                minivan.load_config(argv, environ={})

    def test_main_prints_one_line_for_config_errors(self):
        """main() returns 2 and prints a single line for a configuration error."""
        done = subprocess.run([sys.executable, os.path.join(HERE, "minivan.py"), "--port", "x"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 2)
        self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)

    def test_fixed_key_is_hex(self):
        """fixed-key (Nova's [key_manager] fixed_key) is kept as lowercase hex, the
        passphrase Nova and Cinder derive from it; anything else is a configuration
        error.  A LUKS volume's disk then names its own libvirt secret."""
        conf = minivan.load_config([], environ={"MINIVAN_FIXED_KEY": "00FF" * 16})
        self.assertEqual(conf["fixed_key"], "00ff" * 16)
        for bad in ("xyz", "abc"):
            with self.assertRaises(minivan.ConfigError):
                minivan.load_config([], environ={"MINIVAN_FIXED_KEY": bad})
        with self.assertRaises(SystemExit):     # a secret: never on the command line
            with contextlib.redirect_stderr(io.StringIO()):
                minivan.load_config(["--fixed-key", "00" * 32], environ={})
        vol = {"id": "5a5c0b7e-6a52-4bd8-a4d4-0d2d3c3f8d11", "target": "vdb",
               "encryption": {"format": "luks"},
               "connection_info": {"driver_volume_type": "local",
                                   "data": {"device_path": "/dev/null", "encrypted": True}}}
        xml = minivan.volume_disk_xml(vol, "/tmp")
        secret = minivan.volume_secret_uuid(vol)
        self.assertIn(f"<encryption format='luks'><secret type='passphrase' uuid='{secret}'/>"
                      "</encryption>", xml)
        self.assertIn(f"<volume>{vol['id']}</volume>", minivan.volume_secret_xml(vol))
        self.assertNotIn("<encryption", minivan.volume_disk_xml(
            dict(vol, encryption=None), "/tmp"))

    def test_missing_libvirt_says_how_to_install(self):
        """Without libvirt-python, minivan exits with an install hint on one line."""
        with tempfile.TemporaryDirectory() as tmp:
            blocker = os.path.join(tmp, "libvirt.py")
            with open(blocker, "w") as f:
                f.write("raise ImportError('no libvirt here')\n")
            env = dict(os.environ, PYTHONPATH=tmp, MINIVAN_DATA_DIR=os.path.join(tmp, "d"))
            done = subprocess.run([sys.executable, os.path.join(HERE, "minivan.py")],
                                  capture_output=True, text=True, timeout=60, env=env)
        self.assertEqual(done.returncode, 2)
        self.assertIn("apt install python3-libvirt", done.stderr)
        self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)

    def test_virt_type_detection(self):
        """kvm only with vmx/svm CPU flags and a usable /dev/kvm; --virt-type is checked."""
        with tempfile.TemporaryDirectory() as tmp:
            cpu = os.path.join(tmp, "cpuinfo")
            with open(cpu, "w") as f:
                f.write("processor : 0\nflags : fpu sse2 vmx\n")
            self.assertEqual(minivan.detect_virt_type(cpu, os.path.join(tmp, "nokvm")), "qemu")
            self.assertEqual(minivan.detect_virt_type(cpu, os.devnull), "kvm")
            with open(cpu, "w") as f:
                f.write("processor : 0\nflags : fpu sse2\n")
            self.assertEqual(minivan.detect_virt_type(cpu, os.devnull), "qemu")
        with self.assertRaises(minivan.ConfigError):
            minivan.load_config(["--virt-type", "xen"], environ={})

    def test_readme_documents_every_option(self):
        """README's option table names every option of the OPTIONS table."""
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        self.assertEqual([name for name, _, _ in minivan.OPTIONS
                          if f"`--{name}" not in readme], [])

    def test_help_documents_every_option(self):
        """--help lists every option of the OPTIONS table."""
        done = subprocess.run([sys.executable, os.path.join(HERE, "minivan.py"), "--help"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 0)
        for name, _, _ in minivan.OPTIONS:
            self.assertIn("--" + name, done.stdout)


# -- versions and microversions ------------------------------------------------------

class VersionTests(AppTestCase):
    def test_root_lists_v20_then_v21_without_version_headers(self):
        """GET / lists v2.0 then v2.1 and carries no microversion or request-id headers."""
        r = self.get("/", token=None)
        self.assertEqual(r.status, 200)
        versions = r.json()["versions"]
        self.assertEqual([v["id"] for v in versions], ["v2.0", "v2.1"])
        self.assertEqual(versions[1]["version"], "2.104")
        self.assertEqual(versions[1]["min_version"], "2.1")
        self.assertEqual(versions[1]["links"][0]["href"], "http://127.0.0.1:8774/v2.1/")

    def test_v21_document_is_unauthenticated(self):
        """GET /v2.1 and /v2.1/ answer the version document without a token."""
        for path in ("/v2.1", "/v2.1/"):
            r = self.get(path, token=None)
            self.assertEqual(r.status, 200)
            doc = r.json()["version"]
            self.assertEqual(doc["id"], "v2.1")
            self.assertEqual(doc["media-types"][0]["type"],
                             "application/vnd.openstack.compute+json;version=2.1")

    def test_v2_document_is_legacy(self):
        """GET /v2 and /v2/ answer the deprecated v2.0 document without version headers."""
        for path in ("/v2", "/v2/"):
            r = self.get(path, token=None)
            self.assertEqual(r.json()["version"]["status"], "DEPRECATED")

    def test_project_version_document_needs_token(self):
        """GET /v2.1/{project_id}/ is the version document, behind auth."""
        self.assertFault(self.get("/v2.1/admin/", token=None), 401, "unauthorized")
        r = self.get("/v2.1/admin/")
        self.assertEqual(r.json()["version"]["id"], "v2.1")

    def test_versions_show(self):
        """GET /v2.1/versions/v2.1 is the single version; unknown ids are 404."""
        self.assertEqual(self.get("/v2.1/versions/v2.1").json()["version"]["id"], "v2.1")
        self.assertFault(self.get("/v2.1/versions/v9"), 404, "itemNotFound")

    def test_other_paths_are_multiple_choices(self):
        """Paths outside /v2 and /v2.1 answer 300 with the choices document."""
        r = self.get("/v3/foo", token=None)
        self.assertEqual(r.status, 300)
        self.assertEqual([c["id"] for c in r.json()["choices"]], ["v2.0", "v2.1"])

    def test_no_header_means_21_and_latest_means_max(self):
        """No header is 2.1; 'latest' is 2.104; the effective version is echoed."""
        self.assertEqual(self.get("/v2.1/flavors").header("X-OpenStack-Nova-API-Version"), "2.1")
        r = self.get("/v2.1/flavors", version="latest")
        self.assertEqual(r.header("OpenStack-API-Version"), "compute 2.104")

    def test_standard_header_wins_over_legacy(self):
        """OpenStack-API-Version wins over X-OpenStack-Nova-API-Version."""
        r = self.get("/v2.1/flavors", headers={"OpenStack-API-Version": "compute 2.55",
                                               "X-OpenStack-Nova-API-Version": "2.60"})
        self.assertEqual(r.header("X-OpenStack-Nova-API-Version"), "2.55")
        r = self.get("/v2.1/flavors", headers={"X-OpenStack-Nova-API-Version": "2.60"})
        self.assertEqual(r.header("X-OpenStack-Nova-API-Version"), "2.60")
        r = self.get("/v2.1/flavors", headers={"OpenStack-API-Version": "compute 2.3, volume 3.0"})
        self.assertEqual(r.header("X-OpenStack-Nova-API-Version"), "2.3")

    def test_malformed_version_is_400(self):
        """A malformed version string is 400 badRequest with Nova's message."""
        for bad in ("2.x", "2", "v2.1", "2.01"):
            r = self.get("/v2.1/flavors", version=bad)
            self.assertFault(r, 400, "badRequest", "is of invalid format")

    def test_out_of_range_version_is_406(self):
        """A version outside 2.1-2.104 is 406 computeFault echoing the version."""
        r = self.get("/v2.1/flavors", version="9.99")
        self.assertFault(r, 406, "computeFault", "Version 9.99 is not supported by the API. "
                         "Minimum is 2.1 and maximum is 2.104.")
        self.assertEqual(r.header("OpenStack-API-Version"), "compute 9.99")
        self.assertFault(self.get("/v2.1/flavors", version="2.0"), 406, "computeFault")

    def test_legacy_v2_ignores_microversion_headers(self):
        """The /v2 pipeline ignores microversion headers and answers as 2.1."""
        r = self.get("/v2/flavors/1", version="2.75")
        self.assertEqual(r.json()["flavor"]["swap"], "")
        self.assertIsNone(r.header("OpenStack-API-Version"))

    def test_healthcheck_is_plain_text(self):
        """GET /healthcheck answers OK in plain text without auth."""
        r = self.get("/healthcheck", token=None)
        self.assertEqual((r.status, r.raw), (200, b"OK"))


# -- routing ------------------------------------------------------------------------

def load_reference_routes():
    path = os.path.join(HERE, "..", "shared", "nova-api", "routes.tsv")
    if not os.path.exists(path):
        return None
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f.read().splitlines()[5:]:
            cols = line.split("\t")
            rows.append((cols[0], cols[1], cols[2] or None))
    return rows


class RoutingTests(AppTestCase):
    def test_table_holds_every_nova_route(self):
        """ROUTES has one row per route of Nova's routes.tsv, none extra."""
        reference = load_reference_routes()
        if reference is None:
            self.skipTest("reference routes.tsv not beside the checkout")
        mine = {(r.method, r.path, r.action) for r in minivan.ROUTES}
        self.assertEqual(mine, set(reference))

    def test_every_route_answers_without_500(self):
        """Every row of ROUTES answers: built, 501, 410 or a 4xx — never a 500."""
        for route in minivan.ROUTES:
            path = "/v2.1" + "/".join([""] + [("x" if s.startswith("{") else s)
                                              for s in route.segments])
            body = {route.action: {}} if route.action else ({} if route.method in ("POST", "PUT")
                                                            else None)
            r = self.call(route.method, path or "/v2.1/", body=body, version="latest")
            self.assertLess(r.status, 500 if route.built or route.gone else 502,
                            f"{route.method} {route.path} {route.action}: {r.raw[:200]}")
            if not route.built and not route.gone and route.max == minivan.MAX_VERSION:
                self.assertIn(r.status, (400, 404, 501), f"{route.method} {route.path}")

    def test_removed_api_is_410(self):
        """Removed APIs answer 410 at every microversion."""
        self.assertFault(self.get("/v2.1/os-cells"), 410, "computeFault")
        self.assertFault(self.get("/v2.1/os-fping", version="2.1"), 410, "computeFault")

    def test_unknown_path_is_404(self):
        """An unknown path is 404 itemNotFound."""
        self.assertFault(self.get("/v2.1/admin/no-such-thing"), 404, "itemNotFound")
        self.assertFault(self.get("/v2.1/flavors/1/nothing"), 404, "itemNotFound")

    def test_wrong_method_is_405_with_allow(self):
        """A known path with a wrong method is 405 badMethod with Allow."""
        r = self.call("PATCH", "/v2.1/flavors")
        self.assertFault(r, 405, "badMethod")
        self.assertEqual(r.header("Allow"), "GET, HEAD, POST")

    def test_outside_microversion_range_is_404(self):
        """PUT /flavors/{id} exists from 2.55: below it is 404."""
        r = self.put("/v2.1/flavors/1", {"flavor": {"description": "x"}}, version="2.54")
        self.assertFault(r, 404, "itemNotFound")
        self.assertFault(self.get("/v2.1/images", version="2.36"), 404, "itemNotFound")

    def test_static_path_wins_over_dynamic(self):
        """/flavors/detail is the detail list, not the flavor 'detail'."""
        r = self.get("/v2.1/flavors/detail")
        self.assertIn("flavors", r.json())

    def test_project_prefix(self):
        """Routes answer under /v2.1/{project_id}; another project's id is 400."""
        r = self.get("/v2.1/admin/flavors")
        self.assertIn("/v2.1/admin/flavors/", r.json()["flavors"][0]["links"][0]["href"])
        self.assertFault(self.get("/v2.1/other/flavors"), 400, "badRequest",
                         "Malformed request URL: URL's project_id 'other' doesn't match "
                         "Context's project_id 'admin'")

    def test_json_suffix_is_part_of_the_id(self):
        """A .json suffix is not stripped (as Nova's router): it is part of the id."""
        self.assertFault(self.get("/v2.1/flavors/1.json"), 404, "itemNotFound")

    def test_action_dispatch(self):
        """POST .../action: one key dispatches; unknown and several keys are 400."""
        self.assertFault(self.post("/v2.1/flavors/1/action", {"nope": {}}), 400, "badRequest",
                         "There is no such action: nope")
        self.assertFault(self.post("/v2.1/flavors/1/action", {"a": 1, "b": 2}), 400,
                         "badRequest", "Malformed request body")

    def test_malformed_json_and_media_type(self):
        """A non-JSON body is 400; a wrong Content-Type is 415."""
        self.assertFault(self.call("POST", "/v2.1/flavors", raw=b"{nope"), 400, "badRequest",
                         "Malformed request body")
        self.assertFault(self.call("POST", "/v2.1/flavors", raw=b"<x/>",
                                   content_type="application/xml"), 415, "badMediaType")
        r = self.call("POST", "/v2.1/flavors", raw=b"", content_type="text/plain")
        self.assertFault(r, 400, "badRequest")

    def test_hostile_json(self):
        """NaN, deep nesting and invalid UTF-8 are malformed bodies (400), never a 500."""
        for raw in (b'{"flavor": {"name": "x", "ram": 1, "vcpus": 1, "disk": 1, "rxtx_factor": NaN}}',
                    b"[" * 5000 + b"]" * 5000, b'{"flavor": ' + b'{"a": ' * 100 + b"1" + b"}" * 101,
                    b"\xff\xfe{}", b'{"flavor": {"name": "' + b"[" * 90000 + b'"}}'):
            r = self.call("POST", "/v2.1/flavors", raw=raw)
            self.assertEqual(r.status, 400, raw[:80])
        deep = {"extra_specs": {"k": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}}
        self.assertFault(self.post("/v2.1/flavors/1/os-extra_specs", deep), 400, "badRequest")

    def test_shutting_down_is_503(self):
        """Requests that arrive while minivan stops are answered 503."""
        self.app.stopping = True
        self.assertFault(self.get("/v2.1/flavors"), 503, "serviceUnavailable")

    def test_head_is_get_without_body(self):
        """HEAD answers like GET."""
        r = self.call("HEAD", "/v2.1/flavors/1")
        self.assertEqual(r.status, 200)

    def test_unexpected_exception_is_500_without_internals(self):
        """A handler crash is a 500 computeFault naming only the exception class."""
        route = next(r for r in minivan.ROUTES if r.handler_name == "flavors_show")
        saved = route.handler
        route.handler = lambda req: 1 / 0
        try:
            with self.assertLogs("minivan", "ERROR"):
                r = self.get("/v2.1/flavors/1")
        finally:
            route.handler = saved
        message = self.assertFault(r, 500, "computeFault")
        self.assertIn("ZeroDivisionError", message)
        self.assertNotIn("Traceback", message)
        self.assertEqual(self.get("/v2.1/flavors/1").status, 200)



class LoggingTests(AppTestCase):
    conf = {"debug": "true"}

    def test_request_id_in_every_log_line(self):
        """Every log line written while handling a request carries its request id."""
        handler = minivan.logging.Handler()
        records = []
        handler.emit = records.append
        handler.addFilter(minivan.RequestIdFilter())
        minivan.LOG.addHandler(handler)
        old_level = minivan.LOG.level
        minivan.LOG.setLevel(minivan.logging.DEBUG)
        try:
            r = self.post("/v2.1/os-keypairs", {"keypair": {"name": "k"}})
        finally:
            minivan.LOG.removeHandler(handler)
            minivan.LOG.setLevel(old_level)
        rid = r.header("x-openstack-request-id")
        self.assertTrue(records)
        self.assertEqual({rec.request_id for rec in records}, {rid})
        text = "\n".join(rec.getMessage() for rec in records)
        self.assertNotIn("PRIVATE KEY", text)
        self.assertNotIn("admin:admin", text)
        self.assertIn('"private_key": "***"', text)


class FuzzTests(AppTestCase):
    def test_bad_bodies_never_500(self):
        """Every built route answers odd bodies and ids with a 4xx, never a 500."""
        bodies = [None, [], "x", 1, True, {}, {"x": None}, {"flavor": None}, {"flavor": []},
                  {"flavor": {"name": None, "ram": {}, "vcpus": [], "disk": "1e3"}},
                  {"keypair": {"name": ["x"], "public_key": {}}}, {"quota_set": {"cores": None}},
                  {"quota_class_set": []}, {"extra_specs": {"k": None}}, {"extra_specs": []},
                  {"k": {"nested": 1}}, {"addTenantAccess": None},
                  {"removeTenantAccess": {"tenant": 5}}]
        ids = ["1", "nope", "%00", "x" * 300, "..", "%2F"]
        for route in minivan.ROUTES:
            if not route.built:
                continue
            for ident in ids:
                path = "/v2.1" + "".join("/" + (ident if s.startswith("{") else s)
                                         for s in route.segments)
                for body in (bodies if route.method in ("POST", "PUT") else [None]):
                    for version in ("2.1", "2.60", "latest"):
                        r = self.call(route.method, path or "/v2.1/", body=body,
                                      version=version)
                        self.assertLess(r.status, 500, f"{route.method} {path} {body}: {r.raw}")
        self.assertIsNone(self.store.broken)
        self.restart_app()
        self.assertEqual(self.get("/v2.1/flavors/2").status, 200)


# -- identity and policy --------------------------------------------------------------

class NoAuthTests(AppTestCase):
    def test_missing_token_is_401(self):
        """No X-Auth-Token is 401."""
        self.assertFault(self.get("/v2.1/flavors", token=None), 401, "unauthorized")

    def test_user_project_token(self):
        """user:project names the caller; only 'admin' gets the admin role."""
        self.assertFault(self.post("/v2.1/flavors", {"flavor": {
            "name": "x", "ram": 1, "vcpus": 1, "disk": 0}}, token="demo:demo"), 403, "forbidden",
            "Policy doesn't allow os_compute_api:os-flavor-manage:create to be performed.")
        r = self.get("/v2.1/os-keypairs", token="demo:demo")
        self.assertEqual(r.status, 200)

    def test_other_tokens_use_default_identity(self):
        """Any other token (openstackclient's 'notused') is the default identity, admin."""
        r = self.get("/v2.1/os-availability-zone/detail", token="notused")
        self.assertEqual(r.status, 200)

    def test_member_on_admin_route_is_403(self):
        """A member calling an admin-only route is 403 forbidden."""
        self.assertFault(self.get("/v2.1/os-availability-zone/detail", token="demo:demo"),
                         403, "forbidden")
        self.assertFault(self.get("/v2.1/os-quota-class-sets/default", token="demo:demo"),
                         403, "forbidden")

    def test_noauth_answers_only_loopback_hosts(self):
        """In noauth, a request addressed to another host name (DNS rebinding: a web page
        whose name now points at 127.0.0.1) is refused with 403; loopback names and
        addresses are answered; --noauth-allow-remote answers any."""
        for host in ("127.0.0.1:8774", "localhost:8774", "[::1]:8774", "127.1.2.3",
                     "localhost"):
            self.assertEqual(self.get("/v2.1/flavors", headers={"Host": host}).status, 200,
                             host)
        for host in ("attacker.example:8774", "10.0.0.5:8774", "[fe80::1]:8774",
                     "127.0.0.1.attacker.example"):
            self.assertFault(self.get("/v2.1/flavors", headers={"Host": host}), 403,
                             "forbidden")
            r = self.call("POST", "/image/v2/images", {"name": "x"}, headers={"Host": host})
            self.assertEqual(r.status, 403)
        self.app.conf["noauth_allow_remote"] = True
        self.assertEqual(self.get("/v2.1/flavors",
                                  headers={"Host": "attacker.example"}).status, 200)

    def test_noauth_listens_on_loopback_only(self):
        """noauth with a --bind that is not loopback is a start-up error, unless
        --noauth-allow-remote says the operator wants an open admin API."""
        for bind in ("0.0.0.0", "::", "192.0.2.10"):
            with self.assertRaisesRegex(minivan.ConfigError, "listens only on a loopback"):
                minivan.default_config(bind=bind, data_dir=self.tmp)
        for bind in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
            minivan.default_config(bind=bind, data_dir=self.tmp)
        minivan.default_config(bind="0.0.0.0", noauth_allow_remote="true", data_dir=self.tmp)
        minivan.default_config(bind="0.0.0.0", auth="keystone", keystone_url="http://k/v3",
                               keystone_password="x", data_dir=self.tmp)


# -- flavors --------------------------------------------------------------------------

class FlavorTests(AppTestCase):
    def create(self, version=None, token="admin:admin", **fields):
        spec = {"name": "f1", "ram": 128, "vcpus": 1, "disk": 1}
        spec.update(fields)
        return self.post("/v2.1/flavors", {"flavor": spec}, version=version, token=token)

    def test_default_flavors(self):
        """The built-in set: m1.tiny..m1.xlarge (1-5) and the seed's small/big (100/200)."""
        flavors = {f["id"]: f["name"] for f in self.get("/v2.1/flavors").json()["flavors"]}
        self.assertEqual(flavors, {"1": "m1.tiny", "2": "m1.small", "3": "m1.medium",
                                   "4": "m1.large", "5": "m1.xlarge", "100": "small",
                                   "200": "big"})

    def test_flavors_json_matches_builtin(self):
        """flavors.json ships the same set as the built-in default."""
        with open(os.path.join(HERE, "flavors.json")) as f:
            rows = json.load(f)
        self.assertEqual([(r["id"], r["name"], r["ram"], r["vcpus"], r["disk"]) for r in rows],
                         [tuple(row) for row in minivan.BUILTIN_FLAVORS])

    def test_show_shapes_by_microversion(self):
        """swap is '' below 2.75; description from 2.55; extra_specs from 2.61; no
        rxtx_factor/disabled from 2.102."""
        f = self.get("/v2.1/flavors/1").json()["flavor"]
        self.assertEqual((f["swap"], f["rxtx_factor"], f["OS-FLV-DISABLED:disabled"]),
                         ("", 1.0, False))
        self.assertNotIn("description", f)
        f = self.get("/v2.1/flavors/1", version="2.55").json()["flavor"]
        self.assertIsNone(f["description"])
        self.assertNotIn("extra_specs", f)
        f = self.get("/v2.1/flavors/1", version="2.61").json()["flavor"]
        self.assertEqual(f["extra_specs"], {})
        f = self.get("/v2.1/flavors/1", version="2.75").json()["flavor"]
        self.assertEqual(f["swap"], 0)
        f = self.get("/v2.1/flavors/1", version="2.102").json()["flavor"]
        self.assertNotIn("rxtx_factor", f)
        self.assertNotIn("OS-FLV-DISABLED:disabled", f)

    def test_list_filters(self):
        """minRam/minDisk filter; bad values are 400."""
        ids = [f["id"] for f in self.get("/v2.1/flavors?minRam=8192").json()["flavors"]]
        self.assertEqual(sorted(ids), ["4", "5"])
        ids = [f["id"] for f in self.get("/v2.1/flavors/detail?minDisk=80").json()["flavors"]]
        self.assertEqual(sorted(ids), ["4", "5"])
        self.assertFault(self.get("/v2.1/flavors?minRam=lots"), 400, "badRequest")
        self.assertFault(self.get("/v2.1/flavors?sort_key=nope"), 400, "badRequest")
        self.assertFault(self.get("/v2.1/flavors?sort_dir=up"), 400, "badRequest")

    def test_sort(self):
        """sort_key/sort_dir order the list."""
        names = [f["name"] for f in self.get(
            "/v2.1/flavors/detail?sort_key=memory_mb&sort_dir=desc").json()["flavors"]]
        self.assertEqual(names[0], "m1.xlarge")
        self.assertEqual(names[-1], "m1.tiny")

    def test_pagination_links(self):
        """limit/marker page through the list with next links."""
        r = self.get("/v2.1/flavors?limit=3").json()
        self.assertEqual(len(r["flavors"]), 3)
        href = r["flavors_links"][0]["href"]
        self.assertTrue(href.startswith("http://127.0.0.1:8774/v2.1/flavors?limit=3&marker="))
        seen = [f["id"] for f in r["flavors"]]
        while "flavors_links" in r:
            query = r["flavors_links"][0]["href"].split("?", 1)[1]
            r = self.get("/v2.1/flavors?" + query).json()
            seen += [f["id"] for f in r["flavors"]]
        self.assertEqual(len(seen), 7)
        self.assertEqual(len(set(seen)), 7)
        r = self.get("/v2.1/flavors/detail?limit=2").json()
        self.assertIn("/v2.1/flavors/detail?limit=2&marker=", r["flavors_links"][0]["href"])
        self.assertFault(self.get("/v2.1/flavors?marker=nope"), 400, "badRequest",
                         "marker [nope] not found")
        self.assertFault(self.get("/v2.1/flavors?limit=-1"), 400, "badRequest")
        self.assertFault(self.get("/v2.1/flavors?limit=x"), 400, "badRequest")

    def test_unknown_query_strict_from_275(self):
        """Unknown list parameters are ignored below 2.75 and rejected from 2.75."""
        self.assertEqual(self.get("/v2.1/flavors?foo=1", version="2.74").status, 200)
        self.assertFault(self.get("/v2.1/flavors?foo=1", version="2.75"), 400, "badRequest")

    def test_create_show_delete(self):
        """An admin creates a flavor, sees it, deletes it (202), and it is gone."""
        r = self.create(id="10", name="test", ram=1024, vcpus=2, disk=10, swap=512)
        self.assertEqual(r.status, 200)
        f = r.json()["flavor"]
        self.assertEqual((f["id"], f["ram"], f["swap"], f["os-flavor-access:is_public"]),
                         ("10", 1024, 512, True))
        self.assertEqual(self.get("/v2.1/flavors/10").json()["flavor"]["name"], "test")
        self.assertEqual(self.delete("/v2.1/flavors/10").status, 202)
        self.assertFault(self.get("/v2.1/flavors/10"), 404, "itemNotFound",
                         "Flavor 10 could not be found.")
        self.assertFault(self.delete("/v2.1/flavors/10"), 404, "itemNotFound")

    def test_create_generates_uuid_and_accepts_strings(self):
        """Without id a UUID is generated; numeric strings are accepted."""
        f = self.create(ram="256", vcpus="2", disk="0").json()["flavor"]
        self.assertTrue(minivan.is_uuid_like(f["id"]))
        self.assertEqual((f["ram"], f["vcpus"]), (256, 2))

    def test_create_conflicts(self):
        """A duplicate id or name is 409."""
        self.create(id="x1", name="dup")
        self.assertFault(self.create(id="x1", name="other"), 409, "conflictingRequest",
                         "Flavor with ID x1 already exists.")
        self.assertFault(self.create(id="x2", name="dup"), 409, "conflictingRequest",
                         "Flavor with name dup already exists.")

    def test_create_validation(self):
        """Bad fields are 400 naming the field; nothing is stored."""
        before = len(self.get("/v2.1/flavors").json()["flavors"])
        cases = [dict(ram=0), dict(ram=-1), dict(vcpus=0), dict(disk=-1), dict(ram="1.5"),
                 dict(name=""), dict(name=" lead"), dict(name="x" * 256), dict(id=""),
                 dict(id=" x"), dict(swap=-1), dict(rxtx_factor=0),
                 dict(**{"os-flavor-access:is_public": "maybe"}), dict(extra=1), dict(ram=True)]
        for fields in cases:
            self.assertFault(self.create(**fields), 400, "badRequest")
        r = self.create(ram="abc")
        self.assertIn("ram", self.assertFault(r, 400, "badRequest"))
        self.assertFault(self.post("/v2.1/flavors", {"flavour": {}}), 400, "badRequest")
        self.assertEqual(len(self.get("/v2.1/flavors").json()["flavors"]), before)

    def test_description_from_255(self):
        """description is accepted from 2.55 and updated with PUT."""
        self.assertFault(self.create(description="d"), 400, "badRequest")
        f = self.create(version="2.55", id="d1", description="first").json()["flavor"]
        self.assertEqual(f["description"], "first")
        r = self.put("/v2.1/flavors/d1", {"flavor": {"description": "second"}}, version="2.55")
        self.assertEqual(r.json()["flavor"]["description"], "second")
        self.assertFault(self.put("/v2.1/flavors/d1", {"flavor": {"name": "x"}}, version="2.55"),
                         400, "badRequest")
        self.assertFault(self.put("/v2.1/flavors/nope", {"flavor": {"description": None}},
                                  version="2.55"), 404, "itemNotFound")

    def test_rxtx_factor_rejected_from_2102(self):
        """rxtx_factor is not accepted on create from 2.102."""
        self.assertFault(self.create(version="2.102", rxtx_factor=1.0), 400, "badRequest")
        ids = [f["id"] for f in self.get("/v2.1/flavors?name=m1.tiny",
                                         version="2.102").json()["flavors"]]
        self.assertEqual(ids, ["1"])

    def test_private_flavor_visibility_and_access(self):
        """Private flavors: hidden from other projects until access is added."""
        self.create(id="p1", name="private", **{"os-flavor-access:is_public": False})
        self.assertFault(self.get("/v2.1/flavors/p1", token="demo:demo"), 404, "itemNotFound")
        ids = [f["id"] for f in self.get("/v2.1/flavors", token="demo:demo").json()["flavors"]]
        self.assertNotIn("p1", ids)
        admin_ids = [f["id"] for f in self.get("/v2.1/flavors").json()["flavors"]]
        self.assertNotIn("p1", admin_ids)
        admin_all = [f["id"] for f in self.get("/v2.1/flavors?is_public=none").json()["flavors"]]
        self.assertIn("p1", admin_all)
        only_private = [f["id"] for f in
                        self.get("/v2.1/flavors?is_public=false").json()["flavors"]]
        self.assertEqual(only_private, ["p1"])
        self.assertFault(self.get("/v2.1/flavors?is_public=perhaps"), 400, "badRequest")
        r = self.post("/v2.1/flavors/p1/action", {"addTenantAccess": {"tenant": "demo"}})
        self.assertEqual(r.json(), {"flavor_access": [{"flavor_id": "p1", "tenant_id": "demo"}]})
        self.assertFault(self.post("/v2.1/flavors/p1/action",
                                   {"addTenantAccess": {"tenant": "demo"}}), 409,
                         "conflictingRequest")
        self.assertEqual(self.get("/v2.1/flavors/p1", token="demo:demo").status, 200)
        ids = [f["id"] for f in self.get("/v2.1/flavors", token="demo:demo").json()["flavors"]]
        self.assertIn("p1", ids)
        listed = self.get("/v2.1/flavors/p1/os-flavor-access").json()["flavor_access"]
        self.assertEqual(listed, [{"flavor_id": "p1", "tenant_id": "demo"}])
        r = self.post("/v2.1/flavors/p1/action", {"removeTenantAccess": {"tenant": "demo"}})
        self.assertEqual(r.json(), {"flavor_access": []})
        self.assertFault(self.post("/v2.1/flavors/p1/action",
                                   {"removeTenantAccess": {"tenant": "demo"}}), 404,
                         "itemNotFound")
        self.assertFault(self.get("/v2.1/flavors/p1", token="demo:demo"), 404, "itemNotFound")

    def test_public_flavor_access(self):
        """Public flavors have no access list (404) and refuse access from 2.7 (409)."""
        self.assertFault(self.get("/v2.1/flavors/1/os-flavor-access"), 404, "itemNotFound",
                         "Access list not available for public flavors.")
        self.assertFault(self.post("/v2.1/flavors/1/action", {"addTenantAccess": {"tenant": "x"}},
                                   version="2.7"), 409, "conflictingRequest")

    def test_extra_specs_crud(self):
        """Extra specs: set, list, show, update one, delete; numbers become strings."""
        r = self.post("/v2.1/flavors/1/os-extra_specs",
                      {"extra_specs": {"hw:cpu_policy": "shared", "key1": 5}})
        self.assertEqual(r.json(), {"extra_specs": {"hw:cpu_policy": "shared", "key1": 5}})
        self.assertEqual(self.get("/v2.1/flavors/1/os-extra_specs", token="demo:demo").json(),
                         {"extra_specs": {"hw:cpu_policy": "shared", "key1": "5"}})
        self.assertEqual(self.get("/v2.1/flavors/1/os-extra_specs/key1").json(), {"key1": "5"})
        r = self.put("/v2.1/flavors/1/os-extra_specs/key1", {"key1": "6"})
        self.assertEqual(r.json(), {"key1": "6"})
        self.assertFault(self.put("/v2.1/flavors/1/os-extra_specs/key1", {"key2": "6"}), 400,
                         "badRequest", "Request body and URI mismatch")
        self.assertFault(self.put("/v2.1/flavors/1/os-extra_specs/key1",
                                  {"key1": "6", "key2": "7"}), 400, "badRequest")
        self.assertEqual(self.delete("/v2.1/flavors/1/os-extra_specs/key1").status, 200)
        self.assertFault(self.get("/v2.1/flavors/1/os-extra_specs/key1"), 404, "itemNotFound")
        f = self.get("/v2.1/flavors/1", version="2.61").json()["flavor"]
        self.assertEqual(f["extra_specs"], {"hw:cpu_policy": "shared"})
        self.assertFault(self.post("/v2.1/flavors/1/os-extra_specs", {"extra_specs": {"a": "b"}},
                                   token="demo:demo"), 403, "forbidden")
        self.assertFault(self.post("/v2.1/flavors/1/os-extra_specs",
                                   {"extra_specs": {"bad/key": "x"}}), 400, "badRequest")
        self.assertFault(self.get("/v2.1/flavors/nope/os-extra_specs"), 404, "itemNotFound")

    def test_extra_spec_validation_from_286(self):
        """From 2.86 unknown keys of known namespaces and bad values are 400."""
        body = {"extra_specs": {"hw:no_such_thing": "1"}}
        self.assertEqual(self.post("/v2.1/flavors/1/os-extra_specs", body,
                                   version="2.85").status, 200)
        self.assertFault(self.post("/v2.1/flavors/1/os-extra_specs", body, version="2.86"),
                         400, "badRequest")
        self.assertFault(self.post("/v2.1/flavors/1/os-extra_specs",
                                   {"extra_specs": {"hw:cpu_policy": "sometimes"}},
                                   version="2.86"), 400, "badRequest")
        ok = {"extra_specs": {"hw:numa_nodes": "2", "custom:thing": "x", "plain": "y"}}
        self.assertEqual(self.post("/v2.1/flavors/1/os-extra_specs", ok,
                                   version="2.86").status, 200)


# -- keypairs -------------------------------------------------------------------------

class KeypairTests(AppTestCase):
    def test_import_and_fingerprint(self):
        """Importing a public key stores it with Nova's MD5 fingerprint."""
        r = self.post("/v2.1/os-keypairs", {"keypair": {"name": "k1", "public_key": SAMPLE_KEY}})
        self.assertEqual(r.status, 200)
        kp = r.json()["keypair"]
        self.assertEqual(kp["fingerprint"], SAMPLE_FINGERPRINT)
        self.assertEqual(kp["user_id"], "admin")
        self.assertNotIn("type", kp)
        self.assertNotIn("private_key", kp)

    def test_status_codes_by_version(self):
        """Create is 200 at 2.1 and 201 from 2.2; delete is 202 then 204."""
        body = {"keypair": {"name": "k2", "public_key": SAMPLE_KEY}}
        self.assertEqual(self.post("/v2.1/os-keypairs", body, version="2.2").status, 201)
        self.assertEqual(self.delete("/v2.1/os-keypairs/k2", version="2.2").status, 204)
        self.assertEqual(self.post("/v2.1/os-keypairs", body).status, 200)
        self.assertEqual(self.delete("/v2.1/os-keypairs/k2").status, 202)

    def test_generate_ssh(self):
        """Without public_key (below 2.92) a key pair is generated with a private key."""
        kp = self.post("/v2.1/os-keypairs", {"keypair": {"name": "gen"}}).json()["keypair"]
        self.assertTrue(kp["private_key"].startswith("-----BEGIN RSA PRIVATE KEY-----"))
        self.assertTrue(kp["public_key"].startswith("ssh-rsa "))
        self.assertEqual(kp["fingerprint"], minivan.ssh_fingerprint(kp["public_key"]))
        shown = self.get("/v2.1/os-keypairs/gen").json()["keypair"]
        self.assertNotIn("private_key", shown)

    def test_generate_pure_python_keys(self):
        """The pure-Python RSA fallback makes a valid OpenSSH key and PEM private key."""
        saved = minivan.shutil.which
        minivan.shutil.which = lambda name: None
        try:
            private, public = minivan.generate_ssh_keypair()
        finally:
            minivan.shutil.which = saved
        minivan.ssh_fingerprint(public)
        self.assertIn("BEGIN RSA PRIVATE KEY", private)
        if shutil.which("ssh-keygen"):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "k")
                with open(path, "w") as f:
                    f.write(private)
                os.chmod(path, 0o600)
                derived = subprocess.run(["ssh-keygen", "-y", "-f", path], capture_output=True,
                                         text=True, check=True).stdout
            self.assertEqual(derived.split()[1], public.split()[1])

    def test_generate_x509(self):
        """type x509 without public_key generates a certificate and SHA1 fingerprint."""
        self.clock.t = datetime.datetime(2026, 1, 1)
        kp = self.post("/v2.1/os-keypairs", {"keypair": {"name": "cert", "type": "x509"}},
                       version="2.2").json()["keypair"]
        self.assertIn("BEGIN CERTIFICATE", kp["public_key"])
        self.assertEqual(len(kp["fingerprint"].split(":")), 20)
        if shutil.which("openssl"):
            out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha1"],
                                 input=kp["public_key"], capture_output=True, text=True,
                                 check=True).stdout
            self.assertEqual(out.strip().split("=", 1)[1].lower(), kp["fingerprint"])
            with tempfile.NamedTemporaryFile("w", suffix=".pem") as cert:
                cert.write(kp["public_key"])
                cert.flush()
                verify = subprocess.run(["openssl", "verify", "-CAfile", cert.name, cert.name],
                                        capture_output=True, text=True)
            self.assertIn(": OK", verify.stdout, verify.stderr)

    def test_list_show_delete(self):
        """List wraps each item in 'keypair'; show has id and timestamps."""
        self.post("/v2.1/os-keypairs", {"keypair": {"name": "b", "public_key": SAMPLE_KEY}})
        self.post("/v2.1/os-keypairs", {"keypair": {"name": "a", "public_key": SAMPLE_KEY}})
        items = self.get("/v2.1/os-keypairs").json()["keypairs"]
        self.assertEqual([i["keypair"]["name"] for i in items], ["a", "b"])
        self.assertEqual(set(items[0]["keypair"]), {"name", "public_key", "fingerprint"})
        shown = self.get("/v2.1/os-keypairs/a", version="2.2").json()["keypair"]
        self.assertEqual(shown["type"], "ssh")
        self.assertEqual((shown["deleted"], shown["deleted_at"], shown["updated_at"]),
                         (False, None, None))
        self.assertIsInstance(shown["id"], int)
        self.assertFault(self.get("/v2.1/os-keypairs/zzz"), 404, "itemNotFound")
        self.assertFault(self.delete("/v2.1/os-keypairs/zzz"), 404, "itemNotFound")

    def test_keypairs_belong_to_users(self):
        """Another user of the same project does not see my keypairs."""
        self.post("/v2.1/os-keypairs", {"keypair": {"name": "mine", "public_key": SAMPLE_KEY}},
                  token="alice:demo")
        self.assertEqual(self.get("/v2.1/os-keypairs", token="bob:demo").json()["keypairs"], [])
        self.assertFault(self.get("/v2.1/os-keypairs/mine", token="bob:demo"), 404,
                         "itemNotFound")
        self.assertEqual(len(self.get("/v2.1/os-keypairs", token="alice:other")
                             .json()["keypairs"]), 1)

    def test_admin_user_id_from_210(self):
        """Admins name another user with user_id from 2.10; members get 403."""
        self.post("/v2.1/os-keypairs", {"keypair": {"name": "k", "public_key": SAMPLE_KEY,
                                                    "user_id": "alice"}}, version="2.10")
        items = self.get("/v2.1/os-keypairs?user_id=alice", version="2.10").json()["keypairs"]
        self.assertEqual(len(items), 1)
        self.assertEqual(self.get("/v2.1/os-keypairs/k?user_id=alice", token="alice:p",
                                  version="2.10").status, 200)
        self.assertFault(self.get("/v2.1/os-keypairs?user_id=alice", token="bob:demo",
                                  version="2.10"), 403, "forbidden")
        self.assertFault(self.post("/v2.1/os-keypairs", {"keypair": {
            "name": "k", "public_key": SAMPLE_KEY, "user_id": "x"}}, version="2.9"), 400,
            "badRequest")

    def test_pagination_from_235(self):
        """limit/marker with keypairs_links from 2.35."""
        for name in "abcde":
            self.post("/v2.1/os-keypairs", {"keypair": {"name": name, "public_key": SAMPLE_KEY}})
        r = self.get("/v2.1/os-keypairs?limit=2", version="2.35").json()
        self.assertEqual([i["keypair"]["name"] for i in r["keypairs"]], ["a", "b"])
        self.assertIn("os-keypairs?limit=2&marker=b", r["keypairs_links"][0]["href"])
        r = self.get("/v2.1/os-keypairs?limit=2&marker=d", version="2.35").json()
        self.assertEqual([i["keypair"]["name"] for i in r["keypairs"]], ["e"])
        self.assertNotIn("keypairs_links", r)
        self.assertFault(self.get("/v2.1/os-keypairs?marker=zz", version="2.35"), 400,
                         "badRequest")
        self.assertEqual(len(self.get("/v2.1/os-keypairs?limit=2").json()["keypairs"]), 5)

    def test_validation(self):
        """Bad names, keys and extra fields are 400; duplicates 409."""
        for body in ({"keypair": {"name": "bad!name", "public_key": SAMPLE_KEY}},
                     {"keypair": {"name": "", "public_key": SAMPLE_KEY}},
                     {"keypair": {"name": "x", "public_key": "ssh-rsa garbage"}},
                     {"keypair": {"name": "x", "public_key": "not a key"}},
                     {"keypair": {"name": "x", "public_key": SAMPLE_KEY, "type": "ssh"}},
                     {"keypair": {"name": "x", "public_key": 5}},
                     {"keypair": {}}, {"nokeypair": {}}):
            self.assertFault(self.post("/v2.1/os-keypairs", body), 400, "badRequest")
        self.assertFault(self.post("/v2.1/os-keypairs", {"keypair": {
            "name": "x", "public_key": SAMPLE_KEY, "type": "rsa"}}, version="2.2"),
            400, "badRequest")
        self.post("/v2.1/os-keypairs", {"keypair": {"name": "dup", "public_key": SAMPLE_KEY}})
        self.assertFault(self.post("/v2.1/os-keypairs", {"keypair": {
            "name": "dup", "public_key": SAMPLE_KEY}}), 409, "conflictingRequest",
            "Key pair 'dup' already exists.")

    def test_292_requires_public_key_and_allows_at_dot(self):
        """From 2.92 public_key is required and names may hold '@' and '.'."""
        self.assertFault(self.post("/v2.1/os-keypairs", {"keypair": {"name": "g"}},
                                   version="2.92"), 400, "badRequest")
        r = self.post("/v2.1/os-keypairs", {"keypair": {"name": "me@host.x",
                                                        "public_key": SAMPLE_KEY}},
                      version="2.92")
        self.assertEqual(r.status, 201)
        self.assertFault(self.post("/v2.1/os-keypairs", {"keypair": {
            "name": "me@host.y", "public_key": SAMPLE_KEY}}), 400, "badRequest")

    def test_quota(self):
        """Creating past the key_pairs quota is 403 with Nova's message."""
        self.put("/v2.1/os-quota-sets/admin", {"quota_set": {"key_pairs": 1}})
        self.post("/v2.1/os-keypairs", {"keypair": {"name": "one", "public_key": SAMPLE_KEY}})
        self.assertFault(self.post("/v2.1/os-keypairs", {"keypair": {
            "name": "two", "public_key": SAMPLE_KEY}}), 403, "forbidden",
            "Quota exceeded, too many key pairs.")

    def test_unknown_query_strict_from_275(self):
        """Unknown keypair list parameters are rejected from 2.75."""
        self.assertEqual(self.get("/v2.1/os-keypairs?x=1", version="2.74").status, 200)
        self.assertFault(self.get("/v2.1/os-keypairs?x=1", version="2.75"), 400, "badRequest")


# -- limits, quotas, availability zones -------------------------------------------------

class LimitsQuotaTests(AppTestCase):
    def test_limits_keys_by_version(self):
        """Limit keys drop network ones at 2.36, image meta at 2.39, personality at 2.57."""
        a = self.get("/v2.1/limits").json()["limits"]
        self.assertEqual(a["rate"], [])
        self.assertEqual(len(a["absolute"]), 19)
        self.assertEqual(a["absolute"]["maxTotalInstances"], 10)
        self.assertEqual(len(self.get("/v2.1/limits", version="2.36")
                             .json()["limits"]["absolute"]), 14)
        self.assertEqual(len(self.get("/v2.1/limits", version="2.39")
                             .json()["limits"]["absolute"]), 13)
        self.assertEqual(sorted(self.get("/v2.1/limits", version="2.57")
                                .json()["limits"]["absolute"]),
                         sorted(["maxServerMeta", "maxServerGroups", "maxServerGroupMembers",
                                 "maxTotalCores", "maxTotalInstances", "maxTotalKeypairs",
                                 "maxTotalRAMSize", "totalCoresUsed", "totalInstancesUsed",
                                 "totalRAMUsed", "totalServerGroupsUsed"]))

    def test_limits_query(self):
        """tenant_id is admin-only; unknown keys are ignored below 2.75, rejected from it."""
        self.put("/v2.1/os-quota-sets/demo", {"quota_set": {"cores": 7}})
        a = self.get("/v2.1/limits?tenant_id=demo").json()["limits"]["absolute"]
        self.assertEqual(a["maxTotalCores"], 7)
        self.assertFault(self.get("/v2.1/limits?tenant_id=admin", token="demo:demo"), 403,
                         "forbidden")
        self.assertEqual(self.get("/v2.1/limits?reserved=1", token="demo:demo").status, 200)
        self.assertFault(self.get("/v2.1/limits?reserved=1", version="2.75"), 400, "badRequest")

    def test_quota_show_defaults_detail(self):
        """Quota sets show Nova's defaults; detail carries in_use/limit/reserved."""
        q = self.get("/v2.1/os-quota-sets/demo").json()["quota_set"]
        self.assertEqual((q["id"], q["instances"], q["cores"], q["ram"], q["key_pairs"]),
                         ("demo", 10, 20, 51200, 100))
        self.assertEqual(len(q), 15)
        self.assertEqual(len(self.get("/v2.1/os-quota-sets/demo", version="2.36")
                             .json()["quota_set"]), 11)
        self.assertEqual(len(self.get("/v2.1/os-quota-sets/demo", version="2.57")
                             .json()["quota_set"]), 8)
        d = self.get("/v2.1/os-quota-sets/demo/defaults").json()["quota_set"]
        self.assertEqual(d["instances"], 10)
        self.post("/v2.1/os-keypairs", {"keypair": {"name": "k", "public_key": SAMPLE_KEY}})
        detail = self.get("/v2.1/os-quota-sets/admin/detail").json()["quota_set"]
        # as Nova, key pairs are counted per user, never as project usage
        self.assertEqual(detail["key_pairs"], {"in_use": 0, "limit": 100, "reserved": 0})

    def test_quota_policy(self):
        """Members read their own project's quotas only; only admins update."""
        self.assertEqual(self.get("/v2.1/os-quota-sets/demo", token="u:demo").status, 200)
        self.assertFault(self.get("/v2.1/os-quota-sets/admin", token="u:demo"), 403, "forbidden")
        self.assertFault(self.put("/v2.1/os-quota-sets/demo", {"quota_set": {"cores": 1}},
                                  token="u:demo"), 403, "forbidden")
        self.assertEqual(self.get("/v2.1/os-quota-sets/admin/defaults", token="u:demo").status,
                         200)

    def test_quota_update_and_revert(self):
        """PUT changes limits (echoed without id); DELETE (202) reverts to defaults."""
        r = self.put("/v2.1/os-quota-sets/demo", {"quota_set": {"instances": 50, "cores": "30"}})
        q = r.json()["quota_set"]
        self.assertEqual((q["instances"], q["cores"]), (50, 30))
        self.assertNotIn("id", q)
        self.assertEqual(self.get("/v2.1/os-quota-sets/demo").json()["quota_set"]["instances"],
                         50)
        self.assertEqual(self.delete("/v2.1/os-quota-sets/demo").status, 202)
        self.assertEqual(self.get("/v2.1/os-quota-sets/demo").json()["quota_set"]["instances"],
                         10)

    def test_quota_update_validation(self):
        """Unknown keys, values below -1 and non-numbers are 400."""
        for body in ({"quota_set": {"instances": -2}}, {"quota_set": {"nope": 1}},
                     {"quota_set": {"instances": "many"}}, {"quota_set": {"force": "maybe"}},
                     {"quota_set": {"fixed_ips": 1}, "x": 1}):
            self.assertFault(self.put("/v2.1/os-quota-sets/demo", body), 400, "badRequest")
        self.assertFault(self.put("/v2.1/os-quota-sets/demo", {"quota_set": {"fixed_ips": 1}},
                                  version="2.36"), 400, "badRequest")

    def test_user_quotas_share_the_project_limit(self):
        """Users' quotas together may not exceed the project's; force skips the check, and
        a project limit may not drop below its users' quotas."""
        self.put("/v2.1/os-quota-sets/demo", {"quota_set": {"cores": 30}})
        self.assertEqual(self.put("/v2.1/os-quota-sets/demo?user_id=bob",
                                  {"quota_set": {"cores": 25}}).status, 200)
        self.assertFault(self.put("/v2.1/os-quota-sets/demo?user_id=carl",
                                  {"quota_set": {"cores": 25}}), 400, "badRequest",
                         "must be less than or equal to 5.")
        self.assertEqual(self.put("/v2.1/os-quota-sets/demo?user_id=carl",
                                  {"quota_set": {"cores": 40, "force": True}}).status, 200)
        self.assertFault(self.put("/v2.1/os-quota-sets/demo", {"quota_set": {"cores": 10}}),
                         400, "badRequest", "greater than or equal to already used and "
                         "reserved 65.")

    def test_per_user_quotas(self):
        """user_id scopes quotas to one user and may not exceed the project's."""
        self.put("/v2.1/os-quota-sets/demo", {"quota_set": {"instances": 20}})
        r = self.put("/v2.1/os-quota-sets/demo?user_id=alice", {"quota_set": {"instances": 5}})
        self.assertEqual(r.json()["quota_set"]["instances"], 5)
        self.assertEqual(self.get("/v2.1/os-quota-sets/demo?user_id=alice")
                         .json()["quota_set"]["instances"], 5)
        self.assertEqual(self.get("/v2.1/os-quota-sets/demo").json()["quota_set"]["instances"],
                         20)
        self.assertFault(self.put("/v2.1/os-quota-sets/demo?user_id=alice",
                                  {"quota_set": {"instances": 21}}), 400, "badRequest")
        self.assertEqual(self.delete("/v2.1/os-quota-sets/demo?user_id=alice").status, 202)
        self.assertEqual(self.get("/v2.1/os-quota-sets/demo?user_id=alice")
                         .json()["quota_set"]["instances"], 20)

    def test_quota_classes(self):
        """The default quota class changes every project's defaults; shapes per version."""
        c = self.get("/v2.1/os-quota-class-sets/default").json()["quota_class_set"]
        self.assertEqual(c["id"], "default")
        self.assertIn("floating_ips", c)
        self.assertNotIn("server_groups", c)
        c = self.get("/v2.1/os-quota-class-sets/default", version="2.50").json()["quota_class_set"]
        self.assertIn("server_groups", c)
        self.assertNotIn("floating_ips", c)
        r = self.put("/v2.1/os-quota-class-sets/default", {"quota_class_set": {"instances": 33}})
        self.assertEqual(r.json()["quota_class_set"]["instances"], 33)
        self.assertNotIn("id", r.json()["quota_class_set"])
        self.assertEqual(self.get("/v2.1/os-quota-sets/x/defaults")
                         .json()["quota_set"]["instances"], 33)
        self.assertEqual(self.get("/v2.1/limits").json()["limits"]["absolute"]
                         ["maxTotalInstances"], 33)
        self.assertFault(self.put("/v2.1/os-quota-class-sets/default",
                                  {"quota_class_set": {"bogus": 1}}), 400, "badRequest")


class AvailabilityZoneTests(AppTestCase):
    def test_index(self):
        """The zone list names the configured zone with hosts null."""
        zones = self.get("/v2.1/os-availability-zone", token="u:p").json()["availabilityZoneInfo"]
        self.assertEqual([z["zoneName"] for z in zones], ["nova"])
        self.assertIsNone(zones[0]["hosts"])

    def test_detail(self):
        """The detail lists internal services and the compute host."""
        zones = self.get("/v2.1/os-availability-zone/detail").json()["availabilityZoneInfo"]
        self.assertEqual([z["zoneName"] for z in zones], ["internal", "nova"])
        host = self.app.conf["host"]
        self.assertIn("nova-compute", zones[1]["hosts"][host])


class AvailabilityZoneConfigTests(AppTestCase):
    conf = {"availability_zone": "az1"}

    def test_configurable_zone(self):
        """--availability-zone renames the zone."""
        zones = self.get("/v2.1/os-availability-zone").json()["availabilityZoneInfo"]
        self.assertEqual(zones[0]["zoneName"], "az1")


# -- durable state ------------------------------------------------------------------

class StateTests(AppTestCase):
    def test_acknowledged_changes_survive_restart(self):
        """A created flavor, keypair and quota survive a restart (journal replay)."""
        self.post("/v2.1/flavors", {"flavor": {"name": "kept", "id": "k", "ram": 1, "vcpus": 1,
                                               "disk": 0}})
        self.post("/v2.1/os-keypairs", {"keypair": {"name": "kp", "public_key": SAMPLE_KEY}})
        self.put("/v2.1/os-quota-sets/demo", {"quota_set": {"cores": 3}})
        self.delete("/v2.1/flavors/5")
        # a crash: no snapshot, only the journal
        os.close(self.store.journal)
        self.store.journal = None
        os.close(self.store.lock_fd)
        self.store.lock_fd = None
        self.store.data = None
        self.start_app()
        self.assertEqual(self.get("/v2.1/flavors/k").status, 200)
        self.assertFault(self.get("/v2.1/flavors/5"), 404, "itemNotFound")
        self.assertEqual(self.get("/v2.1/os-keypairs/kp").status, 200)
        self.assertEqual(self.get("/v2.1/os-quota-sets/demo").json()["quota_set"]["cores"], 3)

    def test_files_are_private_and_readable(self):
        """state.json and its journal are mode 0600 JSON."""
        self.post("/v2.1/os-keypairs", {"keypair": {"name": "kp", "public_key": SAMPLE_KEY}})
        for name in ("state.json", "state.json.journal"):
            mode = os.stat(os.path.join(self.tmp, name)).st_mode & 0o777
            self.assertEqual(mode, 0o600, name)
        with open(os.path.join(self.tmp, "state.json.journal")) as f:
            lines = [json.loads(line) for line in f]
        self.assertTrue(lines[-1]["ops"])
        self.restart_app()
        with open(os.path.join(self.tmp, "state.json")) as f:
            doc = json.load(f)
        self.assertEqual(doc["schema_version"], minivan.SCHEMA_VERSION)
        self.assertIn("kp", doc["data"]["keypairs"]["admin"])

    def test_torn_last_line_is_dropped(self):
        """A half-written last journal line is dropped; the rest replays."""
        self.post("/v2.1/os-keypairs", {"keypair": {"name": "kp", "public_key": SAMPLE_KEY}})
        self.store.close()
        with open(os.path.join(self.tmp, "state.json.journal"), "a") as f:
            f.write('{"ops":[["set",["flavors","zz"],{"id":"zz"')
        with self.assertLogs("minivan", "WARNING"):
            self.start_app()
        self.assertEqual(self.get("/v2.1/os-keypairs/kp").status, 200)
        self.assertFault(self.get("/v2.1/flavors/zz"), 404, "itemNotFound")

    def test_corrupt_files_refuse_to_start_and_are_kept(self):
        """An unreadable snapshot or journal line stops start-up and is left as it was."""
        self.store.close()
        journal = os.path.join(self.tmp, "state.json.journal")
        with open(journal, "w") as f:
            f.write("garbage\n{\"ops\": []}\n")
        with self.assertRaises(minivan.StateError) as e:
            self.start_app()
        self.assertIn("line 1", str(e.exception))
        with open(journal) as f:
            self.assertTrue(f.read().startswith("garbage"))
        os.unlink(journal)
        path = os.path.join(self.tmp, "state.json")
        with open(path, "w") as f:
            f.write("{not json")
        with self.assertRaises(minivan.StateError):
            self.start_app()
        with open(path) as f:
            self.assertEqual(f.read(), "{not json")
        self.store = minivan.Store(self.tmp)   # for tearDown
        self.store.data = None

    def test_newer_schema_is_refused(self):
        """A snapshot from a newer schema version is refused with a clear message."""
        self.store.close()
        path = os.path.join(self.tmp, "state.json")
        with open(path, "w") as f:
            json.dump({"schema_version": 99, "data": {}}, f)
        with self.assertRaises(minivan.StateError) as e:
            self.start_app()
        self.assertIn("schema_version 99", str(e.exception))
        self.store = minivan.Store(self.tmp)
        self.store.data = None

    def test_second_daemon_on_same_directory_is_refused(self):
        """state.lock keeps a second minivan out of a directory in use."""
        other = minivan.Store(self.tmp)
        with self.assertRaises(minivan.StateError):
            other.open()

    def test_journal_is_folded_into_snapshot(self):
        """Past journal-max-bytes the journal becomes a snapshot and starts empty."""
        self.store.journal_max_bytes = 2000
        for i in range(30):
            self.post("/v2.1/os-keypairs", {"keypair": {"name": f"k{i}", "public_key": SAMPLE_KEY}})
            # written in the background, and at most one a second
            while self.store.snapshotting or time.monotonic() < self.store.next_snapshot:
                time.sleep(0.01)
        size = os.path.getsize(os.path.join(self.tmp, "state.json.journal"))
        self.assertLess(size, 2000 + 1000)
        self.restart_app()
        self.assertEqual(len(self.get("/v2.1/os-keypairs").json()["keypairs"]), 30)

    def snapshot_child_does(self, act):
        """Past a 3,000-byte journal, commits until a background snapshot starts, whose
        forked writer first calls act() (the parent writes as usual); returns how many
        commits that took (quotas p1..pN)."""
        real, parent = minivan.write_state_file, os.getpid()

        def write(path, data):
            if os.getpid() != parent:
                act()
            real(path, data)

        minivan.write_state_file = write
        self.addCleanup(setattr, minivan, "write_state_file", real)
        self.store.journal_max_bytes = 3000
        n = 0
        while not self.store.snapshotting:
            n += 1
            self.store.commit([["set", ["quotas", f"p{n}"], {"cores": n}]])
        return n

    def test_snapshot_in_background_holds_nobody_up(self):
        """Past journal-max-bytes, a forked child writes the snapshot: while it works (here
        slowed to 1.5 s), changes are acknowledged and reads answered at their usual pace;
        then its file is state.json and the journal set aside is gone; all survives."""
        n = self.snapshot_child_does(lambda: time.sleep(1.5))
        child = self.store.snapshotting
        aside = os.path.join(self.tmp, "state.json.journal.1")
        self.assertTrue(os.path.exists(aside))
        slowest = 0
        for i in range(40):
            t0 = time.perf_counter()
            self.store.commit([["set", ["quotas", f"during{i}"], {"cores": i}]])
            self.assertEqual(self.get("/v2.1/os-keypairs").status, 200)
            slowest = max(slowest, time.perf_counter() - t0)
        self.assertEqual(self.store.snapshotting, child)       # still writing
        self.assertLess(slowest, 0.5)
        deadline = time.time() + 30
        while self.store.snapshotting and time.time() < deadline:
            time.sleep(0.05)
        self.assertIsNone(self.store.snapshotting)
        self.assertFalse(os.path.exists(aside))
        with open(os.path.join(self.tmp, "state.json")) as f:
            saved = json.load(f)["data"]["quotas"]
        self.assertIn(f"p{n}", saved)                   # what was there at the fork
        self.assertNotIn("during39", saved)             # what came after: in the journal
        self.restart_app()
        quotas = self.store.data["quotas"]
        self.assertEqual({f"p{i}" for i in range(1, n + 1)} | {f"during{i}" for i in range(40)},
                         {k for k in quotas if k.startswith(("p", "during"))})

    def test_a_failed_background_snapshot_keeps_the_journal(self):
        """A snapshot writer that fails leaves its journal set aside; start-up replays it
        before the journal, and nothing acknowledged is lost."""
        def fail():
            raise OSError(errno.ENOSPC, "No space left on device")

        n = self.snapshot_child_does(fail)
        while self.store.snapshotting:
            time.sleep(0.02)
        self.assertTrue(os.path.exists(os.path.join(self.tmp, "state.json.journal.1")))
        self.assertEqual([name for name in os.listdir(self.tmp) if ".tmp" in name], [])
        self.store.commit([["set", ["quotas", "after"], {"cores": 1}]])
        # a crash now: no snapshot at shutdown
        os.close(self.store.journal)
        os.close(self.store.lock_fd)
        self.store.journal = self.store.lock_fd = self.store.data = None
        self.start_app()
        self.assertIn(f"p{n}", self.store.data["quotas"])
        self.assertIn("after", self.store.data["quotas"])
        self.store.snapshot()                # a snapshot that works folds both away
        self.assertEqual(sorted(name for name in os.listdir(self.tmp)
                                if name.startswith("state.json")),
                         ["state.json", "state.json.journal"])

    def test_group_commit_under_concurrency(self):
        """Concurrent mutations all become durable, sharing fsyncs."""
        fsyncs = []
        real = os.fsync

        def counting(fd):
            if fd == self.store.journal:
                fsyncs.append(fd)
                time.sleep(0.02)
            real(fd)

        minivan.os.fsync = counting
        start = threading.Barrier(8)
        try:
            def worker(n):
                start.wait()
                for i in range(10):
                    self.store.commit([["set", ["quotas", f"p{n}-{i}"], {"cores": i}]])
            threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            minivan.os.fsync = real
        # each fsync takes 20 ms, during which the other threads' commits queue up and
        # share the next one: far fewer fsyncs than commits (one each without group commit)
        self.assertLessEqual(len(fsyncs), 40)
        self.restart_app()
        self.assertEqual(len([k for k in self.store.data["quotas"] if k.startswith("p")]), 80)

    def test_failed_validation_changes_nothing(self):
        """A refused request leaves the state file untouched."""
        self.store.snapshot()
        before = open(os.path.join(self.tmp, "state.json.journal")).read()
        self.post("/v2.1/flavors", {"flavor": {"name": "x", "ram": 0, "vcpus": 1, "disk": 1}})
        self.post("/v2.1/flavors", {"flavor": {"name": "m1.tiny", "ram": 1, "vcpus": 1,
                                               "disk": 1}})
        self.assertEqual(open(os.path.join(self.tmp, "state.json.journal")).read(), before)


class JournalFailureTests(AppTestCase):
    def test_a_failed_journal_write_takes_the_change_back(self):
        """A change whose journal write fails is undone in memory (new paths, replaced
        and deleted values alike) and answered 503; the next change writes again."""
        store = self.store
        before = json.dumps(store.data, sort_keys=True)
        real = store._write

        def full(payload):
            raise OSError(28, "No space left on device")
        store._write = full
        with self.assertRaises(minivan.Unavailable) as caught:
            store.commit([["set", ["keypairs", "u1", "k"], {"name": "k"}],
                          ["set", ["counters", "keypair"], 99], ["del", ["flavors", "1"]]])
        self.assertEqual(caught.exception.headers.get("Retry-After"), "5")
        self.assertEqual(json.dumps(store.data, sort_keys=True), before)
        r = self.post("/v2.1/os-keypairs", {"keypair": {"name": "k2"}})
        self.assertFault(r, 503, "serviceUnavailable")
        self.assertEqual(self.get("/v2.1/os-keypairs/k2").status, 404)
        store._write = real
        self.assertEqual(self.post("/v2.1/os-keypairs", {"keypair": {"name": "k3"}}).status,
                         200)
        self.restart_app()
        self.assertEqual(self.get("/v2.1/os-keypairs/k3").status, 200)
        self.assertEqual(self.get("/v2.1/flavors/1").status, 200)


    def test_a_failed_cut_after_a_failed_write_is_made_before_the_next_write(self):
        """A journal write that fails half-way, then a cut (ftruncate) that fails too: the
        next change cuts the torn bytes off before it writes, so every acknowledged
        change replays after a restart and the journal stays readable."""
        from unittest import mock
        store = self.store
        real_write, real_truncate = os.write, os.ftruncate
        calls = {"write": 0, "truncate": 0}

        def half_write(fd, data):
            if fd == store.journal and calls["write"] == 0:
                calls["write"] += 1
                real_write(fd, bytes(data[:len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        def failing_truncate(fd, length):
            if fd == store.journal and calls["truncate"] == 0:
                calls["truncate"] += 1
                raise OSError(errno.EIO, "Input/output error")
            return real_truncate(fd, length)
        with mock.patch("os.write", half_write), mock.patch("os.ftruncate", failing_truncate):
            r = self.post("/v2.1/os-keypairs", {"keypair": {"name": "lost"}})
            self.assertFault(r, 503, "serviceUnavailable")
            self.assertEqual(self.post("/v2.1/os-keypairs", {"keypair": {"name": "kept"}})
                             .status, 200)
        self.assertEqual(calls, {"write": 1, "truncate": 1})
        with open(store.journal_path, "rb") as f:
            lines = f.read().split(b"\n")
        self.assertEqual(lines[-1], b"")
        for line in lines[:-1]:
            json.loads(line)
        self.restart_app()
        self.assertEqual(self.get("/v2.1/os-keypairs/kept").status, 200)
        self.assertEqual(self.get("/v2.1/os-keypairs/lost").status, 404)


class TornFileTests(unittest.TestCase):
    """A crash lands between two writes, never inside one; what it leaves is a journal
    whose last record stops at any byte, or a snapshot's temporary file cut anywhere."""

    def test_the_journal_cut_at_every_byte_of_its_last_record(self):
        """For every length the journal's last record can be cut to: the store opens,
        holds every earlier change and none of the cut one, and a change made then
        survives another opening (the cut bytes never come back in front of it)."""
        with tempfile.TemporaryDirectory() as tmp:
            store = minivan.Store(tmp)
            store.open()
            store.commit([["set", ["keypairs", "u", "a"], {"name": "a"}]])
            store.commit([["set", ["keypairs", "u", "b"], {"name": "b", "note": "é" * 20}]])
            store.commit([["set", ["keypairs", "u", "c"], {"name": "c"}]])
            store.close()                                  # folds them into state.json
            store = minivan.Store(tmp)
            store.open()                                   # the journal's only record:
            store.commit([["set", ["keypairs", "u", "last"], {"name": "last", "n": "ü" * 30}],
                          ["del", ["keypairs", "u", "a"]]])
            with open(store.journal_path, "rb") as f:
                journal = f.read()
            os.close(store.journal)
            os.close(store.lock_fd)
            store.journal = store.lock_fd = None
            start = 0
            snapshot = open(os.path.join(tmp, "state.json"), "rb").read()
            for cut in range(start, len(journal) + 1):
                with open(store.journal_path, "wb") as f:
                    f.write(journal[:cut])
                with open(os.path.join(tmp, "state.json"), "wb") as f:
                    f.write(snapshot)
                again = minivan.Store(tmp)
                again.open()
                names = sorted(again.data["keypairs"]["u"])
                whole = cut >= len(journal) - 1     # the record, with or without its \n
                self.assertEqual(names, ["b", "c", "last"] if whole else ["a", "b", "c"], cut)
                again.commit([["set", ["keypairs", "u", "after"], {"name": "after"}]])
                os.close(again.journal)             # a crash: no snapshot at close
                os.close(again.lock_fd)
                again.journal = again.lock_fd = None
                third = minivan.Store(tmp)
                third.open()
                self.assertIn("after", third.data["keypairs"]["u"], cut)
                self.assertEqual("a" in third.data["keypairs"]["u"], not whole, cut)
                third.close()

    def test_a_snapshot_temporary_file_cut_anywhere_is_ignored(self):
        """state.json.tmp left by a crash in the middle of a snapshot, at any length: the
        store opens from state.json and the journal, and the next snapshot replaces it."""
        with tempfile.TemporaryDirectory() as tmp:
            store = minivan.Store(tmp)
            store.open()
            store.commit([["set", ["keypairs", "u", "a"], {"name": "a"}]])
            store.close()
            full = open(os.path.join(tmp, "state.json"), "rb").read()
            for cut in sorted({0, 1, 2, len(full) // 3, len(full) // 2, len(full) - 2,
                               len(full) - 1, len(full)}):
                with open(os.path.join(tmp, "state.json.tmp"), "wb") as f:
                    f.write(full[:cut] if cut < len(full) else full.replace(b'"a"', b'"z"'))
                store = minivan.Store(tmp)
                store.open()
                self.assertEqual(sorted(store.data["keypairs"]["u"]), ["a"], cut)
                store.commit([["set", ["keypairs", "u", "a"], {"name": "a", "cut": cut}]])
                store.close()
                self.assertFalse(os.path.exists(os.path.join(tmp, "state.json.tmp")))


class FlavorSeedTests(unittest.TestCase):
    def test_flavors_file_replaces_builtin_on_first_start(self):
        """--flavors FILE seeds a fresh state with its flavors instead of the built-in set."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "f.json")
            with open(path, "w") as f:
                json.dump([{"id": "9", "name": "only", "ram": 64, "vcpus": 1, "disk": 1}], f)
            conf = minivan.default_config(data_dir=os.path.join(tmp, "d"), flavors=path)
            store = minivan.open_store(conf)
            try:
                self.assertEqual(list(store.data["flavors"]), ["9"])
            finally:
                store.close()

    def test_bad_flavors_file_is_config_error(self):
        """A flavors file that is not a list of flavors is a clear error."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "f.json")
            with open(path, "w") as f:
                f.write("[{\"id\": 1}]")
            conf = minivan.default_config(data_dir=os.path.join(tmp, "d"), flavors=path)
            with self.assertRaises(minivan.ConfigError):
                minivan.open_store(conf)


# -- validation engine ----------------------------------------------------------------

class ValidationTests(unittest.TestCase):
    def test_messages_follow_nova(self):
        """Messages name the field and the jsonschema reason."""
        schema = {"type": "object", "additionalProperties": False, "required": ["a"],
                  "properties": {"a": {"type": "integer", "minimum": 1}}}
        cases = [({}, "'a' is a required property"), ({"a": "x"}, "'x' is not of type 'integer'"),
                 ({"a": 0}, "0 is less than the minimum of 1"),
                 ({"a": 1, "b": 2}, "Additional properties are not allowed ('b' was unexpected)")]
        for value, message in cases:
            with self.assertRaises(minivan.SchemaError) as e:
                minivan.check_schema(schema, value)
            self.assertEqual(e.exception.message, message)

    def test_lenient_mode_ignores_extra_keys(self):
        """The legacy /v2 pipeline ignores unknown keys."""
        schema = {"type": "object", "additionalProperties": False, "properties": {}}
        with self.assertRaisesRegex(minivan.SchemaError, "Additional properties"):
            minivan.check_schema(schema, {"x": 1})
        minivan.check_schema(schema, {"x": 1}, lenient=True)        # no error


# -- the real HTTP server --------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SocketTestCase(AppTestCase):
    """The App behind the real Server on an ephemeral port, spoken to with http.client."""

    bind = "127.0.0.1"
    tls = None

    def setUp(self):
        super().setUp()
        self.server = minivan.Server(self.app, self.bind, 0, self.tls)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.addCleanup(self.stop_server)

    def stop_server(self):
        self.server.shutdown()
        self.server.server_close()

    def connect(self):
        host = self.bind if ":" not in self.bind else self.bind
        if self.tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return http.client.HTTPSConnection(host, self.port, timeout=10, context=ctx)
        return http.client.HTTPConnection(host, self.port, timeout=10)

    def http(self, method, path, body=None, headers=None, conn=None, token="admin:admin"):
        own = conn is None
        conn = conn or self.connect()
        hdrs = {"X-Auth-Token": token} if token else {}
        hdrs.update(headers or {})
        payload = json.dumps(body) if isinstance(body, (dict, list)) else body
        if payload is not None and "Content-Type" not in hdrs:
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, payload, hdrs)
        resp = conn.getresponse()
        data = resp.read()
        check_response(self, pipeline_of(path), resp.status, resp.getheaders(),
                       data if method != "HEAD" else b"",
                       content_length=None if method == "HEAD" else True)
        if own:
            conn.close()
        return Reply(resp.status, resp.getheaders(), data)

    def raw(self, data):
        """Send raw bytes, return the raw answer."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(data)
            chunks = []
            while True:
                try:
                    chunk = s.recv(65536)
                except socket.timeout:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

    def parse_raw(self, answer):
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
        status = int(lines[0].split()[1])
        length = int(dict((k.lower(), v) for k, v in headers)["content-length"])
        self.assertEqual(length, len(body))
        self.assertTrue(dict(headers)["Content-Type"].startswith("application/json"))
        return status, json.loads(body)


class SocketTests(SocketTestCase):
    def test_keep_alive_serves_many_requests_on_one_connection(self):
        """HTTP/1.1 keep-alive: one connection, many requests, exact lengths."""
        conn = self.connect()
        for path in ("/", "/v2.1/", "/v2.1/flavors", "/v2.1/flavors/nope", "/v2.1/os-cells",
                     "/healthcheck", "/v2/flavors"):
            self.http("GET", path, conn=conn)
        r = self.http("DELETE", "/v2.1/os-keypairs/none", conn=conn)
        self.assertEqual(r.status, 404)
        self.http("POST", "/v2.1/os-keypairs", {"keypair": {"name": "k", "public_key": SAMPLE_KEY}},
                  conn=conn, headers={"OpenStack-API-Version": "compute 2.2"})
        r = self.http("DELETE", "/v2.1/os-keypairs/k", conn=conn,
                      headers={"OpenStack-API-Version": "compute 2.2"})
        self.assertEqual((r.status, r.raw, r.header("Content-Length")), (204, b"", "0"))
        r = self.http("HEAD", "/v2.1/flavors/1", conn=conn)
        self.assertEqual(r.status, 200)
        self.http("GET", "/v2.1/flavors/1", conn=conn)
        conn.close()

    def test_malformed_request_line_is_json(self):
        """A malformed request line gets a JSON 400, never an HTML page."""
        status, body = self.parse_raw(self.raw(b"GARBAGE\r\n\r\n"))
        self.assertEqual(status, 400)
        self.assertEqual(body["badRequest"]["code"], 400)
        status, body = self.parse_raw(self.raw(b"GET / HTTP/9.9\r\n\r\n"))
        self.assertIn(status, (400, 505))

    def test_over_long_header_is_json(self):
        """An over-long header line is answered in JSON."""
        answer = self.raw(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        status, body = self.parse_raw(answer)
        self.assertIn(status, (400, 431))
        answer = self.raw(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
        status, body = self.parse_raw(answer)
        self.assertEqual(status, 414)

    def test_unknown_method_is_405(self):
        """An unknown HTTP method on a known path is 405 with Allow, in JSON."""
        r = self.http("BREW", "/v2.1/flavors")
        self.assertEqual(r.status, 405)
        self.assertEqual(r.json()["badMethod"]["code"], 405)

    def test_body_too_large_is_413(self):
        """A body over --max-body-size is 413 overLimit and nothing is stored."""
        big = {"flavor": {"name": "x" * 200000, "ram": 1, "vcpus": 1, "disk": 1}}
        r = self.http("POST", "/v2.1/flavors", big)
        self.assertEqual(r.status, 413)
        self.assertIn("overLimit", r.json())
        self.assertEqual(len(self.http("GET", "/v2.1/flavors").json()["flavors"]), 7)

    def test_chunked_body(self):
        """A chunked request body is read."""
        body = json.dumps({"keypair": {"name": "ch", "public_key": SAMPLE_KEY}}).encode()
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        req = (b"POST /v2.1/os-keypairs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Auth-Token: admin:admin\r\n"
               b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n" + chunked)
        status, body = self.parse_raw(self.raw(req))
        self.assertEqual(status, 200)
        self.assertEqual(body["keypair"]["name"], "ch")

    def test_forwarded_headers_make_links(self):
        """X-Forwarded-Proto and Host shape every link (noauth behind a proxy: with
        --noauth-allow-remote)."""
        self.app.conf["noauth_allow_remote"] = True
        r = self.http("GET", "/v2.1/flavors/1", headers={"X-Forwarded-Proto": "https",
                                                         "Host": "cloud.example.com"})
        self.assertEqual(r.json()["flavor"]["links"][0]["href"],
                         "https://cloud.example.com/v2.1/flavors/1")

    def test_cors(self):
        """Allowed origins get CORS headers and preflight answers; others get none."""
        self.app.conf["cors_allowed_origins"] = ["http://dash.example"]
        r = self.http("GET", "/v2.1/flavors", headers={"Origin": "http://dash.example"})
        self.assertEqual(r.header("Access-Control-Allow-Origin"), "http://dash.example")
        r = self.http("OPTIONS", "/v2.1/flavors", token=None,
                      headers={"Origin": "http://dash.example",
                               "Access-Control-Request-Method": "POST"})
        self.assertEqual(r.status, 200)
        self.assertIn("POST", r.header("Access-Control-Allow-Methods"))
        r = self.http("GET", "/v2.1/flavors", headers={"Origin": "http://evil.example"})
        self.assertIsNone(r.header("Access-Control-Allow-Origin"))


class FaultInjectionTests(SocketTestCase):
    """--fault-injection: rules at /minivan/v1/faults and minivan:* metadata make builds
    fail or wait, actions and deletes fail, and hosts go down; off, none of it exists."""

    conf = {"fault_injection": "true"}

    def faults(self, method, path="", body=None, token="admin:admin"):
        conn = self.connect()
        conn.request(method, "/minivan/v1/faults" + path,
                     json.dumps(body) if body is not None else None,
                     {"X-Auth-Token": token, "Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        return resp.status, json.loads(raw) if raw else None

    def boot(self, name, **extra):
        make_image(self.app.conf["images_dir"])
        image = self.get("/v2.1/images", version="2.35").json()["images"][0]["id"]
        r = self.post("/v2.1/servers", {"server": dict(
            name=name, imageRef=image, flavorRef="1", **extra)})
        self.assertEqual(r.status, 202, r.raw)
        return r.json()["server"]["id"]

    def status(self, server_id):
        return self.get(f"/v2.1/servers/{server_id}").json()["server"]

    def test_rules(self):
        status, body = self.faults("POST", body={"fault": {
            "kind": "build", "name": "^doomed", "count": 1, "message": "disk on fire"}})
        self.assertEqual(status, 201)
        rule = body["fault"]
        self.assertEqual(self.faults("GET")[1]["faults"][0]["id"], rule["id"])
        self.assertEqual(self.faults("GET", "", token="demo:demo")[0], 403)
        self.assertEqual(self.faults("POST", body={"fault": {"kind": "nope"}})[0], 400)
        self.assertEqual(self.faults("POST", body={"fault": {"kind": "host_down",
                                                             "host": "nowhere"}})[0], 400)
        self.assertEqual(self.faults("POST", body={"fault": {"kind": "build",
                                                             "name": "("}})[0], 400)
        doomed = self.boot("doomed-1")
        spared = self.boot("spared")
        self.app.compute.wait_idle()
        self.assertEqual(self.status(doomed)["status"], "ERROR")
        self.assertEqual(self.status(doomed)["fault"]["message"], "disk on fire")
        self.assertEqual(self.status(spared)["status"], "ACTIVE")
        self.assertEqual(self.faults("GET")[1]["faults"], [])        # count spent
        # an action fails with the status asked for, twice, and nothing happens
        self.faults("POST", body={"fault": {"kind": "action", "action": "os-stop",
                                            "count": 2, "status": 409, "message": "no"}})
        for _ in range(2):
            r = self.post(f"/v2.1/servers/{spared}/action", {"os-stop": None})
            self.assertFault(r, 409, "conflictingRequest")
        self.assertEqual(self.status(spared)["status"], "ACTIVE")
        self.assertEqual(self.post(f"/v2.1/servers/{spared}/action", {"os-stop": None})
                         .status, 202)
        # a delete fails until the rule goes
        _, body = self.faults("POST", body={"fault": {"kind": "delete", "count": None,
                                                      "status": 503}})
        self.assertFault(self.delete(f"/v2.1/servers/{spared}"), 503, "serviceUnavailable")
        self.assertEqual(self.faults("DELETE", "/" + body["fault"]["id"])[0], 204)
        self.assertEqual(self.faults("DELETE", "/" + body["fault"]["id"])[0], 404)
        self.assertEqual(self.delete(f"/v2.1/servers/{spared}").status, 204)

    def test_host_down_and_back(self):
        server_id = self.boot("host-test")
        self.app.compute.wait_idle()
        host = self.status(server_id)["OS-EXT-SRV-ATTR:host"]
        _, body = self.faults("POST", body={"fault": {"kind": "host_down", "host": host}})
        services = self.get("/v2.1/os-services?binary=nova-compute").json()["services"]
        self.assertEqual([s["state"] for s in services], ["down"])
        self.assertEqual(self.status(server_id)["host_status"] if "host_status" in
                         self.status(server_id) else self.get(
                             f"/v2.1/servers/{server_id}", version="2.16").json()["server"]
                         ["host_status"], "UNKNOWN")
        self.assertFault(self.post(f"/v2.1/servers/{server_id}/action", {"os-stop": None}),
                         503, "serviceUnavailable")
        self.faults("DELETE", "/" + body["fault"]["id"])
        self.assertTrue(self.app.driver.connect())
        services = self.get("/v2.1/os-services?binary=nova-compute").json()["services"]
        self.assertEqual([s["state"] for s in services], ["up"])

    def test_a_server_deleted_before_its_build_starts_stays_deleted(self):
        """A server deleted while its build still waits (here 1 s of minivan:build_delay)
        is not built afterwards: it stays deleted, with no domain."""
        server_id = self.boot("short-lived", metadata={"minivan:build_delay": "1"})
        self.assertEqual(self.delete(f"/v2.1/servers/{server_id}").status, 204)
        time.sleep(1.5)
        self.app.compute.wait_idle()
        self.assertEqual(self.get(f"/v2.1/servers/{server_id}").status, 404)
        self.assertFalse(self.app.driver.exists({"id": server_id, "instance_name": ""}))

    def test_metadata_keys(self):
        doomed = self.boot("m1", metadata={"minivan:fail_build": "no room"})
        slow = self.boot("m2", metadata={"minivan:build_delay": "5",
                                         "minivan:fail_delete": "1"})
        self.assertEqual(self.status(slow)["status"], "BUILD")      # for 5 s
        self.app.compute.wait_idle()
        self.assertEqual(self.status(doomed)["fault"]["message"], "no room")
        self.assertEqual(self.status(slow)["status"], "ACTIVE")
        self.assertFault(self.delete(f"/v2.1/servers/{slow}"), 500, "computeFault")
        self.assertEqual(self.delete(f"/v2.1/servers/{slow}").status, 204)


class FaultInjectionOffTests(SocketTestCase):
    def test_off_by_default(self):
        conn = self.connect()
        conn.request("GET", "/minivan/v1/faults", headers={"X-Auth-Token": "admin:admin"})
        resp = conn.getresponse()
        self.assertEqual(resp.status, 404)
        self.assertIn("itemNotFound", resp.read().decode())


class SlowClientTests(SocketTestCase):
    """--max-connections and --client-timeout: slow or idle clients cannot hold every
    thread, and a request that takes too long to arrive is cut off."""

    conf = {"max_connections": "3", "client_timeout": "1"}

    def test_connections_past_the_limit_get_503(self):
        stalled = []
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.send(b"GET /v2.1/flavors HTTP/1.1\r\n")        # and then nothing
            stalled.append(sock)
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        answer = extra.recv(4096).decode()
        extra.close()
        self.assertTrue(answer.startswith("HTTP/1.1 503"), answer)
        self.assertIn("Retry-After: 1", answer)
        self.assertIn('"serviceUnavailable"', answer)
        self.assertRegex(answer, r"X-OpenStack-Request-ID: req-[0-9a-f-]{36}\r\n")
        # each stalled request is cut after --client-timeout; then there is room again
        for sock in stalled:
            started = time.monotonic()
            sock.settimeout(10)
            self.assertEqual(sock.recv(100), b"")
            self.assertLess(time.monotonic() - started, 5)
            sock.close()
        # a cut connection's slot is free once its thread has ended, a moment after the EOF
        deadline = time.monotonic() + 5
        while True:
            probe = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            probe.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            refused = probe.recv(4096).startswith(b"HTTP/1.1 503")
            probe.close()
            if not refused or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertEqual(self.http("GET", "/v2.1/flavors").status, 200)

    def test_a_trickled_request_is_cut_after_the_timeout(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.addCleanup(sock.close)
        started = time.monotonic()
        closed = False
        for byte in b"GET /v2.1/flavors HTTP/1.1\r\nHost: x\r\nX-Auth-Token: a\r\n" * 3:
            try:
                sock.send(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - started > 3:
                break
        if not closed:
            sock.settimeout(5)
            try:
                closed = sock.recv(100) == b""
            except OSError:
                closed = True
        self.assertTrue(closed)
        self.assertLess(time.monotonic() - started, 4.5)


class PublicUrlTests(SocketTestCase):
    conf = {"public_url": "https://compute.example.com:8443/"}

    def test_public_url_wins(self):
        """--public-url is the base of every link; in noauth its host is answered, other
        names are not."""
        r = self.http("GET", "/v2.1/flavors/1", headers={"Host": "compute.example.com:8443"})
        self.assertEqual(r.json()["flavor"]["links"][0]["href"],
                         "https://compute.example.com:8443/v2.1/flavors/1")
        r = self.http("GET", "/v2.1/flavors/1", headers={"Host": "other"})
        self.assertEqual(r.status, 403)


def have_ipv6():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@unittest.skipUnless(have_ipv6(), "no IPv6 loopback on this host")
class IPv6Tests(SocketTestCase):
    bind = "::1"

    def test_ipv6_loopback(self):
        """minivan listens and answers on ::1."""
        r = self.http("GET", "/v2.1/flavors/1")
        self.assertEqual(r.status, 200)


def make_self_signed(tmp):
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                    "/CN=localhost", "-days", "2", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key


@unittest.skipUnless(shutil.which("openssl"), "openssl needed to make a test certificate")
class TLSTests(SocketTestCase):
    def setUp(self):
        self.certdir = tempfile.mkdtemp()
        cert, key = make_self_signed(self.certdir)
        self.tls = minivan.tls_context(minivan.default_config(tls_cert=cert, tls_key=key))
        super().setUp()
        self.addCleanup(shutil.rmtree, self.certdir, True)

    def test_https(self):
        """With --tls-cert/--tls-key the API is served over HTTPS, links https."""
        r = self.http("GET", "/v2.1/flavors/1")
        self.assertTrue(r.json()["flavor"]["links"][0]["href"].startswith("https://"))

    def test_plain_http_to_tls_port_does_not_kill_server(self):
        """A client speaking plain HTTP to the TLS port is dropped; the server goes on."""
        self.raw(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(self.http("GET", "/").status, 200)


# -- the daemon process: systemd notify, SIGTERM, restart ----------------------------

def wait_healthy(port, proc, timeout):
    """True once minivan on port answers /healthcheck; False if it exits or times out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthcheck")
            if conn.getresponse().status == 200:
                return True
        except OSError:
            time.sleep(0.1)
    return False


class DaemonTests(unittest.TestCase):
    def start(self, tmp, port, extra_env=None, args=()):
        env = dict(os.environ, MINIVAN_DATA_DIR=os.path.join(tmp, "data"),
                   MINIVAN_PORT=str(port), MINIVAN_LIBVIRT_URI="test:///default")
        env.update(extra_env or {})
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "minivan.py"), *args],
                                env=env, stderr=subprocess.PIPE, text=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc

    def wait_up(self, port, proc):
        if not wait_healthy(port, proc, 20):
            self.fail("minivan did not come up: " + (proc.stderr.read() if proc.poll()
                                                     is not None else "no answer"))

    def setUp(self):
        try:
            minivan.import_libvirt()
        except minivan.ConfigError as e:
            skip_or_fail(self, str(e))

    def test_runs_from_cached_bytecode_under_the_same_pid(self):
        """`python3 minivan.py` replaces itself with an import of minivan's cached
        bytecode (the compiler's memory is not kept): same PID, a fresh .pyc."""
        import importlib.util
        tmp = tempfile.mkdtemp(prefix="minivan-pyc-")
        self.addCleanup(shutil.rmtree, tmp, True)
        port = free_port()
        proc = self.start(tmp, port)
        self.wait_up(port, proc)
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        self.assertEqual(argv[1], b"-c")
        self.assertIn(b"import minivan", argv[2])
        cached = importlib.util.cache_from_source(os.path.join(HERE, "minivan.py"))
        self.assertGreaterEqual(os.stat(cached).st_mtime,
                                int(os.stat(os.path.join(HERE, "minivan.py")).st_mtime))
        proc.terminate()
        self.assertEqual(proc.wait(30), 0)

    def crash_shim(self, tmp):
        """tools/crashpoints.c built into tmp (gcc), for LD_PRELOAD."""
        if not shutil.which("gcc"):
            skip_or_fail(self, "gcc not installed (apt install gcc)")
        shim = os.path.join(tmp, "crashpoints.so")
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", shim,
                        os.path.join(HERE, "tools", "crashpoints.c"), "-ldl"], check=True)
        return shim

    @staticmethod
    def keypair_workload(port, threads=2, each=4):
        """Concurrent clients creating keypairs and deleting every other one they made;
        returns {name: 'created' | 'deleted' | 'refused' | 'delete refused' | 'deleting'}
        of what minivan answered (a client stops at its first connection error)."""
        outcome, lock = {}, threading.Lock()

        def client(n):
            for i in range(each):
                name = f"c{n}-{i}"
                try:
                    status = compute_request(None, port, "POST", "/os-keypairs",
                                             "admin:admin", {"keypair": {"name": name}},
                                             timeout=10).status
                    with lock:
                        outcome[name] = {200: "created", 503: "refused"}.get(status, status)
                    if status == 200 and i % 2:
                        with lock:
                            outcome[name] = "deleting"     # unanswered: either way
                        status = compute_request(None, port, "DELETE", "/os-keypairs/" + name,
                                                 "admin:admin", timeout=10).status
                        with lock:
                            outcome[name] = {202: "deleted", 503: "delete refused"}.get(
                                status, status)
                except (OSError, http.client.HTTPException):
                    return
        workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return outcome

    def check_outcome(self, tmp, port, outcome, step):
        """minivan started again on tmp holds every acknowledged change; a refused (503)
        one is not there."""
        proc = self.start(tmp, port)
        self.assertTrue(wait_healthy(port, proc, 30), f"step {step}: no restart: "
                        + (proc.stderr.read() if proc.poll() is not None else ""))
        for name, what in outcome.items():
            status = compute_request(None, port, "GET", "/os-keypairs/" + name,
                                     "admin:admin").status
            if what in ("created", "delete refused"):
                self.assertEqual(status, 200, f"step {step}: {name} lost")
            elif what in ("deleted", "refused"):
                self.assertEqual(status, 404, f"step {step}: {name} {what}, yet there")
        proc.terminate()
        self.assertEqual(proc.wait(30), 0)

    def test_a_crash_at_every_durability_step_loses_nothing(self):
        """SIGKILL before each write, fsync, ftruncate and rename minivan makes on its state
        files, counted across all threads (tools/crashpoints.c), step 1, 2, … until the
        workload (two clients creating and deleting keypairs at once) ends with no crash:
        after each, minivan starts and every acknowledged change is there."""
        self.crash_at_every_step({})

    def test_a_crash_at_every_step_of_background_snapshots_loses_nothing(self):
        """The same with a journal of at most 1,500 bytes: snapshots are taken in the
        background during the workload, and a crash lands at each step of setting the
        journal aside, of the forked writer (which alone dies then) and of putting its
        file in place."""
        self.crash_at_every_step({"MINIVAN_JOURNAL_MAX_BYTES": "1500"})

    def crash_at_every_step(self, extra_env):
        tmp = tempfile.mkdtemp(prefix="minivan-crashpoints-")
        self.addCleanup(shutil.rmtree, tmp, True)
        shim = self.crash_shim(tmp)
        port = free_port()
        for step in range(1, 200):
            data = os.path.join(tmp, f"run{step}")
            proc = self.start(data, port, {"LD_PRELOAD": shim, "CRASH_AT": str(step),
                                           "CRASH_DIR": os.path.join(data, "data"),
                                           **extra_env})
            outcome = self.keypair_workload(port) if wait_healthy(port, proc, 30) else {}
            try:                    # a killed process's sockets close before it is reaped
                proc.wait(1)
                survived = False
            except subprocess.TimeoutExpired:
                survived = True
            proc.kill()
            proc.wait(30)
            self.check_outcome(data, port, outcome, step)
            shutil.rmtree(data, True)
            if survived:
                break
        self.assertGreater(step, 10)
        self.assertLess(step, 199)
        print(f"\ncrash points: {step - 1} steps, each killed once; acknowledged changes "
              "lost: 0")

    def test_a_failing_durability_step_is_503_and_loses_nothing(self):
        """Each durability step in turn fails with EIO or ENOSPC instead: minivan goes on,
        the change that needed it is answered 503 and is not there after a restart, and
        every acknowledged change is."""
        tmp = tempfile.mkdtemp(prefix="minivan-failpoints-")
        self.addCleanup(shutil.rmtree, tmp, True)
        shim = self.crash_shim(tmp)
        port = free_port()
        refused = 0
        for step in range(1, 200):
            data = os.path.join(tmp, f"run{step}")
            code = (errno.EIO, errno.ENOSPC)[step % 2]
            proc = self.start(data, port, {"LD_PRELOAD": shim, "FAIL_AT": str(step),
                                           "FAIL_ERRNO": str(code),
                                           "CRASH_DIR": os.path.join(data, "data")})
            started = wait_healthy(port, proc, 30)
            outcome = self.keypair_workload(port) if started else {}
            refused += sum(v in ("refused", "delete refused") for v in outcome.values())
            proc.terminate()
            proc.wait(30)
            self.check_outcome(data, port, outcome, step)
            shutil.rmtree(data, True)
            if started and not any(v in ("refused", "delete refused")
                                   for v in outcome.values()) and step > 10:
                break
        self.assertGreater(refused, 0)
        print(f"\nfailing steps: {step}, changes answered 503: {refused}, lost: 0")

    def test_a_torn_only_line_is_cut_before_the_next_change(self):
        """The journal's only line torn by a crash: minivan starts, cuts it off, and a
        change acknowledged after that survives the next crash (SIGKILL) and start."""
        tmp = tempfile.mkdtemp(prefix="minivan-torn-")
        self.addCleanup(shutil.rmtree, tmp, True)
        port = free_port()
        proc = self.start(tmp, port)
        self.wait_up(port, proc)
        proc.terminate()
        self.assertEqual(proc.wait(30), 0)
        journal = os.path.join(tmp, "data", "state.json.journal")
        with open(journal, "ab") as f:
            f.write(b'{"ops":[["set",["keypairs","u","half"],{"na')
        proc = self.start(tmp, port)
        self.wait_up(port, proc)
        r = compute_request(self, port, "POST", "/os-keypairs", "admin:admin",
                            {"keypair": {"name": "after-the-tear"}})
        self.assertEqual(r.status, 200)
        proc.kill()
        proc.wait(30)
        proc = self.start(tmp, port)
        self.wait_up(port, proc)
        self.assertEqual(compute_request(self, port, "GET", "/os-keypairs/after-the-tear",
                                         "admin:admin").status, 200)
        proc.terminate()
        self.assertEqual(proc.wait(30), 0)

    def test_an_upload_cut_by_a_crash_is_not_active(self):
        """SIGKILL while an upload to /image is half-way: after the restart the image is
        queued (not active, not saving), its partial file is gone, and the same upload
        then succeeds."""
        tmp = tempfile.mkdtemp(prefix="minivan-upload-kill-")
        self.addCleanup(shutil.rmtree, tmp, True)
        port = free_port()
        proc = self.start(tmp, port)
        self.wait_up(port, proc)
        base = f"http://127.0.0.1:{port}/image"
        status, image = image_request(base, "POST", "/v2/images", "admin:admin", {
            "name": "cut", "disk_format": "raw", "container_format": "bare"})
        self.assertEqual(status, 201)
        data = os.urandom(4 << 20)
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall((f"PUT /image/v2/images/{image['id']}/file HTTP/1.1\r\n"
                      f"Host: 127.0.0.1:{port}\r\nX-Auth-Token: admin:admin\r\n"
                      "Content-Type: application/octet-stream\r\n"
                      f"Content-Length: {len(data)}\r\n\r\n").encode() + data[:len(data) // 2])
        images = os.path.join(tmp, "data", "images")
        part = os.path.join(images, f".{image['id']}.part")
        wait_until(lambda: os.path.exists(part) and os.path.getsize(part) >= 1 << 20,
                   timeout=30, what="the upload under way")
        self.assertEqual(image_request(base, "GET", f"/v2/images/{image['id']}",
                                       "admin:admin")[1]["status"], "saving")
        proc.kill()
        proc.wait(30)
        sock.close()
        proc = self.start(tmp, port)
        self.wait_up(port, proc)
        status, shown = image_request(base, "GET", f"/v2/images/{image['id']}", "admin:admin")
        self.assertEqual((status, shown["status"]), (200, "queued"))
        self.assertEqual(os.listdir(images), [])
        status, _ = image_request(base, "PUT", f"/v2/images/{image['id']}/file",
                                  "admin:admin", data=data)
        self.assertEqual(status, 204)
        shown = image_request(base, "GET", f"/v2/images/{image['id']}", "admin:admin")[1]
        self.assertEqual((shown["status"], shown["os_hash_value"]),
                         ("active", hashlib.sha512(data).hexdigest()))
        proc.terminate()
        self.assertEqual(proc.wait(30), 0)

    def test_secrets_stay_out_of_the_log_and_files_are_private(self):
        """With --debug (request and response bodies logged): admin passwords, user data,
        personality contents and generated private keys never reach the log; the state
        files are 0600, in a directory others may not list (0711: QEMU, running as its
        own user, reaches the disks inside)."""
        tmp = tempfile.mkdtemp(prefix="minivan-secrets-")
        self.addCleanup(shutil.rmtree, tmp, True)
        make_image(os.path.join(tmp, "images"))
        port = free_port()
        proc = self.start(tmp, port, {"MINIVAN_DEBUG": "true",
                                      "MINIVAN_IMAGES_DIR": os.path.join(tmp, "images")})
        self.wait_up(port, proc)
        secrets_ = {"adminPass": "Sw0rdfish-Secret", "user": "#!/bin/sh\necho TOPSECRETDATA\n",
                    "file": "PERSONALITY-SECRET"}
        image = compute_request(self, port, "GET", "/images", "admin:admin",
                                version="2.35").json()["images"][0]["id"]
        made = compute_request(self, port, "POST", "/servers", "admin:admin", {"server": {
            "name": "s", "imageRef": image, "flavorRef": "1", "adminPass":
            secrets_["adminPass"], "user_data": base64.b64encode(
                secrets_["user"].encode()).decode(), "personality": [{
                    "path": "/etc/x", "contents": base64.b64encode(
                        secrets_["file"].encode()).decode()}]}}, version="2.31")
        self.assertEqual(made.status, 202, made.raw)
        server_id = made.json()["server"]["id"]
        compute_request(self, port, "GET", f"/servers/{server_id}", "admin:admin",
                        version="2.3")
        key = compute_request(self, port, "POST", "/os-keypairs", "admin:admin",
                              {"keypair": {"name": "k"}}).json()["keypair"]["private_key"]
        compute_request(self, port, "POST", f"/servers/{server_id}/action", "admin:admin",
                        {"changePassword": {"adminPass": "An0ther-Secret"}})
        proc.terminate()
        proc.wait(30)
        log = proc.stderr.read()
        self.assertIn("request POST /v2.1/servers body", log)
        for value in (secrets_["adminPass"], "An0ther-Secret", "TOPSECRETDATA",
                      base64.b64encode(secrets_["user"].encode()).decode(),
                      base64.b64encode(secrets_["file"].encode()).decode(),
                      key.splitlines()[1]):
            self.assertNotIn(value, log)
        data = os.path.join(tmp, "data")
        self.assertEqual(stat.S_IMODE(os.stat(data).st_mode), 0o711)   # no listing
        for name in ("state.json", "state.json.journal", "state.lock"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(data, name)).st_mode), 0o600,
                             name)

    def test_guest_files_are_private_to_qemu(self):
        """Before QEMU opens a guest's files they become 0600 in 0700 directories, the base
        image too, owned by the user qemu.conf runs QEMU as (here 'nobody'); a directory
        on the way that QEMU cannot pass through is a clear error."""
        if os.geteuid() != 0:
            skip_or_fail(self, "changing a file's owner needs root")
        import pwd
        nobody = pwd.getpwnam("nobody")
        tmp = tempfile.mkdtemp(prefix="minivan-secure-")
        self.addCleanup(shutil.rmtree, tmp, True)
        conf = os.path.join(tmp, "qemu.conf")
        with open(conf, "w") as f:
            f.write('# user = "root"\nuser = "nobody"\ngroup = "+%d"\n' % nobody.pw_gid)
        self.assertEqual(minivan.qemu_conf_owner(conf), (nobody.pw_uid, nobody.pw_gid))
        self.assertIsNone(minivan.qemu_conf_owner(os.path.join(tmp, "absent.conf")))
        data = os.path.join(tmp, "data")
        instance = os.path.join(data, "instances", "a-server")
        base = os.path.join(data, "_base", "an-image")
        os.makedirs(os.path.dirname(base))
        minivan.create_qcow2(base, 1 << 20)
        os.makedirs(instance)
        disk = os.path.join(instance, "disk")
        minivan.create_qcow2(disk, 1 << 20, base, "qcow2")
        drive = os.path.join(instance, "disk.config")
        with open(drive, "wb") as f:
            f.write(b"iso")
        os.chmod(tmp, 0o711)
        os.chmod(data, 0o711)
        os.chmod(os.path.join(data, "instances"), 0o711)
        driver = minivan.LibvirtDriver("qemu:///system", "qemu", instances_dir=os.path.join(
            data, "instances"))
        self.addCleanup(setattr, minivan, "QEMU_CONF", minivan.QEMU_CONF)
        minivan.QEMU_CONF = conf
        driver.secure([disk, drive])
        for path, mode in ((disk, 0o600), (drive, 0o600), (base, 0o600), (instance, 0o700),
                           (os.path.dirname(base), 0o700)):
            st = os.stat(path)
            self.assertEqual((stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid),
                             (mode, nobody.pw_uid, nobody.pw_gid), path)
        # a disk whose chain leaves minivan's directories (a backing file naming a host
        # file): refused, and that file and its directory keep their modes and owners
        outside = os.path.join(tmp, "etc")
        os.makedirs(outside, mode=0o755)
        canary = os.path.join(outside, "canary")
        with open(canary, "w") as f:
            f.write("host secret\n")
        os.chmod(canary, 0o644)
        before = [os.stat(p) for p in (canary, outside)]
        hostile = os.path.join(instance, "disk.hostile")
        minivan.create_qcow2(hostile, 1 << 20, canary, "raw")
        with self.assertRaisesRegex(minivan.DriverError, "not given to QEMU"):
            driver.secure([hostile])
        after = [os.stat(p) for p in (canary, outside)]
        self.assertEqual([(st.st_mode, st.st_uid, st.st_gid) for st in after],
                         [(st.st_mode, st.st_uid, st.st_gid) for st in before])
        os.chmod(data, 0o700)
        with self.assertRaisesRegex(minivan.DriverError, f"chmod o\\+x {data}$"):
            driver.secure([disk])

    def test_watchdog_is_pinged_only_while_minivan_answers(self):
        """With WATCHDOG_USEC, minivan pings systemd's watchdog while its own /healthcheck
        answers; while the state store hangs (a store_hang fault), /healthcheck is 503
        and no ping is sent; then the pings come again."""
        with tempfile.TemporaryDirectory() as tmp:
            sock_path = os.path.join(tmp, "notify")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(sock_path)
            port = free_port()
            proc = self.start(tmp, port, {"NOTIFY_SOCKET": sock_path,
                                          "WATCHDOG_USEC": "400000"},
                              args=("--fault-injection", "true"))
            self.wait_up(port, proc)

            def pings(seconds):
                """The WATCHDOG=1 messages received within these seconds."""
                got, deadline = 0, time.monotonic() + seconds
                while time.monotonic() < deadline:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    try:
                        got += sock.recv(4096).decode().count("WATCHDOG=1")
                    except socket.timeout:
                        pass
                return got
            self.assertGreaterEqual(pings(2), 3)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/minivan/v1/faults", json.dumps(
                {"fault": {"kind": "store_hang", "seconds": 12}}),
                {"X-Auth-Token": "admin:admin", "Content-Type": "application/json"})
            self.assertEqual(conn.getresponse().status, 201)
            conn.close()
            hung_at = time.monotonic()
            pings(0.5)                                  # a ping already on its way
            self.assertEqual(pings(5), 0)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/healthcheck")
            self.assertEqual(conn.getresponse().status, 503)
            conn.close()
            time.sleep(max(0, 12 - (time.monotonic() - hung_at)))
            self.assertGreaterEqual(pings(3), 2)
            proc.terminate()
            self.assertEqual(proc.wait(30), 0)
            sock.close()

    def test_sd_notify_ready_and_stopping(self):
        """With NOTIFY_SOCKET, minivan sends READY=1 once serving and STOPPING=1 on SIGTERM."""
        with tempfile.TemporaryDirectory() as tmp:
            sock_path = os.path.join(tmp, "notify")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(sock_path)
            sock.settimeout(20)
            port = free_port()
            proc = self.start(tmp, port, {"NOTIFY_SOCKET": sock_path})
            message = sock.recv(4096).decode()
            self.assertIn("READY=1", message)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthcheck")
            self.assertEqual(conn.getresponse().status, 200)
            proc.send_signal(signal.SIGTERM)
            self.assertIn("STOPPING=1", sock.recv(4096).decode())
            self.assertEqual(proc.wait(30), 0)
            sock.close()

    def test_sigterm_finishes_and_keeps_state(self):
        """SIGTERM exits 0 with the state saved; a restart serves the same records."""
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            proc = self.start(tmp, port)
            self.wait_up(port, proc)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", "/v2.1/os-keypairs",
                         json.dumps({"keypair": {"name": "k", "public_key": SAMPLE_KEY}}),
                         {"X-Auth-Token": "admin:admin", "Content-Type": "application/json"})
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(30), 0)
            with open(os.path.join(tmp, "data", "state.json")) as f:
                self.assertIn("k", json.load(f)["data"]["keypairs"]["admin"])
            self.assertEqual(os.path.getsize(os.path.join(tmp, "data", "state.json.journal")), 0)
            proc = self.start(tmp, port)
            self.wait_up(port, proc)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v2.1/os-keypairs/k", headers={"X-Auth-Token": "admin:admin"})
            self.assertEqual(conn.getresponse().status, 200)
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(30), 0)

    def test_kill_9_loses_nothing_acknowledged(self):
        """After SIGKILL, every acknowledged mutation is still there (journal replay)."""
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            proc = self.start(tmp, port)
            self.wait_up(port, proc)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            for i in range(20):
                conn.request("POST", "/v2.1/os-keypairs",
                             json.dumps({"keypair": {"name": f"k{i}", "public_key": SAMPLE_KEY}}),
                             {"X-Auth-Token": "admin:admin", "Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                self.assertEqual(resp.status, 200)
            proc.kill()
            proc.wait(10)
            proc = self.start(tmp, port)
            self.wait_up(port, proc)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/v2.1/os-keypairs", headers={"X-Auth-Token": "admin:admin"})
            self.assertEqual(len(json.loads(conn.getresponse().read())["keypairs"]), 20)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)

    def test_noauth_warns_loudly(self):
        """Start-up in noauth mode says that authentication is off."""
        with tempfile.TemporaryDirectory() as tmp:
            port = free_port()
            proc = self.start(tmp, port)
            self.wait_up(port, proc)
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            self.assertIn("AUTHENTICATION IS OFF", proc.stderr.read())


class DiskFullTests(unittest.TestCase):
    """The data directory on a small tmpfs that fills up: changes get 503 with
    Retry-After and are not made, reads go on, and changes work again once there is
    room; a restart finds exactly the acknowledged changes."""

    def setUp(self):
        try:
            minivan.import_libvirt()
        except minivan.ConfigError as e:
            skip_or_fail(self, str(e))
        self.tmp = tempfile.mkdtemp(prefix="minivan-full-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.data = os.path.join(self.tmp, "data")
        os.makedirs(self.data)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", self.data],
                              capture_output=True, text=True)
        if done.returncode != 0:
            skip_or_fail(self, "cannot mount a tmpfs here: " + done.stderr.strip())
        self.addCleanup(subprocess.run, ["umount", "-l", self.data], capture_output=True)
        self.port = free_port()
        self.start()

    def start(self):
        env = dict(os.environ, MINIVAN_DATA_DIR=self.data, MINIVAN_PORT=str(self.port),
                   MINIVAN_LIBVIRT_URI="test:///default", MINIVAN_BIND="127.0.0.1")
        self.log = open(os.path.join(self.tmp, "minivan.log"), "a")
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "minivan.py")],
                                     env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: self.proc.poll() is None and self.proc.kill())
        self.addCleanup(self.log.close)
        self.assertTrue(wait_healthy(self.port, self.proc, 30))

    def stop(self):
        self.proc.terminate()
        self.assertEqual(self.proc.wait(30), 0)

    def call(self, method, path, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(method, "/v2.1" + path, json.dumps(body) if body is not None else None,
                     {"X-Auth-Token": "admin:admin", "Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
        return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else None

    def fill_disk(self):
        filler = os.path.join(self.data, "filler")
        try:
            with open(filler, "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        except OSError:
            pass
        return filler

    def test_a_full_disk_refuses_changes_and_loses_nothing(self):
        status, _, made = self.call("POST", "/os-keypairs", {"keypair": {"name": "before"}})
        self.assertEqual(status, 200)
        for n in range(3):
            self.assertEqual(self.call("POST", "/flavors", {"flavor": {
                "name": f"ok{n}", "ram": 64, "vcpus": 1, "disk": 1}})[0], 200)
        filler = self.fill_disk()
        refused = 0
        for n in range(20):            # the first ones may still fit in the last block
            status, headers, body = self.call("POST", "/flavors", {"flavor": {
                "name": f"full{n}", "ram": 64, "vcpus": 1, "disk": 1}})
            if status == 503:
                refused += 1
                self.assertEqual(headers.get("Retry-After"), "5")
                self.assertIn("cannot write its state", body["serviceUnavailable"]["message"])
            else:
                self.assertEqual(status, 200)
        self.assertGreater(refused, 0)
        # reads go on, and show no refused change
        status, _, flavors = self.call("GET", "/flavors/detail")
        self.assertEqual(status, 200)
        names = {f["name"] for f in flavors["flavors"]}
        self.assertTrue({"ok0", "ok1", "ok2"} <= names)
        kept = {name for name in names if name.startswith("full")}
        self.assertEqual(len(kept), 20 - refused)
        self.assertEqual(self.call("GET", "/os-keypairs/before")[0], 200)
        # room again: changes work again
        os.unlink(filler)
        self.assertEqual(self.call("POST", "/flavors", {"flavor": {
            "name": "after", "ram": 64, "vcpus": 1, "disk": 1}})[0], 200)
        self.stop()
        with open(os.path.join(self.data, "state.json")) as f:
            stored = {f["name"] for f in json.load(f)["data"]["flavors"].values()}
        self.assertEqual({n for n in stored if n.startswith(("ok", "full", "after"))},
                         {"ok0", "ok1", "ok2", "after"} | kept)
        self.start()
        status, _, flavors = self.call("GET", "/flavors/detail")
        self.assertEqual({f["name"] for f in flavors["flavors"]}, names | {"after"})


class SystemdUnitTests(unittest.TestCase):
    def test_unit_verifies(self):
        """systemd-analyze verify accepts minivan.service (ExecStart pointed at this file)."""
        analyze = shutil.which("systemd-analyze")
        if not analyze:
            skip_or_fail(self, "systemd-analyze not installed (Debian package systemd)")
        with open(os.path.join(HERE, "minivan.service")) as f:
            unit = f.read()
        self.assertIn("Type=notify", unit)
        self.assertIn("StateDirectory=minivan", unit)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "minivan.service")
            with open(path, "w") as f:
                f.write(unit.replace("/usr/local/lib/minivan/minivan.py",
                                     os.path.join(HERE, "minivan.py")))
            done = subprocess.run([analyze, "verify", path], capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertNotIn("minivan.service:", done.stderr)

    def test_exposure_score(self):
        """systemd-analyze security rates the unit 4.0 or better ("OK"); the sandbox it
        scores is the one NeutronEndToEndTests runs minivan in (tools/sandbox.py refuses
        a directive it cannot apply)."""
        analyze = shutil.which("systemd-analyze")
        if not analyze:
            skip_or_fail(self, "systemd-analyze not installed (Debian package systemd)")
        done = subprocess.run([analyze, "security", "--offline=true", "--no-pager",
                               os.path.join(HERE, "minivan.service")],
                              capture_output=True, text=True)
        found = re.search(r"Overall exposure level for minivan.service: ([0-9.]+) (\w+)",
                          done.stdout)
        self.assertIsNotNone(found, done.stdout[-2000:] + done.stderr)
        self.assertLessEqual(float(found.group(1)), 4.0, done.stdout)
        unit = os.path.join(HERE, "minivan.service")
        with open(unit) as f:
            lines = f.read().splitlines()
        with tempfile.TemporaryDirectory() as tmp:
            # a directive tools/sandbox.py does not know is refused, not ignored
            path = os.path.join(tmp, "minivan.service")
            with open(path, "w") as f:
                f.write("\n".join(lines[:-2] + ["IPAddressDeny=any"] + lines[-2:]) + "\n")
            refused = subprocess.run([sys.executable, os.path.join(HERE, "tools",
                                                                    "sandbox.py"),
                                      "--unit", path, "--state-dir", tmp, "true"],
                                     capture_output=True, text=True)
        self.assertEqual(refused.returncode, 2)
        self.assertIn("cannot apply IPAddressDeny=", refused.stderr)


# -- Tempest's published response schemas ---------------------------------------------

def tempest_schema(vdir, module, name):
    import importlib
    mod = importlib.import_module(f"tempest.lib.api_schema.response.compute.{vdir}.{module}")
    return getattr(mod, name)


class TempestSchemaTests(AppTestCase):
    """Bodies checked against tempest.lib's compute response schemas (tempest 47.0.0)."""

    def setUp(self):
        try:
            from tempest.lib.common import jsonschema_validator
        except ImportError:
            skip_or_fail(self, "tempest is not installed (pip install tempest==47.0.0)")
        self.validator = jsonschema_validator
        super().setUp()
        self.post("/v2.1/flavors", {"flavor": {"name": "priv", "id": "p1", "ram": 64, "vcpus": 1,
                                               "disk": 1, "os-flavor-access:is_public": False}})
        self.post("/v2.1/flavors/p1/action", {"addTenantAccess": {"tenant": "demo"}})
        self.post("/v2.1/flavors/1/os-extra_specs", {"extra_specs": {"key1": "v1"}})
        for name in ("a", "b", "c"):
            self.post("/v2.1/os-keypairs", {"keypair": {"name": name, "public_key": SAMPLE_KEY}})

    def validate(self, reply, vdir, module, name):
        import jsonschema
        schema = tempest_schema(vdir, module, name)
        self.assertIn(reply.status, schema["status_code"], f"{module}.{name} {reply.raw[:300]}")
        if "response_body" in schema:
            jsonschema.validate(reply.json(), schema["response_body"],
                                cls=self.validator.JSONSCHEMA_VALIDATOR,
                                format_checker=self.validator.FORMAT_CHECKER)
        else:
            self.assertEqual(reply.raw, b"")

    def test_versions(self):
        """Version documents match tempest's versions schemas."""
        self.validate(self.get("/", token=None), "v2_1", "versions", "list_versions")
        self.validate(self.get("/v2.1/", token=None), "v2_1", "versions", "get_one_version")
        self.validate(self.get("/v2.1/admin/"), "v2_1", "versions", "get_one_version")
        self.validate(self.get("/v2.1/versions/v2.1"), "v2_1", "versions", "get_one_version")
        self.validate(self.get("/v3", token=None), "v2_1", "versions", "get_version")

    def test_flavors(self):
        """Flavor lists and bodies at 2.1, 2.55, 2.61, 2.75 and 2.102."""
        for version, vdir in (("2.1", "v2_1"), ("2.54", "v2_1"), ("2.55", "v2_55"),
                              ("2.61", "v2_61"), ("2.75", "v2_61"), ("2.102", "v2_61"),
                              ("latest", "v2_61")):
            self.validate(self.get("/v2.1/flavors?limit=2", version=version), vdir, "flavors",
                          "list_flavors")
            self.validate(self.get("/v2.1/flavors/detail?limit=2", version=version), vdir,
                          "flavors", "list_flavors_details")
            self.validate(self.get("/v2.1/flavors/1", version=version), vdir, "flavors",
                          "create_update_get_flavor_details")
            body = {"flavor": {"name": "s" + version, "ram": 64, "vcpus": 1, "disk": 1}}
            created = self.post("/v2.1/flavors", body, version=version)
            self.validate(created, vdir, "flavors", "create_update_get_flavor_details")
            flavor_id = created.json()["flavor"]["id"]
            if version not in ("2.1", "2.54"):
                self.validate(self.put("/v2.1/flavors/" + flavor_id,
                                       {"flavor": {"description": "d"}}, version=version),
                              vdir, "flavors", "create_update_get_flavor_details")
            self.validate(self.delete("/v2.1/flavors/" + flavor_id, version=version), vdir,
                          "flavors", "delete_flavor")

    def test_flavor_extra_specs_and_access(self):
        """Extra specs and flavor access bodies."""
        v = ("v2_1", "flavors_extra_specs")
        self.validate(self.get("/v2.1/flavors/1/os-extra_specs"), *v, "set_get_flavor_extra_specs")
        self.validate(self.post("/v2.1/flavors/1/os-extra_specs", {"extra_specs": {"k": "v"}}),
                      *v, "set_get_flavor_extra_specs")
        self.validate(self.get("/v2.1/flavors/1/os-extra_specs/k"), *v,
                      "set_get_flavor_extra_specs_key")
        self.validate(self.put("/v2.1/flavors/1/os-extra_specs/k", {"k": "w"}), *v,
                      "set_get_flavor_extra_specs_key")
        self.validate(self.delete("/v2.1/flavors/1/os-extra_specs/k"), *v,
                      "unset_flavor_extra_specs")
        a = ("v2_1", "flavors_access", "add_remove_list_flavor_access")
        self.validate(self.get("/v2.1/flavors/p1/os-flavor-access"), *a)
        self.validate(self.post("/v2.1/flavors/p1/action", {"addTenantAccess": {"tenant": "t2"}}),
                      *a)
        self.validate(self.post("/v2.1/flavors/p1/action",
                                {"removeTenantAccess": {"tenant": "t2"}}), *a)

    def test_keypairs(self):
        """Keypair bodies at 2.1, 2.2, 2.10, 2.35, 2.92 and latest."""
        for version, vdir in (("2.1", "v2_1"), ("2.2", "v2_2"), ("2.10", "v2_2"),
                              ("2.35", "v2_2"), ("2.92", "v2_2"), ("latest", "v2_2")):
            # tempest's list schema has no keypairs_links (added at 2.35): list whole pages
            self.validate(self.get("/v2.1/os-keypairs", version=version), vdir,
                          "keypairs", "list_keypairs")
            self.validate(self.get("/v2.1/os-keypairs/a", version=version), vdir, "keypairs",
                          "get_keypair")
            name = "n" + version.replace(".", "")
            created = self.post("/v2.1/os-keypairs", {"keypair": {
                "name": name, "public_key": SAMPLE_KEY}}, version=version)
            self.validate(created, vdir, "keypairs", "create_keypair")
            self.validate(self.delete("/v2.1/os-keypairs/" + name, version=version), vdir,
                          "keypairs", "delete_keypair")
        generated = self.post("/v2.1/os-keypairs", {"keypair": {"name": "gen"}}, version="2.91")
        self.validate(generated, "v2_2", "keypairs", "create_keypair")

    def test_limits(self):
        """Limits at 2.1, 2.36, 2.39, 2.57 and latest."""
        for version, vdir in (("2.1", "v2_1"), ("2.36", "v2_36"), ("2.39", "v2_39"),
                              ("2.57", "v2_57"), ("latest", "v2_57")):
            self.validate(self.get("/v2.1/limits", version=version), vdir, "limits", "get_limit")

    def test_quotas(self):
        """Quota sets at 2.1, 2.36, 2.57 and latest; quota classes at 2.1, 2.50, 2.57."""
        for version, vdir in (("2.1", "v2_1"), ("2.36", "v2_36"), ("2.57", "v2_57"),
                              ("latest", "v2_57")):
            q = ("quotas",)
            self.validate(self.get("/v2.1/os-quota-sets/demo", version=version), vdir, *q,
                          "get_quota_set")
            self.validate(self.get("/v2.1/os-quota-sets/demo?user_id=u", version=version), vdir,
                          *q, "get_quota_set")
            self.validate(self.get("/v2.1/os-quota-sets/demo/defaults", version=version), vdir,
                          *q, "get_quota_set")
            self.validate(self.get("/v2.1/os-quota-sets/demo/detail", version=version), vdir, *q,
                          "get_quota_set_details")
            self.validate(self.put("/v2.1/os-quota-sets/demo", {"quota_set": {"cores": 9}},
                                   version=version), vdir, *q, "update_quota_set")
            self.validate(self.delete("/v2.1/os-quota-sets/demo", version=version), vdir, *q,
                          "delete_quota")
        for version, vdir in (("2.1", "v2_1"), ("2.50", "v2_50"), ("2.57", "v2_57"),
                              ("latest", "v2_57")):
            self.validate(self.get("/v2.1/os-quota-class-sets/default", version=version), vdir,
                          "quota_classes", "get_quota_class_set")
            self.validate(self.put("/v2.1/os-quota-class-sets/default",
                                   {"quota_class_set": {"cores": 30}}, version=version), vdir,
                          "quota_classes", "update_quota_class_set")

    def test_availability_zones(self):
        """Zone list and detail."""
        self.validate(self.get("/v2.1/os-availability-zone"), "v2_1", "availability_zone",
                      "list_availability_zone_list")
        self.validate(self.get("/v2.1/os-availability-zone/detail"), "v2_1", "availability_zone",
                      "list_availability_zone_list_detail")


# -- end to end: the real OpenStack clients -------------------------------------------

BIN = os.path.dirname(sys.executable)


def start_minivan(test_cls, port, args=(), env_extra=None, images=(), data=None, hosts=0,
                  sandbox=False):
    """A minivan.py process on 127.0.0.1:port with its own data directory (and these
    images in its image directory); data= restarts one on an existing directory.
    hosts=N gives it N simulated compute hosts, cmp1..cmpN (else test:///default).
    sandbox=True runs it as minivan.service would (sandbox_command)."""
    command = [sys.executable, os.path.join(HERE, "minivan.py"), *args]
    if sandbox:
        command, data = sandbox_command(test_cls, args)
    data = data or tempfile.mkdtemp(prefix="minivan-e2e-")
    for name in images:
        make_image(os.path.join(data, "images"), name)
    env = dict(os.environ, MINIVAN_DATA_DIR=data, MINIVAN_PORT=str(port),
               MINIVAN_LIBVIRT_URI="test:///default",
               MINIVAN_INSTANCE_NAME_TEMPLATE=f"mv{port}-%08x")   # (a libvirtd is shared)
    if hosts:
        pairs = []
        for n in range(1, hosts + 1):
            path = os.path.join(data, f"cmp{n}.xml")
            with open(path, "w") as f:
                f.write(TEST_NODE_XML)
            pairs.append(f"cmp{n}=test://{path}")
        env["MINIVAN_COMPUTE_HOSTS"] = ",".join(pairs)
    env.update(env_extra or {})
    test_cls.minivan_start = (port, args, env_extra)
    log = open(os.path.join(data, "minivan.log"), "a")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    if not wait_healthy(port, proc, 30) and proc.poll() is not None:
        raise RuntimeError("minivan exited: " + open(log.name).read())
    test_cls.minivan_proc, test_cls.minivan_data, test_cls.minivan_log = proc, data, log
    return proc


SANDBOX_PYTHON = "/usr/bin/python3"       # the unit's ExecStart interpreter


def sandbox_ready():
    """None when tools/sandbox.py can run minivan here, else why not."""
    if os.geteuid() != 0:
        return "the sandbox needs root"
    done = subprocess.run([SANDBOX_PYTHON, "-c", "import seccomp, libvirt"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return ("the unit's interpreter lacks python3-seccomp or python3-libvirt (Debian: "
                "apt install python3-seccomp python3-libvirt): " + done.stderr.strip()[-200:])
    return None


def sandbox_command(test_cls, args):
    """(command, data directory) of minivan installed as the unit expects (a copy of
    minivan.py and flavors.json in a directory the sandbox makes read-only) under
    tools/sandbox.py: minivan.service's namespaces, capabilities and seccomp filter,
    with a state directory in /var/lib (PrivateTmp= hides /tmp from it)."""
    base = tempfile.mkdtemp(dir="/var/lib", prefix="minivan-sandbox-")
    os.chmod(base, 0o711)                  # QEMU's user passes through to the disks
    # a host with systemd as PID 1 has shared mounts, so what libvirt mounts later reaches
    # the service's namespace; where PID 1 is another program they are private: the
    # directory becomes a shared mount of its own
    subprocess.run(["mount", "--bind", base, base], check=True)
    test_cls.host_mounts = [base]
    subprocess.run(["mount", "--make-shared", base], check=True)
    lib, data = os.path.join(base, "lib"), os.path.join(base, "state")
    os.mkdir(lib)
    os.mkdir(data, 0o711)
    for name in ("minivan.py", "flavors.json"):
        shutil.copy(os.path.join(HERE, name), lib)
    test_cls.sandbox_base = base
    return [SANDBOX_PYTHON, os.path.join(HERE, "tools", "sandbox.py"), "--unit",
            os.path.join(HERE, "minivan.service"), "--state-dir", data,
            "--minivan", os.path.join(lib, "minivan.py")] + (
                ["--", SANDBOX_PYTHON, os.path.join(lib, "minivan.py"), *args] if args
                else []), data


def stop_minivan(test_cls):
    proc = getattr(test_cls, "minivan_proc", None)
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if getattr(test_cls, "minivan_log", None):
        test_cls.minivan_log.close()
    for point in getattr(test_cls, "host_mounts", []):
        # (a share mounted into the data directory is unmounted before anything is removed)
        if subprocess.run(["umount", "-l", point], capture_output=True).returncode != 0:
            return
    shutil.rmtree(getattr(test_cls, "minivan_data", ""), True)
    if getattr(test_cls, "sandbox_base", None):
        shutil.rmtree(test_cls.sandbox_base, True)


def have_clients():
    return all(os.path.exists(os.path.join(BIN, name)) for name in ("openstack",)) and \
        all(_importable(m) for m in ("openstack", "novaclient", "keystoneauth1"))


def _importable(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def keystone_minivan_env(env, **extra):
    """The settings of a minivan behind the test Keystone (env: keystone.sh's env file),
    bound to 127.0.0.1, with extra settings."""
    return {"MINIVAN_KEYSTONE_URL": env["OS_AUTH_URL"],
            "MINIVAN_KEYSTONE_USERNAME": env["MINIVAN_USERNAME"],
            "MINIVAN_KEYSTONE_PASSWORD": env["MINIVAN_PASSWORD"],
            "MINIVAN_KEYSTONE_PROJECT": env["MINIVAN_PROJECT_NAME"],
            "MINIVAN_BIND": "127.0.0.1", **extra}


def run_openstack(test, args, env=None, expect_ok=True):
    """Run openstackclient with env over os.environ; parsed JSON for -f json commands."""
    done = subprocess.run([os.path.join(BIN, "openstack"), *args], capture_output=True,
                          text=True, timeout=180, env=dict(os.environ, **(env or {})))
    if expect_ok:
        test.assertEqual(done.returncode, 0, f"{args}: {done.stderr}")
        if "json" in args:
            return json.loads(done.stdout or "null")
    return done


class CLIMixin:
    os_args = []

    def openstack(self, *args, expect_ok=True, env=None):
        """Run openstackclient; returns parsed JSON for -f json commands."""
        return run_openstack(self, [*self.os_args, *args], env, expect_ok)

    def keyfile(self):
        path = os.path.join(self.minivan_data, "key.pub")
        with open(path, "w") as f:
            f.write(SAMPLE_KEY + "\n")
        return path

    def test_cli_flavors(self):
        """openstack flavor list/show/create/set/unset/delete."""
        self.check_flavor_cli()

    def test_cli_keypairs(self):
        """openstack keypair create (import and generate)/list/show/delete."""
        self.check_keypair_cli()

    def test_cli_limits_and_zones(self):
        """openstack limits show --absolute and availability zone list --compute."""
        self.check_limits_and_zones_cli()

    def check_flavor_cli(self):
        names = [f["Name"] for f in self.openstack("flavor", "list", "-f", "json")]
        self.assertIn("m1.tiny", names)
        shown = self.openstack("flavor", "show", "m1.tiny", "-f", "json")
        self.assertEqual((shown["ram"], shown["vcpus"], shown["disk"]), (512, 1, 1))
        made = self.openstack("flavor", "create", "--ram", "128", "--disk", "1", "--vcpus", "1",
                              "--id", "e2e", "--private", "e2e-flavor", "-f", "json")
        self.assertEqual(made["id"], "e2e")
        self.openstack("flavor", "set", "--property", "hw:cpu_policy=shared",
                       "--description", "from the CLI", "e2e-flavor")
        shown = self.openstack("flavor", "show", "e2e-flavor", "-f", "json")
        self.assertEqual(shown["properties"], {"hw:cpu_policy": "shared"})
        self.assertEqual(shown["description"], "from the CLI")
        self.openstack("flavor", "unset", "--property", "hw:cpu_policy", "e2e-flavor")
        self.openstack("flavor", "delete", "e2e-flavor")
        gone = self.openstack("flavor", "show", "e2e-flavor", expect_ok=False)
        self.assertNotEqual(gone.returncode, 0)

    def check_keypair_cli(self):
        made = self.openstack("keypair", "create", "--public-key", self.keyfile(), "e2e-key",
                              "-f", "json")
        self.assertEqual(made["fingerprint"], SAMPLE_FINGERPRINT)
        names = [k["Name"] for k in self.openstack("keypair", "list", "-f", "json")]
        self.assertIn("e2e-key", names)
        shown = self.openstack("keypair", "show", "e2e-key", "-f", "json")
        self.assertEqual(shown["name"], "e2e-key")
        generated = self.openstack("keypair", "create", "e2e-gen")
        self.assertIn("PRIVATE KEY", generated.stdout)
        self.openstack("keypair", "delete", "e2e-key", "e2e-gen")
        self.assertEqual(self.openstack("keypair", "list", "-f", "json"), [])

    def check_limits_and_zones_cli(self):
        limits = {row["Name"]: row["Value"] for row in
                  self.openstack("limits", "show", "--absolute", "-f", "json")}
        self.assertEqual((limits["instances"], limits["server_meta"]), (10, 128))
        zones = self.openstack("availability", "zone", "list", "--compute", "-f", "json")
        self.assertIn("nova", [z["Zone Name"] for z in zones])


def write_clouds_yaml(directory, port):
    """The README's clouds.yaml: minivan alone, no authentication."""
    path = os.path.join(directory, "clouds.yaml")
    with open(path, "w") as f:
        f.write(f"""clouds:
  minivan:
    auth_type: none
    auth:
      endpoint: http://127.0.0.1:{port}/v2.1
    compute_endpoint_override: http://127.0.0.1:{port}/v2.1
    image_endpoint_override: http://127.0.0.1:{port}/image
    identity_api_version: '3'
""")
    return path


def run_osc_cloud(test, env, *args):
    done = subprocess.run([os.path.join(BIN, "openstack"), *args], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, **env))
    test.assertEqual(done.returncode, 0, f"{args}: {done.stderr}")
    return done.stdout


class NoAuthCLITestCase(CLIMixin, unittest.TestCase):
    """The clients against a minivan of the class's own in noauth mode (start_args: how
    it starts; OS_EXTRA: more openstackclient arguments)."""

    __test__ = False
    OS_EXTRA = ()

    @classmethod
    def start_args(cls):
        return {}

    @classmethod
    def setUpClass(cls):
        if not have_clients():
            return
        cls.port = free_port()
        cls.url = f"http://127.0.0.1:{cls.port}/v2.1"
        cls.os_args = ["--os-auth-type", "none", "--os-endpoint", cls.url,
                       "--os-identity-api-version", "3", *cls.OS_EXTRA]
        start_minivan(cls, cls.port, **cls.start_args())

    @classmethod
    def tearDownClass(cls):
        stop_minivan(cls)

    def setUp(self):
        if not have_clients():
            skip_or_fail(self, "OpenStack clients not installed (tools/setup-venvs.sh)")


class NoAuthEndToEndTests(NoAuthCLITestCase):
    """openstackclient, openstacksdk and novaclient against minivan in noauth mode."""

    __test__ = True

    def test_standalone_clouds_yaml(self):
        """With only minivan and a clouds.yaml of auth_type none, the README's commands work:
        image create --file, server create --image NAME --wait, list, show, console log,
        server image create, delete --wait."""
        config = write_clouds_yaml(self.minivan_data, self.port)
        env = {"OS_CLIENT_CONFIG_FILE": config, "OS_CLOUD": "minivan"}
        run = functools.partial(run_osc_cloud, self, env)
        image_file = make_image(os.path.join(self.minivan_data, "upload"), "upload")
        made = json.loads(run("image", "create", "--file", image_file, "--disk-format", "qcow2",
                              "--container-format", "bare", "e2e-image", "-f", "json"))
        self.assertEqual(made["status"], "active")
        self.assertIn("e2e-image", run("image", "list"))
        server = json.loads(run("server", "create", "--image", "e2e-image", "--flavor",
                                "m1.tiny", "--wait", "e2e-vm", "-f", "json"))
        self.assertEqual(server["status"], "ACTIVE")
        self.assertIn("e2e-vm", run("server", "list"))
        shown = json.loads(run("server", "show", "e2e-vm", "-f", "json"))
        self.assertEqual(shown["image"].split(" ")[0], "e2e-image")
        self.assertIn("booted", run("console", "log", "show", "e2e-vm"))
        run("server", "image", "create", "--name", "e2e-snap", "--wait", "e2e-vm")
        snap = json.loads(run("image", "show", "e2e-snap", "-f", "json"))
        self.assertEqual((snap["status"], snap["properties"]["instance_uuid"]),
                         ("active", server["id"]))
        run("server", "delete", "--wait", "e2e-vm")
        self.assertNotIn("e2e-vm", run("server", "list"))

    def test_sdk(self):
        """openstacksdk negotiates 2.104 and manages flavors and keypairs."""
        import openstack
        conn = openstack.connect(auth_type="none", auth={"endpoint": self.url},
                                 compute_endpoint_override=self.url, identity_api_version="3")
        self.assertEqual(conn.compute.get_endpoint_data().max_microversion, (2, 104))
        self.assertIn("m1.tiny", [f.name for f in conn.compute.flavors()])
        flavor = conn.compute.create_flavor(name="sdk-flavor", ram=64, vcpus=1, disk=0)
        self.assertEqual(conn.compute.get_flavor(flavor.id).name, "sdk-flavor")
        conn.compute.delete_flavor(flavor.id)
        kp = conn.compute.create_keypair(name="sdk-key", public_key=SAMPLE_KEY)
        self.assertEqual(kp.fingerprint, SAMPLE_FINGERPRINT)
        self.assertEqual([k.name for k in conn.compute.keypairs()], ["sdk-key"])
        conn.compute.delete_keypair("sdk-key")
        self.assertEqual(conn.compute.get_limits().absolute.instances, 10)
        self.assertEqual([z.name for z in conn.compute.availability_zones()], ["nova"])

    def test_novaclient(self):
        """python-novaclient lists versions, flavors, keypairs and limits."""
        from keystoneauth1 import noauth, session
        from novaclient import client
        sess = session.Session(auth=noauth.NoAuth(endpoint=self.url))
        nova = client.Client("2.96", session=sess, endpoint_override=self.url)
        self.assertEqual([v.id for v in nova.versions.list()], ["v2.0", "v2.1"])
        self.assertIn("m1.small", [f.name for f in nova.flavors.list()])
        nova.keypairs.create("nova-key", public_key=SAMPLE_KEY)
        self.assertEqual([k.name for k in nova.keypairs.list()], ["nova-key"])
        nova.keypairs.delete("nova-key")
        absolute = {a.name: a.value for a in nova.limits.get().absolute}
        self.assertEqual(absolute["maxTotalKeypairs"], 100)
        old = client.Client("2.1", session=sess, endpoint_override=self.url)
        self.assertEqual(old.flavors.get("1").name, "m1.tiny")


def keystone_env():
    """The variables tools/keystone.sh (and glance.sh) wrote for the running test Keystone,
    with tools/cinder.sh's CINDER_* ones when a Cinder runs; None without a Keystone."""
    path = os.environ.get("MINIVAN_TEST_KEYSTONE_ENV")
    if not path or not os.path.exists(path):
        return None
    env = {}
    for name in (path, os.environ.get("MINIVAN_TEST_CINDER_ENV", "")):
        if not name or not os.path.exists(name):
            continue
        with open(name) as f:
            for line in f:
                if line.startswith("export ") and "=" in line:
                    key, value = line[7:].strip().split("=", 1)
                    env[key] = value
    return env


def glance_upload(env, name, path, visibility="public", properties=None):
    """Create a qcow2 image in the test Glance as admin; returns its id."""
    import urllib.request
    token = keystone_token(env, "admin", "admin")
    base = env["GLANCE_URL"].rstrip("/")
    req = urllib.request.Request(base + "/v2/images", method="POST", data=json.dumps(dict(
        properties or {}, name=name, disk_format="qcow2", container_format="bare",
        visibility=visibility)).encode(), headers={
        "X-Auth-Token": token, "Content-Type": "application/json",
        "Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        image_id = json.loads(resp.read())["id"]
    with open(path, "rb") as f:
        req = urllib.request.Request(f"{base}/v2/images/{image_id}/file", method="PUT",
                                     data=f.read(), headers={
                                         "X-Auth-Token": token,
                                         "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(req, timeout=60):
        pass
    return image_id


def keystone_token(env, user, project, password=None):
    import urllib.request
    body = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": user, "domain": {"name": "Default"}, "password": password or env["OS_PASSWORD"]}}},
        "scope": {"project": {"name": project, "domain": {"name": "Default"}}}}}
    req = urllib.request.Request(env["OS_AUTH_URL"] + "/auth/tokens?nocatalog",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.headers["X-Subject-Token"]


class AdminCLIEndToEndTests(NoAuthCLITestCase):
    """An operator's day with openstackclient against minivan on three simulated hosts:
    hypervisors, compute services, aggregates and zones, server groups, cold migration,
    migrations, evacuation, console URLs and usage."""

    __test__ = True
    OS_EXTRA = ("--os-compute-api-version", "2.79")

    @classmethod
    def start_args(cls):
        return {"images": ("admin-image",), "hosts": 3, "env_extra": {
            "MINIVAN_SERIAL_CONSOLE_LISTEN": f"127.0.0.1:{free_port()}",
            "MINIVAN_VNC_LISTEN": f"127.0.0.1:{free_port()}"}}

    test_cli_flavors = test_cli_keypairs = test_cli_limits_and_zones = None   # run elsewhere

    def boot(self, name, *extra):
        server = self.openstack("server", "create", "--image", "admin-image", "--flavor",
                                "m1.tiny", "--wait", *extra, name, "-f", "json")
        self.addCleanup(self.openstack, "server", "delete", "--wait", server["id"],
                        expect_ok=False)
        self.assertEqual(server["status"], "ACTIVE")
        return server

    def test_hypervisors_and_services(self):
        hypervisors = self.openstack("hypervisor", "list", "-f", "json")
        self.assertEqual(sorted(h["Hypervisor Hostname"] for h in hypervisors),
                         ["cmp1", "cmp2", "cmp3"])
        shown = self.openstack("hypervisor", "show", "cmp2", "-f", "json")
        self.assertEqual((shown["service_host"], shown["state"], shown["status"]),
                         ("cmp2", "up", "enabled"))
        stats = self.openstack("hypervisor", "stats", "show", "-f", "json",
                               "--os-compute-api-version", "2.87")
        self.assertEqual(stats["count"], 3)
        services = self.openstack("compute", "service", "list", "--service", "nova-compute",
                                  "-f", "json")
        self.assertEqual(sorted(s["Host"] for s in services), ["cmp1", "cmp2", "cmp3"])
        self.openstack("compute", "service", "set", "--disable", "--disable-reason",
                       "maintenance", "cmp3", "nova-compute")
        self.addCleanup(self.openstack, "compute", "service", "set", "--enable", "cmp3",
                        "nova-compute")
        listed = self.openstack("compute", "service", "list", "--host", "cmp3", "--long",
                                "-f", "json")
        self.assertEqual([(s["Status"], s["Disabled Reason"]) for s in listed],
                         [("disabled", "maintenance")])
        # a disabled host gets no new servers
        for n in range(3):
            self.assertNotEqual(self.boot(f"spread-{n}")["OS-EXT-SRV-ATTR:host"], "cmp3")

    def test_aggregates_zones_and_groups(self):
        agg = self.openstack("aggregate", "create", "--zone", "edge", "edge-rack", "-f", "json")
        self.addCleanup(self.openstack, "aggregate", "delete", "edge-rack", expect_ok=False)
        self.openstack("aggregate", "add", "host", "edge-rack", "cmp2")
        self.addCleanup(self.openstack, "aggregate", "remove", "host", "edge-rack", "cmp2",
                        expect_ok=False)
        self.openstack("aggregate", "set", "--property", "ssd=true", "edge-rack")
        shown = self.openstack("aggregate", "show", "edge-rack", "-f", "json")
        self.assertEqual((shown["hosts"], shown["availability_zone"], shown["id"]),
                         (["cmp2"], "edge", agg["id"]))
        self.assertEqual(shown["properties"], {"ssd": "true"})
        zones = {z["Zone Name"] for z in self.openstack("availability", "zone", "list",
                                                        "--compute", "-f", "json")}
        self.assertEqual(zones, {"nova", "edge", "internal"})   # internal: admin only
        self.assertEqual(self.boot("edgy", "--availability-zone", "edge")
                         ["OS-EXT-SRV-ATTR:host"], "cmp2")
        group = self.openstack("server", "group", "create", "--policy", "anti-affinity",
                               "apart", "-f", "json")
        self.addCleanup(self.openstack, "server", "group", "delete", group["id"],
                        expect_ok=False)
        hosts = {self.boot(f"apart-{n}", "--hint", f"group={group['id']}")
                 ["OS-EXT-SRV-ATTR:host"] for n in range(3)}
        self.assertEqual(len(hosts), 3)
        members = self.openstack("server", "group", "show", group["id"], "-f", "json")
        self.assertEqual(len(members["members"]), 3)
        self.openstack("server", "create", "--image", "admin-image", "--flavor", "m1.tiny",
                       "--hint", f"group={group['id']}", "apart-3", expect_ok=True)
        wait_until(lambda: self.openstack("server", "show", "apart-3", "-f", "json")
                   ["status"] == "ERROR", what="no valid host")
        fault = self.openstack("server", "show", "apart-3", "-f", "json")["fault"]
        self.assertIn("No valid host was found", fault["message"])
        self.openstack("server", "delete", "--wait", "apart-3")

    def test_migrate_evacuate_consoles_and_usage(self):
        server = self.boot("traveller", "--host", "cmp1")
        self.openstack("server", "migrate", "--host", "cmp2", "--wait", server["id"])
        shown = self.openstack("server", "show", server["id"], "-f", "json")
        self.assertEqual((shown["status"], shown["OS-EXT-SRV-ATTR:host"]),
                         ("VERIFY_RESIZE", "cmp2"))
        self.openstack("server", "migration", "confirm", server["id"])
        wait_until(lambda: self.openstack("server", "show", server["id"], "-f", "json")
                   ["status"] == "ACTIVE", what="confirmed")
        migrations = self.openstack("server", "migration", "list", "--server", server["id"],
                                    "-f", "json")
        self.assertEqual([(m["Source Compute"], m["Dest Compute"], m["Status"],
                           m["Type"]) for m in migrations],
                         [("cmp1", "cmp2", "confirmed", "migration")])
        # cmp2 goes down (forced, as an operator does when a host is lost): evacuate
        self.openstack("compute", "service", "set", "--down", "cmp2", "nova-compute",
                       "--os-compute-api-version", "2.11")
        self.addCleanup(self.openstack, "compute", "service", "set", "--up", "cmp2",
                        "nova-compute", "--os-compute-api-version", "2.11")
        # (not --wait: openstackclient 10.5 waits for 'ACTIVE' against a lowercased status)
        self.openstack("server", "evacuate", "--host", "cmp3", server["id"],
                       "--os-compute-api-version", "2.29")
        wait_until(lambda: self.openstack("server", "show", server["id"], "-f", "json")
                   ["status"] == "ACTIVE", what="evacuated")
        shown = self.openstack("server", "show", server["id"], "-f", "json")
        self.assertEqual((shown["status"], shown["OS-EXT-SRV-ATTR:host"]), ("ACTIVE", "cmp3"))
        evacuations = [m for m in self.openstack("server", "migration", "list", "--server",
                                                 server["id"], "-f", "json")
                       if m["Type"] == "evacuation"]
        self.assertEqual([(m["Source Compute"], m["Dest Compute"], m["Status"])
                          for m in evacuations], [("cmp2", "cmp3", "done")])
        for kind, scheme in (("--serial", "ws://"), ("--novnc", "http://")):
            url = self.openstack("console", "url", "show", kind, server["id"], "-f", "json")
            self.assertTrue(url["url"].startswith(scheme), url)
            self.assertIn("token", url["url"])
        usage = self.openstack("usage", "list", "-f", "json")
        self.assertEqual(len(usage), 1)
        self.assertGreaterEqual(len(usage[0]["Servers"]), 1)      # the server usages
        self.assertGreater(float(usage[0]["CPU Hours"]), 0)


def image_request(base, method, path, token, body=None, data=None, content_type=None):
    """One Glance v2 call (to the real Glance or minivan's /image): (status, JSON or bytes)."""
    headers = {"X-Auth-Token": token}
    payload = None
    if body is not None:
        payload = json.dumps(body).encode()
        headers["Content-Type"] = content_type or "application/json"
    elif data is not None:
        payload = data
        headers["Content-Type"] = "application/octet-stream"
    req = urllib.request.Request(base.rstrip("/") + path, data=payload, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            raw, status, ctype = resp.read(), resp.status, resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        raw, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
    if raw and ctype.startswith("application/json"):
        return status, json.loads(raw)
    return status, raw


JSON_PATCH = "application/openstack-images-v2.1-json-patch"


class GlanceComparisonTests(unittest.TestCase):
    """minivan's /image beside the real Glance 33, both behind the real Keystone: the same
    requests by an owner (member), a reader of its project, a member of another project
    and an admin get the same statuses; the hostile corpus uploaded to both is accepted
    or refused alike."""

    @classmethod
    def setUpClass(cls):
        cls.env = keystone_env()
        if cls.env is None or not cls.env.get("GLANCE_URL"):
            return
        cls.port = free_port()
        data = tempfile.mkdtemp(prefix="minivan-glance-cmp-")
        operator = make_image(os.path.join(data, "images"), "operator", size="1M")
        start_minivan(cls, cls.port, data=data, env_extra=keystone_minivan_env(
            cls.env, MINIVAN_GLANCE_URL="local"))
        cls.operator_file = operator
        cls.bases = {"glance": cls.env["GLANCE_URL"],
                     "minivan": f"http://127.0.0.1:{cls.port}/image"}
        cls.tokens = {name: keystone_token(cls.env, user, project) for name, (user, project)
                      in {"admin": ("admin", "admin"), "owner": ("demo", "demo"),
                          "reader": ("demo_reader", "demo"),
                          "other": ("alt_demo", "alt_demo")}.items()}

    @classmethod
    def tearDownClass(cls):
        stop_minivan(cls)

    def setUp(self):
        if self.env is None or not self.env.get("GLANCE_URL"):
            skip_or_fail(self, "no test Keystone and Glance (run tools/test.sh)")
        self.compared = []

    def both(self, who, method, path_of, body=None, data=None, content_type=None):
        """The request to both services (path_of(service) -> path, and body, or
        body(service)); asserts equal statuses, returns {service: (status, body)}."""
        got = {}
        for service, base in self.bases.items():
            got[service] = image_request(base, method, path_of(service), self.tokens[who],
                                         body(service) if callable(body) else body, data,
                                         content_type)
        statuses = {s: r[0] for s, r in got.items()}
        self.compared.append((who, method, path_of("glance"), statuses["glance"]))
        self.assertEqual(statuses["minivan"], statuses["glance"],
                         f"{who} {method} {path_of('glance')}: {got}")
        return got

    def create(self, who, **fields):
        body = dict({"name": "cmp", "disk_format": "raw", "container_format": "bare"},
                    **fields)
        got = self.both(who, "POST", lambda s: "/v2/images", body)
        return {s: r[1]["id"] for s, r in got.items() if r[0] == 201}

    def cleanup(self, ids):
        for service, image_id in ids.items():
            image_request(self.bases[service], "DELETE", "/v2/images/" + image_id,
                          self.tokens["admin"])

    def test_the_same_requests_get_the_same_statuses(self):
        """Create, upload, read, change, publicize, communitize, download and delete by
        four personas, against Glance's own default policies: equal statuses throughout;
        the image directory's image (the operator's) answers as an admin's public image in
        Glance, and a member's delete leaves its file."""
        mine = self.create("owner", visibility="private")
        self.addCleanup(self.cleanup, dict(mine))
        self.create("reader")
        self.create("other", owner=self.env["DEMO_PROJECT_ID"])
        path = lambda suffix="": lambda s: f"/v2/images/{mine[s]}{suffix}"  # noqa: E731
        self.both("owner", "PUT", path("/file"), data=b"\0" * 65536)
        for who in ("reader", "other", "admin", "owner"):
            self.both(who, "GET", path())
        patch = [{"op": "replace", "path": "/name", "value": "renamed"}]
        for who in ("reader", "other"):
            self.both(who, "PATCH", path(), patch, content_type=JSON_PATCH)
        for visibility in ("public", "community"):
            self.both("owner", "PATCH", path(), [{"op": "replace", "path": "/visibility",
                                                  "value": visibility}],
                      content_type=JSON_PATCH)
        self.both("other", "GET", path())
        self.both("other", "PATCH", path(), patch, content_type=JSON_PATCH)
        for who in ("other", "reader"):
            self.both(who, "DELETE", path())
        for who in ("reader", "other", "owner"):
            self.both(who, "GET", path("/file"))
        self.both("owner", "PATCH", path(), [{"op": "replace", "path": "/visibility",
                                              "value": "private"}], content_type=JSON_PATCH)
        self.both("other", "GET", path())
        self.both("owner", "PUT", path("/file"), data=b"\0" * 512)
        self.both("owner", "DELETE", path())
        self.both("owner", "GET", path())
        self.both("owner", "POST", lambda s: "/v2/images",   # a deleted image's id stays taken
                  lambda s: {"id": mine[s], "name": "again"})
        # an image with no formats takes no data
        bare = self.create("owner", disk_format=None, container_format=None)
        self.addCleanup(self.cleanup, dict(bare))
        self.both("owner", "PUT", lambda s: f"/v2/images/{bare[s]}/file", data=b"\0" * 512)
        # the operator's images: an admin's public image in Glance, the image directory's
        # in minivan
        public = image_request(self.bases["glance"], "POST", "/v2/images",
                               self.tokens["admin"], {"name": "operator", "disk_format": "qcow2",
                                                      "container_format": "bare",
                                                      "visibility": "public"})[1]["id"]
        self.addCleanup(self.cleanup, {"glance": public})
        with open(self.operator_file, "rb") as f:
            image_request(self.bases["glance"], "PUT", f"/v2/images/{public}/file",
                          self.tokens["admin"], data=f.read())
        listed = image_request(self.bases["minivan"], "GET", "/v2/images?name=operator",
                               self.tokens["admin"])[1]["images"]
        operator = {"glance": public, "minivan": listed[0]["id"]}
        op = lambda suffix="": lambda s: f"/v2/images/{operator[s]}{suffix}"  # noqa: E731
        for who in ("owner", "reader", "other"):
            self.both(who, "GET", op())
            self.both(who, "PATCH", op(), patch, content_type=JSON_PATCH)
            self.both(who, "DELETE", op())
        self.assertTrue(os.path.exists(self.operator_file))
        equal = len(self.compared)
        print(f"\nGlance comparison: {equal} requests compared, {equal} equal")

    def test_hostile_uploads_are_refused_alike(self):
        """Each image of the hostile corpus uploaded with its declared disk_format: minivan
        accepts (204, active) or refuses (415, queued) as the real Glance does."""
        canary = make_canary()
        self.addCleanup(shutil.rmtree, os.path.dirname(canary), True)
        corpus = tempfile.mkdtemp(prefix="minivan-corpus-")
        self.addCleanup(shutil.rmtree, corpus, True)
        table = []
        for case, declared, path in make_hostile_images(corpus, canary):
            with self.subTest(case=case):
                ids = self.create("owner", name=case, disk_format=declared)
                self.addCleanup(self.cleanup, dict(ids))
                with open(path, "rb") as f:
                    data = f.read()
                got = self.both("owner", "PUT", lambda s: f"/v2/images/{ids[s]}/file",
                                data=data)
                shown = self.both("owner", "GET", lambda s: f"/v2/images/{ids[s]}")
                self.assertEqual(shown["minivan"][1]["status"], shown["glance"][1]["status"])
                table.append((case, got["glance"][0], shown["glance"][1]["status"]))
        print("\nupload to Glance 33 and to minivan's /image (status, image status):")
        for row in table:
            print("  %-45s %s %s" % row)
        print(f"Glance comparison: {len(self.compared)} requests compared, "
              f"{len(self.compared)} equal")


# Nova's policy rules that only some requests reach (a query parameter, a body field, or
# a part of the answer the rule hides rather than refuses), each read off the Nova code
# that checks it; the oracle leaves them out of a route's plain call.
NOVA_CONDITIONAL_RULES = {
    # api/openstack/compute/servers.py _get_servers: all_tenants, and filters past the
    # user's own set
    "os_compute_api:servers:index:get_all_tenants",
    "os_compute_api:servers:detail:get_all_tenants",
    "os_compute_api:servers:allow_all_filters",
    # views/servers.py and servers.py: fields added only where allowed (fatal=False)
    "os_compute_api:os-extended-server-attributes",
    "os_compute_api:servers:show:flavor-extra-specs",
    "os_compute_api:servers:show:host_status",
    "os_compute_api:servers:show:host_status:unknown-only",
    # servers.py create(): a host or node asked for, volumes, networks, certificates, a
    # zero-disk flavor, an external network
    "os_compute_api:servers:create:forced_host",
    "compute:servers:create:requested_destination",
    "os_compute_api:servers:create:attach_volume",
    "os_compute_api:servers:create:attach_network",
    "os_compute_api:servers:create:trusted_certs",
    "os_compute_api:servers:create:zero_disk_flavor",
    "network:attach_external_network",
    "os_compute_api:servers:rebuild:trusted_certs",     # servers.py _action_rebuild
    "compute:servers:resize:cross_cell",                 # compute/api.py resize()
    # migrate_server.py: a target host given
    "os_compute_api:os-migrate-server:migrate_live:host",
    "os_compute_api:os-migrate-server:migrate:host",
    "os_compute_api:os-volumes-attachments:swap",        # volumes.py update(): a new volume
    "os_compute_api:os-server-groups:index:all_projects",  # server_groups.py: all_projects
    "os_compute_api:limits:other_project",               # limits.py: tenant_id
    "os_compute_api:os-migrations:index:host",           # migrations.py: hosts shown
    # flavors.py and flavor_manage.py: extra specs in the flavor's view where allowed
    "os_compute_api:os-flavor-extra-specs:index",      # (not on os-extra_specs itself)
    # instance_actions.py show(): events and their details shown where allowed
    "os_compute_api:os-instance-actions:events",
    "os_compute_api:os-instance-actions:events:details",
}

# Routes whose operations Nova's policy documents name by another path.
NOVA_OPERATION_ALIASES = {
    "/os-hypervisors/detail": "/os-hypervisors/details",   # hypervisors.py's spelling
}


class NovaPolicyTests(unittest.TestCase):
    """Every route of minivan behind the real Keystone, called by seven personas with
    real tokens; whether Nova would refuse it (403) comes from Nova 34's own policy
    defaults (nova.policies) evaluated by oslo.policy, the routes matched to the rules
    through the rules' own operations (method and path) - never from minivan's table."""

    PERSONAS = {"admin": ("admin", "admin"), "manager": ("demo_manager", "demo"),
                "member": ("demo", "demo"), "reader": ("demo_reader", "demo"),
                "other project's member": ("alt_demo", "alt_demo"),
                "service": ("service_user", "service"), "no role": ("no_role", None)}

    @classmethod
    def setUpClass(cls):
        cls.env, cls.image = keystone_env(), None
        policies = os.path.join(os.environ.get("MINIVAN_VENV", os.path.join(HERE, ".venv")),
                                "nova-34.0.0")
        cls.ready = cls.env is not None and os.path.isdir(os.path.join(policies, "nova"))
        if not cls.ready:
            return
        sys.path.insert(0, policies)
        from nova import policies as nova_policies
        from oslo_config import cfg
        from oslo_policy import policy
        conf = cfg.ConfigOpts()
        cls.enforcer = policy.Enforcer(conf)
        conf([], project="nova")
        conf.set_override("enforce_new_defaults", True, "oslo_policy")
        rules = list(nova_policies.list_rules())
        cls.enforcer.register_defaults(rules)
        cls.enforcer.load_rules()
        cls.operations = collections.defaultdict(list)
        for rule in rules:
            for op in getattr(rule, "operations", None) or []:
                cls.operations[(op["method"], cls.normal(op["path"]))].append(rule.name)
        cls.port = free_port()
        start_minivan(cls, cls.port, env_extra=keystone_minivan_env(cls.env), hosts=2)
        image = make_image(tempfile.mkdtemp(prefix="minivan-img-"), "policy", size="1M")
        cls.image = glance_upload(cls.env, "policy", image) if cls.env.get("GLANCE_URL") \
            else None
        cls.tokens, cls.creds = {}, {}
        for name, (user, project) in cls.PERSONAS.items():
            cls.tokens[name], cls.creds[name] = cls.token_and_roles(user, project)

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "ready", False):
            stop_minivan(cls)
            if cls.image:
                image_request(cls.env["GLANCE_URL"], "DELETE", "/v2/images/" + cls.image,
                              keystone_token(cls.env, "admin", "admin"))

    def setUp(self):
        if not self.ready or not self.image:
            skip_or_fail(self, "no test Keystone and Glance, or no Nova policies beside the "
                               "test venv (tools/setup-venvs.sh installs nova-34.0.0 there)")

    @staticmethod
    def normal(path):
        """A path with its parameters unnamed and no trailing slash."""
        return re.sub(r"\{[^}]*\}", "{}", path).rstrip("/") or "/"

    @classmethod
    def token_and_roles(cls, user, project):
        """A real token of the user (scoped to the project, or unscoped), and the
        credentials oslo.policy is given for it: the roles the token carries."""
        auth = {"identity": {"methods": ["password"], "password": {"user": {
            "name": user, "domain": {"name": "Default"}, "password": cls.env["OS_PASSWORD"]}}}}
        if project:
            auth["scope"] = {"project": {"name": project, "domain": {"name": "Default"}}}
        req = urllib.request.Request(cls.env["OS_AUTH_URL"] + "/auth/tokens?nocatalog",
                                     data=json.dumps({"auth": auth}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            token = resp.headers["X-Subject-Token"]
            doc = json.loads(resp.read())["token"]
        return token, {"roles": [r["name"] for r in doc.get("roles", [])],
                       "project_id": (doc.get("project") or {}).get("id"),
                       "user_id": doc["user"]["id"], "system_scope": None,
                       "domain_id": None}

    def nova_rules(self, route):
        """The rules Nova checks on every call of the route (None: Nova checks none)."""
        path = route.path.replace("/os-volumes_boot", "/servers")   # routes.py: an alias
        path = NOVA_OPERATION_ALIASES.get(path, path)
        key = (route.method, self.normal(path) + (f" ({route.action})" if route.action
                                                   else ""))
        names = self.operations.get(key)
        if names is None:
            return None
        if "/os-extra_specs" in route.path:
            return names
        return [n for n in names if n not in NOVA_CONDITIONAL_RULES]

    def test_every_route_answers_as_novas_policy(self):
        """Every built route × seven personas (admin; manager, member and reader of a
        project; another project's member; a service user; a user with no role, with an
        unscoped token): where Nova's defaults refuse, minivan answers 403 (or 404 where
        the thing is not found first, as Nova looks it up first); where they allow, never
        403; and never a 5xx (but 501 for a route not built).  Routes Nova checks no rule on are
        allowed to all (the image proxy is Glance's to refuse: GlanceComparisonTests)."""
        wrong, compared, unruled = [], 0, 0
        for route in minivan.ROUTES:
            if route.gone or not route.built or route.path.startswith("/images"):
                continue
            rules = self.nova_rules(route)
            unruled += rules is None
            own = route.path.startswith(("/os-quota-sets/{id}", "/os-simple-tenant-usage/{"))
            body = ({route.action: None} if route.action else {}) \
                if route.method in ("POST", "PUT") else None
            for who, creds in self.creds.items():
                target = {"project_id": creds["project_id"] or (
                    self.env["DEMO_PROJECT_ID"] if own else None), "user_id": creds["user_id"]}
                allowed = all(self.enforcer.enforce(rule, target, creds)
                              for rule in rules or [])
                value = (creds["project_id"] or self.env["DEMO_PROJECT_ID"]) if own else "1"
                path = "/" + "/".join(value if seg.startswith("{") else seg
                                      for seg in route.segments)
                got = compute_request(None, self.port, route.method,
                                      "" if path == "/" else path, self.tokens[who], body,
                                      version=minivan.version_text(route.min)).status
                compared += 1
                refused = got == 403
                if allowed and refused or not allowed and not (refused or got == 404) \
                        or got >= 500 and got != 501:
                    wrong.append(f"{route.method} {route.path} {route.action or ''} as {who}:"
                                 f" {got}, Nova's rules {'allow' if allowed else 'refuse'}"
                                 f" ({', '.join(rules or [])})")
        self.assertEqual(len(wrong), 0, "\n".join(wrong))
        self.assertGreater(compared, 1000)
        print(f"\nNova policy: {compared} route x persona calls compared, "
              f"{len(wrong)} disagreements ({unruled} routes Nova checks no rule on)")

    def test_rules_reached_through_queries_and_bodies(self):
        """The conditional rules a query parameter or body field reaches, each call made
        by every persona in its own project: where the rule refuses
        (Nova checks it with fatal=True at the cited line), 403; where it allows, not 403."""
        demo = self.env["DEMO_PROJECT_ID"]
        image = self.image
        flavor = compute_request(None, self.port, "POST", "/flavors", self.tokens["admin"], {
            "flavor": {"name": "policy", "ram": 64, "vcpus": 1, "disk": 1}}).json()[
            "flavor"]["id"]                 # (the route matrix may have deleted flavor 1)
        cases = [
            # servers.py _get_servers: all_tenants given
            ("GET", "/servers?all_tenants=1", None, "2.1",
             "os_compute_api:servers:index:get_all_tenants"),
            ("GET", "/servers/detail?all_tenants=1", None, "2.1",
             "os_compute_api:servers:detail:get_all_tenants"),
            # server_groups.py index: all_projects given, checked for admins only (the
            # others get their own groups)
            ("GET", "/os-server-groups?all_projects=True", None, "2.1",
             "os_compute_api:os-server-groups:index:all_projects"),
            # limits.py _index: tenant_id given (any project, the caller's own too)
            ("GET", f"/limits?tenant_id={demo}", None, "2.1",
             "os_compute_api:limits:other_project"),
            # migrations.py _index: no project_id, or another project's
            ("GET", "/os-migrations", None, "2.80",
             "os_compute_api:os-migrations:index:all_projects"),
            # servers.py create: a host asked for (2.74), or a zone with a host
            ("POST", "/servers", {"server": {"name": "x", "flavorRef": flavor,
                                             "imageRef": image, "host": "cmp1",
                                             "networks": "none"}}, "2.74",
             "compute:servers:create:requested_destination"),
            ("POST", "/servers", {"server": {"name": "x", "flavorRef": flavor,
                                             "imageRef": image,
                                             "availability_zone": "nova:cmp1"}}, "2.1",
             "os_compute_api:servers:create:forced_host"),
        ]
        wrong, compared = [], 0
        for method, path, body, version, rule in cases:
            for who, creds in self.creds.items():
                target = {"project_id": creds["project_id"], "user_id": creds["user_id"]}
                base = self.nova_rules(next(r for r in minivan.ROUTES if r.method == method
                                            and r.path == path.split("?")[0]))
                reached = "admin" in creds["roles"] or "all_projects" not in path
                allowed = all(self.enforcer.enforce(name, target, creds)
                              for name in base + [rule] * reached)
                reply = compute_request(None, self.port, method, path, self.tokens[who], body,
                                        version=version)
                got = reply.status
                compared += 1
                if allowed == (got == 403) or got >= 500:
                    wrong.append(f"{method} {path} as {who}: {got}, Nova's rules "
                                 f"{'allow' if allowed else 'refuse'} ({rule}): "
                                 f"{reply.raw[:200]!r}")
        self.assertEqual(len(wrong), 0, "\n".join(wrong))
        print(f"\nNova policy, conditional rules: {compared} calls compared, 0 disagreements")

    def test_rules_reached_on_a_server(self):
        """Rules a body field reaches on a server of the demo project, called by every
        persona: a target host on live and cold migration (a manager may move a server but
        not choose where: migrate_server.py checks ...:host with fatal=True), with and
        without one; Nova checks the policy before the server's state, so a refused call
        is 403 (404 outside the project) whatever the server is doing.  And servers.py
        _get_servers: filters past the user's own set (host, deleted, node) are dropped
        without a word unless allow_all_filters allows them."""
        demo = self.env["DEMO_PROJECT_ID"]
        flavor = compute_request(None, self.port, "POST", "/flavors", self.tokens["admin"], {
            "flavor": {"name": "policy-move", "ram": 64, "vcpus": 1, "disk": 1}}).json()[
            "flavor"]["id"]
        made = compute_request(None, self.port, "POST", "/servers", self.tokens["member"], {
            "server": {"name": "policy-move", "flavorRef": flavor, "imageRef": self.image,
                       "networks": "none"}}, version="2.37")
        self.assertEqual(made.status, 202, made.raw)
        server_id = made.json()["server"]["id"]
        self.addCleanup(compute_request, None, self.port, "DELETE", "/servers/" + server_id,
                        self.tokens["admin"])
        wait_until(lambda: compute_request(None, self.port, "GET", "/servers/" + server_id,
                                           self.tokens["admin"]).json()["server"]["status"]
                   == "ACTIVE", timeout=60, what="the server")
        action = f"/servers/{server_id}/action"
        cases = [  # (body, version, the rule the body reaches or None)
            ({"os-migrateLive": {"host": "cmp2", "block_migration": "auto"}}, "2.30",
             "os_compute_api:os-migrate-server:migrate_live:host"),
            ({"os-migrateLive": {"host": None, "block_migration": "auto"}}, "2.30", None),
            ({"migrate": {"host": "cmp1"}}, "2.56", "os_compute_api:os-migrate-server:migrate:host"),
            ({"migrate": None}, "2.56", None),
        ]
        wrong, compared = [], 0
        target = {"project_id": demo, "user_id": self.creds["member"]["user_id"]}
        for body, version, rule in cases:
            name = next(iter(body))
            base = self.nova_rules(next(r for r in minivan.ROUTES if r.method == "POST" and
                                        r.path == "/servers/{server_id}/action" and
                                        r.action == name))
            for who in reversed(list(self.creds)):        # (admin last: it really moves it)
                creds = self.creds[who]
                allowed = all(self.enforcer.enforce(n, target, creds)
                              for n in base + ([rule] if rule else []))
                reply = compute_request(None, self.port, "POST", action, self.tokens[who],
                                        body, version=version)
                compared += 1
                if allowed == (reply.status == 403) or reply.status >= 500 or \
                        not allowed and creds["project_id"] != demo and reply.status != 404 \
                        and reply.status != 403:
                    wrong.append(f"{name} {body[name]} as {who}: {reply.status}, Nova's rules "
                                 f"{'allow' if allowed else 'refuse'} ({rule}): "
                                 f"{reply.raw[:200]!r}")
                wait_until(lambda: compute_request(
                    None, self.port, "GET", "/servers/" + server_id, self.tokens["admin"])
                    .json()["server"]["OS-EXT-STS:task_state"] is None, timeout=60,
                    what="the server settled")
                status = compute_request(None, self.port, "GET", "/servers/" + server_id,
                                         self.tokens["admin"]).json()["server"]["status"]
                if status == "VERIFY_RESIZE":
                    compute_request(None, self.port, "POST", action, self.tokens["admin"],
                                    {"confirmResize": None})
        # admin-only filters: dropped for those the rule refuses, applied for the others
        for who, creds in self.creds.items():
            if creds["project_id"] != demo:
                continue
            allowed = self.enforcer.enforce("os_compute_api:servers:allow_all_filters",
                                            {"project_id": demo, "user_id": creds["user_id"]},
                                            creds)
            plain = compute_request(None, self.port, "GET", "/servers", self.tokens[who])
            if plain.status == 403:
                continue
            mine = sorted(s["id"] for s in plain.json()["servers"])
            self.assertIn(server_id, mine, who)
            for query in ("host=no-such-host", "node=no-such-node", "deleted=true"):
                got = compute_request(None, self.port, "GET", "/servers?" + query,
                                      self.tokens[who])
                compared += 1
                found = sorted(s["id"] for s in got.json()["servers"])
                if got.status != 200 or (found == mine) == allowed:
                    wrong.append(f"GET /servers?{query} as {who}: {got.status} {found}, Nova "
                                 f"{'applies' if allowed else 'drops'} the filter")
        self.assertEqual(len(wrong), 0, "\n".join(wrong))
        print(f"\nNova policy, rules reached on a server: {compared} calls compared, "
              "0 disagreements")


class KeystoneProxy:
    """A TCP proxy in front of the test Keystone that passes, refuses ("down") or holds
    ("slow": accepted, never answered) connections, as mode["now"] says."""

    def __init__(self, keystone_url):
        target = urllib.parse.urlsplit(keystone_url)
        self.target = (target.hostname, target.port)
        self.mode = {"now": "pass"}
        self.held = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}{target.path}"
        threading.Thread(target=self.serve, daemon=True).start()

    @staticmethod
    def pipe(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode["now"] == "down":
                client.close()
            elif self.mode["now"] == "slow":
                self.held.append(client)
            else:
                upstream = socket.create_connection(self.target)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    def close(self):
        self.listener.close()
        for sock in self.held:
            sock.close()


class KeystoneEndToEndTests(CLIMixin, unittest.TestCase):
    """minivan behind a real Keystone, registered in its catalog, driven by the real
    clients; two simulated compute hosts, so that Tempest's migration tests run."""

    COMPUTE_HOSTS = 2

    @classmethod
    def setUpClass(cls):
        cls.env = keystone_env()
        if cls.env is None or not have_clients():
            return
        cls.url = cls.env["COMPUTE_URL"]
        cls.port = int(cls.url.split(":")[2].split("/")[0])
        start_minivan(cls, cls.port, env_extra=keystone_minivan_env(cls.env, **{
            "MINIVAN_SYNC_POWER_STATE_INTERVAL": "2",
            "MINIVAN_VOLUME_MOUNT_BASE": cls.env.get("CINDER_MOUNT_BASE", "")}),
            hosts=cls.COMPUTE_HOSTS)
        cls.os_env = {k: v for k, v in cls.env.items() if k.startswith("OS_")}
        cls.tokens = {}
        cls.images = {}
        if cls.env.get("GLANCE_URL"):
            # (the simulated hosts answer for a guest agent; as in Nova, changePassword
            # needs an image that asks for one)
            for name in ("cirros", "cirros-alt"):
                cls.images[name] = glance_upload(cls.env, name, make_image(
                    tempfile.mkdtemp(prefix="minivan-img-"), name, size="1M"),
                    properties={"hw_qemu_guest_agent": "yes"})

    @classmethod
    def tearDownClass(cls):
        stop_minivan(cls)

    def setUp(self):
        if self.env is None:
            skip_or_fail(self, "no test Keystone (run tools/test.sh, which starts one)")
        if not have_clients():
            skip_or_fail(self, "OpenStack clients not installed (tools/setup-venvs.sh)")

    def openstack(self, *args, expect_ok=True, env=None):
        return super().openstack(*args, expect_ok=expect_ok, env=dict(self.os_env, **(env or {})))

    def token(self, user, project):
        if (user, project) not in self.tokens:
            self.tokens[(user, project)] = keystone_token(self.env, user, project)
        return self.tokens[(user, project)]

    def api(self, method, path, token, body=None, version=None):
        return compute_request(self, self.port, method, path, token, body, version)

    def test_cli_versions_show(self):
        """openstack versions show finds minivan through the catalog at 2.1-2.104."""
        rows = self.openstack("versions", "show", "--service", "compute", "-f", "json")
        current = [r for r in rows if r["Status"] == "CURRENT"]
        self.assertEqual((current[0]["Min Microversion"], current[0]["Max Microversion"]),
                         ("2.1", "2.104"))

    def test_cli_quotas(self):
        """openstack quota show --compute and quota set, resolved through Keystone."""
        shown = self.openstack("quota", "show", "--compute", "demo", "-f", "json")
        rows = {r["Resource"]: r["Limit"] for r in shown} if isinstance(shown, list) else shown
        self.assertEqual(rows["instances"], 10)
        self.openstack("quota", "set", "--instances", "17", "--cores", "33", "demo")
        got = self.api("GET", "/os-quota-sets/" + self.env["DEMO_PROJECT_ID"],
                       self.token("admin", "admin")).json()["quota_set"]
        self.assertEqual((got["instances"], got["cores"]), (17, 33))
        shown = self.openstack("quota", "show", "--compute", "demo", "-f", "json")
        rows = {r["Resource"]: r["Limit"] for r in shown} if isinstance(shown, list) else shown
        self.assertEqual(rows["instances"], 17)
        self.api("DELETE", "/os-quota-sets/" + self.env["DEMO_PROJECT_ID"],
                 self.token("admin", "admin"))

    def test_sdk(self):
        """openstacksdk with a Keystone session: flavors, keypairs, quotas, limits."""
        import openstack
        conn = openstack.connect(auth_url=self.env["OS_AUTH_URL"], username="admin",
                                 password=self.env["OS_PASSWORD"], project_name="admin",
                                 user_domain_name="Default", project_domain_name="Default",
                                 region_name="RegionOne", identity_api_version="3")
        self.assertEqual(conn.compute.get_endpoint_data().max_microversion, (2, 104))
        self.assertIn("m1.tiny", [f.name for f in conn.compute.flavors()])
        kp = conn.compute.create_keypair(name="sdk-ks", public_key=SAMPLE_KEY)
        self.assertEqual(kp.fingerprint, SAMPLE_FINGERPRINT)
        conn.compute.delete_keypair("sdk-ks")
        quota = conn.compute.get_quota_set(self.env["DEMO_PROJECT_ID"])
        self.assertEqual(quota.instances, 10)
        conn.compute.update_quota_set(self.env["DEMO_PROJECT_ID"], key_pairs=50)
        self.assertEqual(conn.compute.get_quota_set(self.env["DEMO_PROJECT_ID"]).key_pairs, 50)
        conn.compute.revert_quota_set(self.env["DEMO_PROJECT_ID"])
        self.assertEqual(conn.compute.get_quota_set(self.env["DEMO_PROJECT_ID"]).key_pairs, 100)
        self.assertGreaterEqual(conn.compute.get_limits().absolute.instances, 10)

    def test_novaclient(self):
        """python-novaclient with a Keystone session."""
        from keystoneauth1 import session
        from keystoneauth1.identity import v3
        from novaclient import client
        auth = v3.Password(auth_url=self.env["OS_AUTH_URL"], username="demo",
                           password=self.env["OS_PASSWORD"], project_name="demo",
                           user_domain_name="Default", project_domain_name="Default")
        nova = client.Client("2.96", session=session.Session(auth=auth))
        self.assertIn("m1.tiny", [f.name for f in nova.flavors.list()])
        nova.keypairs.create("nova-ks", public_key=SAMPLE_KEY)
        self.assertEqual([k.name for k in nova.keypairs.list()], ["nova-ks"])
        nova.keypairs.delete("nova-ks")
        quotas = nova.quotas.get(self.env["DEMO_PROJECT_ID"])
        self.assertEqual(quotas.instances, 10)
        from novaclient import exceptions
        with self.assertRaises(exceptions.Forbidden):
            nova.flavors.create("nope", 64, 1, 1)

    def test_identity_answers_as_nova(self):
        """No token, a garbage token, a member on an admin route, another project's id."""
        r = self.api("GET", "/flavors", None)
        self.assertEqual(r.status, 401)
        self.assertTrue(r.header("WWW-Authenticate").startswith("Keystone uri="))
        self.assertEqual(self.api("GET", "/flavors", "garbage-token").status, 401)
        demo = self.token("demo", "demo")
        self.assertEqual(self.api("GET", "/flavors", demo).status, 200)
        r = self.api("POST", "/flavors", demo, {"flavor": {"name": "x", "ram": 1, "vcpus": 1,
                                                           "disk": 0}})
        self.assertEqual(r.status, 403)
        self.assertEqual(self.api("GET", "/os-availability-zone/detail", demo).status, 403)
        r = self.api("GET", "/" + self.env["ALT_PROJECT_ID"] + "/flavors", demo)
        self.assertEqual(r.status, 400)
        self.assertIn("Malformed request URL", r.raw.decode())
        self.assertEqual(self.api("GET", "/" + self.env["DEMO_PROJECT_ID"] + "/flavors",
                                  demo).status, 200)
        self.assertEqual(self.api("GET", "/os-quota-sets/" + self.env["ALT_PROJECT_ID"],
                                  demo).status, 403)
        reader = self.token("demo_reader", "demo")
        self.assertEqual(self.api("GET", "/os-quota-sets/" + self.env["DEMO_PROJECT_ID"],
                                  reader).status, 200)
        admin = self.token("admin", "admin")
        self.assertEqual(self.api("GET", "/os-quota-sets/no-such-project", admin).status, 400)
        r = self.api("POST", "/flavors/1/action", admin, {"addTenantAccess": {"tenant": "nope"}})
        self.assertEqual(r.status, 400)

    def test_migrations_list_for_a_project_manager(self):
        """GET /os-migrations as a project manager (Nova's MigrationsController._index):
        403 without project_id or with another project's (index:all_projects is the
        admin's); with its own, its migrations with the hosts hidden (index:host); an
        admin sees the hosts."""
        demo, manager = self.token("demo", "demo"), self.token("demo_manager", "demo")
        admin = self.token("admin", "admin")
        images = self.api("GET", "/images", demo, version="2.35").json()["images"]
        made = self.api("POST", "/servers", demo, {"server": {
            "name": "moved", "imageRef": images[0]["id"], "flavorRef": "1",
            "networks": "none"}}, version="2.37")
        server_id = made.json()["server"]["id"]
        self.addCleanup(self.api, "DELETE", "/servers/" + server_id, admin)
        wait_until(lambda: self.api("GET", "/servers/" + server_id, demo).json()["server"]
                   ["status"] == "ACTIVE", what="the server ACTIVE")
        self.assertEqual(self.api("POST", f"/servers/{server_id}/action", admin,
                                  {"migrate": None}).status, 202)
        wait_until(lambda: self.api("GET", "/servers/" + server_id, demo).json()["server"]
                   ["status"] == "VERIFY_RESIZE", what="the migration to finish")
        own = f"/os-migrations?project_id={self.env['DEMO_PROJECT_ID']}"
        for path in ("/os-migrations", f"/os-migrations?project_id={self.env['ALT_PROJECT_ID']}"):
            self.assertEqual(self.api("GET", path, manager, version="2.80").status, 403, path)
        self.assertEqual(self.api("GET", own, demo, version="2.80").status, 403)
        mine = self.api("GET", own, manager, version="2.80").json()["migrations"]
        self.assertEqual([m["instance_uuid"] for m in mine], [server_id])
        self.assertEqual({mine[0][k] for k in ("source_compute", "dest_compute", "dest_host",
                                                "source_node", "dest_node")}, {None})
        seen = [m for m in self.api("GET", "/os-migrations", admin, version="2.80").json()
                ["migrations"] if m["instance_uuid"] == server_id]
        self.assertTrue(seen[0]["source_compute"] and seen[0]["dest_compute"])
        self.api("POST", f"/servers/{server_id}/action", admin, {"confirmResize": None})

    def test_policy_matrix_from_the_route_table(self):
        """Every route of the dispatch table, generated from it: no token and a garbage
        token get 401 (public version documents aside), a member gets 403 on admin,
        manager and service routes, a reader 403 on every route that needs more than a
        reader, and removed APIs 410, as Nova's default policy answers."""
        demo, reader = self.token("demo", "demo"), self.token("demo_reader", "demo")
        images = self.api("GET", "/images", demo, version="2.35").json()["images"]
        server_id = str(uuid.uuid4())      # a server of the member's project, where one
        if images:                         # can boot (Nova looks some servers up first)
            made = self.api("POST", "/servers", demo, {"server": {
                "name": "matrix", "imageRef": images[0]["id"], "flavorRef": "1",
                "networks": "none"}}, version="2.37")
            self.assertEqual(made.status, 202, made.raw)
            server_id = made.json()["server"]["id"]
            self.addCleanup(self.api, "DELETE", "/servers/" + server_id, demo)
        wrong, checked = [], 0
        for route in minivan.ROUTES:
            path = "/" + "/".join(server_id if seg == "{server_id}" else "1"
                                  if seg.startswith("{") else seg for seg in route.segments)
            if path == "/":
                path = ""
            body = ({route.action: None} if route.action else {}) \
                if route.method in ("POST", "PUT") else None
            cases = [(None, 401), ("garbage-token", 401)] if route.rule != "none" else []
            if route.gone:
                cases.append((demo, 410))
            else:
                if route.persona in ("admin", "manager", "service"):
                    cases.append((demo, 403))
                if route.persona in ("member", "admin", "manager", "service"):
                    cases.append((reader, 403))
            for token, want in cases:
                got = self.api(route.method, path, token, body,
                               version=minivan.version_text(route.min))
                checked += 1
                if got.status != want:
                    who = {None: "no token", demo: "member", reader: "reader"}.get(
                        token, token)
                    wrong.append(f"{route.method} {route.path} {route.action or ''} as "
                                 f"{who}: {got.status}, not {want}")
        self.assertEqual(wrong, [])
        self.assertGreater(checked, 500)

    def test_glance_images_snapshots_and_shelve(self):
        """With Glance in the catalog: image create --file into Glance, server create --image
        NAME --wait, list/show/console log, server image create (in Glance with Nova's
        properties, and bootable), shelve/unshelve through Glance, delete --wait."""
        if not self.env.get("GLANCE_URL"):
            skip_or_fail(self, "no Glance in the test cloud (tools/test.sh starts one)")
        path = make_image(tempfile.mkdtemp(prefix="minivan-img-"), "osc", size="1M")
        made = self.openstack("image", "create", "--file", path, "--disk-format", "qcow2",
                              "--container-format", "bare", "osc-image", "-f", "json")
        self.assertEqual(made["status"], "active")
        server = self.openstack("server", "create", "--image", "osc-image", "--flavor",
                                "m1.tiny", "--wait", "glance-vm", "-f", "json")
        self.assertEqual(server["status"], "ACTIVE")
        self.assertIn("glance-vm", self.openstack("server", "list").stdout)
        shown = self.openstack("server", "show", "glance-vm", "-f", "json")
        self.assertEqual(shown["image"].split(" ")[0], "osc-image")
        self.assertIn("booted", self.openstack("console", "log", "show", "glance-vm").stdout)
        self.openstack("server", "image", "create", "--name", "glance-snap", "--wait",
                       "glance-vm")
        snap = self.openstack("image", "show", "glance-snap", "-f", "json")
        props = snap["properties"]
        self.assertEqual((snap["status"], props["image_type"], props["instance_uuid"],
                          props["base_image_ref"]), ("active", "snapshot", server["id"],
                                                     made["id"]))
        again = self.openstack("server", "create", "--image", "glance-snap", "--flavor",
                               "m1.tiny", "--wait", "from-snap", "-f", "json")
        self.assertEqual(again["status"], "ACTIVE")
        self.openstack("server", "shelve", "--wait", "glance-vm")
        self.assertEqual(self.openstack("server", "show", "glance-vm", "-f", "json")["status"],
                         "SHELVED_OFFLOADED")
        self.openstack("server", "unshelve", "--wait", "glance-vm")
        self.assertEqual(self.openstack("server", "show", "glance-vm", "-f", "json")["status"],
                         "ACTIVE")
        self.openstack("server", "delete", "--wait", "glance-vm", "from-snap")
        self.assertNotIn("glance-vm", self.openstack("server", "list").stdout)
        self.openstack("image", "delete", "glance-snap", "osc-image")

    def test_ansible_openstack_cloud(self):
        """tools/ansible-server.yml: Ansible's openstack.cloud collection (from PyPI's
        ansible, in .venv-ansible) makes a keypair, boots a server from a Glance image and
        waits for it, reads it back with server_info and deletes both, as the demo user."""
        playbook = os.path.join(HERE, "tools", "ansible-server.yml")
        venv = os.environ.get("MINIVAN_ANSIBLE_VENV", os.path.join(HERE, ".venv-ansible"))
        if not os.path.exists(os.path.join(venv, "bin", "ansible-playbook")):
            skip_or_fail(self, "ansible not installed (tools/setup-venvs.sh makes .venv-ansible)")
        if not self.images:
            skip_or_fail(self, "no Glance in the test cloud (tools/test.sh starts one)")
        work = tempfile.mkdtemp(prefix="minivan-ansible-")
        self.addCleanup(shutil.rmtree, work, True)
        clouds = functional_clouds_yaml(self.env, work, "cirros")
        done = subprocess.run(
            [os.path.join(venv, "bin", "ansible-playbook"), "-i", "localhost,", "-c", "local",
             playbook, "-e", "cloud=devstack", "-e", "image=cirros"], cwd=work,
            capture_output=True, text=True, timeout=600, env=dict(
                os.environ, OS_CLIENT_CONFIG_FILE=clouds, ANSIBLE_NOCOLOR="1",
                ANSIBLE_PYTHON_INTERPRETER=os.path.join(venv, "bin", "python"),
                ANSIBLE_LOCAL_TEMP=work, ANSIBLE_REMOTE_TEMP=work))
        self.assertEqual(done.returncode, 0, done.stdout[-4000:] + done.stderr[-2000:])
        recap = re.search(r"localhost\s+: ok=(\d+)\s+changed=(\d+).*?failed=(\d+)",
                          done.stdout)
        self.assertEqual((recap.group(1), recap.group(3)), ("9", "0"), done.stdout[-2000:])
        self.assertNotIn("ansible-vm", self.openstack("server", "list",
                                                      "--all-projects").stdout)

    def test_fuzz_behind_keystone(self):
        """tools/harness.py fuzz --keystone: the fuzz's 1,500 cases as Keystone's admin
        (Glance images, Keystone's projects) get Nova's 4xx faults, never a 5xx, and
        leave no image of the fuzz in Glance."""
        out = os.path.join(tempfile.mkdtemp(prefix="minivan-harness-"), "harness.json")
        self.addCleanup(shutil.rmtree, os.path.dirname(out), True)
        done = subprocess.run([sys.executable, os.path.join(HERE, "tools", "harness.py"),
                               "--profile", "short", "--seed", "2026", "--json", out,
                               "--keystone", os.environ["MINIVAN_TEST_KEYSTONE_ENV"], "fuzz"],
                              capture_output=True, text=True, timeout=900)
        self.assertEqual(done.returncode, 0, done.stdout[-5000:] + done.stderr[-3000:])
        with open(out) as f:
            figures = json.load(f)["fuzz"]
        self.assertEqual((figures["cases"], figures["5xx"], figures["failures"]),
                         (1500, 0, 0))
        if self.env.get("GLANCE_URL"):
            self.assertNotIn("harness-fuzz", self.openstack("image", "list").stdout)

    def test_keystone_unreachable_is_503(self):
        """With Keystone unreachable, token checks answer 503 and minivan keeps serving."""
        port = free_port()

        class Holder:
            pass
        start_minivan(Holder, port, env_extra={
            "MINIVAN_KEYSTONE_URL": "http://127.0.0.1:%d/v3" % free_port(),
            "MINIVAN_KEYSTONE_PASSWORD": "x", "MINIVAN_BIND": "127.0.0.1"})
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/v2.1/flavors", headers={"X-Auth-Token": "anything"})
            resp = conn.getresponse()
            self.assertEqual(resp.status, 503)
            self.assertIn("serviceUnavailable", json.loads(resp.read()))
            conn.request("GET", "/healthcheck")
            self.assertEqual(conn.getresponse().status, 200)
        finally:
            stop_minivan(Holder)

    def test_revoked_token_is_refused_within_the_cache_time(self):
        """--token-cache-time 3: a token revoked in Keystone still works from the cache,
        then gets 401 once 3 s have passed; with Keystone down, a cached token works
        until its cache time ends, then gets 503."""
        keystone = KeystoneProxy(self.env["OS_AUTH_URL"])
        self.addCleanup(keystone.close)

        class Holder:
            pass
        port = free_port()
        start_minivan(Holder, port, env_extra=keystone_minivan_env(
            self.env, MINIVAN_KEYSTONE_URL=keystone.url, MINIVAN_TOKEN_CACHE_TIME="3"))
        self.addCleanup(stop_minivan, Holder)

        def flavors(token):
            return compute_request(self, port, "GET", "/flavors", token, timeout=60).status
        revoked = keystone_token(self.env, "demo", "demo")
        self.assertEqual(flavors(revoked), 200)
        req = urllib.request.Request(self.env["OS_AUTH_URL"] + "/auth/tokens", method="DELETE",
                                     headers={"X-Auth-Token": self.token("admin", "admin"),
                                              "X-Subject-Token": revoked})
        with urllib.request.urlopen(req, timeout=30) as resp:
            self.assertEqual(resp.status, 204)
        revoked_at = time.monotonic()
        first = flavors(revoked)
        if time.monotonic() - revoked_at < 2.5:
            self.assertEqual(first, 200)                 # still trusted from the cache
        wait_until(lambda: flavors(revoked) == 401, timeout=30, interval=0.5,
                   what="the revoked token refused")
        self.assertGreaterEqual(time.monotonic() - revoked_at, 2.5)
        known = keystone_token(self.env, "demo", "demo")
        self.assertEqual(flavors(known), 200)
        keystone.mode["now"] = "down"
        down_at = time.monotonic()
        first = flavors(known)
        if time.monotonic() - down_at < 2.5:
            self.assertEqual(first, 200)
        wait_until(lambda: flavors(known) == 503, timeout=30, interval=0.5,
                   what="the cached token to end while Keystone is down")
        keystone.mode["now"] = "pass"
        self.assertEqual(flavors(known), 200)

    def test_keystone_down_or_slow(self):
        """Keystone behind a proxy that goes down, then answers nothing: tokens minivan
        already validated keep working, new ones get 503 (at once when Keystone is
        down, within minivan's 10 s timeout when it hangs), and all works again after."""
        keystone = KeystoneProxy(self.env["OS_AUTH_URL"])
        self.addCleanup(keystone.close)
        mode, held, proxy = keystone.mode, keystone.held, keystone.url

        class Holder:
            pass
        port = free_port()
        start_minivan(Holder, port, env_extra=keystone_minivan_env(
            self.env, MINIVAN_KEYSTONE_URL=proxy))
        self.addCleanup(stop_minivan, Holder)

        def flavors(token):
            started = time.monotonic()
            status = compute_request(self, port, "GET", "/flavors", token, timeout=60).status
            return status, time.monotonic() - started
        demo, reader = self.token("demo", "demo"), self.token("demo_reader", "demo")
        alt = self.token("alt_demo", "alt_demo")
        self.assertEqual(flavors(demo)[0], 200)              # validated, now cached
        mode["now"] = "down"
        self.assertEqual(flavors(demo)[0], 200)
        status, took = flavors(reader)
        self.assertEqual(status, 503)
        self.assertLess(took, 3)
        mode["now"] = "slow"
        slow = []
        threading.Thread(target=lambda: slow.append(flavors(reader)), daemon=True).start()
        time.sleep(0.5)
        status, took = flavors(demo)                          # not held up by the hang
        self.assertEqual(status, 200)
        self.assertLess(took, 2)
        wait_until(lambda: slow, timeout=30, what="the hung validation to end")
        self.assertEqual(slow[0][0], 503)
        self.assertLess(slow[0][1], 15)
        mode["now"] = "pass"
        for sock in held:
            sock.close()
        self.assertEqual(flavors(alt)[0], 200)

    def test_tempest(self):
        """Every Tempest test in tools/tempest-pass.txt passes against minivan behind Keystone
        (MINIVAN_TEMPEST_LIST=all: the whole of tempest.api.compute, and none fails)."""
        listing = os.environ.get("MINIVAN_TEMPEST_LIST", os.path.join(HERE, "tools",
                                                                      "tempest-pass.txt"))
        if not os.path.exists(os.path.join(BIN, "tempest")):
            skip_or_fail(self, "tempest not installed (tools/setup-venvs.sh)")
        wanted = None
        if listing != "all":
            with open(listing) as f:
                wanted = [line.split("#")[0].strip() for line in f
                          if line.strip() and not line.startswith("#")]
        work = os.path.join(os.environ.get("MINIVAN_TEST_WORK", tempfile.gettempdir()),
                            "tempest")
        if not self.images:
            skip_or_fail(self, "no Glance in the test cloud (tools/test.sh starts one)")
        env = dict(os.environ, TEMPEST_IMAGE_REF=self.images["cirros"],
                   TEMPEST_IMAGE_REF_ALT=self.images["cirros-alt"],
                   CINDER_URL=self.env.get("CINDER_URL", ""),
                   TEMPEST_MIN_COMPUTE_NODES=str(self.COMPUTE_HOSTS), TEMPEST_MIGRATION="True")
        selection = [listing] if wanted is not None else \
            ["-", "--regex", r"^tempest\.api\.compute\."]
        done = subprocess.run([os.path.join(HERE, "tools", "tempest.sh"), work,
                               os.environ["MINIVAN_TEST_KEYSTONE_ENV"], *selection],
                              capture_output=True, text=True, timeout=5400, env=env)
        output = done.stdout + done.stderr
        tail = "\n".join(output.splitlines()[-40:])
        totals = {key: int(n) for key, n in re.findall(
            r"^ - (Passed|Skipped|Failed|Expected Fail|Unexpected Success): (\d+)$",
            output, re.M)}
        print(f"\nTempest: {totals}")
        skips = collections.Counter(re.findall(r"\.\.\. SKIPPED: (.*)$", output, re.M))
        for reason, count in skips.most_common():
            print(f"  skipped {count:3d}: {reason[:160]}")
        self.assertEqual(done.returncode, 0, tail)
        self.assertEqual(totals.get("Failed"), 0, tail)
        if wanted is not None:
            passed = [line for line in output.splitlines() if "... ok" in line]
            self.assertEqual(len(passed), len(wanted), tail)


class GateTests(unittest.TestCase):
    """Nova's integrated gate, the subset CI runs (tools/gate-ci.txt), on both of devstack's
    network back ends: tools/gate.sh builds a whole cloud inside a network and mount
    namespace of its own (Keystone, Glance, Cinder, Neutron, libvirtd, minivan on real QEMU
    guests) and runs Tempest's scenario tests there with validation on: servers on Neutron
    networks, reached over SSH through floating IPs, metadata through Neutron's proxy."""

    def run_gate(self, backend, tools):
        listing = os.path.join(HERE, "tools", "gate-ci.txt")
        with open(listing) as f:
            wanted = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        missing = [tool for tool in tools + ("ovs-vswitchd", "ping", "unshare")
                   if not shutil.which(tool)]
        if missing or not os.path.exists(os.path.join(BIN, "tempest")) or \
                not os.path.exists(os.path.join(NEUTRON_VENV, "bin", "gunicorn")):
            skip_or_fail(self, f"the gate needs {missing or ''} Tempest and .venv-neutron "
                               "(tools/test.sh installs them)")
        work = tempfile.mkdtemp(prefix="minivan-gate-")
        proc = subprocess.Popen([os.path.join(HERE, "tools", "gate.sh"), backend,
                                 "--include-list", listing], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, GATE_WORK=work))
        try:
            output, _ = proc.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            proc.terminate()                   # gate.sh stops its cloud and Tempest
            output, _ = proc.communicate(timeout=300)
        done = subprocess.CompletedProcess(proc.args, proc.returncode)
        tail = "\n".join(output.splitlines()[-60:])
        totals = {key: int(n) for key, n in re.findall(
            r"^ - (Passed|Skipped|Failed): (\d+)$", output, re.M)}
        ready = re.search(r"^gate: cloud ready after (\d+) s", output, re.M)
        print(f"\ngate ({backend}): {totals}, cloud ready after "
              f"{ready.group(1) if ready else '?'} s")
        self.assertEqual(done.returncode, 0, tail)
        self.assertEqual(totals, {"Passed": len(wanted), "Skipped": 0, "Failed": 0}, tail)
        shutil.rmtree(work, True)

    def test_gate_subset_on_ml2_ovs(self):
        """ML2/OVS: the Open vSwitch agent with Neutron's DHCP, L3 and metadata agents."""
        self.run_gate("ovs", ("haproxy", "dnsmasq"))

    def test_gate_subset_on_ml2_ovn(self):
        """ML2/OVN, devstack's default: OVN's own DHCP and routers, the OVN metadata agent
        and Neutron's database in MariaDB."""
        self.run_gate("ovn", ("ovn-northd", "ovn-controller", "mariadbd", "haproxy"))


class BenchSmokeTests(unittest.TestCase):
    def test_bench_smoke(self):
        """bench/bench.py --smoke runs and writes its figures (no thresholds: timing is
        the benchmark's business, not the tests')."""
        if not have_libvirt() or not shutil.which("qemu-img"):
            skip_or_fail(self, "the benchmark needs libvirt-python and qemu-img")
        out = os.path.join(tempfile.mkdtemp(prefix="minivan-bench-"), "bench.json")
        self.addCleanup(shutil.rmtree, os.path.dirname(out), True)
        done = subprocess.run([sys.executable, os.path.join(HERE, "bench", "bench.py"),
                               "--smoke", "--json", out], capture_output=True, text=True,
                              timeout=600)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        with open(out) as f:
            figures = json.load(f)
        self.assertEqual([r["servers"] for r in figures["results"]], [0, 20])
        self.assertIn("create_active", figures["results"][1])
        self.assertIn("servers/detail latest", done.stdout)

    def test_tail_and_wire_smoke(self):
        """bench/bench.py --tail --smoke (reads with a writer and snapshots every 50 kB of
        journal) and --wire (beside a bare http.server sending the same bytes) run and
        write their figures; no thresholds."""
        if not have_libvirt() or not shutil.which("qemu-img"):
            skip_or_fail(self, "the benchmark needs libvirt-python and qemu-img")
        work = tempfile.mkdtemp(prefix="minivan-bench-")
        self.addCleanup(shutil.rmtree, work, True)
        bench = os.path.join(HERE, "bench", "bench.py")
        tail, wire = os.path.join(work, "tail.json"), os.path.join(work, "wire.json")
        done = subprocess.run([sys.executable, bench, "--tail", "--smoke", "--repeat", "2",
                               "--seconds", "0.3", "--json", tail],
                              capture_output=True, text=True, timeout=600)
        self.assertIn(done.returncode, (0, 1), done.stderr[-3000:])   # 1: a tail, reported
        with open(tail) as f:
            doc = json.load(f)
        figures = doc["tail"][0]
        self.assertEqual(figures["servers"], 20)
        self.assertGreater(doc["test_driver_kb_per_domain"], 0)
        self.assertGreater(figures["snapshots_during"], 0)
        self.assertGreater(figures["writer_sets_per_s"], 0)
        for read in ("server show", "servers/detail default page", "flavors/detail"):
            self.assertGreater(figures[read]["p99_ms"], 0)
        done = subprocess.run([sys.executable, bench, "--wire", "--wire-servers", "20",
                               "--repeat", "1", "--seconds", "0.2", "--json", wire],
                              capture_output=True, text=True, timeout=600)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        with open(wire) as f:
            rows = json.load(f)["wire"]
        self.assertEqual(len(rows), 5)
        self.assertTrue(all(r["floor_p50_ms"] > 0 and r["bytes"] > 0 for r in rows))
        self.assertIn("a server changed before each", rows[-1]["figure"])

    def test_peer_smoke(self):
        """bench/bench.py --peer --smoke runs the same workload against the real Nova 34
        (bench/nova_peer.py in Nova's virtualenv) and writes the side-by-side table as
        JSON and as a picture."""
        nova_python = os.path.join(HERE, ".venv-nova", "bin", "python")
        if not have_libvirt() or not shutil.which("qemu-img") or not os.path.exists(
                nova_python):
            skip_or_fail(self, "the comparison needs libvirt-python, qemu-img and "
                               ".venv-nova (tools/setup-venvs.sh)")
        work = tempfile.mkdtemp(prefix="minivan-peer-")
        self.addCleanup(shutil.rmtree, work, True)
        out, svg = os.path.join(work, "peer.json"), os.path.join(work, "peer.svg")
        done = subprocess.run([sys.executable, os.path.join(HERE, "bench", "bench.py"),
                               "--peer", "--smoke", "--json", out, "--svg", svg],
                              capture_output=True, text=True, timeout=600)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        with open(out) as f:
            figures = json.load(f)
        self.assertEqual(figures["minivan"][0]["target"], "minivan")
        self.assertEqual(figures["nova"][0]["target"], "nova")
        # Nova's answers: its own server records, made by its conductor and fake computes
        self.assertEqual(figures["nova"][0]["burst_creates"], 8)
        rows = {row["figure"]: row for row in figures["table"]}
        self.assertIn("create -> ACTIVE p50 ms", rows)
        for row in figures["table"]:
            self.assertGreater(row["nova"], 0, row)
            self.assertGreater(row["minivan"], 0, row)
        root = ElementTree.parse(svg).getroot()
        self.assertEqual(len(root.findall("{http://www.w3.org/2000/svg}rect")),
                         1 + len(figures["table"]))
        self.assertIn("minivan is", done.stdout)


class HarnessTests(unittest.TestCase):
    def test_harness_short_profile(self):
        """tools/harness.py --profile short: fuzzing every route, a crash storm and load
        with slow clients pass every check (the full profile is a README command)."""
        if not have_libvirt() or not shutil.which("qemu-img"):
            skip_or_fail(self, "the harness needs libvirt-python and qemu-img")
        out = os.path.join(tempfile.mkdtemp(prefix="minivan-harness-"), "harness.json")
        self.addCleanup(shutil.rmtree, os.path.dirname(out), True)
        done = subprocess.run([sys.executable, os.path.join(HERE, "tools", "harness.py"),
                               "--profile", "short", "--seed", "140745", "--json", out],
                              capture_output=True,
                              text=True, timeout=900)
        self.assertEqual(done.returncode, 0, done.stdout[-5000:] + done.stderr[-3000:])
        with open(out) as f:
            figures = json.load(f)
        self.assertEqual(figures["fuzz"]["cases"], 1500)
        self.assertEqual((figures["fuzz"]["5xx"], figures["fuzz"]["failures"]), (0, 0))
        self.assertGreaterEqual(figures["crash"]["kills"], 5)
        self.assertEqual((figures["crash"]["lost_changes"], figures["crash"]["leaked_dirs"],
                          figures["crash"]["problems"]), (0, 0, 0))
        self.assertEqual((figures["load"]["5xx"], figures["load"]["dropped"]), (0, 0))

    def test_crash_storm_with_real_guests(self):
        """tools/harness.py --real-guest crash: the crash storm on real QEMU guests (two
        clients, two guests each at most): nothing acknowledged is lost, every ACTIVE or
        SHUTOFF server's domain agrees, and no domain or directory outlives its server."""
        if not (GUEST_IMAGE and os.path.exists(GUEST_IMAGE) and have_libvirt()):
            skip_or_fail(self, "no real-guest setup (tools/test.sh runs tools/libvirt-up.sh "
                               "and tools/make-guest.sh; needs MINIVAN_TEST_GUEST_IMAGE)")
        out = os.path.join(tempfile.mkdtemp(prefix="minivan-harness-"), "harness.json")
        self.addCleanup(shutil.rmtree, os.path.dirname(out), True)
        done = subprocess.run([sys.executable, os.path.join(HERE, "tools", "harness.py"),
                               "--profile", "short", "--seed", "8", "--json", out,
                               "--real-guest", GUEST_IMAGE, "--network", GUEST_NETWORK,
                               "crash"], capture_output=True, text=True, timeout=900)
        self.assertEqual(done.returncode, 0, done.stdout[-5000:] + done.stderr[-3000:])
        with open(out) as f:
            figures = json.load(f)["crash"]
        self.assertTrue(figures["real_guests"])
        self.assertGreaterEqual(figures["kills"], 5)
        self.assertEqual((figures["lost_changes"], figures["leaked_dirs"],
                          figures["leaked_domains"], figures["problems"]), (0, 0, 0, 0))


class PythonVersionTests(unittest.TestCase):
    def test_runs_on_python_310(self):
        """vermin: minivan.py needs nothing newer than Python 3.10."""
        vermin = os.path.join(BIN, "vermin")
        if not os.path.exists(vermin):
            skip_or_fail(self, "vermin not installed (tools/setup-venvs.sh)")
        done = subprocess.run([vermin, "--no-tips", "--violations", "-t=3.10-",
                               "--eval-annotations", "--backport", "typing",
                               os.path.join(HERE, "minivan.py")],
                              capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    def test_only_stdlib_and_libvirt(self):
        """minivan.py imports only the standard library, and libvirt inside the driver."""
        import ast
        with open(os.path.join(HERE, "minivan.py")) as f:
            tree = ast.parse(f.read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add(node.module.split(".")[0])
        third_party = {n for n in names if n not in sys.stdlib_module_names}
        self.assertEqual(third_party, {"libvirt"})


# -- servers on libvirt's test driver -------------------------------------------------------

def make_image(directory, name="cirros", size="64M", sidecar=None):
    """A small qcow2 image file in the image directory."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name + ".qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, size], check=True)
    if sidecar is not None:
        with open(path + ".json", "w") as f:
            json.dump(sidecar, f)
    return path


def make_hostile_images(directory, canary):
    """Hostile (and a few harmless) images made with qemu-img and a few bytes of Python:
    [(case, declared disk_format, path)].  canary: a file outside minivan's directories
    that the hostile ones name."""
    def path(name):
        return os.path.join(directory, name)

    def qemu_img(*args):
        subprocess.run(["qemu-img", *args], check=True, capture_output=True)

    def write(name, data, size=None):
        with open(path(name), "wb") as f:
            f.write(data)
            if size:
                f.truncate(size)
        return path(name)

    cases = []
    qemu_img("create", "-q", "-f", "qcow2", path("plain.qcow2"), "64M")
    cases.append(("qcow2", "qcow2", path("plain.qcow2")))
    write("raw.img", b"minivan raw disk\n" * 64, 1 << 20)
    cases.append(("raw", "raw", path("raw.img")))
    qemu_img("create", "-q", "-f", "qcow2", "-b", canary, "-F", "raw",
             path("backing.qcow2"), "64M")
    cases.append(("qcow2 with a backing file", "qcow2", path("backing.qcow2")))
    data_file = path("data-file.raw")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data_file}",
             path("datafile.qcow2"), "64M")
    os.unlink(data_file)
    with open(path("datafile.qcow2"), "r+b") as f:       # and name the canary instead
        head = bytearray(f.read(65536))
        at = head.find(os.fsencode(data_file))
        name = os.fsencode(canary)
        head[at:at + len(os.fsencode(data_file))] = name.ljust(len(os.fsencode(data_file)),
                                                               b"\0")
        f.seek(0)
        f.write(head)
    cases.append(("qcow2 with a data file", "qcow2", path("datafile.qcow2")))
    cases.append(("qcow2 declared raw", "raw", path("plain.qcow2")))
    cases.append(("raw declared qcow2", "qcow2", path("raw.img")))
    with open(path("extent.vmdk"), "w") as f:
        f.write('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                'createType="monolithicFlat"\n\n# Extent description\n'
                f'RW 2048 FLAT "{canary}" 0\n\nddb.virtualHWVersion = "4"\n')
    cases.append(("vmdk with a flat extent naming a host file", "vmdk", path("extent.vmdk")))
    qemu_img("create", "-q", "-f", "vmdk", path("sparse.vmdk"), "64M")
    cases.append(("vmdk (monolithicSparse)", "vmdk", path("sparse.vmdk")))
    qemu_img("create", "-q", "-f", "qed", path("image.qed"), "64M")
    cases.append(("qed declared raw", "raw", path("image.qed")))   # Glance has no "qed"
    cases.append(("qed declared qcow2", "qcow2", path("image.qed")))
    qemu_img("create", "-q", "-f", "vhdx", path("image.vhdx"), "64M")
    cases.append(("vhdx", "vhdx", path("image.vhdx")))
    cases.append(("vhdx declared raw", "raw", path("image.vhdx")))
    qemu_img("create", "-q", "-f", "vpc", path("image.vhd"), "64M")
    cases.append(("vhd", "vhd", path("image.vhd")))
    qemu_img("create", "-q", "-f", "vdi", path("image.vdi"), "64M")
    cases.append(("vdi", "vdi", path("image.vdi")))
    os.makedirs(path("iso-root"), exist_ok=True)
    with open(path("iso-root/README"), "w") as f:
        f.write("minivan\n")
    subprocess.run(["genisoimage", "-quiet", "-o", path("image.iso"), path("iso-root")],
                   check=True, capture_output=True)
    cases.append(("iso", "iso", path("image.iso")))
    cases.append(("iso declared qcow2", "qcow2", path("image.iso")))
    mbr = bytearray(512)
    mbr[446:462] = bytes([0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF]) + struct.pack("<II", 1, 131071)
    mbr[510:512] = b"\x55\xaa"
    write("gpt.raw", bytes(mbr), 64 << 20)
    cases.append(("raw disk with a GPT", "raw", path("gpt.raw")))
    mbr[446] = 0x7F                                           # an invalid boot flag
    write("bad-mbr.raw", bytes(mbr), 64 << 20)
    cases.append(("raw disk with a broken MBR", "raw", path("bad-mbr.raw")))
    with open(path("plain.qcow2"), "rb") as f:
        head = bytearray(f.read(512))
    huge = bytearray(head)
    huge[24:32] = (1 << 60).to_bytes(8, "big")                 # 1 EiB: qemu-img refuses
    write("huge.qcow2", bytes(huge), 512)
    cases.append(("qcow2 with a huge virtual size", "qcow2", path("huge.qcow2")))
    unknown = bytearray(head)
    unknown[79] |= 0x40                                        # an incompatible feature
    write("unknown-feature.qcow2", bytes(unknown), 512)
    cases.append(("qcow2 with an unknown incompatible feature", "qcow2",
                  path("unknown-feature.qcow2")))
    write("truncated.qcow2", bytes(head[:100]))
    cases.append(("truncated qcow2 header", "qcow2", path("truncated.qcow2")))
    cases.append(("truncated qcow2 header declared raw", "raw", path("truncated.qcow2")))
    return cases


# What Nova 34 answers when a server boots from each image of the corpus: the reason of
# the ImageUnacceptable that nova/virt/images.py's do_image_deep_inspection raises (None:
# it boots).  Where minivan is stricter on purpose, the entry names minivan's rule.
NOVA_BOOT_REASONS = {
    "qcow2": None, "raw": None, "vmdk (monolithicSparse)": None, "vhdx": None, "vhd": None,
    "vdi": None, "iso": None, "raw disk with a GPT": None,
    "qcow2 with a backing file": "Image does not pass safety check",
    "qcow2 with a data file": "Image does not pass safety check",
    "vmdk with a flat extent naming a host file": "Image does not pass safety check",
    "qed declared raw": "Image does not pass safety check",
    "qed declared qcow2": "Image does not pass safety check",
    "raw disk with a broken MBR": "Image does not pass safety check",
    "qcow2 with an unknown incompatible feature": "Image does not pass safety check",
    "qcow2 declared raw": "Image content does not match disk_format",
    "raw declared qcow2": "Image content does not match disk_format",
    "vhdx declared raw": "Image content does not match disk_format",
    "iso declared qcow2": "Image content does not match disk_format",
    # minivan's rules: --image-max-virtual-size (Nova has no limit of its own), and a
    # qcow2 magic on 100 bytes (the inspector calls it raw; QEMU could not read it)
    "qcow2 with a huge virtual size": "Image virtual size 1152921504606846976 is over "
                                      "this host's limit of 1099511627776",
    "truncated qcow2 header": "Image has a truncated qcow2 header",
    "truncated qcow2 header declared raw": "Image has a truncated qcow2 header",
}


def place_image(images_dir, title, declared, path):
    """These bytes as a file of an image directory, with a sidecar naming its
    disk_format; returns the image's name."""
    name = re.sub(r"[^a-z0-9]+", "-", title)
    target = os.path.join(images_dir, name + ".img")
    shutil.copy(path, target)
    with open(target + ".json", "w") as f:
        json.dump({"name": name, "disk_format": declared}, f)
    return name


def file_facts(*paths):
    """(bytes, mode, owner, group) of files and directories, to show nothing changed them."""
    facts = []
    for path in paths:
        st = os.stat(path)
        data = open(path, "rb").read() if os.path.isfile(path) else None
        facts.append((path, data, st.st_mode, st.st_uid, st.st_gid))
    return facts


def make_canary():
    """A file outside every minivan directory, in a directory of its own: what hostile
    images name.  Returns its path."""
    outside = tempfile.mkdtemp(prefix="minivan-canary-")
    os.chmod(outside, 0o755)
    canary = os.path.join(outside, "canary")
    with open(canary, "w") as f:
        f.write("a host file no guest may read\n")
    os.chmod(canary, 0o644)
    return canary


class ServerTestCase(AppTestCase):
    """Servers on a simulated libvirt host, with one image 'cirros' in the image directory."""

    def setUp(self):
        if not have_libvirt():
            skip_or_fail(self, minivan.LIBVIRT_HINT)
        if not shutil.which("qemu-img"):
            skip_or_fail(self, "qemu-img not installed (apt install qemu-utils)")
        super().setUp()
        make_image(self.app.conf["images_dir"])
        self.image_id = self.get("/v2.1/images", version="2.35").json()["images"][0]["id"]

    def post_server(self, name="vm", token="admin:admin", version=None, wait=True, **fields):
        spec = {"name": name, "imageRef": self.image_id, "flavorRef": "1"}
        if version and minivan.parse_version(version) >= (2, 37) or version == "latest":
            spec["networks"] = "auto"
        spec.update(fields)
        r = self.post("/v2.1/servers", {"server": spec}, token=token, version=version)
        if wait and r.status == 202:
            self.app.compute.wait_idle()
        return r

    def server(self, server_id, token="admin:admin", version=None):
        r = self.get("/v2.1/servers/" + server_id, token=token, version=version)
        self.assertEqual(r.status, 200, r.raw)
        return r.json()["server"]

    def action(self, server_id, body, token="admin:admin", version=None, wait=True):
        r = self.post(f"/v2.1/servers/{server_id}/action", body, token=token, version=version)
        if wait:
            self.app.compute.wait_idle()
        return r

    def new_server(self, **fields):
        r = self.post_server(**fields)
        self.assertEqual(r.status, 202, r.raw)
        server_id = r.json()["server"]["id"]
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")
        return server_id

    def domain_state(self, server_id):
        dom = self.app.driver.conn.lookupByUUIDString(server_id)
        return dom.state()[0]


class ViewCacheTests(ServerTestCase):
    def test_kept_views_are_what_building_them_gives(self):
        """Server show and pages of servers/detail (with limits, markers, all_tenants),
        for an admin and the owner at several microversions, after each kind of change
        (metadata, rename, stop, lock, a host disabled, delete): the answer from kept views
        and pages equals the answer built afresh (--view-cache-servers 0), and kept views
        and pages were used; also when more callers ask than views are kept per server."""
        mine = self.new_server(name="a")
        theirs = self.post_server(name="b", token="demo:demo").json()["server"]["id"]
        self.app.compute.wait_idle()
        host = self.app.conf["host"]
        self.app.views.VARIANTS = 32            # every caller's views stay
        self.app.views.PAGES = 128              # and every caller's pages
        callers = [(token, version) for token in ("admin:admin", "demo:demo")
                   for version in ("2.1", "2.16", "2.47", "2.75", "latest")]

        def answers():
            out = []
            for token, version in callers:
                for server_id in (mine, theirs):
                    r = self.get("/v2.1/servers/" + server_id, token=token, version=version)
                    out.append((r.status, r.raw))
                for query in ("", "?limit=1", "?all_tenants=1", "?all_tenants=1&limit=1",
                              f"?all_tenants=1&limit=1&marker={theirs}"):
                    r = self.get("/v2.1/servers/detail" + query, token=token, version=version)
                    out.append((r.status, r.raw))
            return out

        def same_as_built(used=True):
            answers()                           # fills the kept views and pages
            hits, page_hits = self.app.views.hits, self.app.views.page_hits
            kept = answers()
            if used:
                self.assertGreater(self.app.views.hits, hits)
                self.assertGreater(self.app.views.page_hits, page_hits)
            capacity, self.app.views.capacity = self.app.views.capacity, 0
            try:
                self.assertEqual(kept, answers())
            finally:
                self.app.views.capacity = capacity

        same_as_built()
        changes = [
            lambda: self.put(f"/v2.1/servers/{theirs}/metadata/k", {"meta": {"k": "v"}},
                             token="demo:demo"),
            lambda: self.put(f"/v2.1/servers/{mine}", {"server": {"name": "renamed"}}),
            lambda: self.action(mine, {"os-stop": None}),
            lambda: self.action(theirs, {"lock": None}, token="demo:demo"),
            lambda: self.put("/v2.1/os-services/disable-log-reason", {
                "host": host, "binary": "nova-compute", "disabled_reason": "maintenance"}),
            lambda: self.delete(f"/v2.1/servers/{mine}"),
        ]
        for change in changes:
            before = answers()
            change()
            self.app.compute.wait_idle()
            self.assertNotEqual(before, answers())
            same_as_built()
        self.app.views.VARIANTS = 2             # more callers than views kept per server
        self.app.views.PAGES = 2                # and than pages kept
        same_as_built(used=False)


class PackedRecordTests(ServerTestCase):
    """A server's instance actions are kept in memory as their JSON text (minivan.Packed):
    what the API answers, what state.json holds and what Python's json reads from it stay
    as they were."""

    def actions(self, server_id):
        r = self.get(f"/v2.1/servers/{server_id}/os-instance-actions", version="2.58")
        self.assertEqual(r.status, 200, r.raw)
        return r.json()["instanceActions"]

    def test_actions_are_packed_and_read_back_the_same(self):
        server_id = self.new_server()
        self.action(server_id, {"os-stop": None})
        self.action(server_id, {"os-start": None})
        before = self.actions(server_id)
        self.assertEqual([a["action"] for a in before], ["start", "stop", "create"])
        packed = self.store.data["instance_actions"][server_id]
        self.assertIsInstance(packed, minivan.Packed)
        self.restart_app()                       # snapshot written, then read back
        self.assertIsInstance(self.store.data["instance_actions"][server_id], minivan.Packed)
        self.assertEqual(self.actions(server_id), before)
        path = os.path.join(self.tmp, "state.json")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        oracle = json.loads(text)                # Python's own json: the state file is JSON
        records = oracle["data"]["instance_actions"]
        self.assertEqual(records[server_id],
                         json.loads(self.store.data["instance_actions"][server_id]))
        self.assertEqual([e["event"] for a in records[server_id] for e in a["events"]],
                         ["compute__do_build_and_run_instance", "compute_stop_instance",
                          "compute_start_instance"])     # as they happened
        # the streaming reader reads what json reads, whatever the layout of the file
        for layout in (text, json.dumps(oracle, indent=3), json.dumps(oracle, separators=(
                ",", ":")), " \n" + json.dumps(oracle) + "\n\n"):
            doc = minivan.parse_state(layout)
            for key, value in doc["data"]["instance_actions"].items():
                self.assertIsInstance(value, minivan.Packed)
                doc["data"]["instance_actions"][key] = json.loads(value)
            self.assertEqual(doc, oracle)
        for broken in (text[:-3], text + "{}", text.replace('"data": {', '"data": {,', 1),
                       "", "[]", '{"data": {"instance_actions": {"x": }}}'):
            with self.assertRaises(ValueError):
                minivan.parse_state(broken)

    def test_servers_read_back_share_their_keys_and_equal_values(self):
        first, second = self.new_server(name="a"), self.new_server(name="b")
        before = [self.server(first), self.server(second)]
        self.restart_app()
        self.assertEqual([self.server(first), self.server(second)], before)
        a, b = (self.store.data["servers"][i] for i in (first, second))
        self.assertEqual(a["host"], b["host"])
        self.assertIs(a["host"], b["host"])
        self.assertIs(a["flavor"]["name"], b["flavor"]["name"])
        self.assertEqual([id(k) for k in a], [id(k) for k in b])
        self.assertIsNot(a["flavor"], b["flavor"])      # dicts stay each record's own

    def test_a_change_inside_a_packed_record_and_its_undo(self):
        server_id = self.new_server()
        data = self.store.data
        before = data["instance_actions"][server_id]
        op = ["set", ["instance_actions", server_id], {"k": {"a": 1}}]
        deeper = ["set", ["instance_actions", server_id, "k", "b"], 2]
        undo = minivan.inverse_op(data, op)
        minivan.apply_op(data, op)
        undo_deeper = minivan.inverse_op(data, deeper)
        minivan.apply_op(data, deeper)
        self.assertEqual(json.loads(data["instance_actions"][server_id]),
                         {"k": {"a": 1, "b": 2}})
        minivan.apply_op(data, undo_deeper)
        self.assertEqual(json.loads(data["instance_actions"][server_id]), {"k": {"a": 1}})
        minivan.apply_op(data, undo)
        self.assertEqual(data["instance_actions"][server_id], before)
        self.assertIsInstance(data["instance_actions"][server_id], minivan.Packed)


def upload_in_process(test, image_id, data, token="admin:admin"):
    """PUT /image/v2/images/{id}/file in-process, the data streamed as the server does."""
    headers = make_headers({"Host": "127.0.0.1:8774", "X-Auth-Token": token,
                            "Content-Type": "application/octet-stream"})
    resp = test.app.handle("PUT", f"/image/v2/images/{image_id}/file", headers, b"",
                           stream=iter([data]))
    return Reply(resp.status, resp.headers, resp.payload)


class ImageInspectionTests(unittest.TestCase):
    """minivan's image inspector against an oracle: oslo.utils' format_inspector, the
    inspector Nova and Glance run, on the hostile corpus made at test time."""

    def setUp(self):
        for tool in ("qemu-img", "genisoimage"):
            if not shutil.which(tool):
                skip_or_fail(self, f"{tool} not installed (apt install qemu-utils genisoimage)")
        try:
            from oslo_utils.imageutils import format_inspector
        except ImportError:
            skip_or_fail(self, "oslo.utils is not installed (tools/setup-venvs.sh)")
        self.oslo = format_inspector
        self.tmp = tempfile.mkdtemp(prefix="minivan-corpus-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.canary = make_canary()
        self.addCleanup(shutil.rmtree, os.path.dirname(self.canary), True)
        self.cases = make_hostile_images(self.tmp, self.canary)

    def oslo_verdict(self, path):
        """(format, safe) as oslo.utils says: detect_file_format, then safety_check."""
        fi = self.oslo
        try:
            found = fi.detect_file_format(path)
        except fi.ImageFormatError:
            return None, False
        try:
            found.safety_check()
        except (fi.SafetyCheckFailed, fi.ImageFormatError):
            return str(found), False
        return str(found), True

    def test_format_and_safety_agree_with_oslo_format_inspector(self):
        """For every image of the corpus, inspect_image detects the format oslo.utils'
        format_inspector detects, and calls it safe exactly when its safety_check passes."""
        agreed = 0
        for case, _, path in self.cases:
            with self.subTest(case=case):
                found = minivan.inspect_image(path)
                self.assertEqual((found.format, found.safe), self.oslo_verdict(path))
                agreed += 1
        self.assertEqual(agreed, len(self.cases))
        print(f"\noslo.utils format_inspector agreement: {agreed} of {len(self.cases)} images")

    def test_boot_check_answers_as_nova(self):
        """check_image refuses what Nova 34 refuses at boot, with Nova's reasons
        (nova/virt/images.py do_image_deep_inspection), and minivan's two stricter rules
        by name; it gives QEMU raw or qcow2 only (other formats are converted first)."""
        self.assertEqual(sorted(NOVA_BOOT_REASONS), sorted(c for c, _, _ in self.cases))
        for case, declared, path in self.cases:
            with self.subTest(case=case):
                image = {"id": "img-" + case, "disk_format": declared}
                try:
                    fmt = minivan.check_image(image, minivan.inspect_image(path), 1 << 40)
                    reason = None
                except minivan.ImageUnacceptable as e:
                    fmt, reason = None, e.reason
                    self.assertEqual(str(e), f"Image img-{case} is unacceptable: {reason}")
                self.assertEqual(reason, NOVA_BOOT_REASONS[case])
                if reason is None:
                    self.assertIn(fmt, ("raw", "qcow2", "vmdk", "vhd", "vhdx", "vdi"))
        unsupported = {"id": "x", "disk_format": "ploop"}
        with self.assertRaisesRegex(minivan.ImageUnacceptable, "Image not in a supported "
                                                                "format"):
            minivan.check_image(unsupported, minivan.inspect_image(self.cases[1][2]), 1 << 40)

    def test_os_test_images_verdicts(self):
        """The corpus of OpenStack's os-test-images (tools/test-images.py makes it, the
        manifest Tempest's ImagesFormatTest reads): check_image accepts an image under its
        own format exactly when the project calls it usable, and refuses every image
        declared in a format it is not (raw or gpt declared qcow2, others raw), as
        ImagesFormatTest's two compute tests expect."""
        out = os.path.join(self.tmp, "os-test-images")
        subprocess.run([sys.executable, os.path.join(HERE, "tools", "test-images.py"), out],
                       check=True, capture_output=True)
        with open(os.path.join(out, "manifest.yaml")) as f:
            images = re.findall(r"^- name: (\S+)\n  format: (\S+)\n  filename: (\S+)\n"
                                r"  usable: (true|false)\n", f.read(), re.M)
        self.assertGreaterEqual(len(images), 13)
        for name, fmt, filename, usable in images:
            path = os.path.join(out, filename)
            with self.subTest(image=name):
                found, safe = self.oslo_verdict(path)
                self.assertEqual(safe and found in (fmt, "gpt" if fmt == "raw" else fmt),
                                 usable == "true", "the oracle disagrees with the manifest")
                inspection = minivan.inspect_image(path)
                try:
                    minivan.check_image({"id": name, "disk_format": fmt}, inspection, 1 << 40)
                    accepted = True
                except minivan.ImageUnacceptable:
                    accepted = False
                self.assertEqual(accepted, usable == "true")
                lie = "qcow2" if fmt in ("raw", "gpt") else "raw"
                with self.assertRaises(minivan.ImageUnacceptable):
                    minivan.check_image({"id": name, "disk_format": lie}, inspection, 1 << 40)

    def test_inspection_reads_headers_only(self):
        """A sparse 1 TiB raw file is inspected from its first bytes, in well under a
        second's worth of reading: no inspector walks the data."""
        path = os.path.join(self.tmp, "big.raw")
        with open(path, "wb") as f:
            f.truncate(1 << 40)
        found = minivan.inspect_image(path)
        self.assertEqual((found.format, found.safe, found.virtual_size), ("raw", True, 1 << 40))


class HostileImageBootTests(ServerTestCase):
    """The hostile corpus through every way an image reaches a server on a simulated host:
    the image directory, minivan's /image upload, rescue, rebuild and unshelve.  The
    canary a hostile image names keeps its bytes, mode and owner, and so does its
    directory; no domain names it."""

    def setUp(self):
        super().setUp()
        if not shutil.which("genisoimage"):
            skip_or_fail(self, "genisoimage not installed")
        self.canary = make_canary()
        self.addCleanup(shutil.rmtree, os.path.dirname(self.canary), True)
        self.corpus = tempfile.mkdtemp(prefix="minivan-corpus-", dir=self.tmp)
        self.cases = make_hostile_images(self.corpus, self.canary)
        self.before = file_facts(self.canary, os.path.dirname(self.canary))
        self.put("/v2.1/os-quota-sets/admin", {"quota_set": {"instances": -1, "cores": -1,
                                                             "ram": -1}})

    def tearDown(self):
        super().tearDown()
        self.assertEqual(file_facts(self.canary, os.path.dirname(self.canary)), self.before)

    def local_image(self, case, declared, path):
        """The image file in the image directory with a sidecar naming its disk_format."""
        name = place_image(self.app.conf["images_dir"], "hostile-" + case, declared, path)
        images = self.get("/v2.1/images?name=" + name, version="2.35").json()["images"]
        self.assertEqual(len(images), 1)
        return images[0]["id"]

    def assertNoCanaryInDomains(self):
        for dom in self.app.driver.conn.listAllDomains():
            self.assertNotIn(self.canary, dom.XMLDesc(0))

    def test_image_directory(self):
        """Each image of the directory boots, or its build ends in ERROR with Nova's fault
        'Build of instance … aborted: Image … is unacceptable: <reason>'."""
        for case, declared, path in self.cases:
            with self.subTest(case=case):
                image_id = self.local_image(case, declared, path)
                r = self.post_server(name="h", imageRef=image_id)
                self.assertEqual(r.status, 202, r.raw)
                sid = r.json()["server"]["id"]
                server = self.server(sid)
                reason = NOVA_BOOT_REASONS[case]
                if reason is None:
                    self.assertEqual(server["status"], "ACTIVE", server.get("fault"))
                else:
                    self.assertEqual(server["status"], "ERROR")
                    self.assertEqual(server["fault"]["message"],
                                     f"Build of instance {sid} aborted: Image {image_id} is "
                                     f"unacceptable: {reason}")
                self.assertNoCanaryInDomains()
                self.assertEqual(self.delete("/v2.1/servers/" + sid).status, 204)
                self.app.compute.wait_idle()

    def test_upload_then_boot(self):
        """Through minivan's /image: an upload Glance would refuse is refused (415, the
        image stays queued, no file is kept); one it accepts becomes active, and the boot
        check stops what Nova would not boot."""
        accepted = refused = 0
        for case, declared, path in self.cases:
            with self.subTest(case=case):
                r = self.post("/image/v2/images", {"name": case, "disk_format": declared,
                                                   "container_format": "bare"})
                image_id = r.json()["id"]
                with open(path, "rb") as f:
                    r = upload_in_process(self, image_id, f.read())
                shown = self.get(f"/image/v2/images/{image_id}").json()
                if r.status == 415:
                    refused += 1
                    self.assertEqual(shown["status"], "queued")
                    self.assertFalse([n for n in os.listdir(self.app.conf["images_dir"])
                                      if n.startswith(image_id) or n.startswith("." + image_id)])
                    continue
                self.assertEqual((r.status, shown["status"]), (204, "active"))
                accepted += 1
                r = self.post_server(name="u", imageRef=image_id)
                sid = r.json()["server"]["id"]
                reason = NOVA_BOOT_REASONS[case]
                server = self.server(sid)
                self.assertEqual(server["status"], "ERROR" if reason else "ACTIVE")
                if reason:
                    self.assertIn(f"is unacceptable: {reason}", server["fault"]["message"])
                self.delete("/v2.1/servers/" + sid)
                self.app.compute.wait_idle()
        self.assertGreater(accepted, 0)
        self.assertGreater(refused, 0)

    def plant(self, image_id, path):
        """Put these bytes behind a local image, as if they had been uploaded."""
        image = self.app.images.get(image_id)
        shutil.copy(path, self.app.images.path(image))
        self.app.store.commit([["set", ["images", image_id, "os_hash_value"], None],
                               ["set", ["images", image_id, "os_hash_algo"], None]])

    # the cases the real-guest test takes through rescue, rebuild and unshelve in CI
    # (MINIVAN_HOSTILE_CASES=all: every hostile one, about 6 minutes)
    HOSTILE = ("qcow2 with a backing file", "raw declared qcow2",
               "vmdk with a flat extent naming a host file", "qcow2 with a data file")

    def test_rescue_rebuild_and_unshelve(self):
        """A hostile image given to rescue (202, then ERROR: 'Instance … cannot be rescued:
        Driver Error: Image … is unacceptable: …'), to rebuild (ERROR with the image's
        fault) or behind a shelved server's image (the server stays SHELVED_OFFLOADED on
        no host; the unshelve's event is an Error), as Nova's compute manager answers."""
        cases = {c: (d, p) for c, d, p in self.cases}
        for case in [c for c, _, _ in self.cases if NOVA_BOOT_REASONS[c]]:
            declared, path = cases[case]
            with self.subTest(case=case):
                image_id = self.local_image(case, declared, path)
                reason = NOVA_BOOT_REASONS[case]
                sid = self.new_server()
                r = self.action(sid, {"rescue": {"rescue_image_ref": image_id}})
                self.assertEqual(r.status, 200, r.raw)
                server = self.server(sid)
                self.assertEqual(server["status"], "ERROR")
                self.assertEqual(server["fault"]["message"],
                                 f"Instance {sid} cannot be rescued: Driver Error: Image "
                                 f"{image_id} is unacceptable: {reason}")
                self.delete("/v2.1/servers/" + sid)

                sid = self.new_server()
                r = self.action(sid, {"rebuild": {"imageRef": image_id}})
                self.assertEqual(r.status, 202, r.raw)
                server = self.server(sid)
                self.assertEqual(server["status"], "ERROR")
                self.assertEqual(server["fault"]["message"],
                                 f"Image {image_id} is unacceptable: {reason}")
                self.delete("/v2.1/servers/" + sid)

                sid = self.new_server()
                self.action(sid, {"shelve": None})
                self.assertEqual(self.server(sid)["status"], "SHELVED_OFFLOADED")
                shelved = self.app.store.data["servers"][sid]["shelved_image_id"]
                self.plant(shelved, path)
                self.app.store.commit([["set", ["images", shelved, "disk_format"], declared]])
                r = self.action(sid, {"unshelve": None})
                self.assertEqual(r.status, 202, r.raw)
                server = self.server(sid, version="2.62")
                self.assertEqual((server["status"], server["OS-EXT-SRV-ATTR:host"]),
                                 ("SHELVED_OFFLOADED", None))
                actions = self.get(f"/v2.1/servers/{sid}/os-instance-actions").json()
                latest = self.get(f"/v2.1/servers/{sid}/os-instance-actions/"
                                  f"{actions['instanceActions'][0]['request_id']}",
                                  version="2.51").json()["instanceAction"]
                self.assertEqual((latest["action"], latest["events"][0]["result"]),
                                 ("unshelve", "Error"))
                self.assertFalse(os.path.exists(os.path.join(
                    self.app.conf["instances_dir"], sid, "disk")))
                self.delete("/v2.1/servers/" + sid)
                self.app.compute.wait_idle()
                self.assertNoCanaryInDomains()

    def test_nova_image_proxy_follows_glance_policy(self):
        """Through Nova's image proxy, a member of a project may delete or change neither
        the operator's image (the image directory's) nor another project's: 403 with
        Nova's messages for Glance's refusals, and the file stays; an admin may."""
        operator = self.app.images.get(self.image_id)
        path = self.app.images.path(operator)
        r = self.delete("/v2.1/images/" + self.image_id, token="mallory:evil")
        self.assertFault(r, 403, "forbidden", "You are not allowed to delete the image.")
        r = self.post(f"/v2.1/images/{self.image_id}/metadata", {"metadata": {"k": "v"}},
                      token="mallory:evil")
        self.assertFault(r, 403, "forbidden", f"Not authorized for image {self.image_id}.")
        self.assertTrue(os.path.exists(path))
        r = self.post("/image/v2/images", {"name": "theirs", "disk_format": "raw",
                                           "container_format": "bare",
                                           "visibility": "community"}, token="alice:p1")
        theirs = r.json()["id"]
        upload_in_process(self, theirs, b"\0" * 4096, token="alice:p1")
        r = self.delete("/v2.1/images/" + theirs, token="mallory:evil")
        self.assertFault(r, 403, "forbidden")
        self.assertEqual(self.delete("/v2.1/images/" + theirs, token="alice:p1").status, 204)
        self.assertEqual(self.delete("/v2.1/images/" + self.image_id).status, 204)
        self.assertFalse(os.path.exists(path))

    def test_the_image_cache_cannot_be_poisoned(self):
        """An upload cannot take the id of an image that exists or existed; the image
        directory's images get ids no one can predict; a cached base whose bytes changed
        is found out and fetched again: the server boots the image's own bytes."""
        operator = self.app.images.get(self.image_id)
        self.assertNotEqual(self.image_id, str(uuid.uuid5(minivan.IMAGE_NAMESPACE,
                                                          os.path.basename(operator["file"]))))
        r = self.post("/image/v2/images", {"id": self.image_id, "name": "mine",
                                           "disk_format": "qcow2", "container_format": "bare"},
                      token="mallory:evil")
        self.assertEqual(r.status, 409)
        r = self.post("/image/v2/images", {"name": "mine", "disk_format": "raw",
                                           "container_format": "bare"}, token="mallory:evil")
        mine = r.json()["id"]
        upload_in_process(self, mine, b"\0" * 65536, token="mallory:evil")
        self.assertEqual(self.delete(f"/image/v2/images/{mine}", token="mallory:evil").status,
                         204)
        r = self.post("/image/v2/images", {"id": mine, "name": "again", "disk_format": "raw",
                                           "container_format": "bare"}, token="mallory:evil")
        self.assertEqual(r.status, 409)
        # the operator's image in the cache, then other bytes planted under its name
        sid = self.new_server()
        base = os.path.join(self.app.conf["data_dir"], "_base",
                            "sha512-" + minivan.file_sha512(self.app.images.path(operator)))
        self.assertEqual(minivan.qcow2_backing(os.path.join(
            self.app.conf["instances_dir"], sid, "disk")), base)
        shutil.copy(self.cases[2][2], base)       # a qcow2 naming the canary
        sid2 = self.new_server()
        self.assertEqual(minivan.file_sha512(base),
                         minivan.file_sha512(self.app.images.path(operator)))
        self.assertEqual(minivan.inspect_image(base).problems, [])
        for server_id in (sid, sid2):
            self.delete("/v2.1/servers/" + server_id)


class DurableImageTests(ServerTestCase):
    """An upload or snapshot is active only once its bytes and directory entry are on
    disk: a failing fsync (EIO) leaves it not active, and the client is told."""

    def fail_fsync_of(self, marker):
        """os.fsync raising EIO for files whose path contains marker (directories too)."""
        real = os.fsync
        failed = []

        def fsync(fd):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if marker in target:
                failed.append(target)
                raise OSError(errno.EIO, "Input/output error")
            return real(fd)
        from unittest import mock
        return mock.patch("os.fsync", fsync), failed

    def test_upload_with_a_failing_fsync_is_not_active(self):
        """/image upload: EIO on the data's fsync -> 503, the image stays queued with no
        file; the same upload later succeeds."""
        r = self.post("/image/v2/images", {"name": "d", "disk_format": "raw",
                                           "container_format": "bare"})
        image_id = r.json()["id"]
        patch, failed = self.fail_fsync_of(image_id)
        with patch:
            r = upload_in_process(self, image_id, b"\1" * 4096)
        self.assertEqual(r.status, 503, r.raw)
        self.assertTrue(failed)
        self.assertEqual(self.get(f"/image/v2/images/{image_id}").json()["status"], "queued")
        self.assertFalse([n for n in os.listdir(self.app.conf["images_dir"]) if image_id in n])
        r = upload_in_process(self, image_id, b"\1" * 4096)
        self.assertEqual(r.status, 204)
        self.assertEqual(self.get(f"/image/v2/images/{image_id}").json()["status"], "active")

    def test_snapshot_with_a_failing_fsync_is_not_active(self):
        """createImage: EIO on the snapshot file's fsync -> the image is deleted, never
        active; the server is ACTIVE again with the failed event on record."""
        sid = self.new_server()
        patch, failed = self.fail_fsync_of(".part")
        with patch:
            r = self.action(sid, {"createImage": {"name": "snap"}}, version="2.45")
            self.assertEqual(r.status, 202, r.raw)
            image_id = r.json()["image_id"]
            self.app.compute.wait_idle()
        self.assertTrue(failed)
        self.assertEqual(self.get(f"/image/v2/images/{image_id}").status, 404)
        self.assertEqual(self.server(sid)["status"], "ACTIVE")
        r = self.action(sid, {"createImage": {"name": "snap2"}}, version="2.45")
        image_id = r.json()["image_id"]
        self.assertEqual(self.get(f"/image/v2/images/{image_id}").json()["status"], "active")


class ConcurrencyTests(ServerTestCase):
    """Readers and writers at once, in-process (the GIL switches threads inside long walks
    over the records, as in the daemon)."""

    def test_every_list_route_under_concurrent_writers(self):
        """Three readers call every GET route without path parameters (at its lowest and
        highest microversion, with all_tenants where it applies) while three writers
        create and delete keypairs, flavors, servers, server groups and aggregates over
        3,000 records already there, for 10 s: no answer is a 5xx (but 501 for routes not
        built)."""
        ops = [["set", ["keypairs", "admin", f"pre{i}"], {
            "name": f"pre{i}", "user_id": "admin", "public_key": SAMPLE_KEY,
            "fingerprint": SAMPLE_FINGERPRINT, "type": "ssh", "id": 1000 + i,
            "created_at": "2026-01-01T00:00:00.000000", "deleted": False}]
            for i in range(3000)]
        self.app.store.commit(ops)
        self.put("/v2.1/os-quota-sets/admin", {"quota_set": {
            "key_pairs": -1, "instances": -1, "cores": -1, "ram": -1, "server_groups": -1}})
        paths = []
        for route in minivan.ROUTES:
            if route.method != "GET" or route.gone or any(
                    seg.startswith("{") for seg in route.segments):
                continue
            path = "/v2.1/" + "/".join(route.segments)
            for version in {minivan.version_text(route.min), minivan.version_text(route.max)}:
                paths.append((path, version))
            if route.path in ("/servers", "/servers/detail"):
                paths.append((path + "?all_tenants=1", "2.80"))
        stop = time.monotonic() + 10
        bad, answered = [], collections.Counter()

        def headers(version=None, body=False):
            pairs = {"Host": "127.0.0.1:8774", "X-Auth-Token": "admin:admin"}
            if version:
                pairs["OpenStack-API-Version"] = "compute " + version
            if body:
                pairs["Content-Type"] = "application/json"
            return make_headers(pairs)

        def reader():
            while time.monotonic() < stop:
                for path, version in paths:
                    resp = self.app.handle("GET", path, headers(version), b"")
                    answered[resp.status // 100] += 1
                    if resp.status >= 500 and resp.status != 501:
                        bad.append((path, version, resp.status, resp.payload[:200]))

        def writer(n):
            i = 0
            while time.monotonic() < stop:
                i += 1
                for path, body in (
                        ("/v2.1/os-keypairs", {"keypair": {"name": f"w{n}-{i}"}}),
                        ("/v2.1/flavors", {"flavor": {"name": f"f{n}-{i}", "ram": 64,
                                                      "vcpus": 1, "disk": 0}}),
                        ("/v2.1/servers", {"server": {"name": f"s{n}-{i}", "flavorRef": "1",
                                                      "imageRef": self.image_id}}),
                        ("/v2.1/os-server-groups", {"server_group": {
                            "name": f"g{n}-{i}", "policies": ["anti-affinity"]}}),
                        ("/v2.1/os-aggregates", {"aggregate": {"name": f"a{n}-{i}"}})):
                    resp = self.app.handle("POST", path, headers(body=True),
                                           json.dumps(body).encode())
                    if resp.status >= 500:
                        bad.append((path, "POST", resp.status, resp.payload[:200]))
                self.app.handle("DELETE", f"/v2.1/os-keypairs/w{n}-{i}", headers(), b"")
        threads = [threading.Thread(target=reader) for _ in range(3)] + \
            [threading.Thread(target=writer, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(bad, [])
        self.assertGreater(answered[2], len(paths) * 3)


class InstanceNameTemplateTests(ServerTestCase):
    conf = {"instance_name_template": "mv-%(hostname)s-%(id)d"}

    def test_domain_names_follow_the_template(self):
        """--instance-name-template names the servers' libvirt domains, as Nova's
        instance_name_template does."""
        made = [self.post_server(name=name).json()["server"]["id"] for name in ("a", "b")]
        names = [self.server(server_id)["OS-EXT-SRV-ATTR:instance_name"]
                 for server_id in made]
        self.assertEqual(len(set(names)), 2)
        for name, server_id in zip(names, made):
            self.assertRegex(name, r"^mv-[ab]-\d+$")
            self.assertEqual(self.app.driver.conn.lookupByUUIDString(server_id).name(), name)



class ServerLifecycleTests(ServerTestCase):
    def test_hostile_names_make_valid_domains_and_safe_files(self):
        """XML and shell metacharacters in a server's name, metadata, tags, user data and
        an image's name end up escaped in the domain XML (which libvirt accepts and gives
        back intact) and never in a file name."""
        hostile = "<x a='1'>&amp;\"; $(touch /tmp/minivan-pwned) `id` ]]> ../../etc"
        image_dir = self.app.conf["images_dir"]
        make_image(image_dir, name="img-" + "x;$(id)")
        server_id = self.new_server(name=hostile[:200], metadata={"k.x": hostile[:255]},
                                    user_data=base64.b64encode(hostile.encode()).decode())
        self.assertEqual(self.put(f"/v2.1/servers/{server_id}/tags/a%3Cb%3E", None,
                                  version="2.26").status, 201)
        dom = self.app.driver.conn.lookupByUUIDString(server_id)
        xml = dom.XMLDesc(0)
        import xml.etree.ElementTree as ET
        root = ET.fromstring(xml)                    # well-formed
        names = [el.text for el in root.iter() if el.tag.endswith("name")]
        self.assertIn(hostile[:200], names)          # the name came back intact
        self.assertFalse(os.path.exists("/tmp/minivan-pwned"))
        for dirpath, dirnames, filenames in os.walk(self.app.conf["instances_dir"]):
            for name in dirnames + filenames:
                self.assertRegex(name, r"^[A-Za-z0-9._-]+$")
        self.assertEqual(self.server(server_id)["name"], hostile[:200])

    def test_create_boots_a_domain(self):
        """POST /servers answers 202 with Location and adminPass; the build ends ACTIVE with a
        running domain carrying minivan's metadata."""
        r = self.post_server(wait=False)
        self.assertEqual(r.status, 202)
        body = r.json()["server"]
        self.assertEqual(r.header("Location"), body["links"][0]["href"])
        self.assertEqual(body["security_groups"], [{"name": "default"}])
        self.assertEqual(len(body["adminPass"]), 12)
        self.app.compute.wait_idle()
        server = self.server(body["id"])
        self.assertEqual((server["status"], server["OS-EXT-STS:power_state"],
                          server["OS-EXT-STS:task_state"]), ("ACTIVE", 1, None))
        self.assertTrue(server["OS-EXT-SRV-ATTR:instance_name"].startswith("instance-0000000"))
        self.assertEqual(self.domain_state(body["id"]), 1)
        xml = self.app.driver.conn.lookupByUUIDString(body["id"]).XMLDesc(0)
        self.assertIn(minivan.METADATA_NS, xml)
        self.assertTrue(os.path.exists(os.path.join(self.app.conf["instances_dir"], body["id"],
                                                    "disk")))
        addresses = server["addresses"]["default"]
        self.assertEqual(addresses[0]["OS-EXT-IPS:type"], "fixed")
        self.assertTrue(addresses[0]["OS-EXT-IPS-MAC:mac_addr"].startswith("fa:16:3e:"))

    def test_build_passes_through_nova_task_states(self):
        """The build records scheduling, networking, block_device_mapping and spawning."""
        seen = []
        real = self.app.compute.update

        def spy(server_id, **fields):
            if "task_state" in fields:
                seen.append(fields["task_state"])
            real(server_id, **fields)
        self.app.compute.update = spy
        self.new_server()
        self.assertEqual(seen[:4], ["scheduling", "networking", "block_device_mapping",
                                    "spawning"])
        self.assertEqual(seen[-1], None)

    def test_show_shapes(self):
        """Show at 2.1 and at latest carries the fields of each microversion."""
        server_id = self.new_server()
        old = self.server(server_id)
        self.assertEqual(old["flavor"]["id"], "1")
        self.assertNotIn("locked", old)
        self.assertEqual(old["image"]["id"], self.image_id)
        new = self.server(server_id, version="latest")
        self.assertEqual(new["flavor"]["original_name"], "m1.tiny")
        for key in ("locked", "description", "tags", "trusted_image_certificates",
                    "server_groups", "locked_reason", "pinned_availability_zone",
                    "scheduler_hints", "host_status", "OS-EXT-SRV-ATTR:hostname"):
            self.assertIn(key, new)
        self.assertEqual(new["description"], "vm")
        member = self.get("/v2.1/servers/" + server_id, token="demo:admin").json()["server"]
        self.assertNotIn("OS-EXT-SRV-ATTR:host", member)

    def test_other_project_is_404(self):
        """Another project's server is 404, as Nova hides it."""
        server_id = self.new_server()
        self.assertFault(self.get("/v2.1/servers/" + server_id, token="demo:demo"), 404,
                         "itemNotFound", f"Instance {server_id} could not be found.")
        self.assertFault(self.get("/v2.1/servers/nonexistent-uuid"), 404, "itemNotFound")

    def test_delete_removes_domain_and_disks(self):
        """DELETE answers 204; then the server is 404 and its domain and disks are gone."""
        server_id = self.new_server()
        r = self.delete("/v2.1/servers/" + server_id)
        self.assertEqual(r.status, 204)
        self.app.compute.wait_idle()
        self.assertFault(self.get("/v2.1/servers/" + server_id), 404, "itemNotFound")
        self.assertFalse(self.app.driver.exists({"id": server_id, "instance_name": "x"}))
        self.assertFalse(os.path.exists(os.path.join(self.app.conf["instances_dir"],
                                                     server_id)))
        listed = self.get("/v2.1/servers/detail?changes-since=2000-01-01T00:00:00Z").json()
        self.assertEqual(listed["servers"][0]["status"], "DELETED")

    def test_create_validation(self):
        """Bad creates are 400 with Nova's messages; nothing is created."""
        cases = [({"flavorRef": "nope"}, "Invalid flavorRef provided."),
                 ({"imageRef": "c0ffee00-0000-4000-8000-000000000000"}, "could not be found"),
                 ({"imageRef": "not-a-uuid"}, "is not a 'uuid'"),
                 ({"key_name": "missing"}, "Invalid key_name provided."),
                 ({"availability_zone": "elsewhere"}, "availability zone"),
                 ({"networks": [{"uuid": "c0ffee00-0000-4000-8000-000000000000"}]},
                  "could not be found"),
                 ({"user_data": "not base64!"}, "base64"),
                 ({"accessIPv4": "1.2.3"}, "ipv4"),
                 ({"bogus": 1}, "Additional properties"),
                 ({"name": ""}, "too short"),
                 ({"min_count": 3, "max_count": 2}, "min_count")]
        for fields, message in cases:
            r = self.post_server(**fields)
            self.assertFault(r, 400, "badRequest", message)
        self.assertFault(self.post("/v2.1/servers", {"server": {"name": "x", "imageRef":
                                                                self.image_id}}), 400,
                         "badRequest", "'flavorRef' is a required property")
        r = self.post_server(version="2.37", networks=None)
        self.assertEqual(r.status, 400)
        self.assertEqual(self.get("/v2.1/servers").json()["servers"], [])

    def test_image_min_ram_and_disk(self):
        """An image needing more RAM or disk than the flavor has is 400."""
        make_image(self.app.conf["images_dir"], "big", sidecar={"min_ram": 4096,
                                                                 "min_disk": 100})
        image = [i for i in self.get("/v2.1/images", version="2.35").json()["images"]
                 if i["name"] == "big"][0]
        self.assertFault(self.post_server(imageRef=image["id"]), 400, "badRequest",
                         "memory is too small")
        self.assertFault(self.post_server(imageRef=image["id"], flavorRef="4"), 400,
                         "badRequest", "disk is too small")

    def test_quota_below_usage_needs_force(self):
        """A limit below what is in use is 400 unless force is set."""
        self.new_server()
        self.new_server()
        body = {"quota_set": {"instances": 1}}
        self.assertFault(self.put("/v2.1/os-quota-sets/admin", body), 400, "badRequest",
                         "already used and reserved 2")
        body["quota_set"]["force"] = True
        self.assertEqual(self.put("/v2.1/os-quota-sets/admin", body).status, 200)

    def test_quota_exceeded(self):
        """Creating past the instances quota is 403 with Nova's message."""
        self.put("/v2.1/os-quota-sets/admin", {"quota_set": {"instances": 1}})
        self.new_server()
        self.assertFault(self.post_server(), 403, "forbidden",
                         "Quota exceeded for instances: Requested 1, but already used 1 of 1 "
                         "instances")
        self.put("/v2.1/os-quota-sets/admin", {"quota_set": {"instances": 10, "cores": 1}})
        self.assertFault(self.post_server(), 403, "forbidden", "Quota exceeded for cores")
        limits = self.get("/v2.1/limits").json()["limits"]["absolute"]
        self.assertEqual((limits["totalInstancesUsed"], limits["totalCoresUsed"],
                          limits["totalRAMUsed"]), (1, 1, 512))

    def test_multiple_create(self):
        """min_count/max_count create several servers named name-N; reservation ids."""
        r = self.post_server(name="many", min_count=2, max_count=3)
        self.assertEqual(r.status, 202)
        names = sorted(s["name"] for s in self.get("/v2.1/servers").json()["servers"])
        self.assertEqual(names, ["many-1", "many-2", "many-3"])
        r = self.post_server(name="res", return_reservation_id=True)
        self.assertTrue(r.json()["reservation_id"].startswith("r-"))
        listed = self.get("/v2.1/servers?reservation_id=" + r.json()["reservation_id"])
        self.assertEqual([s["name"] for s in listed.json()["servers"]], ["res"])

    def test_os_volumes_boot_is_an_alias_of_servers(self):
        """/os-volumes_boot serves the servers API up to 2.102, 404 from 2.103."""
        r = self.post("/v2.1/os-volumes_boot", {"server": {
            "name": "vb", "imageRef": self.image_id, "flavorRef": "1"}})
        self.assertEqual(r.status, 202)
        self.app.compute.wait_idle()
        server_id = r.json()["server"]["id"]
        self.assertEqual(self.get("/v2.1/os-volumes_boot/" + server_id).json()["server"]["name"],
                         "vb")
        self.assertEqual(self.post(f"/v2.1/os-volumes_boot/{server_id}/action",
                                   {"os-stop": None}).status, 202)
        self.assertFault(self.get("/v2.1/os-volumes_boot", version="2.103"), 404,
                         "itemNotFound")

    def test_update(self):
        """PUT /servers/{id} changes name, description and access IPs."""
        server_id = self.new_server()
        r = self.put("/v2.1/servers/" + server_id, {"server": {
            "name": "renamed", "description": "d", "accessIPv4": "10.0.0.9"}}, version="2.19")
        body = r.json()["server"]
        self.assertEqual((body["name"], body["description"], body["accessIPv4"]),
                         ("renamed", "d", "10.0.0.9"))
        self.assertNotIn("OS-EXT-STS:vm_state", body)
        full = self.put("/v2.1/servers/" + server_id, {"server": {"name": "x"}},
                        version="2.75").json()["server"]
        self.assertIn("OS-EXT-STS:vm_state", full)
        self.assertFault(self.put("/v2.1/servers/" + server_id, {"server": {"bad": 1}}), 400,
                         "badRequest")

    def test_list_filters_sort_and_pages(self):
        """Name regex, status, flavor, sort keys, limit/marker and next links."""
        ids = [self.new_server(name=f"web-{i}") for i in range(3)]
        self.new_server(name="db", flavorRef="2")
        names = [s["name"] for s in self.get("/v2.1/servers?name=web").json()["servers"]]
        self.assertEqual(sorted(names), ["web-0", "web-1", "web-2"])
        self.assertEqual(len(self.get("/v2.1/servers?flavor=2").json()["servers"]), 1)
        self.assertEqual(len(self.get("/v2.1/servers?status=ACTIVE").json()["servers"]), 4)
        self.assertEqual(self.get("/v2.1/servers?status=SHUTOFF").json()["servers"], [])
        self.assertEqual(self.get("/v2.1/servers?status=bogus").json()["servers"], [])
        self.assertFault(self.get("/v2.1/servers?status=bogus", version="2.38"), 400,
                         "badRequest")
        ordered = [s["name"] for s in self.get(
            "/v2.1/servers/detail?sort_key=display_name&sort_dir=asc").json()["servers"]]
        self.assertEqual(ordered, ["db", "web-0", "web-1", "web-2"])
        page = self.get("/v2.1/servers?limit=2").json()
        self.assertEqual(len(page["servers"]), 2)
        self.assertIn("marker=", page["servers_links"][0]["href"])
        rest = self.get("/v2.1/servers?limit=2&marker=" + page["servers"][-1]["id"]).json()
        self.assertEqual(len(rest["servers"]), 2)
        self.assertFault(self.get("/v2.1/servers?marker=nope"), 400, "badRequest")
        self.assertFault(self.get("/v2.1/servers?sort_key=bogus"), 400, "badRequest")
        self.assertFault(self.get("/v2.1/servers?metadata=x", token="admin:admin"), 400,
                         "badRequest")
        self.assertFault(self.get("/v2.1/servers?foo=1", version="2.75"), 400, "badRequest")
        self.assertEqual(self.get("/v2.1/servers?foo=1").status, 200)
        self.assertIn(ids[0], [s["id"] for s in self.get("/v2.1/servers").json()["servers"]])

    def test_default_order_pages_match_a_full_sort(self):
        """Pages in the default order (read from the kept created_at index) are what the
        general sort gives (created_at desc, then uuid desc), for every project scope,
        filter and marker, after deletes too."""
        ids = [self.new_server(name=f"n{i % 3}", token=("demo:demo" if i % 4 == 0 else
                                                         "admin:admin")) for i in range(13)]
        self.assertEqual(self.delete(f"/v2.1/servers/{ids[5]}").status, 204)
        self.assertEqual(self.delete(f"/v2.1/servers/{ids[8]}", token="demo:demo").status, 204)
        self.app.compute.wait_idle()
        for query in ("", "name=n1", "all_tenants=1", "all_tenants=1&project_id=demo",
                      "all_tenants=1&deleted=true", "all_tenants=1&changes-since=2000-01-01"):
            full = [srv["id"] for srv in self.get(
                f"/v2.1/servers?{query}&sort_key=created_at&sort_dir=desc&sort_key=uuid"
                f"&sort_dir=desc").json()["servers"]]
            self.assertEqual([srv["id"] for srv in self.get(f"/v2.1/servers?{query}")
                              .json()["servers"]], full, query)
            walked, marker = [], None
            while True:
                page = self.get(f"/v2.1/servers/detail?{query}&limit=3" +
                                (f"&marker={marker}" if marker else "")).json()
                walked += [srv["id"] for srv in page["servers"]]
                if "servers_links" not in page:
                    break
                marker = page["servers"][-1]["id"]
            self.assertEqual(walked, full, query)
            self.assertEqual(ids[5] in full, "deleted" in query or "changes" in query, query)
        self.assertFault(self.get(f"/v2.1/servers?marker={ids[0]}&name=n1"), 400,
                         "badRequest")          # the marker is filtered out

    def test_all_tenants(self):
        """all_tenants is admin-only (403 for members); members see their own servers."""
        mine = self.new_server(token="demo:demo")
        self.new_server()
        self.assertEqual([s["id"] for s in self.get("/v2.1/servers", token="demo:demo")
                          .json()["servers"]], [mine])
        self.assertFault(self.get("/v2.1/servers?all_tenants=1", token="demo:demo"), 403,
                         "forbidden")
        self.assertEqual(len(self.get("/v2.1/servers?all_tenants=1").json()["servers"]), 2)
        self.assertEqual(len(self.get("/v2.1/servers?all_tenants=1&project_id=demo")
                             .json()["servers"]), 1)

    def test_tags_filters(self):
        """tags, tags-any, not-tags and not-tags-any filter from 2.26."""
        a = self.new_server(name="a", version="2.52", tags=["x", "y"])
        b = self.new_server(name="b", version="2.52", tags=["y"])

        def names(query):
            return sorted(s["name"] for s in self.get("/v2.1/servers?" + query,
                                                      version="2.26").json()["servers"])
        self.assertEqual(names("tags=x,y"), ["a"])
        self.assertEqual(names("tags-any=x,y"), ["a", "b"])
        self.assertEqual(names("not-tags=x,y"), ["b"])
        self.assertEqual(names("not-tags-any=x"), ["b"])
        self.assertTrue(a and b)


class GuestShapeTests(ServerTestCase):
    """Flavor extra specs and image properties through the API: Nova's 400s at create,
    rebuild and resize; a build minivan cannot give fails with the reason."""

    def set_image_properties(self, **props):
        r = self.post(f"/v2.1/images/{self.image_id}/metadata", {"metadata": props},
                      version="2.35")
        self.assertEqual(r.status, 200, r.raw)

    def test_bad_image_property_is_400_at_create_and_rebuild(self):
        """A property that does not fit Nova's field is refused before anything is made;
        rebuild checks the config drive option first, as Nova does."""
        server_id = self.new_server()
        self.set_image_properties(hw_disk_bus="floppy")
        self.assertFault(self.post_server(), 400, "badRequest",
                         "Invalid image metadata. Error: Field value floppy is invalid")
        self.set_image_properties(hw_disk_bus="virtio", hw_video_ram="lots")
        self.assertFault(self.post_server(), 400, "badRequest", "Invalid image metadata. "
                         "Error: invalid literal for int() with base 10: 'lots'")
        self.set_image_properties(hw_video_ram="0", img_config_drive="always")
        self.assertFault(self.post_server(), 400, "badRequest",
                         "Invalid image metadata. Error: Field value always is invalid")
        self.assertFault(self.action(server_id, {"rebuild": {"imageRef": self.image_id}}),
                         400, "badRequest", "Image's config drive option 'always' is invalid")
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")

    def test_resize_checks_the_new_flavor_against_the_image(self):
        """An image's vCPU limit above the new flavor's is Nova's 400 on resize."""
        self.set_image_properties(hw_cpu_max_sockets="4")
        server_id = self.new_server()
        self.assertEqual(self.post("/v2.1/flavors/2/os-extra_specs", {"extra_specs": {
            "hw:cpu_max_sockets": "2"}}).status, 200)
        self.assertFault(self.action(server_id, {"resize": {"flavorRef": "2"}}), 400,
                         "badRequest", "Image vCPU topology limits (sockets=4, cores=0, "
                         "threads=0) exceeds the limits of the flavor (sockets=2, cores=0, "
                         "threads=0)")

    def test_unhonoured_spec_fails_the_build_with_the_reason(self):
        """A flavor asking for packed virtqueues gets no split ones: the build fails, and
        its fault names what minivan does not give."""
        self.assertEqual(self.post("/v2.1/flavors/2/os-extra_specs", {"extra_specs": {
            "hw:virtio_packed_ring": "true"}}).status, 200)
        r = self.post_server(flavorRef="2")
        self.assertEqual(r.status, 202, r.raw)
        server = self.server(r.json()["server"]["id"])
        self.assertEqual(server["status"], "ERROR")
        self.assertIn("minivan does not give guests packed virtqueues "
                      "(hw:virtio_packed_ring)", server["fault"]["message"])

    def test_config_drive_name_is_kept_from_volumes_off_virtio(self):
        """On SATA disks the config drive may sit on the same bus (q35, whether from the
        image or --hw-machine-type): its name (sdb) is never offered to a volume."""
        server = {"flavor": {"ephemeral": 0, "swap": 0}, "config_drive": True,
                  "image_properties": {"hw_disk_bus": "sata"}, "volumes": []}
        self.assertEqual(minivan.next_target(server), "vdc")
        server["image_properties"] = {}
        self.assertEqual(minivan.next_target(server), "vdb")

    def test_tpm_needs_swtpm_and_stays_on_its_host(self):
        """Without --swtpm-enabled a TPM flavor finds no host, as in Nova; with it the
        server has a TPM passphrase of its own, and a resize, migration, shelve, rescue
        or rebuild is refused (400) as Nova refuses what moves a vTPM."""
        self.assertEqual(self.post("/v2.1/flavors/2/os-extra_specs", {"extra_specs": {
            "hw:tpm_version": "2.0"}}).status, 200)
        server = self.server(self.post_server(flavorRef="2").json()["server"]["id"])
        self.assertEqual(server["status"], "ERROR")
        self.assertIn("No valid host was found.", server["fault"]["message"])
        self.app.driver.swtpm_enabled = True
        self.app.driver._guest_host = None
        server_id = self.new_server(flavorRef="2")
        self.assertEqual(len(self.app.store.data["servers"][server_id]["vtpm_secret"]), 64)
        for action, body in (("resize", {"flavorRef": "3"}), ("migrate", None),
                             ("shelve", None), ("rescue", None),
                             ("rebuild", {"imageRef": self.image_id})):
            with self.subTest(action):
                self.assertFault(self.action(server_id, {action: body}), 400, "badRequest",
                                 f"Operation '{action}' not supported for vTPM-enabled "
                                 f"instance ({server_id}).")
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")

    def test_guest_agent_channel_only_when_the_image_asks(self):
        """The domain has the QEMU guest agent's channel only with hw_qemu_guest_agent."""
        server_id = self.new_server()
        desc = self.app.driver.conn.lookupByUUIDString(server_id).XMLDesc(0)
        self.assertNotIn("org.qemu.guest_agent.0", desc)
        self.set_image_properties(hw_qemu_guest_agent="yes", hw_disk_bus="sata")
        server_id = self.new_server()
        desc = self.app.driver.conn.lookupByUUIDString(server_id).XMLDesc(0)
        self.assertIn("org.qemu.guest_agent.0", desc)
        self.assertIn("<target dev='sda' bus='sata'/>", desc)


class ServerActionTests(ServerTestCase):
    def test_stop_start(self):
        """os-stop → SHUTOFF with the domain shut off; os-start → ACTIVE; wrong states 409."""
        server_id = self.new_server()
        self.assertEqual(self.action(server_id, {"os-stop": None}).status, 202)
        server = self.server(server_id)
        self.assertEqual((server["status"], server["OS-EXT-STS:power_state"]), ("SHUTOFF", 4))
        self.assertEqual(self.domain_state(server_id), 5)
        self.assertFault(self.action(server_id, {"os-stop": None}), 409, "conflictingRequest",
                         f"Cannot 'stop' instance {server_id} while it is in vm_state stopped")
        self.assertEqual(self.action(server_id, {"os-start": None}).status, 202)
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")
        self.assertEqual(self.domain_state(server_id), 1)
        self.assertFault(self.action(server_id, {"os-start": None}), 409, "conflictingRequest")

    def test_reboot(self):
        """Soft and hard reboot end ACTIVE; soft reboot of a stopped server is 409."""
        server_id = self.new_server()
        self.assertEqual(self.action(server_id, {"reboot": {"type": "SOFT"}}).status, 202)
        self.assertEqual(self.action(server_id, {"reboot": {"type": "HARD"}}).status, 202)
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")
        self.action(server_id, {"os-stop": None})
        self.assertFault(self.action(server_id, {"reboot": {"type": "SOFT"}}), 409,
                         "conflictingRequest")
        self.assertEqual(self.action(server_id, {"reboot": {"type": "HARD"}}).status, 202)
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")
        self.assertFault(self.action(server_id, {"reboot": {"type": "GENTLE"}}), 400,
                         "badRequest")

    def test_pause_suspend(self):
        """pause/unpause and suspend/resume move the domain and the status together."""
        server_id = self.new_server()
        self.action(server_id, {"pause": None})
        self.assertEqual(self.server(server_id)["status"], "PAUSED")
        self.assertEqual(self.domain_state(server_id), 3)
        self.assertFault(self.action(server_id, {"suspend": None}), 409, "conflictingRequest")
        self.action(server_id, {"unpause": None})
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")
        self.action(server_id, {"suspend": None})
        self.assertEqual(self.server(server_id)["status"], "SUSPENDED")
        self.action(server_id, {"resume": None})
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")

    def test_lock(self):
        """A locked server refuses a member's actions (409); admins may; 2.73 reason."""
        server_id = self.new_server(token="demo:demo")
        self.action(server_id, {"lock": {"locked_reason": "maintenance"}}, version="2.73")
        shown = self.server(server_id, version="2.73")
        self.assertEqual((shown["locked"], shown["locked_reason"]), (True, "maintenance"))
        self.assertFault(self.action(server_id, {"os-stop": None}, token="demo:demo"), 409,
                         "conflictingRequest", "is locked")
        self.assertFault(self.delete("/v2.1/servers/" + server_id, token="demo:demo"), 409,
                         "conflictingRequest")
        self.assertFault(self.action(server_id, {"unlock": None}, token="demo:demo"), 403,
                         "forbidden")
        self.action(server_id, {"unlock": None})
        self.assertEqual(self.action(server_id, {"os-stop": None}, token="demo:demo").status, 202)

    def test_reset_state_is_admin_only(self):
        """os-resetState sets error/active for admins; members get 403."""
        server_id = self.new_server(token="demo:demo")
        self.assertFault(self.action(server_id, {"os-resetState": {"state": "error"}},
                                     token="demo:demo"), 403, "forbidden")
        self.action(server_id, {"os-resetState": {"state": "error"}})
        self.assertEqual(self.server(server_id)["status"], "ERROR")
        self.action(server_id, {"os-resetState": {"state": "active"}})
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")

    def test_console_output(self):
        """os-getConsoleOutput returns the tail of the console log."""
        server_id = self.new_server()
        log = os.path.join(self.app.conf["instances_dir"], server_id, "console.log")
        with open(log, "w") as f:
            f.write("one\ntwo\nthree\n")
        r = self.action(server_id, {"os-getConsoleOutput": {"length": 3}})
        self.assertEqual(r.json(), {"output": "two\nthree\n"})
        r = self.action(server_id, {"os-getConsoleOutput": {}})
        self.assertEqual(r.json()["output"], "one\ntwo\nthree\n")
        self.assertFault(self.action(server_id, {"os-getConsoleOutput": {"length": "x"}}), 400,
                         "badRequest")

    def test_resize_confirm_and_revert(self):
        """resize → VERIFY_RESIZE with the new flavor and a bigger disk; confirm → ACTIVE;
        revert restores the old flavor."""
        server_id = self.new_server()
        self.assertEqual(self.action(server_id, {"resize": {"flavorRef": "2"}}).status, 202)
        server = self.server(server_id)
        self.assertEqual((server["status"], server["flavor"]["id"]), ("VERIFY_RESIZE", "2"))
        disk = os.path.join(self.app.conf["instances_dir"], server_id, "disk")
        self.assertEqual(minivan.virtual_size(disk), 20 * 2 ** 30)
        dom = self.app.driver.conn.lookupByUUIDString(server_id)
        self.assertEqual(dom.info()[1], 2048 * 1024)
        self.assertEqual(self.action(server_id, {"confirmResize": None}).status, 204)
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")
        self.action(server_id, {"resize": {"flavorRef": "3"}})
        self.assertEqual(self.action(server_id, {"revertResize": None}).status, 202)
        server = self.server(server_id)
        self.assertEqual((server["status"], server["flavor"]["id"]), ("ACTIVE", "2"))
        self.assertFault(self.action(server_id, {"resize": {"flavorRef": "2"}}), 400,
                         "badRequest", "must change flavor")
        self.assertFault(self.action(server_id, {"confirmResize": None}), 409,
                         "conflictingRequest")

    def test_resize_between_zero_disk_flavors(self):
        """As Nova: a server of a zero-disk flavor resizes down to another zero-disk flavor
        (its disk keeps the image's size) and back; a server with a disk cannot go to a
        zero-disk flavor."""
        for name, ram in (("zero-128", 128), ("zero-64", 64)):
            r = self.post("/v2.1/flavors", {"flavor": {"name": name, "id": name, "ram": ram,
                                                       "vcpus": 1, "disk": 0}})
            self.assertEqual(r.status, 200, r.raw)
        server_id = self.new_server(flavorRef="zero-128")
        self.assertEqual(self.action(server_id, {"resize": {"flavorRef": "zero-64"}}).status,
                         202, "resize down between zero-disk flavors")
        self.assertEqual(self.server(server_id)["status"], "VERIFY_RESIZE")
        self.assertEqual(self.action(server_id, {"revertResize": None}).status, 202)
        self.assertEqual(self.server(server_id)["flavor"]["id"], "zero-128")
        other = self.new_server()
        self.assertFault(self.action(other, {"resize": {"flavorRef": "zero-64"}}), 400,
                         "badRequest", "Resize to zero disk flavor is not allowed.")

    def test_resize_confirms_itself_after_the_window(self):
        """With --resize-confirm-window, a resize left unconfirmed confirms itself."""
        self.app.conf["resize_confirm_window"] = 60
        server_id = self.new_server()
        self.action(server_id, {"resize": {"flavorRef": "2"}})
        self.app.compute.sync_power_states()
        self.assertEqual(self.server(server_id)["status"], "VERIFY_RESIZE")
        self.clock.t += datetime.timedelta(seconds=61)
        self.app.compute.sync_power_states()
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")

    def test_rebuild(self):
        """rebuild replaces the image and name; the response is the server with adminPass."""
        make_image(self.app.conf["images_dir"], "other")
        other = [i["id"] for i in self.get("/v2.1/images", version="2.35").json()["images"]
                 if i["name"] == "other"][0]
        server_id = self.new_server()
        r = self.action(server_id, {"rebuild": {"imageRef": other, "name": "rebuilt",
                                                "metadata": {"k": "v"}}})
        self.assertEqual(r.status, 202)
        self.assertIn("adminPass", r.json()["server"])
        server = self.server(server_id)
        self.assertEqual((server["status"], server["name"], server["image"]["id"],
                          server["metadata"]), ("ACTIVE", "rebuilt", other, {"k": "v"}))
        self.assertFault(self.action(server_id, {"rebuild": {}}), 400, "badRequest")

    def test_create_image_and_backup(self):
        """createImage writes an image (Location below 2.45, image_id from 2.45);
        createBackup keeps `rotation` backups."""
        server_id = self.new_server()
        r = self.action(server_id, {"createImage": {"name": "snap", "metadata": {"a": "b"}}})
        self.assertEqual(r.status, 202)
        image_id = r.header("Location").rsplit("/", 1)[1]
        image = self.get("/v2.1/images/" + image_id).json()["image"]
        self.assertEqual((image["name"], image["status"], image["metadata"]["a"]),
                         ("snap", "ACTIVE", "b"))
        self.assertEqual(image["metadata"]["instance_uuid"], server_id)
        r = self.action(server_id, {"createImage": {"name": "snap2"}}, version="2.45")
        self.assertTrue(minivan.is_uuid_like(r.json()["image_id"]))
        for i in range(3):
            self.action(server_id, {"createBackup": {"name": f"b{i}", "backup_type": "daily",
                                                     "rotation": 2}})
        backups = [i["name"] for i in self.get("/v2.1/images/detail?type=backup").json()
                   ["images"]]
        self.assertEqual(sorted(backups), ["b1", "b2"])
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")

    def test_shelve_unshelve(self):
        """shelve → SHELVED_OFFLOADED with no domain; unshelve → ACTIVE again."""
        server_id = self.new_server()
        self.action(server_id, {"shelve": None})
        server = self.server(server_id)
        self.assertEqual(server["status"], "SHELVED_OFFLOADED")
        self.assertFalse(self.app.driver.exists({"id": server_id, "instance_name": "x"}))
        self.action(server_id, {"unshelve": None})
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")
        self.assertEqual(self.domain_state(server_id), 1)
        images = [i["name"] for i in self.get("/v2.1/images").json()["images"]]
        self.assertNotIn("vm-shelved", images)

    def test_rescue_unrescue(self):
        """rescue boots the rescue disk with the server's disk attached; unrescue undoes it."""
        server_id = self.new_server()
        r = self.action(server_id, {"rescue": {"adminPass": "secret"}})
        self.assertEqual(r.json(), {"adminPass": "secret"})
        self.assertEqual(self.server(server_id)["status"], "RESCUE")
        xml = self.app.driver.conn.lookupByUUIDString(server_id).XMLDesc(0)
        self.assertIn("disk.rescue", xml)
        self.action(server_id, {"unrescue": None})
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")
        xml = self.app.driver.conn.lookupByUUIDString(server_id).XMLDesc(0)
        self.assertNotIn("disk.rescue", xml)

    def test_stable_device_rescue(self):
        """A rescue image with hw_rescue_device/hw_rescue_bus: the rescue disk joins the
        server's disks (which keep their places) on that bus and boots first; unrescue
        restores the domain.  An unknown device is 400."""
        import xml.etree.ElementTree as ET
        server_id = self.new_server()
        dom = self.app.driver.conn.lookupByUUIDString(server_id)

        def disks():
            root = ET.fromstring(dom.XMLDesc(0))
            return root.find("os/boot"), sorted(
                (d.get("device"), d.find("target").get("dev"), d.find("target").get("bus"),
                 d.find("boot").get("order") if d.find("boot") is not None else None,
                 os.path.basename(d.find("source").get("file")))
                for d in root.findall("devices/disk"))
        for props, device, target, bus in (
                ({"hw_rescue_device": "cdrom", "hw_rescue_bus": "ide"}, "cdrom", "hda", "ide"),
                ({"hw_rescue_bus": "scsi"}, "disk", "sda", "scsi"),
                ({"hw_rescue_device": "disk"}, "disk", "vdb", "virtio"),
                ({"hw_rescue_device": "disk", "hw_rescue_bus": "usb"}, "disk", "sda", "usb")):
            self.app.store.commit([["set", ["images", self.image_id, "properties"], props]])
            r = self.action(server_id, {"rescue": {"rescue_image_ref": self.image_id}})
            self.assertEqual(r.status, 200, r.raw)
            self.assertEqual(self.server(server_id)["status"], "RESCUE")
            boot, found = disks()
            self.assertIsNone(boot)
            self.assertEqual(found, sorted([("disk", "vda", "virtio", None, "disk"),
                                            (device, target, bus, "1", "disk.rescue")]))
            self.assertEqual(self.action(server_id, {"unrescue": None}).status, 202)
            self.assertEqual(self.server(server_id)["status"], "ACTIVE")
            boot, found = disks()
            self.assertEqual((boot.get("dev"), found), ("hd", [
                ("disk", "vda", "virtio", None, "disk")]))
        self.app.store.commit([["set", ["images", self.image_id, "properties"],
                                {"hw_rescue_device": "floppy"}]])
        self.assertFault(self.action(server_id, {"rescue": {
            "rescue_image_ref": self.image_id}}), 400, "badRequest",
            "rescue device 'floppy' is not supported")
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")

    def test_trigger_crash_dump_and_change_password(self):
        """trigger_crash_dump (2.17) is 202; changePassword needs a guest agent, else 409."""
        server_id = self.new_server()
        self.assertFault(self.action(server_id, {"trigger_crash_dump": None}), 404,
                         "itemNotFound")
        self.assertEqual(self.action(server_id, {"trigger_crash_dump": None},
                                     version="2.17").status, 202)
        # as Nova: only a guest whose image asks for the QEMU guest agent has its channel
        self.assertFault(self.action(server_id, {"changePassword": {"adminPass": "x"}}), 409,
                         "conflictingRequest", "QEMU guest agent is not enabled")
        r = self.post(f"/v2.1/images/{self.image_id}/metadata",
                      {"metadata": {"hw_qemu_guest_agent": "yes"}}, version="2.35")
        self.assertEqual(r.status, 200, r.raw)
        server_id = self.new_server()
        # libvirt's test hypervisor answers for a guest agent; a QEMU guest without one is 409
        self.assertEqual(self.action(server_id, {"changePassword": {"adminPass": "x"}}).status,
                         202)
        self.app.driver.set_admin_password = lambda *a: (_ for _ in ()).throw(
            minivan.DriverError("no guest agent"))
        self.assertFault(self.action(server_id, {"changePassword": {"adminPass": "x"}}), 409,
                         "conflictingRequest")
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")

    def test_instance_actions(self):
        """Every operation is an instance action with events."""
        server_id = self.new_server()
        self.action(server_id, {"os-stop": None})
        actions = self.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()
        self.assertEqual([a["action"] for a in actions["instanceActions"]], ["stop", "create"])
        rid = actions["instanceActions"][1]["request_id"]
        shown = self.get(f"/v2.1/servers/{server_id}/os-instance-actions/{rid}").json()
        events = shown["instanceAction"]["events"]
        self.assertEqual(events[0]["result"], "Success")
        self.assertFault(self.get(f"/v2.1/servers/{server_id}/os-instance-actions/req-x"), 404,
                         "itemNotFound")

    def test_hypervisor_unreachable_answers_503(self):
        """With the hypervisor gone, reads go on and mutations answer 503."""
        server_id = self.new_server()
        self.app.driver.close()
        self.app.driver.uri = "qemu+unix:///system?socket=/nonexistent"
        self.assertEqual(self.get("/v2.1/servers/" + server_id).status, 200)
        self.assertFault(self.action(server_id, {"os-stop": None}), 503, "serviceUnavailable")
        self.assertFault(self.post_server(), 503, "serviceUnavailable")


class ServerSubresourceTests(ServerTestCase):
    def test_unbuilt_route_is_501(self):
        """A route not built yet (a server's shares) answers 501 notImplemented."""
        server_id = self.post_server().json()["server"]["id"]
        self.assertFault(self.get(f"/v2.1/servers/{server_id}/shares", version="2.97"),
                         501, "notImplemented")

    def test_metadata(self):
        """Server metadata: set, merge, replace, item CRUD and the item limit."""
        server_id = self.new_server(metadata={"a": "1"})
        base = f"/v2.1/servers/{server_id}/metadata"
        self.assertEqual(self.get(base).json(), {"metadata": {"a": "1"}})
        self.assertEqual(self.post(base, {"metadata": {"b": "2"}}).json(),
                         {"metadata": {"a": "1", "b": "2"}})
        self.assertEqual(self.put(base, {"metadata": {"c": "3"}}).json(),
                         {"metadata": {"c": "3"}})
        self.assertEqual(self.put(base + "/d", {"meta": {"d": "4"}}).json(),
                         {"meta": {"d": "4"}})
        self.assertEqual(self.get(base + "/d").json(), {"meta": {"d": "4"}})
        self.assertFault(self.put(base + "/d", {"meta": {"e": "4"}}), 400, "badRequest")
        self.assertEqual(self.delete(base + "/d").status, 204)
        self.assertFault(self.get(base + "/d"), 404, "itemNotFound")
        self.put("/v2.1/os-quota-sets/admin", {"quota_set": {"metadata_items": 2}})
        self.assertFault(self.post(base, {"metadata": {"x": "1", "y": "2"}}), 403, "forbidden")

    def test_tags(self):
        """Server tags API from 2.26."""
        server_id = self.new_server()
        base = f"/v2.1/servers/{server_id}/tags"
        self.assertFault(self.get(base), 404, "itemNotFound")
        v = "2.26"
        self.assertEqual(self.put(base, {"tags": ["a", "b"]}, version=v).json(),
                         {"tags": ["a", "b"]})
        r = self.put(base + "/c", None, version=v)
        self.assertEqual(r.status, 201)
        self.assertTrue(r.header("Location").endswith("/tags/c"))
        self.assertEqual(self.put(base + "/c", None, version=v).status, 204)
        self.assertEqual(self.get(base + "/c", version=v).status, 204)
        self.assertEqual(self.delete(base + "/c", version=v).status, 204)
        self.assertFault(self.get(base + "/c", version=v), 404, "itemNotFound")
        self.assertFault(self.put(base, {"tags": ["x" * 61]}, version=v), 400, "badRequest")
        self.assertFault(self.put(base, {"tags": [str(i) for i in range(51)]}, version=v), 400,
                         "badRequest")
        self.assertEqual(self.delete(base, version=v).status, 204)
        self.assertEqual(self.get(base, version=v).json(), {"tags": []})

    def test_ips(self):
        """GET ips and ips/{network}."""
        server_id = self.new_server()
        ips = self.get(f"/v2.1/servers/{server_id}/ips").json()["addresses"]
        self.assertEqual(list(ips), ["default"])
        self.assertEqual(set(ips["default"][0]), {"version", "addr"})
        self.assertEqual(self.get(f"/v2.1/servers/{server_id}/ips/default").json(),
                         {"default": ips["default"]})
        self.assertFault(self.get(f"/v2.1/servers/{server_id}/ips/other"), 404, "itemNotFound")

    def test_blank_local_disks_from_block_device_mappings(self):
        """Blank local mappings become extra disks within the flavor's ephemeral size."""
        self.post("/v2.1/flavors", {"flavor": {"name": "eph", "id": "eph", "ram": 512,
                                               "vcpus": 1, "disk": 1,
                                               "OS-FLV-EXT-DATA:ephemeral": 3, "swap": 256}})
        bdm = [{"source_type": "image", "destination_type": "local", "boot_index": 0,
                "uuid": self.image_id},
               {"source_type": "blank", "destination_type": "local", "volume_size": 1},
               {"source_type": "blank", "destination_type": "local", "volume_size": 2},
               {"source_type": "blank", "destination_type": "local", "guest_format": "swap",
                "volume_size": 128}]
        server_id = self.new_server(flavorRef="eph", block_device_mapping_v2=bdm)
        directory = os.path.join(self.app.conf["instances_dir"], server_id)
        self.assertEqual(minivan.virtual_size(os.path.join(directory, "disk.eph1")), 2 * 2 ** 30)
        self.assertEqual(minivan.virtual_size(os.path.join(directory, "disk.swap")),
                         128 * 2 ** 20)
        xml = self.app.driver.conn.lookupByUUIDString(server_id).XMLDesc(0)
        self.assertIn("disk.eph0", xml)
        self.assertIn("<target dev='vdd' bus='virtio'/>", xml)
        too_big = bdm[:1] + [{"source_type": "blank", "destination_type": "local",
                              "volume_size": 4}]
        self.assertFault(self.post_server(flavorRef="eph", block_device_mapping_v2=too_big),
                         400, "badRequest", "larger than the instance type allows")

    def test_fixed_ip_is_reserved_in_the_network(self):
        """A requested fixed_ip becomes a DHCP reservation for the port's MAC, removed again
        when the server is deleted."""
        server_id = self.new_server(version="2.37", networks=[
            {"uuid": TEST_NETWORK_ID, "fixed_ip": "192.168.122.77"}])
        addr = self.server(server_id)["addresses"]["default"][0]
        self.assertEqual(addr["addr"], "192.168.122.77")
        xml = self.app.driver.conn.networkLookupByName("default").XMLDesc(0)
        self.assertIn(f"<host mac='{addr['OS-EXT-IPS-MAC:mac_addr']}' ip='192.168.122.77'/>",
                      xml)
        self.delete("/v2.1/servers/" + server_id)
        self.app.compute.wait_idle()
        self.assertNotIn("192.168.122.77",
                         self.app.driver.conn.networkLookupByName("default").XMLDesc(0))

    def test_networks_none_and_by_uuid(self):
        """networks 'none' gives no NICs; a network's UUID selects it."""
        bare = self.new_server(name="bare", version="2.37", networks="none")
        self.assertEqual(self.server(bare)["addresses"], {})
        net = self.new_server(name="net", version="2.37", networks=[{"uuid": TEST_NETWORK_ID}])
        self.assertIn("default", self.server(net)["addresses"])
        self.assertFault(self.post_server(name="many", version="2.37", max_count=2,
                                          networks=[{"port": str(uuid.uuid4())}]),
                         400, "badRequest", "single configured port ID")

    def test_builtin_iso_writer(self):
        """minivan's own ISO 9660 writer: label config-2 and Joliet names (read by isoinfo)."""
        if not shutil.which("isoinfo"):
            skip_or_fail(self, "isoinfo not installed (apt install genisoimage)")
        files = {"openstack/latest/meta_data.json": b'{"uuid": "u"}',
                 "openstack/latest/user_data": b"#!/bin/sh\n", "ec2/latest/meta-data.json": b"{}"}
        path = os.path.join(self.tmp, "cd.iso")
        minivan.write_iso(path, files, "config-2")
        info = subprocess.run(["isoinfo", "-d", "-i", path], capture_output=True, text=True)
        self.assertIn("Volume id: config-2", info.stdout)
        self.assertIn("Joliet", info.stdout)
        listing = subprocess.run(["isoinfo", "-J", "-f", "-i", path], capture_output=True,
                                 text=True).stdout.split()
        self.assertIn("/openstack/latest/meta_data.json", listing)
        for name, data in files.items():
            got = subprocess.run(["isoinfo", "-J", "-i", path, "-x", "/" + name],
                                 capture_output=True).stdout
            self.assertEqual(got, data)

    def test_config_drive_contents(self):
        """The config drive carries meta_data (keys, uuid), user_data and personality files."""
        self.post("/v2.1/os-keypairs", {"keypair": {"name": "k", "public_key": SAMPLE_KEY}})
        server_id = self.new_server(config_drive=True, key_name="k",
                                    user_data=base64.b64encode(b"#cloud-config\n").decode(),
                                    personality=[{"path": "/etc/motd",
                                                  "contents": base64.b64encode(b"hi").decode()}])
        server = self.store.data["servers"][server_id]
        files = minivan.config_drive_files(self.app, server, "pw")
        meta = json.loads(files["openstack/latest/meta_data.json"])
        self.assertEqual((meta["uuid"], meta["public_keys"]["k"], meta["admin_pass"]),
                         (server_id, SAMPLE_KEY, "pw"))
        self.assertEqual(files["openstack/latest/user_data"], b"#cloud-config\n")
        self.assertEqual(files["openstack" + meta["files"][0]["content_path"]], b"hi")
        self.assertEqual(self.server(server_id)["config_drive"], "True")
        self.assertTrue(os.path.exists(os.path.join(self.app.conf["instances_dir"], server_id,
                                                    "disk.config")))

    def test_interfaces(self):
        """os-interface lists and shows the server's ports; the test hypervisor cannot
        hot-plug, so an attach there is 409 and nothing changes."""
        server_id = self.new_server()
        items = self.get(f"/v2.1/servers/{server_id}/os-interface", version="2.70").json()
        port = items["interfaceAttachments"][0]
        self.assertEqual((port["net_id"], port["port_state"], port["tag"]),
                         (TEST_NETWORK_ID, "ACTIVE", None))
        shown = self.get(f"/v2.1/servers/{server_id}/os-interface/{port['port_id']}").json()
        self.assertEqual(shown["interfaceAttachment"]["mac_addr"], port["mac_addr"])
        self.assertFault(self.get(f"/v2.1/servers/{server_id}/os-interface/nope"), 404,
                         "itemNotFound")
        self.assertFault(self.post(f"/v2.1/servers/{server_id}/os-interface",
                                   {"interfaceAttachment": {"net_id": TEST_NETWORK_ID}}), 409,
                         "conflictingRequest")
        self.assertFault(self.post(f"/v2.1/servers/{server_id}/os-interface",
                                   {"interfaceAttachment": {"bogus": 1}}), 400, "badRequest")
        self.assertEqual(len(self.get(f"/v2.1/servers/{server_id}/os-interface").json()
                             ["interfaceAttachments"]), 1)
        # the refused attach leaves no instance action (a rejected request changes nothing)
        actions = self.get(f"/v2.1/servers/{server_id}/os-instance-actions").json()
        self.assertEqual([a for a in actions["instanceActions"]
                          if a["action"] == "attach_interface"], [])
        act = f"/v2.1/servers/{server_id}/action"
        self.assertFault(self.post(act, {"addFixedIp": {"networkId": TEST_NETWORK_ID}}),
                         409, "conflictingRequest")
        self.assertFault(self.post(act, {"addFixedIp": {"networkId": "nope"}}), 400,
                         "badRequest", "Network nope could not be found.")
        self.assertFault(self.post(act, {"addFixedIp": {"networkId": TEST_NETWORK_ID}},
                                   version="2.44"), 404, "itemNotFound")
        self.assertFault(self.post(act, {"removeFixedIp": {"address": "10.9.9.9"}}), 400,
                         "badRequest", "doesn't have fixed IP '10.9.9.9'")
        self.assertFault(self.post(act, {"removeFixedIp": {"address": "not-an-ip"}}), 400,
                         "badRequest")
        self.assertFault(self.post(act, {"removeFixedIp": {}}), 400, "badRequest")
        self.assertFault(self.post(act, {"addFixedIp": {"networkId": TEST_NETWORK_ID}},
                                   token="other:other"), 404, "itemNotFound")

    def test_diagnostics_password_topology_security_groups(self):
        """diagnostics (admin; 2.48 format), os-server-password, topology, security groups."""
        server_id = self.new_server()
        old = self.get(f"/v2.1/servers/{server_id}/diagnostics").json()
        self.assertIn("memory", old)
        new = self.get(f"/v2.1/servers/{server_id}/diagnostics", version="2.48").json()
        self.assertEqual((new["state"], new["driver"], new["num_nics"]), ("running", "libvirt", 1))
        self.assertFault(self.get(f"/v2.1/servers/{server_id}/diagnostics", token="u:admin"),
                         403, "forbidden")
        self.assertEqual(self.get(f"/v2.1/servers/{server_id}/os-server-password").json(),
                         {"password": ""})
        self.assertEqual(self.delete(f"/v2.1/servers/{server_id}/os-server-password").status,
                         204)
        self.assertEqual(self.get(f"/v2.1/servers/{server_id}/topology", version="2.78").json(),
                         {"nodes": [], "pagesize_kb": None})
        groups = self.get(f"/v2.1/servers/{server_id}/os-security-groups").json()
        self.assertEqual(groups["security_groups"][0]["name"], "default")


class ServerRestartTests(ServerTestCase):
    def test_simulated_servers_survive_restart(self):
        """test:/// domains are re-defined from the state at start-up with their power state."""
        running = self.new_server(name="running")
        stopped = self.new_server(name="stopped")
        self.action(stopped, {"os-stop": None})
        self.restart_app()
        self.app.compute.reconcile()
        self.assertEqual(self.domain_state(running), 1)
        self.assertEqual(self.domain_state(stopped), 5)
        self.assertEqual(self.server(running)["status"], "ACTIVE")
        self.assertEqual(self.server(stopped)["status"], "SHUTOFF")
        self.assertEqual(self.action(stopped, {"os-start": None}).status, 202)

    def test_interrupted_build_and_delete(self):
        """A build cut by a crash becomes ERROR with nothing left; a cut delete finishes."""
        building = self.new_server(name="b")
        deleting = self.new_server(name="d")
        self.store.commit([["set", ["servers", building, "vm_state"], "building"],
                           ["set", ["servers", deleting, "task_state"], "deleting"]])
        self.restart_app()
        self.app.compute.reconcile()
        server = self.server(building)
        self.assertEqual(server["status"], "ERROR")
        self.assertIn("interrupted", server["fault"]["message"])
        self.assertFault(self.get("/v2.1/servers/" + deleting), 404, "itemNotFound")

    def test_power_sync_notices_a_guest_that_stopped(self):
        """A domain that stops behind minivan's back makes the server SHUTOFF."""
        server_id = self.new_server()
        self.app.driver.conn.lookupByUUIDString(server_id).destroy()
        self.app.compute.sync_power_states()
        self.assertEqual(self.server(server_id)["status"], "SHUTOFF")

    def test_foreign_domains_are_left_alone(self):
        """A domain minivan did not create is never touched."""
        conn = self.app.driver.conn
        xml = ("<domain type='test'><name>foreign</name><memory>1024</memory><vcpu>1</vcpu>"
               "<os><type>hvm</type></os></domain>")
        conn.defineXML(xml).create()
        self.new_server()
        self.app.compute.reconcile()
        self.app.compute.sync_power_states()
        self.assertEqual(conn.lookupByName("foreign").state()[0], 1)
        self.assertNotIn(conn.lookupByName("foreign").UUIDString(),
                         self.app.driver.own_domains())


# -- real QEMU guests under libvirtd ---------------------------------------------------------

GUEST_IMAGE = os.environ.get("MINIVAN_TEST_GUEST_IMAGE", "")
GUEST_NETWORK = os.environ.get("MINIVAN_TEST_LIBVIRT_NETWORK", "minivan-test")


def websocket_connect(url, timeout=30):
    """(socket, HTTP status, bytes read past the headers) of a WebSocket handshake."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n")
                 .encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return sock, status, rest


def websocket_refused(url):
    """True when the console proxy refuses the URL's token as Nova's proxies do (and
    Tempest's test_novnc_bad_token expects): the WebSocket opens (101), then closes with
    no data, at most an empty close frame.  Otherwise the HTTP status (or the data)."""
    sock, status, rest = websocket_connect(url)
    try:
        if status != 101:
            return status
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            rest += chunk
    finally:
        sock.close()
    return True if rest in (b"", b"\x88\x00") else rest


def websocket_send(sock, payload):
    mask = os.urandom(4)
    size = len(payload)
    head = bytes([0x82, 0x80 | size]) if size < 126 else \
        bytes([0x82, 0x80 | 126]) + size.to_bytes(2, "big")
    sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def websocket_read_until(sock, wanted, data=b"", timeout=30):
    """The payloads of server frames until wanted appears in them."""
    deadline = time.time() + timeout
    text = b""
    while wanted not in text and time.time() < deadline:
        while len(data) >= 2:
            size, start = data[1] & 0x7F, 2
            if size == 126:
                size, start = int.from_bytes(data[2:4], "big"), 4
            if len(data) < start + size:
                break
            text += data[start:start + size]
            data = data[start + size:]
        if wanted in text:
            break
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return text


def wait_until(predicate, timeout=120, interval=0.5, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def real_guest_connection():
    """A connection to the libvirtd of tools/libvirt-up.sh, whose isolated test network
    the real guests join; None where there is none, or no guest image."""
    if not (GUEST_IMAGE and os.path.exists(GUEST_IMAGE) and have_libvirt()):
        return None
    libvirt = minivan.import_libvirt()
    try:
        conn = libvirt.open("qemu:///system")
        conn.networkLookupByName(GUEST_NETWORK)
    except libvirt.libvirtError:
        return None
    return conn


GUEST_SSH_CLIENT = r"""
import json, sys
from tempest.common.utils.linux.remote_client import RemoteClient
key, meta = sys.argv[1], json.loads(sys.argv[2])
client = RemoteClient("127.0.0.1", "cirros", pkey=key)
client.validate_authentication()
out = {"hostname": client.exec_command("hostname").strip(),
       "disks": client.get_disks(),
       "partitions": client.exec_command("cat /proc/partitions"),
       "mac": client.get_mac_address(),
       "whoami": client.exec_command("sudo id -u").strip()}
out["nic"] = client.get_nic_name_by_mac(out["mac"]).strip()
client.make_fs("vdb", fs="ext4")
client.mount("vdb")
client.exec_command("sudo sh -c 'echo kept > /mnt/timestamp'")
client.umount()
client.mount("vdb")
out["read_back"] = client.exec_command("sudo cat /mnt/timestamp").strip()
out["fs"] = client.exec_command("sudo blkid -o value -s TYPE /dev/vdb").strip()
client.umount()
client.mount_config_drive()
out["config_drive_uuid"] = json.loads(client.exec_command(
    "cat /mnt/openstack/latest/meta_data.json"))["uuid"]
client.unmount_config_drive()
client.write_to_console("tempest was here")
print(json.dumps(out))
"""


# -- guest shape: Nova's own libvirt driver as the oracle ----------------------------

NOVA_VENV = os.environ.get("MINIVAN_NOVA_VENV") or os.path.join(HERE, ".venv-nova")
NOVA_PORT_ID = "6f0c1e9a-0d7b-4e55-9b1e-000000000000"    # tools/nova-guest.py's first port
Q35 = {"hw_machine_type": "q35"}

# (name, flavor extra specs, image properties, settings) of every guest compared; settings:
# virt_type, config_drive, vcpus, ephemeral, swap, vnc, machine (--hw-machine-type),
# cpu_mode, cpu_models, uefi / secure_boot (the host's firmware)
# made-up hosts (Nova's fake libvirt builds their capabilities): two cells of four CPUs;
# two cells of two cores with two threads each; two cells with 2 MiB and 1 GiB pages
NUMA_HOST = {"numa_host": {"cpu_nodes": 2, "cpu_cores": 4, "cpu_threads": 1,
                           "kB_mem": 8388608}}
SMT_HOST = {"numa_host": {"cpu_nodes": 2, "cpu_cores": 2, "cpu_threads": 2,
                          "kB_mem": 8388608}}
PAGES_HOST = {"numa_host": {"cpu_nodes": 2, "cpu_cores": 4, "cpu_threads": 1,
                            "kB_mem": 8388608,
                            "mempages": [[[4, 524288], [2048, 512], [1048576, 1]],
                                         [[4, 524288], [2048, 1024], [1048576, 2]]]}}

GUEST_CASES = [
    ("defaults on qemu", {}, {}, {}),
    ("defaults on kvm", {}, {}, {"virt_type": "kvm"}),
    ("no graphics", {}, {}, {"vnc": False}),
    ("no graphics, usb model", {}, {"hw_usb_model": "qemu-xhci"}, {"vnc": False}),
    ("config drive", {}, {}, {"config_drive": True}),
    ("sata disks, q35, config drive", {}, dict(Q35, hw_disk_bus="sata"),
     {"config_drive": True}),
    ("ide disks, config drive", {}, {"hw_disk_bus": "ide"}, {"config_drive": True}),
    ("virtio-scsi", {}, {"hw_disk_bus": "scsi", "hw_scsi_model": "virtio-scsi"},
     {"config_drive": True}),
    ("scsi cdrom", {}, {"hw_cdrom_bus": "scsi", "hw_scsi_model": "virtio-scsi"},
     {"config_drive": True}),
    ("usb disk", {}, {"hw_disk_bus": "usb"}, {}),
    ("ephemeral and swap on sata", {}, {"hw_disk_bus": "sata"},
     {"ephemeral": 1, "swap": 256}),
    ("e1000 NIC", {}, {"hw_vif_model": "e1000"}, {}),
    ("legacy NIC name", {}, {"hw_vif_model": "VirtualE1000"}, {}),
    ("rtl8139 on kvm", {}, {"hw_vif_model": "rtl8139"}, {"virt_type": "kvm"}),
    ("multiqueue on kvm", {"hw:vif_multiqueue_enabled": "true"}, {},
     {"virt_type": "kvm", "vcpus": 4}),
    ("video vga with vram", {"hw_video:ram_max_mb": "64"},
     {"hw_video_model": "vga", "hw_video_ram": "16"}, {}),
    ("video none", {}, {"hw_video_model": "none"}, {}),
    ("virtio input bus", {}, {"hw_input_bus": "virtio"}, {}),
    ("guest agent", {}, {"hw_qemu_guest_agent": "yes"}, {}),
    ("no rng", {"hw_rng:allowed": "False"}, {}, {}),
    ("rng rate", {"hw_rng:rate_bytes": "1024", "hw_rng:rate_period": "2"},
     {"hw_rng_model": "virtio"}, {}),
    ("watchdog from the flavor", {"hw:watchdog_action": "reset"}, {}, {}),
    ("watchdog from the image", {"hw:watchdog_action": "reset"},
     {"hw_watchdog_action": "poweroff"}, {}),
    ("watchdog disabled by the image", {"hw:watchdog_action": "pause"},
     {"hw_watchdog_action": "disabled"}, {}),
    ("boot menu from the flavor", {"hw:boot_menu": "true"}, {}, {}),
    ("boot menu off in the image", {"hw:boot_menu": "true"}, {"hw_boot_menu": "false"}, {}),
    ("windows on kvm", {}, {"os_type": "windows"}, {"virt_type": "kvm"}),
    ("Windows on qemu", {}, {"os_type": "Windows"}, {}),
    ("windows, hidden hypervisor", {"hw:hide_hypervisor_id": "true"},
     {"os_type": "windows"}, {"virt_type": "kvm"}),
    ("hidden hypervisor from the image", {}, {"img_hide_hypervisor_id": "true"}, {}),
    ("pmu off", {"hw:pmu": "false"}, {}, {}),
    ("hpet on kvm", {}, {"hw_time_hpet": "true"}, {"virt_type": "kvm"}),
    ("uefi", {}, {"hw_firmware_type": "uefi"}, {}),
    ("uefi q35 secure boot", {"os:secure_boot": "required"},
     dict(Q35, hw_firmware_type="uefi"), {}),
    ("uefi secure boot optional on pc", {}, {"hw_firmware_type": "uefi",
                                             "os_secure_boot": "optional"}, {}),
    ("uefi secure boot optional without host support", {},
     dict(Q35, hw_firmware_type="uefi", os_secure_boot="optional"), {"secure_boot": False}),
    ("uefi stateless", {}, {"hw_firmware_type": "uefi", "hw_firmware_stateless": "true"}, {}),
    ("machine type from the option", {}, {}, {"machine": "x86_64=q35", "config_drive": True}),
    ("topology: 4 vcpus", {}, {}, {"vcpus": 4}),
    ("topology: flavor sockets", {"hw:cpu_sockets": "2"}, {}, {"vcpus": 4}),
    ("topology: flavor threads", {"hw:cpu_threads": "2"}, {}, {"vcpus": 8}),
    ("topology: flavor max sockets", {"hw:cpu_max_sockets": "1"}, {}, {"vcpus": 4}),
    ("topology: image replaces flavor", {"hw:cpu_sockets": "2"}, {"hw_cpu_cores": "2"},
     {"vcpus": 8}),
    ("topology: image max below flavor max", {"hw:cpu_max_sockets": "4"},
     {"hw_cpu_max_sockets": "2", "hw_cpu_max_threads": "1"}, {"vcpus": 4}),
    ("topology: impossible preference", {"hw:cpu_cores": "4"}, {}, {"vcpus": 6}),
    ("cpu host-passthrough", {}, {}, {"cpu_mode": "host-passthrough"}),
    ("cpu custom model", {}, {}, {"cpu_mode": "custom", "cpu_models": ["Penryn"]}),
    ("cpu none", {}, {}, {"cpu_mode": "none", "vcpus": 2}),
    ("cpu time limits", {"quota:cpu_shares": "2048", "quota:cpu_period": "20000",
                         "quota:cpu_quota": "10000"}, {}, {}),
    ("disk limits", {"quota:disk_read_bytes_sec": "10240000",
                     "quota:disk_write_bytes_sec": "2048000",
                     "quota:disk_total_iops_sec": "500"}, {}, {"config_drive": True}),
    ("NIC limits", {"quota:vif_inbound_average": "1024", "quota:vif_inbound_peak": "2048",
                    "quota:vif_inbound_burst": "512", "quota:vif_outbound_average": "512",
                    "quota:vif_outbound_peak": "1024"}, {}, {}),
    ("NIC peak without average", {"quota:vif_outbound_peak": "1024"}, {}, {}),
    ("TPM 2.0 CRB from the flavor", {"hw:tpm_version": "2.0", "hw:tpm_model": "tpm-crb"},
     {}, {"tpm": True}),
    ("TPM 1.2 from the image", {}, {"hw_tpm_version": "1.2"}, {"tpm": True}),
    ("TPM from both, the same", {"hw:tpm_version": "2.0"},
     dict(Q35, hw_tpm_version="2.0", hw_firmware_type="uefi"), {"tpm": True}),
    ("dedicated CPUs", {"hw:cpu_policy": "dedicated"}, {},
     dict(NUMA_HOST, vcpus=4, ram=2048, cpu_dedicated_set="0-7")),
    ("dedicated CPUs, legacy host", {"hw:cpu_policy": "dedicated"}, {},
     dict(NUMA_HOST, vcpus=2)),
    ("two guest cells", {"hw:numa_nodes": "2"}, {}, dict(NUMA_HOST, vcpus=4, ram=2048)),
    ("two guest cells, shared set", {"hw:numa_nodes": "2"}, {},
     dict(NUMA_HOST, vcpus=4, ram=2048, cpu_shared_set="0-1,4-5")),
    ("uneven cells", {"hw:numa_nodes": "2", "hw:numa_cpus.0": "0", "hw:numa_cpus.1": "1-2",
                      "hw:numa_mem.0": "512", "hw:numa_mem.1": "1536"}, {},
     dict(NUMA_HOST, vcpus=3, ram=2048)),
    ("2M pages", {"hw:mem_page_size": "2048"}, {}, dict(PAGES_HOST, vcpus=2, ram=1024)),
    ("large pages", {"hw:mem_page_size": "large"}, {}, dict(PAGES_HOST, vcpus=2, ram=2048)),
    ("any pages from the image", {"hw:mem_page_size": "any"}, {"hw_mem_page_size": "2MB"},
     dict(PAGES_HOST, vcpus=2, ram=1024)),
    ("small pages, locked", {"hw:mem_page_size": "small", "hw:locked_memory": "true"}, {},
     dict(PAGES_HOST, vcpus=1, ram=1024)),
    ("realtime vCPUs", {"hw:cpu_policy": "dedicated", "hw:cpu_realtime": "yes",
                        "hw:cpu_realtime_mask": "^0"}, {},
     dict(NUMA_HOST, vcpus=4, ram=2048, cpu_dedicated_set="0-7")),
    ("isolated emulator threads", {"hw:cpu_policy": "dedicated",
                                   "hw:emulator_threads_policy": "isolate"}, {},
     dict(NUMA_HOST, vcpus=2, cpu_dedicated_set="0-7")),
    ("shared emulator threads", {"hw:cpu_policy": "dedicated",
                                 "hw:emulator_threads_policy": "share"}, {},
     dict(NUMA_HOST, vcpus=2, cpu_dedicated_set="2-7", cpu_shared_set="0-1")),
    ("mixed CPUs", {"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": "^0"}, {},
     dict(NUMA_HOST, vcpus=3, ram=1536, cpu_dedicated_set="2-3,6-7",
          cpu_shared_set="0-1,4-5")),
    ("thread siblings preferred", {"hw:cpu_policy": "dedicated"}, {},
     dict(SMT_HOST, vcpus=3, cpu_dedicated_set="0-7")),
    ("thread isolation", {"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "isolate"},
     {}, dict(SMT_HOST, vcpus=2)),
    ("threads required", {"hw:cpu_policy": "dedicated", "hw:cpu_thread_policy": "require"},
     {}, dict(SMT_HOST, vcpus=2, cpu_dedicated_set="0-7")),
    ("a guest without cells on a shared set", {}, {},
     dict(NUMA_HOST, vcpus=2, cpu_shared_set="0-3")),
    ("everything at once", {"hw:cpu_sockets": "1", "hw:watchdog_action": "none",
                            "quota:disk_total_bytes_sec": "1000000",
                            "quota:vif_outbound_average": "100"},
     dict(Q35, hw_disk_bus="sata", hw_vif_model="e1000e", hw_firmware_type="uefi",
          os_type="windows", hw_qemu_guest_agent="true", hw_video_model="qxl"),
     {"virt_type": "kvm", "vcpus": 2, "config_drive": True, "ephemeral": 1}),
]

# what Nova refuses, and at which stage: the API (400) or the build (ERROR)
GUEST_REFUSALS = [
    ("dedicated CPUs beyond a cell", {"hw:cpu_policy": "dedicated",
                                      "hw:emulator_threads_policy": "isolate"}, {},
     dict(NUMA_HOST, vcpus=4, ram=2048, cpu_dedicated_set="0-7")),
    ("dedicated CPUs on a shared-only host", {"hw:cpu_policy": "dedicated"}, {},
     dict(NUMA_HOST, vcpus=2, cpu_shared_set="0-7")),
    ("shared guest cells on a dedicated-only host", {"hw:numa_nodes": "1"}, {},
     dict(NUMA_HOST, vcpus=2, cpu_dedicated_set="0-7")),
    ("pages of a size the host lacks", {"hw:mem_page_size": "1024"}, {},
     dict(PAGES_HOST, vcpus=1, ram=1024)),
    ("more huge pages than free", {"hw:mem_page_size": "1GB"}, {},
     dict(PAGES_HOST, vcpus=1, ram=4096)),
    ("more guest cells than host cells", {"hw:numa_nodes": "4"}, {},
     dict(NUMA_HOST, vcpus=4, ram=2048)),
    ("threads required without SMT", {"hw:cpu_policy": "dedicated",
                                      "hw:cpu_thread_policy": "require"}, {},
     dict(NUMA_HOST, vcpus=2, cpu_dedicated_set="0-7")),
    ("realtime with shared emulator threads, no shared set",
     {"hw:cpu_policy": "dedicated", "hw:cpu_realtime": "yes", "hw:cpu_realtime_mask": "^0",
      "hw:emulator_threads_policy": "share"}, {},
     dict(NUMA_HOST, vcpus=2, cpu_dedicated_set="0-7")),
    ("unknown disk bus", {}, {"hw_disk_bus": "floppy"}, {}),
    ("xen disk bus", {}, {"hw_disk_bus": "xen"}, {}),
    ("unknown NIC", {}, {"hw_vif_model": "tulip"}, {}),
    ("NIC of another hypervisor", {}, {"hw_vif_model": "netfront"}, {}),
    ("lan9118 on kvm", {}, {"hw_vif_model": "lan9118"}, {"virt_type": "kvm"}),
    ("not an integer", {}, {"hw_video_ram": "lots"}, {}),
    ("unknown architecture", {}, {"hw_architecture": "z80"}, {}),
    ("unknown os_type", {}, {"os_type": "plan9"}, {}),
    ("config drive option", {}, {"img_config_drive": "always"}, {}),
    ("video memory above the flavor's", {"hw_video:ram_max_mb": "8"},
     {"hw_video_ram": "16"}, {}),
    ("video memory without a flavor maximum", {}, {"hw_video_ram": "16"}, {}),
    ("pmu conflict", {"hw:pmu": "true"}, {"hw_pmu": "false"}, {}),
    ("serial ports above the flavor's", {"hw:serial_port_count": "1"},
     {"hw_serial_port_count": "2"}, {}),
    ("topology: image max above flavor max", {"hw:cpu_max_sockets": "2"},
     {"hw_cpu_max_sockets": "4"}, {"vcpus": 4}),
    ("topology: image preference above max", {}, {"hw_cpu_max_cores": "2",
                                                  "hw_cpu_cores": "4"}, {"vcpus": 4}),
    ("topology: limits impossible", {"hw:cpu_max_sockets": "1", "hw:cpu_max_cores": "1",
                                     "hw:cpu_max_threads": "1"}, {}, {"vcpus": 2}),
    ("uefi on a host without it", {}, {"hw_firmware_type": "uefi"}, {"uefi": False}),
    ("secure boot required on pc", {}, {"hw_firmware_type": "uefi",
                                        "os_secure_boot": "required"}, {}),
    ("secure boot conflict", {"os:secure_boot": "disabled"},
     dict(Q35, hw_firmware_type="uefi", os_secure_boot="required"), {}),
    ("multiqueue conflict", {"hw:vif_multiqueue_enabled": "true"},
     {"hw_vif_multiqueue_enabled": "false"}, {"vcpus": 2}),
    ("TPM CRB needs 2.0", {"hw:tpm_version": "1.2", "hw:tpm_model": "tpm-crb"}, {},
     {"tpm": True}),
    ("TPM conflict", {"hw:tpm_version": "2.0"}, {"hw_tpm_version": "1.2"}, {"tpm": True}),
    ("CPU policy unknown", {}, {"hw_cpu_policy": "exclusive"}, {}),
    ("image CPU policy above the flavor's", {"hw:cpu_policy": "shared"},
     {"hw_cpu_policy": "dedicated"}, {}),
    ("image dedicated over mixed", {"hw:cpu_policy": "mixed", "hw:cpu_dedicated_mask": "^0"},
     {"hw_cpu_policy": "dedicated"}, {"vcpus": 2}),
    ("thread policy without pinning", {"hw:cpu_thread_policy": "isolate"}, {}, {}),
    ("image thread policy against the flavor's", {"hw:cpu_policy": "dedicated",
                                                  "hw:cpu_thread_policy": "isolate"},
     {"hw_cpu_thread_policy": "require"}, {}),
    ("isolated emulator threads without pinning", {"hw:emulator_threads_policy": "isolate"},
     {}, {}),
    ("dedicated mask without mixed", {"hw:cpu_dedicated_mask": "^0"}, {}, {"vcpus": 2}),
    ("mixed without a mask", {"hw:cpu_policy": "mixed"}, {}, {"vcpus": 2}),
    ("mixed mask pinning every vCPU", {"hw:cpu_policy": "mixed",
                                       "hw:cpu_dedicated_mask": "0-1"}, {}, {"vcpus": 2}),
    ("mixed mask beyond the vCPUs", {"hw:cpu_policy": "mixed",
                                     "hw:cpu_dedicated_mask": "1-3"}, {}, {"vcpus": 2}),
    ("realtime without pinning", {"hw:cpu_realtime": "yes", "hw:cpu_realtime_mask": "^0"},
     {}, {"vcpus": 2}),
    ("realtime on every vCPU", {"hw:cpu_policy": "dedicated", "hw:cpu_realtime": "yes"}, {},
     {"vcpus": 2}),
    ("NUMA nodes in both", {"hw:numa_nodes": "1"}, {"hw_numa_nodes": "1"}, {}),
    ("NUMA nodes zero", {}, {"hw_numa_nodes": "0"}, {}),
    ("NUMA asymmetric", {"hw:numa_nodes": "2"}, {}, {"vcpus": 3}),
    ("NUMA incomplete", {"hw:numa_nodes": "2", "hw:numa_cpus.0": "0"}, {}, {"vcpus": 2}),
    ("NUMA CPU out of range", {"hw:numa_nodes": "2", "hw:numa_cpus.0": "0",
                               "hw:numa_cpus.1": "1-2", "hw:numa_mem.0": "256",
                               "hw:numa_mem.1": "256"}, {}, {"vcpus": 2}),
    ("NUMA CPU twice", {"hw:numa_nodes": "2", "hw:numa_cpus.0": "0", "hw:numa_cpus.1": "0-1",
                        "hw:numa_mem.0": "256", "hw:numa_mem.1": "256"}, {}, {"vcpus": 2}),
    ("NUMA CPU unassigned", {"hw:numa_nodes": "2", "hw:numa_cpus.0": "0",
                             "hw:numa_cpus.1": "1", "hw:numa_mem.0": "256",
                             "hw:numa_mem.1": "256"}, {}, {"vcpus": 3}),
    ("NUMA memory sum", {"hw:numa_nodes": "2", "hw:numa_cpus.0": "0", "hw:numa_cpus.1": "1",
                         "hw:numa_mem.0": "256", "hw:numa_mem.1": "128"}, {}, {"vcpus": 2}),
    ("NUMA in the image over the flavor's", {"hw:numa_nodes": "1", "hw:numa_cpus.0": "0",
                                             "hw:numa_mem.0": "512"},
     {"hw_numa_cpus.0": "0", "hw_numa_mem.0": "512"}, {}),
    ("NUMA CPU set malformed", {}, {"hw_numa_nodes": "1", "hw_numa_cpus.0": "0-x",
                                    "hw_numa_mem.0": "512"}, {}),
    ("NUMA memory not a number", {}, {"hw_numa_nodes": "1", "hw_numa_cpus.0": "0",
                                      "hw_numa_mem.0": "half"}, {}),
    ("page size unknown", {"hw:mem_page_size": "huge"}, {}, {}),
    ("image page size without the flavor's", {}, {"hw_mem_page_size": "large"}, {}),
    ("image page size against small", {"hw:mem_page_size": "small"},
     {"hw_mem_page_size": "2048"}, {}),
    ("locked memory without a page size", {"hw:locked_memory": "true"}, {}, {}),
    ("locked memory conflict", {"hw:locked_memory": "true", "hw:mem_page_size": "large"},
     {"hw_locked_memory": "false"}, {}),
]


def nova_guest_case(specs, props, settings):
    """A case for tools/nova-guest.py: Nova's options for the settings minivan has."""
    libvirt_conf = {"virt_type": settings.get("virt_type", "qemu"),
                    "swtpm_enabled": settings.get("tpm", False)}
    if settings.get("machine"):
        libvirt_conf["hw_machine_type"] = [settings["machine"]]
    if settings.get("cpu_mode"):
        libvirt_conf["cpu_mode"] = settings["cpu_mode"]
        libvirt_conf["cpu_models"] = settings.get("cpu_models", [])
    compute_conf = {key: settings[key] for key in ("cpu_dedicated_set", "cpu_shared_set")
                    if key in settings}
    return {"flavor": {"vcpus": settings.get("vcpus", 1), "ram": settings.get("ram", 512),
                       "disk": 1,
                       "ephemeral": settings.get("ephemeral", 0),
                       "swap": settings.get("swap", 0), "extra_specs": specs},
            "image": {"disk_format": "qcow2", "properties": props},
            "config_drive": settings.get("config_drive", False), "ports": 1,
            "conf": {"libvirt": libvirt_conf, "vnc": {"enabled": settings.get("vnc", True)},
                     "compute": compute_conf},
            "host": dict(settings.get("numa_host", {}), uefi=settings.get("uefi", True),
                         secure_boot=settings.get("secure_boot", True))}


def nova_guests(cases):
    """Nova's results for the cases (tools/nova-guest.py in Nova's virtualenv)."""
    python = os.path.join(NOVA_VENV, "bin", "python")
    out = subprocess.run([python, os.path.join(HERE, "tools", "nova-guest.py")],
                         input=json.dumps([nova_guest_case(*c[1:]) for c in cases]),
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise AssertionError("tools/nova-guest.py failed: " + out.stderr[-3000:])
    return json.loads(out.stdout)


def minivan_guest(specs, props, settings, instances_dir, caps=None):
    """minivan's domain XML for the case (or ('build', reason) when it refuses it), on a
    host with the NUMA cells of caps (the capabilities Nova's fake libvirt reported)."""
    virt_type = settings.get("virt_type", "qemu")
    driver = minivan.LibvirtDriver("qemu:///system", virt_type, instances_dir=instances_dir)
    driver.numa_topology = caps
    for key in ("cpu_dedicated_set", "cpu_shared_set"):
        setattr(driver, key, minivan.parse_cpu_spec(settings[key]) if key in settings
                else None)
    driver._guest_host = (None, minivan.GuestHost(
        machines=("pc", "q35", "pc-i440fx-7.2", "pc-q35-7.2"),
        uefi=settings.get("uefi", True), secure_boot=settings.get("secure_boot", True),
        cpu_controller=True, virt_type=virt_type,
        tpm=(("1.2", "2.0"), ("tpm-tis", "tpm-crb")) if settings.get("tpm") else None))
    driver.graphics_listen = "127.0.0.1" if settings.get("vnc", True) else None
    driver.vtpm_secret = lambda server, remove=False: None   # (no connection here)
    driver.machine_types = settings.get("machine", "")
    driver.cpu_mode, driver.cpu_models = settings.get("cpu_mode", ""), \
        settings.get("cpu_models", [])
    server = {"id": "3f9d2b4e-8f1e-4c57-9a3e-0d6c1e2b7a11", "name": "guest",
              "project_id": "p", "user_id": "u", "image_ref": "image",
              "created_at": "2026-12-04T00:00:00Z", "instance_name": "instance-00000001",
              "flavor": {"id": "f", "name": "f", "ram": settings.get("ram", 512), "disk": 1,
                         "vcpus": settings.get("vcpus", 1),
                         "ephemeral": settings.get("ephemeral", 0),
                         "swap": settings.get("swap", 0), "extra_specs": specs},
              "image_properties": props, "config_drive": settings.get("config_drive", False),
              "vtpm_secret": "0" * 64,
              "volumes": [], "ports": [{"id": NOVA_PORT_ID, "mac": "fa:16:3e:00:00:00",
                                        "neutron": True, "vif_type": "ovs",
                                        "vif_details": {"bridge_name": "br-int"}}]}
    try:        # the scheduler's part: the guest's cells fitted on the host's
        request = minivan.numa_request(server["flavor"], minivan.image_meta(props))
    except minivan.BadRequest as e:
        return ("api", e.message)
    if request is not None:
        cells = driver.numa_cells()
        fitted = cells and minivan.numa_fit(cells, minivan.numa_usage(cells, []), request,
                                            1e9, 1e9)
        if not fitted:
            return ("build", minivan.NO_VALID_HOST)
        server["numa_topology"] = minivan.stored_numa(request, fitted)
    disks = minivan.server_disks(os.path.join(instances_dir, server["id"]), server)
    config_drive = os.path.join(instances_dir, server["id"], "disk.config") \
        if server["config_drive"] else None
    try:
        return driver.domain_xml(server, disks, config_drive)
    except minivan.DriverError as e:
        return ("build", str(e))


def guest_shape_of(xml):
    """What the comparison looks at in a domain: every element Nova's driver derives from
    flavors, images and its options; not names, paths, metadata, or how a NIC is plugged."""
    root = ElementTree.fromstring(xml)

    def attrs(el, *skip):
        return {k: v for k, v in el.attrib.items() if k not in skip} if el is not None \
            else None

    def kids(el):
        return [(c.tag, attrs(c), (c.text or "").strip()) for c in el] if el is not None \
            else []
    shape = {"type": root.get("type"), "memory_kib": int(root.findtext("memory")),
             "vcpu": (root.findtext("vcpu"), attrs(root.find("vcpu"))),
             "iothreads": root.findtext("iothreads"),
             "sysinfo": [(e.get("name"), e.text) for e in root.iter("entry")
                         if e.get("name") != "version"],
             # <loader secure=...>: libvirt before 9.2 refuses it beside firmware
             # autoselection; the secure-boot firmware feature says the same
             "os": (attrs(root.find("os")), [k for k in kids(root.find("os"))
                                            if k[0] != "loader"]),
             "loader": {k: v for k, v in (attrs(root.find("os/loader")) or {}).items()
                        if k != "secure"},
             "os_firmware": kids(root.find("os/firmware")),
             "features": kids(root.find("features")),
             "hyperv": kids(root.find("features/hyperv")),
             "kvm": kids(root.find("features/kvm")),
             "cputune": kids(root.find("cputune")),
             "numatune": kids(root.find("numatune")),
             "memoryBacking": kids(root.find("memoryBacking")),
             "hugepages": kids(root.find("memoryBacking/hugepages")),
             "cpu_numa": kids(root.find("cpu/numa")),
             "clock": (attrs(root.find("clock")), kids(root.find("clock"))),
             "cpu": (attrs(root.find("cpu")), kids(root.find("cpu")))}
    devices = []
    for dev in root.find("devices"):
        if dev.tag == "disk":
            devices.append(("disk", attrs(dev), attrs(dev.find("driver")),
                            attrs(dev.find("target")), kids(dev.find("iotune")),
                            attrs(dev.find("address"))))
        elif dev.tag == "interface":
            devices.append(("interface", attrs(dev.find("model")), attrs(dev.find("driver")),
                            kids(dev.find("bandwidth"))))
        elif dev.tag in ("serial", "console"):
            continue        # a pty serial port, logged (minivan keeps the log over reboots)
        elif dev.tag == "channel":
            devices.append(("channel", attrs(dev.find("target"))))
        elif dev.tag == "rng":
            devices.append(("rng", attrs(dev), attrs(dev.find("rate")),
                            attrs(dev.find("backend")), dev.findtext("backend")))
        elif dev.tag == "video":
            devices.append(("video", attrs(dev.find("model"))))
        elif dev.tag == "tpm":      # (its secret's uuid is a name)
            devices.append(("tpm", attrs(dev), attrs(dev.find("backend"))))
        elif dev.tag == "memballoon":
            devices.append(("memballoon", attrs(dev), kids(dev)))
        else:
            devices.append((dev.tag, attrs(dev)))
    shape["devices"] = devices
    return shape


class GuestShapeOracleTests(unittest.TestCase):
    """minivan's domains against the ones Nova 34's own libvirt driver writes for the same
    flavor and image (tools/nova-guest.py, Nova's fake libvirt), case by case; and real
    libvirtd accepts each of minivan's."""

    @classmethod
    def setUpClass(cls):
        cls.nova = None
        if os.path.exists(os.path.join(NOVA_VENV, "bin", "python")) and have_libvirt():
            cls.nova = nova_guests(GUEST_CASES + GUEST_REFUSALS)

    def setUp(self):
        if self.nova is None:
            skip_or_fail(self, f"no Nova virtualenv at {NOVA_VENV} (tools/setup-venvs.sh)")
        self.tmp = tempfile.mkdtemp(prefix="minivan-shape-")
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)

    def test_domains_match_novas(self):
        """Each flavor × image × option case gives the domain Nova's driver gives."""
        for (name, specs, props, settings), nova in zip(GUEST_CASES, self.nova):
            with self.subTest(name):
                self.assertIn("xml", nova, f"Nova refused the case: {nova.get('message')}")
                ours = minivan_guest(specs, props, settings, self.tmp, nova.get("caps"))
                self.assertIsInstance(ours, str, f"minivan refused the case: {ours}")
                self.assertEqual(guest_shape_of(ours), guest_shape_of(nova["xml"]))

    def test_refusals_match_novas(self):
        """What Nova's API refuses minivan's API refuses with the same message; what
        Nova's build fails on minivan's build fails on."""
        results = self.nova[len(GUEST_CASES):]
        for (name, specs, props, settings), nova in zip(GUEST_REFUSALS, results):
            with self.subTest(name):
                self.assertIn(nova.get("stage"), ("api", "build"), nova.get("message"))
                flavor = {"name": "f", "vcpus": settings.get("vcpus", 1), "ram": 512,
                          "extra_specs": specs}
                try:
                    minivan.check_guest_request(flavor, {"name": "image",
                                                         "properties": props})
                except minivan.BadRequest as e:
                    self.assertEqual(nova["stage"], "api", e.message)
                    expected = nova["message"]
                    if nova["error"] == "ValueError":
                        expected = "Invalid image metadata. Error: " + expected
                    self.assertEqual(e.message, expected)
                    continue
                self.assertEqual(nova["stage"], "build", "minivan's API took it")
                ours = minivan_guest(specs, props, settings, self.tmp, nova.get("caps"))
                self.assertIsInstance(ours, tuple, "minivan built it; Nova: " + str(nova.get("message")))

    def test_numa_fit_sweep_matches_novas(self):
        """Nova's numa_fit_instance_to_host and minivan's numa_fit, on 4 made-up hosts ×
        4 CPU-set configurations × 20 guests × 4 sets of guests already there (placed one
        after another, each one's use counted): the same host cells, pins, reserved CPUs
        and page sizes, or the same no-fit, every time."""
        def flavor(vcpus, ram, **specs):
            return {"vcpus": vcpus, "ram": ram, "disk": 1, "extra_specs": specs}
        hosts = [NUMA_HOST["numa_host"], SMT_HOST["numa_host"], PAGES_HOST["numa_host"],
                 {"cpu_nodes": 4, "cpu_cores": 2, "cpu_threads": 1, "kB_mem": 8388608}]
        confs = [{}, {"cpu_dedicated_set": "0-7"},
                 {"cpu_dedicated_set": "2-7", "cpu_shared_set": "0-1"},
                 {"cpu_shared_set": "0-5"}]
        ded, pages = {"hw:cpu_policy": "dedicated"}, "hw:mem_page_size"
        guests = {
            "ded4": flavor(4, 2048, **ded), "ded2": flavor(2, 1024, **ded),
            "ded3": flavor(3, 1024, **ded), "ded5": flavor(5, 1024, **ded),
            "ded2-emu": flavor(2, 1024, **ded, **{"hw:emulator_threads_policy": "isolate"}),
            "ded2-iso": flavor(2, 1024, **ded, **{"hw:cpu_thread_policy": "isolate"}),
            "ded2-req": flavor(2, 1024, **ded, **{"hw:cpu_thread_policy": "require"}),
            "ded3-pre": flavor(3, 1024, **ded, **{"hw:cpu_thread_policy": "prefer"}),
            "mixed4": flavor(4, 2048, **{"hw:cpu_policy": "mixed",
                                         "hw:cpu_dedicated_mask": "^0"}),
            "cells2": flavor(4, 2048, **{"hw:numa_nodes": "2"}),
            "cells2-ded": flavor(4, 2048, **ded, **{"hw:numa_nodes": "2"}),
            "cells2-uneven": flavor(4, 3072, **{
                "hw:numa_nodes": "2", "hw:numa_cpus.0": "0", "hw:numa_cpus.1": "1-3",
                "hw:numa_mem.0": "1024", "hw:numa_mem.1": "2048"}),
            "large": flavor(2, 2048, **{pages: "large"}), "any": flavor(2, 2048, **{pages: "any"}),
            "small": flavor(2, 2048, **{pages: "small"}), "2048": flavor(2, 1024, **{pages: "2048"}),
            "cell8": flavor(8, 2048, **{"hw:numa_nodes": "1"}),
            "realtime": flavor(4, 2048, **ded, **{"hw:cpu_realtime": "yes",
                                                  "hw:cpu_realtime_mask": "^0"}),
            "ded2-big": flavor(2, 4096, **ded), "1GB": flavor(1, 1024, **{pages: "1GB"})}
        earlier_sets = [[], ["ded2"], ["ded4", "ded2"], ["cells2", "large"]]
        cases = [{"host": host, "conf": {"compute": conf}, "flavor": guest, "image": {},
                  "limits": {"cpu": 16.0, "ram": 1.5}, "fit_only": True,
                  "placed": [{"flavor": guests[e], "image": {}} for e in earlier]}
                 for host in hosts for conf in confs for guest in guests.values()
                 for earlier in earlier_sets]
        python = os.path.join(NOVA_VENV, "bin", "python")
        out = subprocess.run([python, os.path.join(HERE, "tools", "nova-guest.py")],
                             input=json.dumps(cases), capture_output=True, text=True,
                             timeout=600)
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        counts = collections.Counter()
        for case, nova in zip(cases, json.loads(out.stdout)):
            conf = case["conf"]["compute"]
            cells = minivan.host_numa_cells(nova["caps"], *(
                minivan.parse_cpu_spec(conf[k]) if k in conf else None
                for k in ("cpu_dedicated_set", "cpu_shared_set")))

            def fit(spec, placed):
                request = minivan.numa_request(spec, {})
                got = minivan.numa_fit(cells, minivan.numa_usage(cells, placed), request,
                                       16.0, 1.5)
                return request, got
            placed, refused = [], False
            for earlier in case["placed"]:
                request, got = fit(earlier["flavor"], placed)
                if got is None:
                    refused = True
                    break
                placed.append(minivan.stored_numa(request, got))
            with self.subTest(case=json.dumps(case)[:300]):
                if nova.get("stage") == "placed":
                    self.assertTrue(refused, "Nova could not place an earlier guest")
                    counts["earlier guest refused"] += 1
                    continue
                self.assertFalse(refused, "minivan could not place an earlier guest")
                request, got = fit(case["flavor"], placed)
                ours = None if got is None else minivan.stored_numa(request, got)["cells"]
                self.assertEqual(ours, nova.get("numa"), nova.get("message"))
                counts["fit" if ours else "no fit"] += 1
        print(f"\nNUMA fit sweep, same as Nova's: {dict(counts)}")
        self.assertEqual(sum(counts.values()), len(cases))

    def test_real_libvirtd_defines_every_domain(self):
        """virDomainDefineXML of the real libvirtd accepts each of minivan's domains."""
        libvirt = minivan.import_libvirt()
        try:
            conn = libvirt.open("qemu:///system")
        except libvirt.libvirtError as e:
            skip_or_fail(self, f"no libvirtd at qemu:///system (tools/libvirt-up.sh): {e}")
        self.addCleanup(conn.close)
        for index, (name, specs, props, settings) in enumerate(GUEST_CASES):
            with self.subTest(name):
                xml = minivan_guest(specs, props, settings, self.tmp,
                                    self.nova[index].get("caps"))
                xml = xml.replace("3f9d2b4e-8f1e-4c57-9a3e-0d6c1e2b7a11",
                                  str(uuid.uuid4())).replace(
                    "instance-00000001", f"minivan-shape-{index}")
                xml = re.sub(r"<interface .*?</interface>", "", xml, flags=re.S)
                dom = conn.defineXML(xml)
                try:
                    self.assertIn(f"minivan-shape-{index}", dom.XMLDesc(0))
                finally:
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


class GuestImageTests(unittest.TestCase):
    """The test guest (tools/make-guest.sh) as Tempest's validation uses cirros: booted by
    QEMU inside a network namespace this test makes (its guest network is QEMU's own
    user-mode one, port 22 forwarded to the namespace's loopback), it is logged into by
    Tempest's own RemoteClient with the key of its config drive, and the client's disk,
    file system, network and config-drive helpers work."""

    def test_tempest_remote_client_works_on_the_guest(self):
        qemu = shutil.which("qemu-system-x86_64")
        if not (GUEST_IMAGE and os.path.exists(GUEST_IMAGE) and qemu and
                shutil.which("unshare") and shutil.which("nsenter")):
            skip_or_fail(self, "no guest image or QEMU (tools/test.sh builds and installs them)")
        try:
            import paramiko
            import tempest.common.utils.linux.remote_client  # noqa: F401
        except ImportError:
            skip_or_fail(self, "tempest and paramiko are not installed (tools/setup-venvs.sh)")
        tmp = tempfile.mkdtemp(prefix="minivan-guest-ssh-")
        self.addCleanup(shutil.rmtree, tmp, True)
        key = paramiko.RSAKey.generate(2048)
        buf = io.StringIO()
        key.write_private_key(buf)
        meta = {"uuid": str(uuid.uuid4()), "hostname": "tempest-guest.novalocal",
                "name": "tempest-guest", "launch_index": 0,
                "public_keys": {"tempest": f"ssh-rsa {key.get_base64()} tempest\n"}}
        iso = os.path.join(tmp, "config.iso")
        minivan.write_iso(iso, {"openstack/latest/meta_data.json": json.dumps(meta).encode()},
                          "config-2")
        disk, data = os.path.join(tmp, "disk.qcow2"), os.path.join(tmp, "data.raw")
        minivan.qemu_img("create", "-f", "qcow2", "-b", os.path.abspath(GUEST_IMAGE), "-F",
                         "qcow2", disk)
        with open(data, "wb") as f:
            f.truncate(64 * 2 ** 20)
        console = os.path.join(tmp, "console.log")
        command = (f"ip link set lo up && exec {qemu} -machine pc -accel tcg -m 256 "
                   f"-display none -nodefaults -no-user-config "
                   f"-drive file={disk},if=virtio,format=qcow2 "
                   f"-drive file={data},if=virtio,format=raw "
                   f"-drive file={iso},media=cdrom,if=ide,format=raw "
                   f"-netdev user,id=n0,hostfwd=tcp:127.0.0.1:22-:22 "
                   f"-device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56 "
                   f"-serial file:{console}")
        errors = open(os.path.join(tmp, "qemu.err"), "w")
        self.addCleanup(errors.close)
        proc = subprocess.Popen(["unshare", "-n", "sh", "-c", command],
                                stdout=subprocess.DEVNULL, stderr=errors)

        def stop():
            proc.kill()
            proc.wait()
        self.addCleanup(stop)
        wait_until(lambda: os.path.exists(console) and "sshd listening" in open(
            console, errors="replace").read() or proc.poll() is not None, timeout=120,
            what="the guest's sshd")
        if proc.poll() is not None:
            self.fail("QEMU ended: " + open(errors.name).read()[-2000:])
        with open(os.path.join(tmp, "tempest.conf"), "w") as f:
            f.write("[validation]\nssh_key_type = rsa\nssh_timeout = 60\n"
                    "connect_timeout = 20\n")
        done = subprocess.run(["nsenter", f"--net=/proc/{proc.pid}/ns/net", "--",
                               sys.executable, "-c", GUEST_SSH_CLIENT, buf.getvalue(),
                               json.dumps(meta)], capture_output=True, text=True, timeout=240,
                              env=dict(os.environ, TEMPEST_CONFIG_DIR=tmp,
                                       TEMPEST_CONFIG="tempest.conf"))
        self.assertEqual(done.returncode, 0, done.stdout[-3000:] + done.stderr[-3000:])
        out = json.loads(done.stdout.strip().splitlines()[-1])
        self.assertEqual(out["hostname"], "tempest-guest")
        self.assertEqual(out["whoami"], "0")
        self.assertIn("vda", out["disks"])
        self.assertIn("vdb", out["disks"])
        self.assertIn("vdb", out["partitions"])
        self.assertEqual(out["mac"], "52:54:00:12:34:56")
        self.assertEqual(out["nic"], "eth0")
        self.assertEqual((out["read_back"], out["fs"]), ("kept", "ext4"))
        self.assertEqual(out["config_drive_uuid"], meta["uuid"])
        self.assertIn("tempest was here", open(console, errors="replace").read())


class RealGuestTests(unittest.TestCase):
    """A real tiny guest (tools/make-guest.sh) booted by QEMU under libvirtd on an isolated
    network, driven by openstacksdk, novaclient and openstackclient.  Nothing connects to
    the guest: its state is read from libvirt (domain state, console log, DHCP leases)."""

    @classmethod
    def setUpClass(cls):
        cls.conn = real_guest_connection() if have_clients() else None
        cls.ready = cls.conn is not None
        if not cls.ready:
            return
        cls.port = free_port()
        cls.url = f"http://127.0.0.1:{cls.port}/v2.1"
        data_images = tempfile.mkdtemp(prefix="minivan-guest-images-")
        shutil.copy(GUEST_IMAGE, os.path.join(data_images, "minivan-guest.qcow2"))
        bridge = cls.conn.networkLookupByName(GUEST_NETWORK).bridgeName()
        shown = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", bridge],
                               capture_output=True, text=True)
        cls.metadata = " 169.254.169.254/" in shown.stdout
        start_minivan(cls, cls.port, env_extra={
            "MINIVAN_LIBVIRT_URI": "qemu:///system", "MINIVAN_VIRT_TYPE": "qemu",
            "MINIVAN_NETWORK": GUEST_NETWORK, "MINIVAN_IMAGES_DIR": data_images,
            "MINIVAN_SHUTDOWN_TIMEOUT": "20", "MINIVAN_SYNC_POWER_STATE_INTERVAL": "2",
            "MINIVAN_METADATA_LISTEN": "169.254.169.254:80" if cls.metadata else "",
            "MINIVAN_SERIAL_CONSOLE_LISTEN": f"127.0.0.1:{free_port()}",
            "MINIVAN_VNC_LISTEN": f"127.0.0.1:{free_port()}",
            "MINIVAN_NOVNC_DIR": cls.novnc_dir(),
            "MINIVAN_SWTPM_ENABLED": "true" if shutil.which("swtpm") else "false"})
        cls.images_dir = data_images
        import openstack
        cls.sdk = openstack.connect(auth_type="none", auth={"endpoint": cls.url},
                                    compute_endpoint_override=cls.url, identity_api_version="3")
        cls.image_id = cls.sdk.compute.get(
            "/images", microversion="2.35").json()["images"][0]["id"]

    @classmethod
    def novnc_dir(cls):
        """A directory standing in for noVNC's files (the proxy serves any such files)."""
        cls.novnc = tempfile.mkdtemp(prefix="minivan-novnc-")
        with open(os.path.join(cls.novnc, "vnc_lite.html"), "w") as f:
            f.write("<html><title>noVNC</title></html>\n")
        return cls.novnc

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "ready", False):
            stop_minivan(cls)
            shutil.rmtree(cls.images_dir, True)
            shutil.rmtree(cls.novnc, True)
            cls.conn.close()

    def setUp(self):
        if not self.ready:
            skip_or_fail(self, "no real-guest setup (tools/test.sh runs tools/libvirt-up.sh and "
                               "tools/make-guest.sh; needs MINIVAN_TEST_GUEST_IMAGE)")

    # -- helpers -------------------------------------------------------------------
    def nova(self, version="2.96"):
        from keystoneauth1 import noauth, session
        from novaclient import client
        sess = session.Session(auth=noauth.NoAuth(endpoint=self.url))
        return client.Client(version, session=sess, endpoint_override=self.url)

    def osc(self, *args):
        done = subprocess.run([os.path.join(BIN, "openstack"), "--os-auth-type", "none",
                               "--os-endpoint", self.url, "--os-identity-api-version", "3",
                               *args], capture_output=True, text=True, timeout=120)
        self.assertEqual(done.returncode, 0, f"{args}: {done.stderr}")
        return done.stdout

    def boot(self, name, **extra):
        """Create through openstacksdk; returns (server, seconds from POST to ACTIVE)."""
        started = time.monotonic()
        server = self.sdk.compute.create_server(name=name, image_id=self.image_id,
                                                flavor_id="1", networks="auto", **extra)
        server = self.active(server, interval=0.2)
        elapsed = time.monotonic() - started
        self.addCleanup(self.destroy, server.id)
        return server, elapsed

    def active(self, server, interval=0.5):
        """Wait for ACTIVE; a server in ERROR fails with its fault's message."""
        from openstack import exceptions
        try:
            return self.sdk.compute.wait_for_server(server, status="ACTIVE", wait=120,
                                                    interval=interval)
        except exceptions.ResourceFailure:
            fault = self.sdk.compute.get(f"/servers/{server.id}").json()["server"].get("fault")
            self.fail(f"{server.id} went to ERROR: {fault}")

    def destroy(self, server_id):
        from openstack import exceptions
        try:
            self.sdk.compute.delete_server(server_id)
            self.sdk.compute.wait_for_delete(self.sdk.compute.get_server(server_id), wait=120)
        except exceptions.NotFoundException:
            pass

    def domain(self, server_id):
        return self.conn.lookupByUUIDString(server_id)

    def console(self, server_id):
        return self.nova().servers.get_console_output(server_id)

    def wait_status(self, server_id, status):
        return wait_until(lambda: self.sdk.compute.get_server(server_id).status == status,
                          what=f"{server_id} {status}")

    def wait_console(self, server_id, text, count=1):
        return wait_until(lambda: self.console(server_id).count(text) >= count, timeout=180,
                          what=f"console line {text!r} x{count}")

    def lease_of(self, mac):
        network = self.conn.networkLookupByName(GUEST_NETWORK)
        for lease in network.DHCPLeases():
            if lease["mac"].lower() == mac.lower():
                return lease["ipaddr"]
        return None

    # -- the lifecycle -----------------------------------------------------------
    def test_lifecycle_of_a_real_guest(self):
        """create → ACTIVE → boot line → DHCP address in `addresses` → stop/start/reboot/
        pause/suspend/resize/rebuild/createImage/shelve/unshelve/rescue → delete leaves no
        domain and no disk."""
        server, _ = self.boot("real-1")
        sid = server.id
        self.assertEqual(self.domain(sid).state()[0], 1)
        self.wait_console(sid, "minivan-guest booted")
        mac = re.search(r"<mac address='([0-9a-f:]+)'", self.domain(sid).XMLDesc(0)).group(1)
        lease = wait_until(lambda: self.lease_of(mac), what="a DHCP lease")

        def address_shown():
            addrs = self.sdk.compute.get_server(sid).addresses.get(GUEST_NETWORK, [])
            return [(a["addr"], a["OS-EXT-IPS-MAC:mac_addr"]) for a in addrs]
        self.assertEqual(wait_until(address_shown, what="the address in addresses"),
                         [(lease, mac)])
        ips = self.nova().servers.ips(sid)
        self.assertEqual(ips[GUEST_NETWORK][0]["addr"], lease)

        self.osc("server", "stop", sid)
        self.wait_status(sid, "SHUTOFF")
        self.assertEqual(self.domain(sid).state()[0], 5)
        self.osc("server", "start", sid)
        self.wait_status(sid, "ACTIVE")
        self.wait_console(sid, "minivan-guest booted", 2)

        self.osc("server", "reboot", "--hard", sid)
        self.wait_console(sid, "minivan-guest booted", 3)
        self.wait_status(sid, "ACTIVE")

        self.osc("server", "pause", sid)
        self.wait_status(sid, "PAUSED")
        self.assertEqual(self.domain(sid).state()[0], 3)
        self.osc("server", "unpause", sid)
        self.wait_status(sid, "ACTIVE")

        self.osc("server", "suspend", sid)
        self.wait_status(sid, "SUSPENDED")
        self.assertTrue(self.domain(sid).hasManagedSaveImage(0))
        self.osc("server", "resume", sid)
        self.wait_status(sid, "ACTIVE")
        self.assertEqual(self.domain(sid).state()[0], 1)

        nova = self.nova()
        nova.servers.resize(sid, "2")
        self.wait_status(sid, "VERIFY_RESIZE")
        self.assertEqual(self.domain(sid).info()[1], 2048 * 1024)
        nova.servers.confirm_resize(sid)
        self.wait_status(sid, "ACTIVE")

        nova.servers.rebuild(sid, self.image_id, name="real-1-rebuilt")
        self.wait_status(sid, "ACTIVE")
        self.wait_console(sid, "minivan-guest booted", 4)

        image_id = nova.servers.create_image(sid, "real-1-snap")
        snap = wait_until(lambda: self.sdk.compute.get("/images/" + image_id,
                                                       microversion="2.35").json()["image"]
                          if self.sdk.compute.get("/images/" + image_id, microversion="2.35")
                          .json()["image"]["status"] == "ACTIVE" else None, what="snapshot")
        self.assertGreater(snap["OS-EXT-IMG-SIZE:size"], 0)
        self.wait_status(sid, "ACTIVE")

        nova.servers.shelve(sid)
        self.wait_status(sid, "SHELVED_OFFLOADED")
        self.assertRaises(Exception, self.domain, sid)
        nova.servers.unshelve(sid)
        self.wait_status(sid, "ACTIVE")
        self.assertEqual(self.domain(sid).state()[0], 1)

        nova.servers.rescue(sid)
        self.wait_status(sid, "RESCUE")
        self.assertIn("disk.rescue", self.domain(sid).XMLDesc(0))
        nova.servers.unrescue(sid)
        self.wait_status(sid, "ACTIVE")

        # a stable device rescue (the rescue image names its device and bus): QEMU boots
        # the rescue disk, the server's own disk stays vda
        self.sdk.compute.post(f"/images/{image_id}/metadata", json={"metadata": {
            "hw_rescue_device": "disk", "hw_rescue_bus": "virtio"}}, microversion="2.35")
        booted = self.console(sid).count("minivan-guest booted")
        nova.servers.rescue(sid, image=image_id)
        self.wait_status(sid, "RESCUE")
        import xml.etree.ElementTree as ET
        found = [(os.path.basename(d.find("source").get("file")), d.find("target").get("dev"),
                  d.find("boot").get("order") if d.find("boot") is not None else None)
                 for d in ET.fromstring(self.domain(sid).XMLDesc(0)).findall(
                     "devices/disk[@device='disk']")]
        self.assertEqual(found, [("disk", "vda", None), ("disk.rescue", "vdb", "1")])
        self.wait_console(sid, "minivan-guest booted", booted + 1)
        nova.servers.unrescue(sid)
        self.wait_status(sid, "ACTIVE")
        self.assertNotIn("disk.rescue", self.domain(sid).XMLDesc(0))

        instance_dir = os.path.join(self.minivan_data, "instances", sid)
        self.osc("server", "delete", "--wait", sid)
        self.assertRaises(Exception, self.domain, sid)
        self.assertFalse(os.path.exists(instance_dir))

    def test_standalone_boot_of_the_real_guest(self):
        """The README's standalone clouds.yaml: upload the guest, boot it by name, it boots."""
        config = write_clouds_yaml(self.minivan_data, self.port)
        env = {"OS_CLIENT_CONFIG_FILE": config, "OS_CLOUD": "minivan"}
        run = functools.partial(run_osc_cloud, self, env)
        run("image", "create", "--file", GUEST_IMAGE, "--disk-format", "qcow2",
            "--container-format", "bare", "uploaded-guest")
        server = json.loads(run("server", "create", "--image", "uploaded-guest", "--flavor",
                                "m1.tiny", "--wait", "real-standalone", "-f", "json"))
        self.addCleanup(self.destroy, server["id"])
        self.wait_console(server["id"], "minivan-guest booted")

    def test_config_drive_reaches_the_guest(self):
        """A config drive (ISO, label config-2) carries the server's uuid and hostname.
        The flavor and image ask for nothing else, so the guest is Nova's default one:
        virtio disk and NIC, a virtio RNG, no watchdog or TPM, BIOS, one socket."""
        server, _ = self.boot("real-cd", config_drive=True)
        self.wait_console(server.id, f"minivan-guest uuid {server.id}")
        self.wait_console(server.id, "minivan-guest ready")
        console = self.console(server.id)
        for line in ("hw disk vda virtio_blk virtio-pci", "hw nic eth0 virtio_net",
                     "hw cpu sockets 1 cores 1 threads 1", "hw rng virtio_rng.0",
                     "hw watchdog none", "hw tpm none", "hw firmware bios"):
            self.assertIn("minivan-guest " + line, console)

    def test_serial_console_through_the_proxy(self):
        """os-getSerialConsole gives a one-time ws:// URL; over it the guest's console
        shell runs a command and its output comes back; the token then is spent."""
        server, _ = self.boot("real-console")
        self.wait_console(server.id, "minivan-guest ready")
        url = self.nova().servers.get_serial_console(server.id, "serial")[
            "remote_console"]["url"]
        token = url.split("token=", 1)[1]
        shown = self.sdk.compute.get("/os-console-auth-tokens/" + token,
                                     microversion="2.31").json()["console"]
        self.assertEqual(shown["instance_uuid"], server.id)
        sock, status, rest = websocket_connect(url)
        try:
            self.assertEqual(status, 101)
            websocket_send(sock, b"\recho minivan-$((6*7))\r")
            self.assertIn(b"minivan-42", websocket_read_until(sock, b"minivan-42", rest))
        finally:
            sock.close()
        self.assertIs(websocket_refused(url), True)       # the token is spent

    def test_vnc_console_through_the_proxy(self):
        """os-getVNCConsole gives a noVNC URL on minivan's proxy, which serves the noVNC
        page and bridges the token's WebSocket to the guest's VNC server (RFB)."""
        server, _ = self.boot("real-vnc")
        url = self.nova().servers.get_vnc_console(server.id, "novnc")[
            "remote_console"]["url"]
        page, _, path = url.partition("?path=")
        self.assertTrue(page.endswith("/vnc_lite.html"), url)
        with urllib.request.urlopen(page, timeout=30) as r:
            self.assertIn(b"noVNC", r.read())
        parts = urllib.parse.urlsplit(page)
        ws = f"ws://{parts.netloc}/" + urllib.parse.unquote(path)
        sock, status, rest = websocket_connect(ws)
        try:
            self.assertEqual(status, 101)
            self.assertIn(b"RFB 003.", websocket_read_until(sock, b"RFB 003.", rest))
        finally:
            sock.close()
        self.assertIs(websocket_refused(ws), True)        # the token is spent

    def test_metadata_service_reaches_the_guest(self):
        """A guest with no config drive asks http://169.254.169.254 at boot (on the isolated
        bridge) and learns its uuid and EC2 instance-id from minivan's metadata service."""
        if not self.metadata:
            skip_or_fail(self, "the test bridge lacks 169.254.169.254 (tools/libvirt-up.sh)")
        server, _ = self.boot("real-md")
        name = self.sdk.compute.get(f"/servers/{server.id}", microversion="2.3").json()[
            "server"]["OS-EXT-SRV-ATTR:instance_name"]
        self.wait_console(server.id, f"minivan-guest metadata uuid {server.id} "
                                     f"instance-id {name}")

    def test_security_group_rules_become_a_network_filter(self):
        """The guest's NIC is behind its own libvirt network filter, which libvirt turns
        into iptables rules for the tap device; a new rule reaches them at once; the filter
        goes with the server."""
        libvirt = minivan.import_libvirt()
        server, _ = self.boot("real-fw")
        xml = self.domain(server.id).XMLDesc(0)
        self.assertIn(f"<filterref filter='minivan-{server.id}'", xml)
        tap = re.search(r"<target dev='([^']+)'", xml.split("<interface", 1)[1]).group(1)
        group = next(g for g in self.sdk.compute.get(
            "/os-security-groups", microversion="2.35").json()["security_groups"]
            if g["name"] == "default")
        made = self.sdk.compute.post("/os-security-group-rules", json={
            "security_group_rule": {"parent_group_id": group["id"], "ip_protocol": "tcp",
                                    "from_port": 2222, "to_port": 2222,
                                    "cidr": "192.0.2.0/24"}}, microversion="2.35")
        self.assertEqual(made.status_code, 200, made.text)
        self.addCleanup(self.sdk.compute.delete, "/os-security-group-rules/" +
                        made.json()["security_group_rule"]["id"], microversion="2.35")
        nwfilter = self.conn.nwfilterLookupByName("minivan-" + server.id).XMLDesc(0)
        self.assertIn("dstportstart='2222'", nwfilter)
        rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
        self.assertTrue([line for line in rules.splitlines()
                         if tap in line or "2222" in line], rules[-2000:])
        self.assertIn("--dport 2222", rules)
        self.destroy(server.id)
        with self.assertRaises(libvirt.libvirtError):
            self.conn.nwfilterLookupByName("minivan-" + server.id)

    def shaped_image(self, name, properties, path=None):
        """A copy of the guest image (or of the image at path) with these properties,
        through minivan's image API."""
        path = path or GUEST_IMAGE
        headers = {"X-Auth-Token": "admin:admin", "Content-Type": "application/json"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        self.addCleanup(conn.close)
        conn.request("POST", "/image/v2/images", json.dumps(dict(
            name=name, disk_format="qcow2", container_format="bare", **properties)), headers)
        resp = conn.getresponse()
        image = json.loads(resp.read())
        self.assertEqual(resp.status, 201, image)
        with open(path, "rb") as f:
            conn.request("PUT", f"/image/v2/images/{image['id']}/file", f, dict(
                headers, **{"Content-Type": "application/octet-stream",
                            "Content-Length": str(os.path.getsize(path))}))
            resp = conn.getresponse()
            self.assertEqual(resp.status, 204, resp.read())
            resp.read()
        return image["id"]

    def test_pinned_guests_get_cpus_of_their_own(self):
        """Guests of a flavor with dedicated CPUs on this host (its NUMA cells as libvirt
        reports them; every CPU serves both kinds of guest, as Nova without
        cpu_dedicated_set): each one's vCPU is pinned to a host CPU no other has, as
        `virsh vcpupin` shows and the server topology API says; its memory is bound to
        that CPU's cell; once every CPU is taken the next finds no valid host."""
        caps = self.conn.getCapabilities()
        host_cpus = sorted(int(c) for c in re.findall(r"<cpu id='(\d+)' socket_id", caps))
        if not host_cpus:
            skip_or_fail(self, "libvirt reports no NUMA cells on this host")
        flavor = self.sdk.compute.create_flavor(name="pinned", ram=128, vcpus=1, disk=1)
        self.addCleanup(self.sdk.compute.delete_flavor, flavor.id)
        self.sdk.compute.create_flavor_extra_specs(flavor, {"hw:cpu_policy": "dedicated"})
        pinned = []
        for n in host_cpus:
            server = self.sdk.compute.create_server(name=f"real-pinned-{n}",
                                                    image_id=self.image_id,
                                                    flavor_id=flavor.id, networks="none")
            self.addCleanup(self.destroy, server.id)
            self.active(server)
            topology = self.sdk.compute.get(f"/servers/{server.id}/topology",
                                            microversion="2.78").json()
            pcpu = topology["nodes"][0]["cpu_pinning"]["0"]
            shown = subprocess.run(["virsh", "-c", "qemu:///system", "vcpupin",
                                    self.domain(server.id).name()],
                                   capture_output=True, text=True, check=True).stdout
            self.assertRegex(shown, rf"(?m)^\s*0\s+{pcpu}\s*$")
            self.assertIn(f"<memory mode='strict' nodeset='{topology['nodes'][0]['host_node']}'",
                          self.domain(server.id).XMLDesc(0))
            pinned.append(pcpu)
        self.assertEqual(sorted(pinned), host_cpus)
        late = self.sdk.compute.create_server(name="real-pinned-late", image_id=self.image_id,
                                              flavor_id=flavor.id, networks="none")
        self.addCleanup(self.destroy, late.id)
        with self.assertRaises(AssertionError) as failed:
            self.active(late)
        self.assertIn("No valid host was found", str(failed.exception))

    def test_guest_shaped_by_its_flavor_and_image(self):
        """An image that asks for SATA disks, an e1000 NIC, q35 and UEFI, and a flavor that
        asks for one socket of two cores, a watchdog, a TPM 2.0 (CRB) and a disk read
        limit: the guest finds each of them from inside (its console's hw lines), the
        config drive on the SATA CD-ROM, and libvirt applies the limit.  The TPM is
        swtpm's, its state encrypted with a libvirt secret of the server; a rebuild is
        refused as in Nova; deleting the server removes the secret and the state."""
        if not shutil.which("swtpm"):
            skip_or_fail(self, "swtpm not installed (apt install swtpm swtpm-tools)")
        image_id = self.shaped_image("shaped", {
            "hw_disk_bus": "sata", "hw_vif_model": "e1000", "hw_machine_type": "q35",
            "hw_firmware_type": "uefi"})
        flavor = self.sdk.compute.create_flavor(name="shaped", ram=256, vcpus=2, disk=1)
        self.addCleanup(self.sdk.compute.delete_flavor, flavor.id)
        self.sdk.compute.create_flavor_extra_specs(flavor, {
            "hw:cpu_sockets": "1", "hw:watchdog_action": "reset",
            "quota:disk_read_bytes_sec": "10485760", "hw:tpm_version": "2.0",
            "hw:tpm_model": "tpm-crb"})
        server = self.sdk.compute.create_server(name="real-shaped", image_id=image_id,
                                                flavor_id=flavor.id, networks="auto",
                                                config_drive=True)
        self.addCleanup(self.destroy, server.id)
        self.active(server)
        self.wait_console(server.id, "minivan-guest ready")
        console = self.console(server.id)
        for line in ("hw disk sda sd ahci", "hw nic eth0 e1000",
                     "hw cpu sockets 1 cores 2 threads 1", "hw watchdog i6300ESB timer",
                     "hw tpm 2", "hw firmware uefi", "hw secureboot 0",
                     f"uuid {server.id}"):
            self.assertIn("minivan-guest " + line, console)
        self.assertEqual(self.domain(server.id).blockIoTune("sda", 0)["read_bytes_sec"],
                         10485760)
        desc = self.domain(server.id).XMLDesc(0)
        self.assertIn("<tpm model='tpm-crb'>", desc)
        secret = re.search(r"<encryption secret='([^']+)'", desc).group(1)
        self.assertEqual(self.conn.secretLookupByUUIDString(secret).usageID(), server.id)
        state = f"/var/lib/libvirt/swtpm/{server.id}"
        self.assertTrue(os.path.isdir(state))
        r = self.sdk.compute.post(f"/servers/{server.id}/action", json={
            "rebuild": {"imageRef": image_id}}, raise_exc=False)
        self.assertEqual(r.status_code, 400, r.text)
        self.assertIn("not supported for vTPM-enabled instance", r.text)
        self.destroy(server.id)
        libvirt = minivan.import_libvirt()
        with self.assertRaises(libvirt.libvirtError):
            self.conn.secretLookupByUUIDString(secret)
        self.assertFalse(os.path.exists(state))

    def test_secure_boot(self):
        """os_secure_boot=required on q35 with UEFI: the firmware libvirt picks has
        Microsoft's keys enrolled, the test guest built with Debian's signed shim and GRUB
        boots, and it finds Secure Boot on."""
        work = tempfile.mkdtemp(prefix="minivan-sb-")
        self.addCleanup(shutil.rmtree, work, ignore_errors=True)
        path = os.path.join(work, "guest-sb.qcow2")
        subprocess.run([os.path.join(HERE, "tools", "make-guest.sh"), path], check=True,
                       env=dict(os.environ, MINIVAN_GUEST_SECURE_BOOT="1"),
                       capture_output=True, timeout=600)
        flavor = self.sdk.compute.create_flavor(name="sb", ram=512, vcpus=1, disk=1)
        self.addCleanup(self.sdk.compute.delete_flavor, flavor.id)
        for secure, expected in (("required", "1"),):
            with self.subTest(os_secure_boot=secure):
                image_id = self.shaped_image("sb-" + secure, {
                    "hw_firmware_type": "uefi", "hw_machine_type": "q35",
                    "os_secure_boot": secure}, path)
                server = self.sdk.compute.create_server(
                    name="real-sb", image_id=image_id, flavor_id=flavor.id,
                    networks="auto")
                self.addCleanup(self.destroy, server.id)
                self.active(server)
                self.wait_console(server.id, "minivan-guest ready")
                console = self.console(server.id)
                self.assertIn("minivan-guest hw firmware uefi", console)
                self.assertIn("minivan-guest hw secureboot " + expected, console)
                self.destroy(server.id)

    def test_config_drive_from_the_builtin_iso_writer(self):
        """Without genisoimage on PATH, minivan writes the config-2 ISO itself and the guest
        reads it."""
        tools = tempfile.mkdtemp(prefix="minivan-path-")
        self.addCleanup(shutil.rmtree, tools, True)
        os.symlink(shutil.which("qemu-img"), os.path.join(tools, "qemu-img"))

        class Other:
            pass
        port = free_port()
        images = tempfile.mkdtemp(prefix="minivan-guest-images-")
        self.addCleanup(shutil.rmtree, images, True)
        shutil.copy(GUEST_IMAGE, os.path.join(images, "minivan-guest.qcow2"))
        start_minivan(Other, port, env_extra={
            "PATH": tools, "MINIVAN_LIBVIRT_URI": "qemu:///system", "MINIVAN_VIRT_TYPE": "qemu",
            "MINIVAN_NETWORK": GUEST_NETWORK, "MINIVAN_IMAGES_DIR": images,
            "MINIVAN_SHUTDOWN_TIMEOUT": "20"})
        self.addCleanup(stop_minivan, Other)
        url = f"http://127.0.0.1:{port}/v2.1"
        import openstack
        sdk = openstack.connect(auth_type="none", auth={"endpoint": url},
                                compute_endpoint_override=url, identity_api_version="3")
        image_id = sdk.compute.get("/images", microversion="2.35").json()["images"][0]["id"]
        server = sdk.compute.create_server(name="real-iso", image_id=image_id, flavor_id="1",
                                           networks="auto", config_drive=True)
        server = sdk.compute.wait_for_server(server, status="ACTIVE", wait=120)
        def console():
            return sdk.compute.post(f"/servers/{server.id}/action",
                                    json={"os-getConsoleOutput": {}}).json()["output"]
        try:
            wait_until(lambda: f"minivan-guest uuid {server.id}" in console(), timeout=180,
                       what="the guest to read the config drive")
        finally:
            sdk.compute.delete_server(server.id)
            wait_until(lambda: not any(s.id == server.id for s in sdk.compute.servers()),
                       what="the server to go")

    def test_guest_that_powers_off_becomes_shutoff(self):
        """A guest shut down behind minivan's back is SHUTOFF after the power sweep."""
        server, _ = self.boot("real-off")
        self.wait_console(server.id, "minivan-guest ready")
        self.domain(server.id).shutdown()
        self.wait_status(server.id, "SHUTOFF")


    def restart(self, kill=False, while_down=None):
        restart_minivan(self, kill, while_down)

    def test_interface_attach_detach(self):
        """A NIC attached to a running guest appears in its domain; detaching removes it."""
        server, _ = self.boot("real-nic")
        self.wait_console(server.id, "minivan-guest ready")
        nova = self.nova("2.70")
        attached = nova.servers.interface_attach(server.id, None, None, None)
        self.assertIn(attached.mac_addr, self.domain(server.id).XMLDesc(0))
        self.assertEqual(len(nova.servers.interface_list(server.id)), 2)
        nova.servers.interface_detach(server.id, attached.port_id)
        wait_until(lambda: attached.mac_addr not in self.domain(server.id).XMLDesc(0),
                   what="the NIC to leave the domain")
        self.assertEqual(len(nova.servers.interface_list(server.id)), 1)
        # each is an instance action with its compute_*_interface event, as Nova records
        # them (Tempest's wait_for_interface_detach waits for that event's Success)
        actions = self.sdk.compute.get(f"/servers/{server.id}/os-instance-actions").json()
        done = {}
        for action in actions["instanceActions"]:
            if action["action"] in ("attach_interface", "detach_interface"):
                shown = self.sdk.compute.get(
                    f"/servers/{server.id}/os-instance-actions/{action['request_id']}",
                    microversion="2.51").json()["instanceAction"]
                done[action["action"]] = [(e["event"], e["result"]) for e in shown["events"]]
        self.assertEqual(done, {
            "attach_interface": [("compute_attach_interface", "Success")],
            "detach_interface": [("compute_detach_interface", "Success")]})
        network = [n["id"] for n in self.sdk.compute.get("/os-networks", microversion="2.35")
                   .json()["networks"] if n["label"] == GUEST_NETWORK][0]
        act = f"/servers/{server.id}/action"
        r = self.sdk.compute.post(act, json={"addFixedIp": {"networkId": network}},
                                  microversion="2.43")
        self.assertEqual(r.status_code, 202, r.text)
        ports = nova.servers.interface_list(server.id)
        self.assertEqual(len(ports), 2)
        self.assertIn(ports[1].mac_addr, self.domain(server.id).XMLDesc(0))
        first = wait_until(lambda: nova.servers.interface_list(server.id)[0].fixed_ips,
                           what="the first NIC's address")[0]["ip_address"]
        r = self.sdk.compute.post(act, json={"removeFixedIp": {"address": first}},
                                  microversion="2.43")
        self.assertEqual(r.status_code, 202, r.text)
        wait_until(lambda: ports[0].mac_addr not in self.domain(server.id).XMLDesc(0),
                   what="the NIC with that address to leave the domain")
        self.assertEqual([p.mac_addr for p in nova.servers.interface_list(server.id)],
                         [ports[1].mac_addr])

    def test_restarts_keep_servers_and_domains_in_step(self):
        """Host reboot: a running guest whose domain went down is started again. A build or
        a delete cut by SIGKILL ends with the server and its domain agreeing."""
        running, _ = self.boot("real-restart")
        self.restart(while_down=lambda: self.domain(running.id).destroy())
        wait_until(lambda: self.domain(running.id).state()[0] == 1, what="the guest to run")
        self.wait_status(running.id, "ACTIVE")

        spec = {"server": {"name": "cut-build", "imageRef": self.image_id, "flavorRef": "1"}}
        created = self.sdk.compute.post("/servers", json=spec).json()["server"]["id"]
        self.restart(kill=True)
        status = wait_until(lambda: self.sdk.compute.get_server(created).status
                            if self.sdk.compute.get_server(created).status in ("ACTIVE", "ERROR")
                            else None, what="the cut build to settle")
        try:
            self.domain(created)
            has_domain = True
        except Exception:  # noqa: BLE001 - libvirtError: no such domain
            has_domain = False
        self.assertEqual(status == "ACTIVE", has_domain)
        self.addCleanup(self.destroy, created)

        self.sdk.compute.delete(f"/servers/{running.id}")
        self.restart(kill=True)
        from openstack import exceptions
        wait_until(lambda: self._gone(running.id, exceptions), what="the cut delete to finish")
        self.assertRaises(Exception, self.domain, running.id)

    def _gone(self, server_id, exceptions):
        try:
            self.sdk.compute.get_server(server_id)
            return False
        except exceptions.NotFoundException:
            return True


# -- the standalone image service (a Glance v2 subset under /image) -----------------------

class HostileImageRealGuestTests(unittest.TestCase):
    """The hostile corpus on real QEMU guests under libvirtd, through every entry point:
    the image directory, minivan's /image upload, rescue, rebuild and unshelve (minivan
    with its own images), and the real Glance (minivan behind Keystone; bytes Glance
    refuses are planted in its file store and database).  After each, the canary a
    hostile image names keeps its bytes, mode and owner (and its directory too), and no
    domain's XML, backing chain included, names it."""

    @classmethod
    def setUpClass(cls):
        cls.env = keystone_env()
        cls.conn = real_guest_connection() if cls.env and cls.env.get("GLANCE_URL") and \
            shutil.which("genisoimage") else None
        cls.ready = cls.conn is not None
        if not cls.ready:
            return
        cls.canary = make_canary()
        cls.corpus = tempfile.mkdtemp(prefix="minivan-corpus-")
        cls.cases = make_hostile_images(cls.corpus, cls.canary)
        real = {"MINIVAN_LIBVIRT_URI": "qemu:///system", "MINIVAN_VIRT_TYPE": "qemu",
                "MINIVAN_NETWORK": GUEST_NETWORK, "MINIVAN_SHUTDOWN_TIMEOUT": "5"}
        local = type("Local", (), {})
        cls.local_port = free_port()
        images = tempfile.mkdtemp(prefix="minivan-guest-images-")
        shutil.copy(GUEST_IMAGE, os.path.join(images, "minivan-guest.qcow2"))
        start_minivan(local, cls.local_port, env_extra=dict(real, MINIVAN_IMAGES_DIR=images))
        cls.local, cls.images_dir = local, images
        glance = type("Glance", (), {})
        cls.glance_port = free_port()
        start_minivan(glance, cls.glance_port, env_extra=keystone_minivan_env(cls.env, **real))
        cls.glance = glance
        cls.admin = keystone_token(cls.env, "admin", "admin")
        cls.guest_image = [i for i in cls.local_call("GET", "/images", version="2.35")
                           .json()["images"] if i["name"] == "minivan-guest"][0]["id"]

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "ready", False):
            stop_minivan(cls.local)
            stop_minivan(cls.glance)
            shutil.rmtree(cls.images_dir, True)
            shutil.rmtree(cls.corpus, True)
            shutil.rmtree(os.path.dirname(cls.canary), True)
            cls.conn.close()

    @classmethod
    def local_call(cls, method, path, body=None, version=None):
        conn = http.client.HTTPConnection("127.0.0.1", cls.local_port, timeout=60)
        headers = {"X-Auth-Token": "admin:admin", "Content-Type": "application/json"}
        if version:
            headers["OpenStack-API-Version"] = "compute " + version
        conn.request(method, "/v2.1" + path, json.dumps(body) if body is not None else None,
                     headers)
        resp = conn.getresponse()
        reply = Reply(resp.status, resp.getheaders(), resp.read())
        conn.close()
        return reply

    def setUp(self):
        if not self.ready:
            skip_or_fail(self, "no real-guest setup with Keystone and Glance (tools/test.sh)")
        self.before = file_facts(self.canary, os.path.dirname(self.canary))
        self.seen = []                   # (entry point, case, what the user saw)

    def tearDown(self):
        if self.ready:
            self.assertEqual(file_facts(self.canary, os.path.dirname(self.canary)),
                             self.before)
            print(f"\n{self.id().rsplit('.', 1)[-1]}:")
            for row in self.seen:
                print("  %-14s %-45s %s" % row)

    def assertCanaryUnnamed(self):
        for dom in self.conn.listAllDomains():
            self.assertNotIn(self.canary, dom.XMLDesc(0), dom.name())

    def wait_settled(self, call, sid, wanted=("ACTIVE", "ERROR", "SHELVED_OFFLOADED")):
        return wait_until(lambda: (lambda s: s if s["status"] in wanted and not s.get(
            "OS-EXT-STS:task_state") else None)(call("GET", "/servers/" + sid).json()
                                                ["server"]), timeout=180,
            what=f"server {sid} to settle")

    def boot(self, call, image_id, name="h"):
        r = call("POST", "/servers", {"server": {"name": name, "imageRef": image_id,
                                                 "flavorRef": "1", "networks": "none"}},
                 version="2.37")
        self.assertEqual(r.status, 202, r.raw)
        return r.json()["server"]["id"]

    def delete(self, call, sid):
        call("DELETE", "/servers/" + sid)
        wait_until(lambda: call("GET", "/servers/" + sid).status == 404, timeout=120,
                   what=f"server {sid} deleted")

    def outcome(self, server, case):
        reason = NOVA_BOOT_REASONS[case]
        if reason is None:
            self.assertEqual(server["status"], "ACTIVE", server.get("fault"))
            return "ACTIVE"
        self.assertEqual(server["status"], "ERROR")
        self.assertIn(f"is unacceptable: {reason}", server["fault"]["message"])
        return "ERROR: " + reason

    def local_image(self, prefix, case, declared, path):
        """The image file in the local minivan's image directory with a sidecar naming
        its disk_format; returns the image's id."""
        name = place_image(self.images_dir, prefix + case, declared, path)
        return [i for i in self.local_call("GET", "/images", version="2.35")
                .json()["images"] if i["name"] == name][0]["id"]

    def test_image_directory_and_upload(self):
        """Every image of the corpus from the image directory (it boots on QEMU or the
        build fails with Nova's reason), and each hostile one uploaded to /image (refused
        there as Glance refuses it, or refused at boot)."""
        for case, declared, path in self.cases:
            with self.subTest(case=case, entry="image directory"):
                image_id = self.local_image("hostile-", case, declared, path)
                sid = self.boot(self.local_call, image_id)
                self.seen.append(("directory", case, self.outcome(
                    self.wait_settled(self.local_call, sid), case)))
                self.assertCanaryUnnamed()
                self.delete(self.local_call, sid)
        base = f"http://127.0.0.1:{self.local_port}/image"
        for case, declared, path in self.cases:
            if NOVA_BOOT_REASONS[case] is None:
                continue
            with self.subTest(case=case, entry="/image upload"):
                status, image = image_request(base, "POST", "/v2/images", "admin:admin", {
                    "name": "up-" + case, "disk_format": declared, "container_format": "bare"})
                with open(path, "rb") as f:
                    status, _ = image_request(base, "PUT", f"/v2/images/{image['id']}/file",
                                              "admin:admin", data=f.read())
                if status == 415:
                    self.seen.append(("/image", case, "415 at upload"))
                    continue
                self.assertEqual(status, 204)
                sid = self.boot(self.local_call, image["id"])
                self.seen.append(("/image", case, self.outcome(
                    self.wait_settled(self.local_call, sid), case)))
                self.assertCanaryUnnamed()
                self.delete(self.local_call, sid)

    def test_rescue_rebuild_unshelve(self):
        """A real guest rescued with a hostile image ends in ERROR with Nova's 'cannot be
        rescued' fault; rebuilt with one, in ERROR; unshelved from one (planted behind its
        shelved image), it stays SHELVED_OFFLOADED.  QEMU never opens the canary."""
        cases = {c: (d, p) for c, d, p in self.cases}
        data = self.local.minivan_data
        chosen = [c for c in cases if NOVA_BOOT_REASONS[c]] \
            if os.environ.get("MINIVAN_HOSTILE_CASES") == "all" else HostileImageBootTests.HOSTILE
        for case in chosen:
            declared, path = cases[case]
            reason = NOVA_BOOT_REASONS[case]
            image_id = self.local_image("entry-", case, declared, path)
            for entry, body, status, fault in (
                    ("rescue", {"rescue": {"rescue_image_ref": image_id}}, 200,
                     "Instance {sid} cannot be rescued: Driver Error: Image {image_id} is "
                     "unacceptable: {reason}"),
                    ("rebuild", {"rebuild": {"imageRef": image_id}}, 202,
                     "Image {image_id} is unacceptable: {reason}")):
                with self.subTest(case=case, entry=entry):
                    sid = self.boot(self.local_call, self.guest_image, entry)
                    self.assertEqual(self.wait_settled(self.local_call, sid)["status"],
                                     "ACTIVE")
                    r = self.local_call("POST", f"/servers/{sid}/action", body)
                    self.assertEqual(r.status, status, r.raw)
                    server = self.wait_settled(self.local_call, sid, ("ERROR",))
                    self.assertEqual(server["fault"]["message"], fault.format(
                        sid=sid, image_id=image_id, reason=reason))
                    self.seen.append((entry, case, "ERROR: " + reason))
                    self.assertCanaryUnnamed()
                    self.delete(self.local_call, sid)
            with self.subTest(case=case, entry="unshelve"):
                sid = self.boot(self.local_call, self.guest_image, "s")
                self.assertEqual(self.wait_settled(self.local_call, sid)["status"], "ACTIVE")
                self.local_call("POST", f"/servers/{sid}/action", {"shelve": None})
                self.wait_settled(self.local_call, sid, ("SHELVED_OFFLOADED",))
                shelved = [i for i in self.local_call("GET", "/images/detail", version="2.35")
                           .json()["images"] if i.get("server", {}).get("id") == sid][0]
                # the test owns the image directory: the shelved image's file gets the
                # hostile bytes, and a sidecar-less record forgets its hash
                shutil.copy(path, os.path.join(self.images_dir, shelved["id"] + ".qcow2"))
                self.forget_hash(data, shelved["id"], declared)
                r = self.local_call("POST", f"/servers/{sid}/action", {"unshelve": None})
                self.assertEqual(r.status, 202, r.raw)
                wait_until(lambda: not self.local_call("GET", "/servers/" + sid).json()
                           ["server"]["OS-EXT-STS:task_state"], timeout=120,
                           what="the unshelve to end")
                server = self.local_call("GET", "/servers/" + sid, version="2.62").json()[
                    "server"]
                self.assertEqual((server["status"], server["OS-EXT-SRV-ATTR:host"]),
                                 ("SHELVED_OFFLOADED", None))
                self.seen.append(("unshelve", case, "SHELVED_OFFLOADED (event Error)"))
                self.assertCanaryUnnamed()
                self.delete(self.local_call, sid)

    def forget_hash(self, data, image_id, disk_format):
        """Stop the local minivan, clear the image's recorded hash (so the planted bytes
        reach the inspector, not only the checksum), start it again."""
        stop = self.local.minivan_proc
        stop.send_signal(signal.SIGTERM)
        stop.wait(60)
        state = minivan.open_store(minivan.default_config(data_dir=data))
        state.commit([["set", ["images", image_id, "os_hash_value"], None],
                      ["set", ["images", image_id, "os_hash_algo"], None],
                      ["set", ["images", image_id, "disk_format"], disk_format]])
        state.close()
        port, args, env_extra = self.local.minivan_start
        start_minivan(self.local, port, args, env_extra, data=data)

    def test_real_glance(self):
        """Images in the real Glance: what Glance accepts is uploaded; what it refuses is
        planted in its file store and database (the test owns both) with matching
        checksums, so that minivan's own check at boot is what stops it."""
        base = self.env["GLANCE_URL"]
        db = os.path.join(os.path.dirname(self.env["GLANCE_IMAGES_DIR"].rstrip("/")),
                          "glance.db")

        def call(method, path, body=None, version=None):
            return compute_request(self, self.glance_port, method, path, self.admin, body,
                                   version)
        for case, declared, path in self.cases:
            if NOVA_BOOT_REASONS[case] is None:
                continue
            with self.subTest(case=case, entry="Glance"):
                with open(path, "rb") as f:
                    data = f.read()
                _, image = image_request(base, "POST", "/v2/images", self.admin, {
                    "name": "g-" + case, "disk_format": declared, "container_format": "bare",
                    "visibility": "public"})
                self.addCleanup(image_request, base, "DELETE", f"/v2/images/{image['id']}",
                                self.admin)
                status, _ = image_request(base, "PUT", f"/v2/images/{image['id']}/file",
                                          self.admin, data=data)
                how = "uploaded"
                if status == 415:
                    image = self.plant_in_glance(base, db, case, declared, data)
                    how = "planted"
                sid = self.boot(call, image["id"])
                self.seen.append(("Glance", case, f"{how}; " + self.outcome(
                    self.wait_settled(call, sid), case)))
                self.assertCanaryUnnamed()
                self.delete(call, sid)

    def plant_in_glance(self, base, db, case, declared, data):
        """Glance refused these bytes: upload zeros of their length as a raw image, then
        put the bytes in its file store and their checksums and format in its database."""
        import sqlite3
        _, image = image_request(base, "POST", "/v2/images", self.admin, {
            "name": "planted-" + case, "disk_format": "raw", "container_format": "bare",
            "visibility": "public"})
        image_id = image["id"]
        self.addCleanup(image_request, base, "DELETE", f"/v2/images/{image_id}", self.admin)
        status, _ = image_request(base, "PUT", f"/v2/images/{image_id}/file", self.admin,
                                  data=b"\0" * len(data))
        self.assertEqual(status, 204)
        with open(os.path.join(self.env["GLANCE_IMAGES_DIR"], image_id), "wb") as f:
            f.write(data)
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE images SET disk_format=?, checksum=?, os_hash_value=? "
                         "WHERE id=?", (declared, hashlib.md5(data).hexdigest(),
                                        hashlib.sha512(data).hexdigest(), image_id))
        _, shown = image_request(base, "GET", f"/v2/images/{image_id}", self.admin)
        self.assertEqual((shown["disk_format"], shown["os_hash_value"]),
                         (declared, hashlib.sha512(data).hexdigest()))
        return shown


class SecondHostTests(unittest.TestCase):
    """Two compute hosts without shared storage: this machine's libvirtd ("one") and a
    second libvirtd (tools/second-host.sh, "two") in a mount namespace of its own where
    minivan's data directory is an empty tmpfs.  Real QEMU guests move between them:
    their disks travel through libvirt's storage streams (cold migration) or QEMU's
    block copy (live migration)."""

    @classmethod
    def setUpClass(cls):
        cls.ready = bool(GUEST_IMAGE and os.path.exists(GUEST_IMAGE) and have_libvirt()
                         and have_clients() and shutil.which("unshare")
                         and shutil.which("nsenter") and shutil.which("libvirtd"))
        if not cls.ready:
            return
        libvirt = minivan.import_libvirt()
        try:
            conn = libvirt.open("qemu:///system")
            conn.networkLookupByName(GUEST_NETWORK)
            conn.close()
        except libvirt.libvirtError:
            cls.ready = False
            return
        cls.work = tempfile.mkdtemp(prefix="minivan-second-host-")
        cls.data = os.path.join(cls.work, "data")
        images = os.path.join(cls.work, "images")
        os.makedirs(images)
        shutil.copy(GUEST_IMAGE, os.path.join(images, "minivan-guest.qcow2"))
        done = subprocess.run([os.path.join(HERE, "tools", "second-host.sh"), "up",
                               os.path.join(cls.work, "two"), cls.data],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError("tools/second-host.sh up failed: " + done.stderr)
        cls.uri_two = done.stdout.strip().splitlines()[-1]
        cls.port = free_port()
        cls.url = f"http://127.0.0.1:{cls.port}/v2.1"
        start_minivan(cls, cls.port, data=cls.data, env_extra={
            "MINIVAN_COMPUTE_HOSTS": f"one=qemu:///system,two={cls.uri_two}",
            "MINIVAN_VIRT_TYPE": "qemu", "MINIVAN_NETWORK": GUEST_NETWORK,
            "MINIVAN_IMAGES_DIR": images, "MINIVAN_SHUTDOWN_TIMEOUT": "10"})
        cls.image = cls.osc_json("image", "list")[0]["ID"]

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "work", None):
            stop_minivan(cls)
            subprocess.run([os.path.join(HERE, "tools", "second-host.sh"), "stop",
                            os.path.join(cls.work, "two")], capture_output=True, timeout=120)
            shutil.rmtree(cls.work, True)

    def setUp(self):
        if not self.ready:
            skip_or_fail(self, "no real-guest setup (tools/libvirt-up.sh, a guest image in "
                               "MINIVAN_TEST_GUEST_IMAGE, unshare and nsenter)")

    @classmethod
    def osc(cls, *args, version="2.74"):
        done = subprocess.run([os.path.join(BIN, "openstack"), "--os-auth-type", "none",
                               "--os-endpoint", cls.url, "--os-identity-api-version", "3",
                               "--os-compute-api-version", version, *args],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise AssertionError(f"openstack {' '.join(args)}: {done.stderr}")
        return done.stdout

    @classmethod
    def osc_json(cls, *args, version="2.74"):
        return json.loads(cls.osc(*args, "-f", "json", version=version))

    def on_two(self, *cmd):
        """A command run where host two's daemon and guests see files."""
        with open(os.path.join(self.work, "two", "libvirtd.pid")) as f:
            pid = f.read().strip()             # (a revived daemon has a new one)
        return subprocess.run(["nsenter", "-t", pid, "-m", *cmd],
                              capture_output=True, text=True, timeout=60)

    def files_on_two(self, server_id):
        done = self.on_two("ls", os.path.join(self.data, "instances", server_id))
        return sorted(done.stdout.split()) if done.returncode == 0 else None

    def domains(self, uri):
        done = subprocess.run(["virsh", "-q", "-c", uri, "list", "--all", "--uuid"],
                              capture_output=True, text=True, timeout=60)
        return done.stdout.split()

    def boots(self, server_id):
        return self.osc("console", "log", "show", server_id).count("minivan-guest ready")

    def wait_boots(self, server_id, count):
        wait_until(lambda: self.boots(server_id) >= count, timeout=180, interval=1,
                   what=f"boot line {count} of {server_id}")

    def create_on(self, name, host):
        server = self.osc_json("server", "create", "--image", self.image, "--flavor", "1",
                               "--nic", "auto", "--host", host, "--wait", name)
        self.addCleanup(self.delete, server["id"])
        self.assertEqual((server["status"], server["OS-EXT-SRV-ATTR:host"]), ("ACTIVE", host))
        return server["id"]

    def delete(self, server_id):
        subprocess.run([os.path.join(BIN, "openstack"), "--os-auth-type", "none",
                        "--os-endpoint", self.url, "--os-identity-api-version", "3",
                        "server", "delete", "--wait", server_id],
                       capture_output=True, timeout=300)

    def show(self, server_id):
        return self.osc_json("server", "show", server_id)

    def assert_on(self, server_id, host):
        """The server is ACTIVE on host; if not, the failure tells its migrations, its
        actions' events and the end of minivan's log."""
        server = self.show(server_id)
        if (server["status"], server["OS-EXT-SRV-ATTR:host"]) == ("ACTIVE", host):
            return server
        events = [self.osc("server", "event", "show", server_id, action["Request ID"],
                           version="2.51")
                  for action in self.osc_json("server", "event", "list", server_id)]
        with open(self.minivan_log.name, errors="replace") as f:
            log = f.read()[-8000:]
        migrations = self.osc("server", "migration", "list", "--server", server_id,
                              version="2.59")
        self.fail(f"{server['status']} on {server['OS-EXT-SRV-ATTR:host']}, not ACTIVE on "
                  f"{host}; fault {server.get('fault')}\nmigrations:\n{migrations}\n"
                  "events:\n" + "\n".join(events) + f"\nminivan's log:\n{log}")

    # -- tests ----------------------------------------------------------------------
    def test_build_on_a_host_without_shared_storage(self):
        server_id = self.create_on("far", "two")
        # the disks were copied there: two's guest boots from them, and its console log
        # (written on two) is read back through libvirt
        self.assertEqual(self.files_on_two(server_id), ["console.log", "disk"])
        self.assertIn(server_id, self.domains(self.uri_two))
        self.assertNotIn(server_id, self.domains("qemu:///system"))
        self.wait_boots(server_id, 1)
        base = self.on_two("ls", os.path.join(self.data, "_base")).stdout.split()
        self.assertEqual(len([name for name in base if not name.endswith(".copied")]), 1)
        self.delete(server_id)
        self.assertIsNone(self.files_on_two(server_id))
        self.assertNotIn(server_id, self.domains(self.uri_two))

    def test_cold_migration_moves_the_disks(self):
        server_id = self.create_on("mover", "two")
        self.wait_boots(server_id, 1)
        self.osc("server", "migrate", "--host", "one", "--wait", server_id, version="2.56")
        server = self.show(server_id)
        self.assertEqual((server["status"], server["OS-EXT-SRV-ATTR:host"]),
                         ("VERIFY_RESIZE", "one"))
        self.assertIn(server_id, self.domains("qemu:///system"))
        self.assertNotIn(server_id, self.domains(self.uri_two))
        # the disks (and the console log written on two) came over; the guest boots here
        self.wait_boots(server_id, 2)
        self.assertIsNotNone(self.files_on_two(server_id))      # kept until confirmed
        self.osc("server", "migration", "confirm", server_id)
        wait_until(lambda: self.show(server_id)["status"] == "ACTIVE", what="confirmed")
        self.assertIsNone(self.files_on_two(server_id))
        migrations = self.osc_json("server", "migration", "list", "--server", server_id,
                                   version="2.59")
        self.assertEqual([(m["Source Compute"], m["Dest Compute"], m["Status"])
                          for m in migrations], [("two", "one", "confirmed")])
        # and back to two, reverted: the guest runs on two again from its own disks
        self.osc("server", "migrate", "--host", "two", "--wait", server_id, version="2.56")
        self.assertEqual(self.files_on_two(server_id), ["console.log", "disk"])
        self.osc("server", "resize", "revert", server_id)
        wait_until(lambda: self.show(server_id)["status"] == "ACTIVE", what="reverted")
        self.assertEqual(self.show(server_id)["OS-EXT-SRV-ATTR:host"], "one")
        self.assertIsNone(self.files_on_two(server_id))
        self.assertIn(server_id, self.domains("qemu:///system"))

    def test_libvirtd_killed_during_builds(self):
        """two's libvirtd is killed while servers build there: reads go on, the host
        goes down, and once its libvirtd is back minivan reconnects on its own; each
        server ends ACTIVE with its domain running there, or in ERROR with a fault."""
        tool, two = os.path.join(HERE, "tools", "second-host.sh"), os.path.join(self.work,
                                                                                 "two")
        ids = []
        for n in range(3):
            server = self.osc_json("server", "create", "--image", self.image, "--flavor",
                                   "1", "--nic", "auto", "--host", "two", f"crash-{n}")
            ids.append(server["id"])
            self.addCleanup(self.delete, server["id"])
        time.sleep(0.5)
        subprocess.run([tool, "kill", two], check=True, capture_output=True, timeout=60)
        listed = {s["ID"] for s in self.osc_json("server", "list")}
        self.assertTrue(set(ids) <= listed)                        # reads go on

        def two_state():
            return [s["State"] for s in self.osc_json("compute", "service", "list",
                                                      "--host", "two")]
        wait_until(lambda: two_state() == ["down"], timeout=60, what="two down")
        subprocess.run([tool, "revive", two], check=True, capture_output=True, timeout=60)
        wait_until(lambda: two_state() == ["up"], timeout=60, what="two up")
        wait_until(lambda: all(self.show(i)["status"] in ("ACTIVE", "ERROR") and
                               not self.show(i)["OS-EXT-STS:task_state"] for i in ids),
                   timeout=180, what="the servers settled")
        running = set(subprocess.run(["virsh", "-q", "-c", self.uri_two, "list", "--uuid"],
                                     capture_output=True, text=True).stdout.split())
        for server_id in ids:
            server = self.show(server_id)
            if server["status"] == "ACTIVE":
                self.assertIn(server_id, running)
            else:
                self.assertTrue(server["fault"]["message"])
                self.assertNotIn(server_id, running)

    def test_live_block_migration(self):
        server_id = self.create_on("live", "one")
        self.wait_boots(server_id, 1)
        self.osc("server", "migrate", "--live-migration", "--host", "two", "--wait",
                 server_id, version="2.30")
        self.assert_on(server_id, "two")
        self.assertEqual(self.domains("qemu:///system").count(server_id), 0)
        self.assertIn(server_id, self.domains(self.uri_two))
        self.assertIn("disk", self.files_on_two(server_id))
        # the guest kept running; a reboot there boots from the copied disk
        self.osc("server", "reboot", "--hard", "--wait", server_id)
        wait_until(lambda: "minivan-guest ready" in self.osc("console", "log", "show",
                                                             server_id),
                   timeout=180, interval=1, what="boot line on two")
        self.osc("server", "migrate", "--live-migration", "--host", "one", "--wait",
                 server_id, version="2.30")
        self.assert_on(server_id, "one")
        self.assertIsNone(self.files_on_two(server_id))
        migrations = self.osc_json("server", "migration", "list", "--server", server_id,
                                   version="2.59")
        self.assertEqual(sorted((m["Source Compute"], m["Dest Compute"], m["Status"])
                                for m in migrations),
                         [("one", "two", "completed"), ("two", "one", "completed")])
        # asked for a shared-storage live migration between them: refused, guest stays
        body = json.dumps({"os-migrateLive": {"host": "two", "block_migration": False}})
        request = urllib.request.Request(
            f"{self.url}/servers/{server_id}/action", data=body.encode(), method="POST",
            headers={"Content-Type": "application/json", "X-Auth-Token": "admin:admin",
                     "X-OpenStack-Nova-API-Version": "2.30"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            self.assertEqual(answer.status, 202)
        wait_until(lambda: self.show(server_id)["status"] == "ACTIVE", what="refusal")
        server = self.show(server_id)
        self.assertEqual(server["OS-EXT-SRV-ATTR:host"], "one")
        self.assertIn(server_id, self.domains("qemu:///system"))
        migrations = self.osc_json("server", "migration", "list", "--server", server_id,
                                   version="2.59")
        self.assertIn(("one", "two", "error"), [(m["Source Compute"], m["Dest Compute"],
                                                 m["Status"]) for m in migrations])


class CinderEndToEndTests(unittest.TestCase):
    """Volumes from a real Cinder (its NFS driver, tools/cinder.sh) behind the real Keystone
    and Glance, on real QEMU guests: attach and detach as hot-plug, boot from volume, the
    os-volumes proxy, through openstackclient, novaclient and the API."""

    @classmethod
    def setUpClass(cls):
        cls.env = keystone_env()
        cls.ready = bool(cls.env and cls.env.get("CINDER_URL") and cls.env.get("GLANCE_URL")
                         and GUEST_IMAGE and os.path.exists(GUEST_IMAGE) and have_libvirt()
                         and have_clients())
        if not cls.ready:
            return
        cls.conn = real_guest_connection()
        if cls.conn is None:
            cls.ready = False
            return
        cls.port = int(cls.env["COMPUTE_URL"].split(":")[2].split("/")[0])
        start_minivan(cls, cls.port, env_extra=keystone_minivan_env(cls.env, **{
            "MINIVAN_LIBVIRT_URI": "qemu:///system",
            "MINIVAN_VIRT_TYPE": "qemu", "MINIVAN_NETWORK": GUEST_NETWORK,
            "MINIVAN_VOLUME_MOUNT_BASE": cls.env["CINDER_MOUNT_BASE"],
            "MINIVAN_SHUTDOWN_TIMEOUT": "20", "MINIVAN_SYNC_POWER_STATE_INTERVAL": "2"}))
        cls.os_env = {k: v for k, v in cls.env.items() if k.startswith("OS_")}
        cls.image_id = glance_upload(cls.env, "minivan-guest-vol", GUEST_IMAGE)
        cls.admin = keystone_token(cls.env, "admin", "admin")

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "ready", False):
            stop_minivan(cls)
            cls.conn.close()
            subprocess.run([os.path.join(BIN, "openstack"), "image", "delete", cls.image_id],
                           capture_output=True, env=dict(os.environ, **cls.os_env))

    def setUp(self):
        if not self.ready:
            skip_or_fail(self, "no Cinder, Glance or real-guest setup in the test cloud "
                               "(tools/test.sh starts them)")

    # -- helpers -----------------------------------------------------------------
    def openstack(self, *args, expect_ok=True):
        return run_openstack(self, args, self.os_env, expect_ok)

    def api(self, method, path, body=None, version=None, token=None):
        return compute_request(self, self.port, method, path, token or self.admin, body,
                               version, timeout=60)

    def assertFault(self, reply, status, name, message=None):
        return assert_fault(self, reply, status, name, message)

    def volume(self, name_or_id):
        return self.openstack("volume", "show", name_or_id, "-f", "json")

    def new_volume(self, name, *args):
        made = self.openstack("volume", "create", "--size", "1", *args, name, "-f", "json")
        self.addCleanup(self.openstack, "volume", "delete", "--force", made["id"],
                        expect_ok=False)
        return self.wait_volume(made["id"], "available")

    def wait_volume(self, volume_id, status):
        wait_until(lambda: self.volume(volume_id)["status"] == status, timeout=180,
                   what=f"volume {volume_id} {status}")
        return self.volume(volume_id)

    def boot(self, name, *args):
        server = self.openstack("server", "create", "--flavor", "m1.tiny", *args, "--wait",
                                name, "-f", "json")
        self.addCleanup(self.openstack, "server", "delete", "--wait", server["id"],
                        expect_ok=False)
        self.assertEqual(server["status"], "ACTIVE")
        wait_until(lambda: "minivan-guest booted" in self.openstack(
            "console", "log", "show", server["id"]).stdout, timeout=180,
            what=f"{name} boot line")
        return server

    def disks(self, server_id, inactive=False):
        """{target: source file} of the domain, live or as defined."""
        libvirt = minivan.import_libvirt()
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        xml = self.conn.lookupByUUIDString(server_id).XMLDesc(flags)
        found = {}
        for disk in re.findall(r"<disk type='file' device='disk'>.*?</disk>", xml, re.S):
            source = re.search(r"<source file='([^']*)'", disk)
            target = re.search(r"<target dev='([^']*)'", disk)
            found[target.group(1)] = source.group(1) if source else None
        return found

    def volume_file(self, volume_id):
        return os.path.join(self.env["CINDER_MOUNT_POINT"], "volume-" + volume_id)

    # -- tests -------------------------------------------------------------------------
    def test_attach_and_detach_on_a_running_guest(self):
        """server add volume hot-plugs the NFS volume file into the running QEMU guest;
        the attachment shows in every view; server remove volume unplugs it."""
        vol = self.new_volume("data-vol")
        server = self.boot("vol-vm", "--image", self.image_id)
        self.openstack("server", "add", "volume", "--device", "/dev/vdb", server["id"],
                       vol["id"])
        vol = self.wait_volume(vol["id"], "in-use")
        self.assertEqual(vol["attachments"][0]["server_id"], server["id"])
        self.assertEqual(self.disks(server["id"]).get("vdb"), self.volume_file(vol["id"]))
        self.assertEqual(self.disks(server["id"], inactive=True).get("vdb"),
                         self.volume_file(vol["id"]))
        listed = self.openstack("server", "volume", "list", server["id"], "-f", "json")
        self.assertEqual([(v["Volume ID"], v["Device"]) for v in listed],
                         [(vol["id"], "/dev/vdb")])
        att = self.api("GET", f"/servers/{server['id']}/os-volume_attachments",
                       version="2.89").json()["volumeAttachments"]
        self.assertEqual((att[0]["volumeId"], att[0]["attachment_id"], att[0]["tag"],
                          att[0]["delete_on_termination"]),
                         (vol["id"], vol["attachments"][0]["attachment_id"], None, False))
        shown = self.api("GET", "/servers/" + server["id"], version="2.3").json()["server"]
        self.assertEqual(shown["os-extended-volumes:volumes_attached"],
                         [{"id": vol["id"], "delete_on_termination": False}])
        proxy = self.api("GET", "/os-volumes/" + vol["id"], version="2.35").json()["volume"]
        self.assertEqual((proxy["status"], proxy["attachments"][0]["serverId"],
                          proxy["displayName"]), ("in-use", server["id"], "data-vol"))
        from keystoneauth1 import session
        from keystoneauth1.identity import v3
        from novaclient import client
        sess = session.Session(auth=v3.Password(
            auth_url=self.env["OS_AUTH_URL"], username="admin",
            password=self.env["OS_PASSWORD"], project_name="admin",
            user_domain_name="Default", project_domain_name="Default"))
        nova = client.Client("2.79", session=sess)
        self.assertEqual([v.volumeId for v in nova.volumes.get_server_volumes(server["id"])],
                         [vol["id"]])
        self.assertFault(self.api("DELETE", f"/servers/{server['id']}/os-volume_attachments/"
                                  + self.image_id), 404, "itemNotFound")
        self.openstack("server", "remove", "volume", server["id"], vol["id"])
        self.wait_volume(vol["id"], "available")
        self.assertNotIn("vdb", self.disks(server["id"], inactive=True))
        self.assertEqual(self.openstack("server", "volume", "list", server["id"], "-f",
                                        "json"), [])

    def test_snapshots_of_an_attached_volume(self):
        """Cinder's NFS snapshots of an in-use volume go through the assisted-snapshot API:
        the running guest's disk moves onto each new overlay, and deleting the snapshots
        merges them back (a commit, then a pull) while the guest runs."""
        vol = self.new_volume("snap-vol")
        server = self.boot("snap-vm", "--image", self.image_id)
        self.openstack("server", "add", "volume", server["id"], vol["id"])
        self.wait_volume(vol["id"], "in-use")
        snaps = []
        for name in ("snap-a", "snap-b"):
            snap = self.openstack("--os-volume-api-version", "3.66", "volume", "snapshot",
                                  "create", "--volume",
                                  vol["id"], name, "-f", "json")
            wait_until(lambda: self.openstack("volume", "snapshot", "show", snap["id"], "-f",
                                              "json")["status"] == "available",
                       timeout=120, what=f"{name} available")
            self.assertEqual(self.disks(server["id"])["vdb"],
                             self.volume_file(vol["id"]) + "." + snap["id"])
            snaps.append(snap["id"])
        for snap_id in snaps:
            self.openstack("volume", "snapshot", "delete", snap_id)
            wait_until(lambda: self.openstack("volume", "snapshot", "show", snap_id,
                                              expect_ok=False).returncode != 0,
                       timeout=120, what=f"snapshot {snap_id} deleted")
        self.assertEqual(self.domain_state(server["id"]), 1)     # still running
        self.assertTrue(os.path.exists(self.disks(server["id"])["vdb"]))
        self.openstack("server", "remove", "volume", server["id"], vol["id"])
        self.wait_volume(vol["id"], "available")

    def domain_state(self, server_id):
        return self.conn.lookupByUUIDString(server_id).state()[0]

    def test_boot_from_volume(self):
        """A guest boots from a volume Cinder made from the image (delete_on_termination:
        deleted with the server), and from an existing bootable volume, which stays."""
        server = self.boot("bfv-vm", "--block-device",
                           f"uuid={self.image_id},source_type=image,destination_type=volume,"
                           "volume_size=1,boot_index=0,delete_on_termination=true")
        shown = self.api("GET", "/servers/" + server["id"], version="2.3").json()["server"]
        self.assertEqual(shown["image"], "")
        [root] = shown["os-extended-volumes:volumes_attached"]
        self.assertTrue(root["delete_on_termination"])
        self.assertEqual(self.disks(server["id"])["vda"], self.volume_file(root["id"]))
        self.assertEqual(self.volume(root["id"])["status"], "in-use")
        self.assertFault(self.api("DELETE", f"/servers/{server['id']}/os-volume_attachments/"
                                  + root["id"]), 400, "badRequest",
                         "Cannot detach a root device volume")
        # a snapshot of a volume-backed server: Cinder snapshots + an image that boots them
        self.openstack("server", "image", "create", "--name", "bfv-snap", "--wait",
                       server["id"])
        image = self.openstack("image", "show", "bfv-snap", "-f", "json")
        self.addCleanup(self.openstack, "image", "delete", image["id"], expect_ok=False)
        [mapping] = json.loads(image["properties"]["block_device_mapping"])
        self.assertEqual((image["status"], mapping["source_type"], mapping["boot_index"]),
                         ("active", "snapshot", 0))
        wait_until(lambda: self.openstack("volume", "snapshot", "show", mapping["snapshot_id"],
                                          "-f", "json")["status"] == "available",
                   timeout=120, what="the server snapshot's volume snapshot")
        clone = self.boot("bfv-clone", "--image", image["id"])
        clone_root = self.api("GET", "/servers/" + clone["id"], version="2.3").json()[
            "server"]["os-extended-volumes:volumes_attached"][0]
        self.assertEqual(self.volume(clone_root["id"])["snapshot_id"],
                         mapping["snapshot_id"])
        self.openstack("server", "delete", "--wait", clone["id"])
        self.openstack("volume", "snapshot", "delete", mapping["snapshot_id"])
        wait_until(lambda: self.openstack("volume", "snapshot", "show", mapping["snapshot_id"],
                                          expect_ok=False).returncode != 0,
                   timeout=120, what="the server snapshot's volume snapshot deleted")
        self.openstack("server", "delete", "--wait", server["id"])
        wait_until(lambda: self.openstack("volume", "show", root["id"],
                                          expect_ok=False).returncode != 0,
                   timeout=120, what="the root volume deleted")
        bootable = self.new_volume("bootable-vol", "--image", self.image_id)
        again = self.boot("bfv-vm2", "--volume", bootable["id"])
        self.assertEqual(self.disks(again["id"])["vda"], self.volume_file(bootable["id"]))
        data = self.new_volume("kept-vol")
        r = self.api("POST", f"/servers/{again['id']}/os-volume_attachments", {
            "volumeAttachment": {"volumeId": data["id"], "delete_on_termination": True}},
            "2.79")
        self.assertEqual(r.status, 200, r.raw)
        self.wait_volume(data["id"], "in-use")
        # shelve offload keeps both volumes (no image for a volume-backed server)...
        self.openstack("server", "shelve", "--wait", again["id"])
        shown = self.api("GET", "/servers/" + again["id"], version="2.3").json()["server"]
        self.assertEqual(shown["status"], "SHELVED_OFFLOADED")
        self.assertEqual({v["id"] for v in shown["os-extended-volumes:volumes_attached"]},
                         {bootable["id"], data["id"]})
        self.assertNotEqual(self.volume(data["id"])["status"], "available")
        self.assertEqual(self.openstack("image", "list", "--name", "bfv-vm2-shelved", "-f",
                                        "json"), [])
        # ...and unshelve plugs them in again and boots from the volume
        self.openstack("server", "unshelve", "--wait", again["id"])
        wait_until(lambda: "minivan-guest booted" in self.openstack(   # a new console log
            "console", "log", "show", again["id"]).stdout, timeout=180, what="second boot")
        disks = self.disks(again["id"])
        self.assertEqual((disks["vda"], disks["vdb"]), (self.volume_file(bootable["id"]),
                                                        self.volume_file(data["id"])))
        self.wait_volume(data["id"], "in-use")
        self.openstack("server", "delete", "--wait", again["id"])
        self.wait_volume(bootable["id"], "available")
        wait_until(lambda: self.openstack("volume", "show", data["id"],
                                          expect_ok=False).returncode != 0,
                   timeout=120, what="the delete_on_termination volume deleted")

    def test_rebuild_of_a_volume_backed_server(self):
        """Before 2.93 a volume-backed server is not rebuilt with an image (Nova's 400);
        from 2.93 Cinder writes the new image over its boot volume (reimage, 3.68, then a
        volume-reimaged event) and the guest boots from it again."""
        server = self.boot("bfv-rebuild", "--block-device",
                           f"uuid={self.image_id},source_type=image,destination_type=volume,"
                           "volume_size=1,boot_index=0,delete_on_termination=true")
        other = glance_upload(self.env, "minivan-guest-vol-2", GUEST_IMAGE)
        self.addCleanup(self.openstack, "image", "delete", other, expect_ok=False)
        body = {"rebuild": {"imageRef": other}}
        self.assertFault(self.api("POST", f"/servers/{server['id']}/action", body,
                                  version="2.92"), 400, "badRequest",
                         f"Image {other} is unacceptable: Unable to rebuild with a "
                         "different image for a volume-backed server.")
        r = self.api("POST", f"/servers/{server['id']}/action", body, version="2.93")
        self.assertEqual(r.status, 202, r.raw)
        self.assertEqual(r.json()["server"]["image"], "")
        wait_until(lambda: self.api("GET", "/servers/" + server["id"]).json()["server"]
                   ["status"] == "ACTIVE", timeout=300, what="the rebuilt server ACTIVE")
        [root] = self.api("GET", "/servers/" + server["id"], version="2.3").json()[
            "server"]["os-extended-volumes:volumes_attached"]
        volume = self.volume(root["id"])
        self.assertEqual(volume["volume_image_metadata"]["image_id"], other)
        self.assertEqual(volume["status"], "in-use")
        wait_until(lambda: self.openstack("console", "log", "show", server["id"]).stdout
                   .count("minivan-guest booted") >= 2, timeout=180,
                   what="the guest's second boot line")
        actions = self.api("GET", f"/servers/{server['id']}/os-instance-actions").json()
        self.assertIn("rebuild", [a["action"] for a in actions["instanceActions"]])

    def test_volume_errors_and_proxies(self):
        """Bad attachments and boots answer as Nova; os-volumes and os-snapshots proxy
        Cinder up to 2.35; another project sees none of admin's volumes."""
        vol = self.new_volume("err-vol")
        server = self.boot("err-vm", "--image", self.image_id)
        base = f"/servers/{server['id']}/os-volume_attachments"
        missing = "5f0c2ad5-0000-4000-8000-000000000000"
        self.assertFault(self.api("POST", base, {"volumeAttachment": {"volumeId": missing}}),
                         404, "itemNotFound", missing)
        r = self.api("POST", base, {"volumeAttachment": {"volumeId": vol["id"]}}, "2.79")
        self.assertEqual(r.status, 200, r.raw)
        self.assertEqual(r.json()["volumeAttachment"]["device"], "/dev/vdb")
        try:
            from tempest.lib.common import jsonschema_validator as v
            import jsonschema
        except ImportError:
            skip_or_fail(self, "tempest is not installed (pip install tempest==47.0.0)")
        schema = tempest_schema("v2_79", "servers", "attach_volume")
        jsonschema.validate(r.json(), schema["response_body"], cls=v.JSONSCHEMA_VALIDATOR,
                            format_checker=v.FORMAT_CHECKER)
        self.wait_volume(vol["id"], "in-use")
        self.assertFault(self.api("POST", base, {"volumeAttachment": {"volumeId": vol["id"]}}),
                         400, "badRequest", "already attached")
        for version, vdir in (("2.1", "v2_1"), ("2.70", "v2_70"), ("2.79", "v2_79")):
            listed = self.api("GET", base, version=version)
            jsonschema.validate(listed.json(), tempest_schema(vdir, "servers",
                                                              "list_volume_attachments")
                                ["response_body"], cls=v.JSONSCHEMA_VALIDATOR,
                                format_checker=v.FORMAT_CHECKER)
        other = self.new_volume("other-vol")
        self.assertFault(self.api("PUT", f"{base}/{vol['id']}",
                                  {"volumeAttachment": {"volumeId": other["id"]}}), 409,
                         "conflictingRequest", "is not migrating")
        r = self.api("PUT", f"{base}/{vol['id']}", {"volumeAttachment": {
            "volumeId": vol["id"], "delete_on_termination": True}}, "2.85")
        self.assertEqual(r.status, 202, r.raw)
        att = self.api("GET", f"{base}/{vol['id']}", version="2.89").json()
        self.assertTrue(att["volumeAttachment"]["delete_on_termination"])
        r = self.api("DELETE", f"{base}/{vol['id']}")
        self.assertEqual(r.status, 202, r.raw)
        self.wait_volume(vol["id"], "available")
        r = self.api("POST", "/servers", {"server": {
            "name": "bad-bfv", "flavorRef": "1", "networks": "none",
            "block_device_mapping_v2": [{"boot_index": 0, "uuid": missing,
                                         "source_type": "volume",
                                         "destination_type": "volume"}]}}, "2.37")
        self.assertFault(r, 400, "badRequest", f"failed to get volume {missing}")
        r = self.api("POST", "/servers", {"server": {
            "name": "bad-bfv", "flavorRef": "1", "networks": "none",
            "block_device_mapping_v2": [{"boot_index": 0, "uuid": self.image_id,
                                         "source_type": "image",
                                         "destination_type": "volume"}]}}, "2.37")
        self.assertFault(r, 400, "badRequest", "non-zero size")
        made = self.api("POST", "/os-volumes", {"volume": {
            "size": 1, "display_name": "proxy-vol", "display_description": "via nova"}},
            "2.35")
        self.assertEqual(made.status, 200, made.raw)
        proxy = made.json()["volume"]
        self.addCleanup(self.openstack, "volume", "delete", "--force", proxy["id"],
                        expect_ok=False)
        self.assertEqual((proxy["displayName"], proxy["size"], proxy["attachments"]),
                         ("proxy-vol", 1, [{}]))
        self.wait_volume(proxy["id"], "available")
        listed = self.api("GET", "/os-volumes/detail").json()["volumes"]
        self.assertIn(proxy["id"], [x["id"] for x in listed])
        self.assertFault(self.api("GET", "/os-volumes", version="2.36"), 404, "itemNotFound")
        snap = self.api("POST", "/os-snapshots", {"snapshot": {
            "volume_id": proxy["id"], "display_name": "proxy-snap"}})
        self.assertEqual(snap.status, 200, snap.raw)
        snap_id = snap.json()["snapshot"]["id"]
        wait_until(lambda: self.api("GET", "/os-snapshots/" + snap_id).json()["snapshot"]
                   ["status"] == "available", timeout=120, what="snapshot available")
        self.assertEqual(self.api("DELETE", "/os-snapshots/" + snap_id).status, 202)
        wait_until(lambda: self.api("GET", "/os-snapshots/" + snap_id).status == 404,
                   timeout=120, what="snapshot deleted")
        demo = keystone_token(self.env, "demo", "demo")
        self.assertFault(self.api("GET", "/os-volumes/" + proxy["id"], token=demo), 404,
                         "itemNotFound")
        self.assertNotIn(proxy["id"], [x["id"] for x in self.api(
            "GET", "/os-volumes", token=demo).json()["volumes"]])
        self.assertEqual(self.api("DELETE", "/os-volumes/" + proxy["id"]).status, 202)


class FailingProxy:
    """An HTTP proxy in front of a real service (Glance, Cinder) that fails the requests
    a test picks, to see what minivan does when that service breaks in the middle.

    fail(method, pattern, how, skip=0, times=1): of the requests with that method whose
    path matches the regular expression, the first `skip` pass and the next `times` get
    `how`: an HTTP status (with a JSON error), "cut" (the status, the headers and half
    the body, then the connection closes) or "drop" (closed with no answer)."""

    def __init__(self, upstream):
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rules, self.seen, self.lock = [], [], threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                how = proxy.decide(self.command, self.path)
                if how == "drop":
                    self.close_connection = True
                    return
                if isinstance(how, int):
                    status, data = how, json.dumps({"error": {
                        "code": how, "message": "failed on purpose by the test"}}).encode()
                    headers = [("Content-Type", "application/json")]
                else:
                    upstream = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                    upstream.request(self.command, self.path, body=body, headers={
                        k: v for k, v in self.headers.items() if k.lower() not in
                        ("host", "connection", "content-length", "transfer-encoding")})
                    resp = upstream.getresponse()
                    status, data = resp.status, resp.read()
                    headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in
                               ("connection", "content-length", "transfer-encoding", "date",
                                "server")]
                    upstream.close()
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                if how == "cut":
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(data[:len(data) // 2] if how == "cut" else data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail(self, method, pattern, how, skip=0, times=1):
        with self.lock:
            self.rules.append({"method": method, "pattern": re.compile(pattern),
                               "how": how, "skip": skip, "times": times})

    def decide(self, method, path):
        with self.lock:
            how = None
            for rule in self.rules:
                if rule["method"] != method or not rule["pattern"].search(path) or \
                        not rule["times"]:
                    continue
                if rule["skip"]:
                    rule["skip"] -= 1
                    continue
                rule["times"] -= 1
                how = rule["how"]
                break
            self.seen.append((method, path, how))
            return how

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class ServiceFailureTests(unittest.TestCase):
    """Glance and Cinder (the real ones, behind FailingProxy) failing in the middle of a
    build: the server ends in ERROR with a fault, and nothing the build made is left:
    no disk, no partial download, no claim, no attachment; the volumes it made are
    deleted and the one it was given is available again."""

    @classmethod
    def setUpClass(cls):
        cls.env = keystone_env()
        cls.ready = bool(cls.env and cls.env.get("GLANCE_URL") and cls.env.get("CINDER_URL")
                         and have_clients() and have_libvirt())
        if not cls.ready:
            return
        cls.glance = FailingProxy(cls.env["GLANCE_URL"])
        cls.cinder = FailingProxy(cls.env["CINDER_URL"])
        cls.port = free_port()
        start_minivan(cls, cls.port, env_extra=keystone_minivan_env(cls.env, **{
            "MINIVAN_GLANCE_URL": cls.glance.url,
            "MINIVAN_CINDER_URL": cls.cinder.url + "/v3/%(project_id)s",
            "MINIVAN_VOLUME_MOUNT_BASE": cls.env["CINDER_MOUNT_BASE"]}))
        cls.os_env = {k: v for k, v in cls.env.items() if k.startswith("OS_")}
        cls.image_id = glance_upload(cls.env, "failing-build", make_image(
            tempfile.mkdtemp(prefix="minivan-img-"), "failing-build", size="64M"))
        cls.admin = keystone_token(cls.env, "admin", "admin")

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "ready", False):
            stop_minivan(cls)
            cls.glance.close()
            cls.cinder.close()
            run_openstack(None, ["image", "delete", cls.image_id], cls.os_env, expect_ok=False)

    def setUp(self):
        if not self.ready:
            skip_or_fail(self, "no Keystone, Glance or Cinder in the test cloud "
                               "(tools/test.sh starts them)")

    def openstack(self, *args, expect_ok=True):
        return run_openstack(self, args, self.os_env, expect_ok)

    def api(self, method, path, body=None, version="2.37"):
        return compute_request(self, self.port, method, path, self.admin, body, version,
                               timeout=60)

    def build_fails(self, name, **fields):
        """POST a server; wait for ERROR; check it holds no host and left no files."""
        made = self.api("POST", "/servers", {"server": dict(
            {"name": name, "flavorRef": "1", "networks": "none"}, **fields)})
        self.assertEqual(made.status, 202, made.raw)
        server_id = made.json()["server"]["id"]
        self.addCleanup(self.api, "DELETE", "/servers/" + server_id)
        wait_until(lambda: self.api("GET", "/servers/" + server_id).json()["server"]
                   ["status"] != "BUILD", timeout=180, what=f"{name} built or failed")
        server = self.api("GET", "/servers/" + server_id).json()["server"]
        self.assertEqual(server["status"], "ERROR", server)
        self.assertIsNone(server["OS-EXT-SRV-ATTR:host"])
        self.assertFalse(os.path.exists(os.path.join(self.minivan_data, "instances",
                                                     server_id)))
        return server

    def base_images(self):
        return sorted(os.listdir(os.path.join(self.minivan_data, "_base"))) \
            if os.path.isdir(os.path.join(self.minivan_data, "_base")) else []

    def test_glance_failing_during_the_download(self):
        """The image download cut half-way, refused with 503, or dropped unanswered: each
        build ends in ERROR with a fault naming the image, no partial base image is kept,
        and once Glance works the next build downloads the whole image and goes ACTIVE."""
        # a virtual size of its own: bytes no other test cached (the cache is by content)
        virtual = str(64 * 2 ** 20 + 512 * (uuid.uuid4().int % 4096 + 1))
        image_id = glance_upload(self.env, "cut-download", make_image(
            tempfile.mkdtemp(prefix="minivan-img-"), "cut-download", size=virtual))
        self.addCleanup(self.openstack, "image", "delete", image_id, expect_ok=False)
        cached = self.base_images()
        size = int(self.openstack("image", "show", image_id, "-f", "json")["size"])
        for how, said in (("cut", "failed (%d of %d bytes)" % (size // 2, size)),
                          (503, "HTTP 503"), ("drop", "image service is unreachable")):
            self.glance.fail("GET", rf"/v2/images/{image_id}/file$", how)
            server = self.build_fails(f"glance-{how}", imageRef=image_id)
            self.assertIn(said, server["fault"]["message"])
            self.assertEqual(self.base_images(), cached)
        made = self.api("POST", "/servers", {"server": {
            "name": "glance-back", "flavorRef": "1", "networks": "none",
            "imageRef": image_id}})
        server_id = made.json()["server"]["id"]
        self.addCleanup(self.api, "DELETE", "/servers/" + server_id)
        wait_until(lambda: self.api("GET", "/servers/" + server_id).json()["server"]
                   ["status"] == "ACTIVE", timeout=120, what="the build after Glance is back")
        image = self.openstack("image", "show", image_id, "-f", "json")
        new = sorted(set(self.base_images()) - set(cached))
        self.assertEqual(len(new), 1, new)
        with open(os.path.join(self.minivan_data, "_base", new[0]), "rb") as f:
            data = f.read()
        self.assertEqual(len(data), size)
        self.assertEqual(hashlib.md5(data).hexdigest(), image["checksum"])
        self.assertEqual(new[0], "sha512-" + hashlib.sha512(data).hexdigest())  # by bytes

    def test_cinder_failing_during_the_volume_setup(self):
        """A build with a volume it was given and a blank volume it makes: Cinder refuses
        the second attachment.  The server ends in ERROR with Cinder's answer as its fault;
        the blank volume is deleted, the given one is available again with no attachment,
        and the server lists no volumes."""
        given = self.openstack("volume", "create", "--size", "1", "given-vol", "-f", "json")
        self.addCleanup(self.openstack, "volume", "delete", "--force", given["id"],
                        expect_ok=False)
        wait_until(lambda: self.openstack("volume", "show", given["id"], "-f", "json")
                   ["status"] == "available", timeout=180, what="the given volume")
        self.cinder.fail("POST", r"/attachments$", 500, skip=1)
        server = self.build_fails("cinder-fails", imageRef=self.image_id,
                                  block_device_mapping_v2=[
                                      {"boot_index": 0, "uuid": self.image_id,
                                       "source_type": "image", "destination_type": "local"},
                                      {"uuid": given["id"], "source_type": "volume",
                                       "destination_type": "volume"},
                                      {"source_type": "blank", "destination_type": "volume",
                                       "volume_size": 1, "delete_on_termination": False}])
        self.assertIn("failed on purpose", server["fault"]["message"])
        self.assertEqual(server["os-extended-volumes:volumes_attached"], [])
        made = [path for method, path, how in self.cinder.seen
                if method == "POST" and path.endswith("/volumes")]
        self.assertEqual(len(made), 1)                 # the blank one
        wait_until(lambda: self.openstack("volume", "list", "--name", "cinder-fails-blank-vol",
                                          "-f", "json") == [],
                   timeout=180, what="the blank volume deleted")
        shown = self.openstack("volume", "show", given["id"], "-f", "json")
        self.assertEqual((shown["status"], shown["attachments"]), ("available", []))
        self.assertEqual(self.api("DELETE", "/servers/" + server["id"]).status, 204)
        self.assertEqual(self.openstack("volume", "show", given["id"], "-f", "json")
                         ["status"], "available")


    def test_a_failed_attachment_release_is_made_again(self):
        """Cinder refuses to connect a volume being attached, then fails the deletion of
        that attachment: the server's attach action shows a failed compute_volume_cleanup
        event, the deletion is kept in the state across a restart of minivan and made
        again, and the volume ends available with no attachment: not left reserved."""
        volume = self.openstack("volume", "create", "--size", "1", "released-vol", "-f",
                                "json")
        self.addCleanup(self.openstack, "volume", "delete", "--force", volume["id"],
                        expect_ok=False)
        wait_until(lambda: self.openstack("volume", "show", volume["id"], "-f", "json")
                   ["status"] == "available", timeout=180, what="the volume")
        made = self.api("POST", "/servers", {"server": {
            "name": "release-vm", "flavorRef": "1", "networks": "none",
            "imageRef": self.image_id}})
        server_id = made.json()["server"]["id"]
        self.addCleanup(self.api, "DELETE", "/servers/" + server_id)
        wait_until(lambda: self.api("GET", "/servers/" + server_id).json()["server"]
                   ["status"] == "ACTIVE", timeout=120, what="the server")
        self.cinder.fail("PUT", r"/attachments/[0-9a-f-]+$", 500)
        self.cinder.fail("DELETE", r"/attachments/[0-9a-f-]+$", 503, times=2)
        attach = self.api("POST", f"/servers/{server_id}/os-volume_attachments",
                          {"volumeAttachment": {"volumeId": volume["id"]}})
        self.assertEqual(attach.status, 200, attach.raw)

        def events():
            actions = self.api("GET", f"/servers/{server_id}/os-instance-actions").json()
            action = next(a for a in actions["instanceActions"]
                          if a["action"] == "attach_volume")
            return self.api("GET", f"/servers/{server_id}/os-instance-actions/"
                                   f"{action['request_id']}", version="2.51").json()[
                "instanceAction"]["events"]
        wait_until(lambda: ("compute_volume_cleanup", "Error") in
                   [(e["event"], e["result"]) for e in events()], timeout=60,
                   what="the failed clean-up recorded")
        kept = {}

        def read_state():               # (the second attempt fails too: the call is kept)
            with open(os.path.join(self.minivan_data, "state.json")) as f:
                kept.update(json.load(f)["data"]["volume_cleanups"])
        restart_minivan(self, while_down=read_state)
        self.assertEqual([(k["call"], k["volume_id"]) for k in kept.values()],
                         [("attachment_delete", volume["id"])])
        wait_until(lambda: self.openstack("volume", "show", volume["id"], "-f", "json")
                   ["status"] == "available", timeout=60, what="the attachment released")
        self.assertEqual(self.openstack("volume", "show", volume["id"], "-f", "json")
                         ["attachments"], [])
        deletes = [how for method, path, how in self.cinder.seen
                   if method == "DELETE" and "/attachments/" in path]
        self.assertEqual((deletes.count(503), deletes[-1]), (2, None))


def restart_minivan(test, kill=False, while_down=None):
    """Stop the test class's minivan (SIGKILL when kill), run while_down(), start it
    again on the same data directory."""
    if kill:
        test.minivan_proc.kill()
    else:
        test.minivan_proc.send_signal(signal.SIGTERM)
    test.minivan_proc.wait(60)
    test.minivan_log.close()
    try:
        if while_down:
            while_down()
    finally:
        port, args, env_extra = test.minivan_start
        start_minivan(type(test), port, args, env_extra, data=test.minivan_data)


class ImageServiceTests(SocketTestCase):
    """/image/v2 over the local image directory, through the real HTTP server."""

    def image_call(self, method, path, body=None, raw=None, headers=None):
        conn = self.connect()
        hdrs = {"X-Auth-Token": "admin:admin"}
        hdrs.update(headers or {})
        payload = raw if raw is not None else (json.dumps(body) if body is not None else None)
        if body is not None:
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, "/image" + path, payload, hdrs)
        resp = conn.getresponse()
        data = resp.read()
        self.assertEqual(int(resp.getheader("Content-Length")), len(data))
        conn.close()
        return resp.status, (json.loads(data) if data and resp.getheader(
            "Content-Type", "").startswith("application/json") else data)

    def test_versions_and_schema(self):
        """GET /image lists v2 (300, as Glance); the image schema is served."""
        status, body = self.image_call("GET", "")
        self.assertEqual(status, 300)
        self.assertTrue(body["versions"][0]["links"][0]["href"].endswith("/image/v2/"))
        status, body = self.image_call("GET", "/v2/schemas/image")
        self.assertEqual((status, body["name"]), (200, "image"))

    def test_create_upload_show_download_delete(self):
        """POST + PUT file makes an active image with checksums; it boots; DELETE removes it."""
        status, image = self.image_call("POST", "/v2/images", {
            "name": "up", "disk_format": "qcow2", "container_format": "bare", "color": "blue"})
        self.assertEqual((status, image["status"], image["color"]), (201, "queued", "blue"))
        data = open(make_image(os.path.join(self.tmp, "src"), "src"), "rb").read()
        status, _ = self.image_call("PUT", f"/v2/images/{image['id']}/file", raw=data,
                                    headers={"Content-Type": "application/octet-stream"})
        self.assertEqual(status, 204)
        self.assertGreater(len(data), self.app.conf["max_body_size"])
        status, shown = self.image_call("GET", f"/v2/images/{image['id']}")
        self.assertEqual((shown["status"], shown["size"], shown["checksum"]),
                         ("active", len(data), hashlib.md5(data).hexdigest()))
        self.assertEqual(shown["os_hash_value"], hashlib.sha512(data).hexdigest())
        status, got = self.image_call("GET", f"/v2/images/{image['id']}/file")
        self.assertEqual((status, got), (200, data))
        status, listed = self.image_call("GET", "/v2/images?name=up")
        self.assertEqual([i["id"] for i in listed["images"]], [image["id"]])
        status, patched = self.image_call("PATCH", f"/v2/images/{image['id']}", [
            {"op": "replace", "path": "/name", "value": "renamed"},
            {"op": "add", "path": "/os_distro", "value": "busybox"},
            {"op": "remove", "path": "/color"}],
            headers={"Content-Type": "application/openstack-images-v2.1-json-patch"})
        self.assertEqual((patched["name"], patched["os_distro"]), ("renamed", "busybox"))
        self.assertNotIn("color", patched)
        self.assertEqual(self.image_call("PUT", f"/v2/images/{image['id']}/file",
                                         raw=b"x")[0], 409)
        self.assertEqual(self.image_call("DELETE", f"/v2/images/{image['id']}")[0], 204)
        self.assertEqual(self.image_call("GET", f"/v2/images/{image['id']}")[0], 404)

    def test_errors(self):
        """Bad bodies and unknown images are Glance-style 4xx answers."""
        self.assertEqual(self.image_call("POST", "/v2/images", raw=b"{nope",
                                         headers={"Content-Type": "application/json"})[0], 400)
        self.assertEqual(self.image_call("POST", "/v2/images", {"disk_format": "floppy"})[0],
                         400)
        self.assertEqual(self.image_call("GET", "/v2/images/nope")[0], 404)
        self.assertEqual(self.image_call("GET", "/v2/images?limit=x")[0], 400)
        conn = self.connect()
        conn.request("GET", "/image/v2/images")
        self.assertEqual(conn.getresponse().status, 401)

    def test_private_images_belong_to_their_project(self):
        """An image is private to its owner's project unless public."""
        status, image = self.image_call("POST", "/v2/images", {"name": "mine"},
                                        headers={"X-Auth-Token": "alice:p1"})
        status, _ = self.image_call("GET", f"/v2/images/{image['id']}",
                                    headers={"X-Auth-Token": "bob:p2"})
        self.assertEqual(status, 404)
        self.assertEqual(self.image_call("POST", "/v2/images", {"visibility": "public"},
                                         headers={"X-Auth-Token": "bob:p2"})[0], 403)


class NetworkProxyTests(ServerTestCase):
    """os-networks, os-tenant-networks, os-floating-ip-pools and security groups (up to
    2.35, 404 above), from libvirt networks and minivan's own records."""

    def test_networks(self):
        """The libvirt networks appear as os-networks and os-tenant-networks."""
        nets = self.get("/v2.1/os-networks").json()["networks"]
        self.assertEqual([(n["id"], n["label"], n["cidr"], n["gateway"]) for n in nets],
                         [(TEST_NETWORK_ID, "default", "192.168.122.0/24", "192.168.122.1")])
        shown = self.get("/v2.1/os-tenant-networks/" + TEST_NETWORK_ID).json()["network"]
        self.assertEqual(shown, {"id": TEST_NETWORK_ID, "label": "default",
                                 "cidr": "192.168.122.0/24"})
        self.assertFault(self.get("/v2.1/os-networks/nope"), 404, "itemNotFound")
        self.assertFault(self.get("/v2.1/os-networks", version="2.36"), 404, "itemNotFound")
        self.assertFault(self.post("/v2.1/os-networks", {"network": {}}), 410, "computeFault")
        self.assertEqual(self.get("/v2.1/os-floating-ip-pools").json(),
                         {"floating_ip_pools": []})

    def test_no_floating_ips_without_neutron(self):
        """Without Neutron there is no external network: no floating IPs to list, show,
        allocate, add or remove (Nova's answers for a cloud without one)."""
        self.assertEqual(self.get("/v2.1/os-floating-ips").json(), {"floating_ips": []})
        self.assertFault(self.post("/v2.1/os-floating-ips", {"pool": "public"}), 404,
                         "itemNotFound", "Floating IP pool not found.")
        self.assertFault(self.post("/v2.1/os-floating-ips", None), 404, "itemNotFound")
        self.assertFault(self.post("/v2.1/os-floating-ips", {"pool": 3}), 400, "badRequest")
        fip = str(uuid.uuid4())
        self.assertFault(self.get("/v2.1/os-floating-ips/" + fip), 404, "itemNotFound",
                         f"Floating IP not found for ID {fip}")
        self.assertFault(self.delete("/v2.1/os-floating-ips/" + fip), 404, "itemNotFound")
        self.assertFault(self.get("/v2.1/os-floating-ips", version="2.36"), 404,
                         "itemNotFound")
        server_id = self.post_server().json()["server"]["id"]
        act = f"/v2.1/servers/{server_id}/action"
        self.assertFault(self.post(act, {"addFloatingIp": {"address": "10.0.0.9"}}), 404,
                         "itemNotFound", "floating IP not found")
        self.assertFault(self.post(act, {"addFloatingIp": {"address": "10.0.0.9",
                                                           "fixed_address": "1.2.3.4"}}),
                         400, "badRequest", "Specified fixed address not assigned")
        self.assertFault(self.post(act, {"addFloatingIp": {"address": "nope"}}), 400,
                         "badRequest")
        self.assertFault(self.post(act, {"addFloatingIp": {}}), 400, "badRequest")
        self.assertFault(self.post(act, {"removeFloatingIp": {"address": "10.0.0.9"}}), 404,
                         "itemNotFound", "Floating IP not found for address 10.0.0.9.")
        self.assertFault(self.post(act, {"removeFloatingIp": {"address": "10.0.0.9"}},
                                   version="2.44"), 404, "itemNotFound")

    def test_security_groups_and_rules(self):
        """Groups: default per project, create/show/update/delete, rules, and servers."""
        groups = self.get("/v2.1/os-security-groups", token="u:demo").json()["security_groups"]
        self.assertEqual([g["name"] for g in groups], ["default"])
        made = self.post("/v2.1/os-security-groups", {"security_group": {
            "name": "web", "description": "http"}}, token="u:demo").json()["security_group"]
        self.assertFault(self.post("/v2.1/os-security-groups", {"security_group": {
            "name": "web", "description": "again"}}, token="u:demo"), 400, "badRequest")
        rule = self.post("/v2.1/os-security-group-rules", {"security_group_rule": {
            "parent_group_id": made["id"], "ip_protocol": "tcp", "from_port": 80,
            "to_port": 80, "cidr": "10.0.0.0/8"}}, token="u:demo").json()["security_group_rule"]
        self.assertEqual((rule["ip_range"], rule["from_port"]), ({"cidr": "10.0.0.0/8"}, 80))
        self.assertFault(self.post("/v2.1/os-security-group-rules", {"security_group_rule": {
            "parent_group_id": made["id"], "ip_protocol": "tcp", "from_port": 90,
            "to_port": 80}}, token="u:demo"), 400, "badRequest")
        shown = self.get("/v2.1/os-security-groups/" + made["id"],
                         token="u:demo").json()["security_group"]
        self.assertEqual(len(shown["rules"]), 1)
        self.assertFault(self.get("/v2.1/os-security-groups/" + made["id"], token="v:other"),
                         404, "itemNotFound")
        server_id = self.new_server(token="u:demo", security_groups=[{"name": "web"}])
        names = [g["name"] for g in self.get(f"/v2.1/servers/{server_id}/os-security-groups",
                                             token="u:demo").json()["security_groups"]]
        self.assertEqual(names, ["web"])
        self.assertFault(self.delete("/v2.1/os-security-groups/" + made["id"], token="u:demo"),
                         400, "badRequest")
        self.assertEqual(self.delete("/v2.1/os-security-group-rules/" + rule["id"],
                                     token="u:demo").status, 202)
        self.delete("/v2.1/servers/" + server_id, token="u:demo")
        self.app.compute.wait_idle()
        self.assertEqual(self.delete("/v2.1/os-security-groups/" + made["id"],
                                     token="u:demo").status, 202)
        self.assertFault(self.get("/v2.1/os-security-groups", version="2.36"), 404,
                         "itemNotFound")

    def test_tempest_schemas(self):
        """Security groups and tenant networks match Tempest's schemas."""
        try:
            from tempest.lib.common import jsonschema_validator as v
            import jsonschema
        except ImportError:
            skip_or_fail(self, "tempest is not installed (pip install tempest==47.0.0)")
        made = self.post("/v2.1/os-security-groups", {"security_group": {
            "name": "s", "description": "d"}}).json()["security_group"]
        rule = self.post("/v2.1/os-security-group-rules", {"security_group_rule": {
            "parent_group_id": made["id"], "ip_protocol": "icmp", "from_port": -1,
            "to_port": -1}})
        for reply, module, name in (
                (self.get("/v2.1/os-security-groups"), "security_groups", "list_security_groups"),
                (self.get("/v2.1/os-security-groups/" + made["id"]), "security_groups",
                 "get_security_group"),
                (rule, "security_groups", "create_security_group_rule"),
                (self.get("/v2.1/os-tenant-networks"), "tenant_networks", "list_tenant_networks"),
                (self.get("/v2.1/os-tenant-networks/" + TEST_NETWORK_ID), "tenant_networks",
                 "get_tenant_network")):
            schema = tempest_schema("v2_1", module, name)
            self.assertIn(reply.status, schema["status_code"])
            jsonschema.validate(reply.json(), schema["response_body"],
                                cls=v.JSONSCHEMA_VALIDATOR, format_checker=v.FORMAT_CHECKER)


class ServerGroupTests(ServerTestCase):
    def test_crud_and_shapes(self):
        """Server groups: policies below 2.64, policy and rules from 2.64, 404 for others."""
        old = self.post("/v2.1/os-server-groups", {"server_group": {
            "name": "g1", "policies": ["affinity"]}}).json()["server_group"]
        self.assertEqual((old["policies"], old["metadata"], old["members"]),
                         (["affinity"], {}, []))
        self.assertFault(self.post("/v2.1/os-server-groups", {"server_group": {
            "name": "g", "policies": ["soft-affinity"]}}), 400, "badRequest")
        new = self.post("/v2.1/os-server-groups", {"server_group": {
            "name": "g2", "policy": "anti-affinity", "rules": {"max_server_per_host": 2}}},
            version="2.64").json()["server_group"]
        self.assertEqual((new["policy"], new["rules"]), ("anti-affinity",
                                                         {"max_server_per_host": 2}))
        self.assertFault(self.post("/v2.1/os-server-groups", {"server_group": {
            "name": "g3", "policy": "affinity", "rules": {"max_server_per_host": 2}}},
            version="2.64"), 400, "badRequest")
        self.assertEqual(len(self.get("/v2.1/os-server-groups").json()["server_groups"]), 2)
        self.assertFault(self.get("/v2.1/os-server-groups/" + new["id"], token="u:other"), 404,
                         "itemNotFound")
        self.assertEqual(self.delete("/v2.1/os-server-groups/" + old["id"]).status, 204)
        self.assertFault(self.get("/v2.1/os-server-groups/" + old["id"]), 404, "itemNotFound")

    def test_members_and_anti_affinity_on_one_host(self):
        """Members join through the group hint; hard anti-affinity lets one member build on
        this single host, the next one fails with No valid host; deleting leaves the group."""
        group = self.post("/v2.1/os-server-groups", {"server_group": {
            "name": "aa", "policies": ["anti-affinity"]}}).json()["server_group"]
        first = self.post("/v2.1/servers", {"server": {
            "name": "a1", "imageRef": self.image_id, "flavorRef": "1"},
            "os:scheduler_hints": {"group": group["id"]}}).json()["server"]["id"]
        self.app.compute.wait_idle()
        second = self.post("/v2.1/servers", {"server": {
            "name": "a2", "imageRef": self.image_id, "flavorRef": "1"},
            "os:scheduler_hints": {"group": group["id"]}}).json()["server"]["id"]
        self.app.compute.wait_idle()
        self.assertEqual(self.server(first)["status"], "ACTIVE")
        failed = self.server(second)
        self.assertEqual(failed["status"], "ERROR")
        self.assertIn("No valid host was found", failed["fault"]["message"])
        members = self.get("/v2.1/os-server-groups/" + group["id"]).json()["server_group"]
        self.assertEqual(sorted(members["members"]), sorted([first, second]))
        self.assertEqual(self.server(first, version="2.71")["server_groups"], [group["id"]])
        self.delete("/v2.1/servers/" + second)
        self.app.compute.wait_idle()
        members = self.get("/v2.1/os-server-groups/" + group["id"]).json()["server_group"]
        self.assertEqual(members["members"], [first])
        self.assertFault(self.post("/v2.1/servers", {"server": {
            "name": "x", "imageRef": self.image_id, "flavorRef": "1"},
            "os:scheduler_hints": {"group": "c0ffee00-0000-4000-8000-000000000000"}}),
            400, "badRequest")


class AdminServicesHypervisorsTests(ServerTestCase):
    def validate(self, reply, vdir, module, name):
        try:
            from tempest.lib.common import jsonschema_validator as v
            import jsonschema
        except ImportError:
            skip_or_fail(self, "tempest is not installed (pip install tempest==47.0.0)")
        schema = tempest_schema(vdir, module, name)
        self.assertIn(reply.status, schema["status_code"], reply.raw[:300])
        jsonschema.validate(reply.json(), schema["response_body"], cls=v.JSONSCHEMA_VALIDATOR,
                            format_checker=v.FORMAT_CHECKER)

    def test_services(self):
        """os-services lists conductor, scheduler and compute; disabling the compute makes
        new servers fail to schedule; 2.53 uses UUIDs."""
        services = self.get("/v2.1/os-services").json()["services"]
        self.assertEqual([s["binary"] for s in services],
                         ["nova-conductor", "nova-scheduler", "nova-compute"])
        self.validate(self.get("/v2.1/os-services"), "v2_1", "services", "list_services")
        self.validate(self.get("/v2.1/os-services", version="2.11"), "v2_11", "services",
                      "list_services")
        host = self.app.conf["host"]
        r = self.put("/v2.1/os-services/disable-log-reason", {
            "host": host, "binary": "nova-compute", "disabled_reason": "maintenance"})
        self.assertEqual(r.json()["service"]["status"], "disabled")
        failed = self.post_server()
        self.assertIn("No valid host", self.server(failed.json()["server"]["id"])["fault"]
                      ["message"])
        self.put("/v2.1/os-services/enable", {"host": host, "binary": "nova-compute"})
        self.new_server()
        self.assertFault(self.put("/v2.1/os-services/enable", {"host": "nope",
                                                               "binary": "nova-compute"}),
                         404, "itemNotFound")
        listed = self.get("/v2.1/os-services?binary=nova-compute", version="2.53").json()
        uid = listed["services"][0]["id"]
        self.assertTrue(minivan.is_uuid_like(uid))
        r = self.put("/v2.1/os-services/" + uid, {"forced_down": True}, version="2.53")
        self.assertEqual((r.json()["service"]["forced_down"], r.json()["service"]["state"]),
                         (True, "down"))
        self.validate(r, "v2_53", "services", "update_service")
        self.put("/v2.1/os-services/" + uid, {"forced_down": False}, version="2.53")
        self.assertFault(self.delete("/v2.1/os-services/" + uid, version="2.53"), 409,
                         "conflictingRequest")
        self.assertFault(self.get("/v2.1/os-services", token="u:p"), 403, "forbidden")

    def test_hypervisors(self):
        """os-hypervisors: list, detail, show, statistics, uptime, search and servers, in the
        shapes of each microversion."""
        server_id = self.new_server()
        for version, vdir in (("2.1", "v2_1"), ("2.28", "v2_28"), ("2.33", "v2_33"),
                              ("2.53", "v2_53"), ("2.87", "v2_53")):
            self.validate(self.get("/v2.1/os-hypervisors", version=version), vdir,
                          "hypervisors", "list_search_hypervisors")
            self.validate(self.get("/v2.1/os-hypervisors/detail", version=version), vdir,
                          "hypervisors", "list_hypervisors_detail")
        detail = self.get("/v2.1/os-hypervisors/detail").json()["hypervisors"][0]
        self.assertEqual((detail["running_vms"], detail["vcpus_used"], detail["vcpus"]),
                         (1, 1, 4))
        self.validate(self.get("/v2.1/os-hypervisors/1"), "v2_1", "hypervisors", "get_hypervisor")
        self.validate(self.get("/v2.1/os-hypervisors/statistics"), "v2_1", "hypervisors",
                      "get_hypervisor_statistics")
        self.validate(self.get("/v2.1/os-hypervisors/1/uptime"), "v2_1", "hypervisors",
                      "get_hypervisor_uptime")
        host = self.app.conf["host"]
        found = self.get(f"/v2.1/os-hypervisors/{host}/servers").json()["hypervisors"][0]
        self.assertEqual(found["servers"][0]["uuid"], server_id)
        self.assertFault(self.get("/v2.1/os-hypervisors/nomatch/search"), 404, "itemNotFound")
        latest = self.get("/v2.1/os-hypervisors?with_servers=true", version="2.53").json()
        hyp = latest["hypervisors"][0]
        self.assertEqual(hyp["servers"][0]["uuid"], server_id)
        shown = self.get("/v2.1/os-hypervisors/" + hyp["id"], version="2.88").json()
        self.assertIn("uptime", shown["hypervisor"])
        self.assertNotIn("vcpus", shown["hypervisor"])
        self.assertFault(self.get("/v2.1/os-hypervisors/statistics", version="2.88"), 404,
                         "itemNotFound")
        self.assertFault(self.get("/v2.1/os-hypervisors", token="u:p"), 403, "forbidden")


class TenantUsageTests(ServerTestCase):
    def test_usage(self):
        """os-simple-tenant-usage totals hours × resources per project (admin for all)."""
        self.new_server(token="u:demo")
        self.clock.t += datetime.timedelta(hours=2)
        start = (self.clock.t - datetime.timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M:%S")
        end = self.clock.t.strftime("%Y-%m-%dT%H:%M:%S")
        listed = self.get(f"/v2.1/os-simple-tenant-usage?start={start}&end={end}&detailed=1"
                          ).json()["tenant_usages"]
        self.assertEqual(len(listed), 1)
        usage = listed[0]
        self.assertEqual(usage["tenant_id"], "demo")
        self.assertAlmostEqual(usage["total_hours"], 2.0, places=2)
        self.assertAlmostEqual(usage["total_memory_mb_usage"], 1024.0, places=0)
        self.assertEqual(usage["server_usages"][0]["state"], "active")
        mine = self.get(f"/v2.1/os-simple-tenant-usage/demo?start={start}&end={end}",
                        token="u:demo").json()["tenant_usage"]
        self.assertAlmostEqual(mine["total_vcpus_usage"], 2.0, places=2)
        self.assertFault(self.get("/v2.1/os-simple-tenant-usage", token="u:demo"), 403,
                         "forbidden")
        self.assertFault(self.get("/v2.1/os-simple-tenant-usage/admin", token="u:demo"), 403,
                         "forbidden")
        self.assertEqual(self.get("/v2.1/os-simple-tenant-usage/nobody").json(),
                         {"tenant_usage": {}})
        self.assertFault(self.get(f"/v2.1/os-simple-tenant-usage?start={end}&end={start}"), 400,
                         "badRequest")
        try:
            from tempest.lib.common import jsonschema_validator as v
            import jsonschema
        except ImportError:
            skip_or_fail(self, "tempest is not installed (pip install tempest==47.0.0)")
        for reply, name in ((self.get(f"/v2.1/os-simple-tenant-usage?start={start}&end={end}"
                                      "&detailed=1"), "list_tenant_usage"),
                            (self.get(f"/v2.1/os-simple-tenant-usage/demo?start={start}"
                                      f"&end={end}"), "get_tenant_usage")):
            schema = tempest_schema("v2_1", "tenant_usages", name)
            jsonschema.validate(reply.json(), schema["response_body"],
                                cls=v.JSONSCHEMA_VALIDATOR, format_checker=v.FORMAT_CHECKER)


    def test_usage_pages_by_instance(self):
        """From 2.40 usage pages by instance, as Nova: the marker is the last server's id,
        the page after the last one is empty (Horizon follows the markers until then),
        and an unknown marker is 400."""
        ids = []
        for _ in range(3):
            ids.append(self.new_server(token="u:demo"))
            self.clock.t += datetime.timedelta(seconds=1)     # the order is created_at's
        other = self.new_server(token="u:alt")
        self.clock.t += datetime.timedelta(hours=1)
        query = "start=2000-01-01T00:00:00&end=2100-01-01T00:00:00"
        seen, marker = [], None
        for _ in range(4):
            page = self.get(f"/v2.1/os-simple-tenant-usage/demo?{query}&limit=2"
                            + (f"&marker={marker}" if marker else ""), version="2.40",
                            token="u:demo").json()["tenant_usage"]
            if not page:
                break
            seen += [u["instance_id"] for u in page["server_usages"]]
            marker = page["server_usages"][-1]["instance_id"]
        self.assertEqual(seen, ids)
        first = self.get(f"/v2.1/os-simple-tenant-usage/demo?{query}&limit=2", version="2.40",
                         token="u:demo").json()
        self.assertIn(f"marker={ids[1]}", first["tenant_usage_links"][0]["href"])
        whole = self.get(f"/v2.1/os-simple-tenant-usage?{query}&detailed=1&limit=3",
                         version="2.40").json()
        self.assertEqual([(u["tenant_id"], len(u["server_usages"]))
                          for u in whole["tenant_usages"]], [("demo", 3)])
        self.assertIn(f"marker={ids[2]}", whole["tenant_usages_links"][0]["href"])
        rest = self.get(f"/v2.1/os-simple-tenant-usage?{query}&detailed=1&marker={ids[2]}",
                        version="2.40").json()
        self.assertEqual([(u["tenant_id"], [s["instance_id"] for s in u["server_usages"]])
                          for u in rest["tenant_usages"]], [("alt", [other])])
        self.assertNotIn("tenant_usages_links", rest)
        self.assertFault(self.get(f"/v2.1/os-simple-tenant-usage?{query}&marker=nope",
                                  version="2.40"), 400, "badRequest", "marker [nope] not found")


class AggregateTests(ServerTestCase):
    def test_aggregates(self):
        """Aggregates: CRUD, hosts, metadata; an aggregate's zone becomes the host's zone."""
        host = self.app.conf["host"]
        made = self.post("/v2.1/os-aggregates", {"aggregate": {
            "name": "rack1", "availability_zone": "az-rack1"}}).json()["aggregate"]
        self.assertEqual((made["name"], made["availability_zone"]), ("rack1", "az-rack1"))
        self.assertFault(self.post("/v2.1/os-aggregates", {"aggregate": {"name": "rack1"}}),
                         409, "conflictingRequest")
        base = f"/v2.1/os-aggregates/{made['id']}"
        r = self.post(base + "/action", {"add_host": {"host": host}})
        self.assertEqual(r.json()["aggregate"]["hosts"], [host])
        self.assertFault(self.post(base + "/action", {"add_host": {"host": "elsewhere"}}), 404,
                         "itemNotFound")
        zones = self.get("/v2.1/os-availability-zone").json()["availabilityZoneInfo"]
        self.assertEqual(zones[0]["zoneName"], "az-rack1")
        server_id = self.new_server()
        self.assertEqual(self.server(server_id)["OS-EXT-AZ:availability_zone"], "az-rack1")
        r = self.post(base + "/action", {"set_metadata": {"metadata": {"ssd": "true"}}})
        self.assertEqual(r.json()["aggregate"]["metadata"],
                         {"availability_zone": "az-rack1", "ssd": "true"})
        shown = self.get(base, version="2.41").json()["aggregate"]
        self.assertTrue(minivan.is_uuid_like(shown["uuid"]))
        self.assertEqual(self.put(base, {"aggregate": {"name": "rack-one"}}).json()
                         ["aggregate"]["name"], "rack-one")
        self.assertFault(self.delete(base), 400, "badRequest")
        self.post(base + "/action", {"remove_host": {"host": host}})
        self.assertFault(self.post(base + "/action", {"remove_host": {"host": host}}), 404,
                         "itemNotFound")
        self.assertFault(self.post(base + "/images", {"cache": [{"id": self.image_id}]}), 404,
                         "itemNotFound")
        self.post(base + "/action", {"add_host": {"host": host}})
        r = self.post(base + "/images", {"cache": [{"id": self.image_id}]}, version="2.81")
        self.assertEqual(r.status, 202)
        image_file = self.app.images.path(self.app.images.get(self.image_id))
        cached = os.path.join(self.app.conf["data_dir"], "_base",
                              "sha512-" + minivan.file_sha512(image_file))
        wait_until(lambda: os.path.exists(cached), timeout=10, what="the image in the cache")
        self.assertFault(self.post(base + "/images", {"cache": [
            {"id": "c0ffee00-0000-4000-8000-000000000000"}]}, version="2.81"), 400,
            "badRequest")
        self.post(base + "/action", {"remove_host": {"host": host}})
        self.assertEqual(self.delete(base).status, 200)
        self.assertFault(self.get(base), 404, "itemNotFound")
        self.assertFault(self.get("/v2.1/os-aggregates", token="u:p"), 403, "forbidden")
        try:
            from tempest.lib.common import jsonschema_validator as v
            import jsonschema
        except ImportError:
            skip_or_fail(self, "tempest is not installed (pip install tempest==47.0.0)")
        made = self.post("/v2.1/os-aggregates", {"aggregate": {"name": "r2"}}, version="2.41")
        for reply, vdir, name in ((made, "v2_41", "create_aggregate"),
                                  (self.get("/v2.1/os-aggregates", version="2.41"), "v2_41",
                                   "list_aggregates"),
                                  (self.get("/v2.1/os-aggregates"), "v2_1", "list_aggregates")):
            schema = tempest_schema(vdir, "aggregates", name)
            self.assertIn(reply.status, schema["status_code"])
            jsonschema.validate(reply.json(), schema["response_body"],
                                cls=v.JSONSCHEMA_VALIDATOR, format_checker=v.FORMAT_CHECKER)


class MigrationTests(ServerTestCase):
    def test_resizes_are_migrations(self):
        """A resize is a 'resize' migration: finished, then confirmed or reverted."""
        server_id = self.new_server()
        self.action(server_id, {"resize": {"flavorRef": "2"}})
        migs = self.get("/v2.1/os-migrations", version="2.80").json()["migrations"]
        self.assertEqual([(m["instance_uuid"], m["status"], m["migration_type"])
                          for m in migs], [(server_id, "finished", "resize")])
        self.assertEqual((migs[0]["project_id"], migs[0]["old_instance_type_id"],
                          migs[0]["new_instance_type_id"]), ("admin", 1, 2))
        self.action(server_id, {"confirmResize": None})
        self.action(server_id, {"resize": {"flavorRef": "3"}})
        self.action(server_id, {"revertResize": None})
        statuses = [m["status"] for m in self.get(
            "/v2.1/os-migrations?instance_uuid=" + server_id).json()["migrations"]]
        self.assertEqual(sorted(statuses), ["confirmed", "reverted"])
        page = self.get("/v2.1/os-migrations?limit=1", version="2.59").json()
        self.assertIn("migrations_links", page)
        self.assertEqual(self.get(f"/v2.1/servers/{server_id}/migrations",
                                  version="2.23").json(), {"migrations": []})
        self.assertFault(self.get("/v2.1/os-migrations", token="u:p"), 403, "forbidden")
        self.assertFault(self.get("/v2.1/os-migrations?bogus=1", version="2.59"), 400,
                         "badRequest")
        try:
            from tempest.lib.common import jsonschema_validator as v
            import jsonschema
        except ImportError:
            skip_or_fail(self, "tempest is not installed (pip install tempest==47.0.0)")
        for version, vdir in (("2.1", "v2_1"), ("2.23", "v2_23"), ("2.59", "v2_59"),
                              ("2.80", "v2_80")):
            reply = self.get("/v2.1/os-migrations", version=version)
            schema = tempest_schema(vdir, "migrations", "list_migrations")
            jsonschema.validate(reply.json(), schema["response_body"],
                                cls=v.JSONSCHEMA_VALIDATOR, format_checker=v.FORMAT_CHECKER)


def host_node_xml(cpus, memory_mb):
    """A simulated host for libvirt's test driver with this many CPUs and this memory."""
    return TEST_NODE_XML.replace("<active>4</active>", f"<active>{cpus}</active>").replace(
        "<cores>4</cores>", f"<cores>{cpus}</cores>").replace(
        "<memory>8388608</memory>", f"<memory>{memory_mb * 1024}</memory>")


def numa_caps_xml(cells):
    """A made-up host's libvirt capabilities (for --numa-topology): cells is
    [(cpus, MiB, {page KiB: count})], CPUs numbered on across cells, no SMT."""
    parts, cpu = [], 0
    for index, (cpus, memory, pages) in enumerate(cells):
        pages = {4: memory * 256, **pages}
        parts.append(f"<cell id='{index}'><memory unit='KiB'>{memory * 1024}</memory>" +
                     "".join(f"<pages unit='KiB' size='{size}'>{count}</pages>"
                             for size, count in sorted(pages.items())) +
                     f"<cpus num='{cpus}'>" + "".join(
                         f"<cpu id='{n}' socket_id='{index}' core_id='{n - cpu}' "
                         f"siblings='{n}'/>" for n in range(cpu, cpu + cpus)) +
                     "</cpus></cell>")
        cpu += cpus
    return (f"<capabilities><host><topology><cells num='{len(cells)}'>{''.join(parts)}"
            "</cells></topology></host></capabilities>")


class NumaSchedulingTests(ServerTestCase):
    """Guests with NUMA cells, dedicated CPUs and huge pages on simulated hosts whose
    NUMA cells are made up (--numa-topology): the scheduler places them only where their
    cells fit the free ones, pinned servers never share a CPU, and a resize re-places."""

    # two cells of four CPUs each, 2 MiB pages only in cmp-a's second
    HOSTS = (("cmp-a", [(4, 4096, {}), (4, 4096, {2048: 512})]),
             ("cmp-b", [(4, 2048, {}), (4, 2048, {})]))
    conf = {"cpu_dedicated_set": "2-3,6-7", "cpu_shared_set": "0-1,4-5"}

    def start_app(self):
        pairs, tops = [], []
        for name, cells in self.HOSTS:
            node, caps = (os.path.join(self.tmp, name + suffix) for suffix in (".xml", ".caps"))
            with open(node, "w") as f:
                f.write(host_node_xml(sum(c[0] for c in cells), sum(c[1] for c in cells)))
            with open(caps, "w") as f:
                f.write(numa_caps_xml(cells))
            pairs.append(f"{name}=test://{node}")
            tops.append(f"{name}={caps}")
        conf = minivan.default_config(data_dir=self.tmp, port="8774",
                                      compute_hosts=",".join(pairs),
                                      numa_topology=",".join(tops), **self.conf)
        self.store = minivan.open_store(conf)
        drivers = {name: minivan.LibvirtDriver(uri, "qemu", conf["network"],
                                               conf["instances_dir"], conf["volume_mount_base"])
                   for name, uri in conf["compute_hosts"]}
        minivan.configure_drivers(conf, drivers)
        for driver in drivers.values():
            driver.connect()
        self.app = minivan.App(conf, self.store, drivers=drivers, clock=self.clock)
        self.app.compute.reconcile()

    def flavor(self, flavor_id, vcpus, ram, **specs):
        r = self.post("/v2.1/flavors", {"flavor": {"name": "f" + flavor_id, "id": flavor_id,
                                                   "ram": ram, "vcpus": vcpus, "disk": 1}})
        self.assertEqual(r.status, 200, r.raw)
        if specs:
            r = self.post(f"/v2.1/flavors/{flavor_id}/os-extra_specs", {"extra_specs": specs})
            self.assertEqual(r.status, 200, r.raw)
        return flavor_id

    def topology(self, server_id, token="admin:admin"):
        r = self.get(f"/v2.1/servers/{server_id}/topology", version="2.78", token=token)
        self.assertEqual(r.status, 200, r.raw)
        return r.json()

    def domain_xml(self, server_id):
        host = self.server(server_id)["OS-EXT-SRV-ATTR:host"]
        return self.app.drivers[host].conn.lookupByUUIDString(server_id).XMLDesc(0)

    def test_pinned_servers_never_share_a_cpu(self):
        """Dedicated 2-vCPU servers take the dedicated set's CPUs two by two, each on one
        cell, never one another's; when none is left the next build fails with No valid
        host; a delete frees its CPUs for the next.  The server topology API shows the
        pinning to an admin and not to its owner."""
        self.flavor("ded2", 2, 512, **{"hw:cpu_policy": "dedicated"})
        servers, pinned = [], []
        for n in range(4):
            token = "demo:demo" if n == 0 else "admin:admin"     # the first one is demo's
            server_id = self.new_server(flavorRef="ded2", name=f"pinned-{n}", token=token)
            servers.append(server_id)
            nodes = self.topology(server_id)["nodes"]
            self.assertEqual(len(nodes), 1)
            cpus = sorted(nodes[0]["cpu_pinning"].values())
            self.assertEqual(len(cpus), 2)
            self.assertTrue(set(cpus) <= {2, 3, 6, 7}, cpus)
            pinned.append((self.server(server_id)["OS-EXT-SRV-ATTR:host"], tuple(cpus)))
        self.assertEqual(sorted(pinned), [(host, cpus) for host in ("cmp-a", "cmp-b")
                                          for cpus in ((2, 3), (6, 7))])
        r = self.post_server(flavorRef="ded2", name="one-too-many")
        late = self.server(r.json()["server"]["id"])
        self.assertEqual(late["status"], "ERROR")
        self.assertIn("No valid host was found", late["fault"]["message"])
        xml = self.domain_xml(servers[0])
        host, cpus = pinned[0]
        for vcpu, pcpu in enumerate(cpus):
            self.assertIn(f"<vcpupin vcpu='{vcpu}' cpuset='{pcpu}'/>", xml)
        self.assertNotIn("cpu_pinning", self.topology(servers[0], token="demo:demo")
                         ["nodes"][0])
        self.assertEqual(self.delete("/v2.1/servers/" + servers[0]).status, 204)
        self.app.compute.wait_idle()
        again = self.new_server(flavorRef="ded2", name="again")
        self.assertEqual(
            (self.server(again)["OS-EXT-SRV-ATTR:host"],
             tuple(sorted(self.topology(again)["nodes"][0]["cpu_pinning"].values()))),
            (host, cpus))

    def test_huge_pages_only_where_a_cell_has_them(self):
        """A 2 MiB-page guest goes only to the host whose cell has such pages, binds its
        memory to that cell and is backed by them, until its pages run out."""
        self.flavor("huge", 1, 512, **{"hw:mem_page_size": "2MB"})
        first = self.new_server(flavorRef="huge", name="huge-0")
        self.assertEqual(self.server(first)["OS-EXT-SRV-ATTR:host"], "cmp-a")
        topology = self.topology(first)
        self.assertEqual((topology["pagesize_kb"], topology["nodes"][0]["host_node"]),
                         (2048, 1))
        xml = self.domain_xml(first)
        self.assertIn("<page size='2048' unit='KiB' nodeset='0'/>", xml)
        self.assertIn("<memnode cellid='0' mode='strict' nodeset='1'/>", xml)
        self.new_server(flavorRef="huge", name="huge-1")       # 512 pages: two guests
        r = self.post_server(flavorRef="huge", name="huge-2")
        late = self.server(r.json()["server"]["id"])
        self.assertEqual(late["status"], "ERROR")
        self.assertIn("No valid host was found", late["fault"]["message"])

    def test_resize_from_shared_to_dedicated_re_places(self):
        """A server of a shared flavor has no NUMA cells; resized to a dedicated flavor it
        is pinned while it waits for confirmation; a revert gives the old (unpinned)
        shape back and frees the CPUs, a confirm keeps the pinning."""
        self.flavor("shared2", 2, 512)
        self.flavor("ded2", 2, 512, **{"hw:cpu_policy": "dedicated"})
        server_id = self.new_server(flavorRef="shared2")
        self.assertEqual(self.topology(server_id), {"nodes": [], "pagesize_kb": None})
        self.assertNotIn("<vcpupin", self.domain_xml(server_id))
        self.assertIn("cpuset='0-1,4-5'", self.domain_xml(server_id))
        for finish in ("revertResize", "confirmResize"):
            r = self.action(server_id, {"resize": {"flavorRef": "ded2"}})
            self.assertEqual(r.status, 202, r.raw)
            self.assertEqual(self.server(server_id)["status"], "VERIFY_RESIZE")
            pins = self.topology(server_id)["nodes"][0]["cpu_pinning"]
            self.assertTrue(set(pins.values()) <= {2, 3, 6, 7}, pins)
            self.assertIn("<vcpupin vcpu='0'", self.domain_xml(server_id))
            self.assertEqual(self.action(server_id, {finish: None}).status,
                             204 if finish == "confirmResize" else 202)
            self.assertEqual(self.server(server_id)["status"], "ACTIVE")
            if finish == "revertResize":
                self.assertEqual(self.topology(server_id), {"nodes": [], "pagesize_kb": None})
                self.assertNotIn("<vcpupin", self.domain_xml(server_id))
        self.assertEqual(self.topology(server_id)["nodes"][0]["cpu_pinning"], pins)
        self.assertIn("<vcpupin vcpu='1'", self.domain_xml(server_id))

    def test_rebuild_keeps_the_numa_topology(self):
        """A rebuild onto an image that would change the server's NUMA request (here give
        it cells) is Nova's 400; one that changes nothing else of it goes ahead."""
        self.flavor("shared2", 2, 512)
        server_id = self.new_server(flavorRef="shared2")
        make_image(self.app.conf["images_dir"], "cells")
        make_image(self.app.conf["images_dir"], "plain")
        images = {i["name"]: i["id"] for i in
                  self.get("/v2.1/images", version="2.35").json()["images"]}
        r = self.post(f"/v2.1/images/{images['cells']}/metadata",
                      {"metadata": {"hw_numa_nodes": "1"}})
        self.assertEqual(r.status, 200, r.raw)
        self.assertFault(self.action(server_id, {"rebuild": {"imageRef": images["cells"]}}),
                         400, "badRequest", "An instance's NUMA topology cannot be changed "
                         "as part of a rebuild. The image provided is invalid for this "
                         "instance.")
        r = self.action(server_id, {"rebuild": {"imageRef": images["plain"]}})
        self.assertEqual(r.status, 202, r.raw)
        self.assertEqual(self.server(server_id)["status"], "ACTIVE")

    def test_no_cells_no_numa_guest(self):
        """A host whose libvirt reports no NUMA cells (no --numa-topology for it) gets no
        guest with NUMA cells: No valid host."""
        self.app.drivers["cmp-a"].numa_topology = None
        self.app.drivers["cmp-a"]._numa_cells = None
        self.app.drivers["cmp-b"].numa_topology = None
        self.app.drivers["cmp-b"]._numa_cells = None
        self.flavor("cells", 2, 512, **{"hw:numa_nodes": "1"})
        r = self.post_server(flavorRef="cells")
        server = self.server(r.json()["server"]["id"])
        self.assertEqual(server["status"], "ERROR")
        self.assertIn("No valid host was found", server["fault"]["message"])


class MultiHostTests(ServerTestCase):
    """Three simulated compute hosts (libvirt's test driver, one connection each): the
    scheduler's filters and weighers, moves between hosts, and hosts that go down."""

    HOSTS = (("cmp-a", 4, 8192), ("cmp-b", 4, 16384), ("cmp-c", 2, 4096))

    def start_app(self):
        pairs = []
        for name, cpus, memory in self.HOSTS:
            path = os.path.join(self.tmp, name + ".xml")
            with open(path, "w") as f:
                f.write(host_node_xml(cpus, memory))
            pairs.append(f"{name}=test://{path}")
        conf = minivan.default_config(data_dir=self.tmp, port="8774",
                                      compute_hosts=",".join(pairs), **self.conf)
        self.store = minivan.open_store(conf)
        drivers = {}
        for name, uri in conf["compute_hosts"]:
            drivers[name] = minivan.LibvirtDriver(uri, "qemu", conf["network"],
                                                  conf["instances_dir"],
                                                  conf["volume_mount_base"])
            drivers[name].connect()
        self.app = minivan.App(conf, self.store, drivers=drivers, clock=self.clock)
        self.app.compute.reconcile()

    def host_of(self, server_id):
        return self.server(server_id)["OS-EXT-SRV-ATTR:host"]

    def domain_hosts(self, server_id):
        """The hosts whose libvirt has a domain for the server."""
        return [name for name, driver in self.app.drivers.items()
                if driver.exists({"id": server_id, "instance_name": ""})]

    def test_a_failed_move_never_leaves_two_guests_running(self):
        """A cold migration whose start on the destination fails after the guest started
        there (the answer was lost), and whose clean-up there fails too: the server is not
        started again on its source; it is ERROR, stopped there, with a fault naming the
        destination.  With the clean-up working, it is back and running on its source."""
        from unittest import mock
        for cleanup_works in (False, True):
            server_id = self.new_server()
            source = self.host_of(server_id)
            dest = next(h for h, _, _ in self.HOSTS if h != source)
            dst = self.app.drivers[dest]
            real_power_on = dst.power_on

            def lost_answer(server, *args, **kwargs):
                real_power_on(server, *args, **kwargs)
                raise minivan.Unavailable("The hypervisor is unreachable.")
            with contextlib.ExitStack() as stack:
                stack.enter_context(mock.patch.object(dst, "power_on", lost_answer))
                if not cleanup_works:
                    stack.enter_context(mock.patch.object(dst, "destroy", side_effect=(
                        minivan.Unavailable("The hypervisor is unreachable."))))
                r = self.action(server_id, {"migrate": {"host": dest}}, version="2.56")
                self.assertEqual(r.status, 202, r.raw)
            server = self.server(server_id, version="2.62")
            running = [name for name, driver in self.app.drivers.items()
                       if driver.exists({"id": server_id, "instance_name": ""})
                       and driver.get_info(dict(server, id=server_id)) == minivan.RUNNING]
            if cleanup_works:
                self.assertEqual((server["status"], server["OS-EXT-SRV-ATTR:host"], running),
                                 ("ACTIVE", source, [source]))
            else:
                self.assertEqual((server["status"], server["OS-EXT-SRV-ATTR:host"]),
                                 ("ERROR", source))
                self.assertIn(f"moving the server to {dest} failed", server["fault"]["message"])
                self.assertNotIn(source, running)
                # the destination answers again: its reconcile removes the stray domain,
                # and a hard reboot starts the server on its source
                self.app.compute.reconcile([dest])
                self.assertEqual(self.domain_hosts(server_id), [source])
                self.assertEqual(self.action(server_id, {"reboot": {"type": "HARD"}}).status,
                                 202)
                self.assertEqual(self.server(server_id)["status"], "ACTIVE")
                self.assertEqual(self.domain_state(server_id, source), 1)
            self.delete("/v2.1/servers/" + server_id)
            self.app.compute.wait_idle()

    def test_services_hypervisors_and_zones_per_host(self):
        """Each host is a nova-compute service and a hypervisor; statistics add them up;
        os-hosts and the zones list them."""
        services = self.get("/v2.1/os-services?binary=nova-compute").json()["services"]
        self.assertEqual([(s["id"], s["host"], s["state"]) for s in services],
                         [(3, "cmp-a", "up"), (4, "cmp-b", "up"), (5, "cmp-c", "up")])
        hyps = self.get("/v2.1/os-hypervisors/detail", version="2.27").json()["hypervisors"]
        self.assertEqual([(h["id"], h["hypervisor_hostname"], h["vcpus"], h["memory_mb"])
                          for h in hyps], [(1, "cmp-a", 4, 8192), (2, "cmp-b", 4, 16384),
                                           (3, "cmp-c", 2, 4096)])
        self.assertEqual(self.get("/v2.1/os-hypervisors/3").json()["hypervisor"]
                         ["hypervisor_hostname"], "cmp-c")
        self.assertFault(self.get("/v2.1/os-hypervisors/4"), 404, "itemNotFound")
        stats = self.get("/v2.1/os-hypervisors/statistics").json()["hypervisor_statistics"]
        self.assertEqual((stats["count"], stats["vcpus"], stats["memory_mb"],
                          stats["memory_mb_used"]), (3, 10, 28672, 3 * 512))
        found = self.get("/v2.1/os-hypervisors/cmp-/search").json()["hypervisors"]
        self.assertEqual(len(found), 3)
        page = self.get("/v2.1/os-hypervisors?limit=2", version="2.53").json()
        self.assertEqual(len(page["hypervisors"]), 2)
        self.assertIn("hypervisors_links", page)
        hosts = self.get("/v2.1/os-hosts").json()["hosts"]
        self.assertEqual(sorted(h["host_name"] for h in hosts if h["service"] == "compute"),
                         ["cmp-a", "cmp-b", "cmp-c"])
        self.assertEqual(self.get("/v2.1/os-hosts/cmp-b").json()["host"][0]["resource"]
                         ["memory_mb"], 16384)
        detail = self.get("/v2.1/os-availability-zone/detail").json()["availabilityZoneInfo"]
        nova = [z for z in detail if z["zoneName"] == "nova"][0]
        self.assertEqual(sorted(nova["hosts"]), ["cmp-a", "cmp-b", "cmp-c"])

    def test_scheduler_spreads_by_free_memory_and_filters(self):
        """New servers go where the most memory is free; a disabled host, a zone, the
        2.74 host and the az:host forced form narrow the choice; a flavor no host can
        hold fails with Nova's 'No valid host' fault."""
        placed = [self.host_of(self.new_server(name=f"s{i}")) for i in range(3)]
        self.assertEqual(placed, ["cmp-b", "cmp-b", "cmp-b"])     # 16 GB free vs 8 and 4
        services = {s["host"]: s["id"] for s in self.get(
            "/v2.1/os-services?binary=nova-compute", version="2.53").json()["services"]}
        self.put("/v2.1/os-services/" + services["cmp-b"],
                 {"status": "disabled", "disabled_reason": "maintenance"}, version="2.53")
        self.assertEqual(self.host_of(self.new_server(name="s3")), "cmp-a")
        r = self.post_server(name="s4", version="2.74", host="cmp-c")
        self.assertEqual(self.host_of(r.json()["server"]["id"]), "cmp-c")
        r = self.post_server(name="s5", availability_zone="nova:cmp-c")
        self.assertEqual(self.host_of(r.json()["server"]["id"]), "cmp-c")
        self.assertFault(self.post_server(name="x", version="2.74", host="cmp-z"), 400,
                         "badRequest", "cmp-z")
        self.assertFault(self.post_server(name="x", availability_zone="nova:cmp-a",
                                          token="u:p"), 403, "forbidden")
        r = self.post_server(name="s6", version="2.74", host="cmp-b")
        failed = self.server(r.json()["server"]["id"])
        self.assertEqual(failed["status"], "ERROR")
        self.assertIn("No valid host was found", failed["fault"]["message"])
        agg = self.post("/v2.1/os-aggregates", {"aggregate": {
            "name": "small", "availability_zone": "edge"}}).json()["aggregate"]
        self.post(f"/v2.1/os-aggregates/{agg['id']}/action", {"add_host": {"host": "cmp-c"}})
        zones = self.get("/v2.1/os-availability-zone").json()["availabilityZoneInfo"]
        self.assertEqual(sorted(z["zoneName"] for z in zones), ["edge", "nova"])
        r = self.post_server(name="s7", availability_zone="edge")
        self.assertEqual(self.server(r.json()["server"]["id"])["OS-EXT-AZ:availability_zone"],
                         "edge")
        self.assertEqual(self.host_of(r.json()["server"]["id"]), "cmp-c")
        self.assertFault(self.post_server(name="x", availability_zone="nowhere"), 400,
                         "badRequest")
        big = self.post("/v2.1/flavors", {"flavor": {"name": "huge", "ram": 32768, "vcpus": 1,
                                                     "disk": 1}}).json()["flavor"]
        r = self.post_server(name="huge", flavorRef=big["id"])
        self.assertIn("No valid host was found",
                      self.server(r.json()["server"]["id"])["fault"]["message"])

    def test_cpu_allocation_ratio_and_stacking(self):
        """--ram-weight-multiplier below zero stacks servers; vCPUs are placed up to the
        host's CPUs times --cpu-allocation-ratio."""
        self.app.conf["ram_weight_multiplier"] = -1.0
        self.app.conf["cpu_allocation_ratio"] = 1.0
        flavor = self.post("/v2.1/flavors", {"flavor": {"name": "two", "ram": 256,
                                                        "vcpus": 2, "disk": 1}}).json()
        placed = [self.host_of(self.new_server(name=f"s{i}", flavorRef=flavor["flavor"]["id"]))
                  for i in range(5)]
        self.assertEqual(placed, ["cmp-c", "cmp-a", "cmp-a", "cmp-b", "cmp-b"])
        r = self.post_server(name="full", flavorRef=flavor["flavor"]["id"])
        self.assertEqual(self.server(r.json()["server"]["id"])["status"], "ERROR")

    def test_server_group_policies_across_hosts(self):
        """anti-affinity spreads members over the hosts until none is left;
        max_server_per_host (2.64) allows more per host; affinity keeps them together;
        the same_host and different_host hints are followed."""
        self.put("/v2.1/os-quota-sets/admin", {"quota_set": {"instances": 50, "cores": 50}})
        group = self.post("/v2.1/os-server-groups", {"server_group": {
            "name": "apart", "policies": ["anti-affinity"]}}).json()["server_group"]
        hints = {"group": group["id"]}
        hosts = []
        for i in range(3):
            r = self.post("/v2.1/servers", {"server": {
                "name": f"m{i}", "imageRef": self.image_id, "flavorRef": "1"},
                "os:scheduler_hints": hints})
            self.app.compute.wait_idle()
            hosts.append(self.host_of(r.json()["server"]["id"]))
        self.assertEqual(sorted(hosts), ["cmp-a", "cmp-b", "cmp-c"])
        r = self.post("/v2.1/servers", {"server": {
            "name": "m3", "imageRef": self.image_id, "flavorRef": "1"},
            "os:scheduler_hints": hints})
        self.app.compute.wait_idle()
        self.assertEqual(self.server(r.json()["server"]["id"])["status"], "ERROR")
        two = self.post("/v2.1/os-server-groups", {"server_group": {
            "name": "two", "policy": "anti-affinity", "rules": {"max_server_per_host": 2}}},
            version="2.64").json()["server_group"]
        hosts = []
        for i in range(6):
            r = self.post("/v2.1/servers", {"server": {
                "name": f"t{i}", "imageRef": self.image_id, "flavorRef": "1"},
                "os:scheduler_hints": {"group": two["id"]}})
            self.app.compute.wait_idle()
            hosts.append(self.host_of(r.json()["server"]["id"]))
        self.assertEqual(sorted(collections.Counter(hosts).values()), [2, 2, 2])
        together = self.post("/v2.1/os-server-groups", {"server_group": {
            "name": "together", "policies": ["affinity"]}}).json()["server_group"]
        hosts = set()
        for i in range(3):
            r = self.post("/v2.1/servers", {"server": {
                "name": f"a{i}", "imageRef": self.image_id, "flavorRef": "1"},
                "os:scheduler_hints": {"group": together["id"]}})
            self.app.compute.wait_idle()
            hosts.add(self.host_of(r.json()["server"]["id"]))
        self.assertEqual(len(hosts), 1)
        anchor = self.new_server(name="anchor")
        r = self.post("/v2.1/servers", {"server": {
            "name": "near", "imageRef": self.image_id, "flavorRef": "1"},
            "os:scheduler_hints": {"same_host": anchor}})
        self.app.compute.wait_idle()
        self.assertEqual(self.host_of(r.json()["server"]["id"]), self.host_of(anchor))
        r = self.post("/v2.1/servers", {"server": {
            "name": "far", "imageRef": self.image_id, "flavorRef": "1"},
            "os:scheduler_hints": {"different_host": [anchor]}})
        self.app.compute.wait_idle()
        self.assertNotEqual(self.host_of(r.json()["server"]["id"]), self.host_of(anchor))

    def test_cold_migration_confirm_and_revert(self):
        """migrate moves a server to another host through VERIFY_RESIZE; revert brings it
        back; confirm keeps it; an admin can name the host (2.56)."""
        server_id = self.new_server()
        source = self.host_of(server_id)
        self.assertEqual(self.domain_hosts(server_id), [source])
        self.assertEqual(self.action(server_id, {"migrate": None}).status, 202)
        server = self.server(server_id)
        self.assertEqual(server["status"], "VERIFY_RESIZE")
        dest = server["OS-EXT-SRV-ATTR:host"]
        self.assertNotEqual(dest, source)
        self.assertEqual(self.domain_hosts(server_id), [dest])
        self.assertEqual(self.domain_state(server_id, dest), 1)        # running there
        migs = self.get("/v2.1/os-migrations", version="2.23").json()["migrations"]
        self.assertEqual([(m["migration_type"], m["status"], m["source_compute"],
                           m["dest_compute"]) for m in migs],
                         [("migration", "finished", source, dest)])
        self.action(server_id, {"revertResize": None})
        self.assertEqual((self.server(server_id)["status"], self.host_of(server_id)),
                         ("ACTIVE", source))
        self.assertEqual(self.domain_hosts(server_id), [source])
        target = [h for h, _, _ in self.HOSTS if h not in (source,)][0]
        self.action(server_id, {"migrate": {"host": target}}, version="2.56")
        self.assertEqual(self.host_of(server_id), target)
        self.action(server_id, {"confirmResize": None})
        self.assertEqual((self.server(server_id)["status"], self.domain_hosts(server_id)),
                         ("ACTIVE", [target]))
        self.assertEqual(self.server(server_id)["OS-EXT-SRV-ATTR:host"], target)
        self.assertFault(self.action(server_id, {"migrate": {"host": target}},
                                     version="2.56"), 400, "badRequest")
        self.assertFault(self.action(server_id, {"migrate": {"host": "cmp-z"}},
                                     version="2.56"), 400, "badRequest")
        self.assertFault(self.action(server_id, {"migrate": {"host": target}}), 400,
                         "badRequest")                              # no host before 2.56
        self.assertFault(self.action(server_id, {"migrate": None}, token="u:p"), 403,
                         "forbidden")
        stopped = self.new_server(name="stopped")
        self.action(stopped, {"os-stop": None})
        self.action(stopped, {"migrate": None})
        self.action(stopped, {"confirmResize": None})
        self.assertEqual(self.server(stopped)["status"], "SHUTOFF")
        self.assert_claims_recount()
        self.delete(f"/v2.1/servers/{stopped}")
        self.app.compute.wait_idle()
        self.assert_claims_recount()

    def domain_state(self, server_id, host=None):
        driver = self.app.drivers[host] if host else self.app.driver
        return driver.conn.lookupByUUIDString(server_id).state()[0]

    def assert_claims_recount(self):
        """The claims kept from the store's changes equal a recount over all servers."""
        recount = collections.defaultdict(lambda: [0, 0, 0])
        for server in self.store.data["servers"].values():
            for host, vcpus, ram, disk in minivan.server_claims(server):
                recount[host] = [recount[host][0] + vcpus, recount[host][1] + ram,
                                 recount[host][2] + disk]
        kept = {h: v for h, v in self.app.claims.by_host().items() if any(v)}
        self.assertEqual(kept, {h: v for h, v in recount.items() if any(v)})
        for user in (None, "admin"):
            self.assertEqual(minivan.usage(self.store.data, "admin", user, self.app.usage),
                             minivan.usage(self.store.data, "admin", user))

    def test_resize_holds_both_hosts_until_confirmed(self):
        """A resize that lands on another host keeps its old flavor's share of the source
        until confirmed, so the scheduler cannot overbook the source meanwhile."""
        self.app.conf["cpu_allocation_ratio"] = 1.0
        flavor = self.post("/v2.1/flavors", {"flavor": {"name": "two", "ram": 256,
                                                        "vcpus": 2, "disk": 1}}).json()
        server_id = self.new_server(version="2.74", host="cmp-c",
                                    flavorRef=flavor["flavor"]["id"])
        self.assertEqual(self.host_of(server_id), "cmp-c")         # cmp-c: 2 CPUs, full
        self.action(server_id, {"resize": {"flavorRef": "2"}})
        self.assertEqual(self.host_of(server_id), "cmp-b")          # the most free memory
        r = self.post_server(name="c2", version="2.74", host="cmp-c",
                             flavorRef=flavor["flavor"]["id"])
        self.assertEqual(self.server(r.json()["server"]["id"])["status"], "ERROR")
        self.action(server_id, {"confirmResize": None})
        r = self.post_server(name="c3", version="2.74", host="cmp-c",
                             flavorRef=flavor["flavor"]["id"])
        self.assertEqual(self.server(r.json()["server"]["id"])["status"], "ACTIVE")
        self.assert_claims_recount()

    def test_live_migration(self):
        """os-migrateLive moves a running (or paused) guest; the migration completes; the
        block migration of a shared instances directory is refused."""
        server_id = self.new_server()
        source = self.host_of(server_id)
        target = [h for h, _, _ in self.HOSTS if h != source][0]
        body = {"os-migrateLive": {"host": target, "block_migration": "auto"}}
        self.assertEqual(self.action(server_id, body, version="2.25").status, 202)
        server = self.server(server_id)
        self.assertEqual((server["status"], server["OS-EXT-SRV-ATTR:host"]), ("ACTIVE", target))
        self.assertEqual(self.domain_hosts(server_id), [target])
        self.assertEqual(self.domain_state(server_id, target), 1)
        migs = self.get("/v2.1/os-migrations?migration_type=live-migration",
                        version="2.59").json()["migrations"]
        self.assertEqual([(m["status"], m["source_compute"], m["dest_compute"])
                          for m in migs], [("completed", source, target)])
        self.assertEqual(self.get(f"/v2.1/servers/{server_id}/migrations",
                                  version="2.23").json(), {"migrations": []})
        self.assertFault(self.delete(f"/v2.1/servers/{server_id}/migrations/{migs[0]['id']}",
                                     version="2.24"), 400, "badRequest")
        self.assertFault(self.get(f"/v2.1/servers/{server_id}/migrations/{migs[0]['id']}",
                                  version="2.23"), 404, "itemNotFound")
        self.assertFault(self.post(
            f"/v2.1/servers/{server_id}/migrations/{migs[0]['id']}/action",
            {"force_complete": None}, version="2.22"), 400, "badRequest")
        self.action(server_id, {"pause": None})
        self.action(server_id, {"os-migrateLive": {"host": None, "block_migration": "auto"}},
                    version="2.30")
        server = self.server(server_id)
        self.assertEqual(server["status"], "PAUSED")
        self.assertNotEqual(server["OS-EXT-SRV-ATTR:host"], target)
        self.assertEqual(self.domain_state(server_id, server["OS-EXT-SRV-ATTR:host"]), 3)
        self.assertFault(self.action(server_id, {"os-migrateLive": {
            "host": None, "block_migration": True}}, version="2.25"), 400, "badRequest")
        self.assertFault(self.action(server_id, {"os-migrateLive": {
            "host": None, "block_migration": "auto"}}, version="2.1"), 400, "badRequest")
        self.assertFault(self.action(server_id, {"os-migrateLive": {
            "host": "cmp-z", "block_migration": "auto"}}, version="2.25"), 400, "badRequest")
        self.action(server_id, {"unpause": None})
        self.action(server_id, {"os-stop": None})
        self.assertFault(self.action(server_id, {"os-migrateLive": {
            "host": None, "block_migration": "auto"}}, version="2.25"), 409,
            "conflictingRequest")

    def test_evacuate_from_a_host_that_is_down(self):
        """evacuate refuses while the source is up; with the source forced down, the
        server is rebuilt on another host from its disk (stopped there from 2.95); when the
        source returns its stale domain is removed."""
        server_id = self.new_server()
        source = self.host_of(server_id)
        self.assertFault(self.action(server_id, {"evacuate": {}}, version="2.14"), 400,
                         "badRequest", "still in use")
        service = [s for s in self.get("/v2.1/os-services?binary=nova-compute",
                                       version="2.53").json()["services"]
                   if s["host"] == source][0]
        self.put("/v2.1/os-services/" + service["id"], {"forced_down": True}, version="2.53")
        self.assertEqual(self.server(server_id, version="2.16")["host_status"], "DOWN")
        self.assertFault(self.action(server_id, {"evacuate": {"host": source}},
                                     version="2.14"), 400, "badRequest")
        self.assertFault(self.action(server_id, {"evacuate": {"host": "cmp-z"}},
                                     version="2.14"), 404, "itemNotFound")
        self.assertFault(self.action(server_id, {"evacuate": {}}, version="2.14",
                                     token="u:p"), 403, "forbidden")
        r = self.action(server_id, {"evacuate": {"onSharedStorage": True}})
        self.assertEqual((r.status, r.json()), (200, {"adminPass": None}))
        server = self.server(server_id)
        dest = server["OS-EXT-SRV-ATTR:host"]
        self.assertNotEqual(dest, source)
        self.assertEqual(server["status"], "ACTIVE")
        self.assertEqual(self.domain_state(server_id, dest), 1)
        self.assertIn(source, self.domain_hosts(server_id))       # the source missed it
        self.put("/v2.1/os-services/" + service["id"], {"forced_down": False}, version="2.53")
        self.app.compute.reconcile([source])
        self.assertEqual(self.domain_hosts(server_id), [dest])
        migs = self.get("/v2.1/os-migrations?migration_type=evacuation",
                        version="2.23").json()["migrations"]
        self.assertEqual([(m["status"], m["source_compute"], m["dest_compute"])
                          for m in migs], [("done", source, dest)])
        dest_service = [s for s in self.get("/v2.1/os-services?binary=nova-compute",
                                            version="2.53").json()["services"]
                        if s["host"] == dest][0]
        self.put("/v2.1/os-services/" + dest_service["id"], {"forced_down": True},
                 version="2.53")
        r = self.action(server_id, {"evacuate": {}}, version="2.95")
        self.assertEqual((r.status, r.raw), (200, b""))
        server = self.server(server_id)
        self.assertEqual(server["status"], "SHUTOFF")
        self.assertNotEqual(server["OS-EXT-SRV-ATTR:host"], dest)

    def test_a_host_that_drops_is_down_and_comes_back(self):
        """A host whose libvirt connection drops is down (service, hypervisor,
        host_status); its servers stay listed; actions on them answer 503; it comes back
        with its servers reconciled."""
        server_id = self.new_server()
        host = self.host_of(server_id)
        self.app.drivers[host].close()
        states = {s["host"]: s["state"] for s in self.get(
            "/v2.1/os-services?binary=nova-compute").json()["services"]}
        self.assertEqual(states[host], "down")
        self.assertEqual(self.server(server_id, version="2.16")["host_status"], "UNKNOWN")
        hyp = [h for h in self.get("/v2.1/os-hypervisors").json()["hypervisors"]
               if h["hypervisor_hostname"] == host][0]
        self.assertEqual(hyp["state"], "down")
        self.assertFault(self.action(server_id, {"os-stop": None}), 503, "serviceUnavailable")
        other = self.new_server(name="elsewhere")
        self.assertNotEqual(self.host_of(other), host)
        self.assertTrue(self.app.drivers[host].connect())
        self.app.compute.reconcile([host])
        self.assertEqual(self.server(server_id, version="2.16")["host_status"], "UP")
        self.action(server_id, {"os-stop": None})
        self.assertEqual(self.server(server_id)["status"], "SHUTOFF")

    def drop_during(self, host, operation):
        """The host's libvirt connection drops at the start of this driver operation, and
        the host stays unreachable until back_up(host)."""
        driver = self.app.drivers[host]
        real = getattr(driver, operation)

        def dropping(*args, **kwargs):
            driver.close()
            driver.uri = "test://" + os.path.join(self.tmp, "gone.xml")
            return real(*args, **kwargs)
        setattr(driver, operation, dropping)
        self.addCleanup(setattr, driver, operation, real)

    def back_up(self, host):
        driver = self.app.drivers[host]
        driver.uri = "test://" + os.path.join(self.tmp, host + ".xml")
        self.assertTrue(driver.connect())
        self.app.compute.reconcile([host])

    def test_host_that_drops_mid_build_or_mid_migration(self):
        """A host that drops while it builds a server leaves it in ERROR with a fault and
        without a claim; one that drops while a server migrates to it leaves the server
        where it was, running, with the migration in error."""
        self.drop_during("cmp-b", "spawn")
        r = self.post_server(name="lost", version="2.74", host="cmp-b")
        server = self.server(r.json()["server"]["id"], version="2.16")
        self.assertEqual(server["status"], "ERROR")
        self.assertIn("fault", server)
        self.assertIsNone(server["OS-EXT-SRV-ATTR:host"])
        self.back_up("cmp-b")
        server_id = self.new_server(version="2.74", host="cmp-a")
        self.drop_during("cmp-c", "redefine")
        self.action(server_id, {"migrate": {"host": "cmp-c"}}, version="2.56")
        server = self.server(server_id)
        self.assertEqual((server["status"], server["OS-EXT-SRV-ATTR:host"]),
                         ("ACTIVE", "cmp-a"))
        self.back_up("cmp-c")
        self.assertEqual(self.domain_hosts(server_id), ["cmp-a"])
        self.assertEqual(self.domain_state(server_id, "cmp-a"), 1)
        migs = self.get("/v2.1/os-migrations", version="2.23").json()["migrations"]
        self.assertEqual([(m["migration_type"], m["status"]) for m in migs],
                         [("migration", "error")])
        stats = self.get("/v2.1/os-hypervisors/detail").json()["hypervisors"]
        self.assertEqual({h["hypervisor_hostname"]: h["running_vms"] for h in stats},
                         {"cmp-a": 1, "cmp-b": 0, "cmp-c": 0})

    def test_locked_server_moves_only_for_admins(self):
        """A project manager cannot migrate a locked server (409); an admin can."""
        class Personas(minivan.NoAuth):
            def identify(self, token):
                user, _, project = token.partition(":")
                if user == "boss":
                    return minivan.Identity(user, project, ["manager", "member", "reader"])
                return super().identify(token)
        self.app.auth = Personas("admin:admin")
        server_id = self.new_server(token="boss:demo")
        self.action(server_id, {"lock": None}, token="admin:admin")
        self.assertFault(self.action(server_id, {"migrate": None}, token="boss:demo"), 409,
                         "conflictingRequest", "locked")
        self.assertFault(self.action(server_id, {"migrate": {"host": "cmp-c"}},
                                     token="boss:demo", version="2.56"), 403, "forbidden")
        self.assertEqual(self.action(server_id, {"migrate": None}).status, 202)
        self.assertEqual(self.server(server_id)["status"], "VERIFY_RESIZE")

    def test_restart_redefines_each_hosts_servers(self):
        """After a restart each simulated host gets back the domains of its servers."""
        ids = [self.new_server(name=f"s{i}", version="2.74", host=h)
               for i, (h, _, _) in enumerate(self.HOSTS)]
        self.restart_app()
        for server_id, (host, _, _) in zip(ids, self.HOSTS):
            self.assertEqual(self.domain_hosts(server_id), [host])
            self.assertEqual(self.server(server_id)["status"], "ACTIVE")

    def test_compute_hosts_option(self):
        """--compute-hosts takes NAME=URI pairs; a malformed or repeated entry is a one-line
        configuration error."""
        conf = minivan.default_config(compute_hosts="a=test:///default, b=qemu+ssh://h/system")
        self.assertEqual(conf["compute_hosts"], [("a", "test:///default"),
                                                 ("b", "qemu+ssh://h/system")])
        for bad in ("a", "a=", "a=x,a=y", "b c=test:///default"):
            with self.assertRaises(minivan.ConfigError):
                minivan.default_config(compute_hosts=bad)
        with self.assertRaises(minivan.ConfigError):
            minivan.default_config(cpu_allocation_ratio="-1")


class VolumeWithoutCinderTests(ServerTestCase):
    """A cloud with no block storage service answers the volume APIs as having no volumes."""

    def test_volume_proxies_without_cinder(self):
        """os-volumes/os-snapshots list nothing, shows 404 and refuse creates; 404 above 2.35."""
        vid = "9a4f3e8c-1111-4c55-9b1e-0123456789ab"
        self.assertEqual(self.get("/v2.1/os-volumes", version="2.35").json(), {"volumes": []})
        self.assertEqual(self.get("/v2.1/os-snapshots/detail").json(), {"snapshots": []})
        self.assertFault(self.get("/v2.1/os-volumes/" + vid), 404, "itemNotFound", vid)
        self.assertFault(self.get("/v2.1/os-snapshots/" + vid), 404, "itemNotFound")
        self.assertFault(self.post("/v2.1/os-volumes", {"volume": {"size": 1}}), 404,
                         "itemNotFound", "no block storage")
        self.assertFault(self.post("/v2.1/os-volumes", {"volume": {"size": "x"}}), 400,
                         "badRequest")
        self.assertFault(self.post("/v2.1/os-volumes", {"volume": {"size": 1, "bogus": 1}}),
                         400, "badRequest")
        self.assertFault(self.get("/v2.1/os-volumes", version="2.36"), 404, "itemNotFound")
        self.assertFault(self.delete("/v2.1/os-volumes/" + vid, token="u:p"), 404,
                         "itemNotFound")

    def test_volume_attachments_without_cinder(self):
        """A server lists no attachments; attaching or detaching an unknown volume is 404;
        boot from volume is 400."""
        server_id = self.new_server()
        vid = "9a4f3e8c-1111-4c55-9b1e-0123456789ab"
        base = f"/v2.1/servers/{server_id}/os-volume_attachments"
        self.assertEqual(self.get(base).json(), {"volumeAttachments": []})
        self.assertFault(self.post(base, {"volumeAttachment": {"volumeId": vid}}), 404,
                         "itemNotFound", vid)
        self.assertFault(self.post(base, {"volumeAttachment": {"volumeId": "nope"}}), 400,
                         "badRequest")
        self.assertFault(self.post(base, {"volumeAttachment": {"volumeId": vid,
                                                               "device": "bad dev"}}),
                         400, "badRequest")
        self.assertFault(self.get(f"{base}/{vid}"), 404, "itemNotFound",
                         f"Instance {server_id} is not attached to volume {vid}")
        self.assertFault(self.delete(f"{base}/{vid}"), 404, "itemNotFound")
        self.assertFault(self.get(f"{base}?limit=x"), 400, "badRequest")
        self.assertFault(self.get(f"{base}?bogus=1", version="2.75"), 400, "badRequest")
        r = self.post_server(block_device_mapping_v2=[{
            "boot_index": 0, "uuid": vid, "source_type": "volume",
            "destination_type": "volume"}], imageRef="")
        self.assertFault(r, 400, "badRequest", "block storage")
        view = self.server(server_id, version="2.3")
        self.assertEqual(view["os-extended-volumes:volumes_attached"], [])

    def test_image_with_a_bad_block_device_mapping_is_400(self):
        """An image whose block_device_mapping property is not a list of mappings (image
        owners set it freely) makes a create 400, never 500."""
        for bad in ("5", "null", "[{\"destination_type\": \"volume\", \"uuid\": 123}]",
                    "[{\"destination_type\": \"volume\", \"device_name\": 5}]", "{"):
            self.store.commit([["set", ["images", self.image_id, "properties"],
                                {"block_device_mapping": bad, "bdm_v2": "True"}]])
            self.assertFault(self.post_server(), 400, "badRequest", "block_device_mapping")

    def test_restart_forgets_interrupted_attachments(self):
        """A volume mapping that was reserved but never connected when minivan stopped is
        dropped at start, as a failed attach would be; connected ones stay."""
        server_id = self.new_server()
        vols = [{"id": "a" * 8 + "-1111-4c55-9b1e-0123456789ab", "bdm_uuid": "b1",
                 "attachment_id": None, "connection_info": None, "target": "vdb",
                 "device": "/dev/vdb", "boot_index": None},
                {"id": "c" * 8 + "-1111-4c55-9b1e-0123456789ab", "bdm_uuid": "b2",
                 "attachment_id": "x", "target": "vdc", "device": "/dev/vdc",
                 "boot_index": None, "connection_info": {
                     "driver_volume_type": "local", "data": {"device_path": "/dev/null"}}}]
        self.store.commit([["set", ["servers", server_id, "volumes"], vols]])
        self.restart_app()
        self.app.compute.reconcile()
        left = self.store.data["servers"][server_id]["volumes"]
        self.assertEqual([v["bdm_uuid"] for v in left], ["b2"])

    def test_server_external_events(self):
        """Events: 200 when all are taken, 207 with per-event codes otherwise, admin only."""
        server_id = self.new_server()
        missing = "0b0b0b0b-1111-4c55-9b1e-0123456789ab"
        r = self.post("/v2.1/os-server-external-events", {"events": [
            {"name": "network-changed", "server_uuid": server_id}]})
        self.assertEqual(r.status, 200, r.raw)
        self.assertEqual(r.json()["events"], [{"name": "network-changed", "server_uuid":
                                               server_id, "status": "completed",
                                               "code": 200}])
        r = self.post("/v2.1/os-server-external-events", {"events": [
            {"name": "network-vif-plugged", "server_uuid": server_id, "tag": "p1",
             "status": "failed"},
            {"name": "network-changed", "server_uuid": missing}]})
        self.assertEqual(r.status, 207, r.raw)
        self.assertEqual([e["code"] for e in r.json()["events"]], [200, 404])
        self.assertFault(self.post("/v2.1/os-server-external-events", {"events": [
            {"name": "volume-extended", "server_uuid": server_id, "tag": missing}]},
            version="2.51"), 404, "itemNotFound", "No instances found for any event")
        r = self.post("/v2.1/os-server-external-events", {"events": [
            {"name": "network-changed", "server_uuid": server_id},
            {"name": "volume-extended", "server_uuid": server_id, "tag": missing}]},
            version="2.51")
        self.assertEqual((r.status, [(e["code"], e["status"]) for e in r.json()["events"]]),
                         (207, [(200, "completed"), (400, "failed")]))
        self.assertFault(self.post("/v2.1/os-server-external-events", {"events": [
            {"name": "volume-extended", "server_uuid": server_id}]}), 400, "badRequest")
        self.assertFault(self.post("/v2.1/os-server-external-events", {"events": []}), 400,
                         "badRequest")
        self.assertFault(self.post("/v2.1/os-server-external-events", {"events": [
            {"name": "network-changed", "server_uuid": server_id}]}, token="u:p"), 403,
            "forbidden")
        r = self.post("/v2.1/os-server-external-events", {"events": [
            {"name": "power-update", "server_uuid": server_id, "tag": "POWER_OFF"}]},
            version="2.76")
        self.assertEqual(r.status, 200, r.raw)
        self.app.compute.wait_idle()
        self.assertEqual(self.server(server_id)["OS-EXT-STS:vm_state"], "stopped")
        self.assertEqual(self.domain_state(server_id), 5)     # VIR_DOMAIN_SHUTOFF

    def test_assisted_volume_snapshots_need_an_attached_volume(self):
        """Assisted snapshots of a volume no server holds are 400, as in Nova; admin only."""
        vid = "9a4f3e8c-1111-4c55-9b1e-0123456789ab"
        body = {"snapshot": {"volume_id": vid, "create_info": {
            "snapshot_id": "s1", "type": "qcow2", "new_file": "f.qcow2"}}}
        self.assertFault(self.post("/v2.1/os-assisted-volume-snapshots", body), 400,
                         "badRequest", f"No volume Block Device Mapping with id {vid}")
        self.assertFault(self.post("/v2.1/os-assisted-volume-snapshots", body, token="u:p"),
                         403, "forbidden")
        self.assertFault(self.delete("/v2.1/os-assisted-volume-snapshots/s1?delete_info=x"),
                         400, "badRequest")
        info = urllib.parse.quote(json.dumps({"volume_id": vid}))
        self.assertFault(self.delete("/v2.1/os-assisted-volume-snapshots/s1?delete_info="
                                     + info), 400, "badRequest")


class DiskTests(unittest.TestCase):
    def test_image_virtual_size_reads_the_header(self):
        """The root overlay's size comes from the image's qcow2 header (or a raw file's
        size), as qemu-img reports it."""
        if not shutil.which("qemu-img"):
            skip_or_fail(self, "qemu-img not installed (apt install qemu-utils)")
        tmp = tempfile.mkdtemp(prefix="minivan-disk-")
        self.addCleanup(shutil.rmtree, tmp, True)
        for fmt, size in (("qcow2", "96M"), ("raw", "3M")):
            path = os.path.join(tmp, "image." + fmt)
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, path, size], check=True)
            self.assertEqual(minivan.image_virtual_size(path, fmt),
                             minivan.virtual_size(path))
        server = {"id": "s", "flavor": {"disk": 1, "ephemeral": 0, "swap": 0}}
        disks = minivan.create_server_disks(os.path.join(tmp, "inst"),
                                            (os.path.join(tmp, "image.qcow2"), "qcow2"), server)
        self.assertEqual(minivan.virtual_size(disks[0][0]), 2 ** 30)
        server["flavor"]["disk"] = 0
        disks = minivan.create_server_disks(os.path.join(tmp, "inst0"),
                                            (os.path.join(tmp, "image.qcow2"), "qcow2"), server)
        self.assertEqual(minivan.virtual_size(disks[0][0]), 96 * 2 ** 20)
        # the base image behind an overlay, as qemu-img names it (none behind a base)
        self.assertEqual(minivan.qcow2_backing(disks[0][0]), os.path.join(tmp, "image.qcow2"))
        self.assertIsNone(minivan.qcow2_backing(os.path.join(tmp, "image.qcow2")))
        self.assertIsNone(minivan.qcow2_backing(os.path.join(tmp, "image.raw")))
        self.assertIsNone(minivan.qcow2_backing(os.path.join(tmp, "missing")))
        self.assertEqual(minivan.qcow2_backing_format(disks[0][0]), "qcow2")
        # a base of no checked format is never written into an overlay
        self.assertRaises(minivan.DriverError, minivan.create_qcow2,
                          os.path.join(tmp, "x.qcow2"), "1G", os.path.join(tmp, "image.raw"))

    def test_qcow2_images_written_in_python_are_what_qemu_img_makes(self):
        """create_qcow2: qemu-img checks the images clean and reads the same size, base
        and format as from its own; QEMU's block layer writes into them and reads the
        base through them."""
        if not shutil.which("qemu-img") or not shutil.which("qemu-io"):
            skip_or_fail(self, "qemu-img not installed (apt install qemu-utils)")
        tmp = tempfile.mkdtemp(prefix="minivan-qcow2-")
        self.addCleanup(shutil.rmtree, tmp, True)
        base = os.path.join(tmp, "base.raw")
        with open(base, "wb") as f:
            f.write(bytes(range(256)) * 4096)          # 1 MiB of a known pattern
        for name, size, backing in (("plain", "5G", None), ("huge", "3T", None),
                                    ("overlay", 2 ** 31, base)):
            path = os.path.join(tmp, name + ".qcow2")
            minivan.create_qcow2(path, size, backing, "raw" if backing else None)
            ours = json.loads(subprocess.run(["qemu-img", "info", "--output=json", path],
                                             capture_output=True, text=True).stdout)
            ref = path + ".ref"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", ref,
                            str(minivan.disk_bytes(size))] +
                           (["-b", backing, "-F", "raw"] if backing else []), check=True)
            theirs = json.loads(subprocess.run(["qemu-img", "info", "--output=json", ref],
                                               capture_output=True, text=True).stdout)
            for key in ("format", "virtual-size", "cluster-size", "backing-filename",
                        "backing-filename-format"):
                self.assertEqual(ours.get(key), theirs.get(key), (name, key))
            self.assertEqual(ours["format-specific"]["data"]["refcount-bits"], 16)
            subprocess.run(["qemu-img", "check", "-q", path], check=True)
            subprocess.run(["qemu-io", "-c", "write -P 0xab 65536 1M", path], check=True,
                           capture_output=True)
            subprocess.run(["qemu-img", "check", "-q", path], check=True)
            pattern = "read -P 0xab 65536 1M"
            done = subprocess.run(["qemu-io", "-c", pattern, path], capture_output=True,
                                  text=True)
            self.assertNotIn("fail", done.stdout + done.stderr, name)
        overlay = os.path.join(tmp, "overlay.qcow2")
        done = subprocess.run(["qemu-img", "compare", "-q", base, overlay])
        self.assertEqual(done.returncode, 1)       # the write above changed it
        fresh = os.path.join(tmp, "fresh.qcow2")
        minivan.create_qcow2(fresh, 2 ** 20, base, "raw")
        self.assertEqual(subprocess.run(["qemu-img", "compare", "-q", base, fresh])
                         .returncode, 0)

    def test_only_remote_hosts_are_asked_about_shared_storage(self):
        """A local libvirt and the test hypervisor see minivan's files; a libvirt reached
        through a transport, or another socket, is asked."""
        for uri, local in (("qemu:///system", True), ("test:///default", True),
                           ("qemu:///session", True), ("qemu+ssh://h2/system", False),
                           ("qemu+tcp://10.0.0.2/system", False),
                           ("qemu+unix:///system?socket=/run/h2/libvirt-sock", False)):
            driver = minivan.LibvirtDriver(uri, virt_type="qemu", instances_dir="/x")
            self.assertEqual(driver.local, local, uri)


class NeutronPortTests(unittest.TestCase):
    """How a Neutron port is kept and plugged, from the bodies Neutron answers with."""

    PORT = {"id": "6c2cfab3-5d0e-4bfe-9e8f-0e7c1bd0f6a1", "mac_address": "fa:16:3e:00:00:01",
            "network_id": "1f5e3515-3967-410e-8c08-d30024a4dc24",
            "fixed_ips": [{"subnet_id": "47a16264-2cf9-46f1-b74f-ea475c2f5b7a",
                           "ip_address": "10.77.0.63"}],
            "binding:vif_type": "ovs",
            "binding:vif_details": {"bridge_name": "br-int", "datapath_type": "netdev"}}

    def test_port_record_and_plugging(self):
        record = minivan.neutron_port_record(self.PORT, "minivan-net", True, "nic1")
        self.assertEqual((record["ips"], record["network"], record["created"], record["tag"]),
                         ([["10.77.0.63", 4]], "minivan-net", True, "nic1"))
        xml = minivan.neutron_interface_xml(record)
        self.assertIn("<source bridge='br-int'/><virtualport type='openvswitch'>"
                      f"<parameters interfaceid='{self.PORT['id']}'/>", xml)
        self.assertIn("<target dev='tap6c2cfab3-5d'/>", xml)
        bridge = dict(record, vif_type="bridge", vif_details={})
        self.assertIn("<source bridge='brq1f5e3515-39'/>",
                      minivan.neutron_interface_xml(bridge))
        for failed in ("binding_failed", "unbound", None):
            with self.assertRaises(minivan.DriverError) as caught:
                minivan.neutron_interface_xml(dict(record, vif_type=failed))
            self.assertIn("Binding failed for port", str(caught.exception))
        self.assertIn("<interface type='ethernet'>", minivan.neutron_interface_xml(
            dict(record, vif_type="tap")))
        with self.assertRaises(minivan.DriverError):
            minivan.neutron_interface_xml(dict(record, vif_type="vhostuser"))
        self.assertEqual(minivan.neutron_message(
            b'{"NeutronError": {"type": "PortInUse", "message": "Port is in use"}}', 409),
            "Port is in use")
        self.assertEqual(minivan.neutron_message(b"<html>", 502), "Neutron answered 502")


class VolumeConnectionTests(unittest.TestCase):
    """Cinder connection_info becomes the right libvirt <disk>."""

    def test_nfs_local_iscsi_rbd(self):
        """NFS shares resolve under the mount base by md5 of the export; others map to
        block, network iscsi and rbd sources; unknown types are refused."""
        tmp = tempfile.mkdtemp(prefix="minivan-vol-")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        export = "127.0.0.1:/srv/cinder"
        point = os.path.join(tmp, hashlib.md5(export.encode()).hexdigest())
        os.makedirs(point)
        vol = {"id": "v1", "target": "vdb", "connection_info": {
            "driver_volume_type": "nfs", "data": {"export": export, "name": "volume-v1",
                                                  "format": "raw"}}}
        real = minivan.is_mount_point
        minivan.is_mount_point = lambda p: p == point or real(p)
        try:
            xml = minivan.volume_disk_xml(vol, tmp)
        finally:
            minivan.is_mount_point = real
        self.assertTrue(minivan.is_mount_point("/proc"))
        self.assertFalse(minivan.is_mount_point(tmp))
        self.assertIn(f"<source file='{point}/volume-v1'/>", xml)
        self.assertIn("<target dev='vdb' bus='virtio'/><serial>v1</serial>", xml)
        # an encrypted NFS volume: Cinder's NFS driver writes a qcow2 with QEMU's LUKS
        # inside but says raw; the header decides, a qcow2 with a backing file does not
        path = os.path.join(point, "volume-v1")
        encrypted = dict(vol, encryption={"format": "luks"}, connection_info=dict(
            vol["connection_info"], data=dict(vol["connection_info"]["data"], encrypted=True)))
        for make, fmt in (([], "raw"), (["-f", "qcow2"], "qcow2"),
                          (["-f", "qcow2", "-b", "/etc/hostname", "-F", "raw"], "raw")):
            if os.path.exists(path):
                os.unlink(path)
            if make:
                subprocess.run(["qemu-img", "create", *make, path, "1M"], check=True,
                               capture_output=True)
            else:
                with open(path, "wb") as f:
                    f.write(b"LUKS\xba\xbe" + bytes(1018))
            minivan.is_mount_point = lambda p: p == point or real(p)
            try:
                xml = minivan.volume_disk_xml(encrypted, tmp)
            finally:
                minivan.is_mount_point = real
            self.assertIn(f"<driver name='qemu' type='{fmt}'", xml, make)
            self.assertIn("<encryption format='luks'>", xml)
        os.unlink(path)
        local = dict(vol, connection_info={"driver_volume_type": "local",
                                           "data": {"device_path": "/dev/null"}})
        # (Nova's LibvirtVolumeDriver: a local device_path is a block source)
        self.assertIn("<disk type='block' device='disk'>", minivan.volume_disk_xml(local, tmp))
        self.assertIn("<source dev='/dev/null'/>", minivan.volume_disk_xml(local, tmp))
        iscsi = dict(vol, connection_info={"driver_volume_type": "iscsi", "data": {
            "target_iqn": "iqn.2010-10.org.openstack:volume-v1", "target_lun": 1,
            "target_portal": "192.0.2.5:3260"}})
        self.assertIn("<source protocol='iscsi' name='iqn.2010-10.org.openstack:volume-v1/1'>"
                      "<host name='192.0.2.5' port='3260'/></source>",
                      minivan.volume_disk_xml(iscsi, tmp))
        rbd = dict(vol, connection_info={"driver_volume_type": "rbd", "data": {
            "name": "volumes/volume-v1", "hosts": ["192.0.2.6"], "ports": ["6789"],
            "auth_enabled": True, "auth_username": "cinder", "secret_uuid": "abc"}})
        xml = minivan.volume_disk_xml(rbd, tmp)
        self.assertIn("<source protocol='rbd' name='volumes/volume-v1'><host name='192.0.2.6' "
                      "port='6789'/></source><auth username='cinder'><secret type='ceph' "
                      "uuid='abc'/></auth>", xml)
        for bad in ({"driver_volume_type": "fibre_channel", "data": {}},
                    {"driver_volume_type": "nfs", "data": {"export": export}},
                    {"driver_volume_type": "nfs", "data": {"export": export, "name": "x",
                                                           "format": "vmdk"}}):
            with self.assertRaises(minivan.DriverError):
                minivan.volume_disk_xml(dict(vol, connection_info=bad), tmp)

    def test_nfs_share_mounted_by_libvirt(self):
        """A share not mounted yet is mounted by a transient netfs pool of the driver's
        libvirt (libvirt's own parser reads the pool, the mount options in its fs
        namespace); a pool left from before is replaced; without a driver the volume
        fails with the place it looked."""
        tmp = tempfile.mkdtemp(prefix="minivan-vol-")
        self.addCleanup(shutil.rmtree, tmp, ignore_errors=True)
        export = "192.0.2.7:/srv/cinder"
        point = os.path.join(tmp, hashlib.md5(export.encode()).hexdigest())
        vol = {"id": "v1", "target": "vdb", "connection_info": {
            "driver_volume_type": "nfs", "data": {"export": export, "name": "volume-v1",
                                                  "options": "vers=4.1,nolock"}}}
        with self.assertRaisesRegex(minivan.DriverError, "is not mounted at " + point):
            minivan.volume_disk_xml(vol, tmp)
        driver = minivan.LibvirtDriver("test:///default", instances_dir=tmp)
        self.assertTrue(driver.connect())
        self.addCleanup(driver.close)
        for _ in range(2):
            xml = minivan.volume_disk_xml(vol, tmp, driver.mount_share)
            self.assertIn(f"<source file='{point}/volume-v1'/>", xml)
            pools = [p for p in driver.conn.listAllStoragePools()
                     if p.name().startswith("minivan-nfs-")]
            self.assertEqual(len(pools), 1)
            desc = pools[0].XMLDesc(0)
            self.assertIn("<host name='192.0.2.7'/>", desc)
            self.assertIn("<dir path='/srv/cinder'/>", desc)
            self.assertIn("<format type='nfs'/>", desc)
            self.assertIn(f"<path>{point}</path>", desc)
            self.assertTrue(pools[0].isActive())
        self.assertIn("<fs:option name='vers=4.1'/><fs:option name='nolock'/>",
                      minivan.nfs_pool_xml(export, "vers=4.1,nolock", point))
        for bad, options in (("nohost", None), ("a b:/x", None), (export, "-oremount")):
            with self.assertRaisesRegex(minivan.DriverError, "is not of the form"):
                minivan.ensure_nfs_mounted(tmp, bad, options, driver.mount_share)

    def test_targets(self):
        """Volumes take the first free vdX after the local disks; a boot volume is vda."""
        server = {"flavor": {"ephemeral": 1, "swap": 0}, "volumes": []}
        self.assertEqual(minivan.next_target(server), "vdc")
        self.assertEqual(minivan.next_target(server, "/dev/vdf"), "vdf")
        self.assertEqual(minivan.next_target(server, "/dev/vda"), "vdc")
        record = minivan.assign_volume_targets(
            {"flavor": {"ephemeral": 0, "swap": 0}, "local_disks": []},
            [{"boot_index": None, "source": {}, "requested_device": None},
             {"boot_index": 0, "source": {}, "requested_device": None}])
        self.assertTrue(record["volume_backed"])
        self.assertEqual([v["device"] for v in record["volumes"]], ["/dev/vda", "/dev/vdb"])
        self.assertEqual(minivan.disk_layout(record), [])


class HostsAndAuditTests(ServerTestCase):
    """os-hosts (up to 2.42) and os-instance_usage_audit_log, admin only."""

    def test_hosts(self):
        """The host's services and resources; power and maintenance are 501 as Nova's libvirt
        driver answers; unknown hosts 404; gone above 2.42."""
        server_id = self.new_server()
        host = self.app.conf["host"]
        hosts = self.get("/v2.1/os-hosts").json()["hosts"]
        self.assertIn({"host_name": host, "service": "compute", "zone": "nova"}, hosts)
        self.assertEqual({h["service"] for h in hosts}, {"compute", "scheduler", "conductor"})
        self.assertEqual([h["service"] for h in self.get("/v2.1/os-hosts?zone=nova")
                          .json()["hosts"]], ["compute"])
        shown = self.get("/v2.1/os-hosts/" + host).json()["host"]
        projects = [r["resource"]["project"] for r in shown]
        self.assertEqual(projects, ["(total)", "(used_now)", "(used_max)", "admin"])
        self.assertEqual(shown[3]["resource"]["memory_mb"],
                         self.server(server_id, version="2.47")["flavor"]["ram"])
        self.assertFault(self.get("/v2.1/os-hosts/nohost"), 404, "itemNotFound",
                         "Compute host nohost could not be found.")
        self.assertFault(self.put("/v2.1/os-hosts/" + host, {"status": "disable"}), 501,
                         "notImplemented")
        self.assertFault(self.put("/v2.1/os-hosts/" + host, {"status": "off"}), 400,
                         "badRequest")
        self.assertFault(self.put("/v2.1/os-hosts/" + host, {}), 400, "badRequest")
        self.assertFault(self.put("/v2.1/os-hosts/nohost", {"status": "enable"}), 404,
                         "itemNotFound")
        for action in ("reboot", "shutdown", "startup"):
            self.assertFault(self.get(f"/v2.1/os-hosts/{host}/{action}"), 501,
                             "notImplemented")
        self.assertFault(self.get("/v2.1/os-hosts", token="u:p"), 403, "forbidden")
        self.assertFault(self.get("/v2.1/os-hosts", version="2.43"), 404, "itemNotFound")

    def test_baremetal_nodes(self):
        """No bare metal nodes in a libvirt cloud; changes are refused as Nova refuses
        them (use Ironic); gone above 2.35."""
        self.assertEqual(self.get("/v2.1/os-baremetal-nodes").json(), {"nodes": []})
        self.assertFault(self.get("/v2.1/os-baremetal-nodes/n1"), 404, "itemNotFound",
                         "Node n1 could not be found.")
        self.assertFault(self.post("/v2.1/os-baremetal-nodes", {"node": {}}), 400,
                         "badRequest", "Ironic command node-create")
        self.assertFault(self.post("/v2.1/os-baremetal-nodes/n1/action",
                                   {"add_interface": {"address": "aa:bb:cc:dd:ee:ff"}}), 400,
                         "badRequest", "port-create")
        self.assertFault(self.get("/v2.1/os-baremetal-nodes", token="u:p"), 403, "forbidden")
        self.assertFault(self.get("/v2.1/os-baremetal-nodes", version="2.36"), 404,
                         "itemNotFound")

    def test_instance_usage_audit_log(self):
        """With the audit off no host ran it; with --instance-usage-audit the host counts
        the servers that lived in the last completed month; bad dates are 400."""
        self.clock.t = datetime.datetime(2026, 10, 15, 12, 0, 0)
        self.new_server()
        logs = self.get("/v2.1/os-instance_usage_audit_log").json()["instance_usage_audit_logs"]
        self.assertEqual((logs["period_beginning"], logs["period_ending"], logs["num_hosts"],
                          logs["hosts_not_run"], logs["overall_status"]),
                         ("2026-09-01 00:00:00", "2026-10-01 00:00:00", 1,
                          [self.app.conf["host"]], "0 of 1 hosts done. 0 errors."))
        self.app.conf["instance_usage_audit"] = True
        shown = self.get("/v2.1/os-instance_usage_audit_log/2026-11-02%2010:00:00").json()[
            "instance_usage_audit_log"]
        self.assertEqual((shown["period_beginning"], shown["total_instances"],
                          shown["num_hosts_done"], shown["overall_status"]),
                         ("2026-10-01 00:00:00", 1, 1, "ALL hosts done. 0 errors."))
        earlier = self.get("/v2.1/os-instance_usage_audit_log/2026-10-02%2010:00:00.5").json()
        self.assertEqual(earlier["instance_usage_audit_log"]["total_instances"], 0)
        self.assertFault(self.get("/v2.1/os-instance_usage_audit_log/yesterday"), 400,
                         "badRequest", "Invalid timestamp for date yesterday")
        self.assertFault(self.get("/v2.1/os-instance_usage_audit_log", token="u:p"), 403,
                         "forbidden")


class FirewallFilterTests(unittest.TestCase):
    """Security groups become a libvirt network filter per server."""

    def test_filter_from_rules(self):
        """CIDR rules, port ranges, ICMP type/code and group sources (the members'
        addresses) become accept rules before the final inbound drop."""
        group = {"id": "g1", "name": "web", "tenant_id": "p", "description": "", "rules": [
            {"id": "r1", "ip_protocol": "tcp", "from_port": 22, "to_port": 22,
             "cidr": "10.0.0.0/8", "group_id": None},
            {"id": "r2", "ip_protocol": "icmp", "from_port": 8, "to_port": -1,
             "cidr": "0.0.0.0/0", "group_id": None},
            {"id": "r3", "ip_protocol": "udp", "from_port": 1000, "to_port": 2000,
             "cidr": "2001:db8::/32", "group_id": None},
            {"id": "r4", "ip_protocol": "tcp", "from_port": 80, "to_port": 81, "cidr": None,
             "group_id": "g1"}]}
        member = {"id": "s2", "project_id": "p", "vm_state": "active",
                  "security_groups": ["web"], "ports": [{"ips": [["192.0.2.7", 4]]}]}
        server = dict(member, id="s1", ports=[{"ips": []}])
        data = {"security_groups": {"g1": group}, "servers": {"s1": server, "s2": member}}
        xml = minivan.server_filter_xml(server, data)
        self.assertTrue(xml.startswith("<filter name='minivan-s1' chain='root'>"))
        for part in ("<tcp srcipaddr='10.0.0.0' srcipmask='8' dstportstart='22' "
                     "dstportend='22'/>",
                     "<icmp srcipaddr='0.0.0.0' srcipmask='0' type='8'/>",
                     "<udp-ipv6 srcipaddr='2001:db8::' srcipmask='32' dstportstart='1000' "
                     "dstportend='2000'/>",
                     "<tcp srcipaddr='192.0.2.7' srcipmask='32' dstportstart='80' "
                     "dstportend='81'/>"):
            self.assertIn(part, xml)
        self.assertLess(xml.index("dstportstart='22'"), xml.index("action='drop'"))
        other = dict(server, security_groups=["default"])
        self.assertNotIn("dstportstart='22'", minivan.server_filter_xml(other, data))


class ConsoleTests(ServerTestCase):
    """Remote consoles: serial consoles through minivan's proxy, VNC and SPICE off."""

    def test_consoles_off_and_on(self):
        """Without a proxy every console type is unavailable (400); with one, serial
        consoles get one-time ws:// URLs whose tokens admins can look up from 2.31."""
        server_id = self.new_server()
        act = f"/v2.1/servers/{server_id}/action"
        self.assertFault(self.post(act, {"os-getSerialConsole": {"type": "serial"}}), 400,
                         "badRequest", "Unavailable console type serial.")
        self.assertFault(self.post(act, {"os-getVNCConsole": {"type": "novnc"}}), 400,
                         "badRequest", "Unavailable console type novnc.")
        self.assertFault(self.post(act, {"os-getVNCConsole": {"type": "bogus"}}), 400,
                         "badRequest")
        rc = f"/v2.1/servers/{server_id}/remote-consoles"
        self.assertFault(self.post(rc, {"remote_console": {"protocol": "serial",
                                                           "type": "serial"}},
                                   version="2.5"), 404, "itemNotFound")
        self.assertFault(self.post(rc, {"remote_console": {"protocol": "rdp",
                                                           "type": "rdp-html5"}},
                                   version="2.6"), 400, "badRequest")
        self.app.conf["serial_console_listen"] = "127.0.0.1:6083"
        r = self.post(act, {"os-getSerialConsole": {"type": "serial"}})
        self.assertEqual(r.status, 200, r.raw)
        url = r.json()["console"]["url"]
        self.assertTrue(url.startswith("ws://127.0.0.1:6083/?token="), url)
        r = self.post(rc, {"remote_console": {"protocol": "serial", "type": "serial"}},
                      version="2.8")
        self.assertEqual(r.json()["remote_console"]["protocol"], "serial")
        token = url.split("token=")[1]
        shown = self.get("/v2.1/os-console-auth-tokens/" + token, version="2.31").json()
        self.assertEqual((shown["console"]["instance_uuid"], shown["console"]["host"]),
                         (server_id, self.app.conf["host"]))
        self.assertFault(self.get("/v2.1/os-console-auth-tokens/" + token), 400,
                         "badRequest")
        self.assertFault(self.get("/v2.1/os-console-auth-tokens/nope", version="2.31"), 404,
                         "itemNotFound", "Token not found")
        self.assertFault(self.get("/v2.1/os-console-auth-tokens/" + token, version="2.31",
                                  token="u:p"), 403, "forbidden")
        self.assertFault(self.post(act, {"os-getVNCConsole": {"type": "novnc"}}), 400,
                         "badRequest", "Unavailable console type novnc.")
        self.assertFault(self.post(act, {"os-getSerialConsole": {"type": "serial"}},
                                   token="other:other"), 404, "itemNotFound")
        self.app.conf["vnc_listen"] = "127.0.0.1:6080"
        vnc = self.post(act, {"os-getVNCConsole": {"type": "novnc"}})
        self.assertTrue(vnc.json()["console"]["url"].startswith(
            "http://127.0.0.1:6080/vnc_lite.html?path=%3Ftoken%3D"), vnc.raw)
        self.assertFault(self.post(act, {"os-getVNCConsole": {"type": "xvpvnc"}}), 400,
                         "badRequest", "Unavailable console type xvpvnc.")
        try:
            from tempest.lib.common import jsonschema_validator as v
            import jsonschema
        except ImportError:
            skip_or_fail(self, "tempest is not installed (pip install tempest==47.0.0)")
        jsonschema.validate(r.json(), tempest_schema("v2_8", "servers", "get_remote_consoles")
                            ["response_body"], cls=v.JSONSCHEMA_VALIDATOR,
                            format_checker=v.FORMAT_CHECKER)


    def test_console_tokens_expire_and_open_one_session(self):
        """Through a real console proxy socket: a token past --console-token-ttl is refused
        and no longer shown (404); a fresh one is taken by its first connection, and a
        second connection with it is refused.  A refused token gets what Nova's proxies
        give (and Tempest's test_novnc_bad_token expects): the WebSocket opens (101), then
        closes with no data, at most an empty close frame."""
        proxy = minivan.ConsoleProxy(self.app, "127.0.0.1", 0)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        self.addCleanup(proxy.server_close)
        self.addCleanup(proxy.shutdown)
        self.app.conf["serial_console_listen"] = "127.0.0.1:%d" % proxy.server_address[1]
        server_id = self.new_server()
        act = f"/v2.1/servers/{server_id}/action"

        def console():
            r = self.post(act, {"os-getSerialConsole": {"type": "serial"}})
            self.assertEqual(r.status, 200, r.raw)
            url = r.json()["console"]["url"]
            return url, url.split("token=")[1]

        def status(url):
            refused = websocket_refused(url)
            return "refused" if refused is True else refused
        self.assertEqual(self.app.console_tokens.ttl, 600)      # Nova's token_ttl
        now = [1000.0]                   # the tokens' clock, moved by hand
        self.app.console_tokens.monotonic = lambda: now[0]
        url, token = console()
        now[0] += 599
        shown = self.get("/v2.1/os-console-auth-tokens/" + token, version="2.31")
        self.assertEqual(shown.status, 200, shown.raw)
        now[0] += 2
        self.assertFault(self.get("/v2.1/os-console-auth-tokens/" + token, version="2.31"),
                         404, "itemNotFound")
        self.assertEqual(status(url), "refused")
        url, token = console()
        self.assertNotIn(status(url), (101, "refused"))     # taken (the test guest has no pty)
        self.assertFault(self.get("/v2.1/os-console-auth-tokens/" + token, version="2.31"),
                         404, "itemNotFound")
        self.assertEqual(status(url), "refused")
        self.assertEqual(status(url.replace(token, str(uuid.uuid4()))), "refused")


class MetadataServiceTests(ServerTestCase):
    """The guests' metadata service, through a real socket: a caller is known by its
    address, which here is the address recorded for the server's port (127.0.0.1)."""

    def setUp(self):
        super().setUp()
        self.meta = minivan.Server(minivan.MetadataApp(self.app), "127.0.0.1", 0)
        self.meta_port = self.meta.server_address[1]
        threading.Thread(target=self.meta.serve_forever, daemon=True).start()
        self.addCleanup(self.meta.server_close)
        self.addCleanup(self.meta.shutdown)

    def fetch(self, path):
        conn = http.client.HTTPConnection("127.0.0.1", self.meta_port, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        data = resp.read()
        self.assertEqual(int(resp.getheader("Content-Length")), len(data))
        return resp.status, data

    def test_requests_relayed_by_neutrons_metadata_agent(self):
        """With --service-metadata-proxy, a request relayed by Neutron's metadata agent is
        known by X-Instance-ID, signed as Neutron's own sign_instance_id signs it (run from
        .venv-neutron): the server's metadata; a wrong signature 403, a missing or doubled
        header 400, another project 404; with the option off the headers are ignored."""
        neutron_python = os.path.join(HERE, ".venv-neutron", "bin", "python")
        if not os.path.exists(neutron_python):
            skip_or_fail(self, "no .venv-neutron (tools/setup-venvs.sh)")
        server_id = self.new_server(metadata={"role": "db"})
        project = self.store.data["servers"][server_id]["project_id"]
        secret = "s3cr3t-" + uuid.uuid4().hex
        signed = subprocess.run([neutron_python, "-c", (
            "import sys, types\n"
            "from neutron.common.utils import sign_instance_id\n"
            "conf = types.SimpleNamespace(metadata_proxy_shared_secret=sys.argv[1])\n"
            "print(sign_instance_id(conf, sys.argv[2]))"), secret, server_id],
            capture_output=True, text=True, check=True).stdout.strip()

        def relayed(headers):
            conn = http.client.HTTPConnection("127.0.0.1", self.meta_port, timeout=10)
            conn.putrequest("GET", "/openstack/latest/meta_data.json")
            for name, value in headers:
                conn.putheader(name, value)
            conn.endheaders()
            resp = conn.getresponse()
            return resp.status, resp.read()
        good = [("X-Instance-ID", server_id), ("X-Tenant-ID", project),
                ("X-Instance-ID-Signature", signed), ("X-Forwarded-For", "10.0.0.5")]
        self.assertEqual(relayed(good)[0], 404)                  # the option is off
        self.app.conf.update(service_metadata_proxy=True, metadata_proxy_shared_secret=secret)
        status, data = relayed(good)
        self.assertEqual(status, 200, data)
        self.assertEqual((json.loads(data)["uuid"], json.loads(data)["meta"]),
                         (server_id, {"role": "db"}))
        self.assertEqual(relayed(good[:2] + [("X-Instance-ID-Signature", "0" * 64)])[0], 403)
        self.assertEqual(relayed(good[1:])[0], 400)
        self.assertEqual(relayed(good + [("X-Tenant-ID", project)])[0], 400)
        self.assertEqual(relayed([good[0], ("X-Tenant-ID", "other")] + good[2:])[0], 404)

    def test_metadata_for_the_calling_server(self):
        """OpenStack and EC2 metadata of the server at the caller's address; others 404."""
        self.assertEqual(self.fetch("/openstack/latest/meta_data.json")[0], 404)
        self.post("/v2.1/os-keypairs", {"keypair": {"name": "k", "public_key": SAMPLE_KEY}})
        server_id = self.new_server(key_name="k", user_data=base64.b64encode(b"#!/bin/sh\n")
                                    .decode(), metadata={"role": "web"})
        ports = self.store.data["servers"][server_id]["ports"]
        self.store.commit([["set", ["servers", server_id, "ports"],
                            [dict(ports[0], ips=[["127.0.0.1", 4]], floating=["172.24.4.9"])]]])
        status, data = self.fetch("/openstack/latest/meta_data.json")
        meta = json.loads(data)
        self.assertEqual((status, meta["uuid"], meta["meta"], meta["public_keys"]["k"]),
                         (200, server_id, {"role": "web"}, SAMPLE_KEY))
        self.assertNotIn("admin_pass", meta)
        self.assertEqual(self.fetch("/openstack/latest/user_data"), (200, b"#!/bin/sh\n"))
        self.assertIn(b"meta_data.json", self.fetch("/openstack/latest")[1])
        self.assertEqual(self.fetch("/latest/user-data")[1], b"#!/bin/sh\n")
        status, data = self.fetch("/latest/meta-data/instance-id")
        self.assertEqual(data.decode(), self.server(server_id)["OS-EXT-SRV-ATTR:instance_name"])
        self.assertEqual(self.fetch("/latest/meta-data/public-keys/0/openssh-key")[1].decode(),
                         SAMPLE_KEY)
        self.assertEqual(self.fetch("/latest/meta-data/local-ipv4")[1], b"127.0.0.1")
        # the floating IP, as Tempest's test_server_basic_ops reads it inside the guest
        self.assertEqual(self.fetch("/latest/meta-data/public-ipv4")[1], b"172.24.4.9")
        self.assertIn(b"public-keys/", self.fetch("/latest/meta-data/")[1])
        self.assertEqual(self.fetch("/latest/meta-data/nope")[0], 404)
        conn = http.client.HTTPConnection("127.0.0.1", self.meta_port, timeout=10)
        conn.request("POST", "/openstack/latest/meta_data.json", "{}")
        self.assertEqual(conn.getresponse().status, 405)

    def test_the_guest_posts_its_password(self):
        """As Tempest's test_server_basic_ops does inside a guest: a POST to
        openstack/2013-10-17/password is what os-server-password then shows; Nova's metadata
        refuses a second one (409), one over 1020 bytes (400) and versions before 2013-04-04."""
        server_id = self.new_server()
        ports = self.store.data["servers"][server_id]["ports"]
        self.store.commit([["set", ["servers", server_id, "ports"],
                            [dict(ports[0], ips=[["127.0.0.1", 4]])]]])

        def post(path, body):
            conn = http.client.HTTPConnection("127.0.0.1", self.meta_port, timeout=10)
            conn.request("POST", path, body)
            response = conn.getresponse()
            return response.status, response.read()
        self.assertEqual(post("/openstack/2012-08-10/password", "x")[0], 405)
        self.assertEqual(post("/openstack/2013-10-17/password", "x" * 1021)[0], 400)
        self.assertEqual(post("/openstack/2013-10-17/password", "sekrit")[0], 200)
        self.assertEqual(post("/openstack/latest/password", "other")[0], 409)
        self.assertEqual(self.fetch("/openstack/latest/password"), (200, b"sekrit"))
        self.assertIn(b"password", self.fetch("/openstack/latest")[1])
        shown = self.get(f"/v2.1/servers/{server_id}/os-server-password")
        self.assertEqual(shown.json()["password"], "sekrit")
        self.delete(f"/v2.1/servers/{server_id}/os-server-password")
        self.assertEqual(post("/openstack/2013-10-17/password", "again")[0], 200)


# -- Neutron --------------------------------------------------------------------------------

NEUTRON_VENV = os.environ.get("MINIVAN_NEUTRON_VENV", os.path.join(HERE, ".venv-neutron"))


HORIZON_VENV = os.environ.get("MINIVAN_HORIZON_VENV", os.path.join(HERE, ".venv-horizon"))


def functional_clouds_yaml(env, directory, image_name):
    """A clouds.yaml with the cloud names the clients' own functional tests look for
    (devstack, devstack-alt, devstack-admin, devstack-system-admin, functional_admin)."""
    def cloud(user, project=None, **extra):
        auth = {"auth_url": env["OS_AUTH_URL"], "username": user,
                "password": env["OS_PASSWORD"], **extra}
        if project:
            auth["project_name"] = project
        return {"auth": auth, "region_name": env.get("OS_REGION_NAME", "RegionOne"),
                "identity_api_version": 3}
    names = {"user_domain_name": "Default", "project_domain_name": "Default"}
    ids = {"user_domain_id": "default", "project_domain_id": "default"}
    doc = {"clouds": {
        "devstack": cloud("demo", "demo", **names),
        "devstack-alt": cloud("alt_demo", "alt_demo", **names),
        "devstack-admin": cloud("admin", "admin", **names),
        "devstack-system-admin": cloud("admin", system_scope="all",
                                       user_domain_name="Default"),
        "functional_admin": cloud("admin", "admin", **ids)},
        "functional": {"image_name": image_name, "flavor_name": "m1.tiny"}}
    path = os.path.join(directory, "clouds.yaml")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)                   # JSON is YAML
    return path


def run_functional_suite(test, directory, work, clouds, env=None, timeout=2400):
    """Run a client's functional tests (pytest, in .venv) against clouds; returns the
    junit counts {passed, failed, errors, skipped} and the failing tests' names."""
    import xml.etree.ElementTree as ET
    report = os.path.join(work, "junit.xml")
    done = subprocess.run(
        [os.path.join(BIN, "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "no:logging", "--junitxml", report, directory], cwd=work,
        capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, OS_CLIENT_CONFIG_FILE=clouds, OS_TEST_TIMEOUT="600",
                 **(env or {})))
    if not os.path.exists(report):
        test.fail("the suite did not run: " + done.stdout[-3000:] + done.stderr[-2000:])
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    for case in suite.iter("testcase"):
        name = f"{case.get('classname')}.{case.get('name')}"
        kind = next((child.tag for child in case
                     if child.tag in ("failure", "error", "skipped")), None)
        if kind is None:
            counts["passed"] += 1
        else:
            counts[{"failure": "failed", "error": "errors", "skipped": "skipped"}[kind]] += 1
            if kind != "skipped":
                counts["failing"].append(name)
    print(f"{directory}: {counts}")
    return counts


class NeutronEndToEndTests(CLIMixin, unittest.TestCase):
    """minivan behind the test Keystone with a real Neutron (tools/neutron.sh: ML2 with the
    Open vSwitch agent, on Open vSwitch's userspace datapath) and real QEMU guests: ports
    are made, bound to minivan's host, plugged into br-int, reported plugged by Neutron,
    and deleted with their servers.  Neutron and Placement (tools/placement.sh, with
    Neutron's QoS reporting the agent's guaranteed bandwidth to it) run only while this
    class does: with them in the catalog every compute service uses them."""

    @classmethod
    def setUpClass(cls):
        cls.env = keystone_env()
        cls.ready = bool(cls.env and GUEST_IMAGE and os.path.exists(GUEST_IMAGE)
                         and have_libvirt() and have_clients()
                         and os.path.exists(os.path.join(NEUTRON_VENV, "bin", "gunicorn"))
                         and shutil.which("ovs-vswitchd") and cls.env.get("GLANCE_URL"))
        if not cls.ready:
            return
        work = os.path.join(os.environ.get("MINIVAN_TEST_WORK", tempfile.gettempdir()),
                            "neutron")
        cls.placement_dir = work + "-placement"
        done = subprocess.run([os.path.join(HERE, "tools", "placement.sh"), "start",
                               cls.placement_dir, str(free_port()),
                               os.environ["MINIVAN_TEST_KEYSTONE_ENV"]],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            cls.failure = done.stdout + done.stderr
            cls.ready = False
            return
        cls.neutron_dir = work
        done = subprocess.run([os.path.join(HERE, "tools", "neutron.sh"), "start", work,
                               str(free_port()), os.environ["MINIVAN_TEST_KEYSTONE_ENV"]],
                              capture_output=True, text=True, timeout=600,
                              # (MariaDB: Neutron's placement reports and sqlite's one
                              # writer at a time block each other)
                              env=dict(os.environ, NEUTRON_QOS_BANDWIDTH=str(cls.BANDWIDTH),
                                       NEUTRON_DB="mariadb"))
        if done.returncode != 0:
            cls.failure = done.stdout + done.stderr
            cls.ready = False
            return
        with open(os.path.join(work, "env")) as f:
            cls.neutron = dict(line[len("export "):].strip().split("=", 1)
                               for line in f if line.startswith("export "))
        cls.failure = sandbox_ready()
        if cls.failure:
            cls.ready = False
            return
        port = int(cls.env["COMPUTE_URL"].split(":")[2].split("/")[0])
        start_minivan(cls, port, sandbox=True, env_extra=keystone_minivan_env(cls.env, **{
            "MINIVAN_LIBVIRT_URI": "qemu:///system",
            "MINIVAN_VIRT_TYPE": "qemu", "MINIVAN_HOST": cls.neutron["NEUTRON_AGENT_HOST"],
            "MINIVAN_VIF_PLUGGING_TIMEOUT": "60", "MINIVAN_SHUTDOWN_TIMEOUT": "10",
            "MINIVAN_VNC_LISTEN": f"127.0.0.1:{free_port()}",
            "MINIVAN_SERIAL_CONSOLE_LISTEN": f"127.0.0.1:{free_port()}"}))
        if cls.env.get("CINDER_EXPORT_DIR"):
            # Cinder's share appears where minivan looks for it only now, mounted on the
            # host as libvirt would mount it: it must reach minivan's namespace too
            point = minivan.nfs_mount_point(os.path.join(cls.minivan_data, "mnt"),
                                            cls.env["CINDER_NFS_SHARE"])
            os.makedirs(point)
            subprocess.run(["mount", "--bind", cls.env["CINDER_EXPORT_DIR"], point],
                           check=True)
            cls.host_mounts.insert(0, point)
        cls.os_env = {k: v for k, v in cls.env.items() if k.startswith("OS_")}
        cls.image = glance_upload(cls.env, "neutron-guest", GUEST_IMAGE)

    @classmethod
    def tearDownClass(cls):
        stop_minivan(cls)
        if getattr(cls, "image", None):
            subprocess.run([os.path.join(BIN, "openstack"), "image", "delete", cls.image],
                           capture_output=True, env=dict(os.environ, **cls.os_env))
        if getattr(cls, "neutron_dir", None):
            subprocess.run([os.path.join(HERE, "tools", "neutron.sh"), "stop",
                            cls.neutron_dir], capture_output=True, timeout=300)
        if getattr(cls, "placement_dir", None):
            subprocess.run([os.path.join(HERE, "tools", "placement.sh"), "stop",
                            cls.placement_dir], capture_output=True, timeout=120)

    BANDWIDTH = 1000000         # kbit/s the agent's br-phys guarantees, in each direction

    def setUp(self):
        if not self.ready:
            skip_or_fail(self, getattr(self, "failure", None) or
                         "no Neutron setup (tools/test.sh: Keystone, Glance, the guest image, "
                         "tools/setup-venvs.sh's .venv-neutron and .venv-placement, and "
                         "openvswitch-switch)")

    def openstack(self, *args, expect_ok=True, env=None):
        return super().openstack(*args, expect_ok=expect_ok, env=dict(self.os_env, **(env or {})))

    def ports_of(self, server_id):
        return self.openstack("port", "list", "--device-id", server_id, "--long", "-f", "json")

    def test_minivan_runs_in_the_units_sandbox(self):
        """Every test of this class runs minivan as minivan.service does (tools/sandbox.py):
        the kernel reports the unit's capability bounding set, no_new_privs and a seccomp
        filter; the root file system is read-only, /tmp and /dev are its own, /root is
        inaccessible, the state directory is writable, and a forbidden system call fails."""
        pid = self.minivan_proc.pid
        with open(f"/proc/{pid}/status") as f:
            status = dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
        with open(os.path.join(HERE, "minivan.service")) as f:
            keep = next(line.split("=", 1)[1].split() for line in f
                        if line.startswith("CapabilityBoundingSet="))
        numbers = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_DAC_READ_SEARCH": 2,
                   "CAP_FOWNER": 3, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12,
                   "CAP_SYS_ADMIN": 21}
        self.assertEqual(int(status["CapBnd"], 16), sum(1 << numbers[c] for c in keep))
        self.assertEqual(int(status["CapEff"], 16), sum(1 << numbers[c] for c in keep))
        self.assertEqual((status["NoNewPrivs"], status["Seccomp"]), ("1", "2"))
        with open(f"/proc/{pid}/mountinfo") as f:
            points = {}
            for line in f:
                fields = line.split()
                points[fields[4]] = (fields[5].split(","), fields[fields.index("-") + 1])
        self.assertIn("ro", points["/"][0])
        self.assertEqual(points["/tmp"][1], "tmpfs")
        self.assertEqual(points["/dev"][1], "tmpfs")
        self.assertIn("rw", points[self.minivan_data][0])
        self.assertIn("ro", points["/root"][0])
        share = self.host_mounts[0] if len(self.host_mounts) > 1 else None
        if share:
            self.assertIn(share, points)               # mounted on the host after the start
        # the namespace, seen from inside: a write outside the state directory fails
        probe = subprocess.run(["nsenter", "-t", str(pid), "-m", "touch", "/var/lib/probe"],
                               capture_output=True, text=True)
        self.assertNotEqual(probe.returncode, 0)
        self.assertIn("Read-only file system", probe.stderr)

    def test_volume_and_ports_through_a_lifecycle(self):
        """Under the unit's sandbox: a server on a Neutron port, a Cinder volume attached
        (its share mounted on the host after minivan started) and detached, stop, start,
        hard reboot, a snapshot, delete; the port and the volume are free again."""
        if not self.env.get("CINDER_URL"):
            skip_or_fail(self, "no Cinder in the test cloud (tools/test.sh starts one)")
        net = self.neutron["NEUTRON_NETWORK_NAME"]
        server = self.openstack("server", "create", "--image", self.image, "--flavor",
                                "m1.tiny", "--network", net, "--wait", "sbx-vm", "-f", "json")
        self.addCleanup(self.openstack, "server", "delete", "--wait", "sbx-vm", expect_ok=False)
        self.assertEqual(server["status"], "ACTIVE")
        port = self.ports_of(server["id"])[0]
        self.assertEqual(self.openstack("port", "show", port["ID"], "-f", "json")["status"],
                         "ACTIVE")
        volume = self.openstack("volume", "create", "--size", "1", "sbx-vol", "-f", "json")
        self.addCleanup(self.openstack, "volume", "delete", volume["id"], expect_ok=False)
        for _ in range(120):
            if self.openstack("volume", "show", volume["id"], "-f", "json")["status"] == \
                    "available":
                break
            time.sleep(0.5)
        self.openstack("server", "add", "volume", "sbx-vm", volume["id"])
        for _ in range(120):
            shown = self.openstack("volume", "show", volume["id"], "-f", "json")
            if shown["status"] == "in-use":
                break
            time.sleep(0.5)
        self.assertEqual(shown["status"], "in-use")
        conn = real_guest_connection()
        self.addCleanup(conn.close)
        xml = conn.lookupByUUIDString(server["id"]).XMLDesc(0)
        self.assertIn(f"<serial>{volume['id']}</serial>", xml)
        self.assertIn(os.path.join(self.minivan_data, "mnt"), xml)
        for action, status in (("stop", "SHUTOFF"), ("start", "ACTIVE")):
            self.openstack("server", action, "sbx-vm")
            self.wait_status("sbx-vm", status)
        self.openstack("server", "reboot", "--hard", "--wait", "sbx-vm")
        self.openstack("server", "remove", "volume", "sbx-vm", volume["id"])
        for _ in range(120):
            if self.openstack("volume", "show", volume["id"], "-f", "json")["status"] == \
                    "available":
                break
            time.sleep(0.5)
        self.assertEqual(self.openstack("volume", "show", volume["id"], "-f", "json")[
            "status"], "available")
        snap = self.openstack("server", "image", "create", "--wait", "--name", "sbx-snap",
                              "sbx-vm", "-f", "json")
        self.addCleanup(self.openstack, "image", "delete", snap["id"], expect_ok=False)
        self.assertEqual(snap["status"], "active")
        self.openstack("server", "delete", "--wait", "sbx-vm")
        self.assertEqual(self.ports_of(server["id"]), [])

    def wait_status(self, name, status):
        for _ in range(240):
            shown = self.openstack("server", "show", name, "-f", "json")
            if shown["status"] == status and not shown.get("OS-EXT-STS:task_state"):
                return shown
            time.sleep(0.5)
        self.fail(f"{name} never became {status}: {shown['status']}")

    def test_servers_on_neutron_ports(self):
        """server create --network: a port bound to minivan's host (vif_type ovs), plugged
        into br-int and reported plugged (the build waits for it), its fixed IP in the
        server's addresses; NICs added and removed by network and by port; the ports minivan
        made go with the server, a given port stays, unbound."""
        net = self.neutron["NEUTRON_NETWORK_NAME"]
        server = self.openstack("server", "create", "--image", self.image, "--flavor",
                                "m1.tiny", "--network", net, "--wait", "nt-vm", "-f", "json")
        self.addCleanup(self.openstack, "server", "delete", "--wait", "nt-vm", expect_ok=False)
        self.assertEqual(server["status"], "ACTIVE")
        ports = self.ports_of(server["id"])
        self.assertEqual(len(ports), 1)
        port = self.openstack("port", "show", ports[0]["ID"], "-f", "json")
        self.assertEqual((port["binding_host_id"], port["binding_vif_type"], port["status"],
                          port["device_owner"]),
                         (self.neutron["NEUTRON_AGENT_HOST"], "ovs", "ACTIVE", "compute:nova"))
        address = port["fixed_ips"][0]["ip_address"]
        self.assertEqual(server["addresses"], {net: [address]})
        bridge = subprocess.run(["ovs-vsctl", "list-ports", "br-int"], capture_output=True,
                                text=True).stdout.split()
        self.assertIn("tap" + port["id"][:11], bridge)
        self.openstack("server", "add", "network", "nt-vm", net)
        self.assertEqual(len(self.ports_of(server["id"])), 2)
        given = self.openstack("port", "create", "--network", net, "nt-given", "-f", "json")
        self.addCleanup(self.openstack, "port", "delete", given["id"], expect_ok=False)
        self.openstack("server", "add", "port", "nt-vm", given["id"])
        shown = self.openstack("port", "show", given["id"], "-f", "json")
        self.assertEqual((shown["device_id"], shown["binding_host_id"]),
                         (server["id"], self.neutron["NEUTRON_AGENT_HOST"]))
        interfaces = self.openstack("server", "show", "nt-vm", "-f", "json")["addresses"][net]
        self.assertEqual(len(interfaces), 3)
        self.openstack("server", "remove", "port", "nt-vm", given["id"])
        shown = self.openstack("port", "show", given["id"], "-f", "json")
        self.assertEqual((shown["device_id"], shown["binding_host_id"]), ("", ""))
        self.openstack("server", "add", "port", "nt-vm", given["id"])
        self.openstack("server", "delete", "--wait", "nt-vm")
        self.assertEqual(self.ports_of(server["id"]), [])
        shown = self.openstack("port", "show", given["id"], "-f", "json")
        self.assertEqual(shown["device_id"], "")

    def test_given_port_fixed_ip_and_refusals(self):
        """--nic port-id= uses that port; --nic v4-fixed-ip= gets that address; an
        unknown network is 400 and a port in use 409, as in Nova."""
        net_id = self.neutron["NEUTRON_NETWORK_ID"]
        given = self.openstack("port", "create", "--network", net_id, "nt-port", "-f", "json")
        self.addCleanup(self.openstack, "port", "delete", given["id"], expect_ok=False)
        self.addCleanup(self.openstack, "server", "delete", "--wait", "nt-given",
                        expect_ok=False)
        server = self.openstack("server", "create", "--image", self.image, "--flavor",
                                "m1.tiny", "--nic", f"port-id={given['id']}", "--nic",
                                f"net-id={net_id},v4-fixed-ip=10.77.0.250", "--wait",
                                "nt-given", "-f", "json")
        self.assertEqual(server["status"], "ACTIVE")
        addresses = sorted(server["addresses"][self.neutron["NEUTRON_NETWORK_NAME"]])
        self.assertEqual(addresses, sorted([given["fixed_ips"][0]["ip_address"],
                                            "10.77.0.250"]))
        token = keystone_token(self.env, "admin", "admin")
        port = int(self.env["COMPUTE_URL"].split(":")[2].split("/")[0])

        def create(network):
            return compute_request(self, port, "POST", "/servers", token, {"server": {
                "name": "nt-refused", "imageRef": self.image, "flavorRef": "1",
                "networks": [network]}}, version="2.37")
        assert_fault(self, create({"port": given["id"]}), 409, "conflictingRequest",
                     f"Port {given['id']} is still in use.")
        missing = str(uuid.uuid4())
        assert_fault(self, create({"uuid": missing}), 400, "badRequest",
                     f"Network {missing} could not be found.")
        self.openstack("server", "delete", "--wait", "nt-given")
        self.assertEqual(self.openstack("port", "show", given["id"], "-f", "json")["device_id"],
                         "")

    def test_minimum_bandwidth_port(self):
        """A port with a minimum-bandwidth QoS rule: minivan asks Placement for the
        bandwidth with the server's flavor, and the claim takes it from the provider
        Neutron's agent reports for br-phys under minivan's host; the port's binding names
        that provider; a port asking for more than is left is No valid host, as in Nova;
        the delete frees both."""
        env = dict(self.os_env, OS_PLACEMENT_API_VERSION="1.39")
        host_rp = self.openstack("resource", "provider", "list", "--name",
                                 self.neutron["NEUTRON_AGENT_HOST"], "-f", "json", env=env)
        self.assertEqual(len(host_rp), 1, host_rp)

        def tree():
            return self.openstack("resource", "provider", "list", "--in-tree",
                                  host_rp[0]["uuid"], "-f", "json", env=env)
        wait_until(lambda: len(tree()) == 3, timeout=90, interval=2,
                   what="Neutron's agent and bridge providers under minivan's host")
        bridge = next(p for p in tree() if p["name"].endswith(":br-phys"))
        inventory = {r["resource_class"]: r["total"] for r in self.openstack(
            "resource", "provider", "inventory", "list", bridge["uuid"], "-f", "json",
            env=env)}
        self.assertEqual(inventory["NET_BW_EGR_KILOBIT_PER_SEC"], self.BANDWIDTH)
        policy = self.openstack("network", "qos", "policy", "create", "nt-min-bw", "-f",
                                "json")
        self.addCleanup(self.openstack, "network", "qos", "policy", "delete", policy["id"],
                        expect_ok=False)
        self.openstack("network", "qos", "rule", "create", "--type", "minimum-bandwidth",
                       "--min-kbps", "1000", "--egress", policy["id"], "-f", "json")
        big = self.openstack("network", "qos", "policy", "create", "nt-min-bw-big", "-f",
                             "json")
        self.addCleanup(self.openstack, "network", "qos", "policy", "delete", big["id"],
                        expect_ok=False)
        self.openstack("network", "qos", "rule", "create", "--type", "minimum-bandwidth",
                       "--min-kbps", str(self.BANDWIDTH + 1), "--egress", big["id"], "-f",
                       "json")
        net_id = self.neutron["NEUTRON_NETWORK_ID"]
        ports = {}
        for name, qos in (("nt-bw", policy), ("nt-bw-big", big)):
            ports[name] = self.openstack("port", "create", "--network", net_id,
                                         "--qos-policy", qos["id"], name, "-f", "json")
            self.addCleanup(self.openstack, "port", "delete", ports[name]["id"],
                            expect_ok=False)
        self.addCleanup(self.openstack, "server", "delete", "--wait", "nt-bw",
                        expect_ok=False)
        server = self.openstack("server", "create", "--image", self.image, "--flavor",
                                "m1.tiny", "--nic", f"port-id={ports['nt-bw']['id']}",
                                "--wait", "nt-bw", "-f", "json")
        self.assertEqual(server["status"], "ACTIVE")
        held = {a["resource_provider"]: a["resources"] for a in self.openstack(
            "resource", "provider", "allocation", "show", server["id"], "-f", "json",
            env=env)}
        self.assertEqual(held[bridge["uuid"]], {"NET_BW_EGR_KILOBIT_PER_SEC": 1000})
        self.assertEqual(held[host_rp[0]["uuid"]]["MEMORY_MB"], 512)
        usage = {r["resource_class"]: r["usage"] for r in self.openstack(
            "resource", "provider", "usage", "show", bridge["uuid"], "-f", "json", env=env)}
        self.assertEqual(usage["NET_BW_EGR_KILOBIT_PER_SEC"], 1000)
        bound = self.openstack("port", "show", ports["nt-bw"]["id"], "-f", "json")
        allocation = bound["binding_profile"]["allocation"]
        self.assertIn(bridge["uuid"], allocation.values() if isinstance(allocation, dict)
                      else [allocation])
        self.assertEqual(bound["status"], "ACTIVE")
        # more than the bridge has left: No valid host
        self.addCleanup(self.openstack, "server", "delete", "--wait", "nt-bw-big",
                        expect_ok=False)
        refused = self.openstack("server", "create", "--image", self.image, "--flavor",
                                 "m1.tiny", "--nic", f"port-id={ports['nt-bw-big']['id']}",
                                 "nt-bw-big", "-f", "json")
        wait_until(lambda: self.openstack("server", "show", refused["id"], "-f", "json")[
            "status"] == "ERROR", what="No valid host")
        fault = self.openstack("server", "show", refused["id"], "-f", "json")["fault"]
        self.assertIn("No valid host was found", fault["message"])
        self.openstack("server", "delete", "--wait", "nt-bw")
        usage = {r["resource_class"]: r["usage"] for r in self.openstack(
            "resource", "provider", "usage", "show", bridge["uuid"], "-f", "json", env=env)}
        self.assertEqual(usage["NET_BW_EGR_KILOBIT_PER_SEC"], 0)

    def test_openstacksdk_functional_compute(self):
        """openstacksdk's own functional tests of the compute service (its
        openstack/tests/functional/compute) against this cloud: Keystone, Glance, Cinder,
        Neutron and minivan on real QEMU guests.  Every one passes."""
        if not self.env.get("CINDER_URL"):
            skip_or_fail(self, "no Cinder in the test cloud (tools/test.sh starts one)")
        import openstack.tests.functional.compute as suite
        work = tempfile.mkdtemp(prefix="minivan-sdk-functional-")
        self.addCleanup(shutil.rmtree, work, True)
        counts = run_functional_suite(self, os.path.dirname(suite.__file__), work,
                                      functional_clouds_yaml(self.env, work, "neutron-guest"))
        self.assertEqual((counts["failed"], counts["errors"]), (0, 0), counts)
        self.assertGreaterEqual(counts["passed"], 17, counts)

    def test_novaclient_functional(self):
        """python-novaclient's own functional tests (its API and `nova` CLI tests) against
        this cloud.  They take a quarter of an hour on real guests, so they run on demand:
        MINIVAN_NOVACLIENT_FUNCTIONAL=1 tools/test.sh -k novaclient_functional."""
        if os.environ.get("MINIVAN_NOVACLIENT_FUNCTIONAL") != "1":
            self.skipTest("on demand: MINIVAN_NOVACLIENT_FUNCTIONAL=1")
        import novaclient.tests.functional as suite
        work = tempfile.mkdtemp(prefix="minivan-novaclient-functional-")
        self.addCleanup(shutil.rmtree, work, True)
        counts = run_functional_suite(
            self, os.path.dirname(suite.__file__), work,
            functional_clouds_yaml(self.env, work, "neutron-guest"),
            env={"OS_NOVACLIENT_EXEC_DIR": BIN, "TOX_ENV_DIR": os.path.dirname(BIN),
                 "OS_NOVACLIENT_NETWORK": self.neutron["NEUTRON_NETWORK_NAME"]},
            timeout=3600)
        known = (  # README, Compatibility: each for a reason outside minivan
            "TestAuthentication.test_auth_via_keystone_v3",
            "TestConsolesNovaClient.test_rdp_console_get",
            "TestInstanceUsageAuditLogCLI.test_get_os_instance_usage_audit_log",
            "TestInstanceUsageAuditLogCLI.test_get_os_instance_usage_audit_log_with_before")
        self.assertEqual([name for name in counts["failing"]
                          if not name.endswith(known)], [], counts)
        # (one more skips where the cloud has several networks, as here and in devstack)
        self.assertGreaterEqual(counts["passed"], 195, counts)

    def test_a_port_neutron_refuses_mid_build(self):
        """Three NICs: a given port, a new port, and a fixed IP another port holds, which
        Neutron refuses (409) after the first two are set up.  The server ends in ERROR
        with Neutron's answer as its fault; the port minivan made is deleted, the given
        port is handed back (no device, no binding), and the server has no addresses."""
        net_id = self.neutron["NEUTRON_NETWORK_ID"]
        given = self.openstack("port", "create", "--network", net_id, "nt-handed-back", "-f",
                               "json")
        self.addCleanup(self.openstack, "port", "delete", given["id"], expect_ok=False)
        holder = self.openstack("port", "create", "--network", net_id, "--fixed-ip",
                                "ip-address=10.77.0.240", "nt-holder", "-f", "json")
        self.addCleanup(self.openstack, "port", "delete", holder["id"], expect_ok=False)
        token = keystone_token(self.env, "admin", "admin")
        port = int(self.env["COMPUTE_URL"].split(":")[2].split("/")[0])
        made = compute_request(self, port, "POST", "/servers", token, {"server": {
            "name": "nt-refused-ip", "imageRef": self.image, "flavorRef": "1",
            "networks": [{"port": given["id"]}, {"uuid": net_id},
                         {"uuid": net_id, "fixed_ip": "10.77.0.240"}]}}, version="2.37")
        self.assertEqual(made.status, 202, made.raw)
        server_id = made.json()["server"]["id"]
        self.addCleanup(self.openstack, "server", "delete", "--wait", server_id,
                        expect_ok=False)
        wait_until(lambda: self.openstack("server", "show", server_id, "-f", "json")
                   ["status"] != "BUILD", timeout=180, what="the build to fail")
        shown = self.openstack("server", "show", server_id, "-f", "json")
        self.assertEqual((shown["status"], shown["addresses"]), ("ERROR", {}))
        self.assertIn("10.77.0.240", shown["fault"]["message"])
        self.assertEqual(self.ports_of(server_id), [])
        back = self.openstack("port", "show", given["id"], "-f", "json")
        self.assertEqual((back["device_id"], back["device_owner"], back["binding_host_id"]),
                         ("", "", ""))
        self.openstack("server", "delete", "--wait", server_id)
        self.assertEqual(self.openstack("port", "show", holder["id"], "-f", "json")
                         ["fixed_ips"][0]["ip_address"], "10.77.0.240")

    def test_security_groups_by_name_or_id(self):
        """openstackclient names a server's groups by their Neutron ids; minivan finds
        each by name, else by id, and shows its name.  A name two groups share is 409."""
        made = [self.openstack("security", "group", "create", name, "-f", "json")
                for name in ("nt-ids", "nt-twin", "nt-twin")]
        for group in made:
            self.addCleanup(self.openstack, "security", "group", "delete", group["id"],
                            expect_ok=False)
        server = self.openstack("server", "create", "--image", self.image, "--flavor",
                                "m1.tiny", "--network", self.neutron["NEUTRON_NETWORK_NAME"],
                                "--security-group", "nt-ids", "--wait", "nt-ids", "-f",
                                "json")
        self.addCleanup(self.openstack, "server", "delete", "--wait", server["id"],
                        expect_ok=False)
        shown = self.openstack("server", "show", server["id"], "-f", "json")
        self.assertEqual(shown["security_groups"], [{"name": "nt-ids"}])
        nic = self.ports_of(server["id"])[0]
        self.assertEqual(self.openstack("port", "show", nic["ID"], "-f", "json")[
            "security_group_ids"], [made[0]["id"]])
        token = keystone_token(self.env, "admin", "admin")
        port = int(self.env["COMPUTE_URL"].split(":")[2].split("/")[0])
        act = f"/servers/{server['id']}/action"
        assert_fault(self, compute_request(self, port, "POST", act, token, {
            "addSecurityGroup": {"name": "nt-twin"}}), 409, "conflictingRequest")
        added = compute_request(self, port, "POST", act, token, {
            "addSecurityGroup": {"name": made[2]["id"]}})
        self.assertEqual(added.status, 202, added.raw)
        self.assertEqual(sorted(self.openstack("port", "show", nic["ID"], "-f", "json")[
            "security_group_ids"]), sorted([made[0]["id"], made[2]["id"]]))
        self.assertEqual(self.openstack("server", "show", server["id"], "-f", "json")[
            "security_groups"], [{"name": "nt-ids"}, {"name": "nt-twin"}])
        assert_fault(self, compute_request(self, port, "POST", act, token, {
            "removeSecurityGroup": {"name": made[1]["id"]}}), 400, "badRequest",
            "not associated")
        removed = compute_request(self, port, "POST", act, token, {
            "removeSecurityGroup": {"name": made[2]["id"]}})
        self.assertEqual(removed.status, 202, removed.raw)
        self.assertEqual(self.openstack("port", "show", nic["ID"], "-f", "json")[
            "security_group_ids"], [made[0]["id"]])

    def test_floating_ips(self):
        """Up to 2.35 os-floating-ips allocates, shows and releases Neutron's floating IPs
        (pool "public" by default); up to 2.43 addFloatingIp and removeFloatingIp
        associate them with a server's port, whose addresses then list them as
        "floating".  An association made in Neutron reaches the server's addresses too
        (Neutron's network-changed event)."""
        port = int(self.env["COMPUTE_URL"].split(":")[2].split("/")[0])
        demo = keystone_token(self.env, "demo", "demo")
        alt = keystone_token(self.env, "alt_demo", "alt_demo")

        def api(method, path, body=None, token=demo, version="2.35"):
            return compute_request(self, port, method, path, token, body, version=version)

        def release(fip_id):
            self.openstack("floating", "ip", "delete", fip_id, expect_ok=False)

        made = api("POST", "/os-floating-ips", {"pool": None})
        self.assertEqual(made.status, 200, made.raw)
        fip = made.json()["floating_ip"]
        self.addCleanup(release, fip["id"])
        self.assertEqual((fip["pool"], fip["instance_id"], fip["fixed_ip"]),
                         ("public", None, None))
        self.assertEqual(self.openstack("floating", "ip", "show", fip["id"], "-f", "json")[
            "floating_ip_address"], fip["ip"])
        assert_fault(self, api("POST", "/os-floating-ips", {"pool": "nowhere"}), 404,
                     "itemNotFound", "Floating IP pool not found.")
        assert_fault(self, api("GET", "/os-floating-ips/" + fip["id"], token=alt), 404,
                     "itemNotFound")
        server = self.openstack("server", "create", "--image", self.image, "--flavor",
                                "m1.tiny", "--network", self.neutron["NEUTRON_NETWORK_NAME"],
                                "--wait", "nt-fip", "-f", "json",
                                env={"OS_USERNAME": "demo", "OS_PROJECT_NAME": "demo"})
        self.addCleanup(self.openstack, "server", "delete", "--wait", server["id"],
                        expect_ok=False)
        act = f"/servers/{server['id']}/action"
        assert_fault(self, api("POST", act, {"addFloatingIp": {"address": "10.78.1.1"}}),
                     404, "itemNotFound", "floating IP not found")
        added = api("POST", act, {"addFloatingIp": {"address": fip["ip"]}})
        self.assertEqual(added.status, 202, added.raw)
        nic = self.ports_of(server["id"])[0]
        self.assertEqual(self.openstack("floating", "ip", "show", fip["id"], "-f", "json")[
            "port_id"], nic["ID"])

        def addresses():
            view = api("GET", "/servers/" + server["id"]).json()["server"]["addresses"]
            return sorted((a["addr"], a["OS-EXT-IPS:type"]) for a in
                          view[self.neutron["NEUTRON_NETWORK_NAME"]])
        fixed = nic["Fixed IP Addresses"][0]["ip_address"]
        self.assertEqual(addresses(), sorted([(fixed, "fixed"), (fip["ip"], "floating")]))
        listed = api("GET", "/os-floating-ips").json()["floating_ips"]
        self.assertIn({"id": fip["id"], "ip": fip["ip"], "pool": "public",
                       "instance_id": server["id"], "fixed_ip": fixed}, listed)
        # released from the server in Neutron: its addresses follow
        self.openstack("floating", "ip", "unset", "--port", fip["id"])
        wait_until(lambda: addresses() == [(fixed, "fixed")], what="network-changed")
        assert_fault(self, api("POST", act, {"removeFloatingIp": {"address": fip["ip"]}}),
                     409, "conflictingRequest", "is not associated with instance")
        self.assertEqual(api("POST", act, {"addFloatingIp": {
            "address": fip["ip"], "fixed_address": fixed}}).status, 202)
        removed = api("POST", act, {"removeFloatingIp": {"address": fip["ip"]}},
                      version="2.43")
        self.assertEqual(removed.status, 202, removed.raw)
        self.assertEqual(addresses(), [(fixed, "fixed")])
        self.assertIsNone(self.openstack("floating", "ip", "show", fip["id"], "-f", "json")[
            "port_id"])
        self.assertEqual(api("DELETE", "/os-floating-ips/" + fip["id"]).status, 202)
        assert_fault(self, api("GET", "/os-floating-ips/" + fip["id"]), 404, "itemNotFound")
        self.assertNotEqual(self.openstack("floating", "ip", "show", fip["id"],
                                           expect_ok=False).returncode, 0)

    def test_horizon_launch_console_log_and_delete(self):
        """Horizon 27.0.0 (tools/horizon.sh) in headless Chromium (tools/horizon_flow.py):
        the demo user logs in, launches an instance from the Instances panel's dialog
        (image, m1.tiny, minivan-net), sees it Active, opens it, reads its Log tab and
        deletes it from the panel.  Screenshots go to horizon-shots/ beside minivan.py."""
        if not (os.path.exists(os.path.join(HORIZON_VENV, "bin", "django-admin"))
                and shutil.which("chromium") and shutil.which("chromedriver")):
            skip_or_fail(self, "no Horizon setup (tools/setup-venvs.sh's .venv-horizon, "
                               "Debian's chromium and chromium-driver)")
        work = tempfile.mkdtemp(prefix="minivan-horizon-")
        self.addCleanup(shutil.rmtree, work, True)
        horizon_port = free_port()
        done = subprocess.run([os.path.join(HERE, "tools", "horizon.sh"), "start", work,
                               str(horizon_port), os.environ["MINIVAN_TEST_KEYSTONE_ENV"]],
                              capture_output=True, text=True, timeout=600)
        self.addCleanup(subprocess.run, [os.path.join(HERE, "tools", "horizon.sh"), "stop",
                                         work], capture_output=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        shots = os.path.join(HERE, "horizon-shots")
        shutil.rmtree(shots, True)
        done = subprocess.run([os.path.join(HORIZON_VENV, "bin", "python"),
                               os.path.join(HERE, "tools", "horizon_flow.py"),
                               f"http://127.0.0.1:{horizon_port}", "demo",
                               self.env["OS_PASSWORD"], "neutron-guest",
                               self.neutron["NEUTRON_NETWORK_NAME"], "horizon-vm", shots],
                              capture_output=True, text=True, timeout=900)
        print(done.stdout)
        found = re.search(r"^server: ([0-9a-f-]{36})$", done.stdout, re.M)
        if found:
            self.addCleanup(self.openstack, "server", "delete", "--wait", found[1],
                            expect_ok=False)
        self.assertEqual(done.returncode, 0, done.stdout[-3000:] + done.stderr[-2000:])
        self.assertIn("console log: ", done.stdout)
        self.assertIn("ok: instance-deleted", done.stdout)
        self.assertEqual(len(os.listdir(shots)), 6)
        port = int(self.env["COMPUTE_URL"].split(":")[2].split("/")[0])
        token = keystone_token(self.env, "admin", "admin")
        wait_until(lambda: compute_request(self, port, "GET", "/servers/" + found[1],
                                           token).status == 404, what="horizon-vm gone")
        self.assertEqual(self.ports_of(found[1]), [])

    def test_security_groups_are_neutrons(self):
        """Up to 2.35 the security group APIs are Neutron's groups and ingress rules, in
        nova-network's shape; add/removeSecurityGroup changes the server's ports."""
        token = keystone_token(self.env, "admin", "admin")
        port = int(self.env["COMPUTE_URL"].split(":")[2].split("/")[0])

        def api(method, path, body=None):
            return compute_request(self, port, method, path, token, body, version="2.35")
        made = api("POST", "/os-security-groups", {"security_group": {
            "name": "nt-web", "description": "web"}})
        self.assertEqual(made.status, 200, made.raw)
        group = made.json()["security_group"]
        self.addCleanup(self.openstack, "security", "group", "delete", group["id"],
                        expect_ok=False)
        self.assertEqual(self.openstack("security", "group", "show", group["id"], "-f",
                                        "json")["name"], "nt-web")
        rule = api("POST", "/os-security-group-rules", {"security_group_rule": {
            "parent_group_id": group["id"], "ip_protocol": "tcp", "from_port": 22,
            "to_port": 22, "cidr": "10.0.0.0/8"}})
        self.assertEqual(rule.status, 200, rule.raw)
        shown = api("GET", f"/os-security-groups/{group['id']}").json()["security_group"]
        self.assertEqual([(r["ip_protocol"], r["from_port"], r["to_port"], r["ip_range"])
                          for r in shown["rules"]], [("tcp", 22, 22, {"cidr": "10.0.0.0/8"})])
        names = [g["name"] for g in api("GET", "/os-security-groups").json()["security_groups"]]
        self.assertIn("nt-web", names)
        self.assertIn("default", names)
        server = self.openstack("server", "create", "--image", self.image, "--flavor",
                                "m1.tiny", "--network", self.neutron["NEUTRON_NETWORK_NAME"],
                                "--wait", "nt-sg", "-f", "json")
        self.addCleanup(self.openstack, "server", "delete", "--wait", "nt-sg",
                        expect_ok=False)
        act = f"/servers/{server['id']}/action"
        self.assertEqual(api("POST", act, {"addSecurityGroup": {"name": "nt-web"}}).status,
                         202)
        nic = self.ports_of(server["id"])[0]
        groups = self.openstack("port", "show", nic["ID"], "-f", "json")["security_group_ids"]
        self.assertIn(group["id"], groups)
        listed = api("GET", f"/servers/{server['id']}/os-security-groups").json()
        self.assertEqual(sorted(g["name"] for g in listed["security_groups"]),
                         ["default", "nt-web"])
        self.assertEqual(api("POST", act, {"removeSecurityGroup": {"name": "nt-web"}}).status,
                         202)
        groups = self.openstack("port", "show", nic["ID"], "-f", "json")["security_group_ids"]
        self.assertNotIn(group["id"], groups)
        assert_fault(self, api("POST", act, {"addSecurityGroup": {"name": "nt-none"}}), 404,
                     "itemNotFound")
        networks = api("GET", "/os-networks").json()["networks"]
        self.assertIn((self.neutron["NEUTRON_NETWORK_ID"], "minivan-net"),
                      [(n["id"], n["label"]) for n in networks])
        added = compute_request(self, port, "POST", act, token, {"addFixedIp": {
            "networkId": self.neutron["NEUTRON_NETWORK_ID"]}}, version="2.43")
        self.assertEqual(added.status, 202, added.raw)
        self.assertEqual(len(self.ports_of(server["id"])), 2)
        self.assertEqual(api("DELETE", "/os-security-group-rules/" +
                             rule.json()["security_group_rule"]["id"]).status, 202)
        self.assertEqual(api("DELETE", f"/os-security-groups/{group['id']}").status, 202)
        assert_fault(self, api("GET", f"/os-security-groups/{group['id']}"), 404,
                     "itemNotFound")


# -- Placement: the real openstack-placement, read through osc-placement ------------------

PLACEMENT_VENV = os.environ.get("MINIVAN_PLACEMENT_VENV",
                                os.path.join(HERE, ".venv-placement"))
NOVA_VENV = os.environ.get("MINIVAN_NOVA_VENV", os.path.join(HERE, ".venv-nova"))
# Nova's traits minivan leaves out, each family for a reason of its own: what they promise
# minivan refuses (accelerators, PCI NUMA affinity, SmartNIC ports, sound, virtual IOMMUs,
# packed virtqueues, emulated architectures, TPM secret security, virtiofs shares), and the
# CPU features of Nova's fake host (minivan's simulated hosts have none to report; a KVM
# host's are CpuFeatureTraitTests')
NOVA_TRAITS_LEFT_OUT = re.compile(
    r"COMPUTE_ACCELERATORS|COMPUTE_SOCKET_PCI_NUMA_AFFINITY|COMPUTE_REMOTE_MANAGED_PORTS|"
    r"COMPUTE_SOUND_MODEL_.*|COMPUTE_VIOMMU_MODEL_.*|COMPUTE_NET_VIRTIO_PACKED|"
    r"COMPUTE_ARCH_(?!X86_64$).*|COMPUTE_SECURITY_TPM_SECRET_SECURITY_.*|"
    r"COMPUTE_STORAGE_VIRTIO_FS|HW_CPU_X86_.*")


def nova_provider(host=None, conf=None):
    """The inventory and traits Nova 34's libvirt driver and resource tracker give a compute
    node's provider (tools/nova-guest.py on Nova's fake libvirt)."""
    case = {"flavor": {"vcpus": 1, "ram": 64, "disk": 1, "ephemeral": 0, "swap": 0,
                       "extra_specs": {}},
            "image": {"disk_format": "raw", "properties": {}}, "provider": True,
            "host": host or {}, "conf": conf or {}}
    done = subprocess.run([os.path.join(NOVA_VENV, "bin", "python"),
                           os.path.join(HERE, "tools", "nova-guest.py")],
                          input=json.dumps([case]), capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout)[0]


class CpuFeatureTraitTests(unittest.TestCase):
    """The HW_CPU_X86_* traits minivan gives a host's CPU features are the ones Nova 34's
    libvirt driver gives them (nova.virt.libvirt.utils.cpu_features_to_traits), for every
    x86 feature libvirt knows (its cpu_map), each on its own and all at once."""

    CPU_MAP = "/usr/share/libvirt/cpu_map/x86_features.xml"

    def test_every_libvirt_feature_maps_as_novas(self):
        python = os.path.join(NOVA_VENV, "bin", "python")
        if not os.path.exists(python) or not os.path.exists(self.CPU_MAP):
            skip_or_fail(self, "no .venv-nova (tools/setup-venvs.sh) or libvirt's cpu_map")
        with open(self.CPU_MAP) as f:
            known = set(re.findall(r"<feature name='([^']+)'", f.read()))
        self.assertGreater(len(known), 100)
        # (and minivan's own names, one of which this libvirt may not know yet)
        features = sorted(known | set(minivan.CPU_FEATURE_TRAITS))
        script = ("import json, sys\n"
                  "from nova.virt.libvirt.utils import cpu_features_to_traits\n"
                  "names = json.load(sys.stdin)\n"
                  "json.dump({n: sorted(t for t, on in cpu_features_to_traits({n}).items()"
                  " if on) for n in names}, sys.stdout)\n")
        done = subprocess.run([python, "-c", script], input=json.dumps(features),
                              capture_output=True, text=True, timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        nova = json.loads(done.stdout)
        mine = {n: sorted(minivan.cpu_feature_traits({n})) for n in features}
        self.assertEqual(mine, nova)
        self.assertEqual(sum(1 for t in nova.values() if t), len(minivan.CPU_FEATURE_TRAITS))
        self.assertEqual(minivan.cpu_feature_traits(set(features)),
                         {t for traits in nova.values() for t in traits})


class PlacementTests(unittest.TestCase):
    """minivan behind the test Keystone on three simulated hosts, with a real Placement
    (tools/placement.sh: openstack-placement under gunicorn, sqlite) in the catalog while
    this class runs: providers, inventories, traits and aggregates as Nova reports them;
    allocations through builds, moves, shelve and delete; candidates for the scheduler;
    healing.  Read with osc-placement, as an operator does."""

    INTERVAL = 2

    @classmethod
    def setUpClass(cls):
        cls.env = keystone_env()
        cls.ready = bool(cls.env and cls.env.get("GLANCE_URL") and have_clients()
                         and os.path.exists(os.path.join(PLACEMENT_VENV, "bin", "gunicorn")))
        if not cls.ready:
            return
        work = os.path.join(os.environ.get("MINIVAN_TEST_WORK", tempfile.gettempdir()),
                            "placement")
        cls.placement_dir = work
        done = subprocess.run([os.path.join(HERE, "tools", "placement.sh"), "start", work,
                               str(free_port()), os.environ["MINIVAN_TEST_KEYSTONE_ENV"]],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            cls.failure = done.stdout + done.stderr
            cls.ready = False
            return
        with open(os.path.join(work, "env")) as f:
            cls.placement_url = next(line.split("=", 1)[1].strip() for line in f
                                     if line.startswith("export PLACEMENT_URL="))
        cls.port = int(cls.env["COMPUTE_URL"].split(":")[2].split("/")[0])
        start_minivan(cls, cls.port, hosts=3, env_extra=keystone_minivan_env(
            cls.env, MINIVAN_PLACEMENT_INTERVAL=str(cls.INTERVAL)))
        cls.os_env = dict({k: v for k, v in cls.env.items() if k.startswith("OS_")},
                          OS_PLACEMENT_API_VERSION="1.39", OS_COMPUTE_API_VERSION="2.87")
        cls.token = keystone_token(cls.env, "admin", "admin")
        image = make_image(tempfile.mkdtemp(prefix="minivan-img-"), "placement", size="1M")
        cls.image = glance_upload(cls.env, "placement", image)
        cls.rps = {}
        wait_until(lambda: len(cls.providers()) == 3, timeout=60, what="three providers")
        cls.rps = {p["name"]: p["uuid"] for p in cls.providers()}

    @classmethod
    def tearDownClass(cls):
        stop_minivan(cls)
        if getattr(cls, "image", None):
            image_request(cls.env["GLANCE_URL"], "DELETE", "/v2/images/" + cls.image,
                          keystone_token(cls.env, "admin", "admin"))
        if getattr(cls, "placement_dir", None):
            subprocess.run([os.path.join(HERE, "tools", "placement.sh"), "stop",
                            cls.placement_dir], capture_output=True, timeout=120)

    def setUp(self):
        if not self.ready:
            skip_or_fail(self, getattr(self, "failure", None) or
                         "no Placement setup (tools/test.sh: Keystone, Glance, the clients "
                         "and tools/setup-venvs.sh's .venv-placement)")

    # -- helpers ------------------------------------------------------------------------
    @classmethod
    def placement(cls, method, path, body=None, version="1.39"):
        import urllib.request
        req = urllib.request.Request(cls.placement_url + path, method=method, data=None
                                     if body is None else json.dumps(body).encode(),
                                     headers={"X-Auth-Token": cls.token,
                                              "OpenStack-API-Version": "placement " + version,
                                              "Content-Type": "application/json",
                                              "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    @classmethod
    def providers(cls):
        return cls.placement("GET", "/resource_providers")[1]["resource_providers"]

    def openstack(self, *args, expect_ok=True):
        return run_openstack(self, list(args), self.os_env, expect_ok)

    def api(self, method, path, body=None, version="2.87"):
        return compute_request(None, self.port, method, path, self.token, body,
                               version=version)

    def usages(self):
        """{host: {resource class: used}} as osc-placement shows them (zeros left out)."""
        found = {}
        for host, rp in sorted(self.rps.items()):
            rows = self.openstack("resource", "provider", "usage", "show", rp, "-f", "json")
            found[host] = {r["resource_class"]: r["usage"] for r in rows if r["usage"]}
        return found

    def hypervisor_usage(self):
        """{host: {resource class: used}} as os-hypervisors (below 2.88) reports it."""
        found = {}
        for hyp in self.api("GET", "/os-hypervisors/detail").json()["hypervisors"]:
            used = {"VCPU": hyp["vcpus_used"], "MEMORY_MB": hyp["memory_mb_used"] - 512,
                    "DISK_GB": hyp["local_gb_used"]}
            found[hyp["hypervisor_hostname"]] = {k: v for k, v in used.items() if v}
        return found

    def assert_usage(self, expected, osc=False):
        """Placement's usages settle at expected ({host: {class: used}}, hosts without
        usage left out), and equal what os-hypervisors reports; osc: as osc-placement
        shows them too."""
        want = {h: expected.get(h, {}) for h in self.rps}
        wait_until(lambda: {h: {k: v for k, v in (self.placement(
            "GET", f"/resource_providers/{rp}/usages")[1]["usages"]).items() if v}
            for h, rp in self.rps.items()} == want, timeout=30, what=f"usages {want}")
        if osc:
            self.assertEqual(self.usages(), want)
        self.assertEqual(self.hypervisor_usage(), want)

    def allocations(self, consumer):
        return self.openstack("resource", "provider", "allocation", "show", consumer,
                              "-f", "json")

    def boot(self, name, flavor="m1.tiny", *extra):
        server = self.openstack("server", "create", "--image", self.image, "--flavor",
                                flavor, "--nic", "none", "--wait", *extra, name, "-f", "json")
        self.addCleanup(self.openstack, "server", "delete", "--wait", server["id"],
                        expect_ok=False)
        self.assertEqual(server["status"], "ACTIVE")
        return server

    def host_of(self, server_id):
        return self.api("GET", f"/servers/{server_id}").json()["server"][
            "OS-EXT-SRV-ATTR:host"]

    def wait_status(self, server_id, status):
        wait_until(lambda: self.api("GET", f"/servers/{server_id}").json()["server"][
            "status"] == status, timeout=60, what=status)

    def log(self):
        with open(os.path.join(self.minivan_data, "minivan.log")) as f:
            return f.read()

    # -- tests --------------------------------------------------------------------------
    def test_providers_inventories_traits_and_aggregates(self):
        """A provider per compute host, named and numbered as its hypervisor; inventories
        from its libvirt with minivan's ratios and reservations; Nova's traits (its own
        libvirt driver and resource tracker, on a host like the simulated one) but for the
        families minivan refuses; a disabled compute service's trait, and aggregates."""
        listed = self.openstack("resource", "provider", "list", "-f", "json")
        hypervisors = self.api("GET", "/os-hypervisors/detail").json()["hypervisors"]
        self.assertEqual(sorted((p["name"], p["uuid"], p["parent_provider_uuid"])
                                for p in listed),
                         sorted((h["hypervisor_hostname"], h["id"], None)
                                for h in hypervisors))
        nova = nova_provider(host={"uefi": True, "secure_boot": True})
        for hyp in hypervisors:
            rows = self.openstack("resource", "provider", "inventory", "list", hyp["id"],
                                  "-f", "json")
            inventory = {r["resource_class"]: {k: r[k] for k in (
                "total", "reserved", "allocation_ratio", "min_unit", "max_unit",
                "step_size")} for r in rows}
            self.assertEqual(inventory, {
                "VCPU": {"total": hyp["vcpus"], "reserved": 0, "allocation_ratio": 4.0,
                         "min_unit": 1, "max_unit": hyp["vcpus"], "step_size": 1},
                "MEMORY_MB": {"total": hyp["memory_mb"], "reserved": 512,
                              "allocation_ratio": 1.0, "min_unit": 1,
                              "max_unit": hyp["memory_mb"], "step_size": 1},
                "DISK_GB": {"total": hyp["local_gb"], "reserved": 0, "allocation_ratio": 1.0,
                            "min_unit": 1, "max_unit": hyp["local_gb"], "step_size": 1}})
            # Nova's inventory has the same classes, ratios and reservations (its fake
            # host's sizes are its own)
            self.assertEqual({rc: (i["reserved"], i["allocation_ratio"]) for rc, i in
                              nova["inventory"].items()},
                             {rc: (i["reserved"], i["allocation_ratio"]) for rc, i in
                              inventory.items()})
            traits = {r["name"] for r in self.openstack(
                "resource", "provider", "trait", "list", hyp["id"], "-f", "json")}
            self.assertEqual(traits, {t for t in nova["traits"]
                                      if not NOVA_TRAITS_LEFT_OUT.fullmatch(t)})
        # every trait minivan sets is one Placement knows (os-traits), as an operator lists
        known = {r["name"] for r in self.openstack("trait", "list", "-f", "json")}
        self.assertLessEqual(traits, known)
        cmp3 = self.rps["cmp3"]

        def traits_of(rp):
            return set(self.placement("GET", f"/resource_providers/{rp}/traits")[1]["traits"])
        self.openstack("compute", "service", "set", "--disable", "cmp3", "nova-compute")
        wait_until(lambda: "COMPUTE_STATUS_DISABLED" in traits_of(cmp3), timeout=30,
                   what="COMPUTE_STATUS_DISABLED")
        self.openstack("compute", "service", "set", "--enable", "cmp3", "nova-compute")
        wait_until(lambda: "COMPUTE_STATUS_DISABLED" not in traits_of(cmp3), timeout=30,
                   what="COMPUTE_STATUS_DISABLED gone")
        agg = self.openstack("aggregate", "create", "placement-agg", "-f", "json")
        self.addCleanup(self.openstack, "aggregate", "delete", str(agg["id"]),
                        expect_ok=False)
        self.openstack("aggregate", "add", "host", "placement-agg", "cmp2")
        uuid_ = self.openstack("aggregate", "show", "placement-agg", "-f", "json")["uuid"]

        def aggregates_of(rp):
            return self.openstack("resource", "provider", "aggregate", "list", rp, "-f",
                                  "json")
        wait_until(lambda: [a["uuid"] for a in aggregates_of(self.rps["cmp2"])] == [uuid_],
                   timeout=30, what="the aggregate in Placement")
        self.assertEqual(aggregates_of(self.rps["cmp1"]), [])
        # member_of: candidates in the aggregate are cmp2's alone
        candidates = self.openstack("allocation", "candidate", "list", "--resource",
                                    "VCPU=1", "--member-of", uuid_, "-f", "json")
        self.assertEqual({c["resource provider"] for c in candidates}, {self.rps["cmp2"]})
        self.openstack("aggregate", "remove", "host", "placement-agg", "cmp2")
        wait_until(lambda: aggregates_of(self.rps["cmp2"]) == [], timeout=30,
                   what="the aggregate gone from Placement")

    def test_allocations_follow_builds_moves_shelve_and_delete(self):
        """Each server's flavor is claimed on its host with the server as consumer; a move
        leaves the source's allocation to the migration's uuid until confirm (freed) or
        revert (given back); live migration, evacuation, shelve-offload and delete move or
        free them.  After every step osc-placement's usages equal os-hypervisors'."""
        tiny = {"VCPU": 1, "MEMORY_MB": 512, "DISK_GB": 1}
        small = {"VCPU": 1, "MEMORY_MB": 2048, "DISK_GB": 20}
        server = self.boot("pl-mover", "m1.tiny", "--host", "cmp1",
                           "--os-compute-api-version", "2.74")
        sid = server["id"]
        self.assert_usage({"cmp1": tiny}, osc=True)
        mine = self.allocations(sid)
        self.assertEqual([(a["resource_provider"], a["resources"]) for a in mine],
                         [(self.rps["cmp1"], tiny)])
        self.assertEqual((mine[0]["project_id"], mine[0]["consumer_type"]),
                         (server["project_id"], "INSTANCE"))
        # cold migration: the migration holds cmp1 until it is confirmed
        self.openstack("server", "migrate", "--host", "cmp2", "--wait", sid,
                       "--os-compute-api-version", "2.56")
        self.wait_status(sid, "VERIFY_RESIZE")
        self.assert_usage({"cmp1": tiny, "cmp2": tiny}, osc=True)
        migration = self.openstack("server", "migration", "list", "--server", sid, "-f",
                                   "json")[0]
        held = self.allocations(migration["UUID"])
        self.assertEqual([(a["resource_provider"], a["resources"], a["consumer_type"])
                          for a in held], [(self.rps["cmp1"], tiny, "MIGRATION")])
        self.openstack("server", "migration", "confirm", sid)
        self.wait_status(sid, "ACTIVE")
        self.assert_usage({"cmp2": tiny})
        self.assertEqual(self.allocations(migration["UUID"]), [])
        # resize to another flavor on cmp3, reverted: back on cmp2 with the old flavor
        self.openstack("server", "resize", "--flavor", "m1.small", "--wait", sid)
        self.wait_status(sid, "VERIFY_RESIZE")
        dest = self.host_of(sid)
        if dest == "cmp2":
            self.assert_usage({"cmp2": small})
        else:
            self.assert_usage({"cmp2": tiny, dest: small})
        self.openstack("server", "resize", "revert", sid)
        self.wait_status(sid, "ACTIVE")
        self.assertEqual(self.host_of(sid), "cmp2")
        self.assert_usage({"cmp2": tiny})
        # resize confirmed
        self.openstack("server", "resize", "--flavor", "m1.small", "--wait", sid)
        self.wait_status(sid, "VERIFY_RESIZE")
        self.openstack("server", "resize", "confirm", sid)
        self.wait_status(sid, "ACTIVE")
        dest = self.host_of(sid)
        self.assert_usage({dest: small})
        # live migration
        target = "cmp1" if dest != "cmp1" else "cmp3"
        self.openstack("server", "migrate", "--live-migration", "--host", target, "--wait",
                       sid, "--os-compute-api-version", "2.30")
        self.wait_status(sid, "ACTIVE")
        self.assertEqual(self.host_of(sid), target)
        self.assert_usage({target: small})
        # evacuation from a host that is down
        self.openstack("compute", "service", "set", "--down", target, "nova-compute",
                       "--os-compute-api-version", "2.11")
        self.addCleanup(self.openstack, "compute", "service", "set", "--up", target,
                        "nova-compute", "--os-compute-api-version", "2.11")
        landing = "cmp2" if target != "cmp2" else "cmp3"
        self.openstack("server", "evacuate", "--host", landing, sid,
                       "--os-compute-api-version", "2.29")
        self.wait_status(sid, "ACTIVE")
        self.assertEqual(self.host_of(sid), landing)
        self.assert_usage({landing: small})
        self.openstack("compute", "service", "set", "--up", target, "nova-compute",
                       "--os-compute-api-version", "2.11")
        # shelve (offloaded at once) frees it; unshelve claims anew; delete frees it
        self.openstack("server", "shelve", sid)
        self.wait_status(sid, "SHELVED_OFFLOADED")
        self.assert_usage({})
        self.assertEqual(self.allocations(sid), [])
        self.openstack("server", "unshelve", sid)
        self.wait_status(sid, "ACTIVE")
        self.assert_usage({self.host_of(sid): small})
        self.openstack("server", "delete", "--wait", sid)
        self.assert_usage({})
        self.assertEqual(self.allocations(sid), [])
        for mig in self.api("GET", f"/os-migrations?instance_uuid={sid}").json()[
                "migrations"]:
            self.assertEqual(self.allocations(mig["uuid"]), [], mig)

    def test_healing(self):
        """What is changed behind minivan's back is mended within --placement-interval,
        and said in the log: a server's allocation deleted, or set to something else, comes
        back; an ended migration's allocation left over is removed; a consumer minivan does
        not know is left alone."""
        server = self.boot("pl-heal")
        sid, rp = server["id"], self.rps[self.host_of(server["id"])]
        tiny = {"VCPU": 1, "MEMORY_MB": 512, "DISK_GB": 1}

        def held(consumer):
            return {k: v["resources"] for k, v in self.placement(
                "GET", f"/allocations/{consumer}")[1]["allocations"].items()}
        wait_until(lambda: held(sid) == {rp: tiny}, timeout=30, what="the claim")
        self.openstack("resource", "provider", "allocation", "delete", sid)
        wait_until(lambda: f"placement: healed allocations of server {sid}: none -> " in
                   self.log(), timeout=30, what="healed")
        self.assertEqual(held(sid), {rp: tiny})
        other = next(r for r in self.rps.values() if r != rp)
        self.openstack("resource", "provider", "allocation", "set", sid, "--allocation",
                       f"rp={other},VCPU=3", "--project-id", server["project_id"],
                       "--user-id", server["user_id"], "--consumer-type", "INSTANCE",
                       "-f", "json")
        wait_until(lambda: held(sid) == {rp: tiny}, timeout=30, what="healed again")
        # an ended migration's allocation (made as minivan's own): removed
        self.openstack("server", "migrate", "--wait", sid)
        self.wait_status(sid, "VERIFY_RESIZE")
        self.openstack("server", "resize", "confirm", sid)
        self.wait_status(sid, "ACTIVE")
        migration = self.openstack("server", "migration", "list", "--server", sid, "-f",
                                   "json")[0]["UUID"]
        wait_until(lambda: held(migration) == {}, timeout=30, what="migration's freed")
        self.openstack("resource", "provider", "allocation", "set", migration,
                       "--allocation", f"rp={rp},VCPU=1", "--project-id",
                       server["project_id"], "--user-id", server["user_id"],
                       "--consumer-type", "MIGRATION", "-f", "json")
        wait_until(lambda: held(migration) == {}, timeout=30, what="leftover removed")
        self.assertIn(f"placement: healed allocations of migration {migration}", self.log())
        # a consumer of someone else's: left alone
        stranger = str(uuid.uuid4())
        self.openstack("resource", "provider", "allocation", "set", stranger,
                       "--allocation", f"rp={rp},VCPU=1", "--project-id",
                       server["project_id"], "--user-id", server["user_id"],
                       "--consumer-type", "INSTANCE", "-f", "json")
        self.addCleanup(self.placement, "DELETE", f"/allocations/{stranger}")
        time.sleep(3 * self.INTERVAL)
        self.assertEqual(held(stranger), {rp: {"VCPU": 1}})
        self.assertIn(f"consumer {stranger} holds resources", self.log())

    def test_reserved_inventory_keeps_builds_off(self):
        """An operator reserves a host's vCPUs in Placement: builds go elsewhere, and
        minivan's reports leave the reservation as it is."""
        for host in ("cmp1", "cmp2"):
            rp = self.rps[host]
            row = {r["resource_class"]: r for r in self.openstack(
                "resource", "provider", "inventory", "list", rp, "-f", "json")}["VCPU"]
            self.openstack("resource", "provider", "inventory", "set", rp, "--amend",
                           "--resource", f"VCPU:reserved={row['total']}", "-f", "json")
            self.addCleanup(self.openstack, "resource", "provider", "inventory", "set", rp,
                            "--amend", "--resource", "VCPU:reserved=0", "-f", "json")
        for n in range(2):
            server = self.boot(f"pl-reserved-{n}")
            self.assertEqual(self.host_of(server["id"]), "cmp3")
        time.sleep(2 * self.INTERVAL)
        row = {r["resource_class"]: r for r in self.openstack(
            "resource", "provider", "inventory", "list", self.rps["cmp1"], "-f", "json")}
        self.assertEqual(row["VCPU"]["reserved"], row["VCPU"]["total"])
        # a build that asks for cmp1 itself finds no room there
        made = self.openstack("server", "create", "--image", self.image, "--flavor",
                              "m1.tiny", "--nic", "none", "--host", "cmp1",
                              "--os-compute-api-version", "2.74", "pl-reserved-x", "-f",
                              "json")
        self.addCleanup(self.openstack, "server", "delete", "--wait", made["id"],
                        expect_ok=False)
        self.wait_status(made["id"], "ERROR")
        fault = self.openstack("server", "show", made["id"], "-f", "json")["fault"]
        self.assertIn("No valid host was found", fault["message"])

    def test_flavor_resources_and_traits(self):
        """A flavor's trait:T=required is met only by a host with the trait (set by an
        operator in Placement), resources:VCPU replaces the flavor's vCPUs in the claim,
        and a trait no host has is No valid host."""
        flavor = self.openstack("flavor", "create", "--vcpus", "2", "--ram", "256", "--disk",
                                "1", "--property", "trait:CUSTOM_MINIVAN_FAST=required",
                                "--property", "resources:VCPU=1", "pl-fast", "-f", "json")
        self.addCleanup(self.openstack, "flavor", "delete", flavor["id"], expect_ok=False)
        self.openstack("trait", "create", "CUSTOM_MINIVAN_FAST")
        missing = self.openstack("server", "create", "--image", self.image, "--flavor",
                                 "pl-fast", "--nic", "none", "pl-nohost", "-f", "json")
        self.addCleanup(self.openstack, "server", "delete", "--wait", missing["id"],
                        expect_ok=False)
        self.wait_status(missing["id"], "ERROR")
        rp = self.rps["cmp2"]
        traits = self.placement("GET", f"/resource_providers/{rp}/traits")[1]["traits"]

        def without_it():
            doc = self.placement("GET", f"/resource_providers/{rp}/traits")[1]
            self.placement("PUT", f"/resource_providers/{rp}/traits", {
                "resource_provider_generation": doc["resource_provider_generation"],
                "traits": [t for t in doc["traits"] if t != "CUSTOM_MINIVAN_FAST"]})
        self.addCleanup(without_it)
        self.openstack("resource", "provider", "trait", "set", rp, *[
            arg for t in traits + ["CUSTOM_MINIVAN_FAST"] for arg in ("--trait", t)],
            "-f", "json")
        server = self.boot("pl-fast-1", "pl-fast")
        self.assertEqual(self.host_of(server["id"]), "cmp2")
        self.assertEqual([(a["resource_provider"], a["resources"])
                          for a in self.allocations(server["id"])],
                         [(rp, {"VCPU": 1, "MEMORY_MB": 256, "DISK_GB": 1})])
        # minivan's own trait updates (a disabled service) keep the operator's trait
        self.openstack("compute", "service", "set", "--disable", "cmp2", "nova-compute")
        self.openstack("compute", "service", "set", "--enable", "cmp2", "nova-compute")
        time.sleep(2 * self.INTERVAL)
        self.assertIn("CUSTOM_MINIVAN_FAST", self.placement(
            "GET", f"/resource_providers/{rp}/traits")[1]["traits"])
        self.placement("DELETE", f"/allocations/{server['id']}")  # (healed back below)
        wait_until(lambda: self.placement("GET", f"/allocations/{server['id']}")[1][
            "allocations"], timeout=30, what="healed")
        self.assertEqual({k: v["resources"] for k, v in self.placement(
            "GET", f"/allocations/{server['id']}")[1]["allocations"].items()},
            {rp: {"VCPU": 1, "MEMORY_MB": 256, "DISK_GB": 1}})

    def restart_minivan(self, **env):
        """The class's minivan again on its own data, with these settings added."""
        proc = self.minivan_proc
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        self.minivan_log.close()
        start_minivan(type(self), self.port, hosts=3, data=self.minivan_data,
                      env_extra=keystone_minivan_env(
                          self.env, MINIVAN_PLACEMENT_INTERVAL=str(self.INTERVAL), **env))

    def test_claims_that_lose_a_race(self):
        """Another writer changes Placement between minivan's read and its write (a proxy
        in front of the real Placement makes that write just before it passes on
        minivan's): a server's consumer changed meanwhile is read again and claimed; a host
        whose room was taken meanwhile is left for the next one; a migration's consumer
        changed meanwhile is read again and freed."""
        proxy = RacingProxy(self.placement_url)
        self.addCleanup(proxy.close)
        self.restart_minivan(MINIVAN_PLACEMENT_URL=proxy.url)
        self.addCleanup(self.restart_minivan)
        server = self.boot("pl-race", "m1.tiny", "--host", "cmp1",
                           "--os-compute-api-version", "2.74")
        sid = server["id"]
        owner = {"project_id": server["project_id"], "user_id": server["user_id"]}

        def bump(consumer):
            """Write a consumer's allocations as they are: its generation moves on."""
            def write(_body):
                doc = self.placement("GET", f"/allocations/{consumer}")[1]
                status, body = self.placement("PUT", f"/allocations/{consumer}", dict(
                    owner, allocations={rp: {"resources": a["resources"]} for rp, a in
                                        doc["allocations"].items()},
                    consumer_generation=doc["consumer_generation"],
                    consumer_type="INSTANCE"))
                self.assertEqual(status, 204, body)
            return write
        # 1. the server's consumer changes just before minivan claims cmp2 for it
        proxy.arm(lambda method, path, body: method == "POST" and sid in body, bump(sid))
        self.openstack("server", "migrate", "--host", "cmp2", "--wait", sid,
                       "--os-compute-api-version", "2.56")
        self.wait_status(sid, "VERIFY_RESIZE")
        self.assertEqual(proxy.fired, 1)
        self.assertIn(f"placement: server {sid} changed in Placement while it was claimed",
                      self.log())
        self.assert_usage({"cmp1": {"VCPU": 1, "MEMORY_MB": 512, "DISK_GB": 1},
                           "cmp2": {"VCPU": 1, "MEMORY_MB": 512, "DISK_GB": 1}})
        # 2. the migration's consumer changes just before minivan frees it at confirm
        migration = self.openstack("server", "migration", "list", "--server", sid, "-f",
                                   "json")[0]["UUID"]
        proxy.arm(lambda method, path, body: method == "POST" and migration in body,
                  bump(migration))
        self.openstack("server", "resize", "confirm", sid)
        self.wait_status(sid, "ACTIVE")
        self.assert_usage({"cmp2": {"VCPU": 1, "MEMORY_MB": 512, "DISK_GB": 1}})
        self.assertEqual(proxy.fired, 2)
        self.assertIn(f"placement: server {sid} changed in Placement while it was written",
                      self.log())
        # 3. a host's room is taken just before minivan claims it: the next host is claimed
        stranger, taken = str(uuid.uuid4()), []
        self.addCleanup(self.placement, "DELETE", f"/allocations/{stranger}")

        def fill(body):
            rp = next(iter(next(iter(body.values()))["allocations"]))
            taken.append(rp)
            inventory = self.placement("GET", f"/resource_providers/{rp}/inventories")[1][
                "inventories"]["MEMORY_MB"]
            status, reply = self.placement("PUT", f"/allocations/{stranger}", dict(
                owner, consumer_generation=None, consumer_type="INSTANCE", allocations={
                    rp: {"resources": {"MEMORY_MB": inventory["total"] -
                                       inventory["reserved"]}}}))
            self.assertEqual(status, 204, reply)
        proxy.arm(lambda method, path, body: method == "POST" and sid not in body, fill)
        other = self.boot("pl-race-2")
        self.assertEqual(proxy.fired, 3)
        raced = next(h for h, rp in self.rps.items() if rp == taken[0])
        self.assertNotEqual(self.host_of(other["id"]), raced)
        self.assertIn(f"Placement refused the claim on {raced}", self.log())
        self.assertEqual(list(self.placement("GET", f"/allocations/{stranger}")[1][
            "allocations"]), [taken[0]])


    def test_dedicated_cpus_are_pcpu(self):
        """With --cpu-dedicated-set and --cpu-shared-set, each host's provider has VCPU for
        the shared CPUs and PCPU for the dedicated ones (os-hypervisors' vcpus are the
        shared ones, as Nova's); a hw:cpu_policy=dedicated flavor claims PCPU, not VCPU."""
        caps = os.path.join(self.minivan_data, "one-cell.caps")
        with open(caps, "w") as f:
            f.write(numa_caps_xml([(4, 8192, {})]))
        self.addCleanup(self.restart_minivan)
        self.restart_minivan(MINIVAN_CPU_DEDICATED_SET="2-3", MINIVAN_CPU_SHARED_SET="0-1",
                             MINIVAN_NUMA_TOPOLOGY=",".join(
                                 f"cmp{n}={caps}" for n in (1, 2, 3)))
        rp = self.rps["cmp1"]

        def inventory():
            return {rc: (i["total"], i["allocation_ratio"]) for rc, i in self.placement(
                "GET", f"/resource_providers/{rp}/inventories")[1]["inventories"].items()}
        wait_until(lambda: "PCPU" in inventory(), timeout=30, what="PCPU inventory")
        rows = {r["resource_class"]: r for r in self.openstack(
            "resource", "provider", "inventory", "list", rp, "-f", "json")}
        self.assertEqual({rc: (r["total"], r["allocation_ratio"]) for rc, r in rows.items()
                          if rc in ("VCPU", "PCPU")}, {"VCPU": (2, 4.0), "PCPU": (2, 1.0)})
        hyp = next(h for h in self.api("GET", "/os-hypervisors/detail").json()["hypervisors"]
                   if h["hypervisor_hostname"] == "cmp1")
        self.assertEqual(hyp["vcpus"], 2)
        flavor = self.openstack("flavor", "create", "--vcpus", "2", "--ram", "256", "--disk",
                                "1", "--property", "hw:cpu_policy=dedicated", "pl-pinned",
                                "-f", "json")
        self.addCleanup(self.openstack, "flavor", "delete", flavor["id"], expect_ok=False)
        server = self.boot("pl-pinned", "pl-pinned", "--host", "cmp1",
                           "--os-compute-api-version", "2.74")
        self.assertEqual([(a["resource_provider"], a["resources"])
                          for a in self.allocations(server["id"])],
                         [(rp, {"PCPU": 2, "MEMORY_MB": 256, "DISK_GB": 1})])
        self.openstack("server", "delete", "--wait", server["id"])
        self.assert_usage({})

class RacingProxy:
    """An HTTP proxy in front of a real Placement that, once armed, makes a change of its
    own in Placement just before it passes on the first request that matches (the change
    another writer could make at that moment)."""

    def __init__(self, target):
        self.target, self.fired, self.rule = target.rstrip("/"), 0, None
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def relay(self):
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else None
                body = json.loads(data) if data else {}
                rule = proxy.rule
                if rule is not None and rule[0](self.command, self.path, body):
                    proxy.rule = None
                    proxy.fired += 1
                    rule[1](body)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "content-length", "connection")}
                req = urllib.request.Request(proxy.target + self.path, data=data,
                                             method=self.command, headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        status, reply, got = resp.status, resp.read(), resp.headers
                except urllib.error.HTTPError as e:
                    status, reply, got = e.code, e.read(), e.headers
                self.send_response(status)
                for key in ("Content-Type", "OpenStack-API-Version"):
                    if got.get(key):
                        self.send_header(key, got[key])
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
            do_GET = do_PUT = do_POST = do_DELETE = relay

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def arm(self, matches, change):
        """matches(method, path, body) picks the request; change(body) is made first."""
        self.rule = (matches, change)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
