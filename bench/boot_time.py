#!/usr/bin/env python3
"""How long POST /servers takes to reach ACTIVE, and the guest's boot line, per
hypervisor: the median of N boots.

    python3 bench/boot_time.py --image GUEST.qcow2 [-n 5] [--qemu-network minivan-test]
                               [--boot-line booted]

Starts its own minivan (noauth, loopback, a temporary data directory) once on libvirt's
test hypervisor and, when libvirtd answers at qemu:///system, once on real QEMU (TCG),
boots N servers one after the other and prints the median, minimum and maximum of the
time from the POST to the first GET that shows ACTIVE (polled every 50 ms), and to the
first console output (os-getConsoleOutput, polled every 100 ms) holding the boot line
(tools/make-guest.sh's guest prints "minivan-guest booted"; the test hypervisor's
console says "booted").
"""
import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from bench import HEADERS as TOKEN, MINIVAN, free_port


def call(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request(method, "/v2.1" + path, json.dumps(body) if body else None, TOKEN)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, (json.loads(data) if data else None)


def run(uri, image, count, network, extra_env, boot_line):
    data = tempfile.mkdtemp(prefix="minivan-bench-")
    os.makedirs(os.path.join(data, "images"))
    shutil.copy(image, os.path.join(data, "images", "guest.qcow2"))
    port = free_port()
    env = dict(os.environ, MINIVAN_DATA_DIR=data, MINIVAN_PORT=str(port),
               MINIVAN_LIBVIRT_URI=uri, MINIVAN_NETWORK=network, **extra_env)
    log = open(os.path.join(tempfile.gettempdir(), "minivan-bench.log"), "w")
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", MINIVAN], env=env,
                            stdout=log, stderr=log)
    try:
        for _ in range(200):
            try:
                if call(port, "GET", "/")[0] == 200:
                    break
            except OSError:
                time.sleep(0.05)
        image_id = call(port, "GET", "/images")[1]["images"][0]["id"]
        times, booted = [], []
        for i in range(count):
            started = time.monotonic()
            status, body = call(port, "POST", "/servers", {"server": {
                "name": f"bench-{i}", "imageRef": image_id, "flavorRef": "1"}})
            if status != 202:
                raise SystemExit(f"create failed: {status} {body}")
            server_id = body["server"]["id"]
            while True:
                server = call(port, "GET", "/servers/" + server_id)[1]["server"]
                if server["status"] == "ACTIVE":
                    break
                if server["status"] == "ERROR":
                    raise SystemExit(f"build failed: {server.get('fault')}")
                time.sleep(0.05)
            times.append(time.monotonic() - started)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                status, body = call(port, "POST", f"/servers/{server_id}/action",
                                    {"os-getConsoleOutput": {}})
                if status == 200 and boot_line in body["output"]:
                    booted.append(time.monotonic() - started)
                    break
                time.sleep(0.1)
            else:
                raise SystemExit(f"no {boot_line!r} in the console of {server_id}")
            call(port, "DELETE", "/servers/" + server_id)
        return times, booted
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)       # faulthandler: every thread's stack
            proc.wait(10)
            print(f"minivan did not stop; its log (with thread stacks): {log.name}")
            raise
        finally:
            log.close()
            shutil.rmtree(data, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", required=True, help="a bootable qcow2 (tools/make-guest.sh)")
    parser.add_argument("-n", type=int, default=5, help="boots per hypervisor")
    parser.add_argument("--qemu-network", default="minivan-test",
                        help="isolated libvirt network for the QEMU guests")
    parser.add_argument("--boot-line", default="booted",
                        help="text of the console that says the guest has booted")
    args = parser.parse_args()
    runs = [("libvirt test hypervisor", "test:///default", "default", {})]
    try:
        import libvirt
        libvirt.open("qemu:///system").close()
        runs.append(("QEMU (TCG) under libvirtd", "qemu:///system", args.qemu_network,
                     {"MINIVAN_VIRT_TYPE": "qemu"}))
    except Exception as e:  # noqa: BLE001 - report and go on with what exists
        print(f"qemu:///system not measured: {e}")
    for label, uri, network, extra in runs:
        times, booted = run(uri, args.image, args.n, network, extra, args.boot_line)
        for what, values in (("create->ACTIVE", times), ("create->boot line", booted)):
            print(f"{what}, {label}: median {statistics.median(values):.3f} s "
                  f"(min {min(values):.3f} s, max {max(values):.3f} s, n={len(values)})")


if __name__ == "__main__":
    main()
