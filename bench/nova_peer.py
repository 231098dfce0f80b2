#!/usr/bin/env python3
"""The real Nova, in one process, for bench/bench.py --peer to measure beside minivan.

    .venv-nova/bin/python bench/nova_peer.py --port 8774 [--computes 3]

Nova 34's compute API (its own paste pipeline and policy), conductor, scheduler,
Placement 16 and N compute services on Nova's fake virt driver (nova.virt.fake), all
started by the set-up of Nova's own functional tests
(nova.tests.functional.integrated_helpers._IntegratedTestBase), run here outside a
test runner.  The API is served on 127.0.0.1:PORT by a threaded wsgiref server.

Where it differs from those tests, for a fair long run under load:
  * each cell is a real sqlite file (WAL) named by a real CellMapping, instead of the
    test fixture that swaps one global database under a lock (that lock deadlocks
    under concurrent API and build load);
  * keystonemiddleware's auth_token filter is replaced by TokenShim: a token
    "user:project" becomes the headers auth_token would set (user "admin" has the
    admin role, everyone else member and reader);
  * allocation ratios of 100,000 (as bench.py gives minivan), so that three simulated
    hosts hold thousands of servers;
  * no quota limits (NoopQuotaDriver), no API response validation, logging at
    WARNING, warnings that stay warnings (the tests make them errors), notifications dropped instead of kept in memory, and idle worker
    threads that sleep instead of polling every 10 ms.

It prints "ready" with the URL once it answers, and stops on SIGTERM.
"""
import argparse
import os
import signal
import socketserver
import sys
import threading
import time
from unittest import mock
from wsgiref import simple_server

# Nova picks eventlet or native threads when nova.tests.functional is imported
os.environ.setdefault("OS_NOVA_DISABLE_EVENTLET_PATCHING", "1")

try:
    from nova.tests.functional import integrated_helpers
except ImportError as e:
    sys.exit(f"nova_peer: Nova 34 with its tests is not importable here ({e}); "
             "run it with .venv-nova/bin/python after tools/setup-venvs.sh")


class TokenShim:
    """Sits where keystonemiddleware.auth_token sits in Nova's paste pipeline."""

    IDENTITY = ("HTTP_X_IDENTITY_STATUS", "HTTP_X_USER_ID", "HTTP_X_USER",
                "HTTP_X_USER_NAME", "HTTP_X_PROJECT_ID", "HTTP_X_PROJECT_NAME",
                "HTTP_X_TENANT_ID", "HTTP_X_TENANT", "HTTP_X_ROLES", "HTTP_X_ROLE",
                "HTTP_X_SERVICE_CATALOG")

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        for key in self.IDENTITY:             # never trust a client's identity headers
            environ.pop(key, None)
        user, _, project = environ.get("HTTP_X_AUTH_TOKEN", "").partition(":")
        if not user or not project:
            start_response("401 Unauthorized", [("Content-Type", "application/json")])
            return [b'{"error": {"code": 401, "message": "The request you have made '
                    b'requires authentication."}}']
        environ.update({
            "HTTP_X_IDENTITY_STATUS": "Confirmed",
            "HTTP_X_USER_ID": user, "HTTP_X_USER_NAME": user,
            "HTTP_X_USER_DOMAIN_ID": "default",
            "HTTP_X_PROJECT_ID": project, "HTTP_X_PROJECT_NAME": project,
            "HTTP_X_PROJECT_DOMAIN_ID": "default",
            "HTTP_X_ROLES": "admin,member,reader" if user == "admin" else "member,reader",
            "HTTP_X_SERVICE_CATALOG": "[]",
        })
        return self.app(environ, start_response)


def token_filter_factory(global_conf, **local_conf):
    return TokenShim


class Peer(integrated_helpers._IntegratedTestBase):
    """Nova's functional-test stack, kept running."""

    CAST_AS_CALL = False        # casts stay asynchronous, as between real services
    STUB_KEYSTONE = False       # Nova's own NovaKeystoneContext reads TokenShim's headers
    ADMIN_API = True
    computes_wanted = 3
    paste_ini = None

    def _setup_cells(self):
        import fixtures
        from nova import context, objects
        from nova.tests import fixtures as nova_fixtures
        from nova.tests.fixtures.nova import _use_file_backed_sqlite_with_wal
        from oslo_utils.fixture import uuidsentinel
        self.useFixture(fixtures.NestedTempfile())
        urls = {name: _use_file_backed_sqlite_with_wal(name)[0]
                for name in ("cell0", "cell1")}
        # services that use the database without targeting a cell get cell1
        self.flags(connection=urls["cell1"], group="database")
        self.useFixture(nova_fixtures.Database(database="main", connection=urls["cell1"]))
        self.useFixture(nova_fixtures.Database(database="main", connection=urls["cell0"]))
        admin = context.get_context()
        for name, uuid in (("cell0", objects.CellMapping.CELL0_UUID),
                           ("cell1", uuidsentinel.cell1)):
            # 'none:///': the cell keeps the one in-process message transport
            mapping = objects.CellMapping(context=admin, uuid=uuid, name=name,
                                          transport_url="none:///",
                                          database_connection=urls[name])
            mapping.create()
            self.cell_mappings[name] = mapping

    def _setup_services(self):
        self.flags(api_paste_config=self.paste_ini, group="wsgi")
        self.flags(compute_driver="fake.FakeDriver")
        self.flags(driver="nova.quota.NoopQuotaDriver", group="quota")
        self.flags(response_validation="ignore", group="api")
        self.flags(debug=False)
        # as bench.py's minivan: a few simulated hosts must hold thousands of servers
        for kind in ("cpu", "ram", "disk"):
            self.flags(**{f"{kind}_allocation_ratio": 100000.0})
        super()._setup_services()

    def _setup_compute_service(self):
        first = None
        for i in range(self.computes_wanted):
            service = self._start_compute(f"compute{i}")
            first = first or service
        return first

    def runTest(self):
        pass


class ThreadingServer(socketserver.ThreadingMixIn, simple_server.WSGIServer):
    daemon_threads = True


class QuietHandler(simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass


def paste_ini():
    import nova
    for candidate in (os.path.join(sys.prefix, "etc", "nova", "api-paste.ini"),
                      os.path.join(os.path.dirname(nova.__file__), "..", "..", "..", "..",
                                   "etc", "nova", "api-paste.ini")):
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    sys.exit("nova_peer: Nova's api-paste.ini is not under " + sys.prefix)


def drop_notifications(peer, stop):
    while not stop.wait(5):
        peer.notifier.reset()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, default=8774)
    p.add_argument("--computes", type=int, default=3)
    opts = p.parse_args(argv)
    t0 = time.perf_counter()
    Peer.computes_wanted, Peer.paste_ini = opts.computes, paste_ini()
    peer = Peer()
    with mock.patch("keystonemiddleware.auth_token.filter_factory", token_filter_factory):
        peer.setUp()
        app = peer.api_fixture.app()
    import logging
    import warnings
    import futurist._thread
    logging.getLogger().setLevel(logging.WARNING)
    # the tests turn deprecation warnings into errors; a deployed Nova only warns
    warnings.resetwarnings()
    warnings.simplefilter("ignore")
    futurist._thread.ThreadWorker.MAX_IDLE_FOR = 1
    stop = threading.Event()
    threading.Thread(target=drop_notifications, args=(peer, stop), daemon=True).start()
    httpd = simple_server.make_server("127.0.0.1", opts.port, app,
                                      server_class=ThreadingServer,
                                      handler_class=QuietHandler)
    signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=httpd.shutdown).start())
    print(f"nova_peer: ready in {time.perf_counter() - t0:.1f}s at "
          f"http://127.0.0.1:{opts.port}/v2.1 ({opts.computes} computes)", flush=True)
    try:
        httpd.serve_forever()
    finally:
        stop.set()
        httpd.server_close()
        peer.doCleanups()


if __name__ == "__main__":
    main()
