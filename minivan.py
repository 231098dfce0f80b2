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
    §1  configuration                       options, defaults, environment, INI file
    §2  utilities                           clock, ids, JSON, time formats, request-id logging
    §3  faults                              the exceptions handlers raise; fault bodies
    §4  state store                         snapshot + journal with group commit
    §5  microversions                       negotiation and comparison
    §6  request validation                  a small JSON-schema subset with Nova's messages
    §7  identity and policy                 noauth, Keystone tokens and catalog, policy personas
    §8  guest shape                         flavor extra specs and image properties made into
                                            devices, firmware, CPU and limits, as Nova reads them
    §9  NUMA and CPU pinning                host cells, their use, fitting a guest onto them
    §10 hypervisor driver                   libvirt (imported lazily), disks
    §11 image inspection                    formats, safety checks, the image cache by content
    §12 images                              the image source seam: local directory or Glance
    §13 image service                       a Glance v2 subset under /image
    §14 volumes                             the block storage client: Cinder v3, volume disks,
                                            LUKS volumes' secrets, clean-up calls kept and made
                                            again
    §15 networks                            the network service: Neutron ports, or none
    §16 quotas                              defaults, classes, per-project/per-user limits
    §17 views                               the request object, links and pagination
    §18 API: versions and extensions
    §19 API: flavors, extra specs, flavor access
    §20 API: keypairs
    §21 API: limits, quota sets, quota classes
    §22 API: availability zones
    §23 servers: states, lookups, views
    §24 encoded views                       server views kept encoded until the server changes
    §25 servers: the compute engine         background operations, reconciliation, power sync
    §26 config drive                        its files, and an ISO 9660 writer
    §27 API: servers                        create, list, show, update, delete, actions...
    §28 API: images                         Nova's image proxy, up to 2.35 (metadata 2.38)
    §29 API: networks and security groups   the proxy APIs, up to 2.35
    §30 API: volumes and events             os-volumes/os-snapshots proxies, external events
    §31 API: server groups
    §32 API: services and hypervisors       and the scheduler: filters and weighers
    §33 Placement                           resource providers, allocations, candidates
                                            for the scheduler, healing
    §34 API: simple tenant usage
    §35 API: aggregates                     host aggregates; their zones become the host's
    §36 API: migrations                     every move between hosts is a migration record
    §37 metadata service                    OpenStack and EC2 metadata for guests; console proxy
    §38 failure injection                   rules that make builds, actions and hosts fail
    §39 ROUTES and ACTIONS                  the dispatch table, one row per Nova route
    §40 HTTP front end                      app, server, handler, TLS, CORS
    §41 systemd and signals                 sd_notify, watchdog, background loops
    §42 main
"""

import argparse
import base64
import binascii
import bisect
import collections
import configparser
import contextvars
import datetime
import errno
import fcntl
import functools
import hashlib
import hmac
import http.client
import http.server
import ipaddress
import itertools
import queue
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
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
import xml.etree.ElementTree as ElementTree

LOG = logging.getLogger("minivan")
MINIVAN_RELEASE = "1.0"        # the version guests see in their SMBIOS system entry
MIN_VERSION = (2, 1)
MAX_VERSION = (2, 104)
SCHEMA_VERSION = 1


# § 1 configuration --------------------------------------------------------------------

def check_guest_options(conf):
    """The options Nova has as [libvirt] cpu_mode, cpu_models and hw_machine_type."""
    if conf["cpu_mode"] not in ("", "host-model", "host-passthrough", "custom", "none"):
        raise ConfigError("--cpu-mode must be host-model, host-passthrough, custom or none, "
                          f"not {conf['cpu_mode']!r}")
    if conf["cpu_mode"] == "custom" and not conf["cpu_models"].strip(", "):
        raise ConfigError("--cpu-mode custom needs --cpu-models (e.g. Haswell-noTSX)")
    if conf["cpu_models"].strip(", ") and conf["cpu_mode"] != "custom":
        raise ConfigError("--cpu-models is for --cpu-mode custom only")
    for option in ("cpu_dedicated_set", "cpu_shared_set"):
        if isinstance(conf[option], str):
            try:
                conf[option] = parse_cpu_spec(conf[option]) if conf[option].strip() \
                    else None
            except BadRequest as e:
                raise ConfigError(f"--{option.replace('_', '-')}: {e.message}") from None
    if conf["cpu_dedicated_set"] and conf["cpu_shared_set"] and \
            conf["cpu_dedicated_set"] & conf["cpu_shared_set"]:
        raise ConfigError("--cpu-dedicated-set and --cpu-shared-set must be disjoint, as "
                          "Nova's [compute] cpu_dedicated_set and cpu_shared_set")
    if isinstance(conf["numa_topology"], str):
        files = {}
        for pair in filter(None, (p.strip() for p in conf["numa_topology"].split(","))):
            name, sep, path = pair.partition("=")
            if not sep or not path:
                raise ConfigError(f"--numa-topology wants HOST=FILE pairs, not {pair!r}")
            try:
                with open(path) as f:
                    files[name] = f.read()
                ElementTree.fromstring(files[name])
            except (OSError, ElementTree.ParseError) as e:
                raise ConfigError(f"--numa-topology: cannot read {path}: {e}") from None
        conf["numa_topology"] = files
    for pair in filter(None, (p.strip() for p in conf["hw_machine_type"].split(","))):
        if not re.fullmatch(r"[\w.-]+=[\w.-]+", pair):
            raise ConfigError("--hw-machine-type must list ARCH=MACHINE pairs, e.g. "
                              f"x86_64=q35, not {pair!r}")


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
    ("region", "", "region of the catalog endpoints minivan uses (default: any)"),
    ("glance-url", "", "Glance endpoint (default: the image service of the Keystone catalog; "
     "without Keystone, minivan's own image service); 'local': minivan's own image "
     "service even where the catalog has Glance"),
    ("image-max-virtual-size", "1T", "largest virtual size of an image a server boots "
     "(K, M, G or T); a larger image is refused as unacceptable"),
    ("cinder-url", "", "Cinder v3 endpoint, e.g. http://controller/volume/v3, where a "
     "project id template is filled in for each caller (default: the volumev3 or "
     "block-storage service of the Keystone catalog; without Keystone there are no volumes)"),
    ("neutron-url", "", "Neutron endpoint, e.g. http://controller:9696 (default: the network "
     "service of the Keystone catalog; without Neutron, servers' NICs join libvirt "
     "networks)"),
    ("placement-url", "", "Placement endpoint, e.g. http://controller/placement (default: the "
     "placement service of the Keystone catalog; without Placement, minivan keeps its own "
     "accounting only)"),
    ("placement-interval", "60", "seconds between the reports of the compute hosts' "
     "resource providers to Placement and the heals of the servers' allocations"),
    ("vif-plugging-timeout", "300", "seconds a build waits for Neutron to report its ports "
     "plugged (network-vif-plugged); 0: no wait"),
    ("vif-plugging-is-fatal", "true", "a build whose ports Neutron does not report plugged "
     "in time fails"),
    ("volume-mount-base", "", "where NFS volume shares are mounted, one directory per share "
     "named by the md5 of its export (default: DATA_DIR/mnt); a share already mounted there "
     "is used as it is"),
    ("my-ip", "", "this host's address in the connector volumes are exported to "
     "(default: the address of the interface of the default route)"),
    ("token-cache-size", "10000", "validated tokens kept in memory"),
    ("token-cache-time", "300", "seconds a validated token is trusted before Keystone is "
     "asked again, as keystonemiddleware's token_cache_time: a revoked token is refused "
     "within this time, and while Keystone is down a known token works this long"),
    ("flavors", "", "JSON file of flavors loaded on first start "
     "(default: flavors.json beside minivan.py, else the built-in set)"),
    ("libvirt-uri", "qemu:///system", "libvirt connection URI (test:///default for a trial)"),
    ("compute-hosts", "", "compute hosts as comma-separated NAME=LIBVIRT_URI pairs, e.g. "
     "a=qemu:///system,b=qemu+ssh://root@b/system (default: one host, --host on "
     "--libvirt-uri); hosts other than this one need --instances-dir on storage they share"),
    ("cpu-allocation-ratio", "4.0", "virtual CPUs the scheduler places per physical CPU"),
    ("ram-allocation-ratio", "1.0", "memory the scheduler places per MB of host memory"),
    ("disk-allocation-ratio", "1.0", "disk the scheduler places per GB of host disk"),
    ("reserved-host-memory-mb", "512", "host memory kept from servers, in MB"),
    ("reserved-host-disk-mb", "0", "host disk kept from servers, in MB"),
    ("ram-weight-multiplier", "1.0", "the scheduler's weight of free memory: positive "
     "spreads servers over the hosts, negative stacks them"),
    ("virt-type", "", "kvm or qemu (default: kvm where the CPU and /dev/kvm allow it)"),
    ("hw-machine-type", "", "machine type of guests whose image sets no hw_machine_type, "
     "per architecture as Nova's [libvirt] hw_machine_type, e.g. x86_64=q35 "
     "(default: pc)"),
    ("cpu-mode", "", "the guests' CPU, as Nova's [libvirt] cpu_mode: host-model, "
     "host-passthrough, custom (with --cpu-models) or none (default: host-model)"),
    ("cpu-models", "", "comma-separated CPU models for --cpu-mode custom, as Nova's "
     "[libvirt] cpu_models: guests get the first"),
    ("swtpm-enabled", "false", "give guests whose flavor or image asks for one an emulated "
     "TPM (swtpm), as Nova's [libvirt] swtpm_enabled"),
    ("cpu-dedicated-set", "", "host CPUs (e.g. 2-7) that guests with dedicated CPUs are "
     "pinned to, as Nova's [compute] cpu_dedicated_set (default: with no --cpu-shared-set "
     "either, every CPU serves both)"),
    ("cpu-shared-set", "", "host CPUs (e.g. 0-1) that other guests float over, as Nova's "
     "[compute] cpu_shared_set"),
    ("numa-topology", "", "HOST=FILE pairs: read that compute host's NUMA cells from FILE, "
     "a libvirt capabilities document, instead of from its libvirt (for hosts whose "
     "driver reports none, such as libvirt's test:/// driver)"),
    ("network", "default", "libvirt network that servers' NICs join"),
    ("firewall", "nwfilter", "nwfilter: enforce security group rules on servers' NICs with "
     "libvirt's network filters (where libvirt has them); none: no filtering"),
    ("images-dir", "", "local image directory (default: DATA_DIR/images)"),
    ("instances-dir", "", "where servers' disks and console logs live "
     "(default: DATA_DIR/instances)"),
    ("force-config-drive", "false", "give every server a config drive"),
    ("dhcp-domain", "novalocal", "domain that follows a server's hostname in its metadata "
     "and config drive, as Nova's [api] dhcp_domain (empty: none, for 2.94's FQDN "
     "hostnames)"),
    ("enable-instance-password", "true", "return adminPass on create, rebuild and rescue"),
    ("reclaim-instance-interval", "0", "seconds a deleted server stays SOFT_DELETED "
     "(0: delete at once)"),
    ("shutdown-timeout", "60", "seconds a guest gets to shut down before it is stopped hard"),
    ("max-concurrent-builds", "10", "builds that run at once; more wait their turn "
     "(0: no limit)"),
    ("shelved-offload-time", "0", "seconds before a shelved server is offloaded "
     "(0: at once, -1: never)"),
    ("resume-guests-state-on-host-boot", "true", "start the servers that were running when "
     "the host went down"),
    ("sync-power-state-interval", "10", "seconds between checks of the guests' power states"),
    ("resize-confirm-window", "0", "seconds after which a resize confirms itself (0: never)"),
    ("availability-zone", "nova", "availability zone of this host"),
    ("instance-usage-audit", "false", "audit the servers' usage per month "
     "(os-instance_usage_audit_log reports it; off, as in Nova, reports no host done)"),
    ("serial-console-listen", "", "HOST:PORT of the serial console proxy, e.g. "
     "0.0.0.0:6083 (default: off; the console APIs then answer 'Unavailable console "
     "type')"),
    ("vnc-listen", "", "HOST:PORT of the noVNC console proxy, e.g. 0.0.0.0:6080; guests "
     "then get a VNC server on their host (default: off; os-getVNCConsole then answers "
     "'Unavailable console type')"),
    ("vnc-url", "", "the noVNC page as clients reach it (default: "
     "http://HOST:PORT/vnc_lite.html of --vnc-listen)"),
    ("novnc-dir", "", "noVNC's files, served by the VNC console proxy "
     "(default: /usr/share/novnc where it exists; Debian/Ubuntu: apt install novnc)"),
    ("console-token-ttl", "600", "seconds a console URL stays usable (it opens one "
     "session)"),
    ("serial-console-url", "", "base URL of that proxy as clients reach it "
     "(default: ws://HOST:PORT/ of --serial-console-listen)"),
    ("metadata-listen", "", "HOST:PORT for the guests' metadata service, e.g. "
     "192.168.122.1:8775 (default: off; guests then use config drives)"),
    ("service-metadata-proxy", "false", "the metadata service also answers what Neutron's "
     "metadata agent relays for a guest (X-Instance-ID signed with "
     "MINIVAN_METADATA_PROXY_SHARED_SECRET), as Nova's [neutron] service_metadata_proxy"),
    ("host", "", "compute host name (default: this machine's host name)"),
    ("default-floating-pool", "public", "the external Neutron network (name or id) that "
     "floating IPs come from when a request names no pool"),
    ("instance-name-template", "instance-%08x", "the libvirt domain name of a server, from "
     "its number (e.g. mv1-%08x) or from %(id)d, %(uuid)s and %(hostname)s; minivans "
     "sharing one libvirtd need templates of their own"),
    ("max-body-size", "114688", "largest request body accepted, in bytes"),
    ("max-connections", "1000", "client connections served at once; more get 503 at once"),
    ("client-timeout", "60", "seconds a client may take to send one request, its headers "
     "and body"),
    ("max-limit", "1000", "largest page a list returns"),
    ("journal-max-bytes", "16777216", "journal size that triggers a new snapshot"),
    ("view-cache-servers", "20000", "servers whose encoded views are kept between "
     "requests (0: build every view on every request)"),
    ("debug", "false", "log every request and response (tokens and passwords excluded)"),
    ("noauth-allow-remote", "false", "with --auth noauth, listen on a --bind that is not "
     "a loopback address and answer requests for any host name: everyone who reaches the "
     "port may act as admin"),
    ("fault-injection", "false", "let admins make minivan fail on purpose "
     "(/minivan/v1/faults and minivan:* server metadata)"),
]
SECRET_OPTIONS = [("keystone-password", "", "service user's password "
                   "(only from MINIVAN_KEYSTONE_PASSWORD or --config)"),
                  ("metadata-proxy-shared-secret", "", "the secret Neutron's metadata agent "
                   "signs instance ids with (only from MINIVAN_METADATA_PROXY_SHARED_SECRET "
                   "or --config)"),
                  ("fixed-key", "", "the one key of encrypted (LUKS) volumes where there is "
                   "no Barbican, in hex: the same as Cinder's, as Nova's [key_manager] "
                   "fixed_key (only from MINIVAN_FIXED_KEY or --config; default: none, "
                   "encrypted volumes then do not attach)")]
BOOL_TRUE = {"1", "true", "yes", "on"}


class ConfigError(Exception):
    """A setting is missing or wrong; main() prints it as one line."""


def instance_name(template, number, server_id, hostname):
    """A server's libvirt domain name, as Nova's instance_name_template makes it."""
    if "%(" in template:
        return template % {"id": number, "uuid": server_id, "hostname": hostname}
    return template % number


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
            p.add_argument("--" + name, default=None,
                           help=(help_text + shown).replace("%", "%%"))
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
    if any(section.get(name, section.get(name.replace("-", "_"))) for name, _, _ in
           SECRET_OPTIONS) and st.st_mode & 0o077:
        raise ConfigError(f"config file {path} holds a password but is readable by others: "
                          f"chmod 600 {path}")
    return section


def finish_config(conf):
    """Types, derived defaults and cross-checks."""
    for key in ("port", "max_body_size", "max_limit", "journal_max_bytes", "token_cache_size",
                "reclaim_instance_interval", "shutdown_timeout", "shelved_offload_time",
                "sync_power_state_interval", "resize_confirm_window", "vif_plugging_timeout",
                "max_concurrent_builds", "max_connections", "client_timeout",
                "console_token_ttl", "token_cache_time", "placement_interval",
                "view_cache_servers"):
        try:
            conf[key] = int(conf[key])
        except ValueError:
            raise ConfigError(f"--{key.replace('_', '-')} must be a number, "
                              f"not {conf[key]!r}") from None
    try:
        conf["image_max_virtual_size"] = disk_bytes(str(conf["image_max_virtual_size"]))
    except (ValueError, IndexError):
        raise ConfigError("--image-max-virtual-size must be a size such as 1T or 200G, not "
                          f"{conf['image_max_virtual_size']!r}") from None
    if conf["max_concurrent_builds"] < 0:
        raise ConfigError("--max-concurrent-builds must not be negative")
    for key in ("max_connections", "client_timeout", "console_token_ttl"):
        if conf[key] < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be at least 1")
    for key in ("cpu_allocation_ratio", "ram_allocation_ratio", "disk_allocation_ratio",
                "reserved_host_memory_mb", "reserved_host_disk_mb", "ram_weight_multiplier"):
        try:
            conf[key] = float(conf[key])
        except ValueError:
            raise ConfigError(f"--{key.replace('_', '-')} must be a number, "
                              f"not {conf[key]!r}") from None
        if key != "ram_weight_multiplier" and conf[key] < 0:
            raise ConfigError(f"--{key.replace('_', '-')} must not be negative")
    for key in ("debug", "force_config_drive", "enable_instance_password",
                "service_metadata_proxy",
                "resume_guests_state_on_host_boot", "instance_usage_audit",
                "vif_plugging_is_fatal", "fault_injection", "noauth_allow_remote",
                "swtpm_enabled"):
        conf[key] = str(conf[key]).lower() in BOOL_TRUE
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
    if conf["firewall"] not in ("nwfilter", "none"):
        raise ConfigError(f"--firewall must be nwfilter or none, not {conf['firewall']!r}")
    if conf["virt_type"] not in ("", "kvm", "qemu"):
        raise ConfigError(f"--virt-type must be kvm or qemu, not {conf['virt_type']!r}")
    check_guest_options(conf)
    if conf["bind"] is None:
        conf["bind"] = "127.0.0.1" if conf["auth"] == "noauth" else "::"
    if conf["auth"] == "noauth" and not conf["noauth_allow_remote"] and \
            not is_loopback_address(conf["bind"]):
        raise ConfigError(f"--auth noauth lets every caller act as admin, so it listens only "
                          f"on a loopback address, not {conf['bind']!r}: use --bind "
                          "127.0.0.1, --auth keystone, or --noauth-allow-remote true")
    if ":" not in conf["noauth_identity"]:
        raise ConfigError("--noauth-identity must look like user:project")
    if bool(conf["tls_cert"]) != bool(conf["tls_key"]):
        raise ConfigError("--tls-cert and --tls-key go together")
    template = conf["instance_name_template"]
    try:
        samples = {instance_name(template, n, str(uuid.UUID(int=n)), "vm") for n in (1, 2)}
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"--instance-name-template {template!r} does not format: "
                          f"{e}") from None
    if len(samples) < 2 or any(not n or "/" in n for n in samples):
        raise ConfigError(f"--instance-name-template {template!r} must give each server a "
                          "name of its own (use its number, %(id)d or %(uuid)s; no '/')")
    conf["data_dir"] = os.path.abspath(conf["data_dir"] or default_data_dir())
    conf["images_dir"] = os.path.abspath(conf["images_dir"] or
                                         os.path.join(conf["data_dir"], "images"))
    conf["instances_dir"] = os.path.abspath(conf["instances_dir"] or
                                            os.path.join(conf["data_dir"], "instances"))
    conf["volume_mount_base"] = os.path.abspath(conf["volume_mount_base"] or
                                                os.path.join(conf["data_dir"], "mnt"))
    conf["my_ip"] = conf["my_ip"] or default_ip()
    if not conf["novnc_dir"] and os.path.isdir("/usr/share/novnc"):
        conf["novnc_dir"] = "/usr/share/novnc"
    if conf["fixed_key"]:
        try:
            conf["fixed_key"] = bytes.fromhex(conf["fixed_key"]).hex()
        except ValueError:
            raise ConfigError("fixed-key (MINIVAN_FIXED_KEY) must be hexadecimal, an even "
                              "number of digits") from None
    conf["host"] = conf["host"] or socket.gethostname().split(".")[0]
    conf["compute_hosts"] = parse_compute_hosts(conf["compute_hosts"], conf["host"],
                                                conf["libvirt_uri"])
    unknown = set(conf["numa_topology"]) - {name for name, _ in conf["compute_hosts"]}
    if unknown:
        raise ConfigError(f"--numa-topology names no compute host: {', '.join(sorted(unknown))}")
    conf["public_url"] = conf["public_url"].rstrip("/")
    conf["cors_allowed_origins"] = [o.strip() for o in conf["cors_allowed_origins"].split(",")
                                    if o.strip()]
    return conf


LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def is_loopback_address(address):
    """True for 127.0.0.0/8, ::1 and the loopback names."""
    if address in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_compute_hosts(text, host, libvirt_uri):
    """[(name, libvirt URI)] of --compute-hosts; one host, this one, when it is empty."""
    if isinstance(text, list):
        return text
    if not text.strip():
        return [(host, libvirt_uri)]
    hosts = []
    for item in text.split(","):
        name, sep, uri = item.strip().partition("=")
        if not sep or not uri.strip() or not re.fullmatch(r"[A-Za-z0-9._-]{1,255}", name):
            raise ConfigError(f"--compute-hosts wants NAME=LIBVIRT_URI pairs, not {item!r}")
        if name in dict(hosts):
            raise ConfigError(f"--compute-hosts names host {name} twice")
        hosts.append((name, uri.strip()))
    return hosts


def default_ip():
    """The address of the interface the default route leaves by (a UDP socket's connect
    sends nothing); 127.0.0.1 on a host without one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def default_config(**overrides):
    """A complete configuration with every default, for tests and embedding."""
    conf = {name.replace("-", "_"): default for name, default, _ in OPTIONS + SECRET_OPTIONS}
    conf.update({k: v for k, v in overrides.items()})
    return finish_config(conf)


# § 2 utilities ------------------------------------------------------------------------

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


def stored_isotime(text):
    """isotime() of a time stored by isotime_us(), without parsing it."""
    return text[:19] + "Z" if len(text) >= 19 and text[10] == "T" else \
        isotime(parse_isotime(text))


def parse_isotime(text):
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f")


def new_request_id():
    return "req-" + str(uuid.uuid4())


# The request being handled by this thread, for every log line about it.
CURRENT_REQUEST = contextvars.ContextVar("minivan_request_id", default="-")


def remove_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory):
    """A rename or new file in the directory survives a crash of the host."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path, text):
    """A small file of minivan's own (0600), on disk before this returns."""
    tmp = path + ".part"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


# § 3 faults ---------------------------------------------------------------------------

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


# § 4 state store ----------------------------------------------------------------------
#
# Every record lives in one JSON tree (Store.data).  A change is a list of
# operations, each ["set", path, value] or ["del", path], where path is a list
# of keys from the root.  Operations are absolute (never "add one"), so
# applying one twice is harmless; that is what lets a snapshot be taken while
# the journal keeps growing.  commit() applies the change in memory, appends it
# to the journal and returns only once the journal is fsynced; concurrent
# commits share one fsync.
#
# A snapshot taken while minivan serves (the journal grew past its limit) holds
# nobody up: the journal is set aside as state.json.journal.N and a new one
# started, then a forked child writes the memory it was given (a frozen copy, by
# the kernel's copy-on-write) to a temporary file while the parent goes on.  Once
# the child is done, the parent puts the file in place and removes the journals
# set aside.  Start-up replays state.json, then the journals set aside (oldest
# first), then the journal.
#
# The records of a few collections, written often and read seldom (a server's
# instance actions), are kept in memory as their JSON text (Packed), read from
# state.json without building them and decoded only when asked for: a server's
# actions take a third of the memory they would as dicts and lists.  Servers are read
# one by one too, each sharing its keys and its equal values (hosts, states, zones,
# projects, flavor names) with those read before it.

EMPTY_STATE = {
    "flavors": {}, "flavor_access": {}, "keypairs": {}, "quotas": {},
    "user_quotas": {}, "quota_classes": {}, "servers": {}, "server_groups": {},
    "images": {}, "instance_actions": {}, "security_groups": {}, "services": {},
    "aggregates": {}, "migrations": {}, "deleted_images": {}, "volume_cleanups": {},
    "counters": {"keypair": 0, "flavor": 0, "instance": 0, "aggregate": 0},
}


SNAPSHOT_SPACING = 1.0     # seconds at least between background snapshots

PACKED = frozenset({"instance_actions"})   # collections whose records stay JSON text


class Packed(bytes):
    """A record of a PACKED collection, as its JSON text (UTF-8)."""
    __slots__ = ()


def pack(value):
    return value if isinstance(value, Packed) else \
        Packed(json.dumps(value, sort_keys=True).encode("utf-8"))


def unpack(value):
    """A record as dicts and lists: a copy of its own, for the caller to change."""
    return json.loads(value if isinstance(value, Packed) else json.dumps(value))


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


# Collections read record by record, each record made to share its keys with the
# others, and the equal values of some of its fields (strings: values that nothing can
# tell apart but memory); and the dicts in it that are to share theirs likewise.
SHARED = {"servers": (("availability_zone", "disk_config", "host", "image_ref", "node",
                       "project_id", "reservation_id", "root_device_name", "user_id",
                       "vm_state"), ("flavor",))}


class Sharing:
    """Equal key sets and equal string values of records read one by one, held once."""

    def __init__(self):
        self.keys = {}           # tuple of keys -> the first such tuple
        self.values = {}         # string -> the first such string

    def record(self, record, fields=(), nested=()):
        names = tuple(record)
        record = dict(zip(self.keys.setdefault(names, names), record.values()))
        values = self.values
        for field in fields:
            value = record.get(field)
            if value.__class__ is str:
                record[field] = values.setdefault(value, value)
        for field in nested:
            value = record.get(field)
            if value.__class__ is dict:
                record[field] = self.record(value, tuple(
                    k for k, v in value.items() if v.__class__ is str))
        return record


def parse_state(text):
    """state.json's text as json.loads reads it, except that the records of the
    PACKED collections are kept as Packed text, never built as objects, and those of
    the SHARED ones share their keys and some of their values."""
    scan = json.JSONDecoder().scan_once
    sharing = Sharing()

    def skip(i):
        return _JSON_SPACE.match(text, i).end()

    def value(i):
        try:
            return scan(text, i)
        except StopIteration:
            raise ValueError(f"a value expected at character {i}") from None

    def members(i, each):
        """The object at i as {key: each(key, i)[0]}, and where it ends."""
        if not text.startswith("{", i):
            raise ValueError(f"an object expected at character {i}")
        out = {}
        i = skip(i + 1)
        if text.startswith("}", i):
            return out, i + 1
        while True:
            if not text.startswith('"', i):
                raise ValueError(f"a key expected at character {i}")
            key, i = value(i)
            i = skip(i)
            if not text.startswith(":", i):
                raise ValueError(f"':' expected at character {i}")
            out[key], i = each(key, skip(i + 1))
            i = skip(i)
            if text.startswith(",", i):
                i = skip(i + 1)
            elif text.startswith("}", i):
                return out, i + 1
            else:
                raise ValueError(f"',' or '}}' expected at character {i}")

    def packed_record(key, i):
        _, end = value(i)
        return Packed(text[i:end].encode("utf-8")), end

    def collection(name, i):
        if name in PACKED and text.startswith("{", i):
            return members(i, packed_record)
        if name in SHARED and text.startswith("{", i):
            fields, nested = SHARED[name]

            def shared_record(key, i):
                built, end = value(i)
                if built.__class__ is dict:
                    built = sharing.record(built, fields, nested)
                return built, end
            return members(i, shared_record)
        return value(i)          # a whole collection at once: its keys decoded once

    def top(key, i):
        return members(i, collection) if key == "data" and text.startswith("{", i) \
            else value(i)

    doc, end = members(skip(0), top)
    if skip(end) != len(text):
        raise ValueError(f"extra data at character {skip(end)}")
    return doc


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
        self.pending = []       # (seq, journal line, undo ops) not yet written
        self.failed = set()     # seqs whose write failed (undone; their waiters get 503)
        self.flushing = False
        self.broken = None      # why the state cannot be written, while it cannot
        self.journal = None
        self.cut_to = None      # journal length to cut back to before the next write
        self.lock_fd = None
        self.snapshotting = None    # the background snapshot's child pid, while it runs
        self.next_snapshot = 0.0    # time.monotonic() before which none starts again
        self.watchers = []      # watcher(op, data) runs before each op is applied
        self.after = []         # after(op) runs once it is applied (readers may see it)

    # -- start-up --------------------------------------------------------
    def open(self):
        os.makedirs(self.dir, mode=0o711, exist_ok=True)   # QEMU reaches instances/ inside
        self._take_lock()
        fresh = not os.path.exists(self.path)
        if fresh:
            self.data = json.loads(json.dumps(EMPTY_STATE))
        else:
            self.data = self._read_snapshot()
        for name in os.listdir(self.dir):      # a snapshot that never finished
            if name.startswith(os.path.basename(self.path) + ".tmp"):
                remove_quietly(os.path.join(self.dir, name))
        replayed = sum(self._replay_journal(path) for _, path in self._set_aside())
        replayed += self._replay_journal(self.journal_path)
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
                text = f.read()
            try:
                doc = parse_state(text)
            except ValueError:
                doc = json.loads(text)     # not an object: said below; else the error
            del text
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
        data = migrate_state(doc["data"], version)
        for name in PACKED:
            records = data[name]
            if isinstance(records, dict):
                for key, record in records.items():
                    if not isinstance(record, Packed):
                        records[key] = pack(record)
        return data

    def _set_aside(self):
        """The journals set aside by background snapshots not yet in place, as (N, path),
        oldest first."""
        prefix = os.path.basename(self.journal_path) + "."
        return sorted((int(name[len(prefix):]), os.path.join(self.dir, name))
                      for name in os.listdir(self.dir)
                      if name.startswith(prefix) and name[len(prefix):].isdigit())

    def _replay_journal(self, path):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return 0
        except OSError as e:
            raise StateError(f"cannot read {path}: {e}") from None
        lines = raw.split(b"\n")
        count = offset = 0
        for number, line in enumerate(lines, 1):
            start, offset = offset, offset + len(line) + 1
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
                                "it was never acknowledged", path)
                    self._cut_journal(path, start)
                    break
                raise StateError(f"{path} line {number} is unreadable ({e}); "
                                 "it was left untouched") from None
            count += 1
        return count

    def _cut_journal(self, path, length):
        """Cut the journal back to its whole lines, durably, before anything is appended
        to it: a line written after a torn one would be unreadable."""
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.ftruncate(fd, length)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise StateError(f"cannot cut the torn last line off {path}: {e}") from None

    # -- changes -----------------------------------------------------------
    def commit(self, ops):
        """Apply ops in memory, then return once they are durable on disk."""
        self.transaction(lambda data: ops)

    def transaction(self, plan):
        """Run plan(data) under the state lock; it checks and returns the ops to apply.

        plan may raise a Fault, and then nothing changes.  Returns plan's ops once
        they are durable."""
        with self.cond:
            ops, seq = self._apply(plan)
            if seq:
                self._wait_durable(seq)
            return ops

    def apply(self, plan):
        """transaction() without waiting for the disk: the change is applied (readers see
        it) and queued; returns the number to give wait_durable() before acknowledging
        it (0 when plan made no change).  Lets a caller release its own locks first."""
        with self.cond:
            return self._apply(plan)[1]

    def wait_durable(self, seq):
        with self.cond:
            self._wait_durable(seq)

    def _apply(self, plan):
        ops = plan(self.data)
        if not ops:
            return ops, 0
        line = json.dumps({"ops": ops}, separators=(",", ":")) + "\n"
        undo = []
        for op in ops:
            undo.append(inverse_op(self.data, op))
            for watcher in self.watchers:
                watcher(op, self.data)
            apply_op(self.data, op)
            for after in self.after:
                after(op)
        undo.reverse()
        self.seq += 1
        self.pending.append((self.seq, line, undo))
        return ops, self.seq

    def _undo(self, entries):
        """Take back changes whose journal write failed, newest first."""
        for seq, _, undo in reversed(entries):
            for op in undo:
                for watcher in self.watchers:
                    watcher(op, self.data)
                apply_op(self.data, op)
                for after in self.after:
                    after(op)
            self.failed.add(seq)

    def reading(self):
        """Context manager: a consistent view of data while it is held (no disk waits)."""
        return self.cond

    def _wait_durable(self, mine):
        """Group commit: the first waiter writes everyone's lines, the rest wait."""
        while True:
            if mine in self.failed:
                self.failed.discard(mine)
                raise Unavailable(f"minivan cannot write its state ({self.broken}); the "
                                  f"change was not made", headers={"Retry-After": "5"})
            if self.durable >= mine:
                return
            if self.flushing:
                self.cond.wait()
                continue
            self.flushing = True
            batch, upto = self.pending, self.seq
            self.pending = []
            self.cond.release()
            error = None
            good = self.cut_to
            try:
                if self.cut_to is not None:    # a torn write still to be cut off first
                    os.ftruncate(self.journal, self.cut_to)
                    self.cut_to = None
                good = os.fstat(self.journal).st_size
                self._write(b"".join(line.encode("utf-8") for _, line, _ in batch))
            except OSError as e:
                error = e
                try:                           # no torn line stays behind the good ones
                    if good is not None:
                        os.ftruncate(self.journal, good)
                except OSError:
                    self.cut_to = good         # cut before the next write, or 503 again
            finally:
                self.cond.acquire()
            self.flushing = False
            if error:
                # everything not on disk is taken back: the failed batch and what came
                # after it (applied on top of it); each waiter gets 503, nothing is lost
                # that was acknowledged, and the next change tries the disk again
                later, self.pending = self.pending, []
                self._undo(batch + later)
                if not self.broken:
                    LOG.error("writing the journal failed: %s; changes get 503 until it "
                              "works again", error)
                self.broken = str(error)
            else:
                self.durable = upto
                if self.broken:
                    LOG.info("the journal is writable again")
                    self.broken = None
            self.cond.notify_all()
            if not error and not self.pending and not self.snapshotting and \
                    self._journal_size() > self.journal_max_bytes and \
                    time.monotonic() >= self.next_snapshot:
                self._snapshot_in_background()

    def _write(self, payload):
        write_fully(self.journal, payload)

    def _journal_size(self):
        try:
            return os.fstat(self.journal).st_size
        except OSError:
            return 0

    # -- snapshots ---------------------------------------------------------
    def snapshot(self):
        """Fold the journal into state.json now (what is pending is written first, and a
        background snapshot is let finish)."""
        with self.cond:
            while self.flushing or self.pending or self.snapshotting:
                if self.pending:
                    self._wait_durable(self.seq)
                else:
                    self.cond.wait()
            return self._snapshot_locked()

    def _snapshot_locked(self):
        """Write state.json atomically, then start an empty journal.  Caller holds cond,
        and nothing is pending.  Where it cannot be written, the journal stays (it holds
        everything) and False is returned."""
        tmp = self.path + ".tmp"
        try:
            write_state_file(tmp, self.data)
            os.replace(tmp, self.path)
            fsync_directory(self.dir)
            if self.journal is not None:
                os.ftruncate(self.journal, 0)
                os.fsync(self.journal)
                self.cut_to = None
            else:
                with open(self.journal_path, "w"):
                    pass
            for _, path in self._set_aside():
                os.unlink(path)
            fsync_directory(self.dir)
        except OSError as e:
            LOG.error("writing %s failed: %s; the journal keeps the changes", self.path, e)
            remove_quietly(tmp)
            return False
        return True

    def _snapshot_in_background(self):
        """Set the journal aside, start a new one, and fork a child that writes the state
        as it is now.  Caller holds cond; nothing is pending or being written."""
        aside = self._set_aside()
        number = aside[-1][0] + 1 if aside else 1
        aside_path = f"{self.journal_path}.{number}"
        try:
            os.rename(self.journal_path, aside_path)
        except OSError as e:
            LOG.error("setting the journal aside for a snapshot failed: %s", e)
            return
        journal = None
        try:                                # from here on, start-up replays aside_path
            journal = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                              0o600)
            fsync_directory(self.dir)       # both names, before a change is acknowledged
        except OSError as e:                # go on appending to it; the next one retries
            LOG.error("starting a new journal failed: %s", e)
            try:
                if journal is not None:
                    os.close(journal)
                    os.unlink(self.journal_path)
                os.rename(aside_path, self.journal_path)
            except OSError:
                pass                        # start-up replays aside_path in any case
            return
        os.close(self.journal)
        self.journal = journal
        tmp = f"{self.path}.tmp.{number}"
        try:
            with warnings.catch_warnings():     # the child takes no lock another thread holds
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except OSError as e:                    # then the snapshot is written here and now
            LOG.warning("cannot fork a snapshot writer (%s); writing it while changes wait",
                        e)
            self._snapshot_locked()
            return
        if pid == 0:                        # the child: write, and nothing else
            code = 1
            try:
                os.close(self.lock_fd)
                os.nice(19)                 # requests come first on a busy host
                write_state_file(tmp, self.data)
                code = 0
            finally:
                os._exit(code)
        self.snapshotting = pid
        threading.Thread(target=self._finish_snapshot, args=(pid, tmp, number),
                         name="snapshot", daemon=True).start()

    def _finish_snapshot(self, pid, tmp, number):
        """Once the child is done: its file becomes state.json and the journals set
        aside up to number go; if it failed, they stay (start-up replays them)."""
        started = time.monotonic()
        try:
            _, status = os.waitpid(pid, 0)
            if status != 0:
                raise OSError(f"the snapshot writer ended with status {status}")
            os.replace(tmp, self.path)
            fsync_directory(self.dir)
            for n, path in self._set_aside():
                if n <= number:
                    os.unlink(path)
            fsync_directory(self.dir)
            LOG.info("snapshot: %s written in the background in %.2fs (%d bytes)", self.path,
                     time.monotonic() - started, os.path.getsize(self.path))
        except OSError as e:
            LOG.error("a background snapshot failed: %s; the journals keep the changes", e)
            remove_quietly(tmp)
        finally:
            with self.cond:
                self.snapshotting = None
                # the journal may grow past its limit meanwhile: a fork costs every
                # request after it some copy-on-write faults, and the writer a core
                self.next_snapshot = time.monotonic() + max(
                    SNAPSHOT_SPACING, 4 * (time.monotonic() - started))
                self.cond.notify_all()

    def close(self):
        """Fold the journal into a snapshot and release the lock."""
        if self.data is not None:
            try:
                self.snapshot()
            except Unavailable as e:
                LOG.error("%s: the journal keeps what was acknowledged", e)
        for fd in (self.journal, self.lock_fd):
            if fd is not None:
                os.close(fd)
        self.journal = self.lock_fd = None


def write_state_file(path, data):
    """state.json's content, written and fsynced to path."""
    parts = ['{"schema_version": %d,\n"saved_at": %s,\n"data": {' % (
        SCHEMA_VERSION, json.dumps(isotime_us(Clock().now())))]
    for i, (key, value) in enumerate(sorted(data.items())):
        parts.append(("\n" if i == 0 else ",\n") + json.dumps(key) + ": ")
        if isinstance(value, dict) and value:       # a collection: a line per record
            parts.append("{" + ",".join("\n" + json.dumps(k) + ": " + (
                v.decode("utf-8") if isinstance(v, Packed) else json.dumps(v, sort_keys=True))
                for k, v in sorted(value.items())) + "}")
        else:
            parts.append(json.dumps(value, sort_keys=True))
    parts.append("}}\n")
    payload = "".join(parts).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_fully(fd, payload)
    finally:
        os.close(fd)


def write_fully(fd, payload):
    """All of payload to fd (os.write may take part of it), then fsync."""
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]
    os.fsync(fd)


def inverse_op(root, op):
    """The op that takes op back, read from root before op is applied."""
    path = op[1]
    if len(path) > 2 and path[0] in PACKED:      # inside a Packed record: all of it
        path = path[:2]
    node = root
    for i, key in enumerate(path[:-1]):
        if not isinstance(node, dict) or key not in node:
            return ["del", path[:i + 1]]
        node = node[key]
    if isinstance(node, dict) and path[-1] in node:
        return ["set", path, node[path[-1]]]
    return ["del", path]


def apply_op(root, op):
    kind, path = op[0], op[1]
    if len(path) >= 2 and path[0] in PACKED:
        records = root.setdefault(path[0], {})
        if len(path) > 2:                        # inside a record: unpack, change, pack
            record = unpack(records.get(path[1], {}))
            apply_op(record, [kind, path[2:]] + list(op[2:]))
            records[path[1]] = pack(record)
        elif kind == "set":
            records[path[1]] = pack(op[2])
        elif kind == "del":
            records.pop(path[1], None)
        else:
            raise ValueError(f"unknown operation {kind!r}")
        return
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


# § 5 microversions --------------------------------------------------------------------

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
    version = parse_version(text)
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


# § 6 request validation ---------------------------------------------------------------
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
        raise InvalidName()
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
    if len(value) < schema.get("minProperties", 0):
        raise SchemaError(path, value, f"{_repr(value)} does not have enough properties")
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


class InvalidName(Exception):
    """A 'name' with control characters or surrounding whitespace."""


def validate_body(req, schema):
    """Check req.body against schema; 400 with Nova's message on the first problem."""
    try:
        check_schema(schema, req.body, (), lenient=req.legacy)
    except InvalidName:
        raise BadRequest("An invalid 'name' value was provided. The name must be: printable "
                         "characters. Can not start or end with whitespace.") from None
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


# § 7 identity and policy --------------------------------------------------------------

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
        self.cache = collections.OrderedDict()   # sha256(token) -> (Identity, trusted until)
        self.cache_size = conf["token_cache_size"]
        self.cache_time = datetime.timedelta(seconds=max(0, conf.get("token_cache_time", 300)))
        self.known_projects = {}                  # project id -> when Keystone confirmed it
        self.lock = threading.Lock()             # the caches
        self.service_lock = threading.Lock()     # minivan's own token, while it is fetched
        self.service_token = None
        self.service_expires = None
        self.service_project_id = None
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
        except (OSError, ValueError, http.client.HTTPException) as e:
            LOG.error("Keystone at %s is unreachable: %s", self.url, e)
            raise Unavailable("The identity service is unreachable.") from None

    def _get_service_token(self, force=False):
        with self.service_lock:       # not the caches' lock: cached tokens wait for nothing
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
            self.service_project_id = (doc["token"].get("project") or {}).get("id")
            return self.service_token

    def service_token_value(self, force=False):
        return self._get_service_token(force=force)

    def find_endpoint(self, service_type, interface="public", region=""):
        """URL of a service in the Keystone catalog (None when the catalog has none)."""
        status, doc = self._service_call("GET", "/auth/catalog")
        if status != 200 or not isinstance(doc, dict):
            raise Unavailable("minivan cannot read the service catalog.")
        for service in doc.get("catalog", []):
            if service.get("type") != service_type:
                continue
            for endpoint in service.get("endpoints", []):
                if endpoint.get("interface") == interface and (
                        not region or endpoint.get("region_id") == region):
                    return endpoint["url"]
        return None

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
            ident, until = self.cache.get(key, (None, None))
            if ident is not None:
                if ident.expires and ident.expires > now and until > now:
                    self.cache.move_to_end(key)
                    return ident
                del self.cache[key]
        ident = self._validate(token)
        with self.lock:
            self.cache[key] = (ident, now + self.cache_time)
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
        project = info.get("project") or {}     # none: unscoped, as Nova takes it too
        expires = parse_keystone_time(info.get("expires_at"))
        if expires and expires <= self.clock.now():
            raise Unauthorized()
        roles = [r.get("name", "").lower() for r in info.get("roles", [])]
        user = info.get("user") or {}
        return Identity(user.get("id"), project.get("id"), roles, user.get("name"),
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


# § 8 guest shape ----------------------------------------------------------------------
#
# What a server's flavor extra specs and image properties make of its guest, read the way
# Nova's libvirt driver reads them (nova/virt/libvirt/driver.py, _get_guest_config): the
# buses and models of its devices, its firmware, its CPU model and topology, and the
# limits on its CPU time, disks and NICs.  As in Nova it happens in three stages:
#   image_meta / check_guest_request   the API: a property that does not fit Nova's field
#                                      for it, or a flavor and an image that contradict
#                                      each other, is refused with 400;
#   GuestShape(...)                    the build on a host: what the host cannot give (UEFI
#                                      firmware, a machine type, CPU time controls) fails
#                                      the build with the reason, and so does every spec
#                                      minivan does not honour (UNHONOURED_SPECS): nothing
#                                      is accepted and then silently left out;
#   GuestShape's *_xml methods         the domain's elements.

class GuestRefused(Exception):
    """The host cannot (or minivan does not) build this flavor and image's guest: the
    build fails and the server's fault says why."""


# Nova's image metadata fields (nova/objects/image_meta.py ImageMetaProps) that are
# enumerations, integers or flexible booleans; properties not named here are strings
DISK_BUSES = ("fdc", "ide", "sata", "scsi", "usb", "virtio", "xen", "lxc", "uml")
ARCHITECTURES = ("alpha", "armv6", "armv7l", "armv7b", "aarch64", "cris", "i686", "ia64",
                 "lm32", "m68k", "microblaze", "microblazeel", "mips", "mipsel", "mips64",
                 "mips64el", "openrisc", "parisc", "parisc64", "ppc", "ppcle", "ppc64",
                 "ppc64le", "ppcemb", "s390", "s390x", "sh4", "sh4eb", "sparc", "sparc64",
                 "unicore32", "x86_64", "xtensa", "xtensaeb")
VIF_MODELS = ("virtio", "ne2k_pci", "pcnet", "rtl8139", "e1000", "e1000e", "netfront",
              "spapr-vlan", "lan9118", "sriov", "vmxnet", "vmxnet3", "igb")
IMAGE_ENUMS = {
    "hw_architecture": ARCHITECTURES, "hw_emulation_architecture": ARCHITECTURES,
    "hw_cdrom_bus": DISK_BUSES, "hw_disk_bus": DISK_BUSES, "hw_floppy_bus": DISK_BUSES,
    "hw_rescue_bus": DISK_BUSES,
    "hw_cpu_policy": ("dedicated", "shared", "mixed"),
    "hw_cpu_thread_policy": ("prefer", "isolate", "require"),
    "hw_ephemeral_encryption_format": ("plain", "luks", "luksv2"),
    "hw_firmware_type": ("uefi", "bios"), "hw_input_bus": ("usb", "virtio"),
    "hw_maxphysaddr_mode": ("passthrough", "emulate"),
    "hw_mem_encryption_model": ("amd-sev", "amd-sev-es", "amd-sev-snp", "intel-tdx"),
    "hw_pci_numa_affinity_policy": ("required", "legacy", "preferred", "socket"),
    "hw_pointer_model": ("usbtablet",), "hw_rescue_device": ("cdrom", "disk", "floppy", "fs",
                                                             "lun"),
    "hw_rng_model": ("virtio",),
    "hw_scsi_model": ("buslogic", "ibmvscsi", "lsilogic", "lsisas1068", "lsisas1078",
                      "virtio-scsi", "vmpvscsi"),
    "hw_sound_model": ("sb16", "es1370", "pcspk", "ac97", "ich6", "ich9", "usb", "virtio"),
    "hw_tpm_model": ("tpm-tis", "tpm-crb"), "hw_tpm_version": ("1.2", "2.0"),
    "hw_usb_model": ("none", "nec-xhci", "qemu-xhci"),
    "hw_video_model": ("cirrus", "qxl", "vga", "vmvga", "xen", "virtio", "gop", "none",
                       "bochs"),
    "hw_vif_model": VIF_MODELS, "hw_viommu_model": ("intel", "smmuv3", "virtio", "auto"),
    "hw_vm_mode": ("hvm", "xen", "uml", "exe"),
    "hw_watchdog_action": ("none", "pause", "poweroff", "reset", "disabled"),
    "img_config_drive": ("optional", "mandatory"),
    "img_hv_type": ("baremetal", "bhyve", "docker", "fake", "hyperv", "ironic", "kqemu", "kvm",
                    "lxc", "lxd", "openvz", "parallels", "phyp", "qemu", "test", "uml", "vbox",
                    "vz", "vmware", "xen", "zvm", "prsm"),
    "img_signature_hash_method": ("SHA-224", "SHA-256", "SHA-384", "SHA-512"),
    "img_signature_key_type": ("DSA", "ECC_SECP384R1", "ECC_SECP521R1", "ECC_SECT409K1",
                               "ECC_SECT409R1", "ECC_SECT571K1", "ECC_SECT571R1", "RSA-PSS"),
    "os_secure_boot": ("required", "disabled", "optional"), "os_type": ("linux", "windows"),
}
IMAGE_INTS = ("hw_cpu_cores", "hw_cpu_max_cores", "hw_cpu_max_sockets", "hw_cpu_max_threads",
              "hw_cpu_sockets", "hw_cpu_threads", "hw_device_id", "hw_maxphysaddr_bits",
              "hw_numa_nodes", "hw_redirected_usb_ports", "hw_serial_port_count",
              "hw_video_ram", "img_compression_level", "img_version")
IMAGE_BOOLS = ("hw_boot_menu", "hw_ephemeral_encryption", "hw_firmware_stateless",
               "hw_ipxe_boot", "hw_locked_memory", "hw_mem_encryption", "hw_pmu",
               "hw_qemu_guest_agent", "hw_time_hpet", "hw_vif_multiqueue_enabled",
               "hw_virtio_packed_ring", "img_bdm_v2", "img_bittorrent", "img_cache_in_nova",
               "img_hide_hypervisor_id", "img_linked_clone", "img_use_agent",
               "os_require_quiesce", "os_skip_agent_inject_files_at_boot",
               "os_skip_agent_inject_ssh")
IMAGE_LEGACY_NAMES = {      # older names Nova still reads; the current name wins
    "architecture": "hw_architecture", "vm_mode": "hw_vm_mode",
    "hypervisor_type": "img_hv_type", "auto_disk_config": "hw_auto_disk_config",
    "ipxe_boot": "hw_ipxe_boot", "cache_in_nova": "img_cache_in_nova",
    "bittorrent": "img_bittorrent", "root_device_name": "img_root_device_name",
    "bdm_v2": "img_bdm_v2", "owner_id": "img_owner_id", "vmware_ostype": "os_distro",
    "vmware_disktype": "hw_disk_type", "vmware_image_version": "img_version",
    "xenapi_device_id": "hw_device_id", "xenapi_image_compression_level":
    "img_compression_level", "vmware_linked_clone": "img_linked_clone",
    "xenapi_use_agent": "img_use_agent",
    "xenapi_skip_agent_inject_ssh": "os_skip_agent_inject_ssh",
    "xenapi_skip_agent_inject_files_at_boot": "os_skip_agent_inject_files_at_boot",
}
VIF_MODEL_ALIASES = {"virtuale1000": "e1000", "virtuale1000e": "e1000e",
                     "virtualpcnet32": "pcnet", "virtualsriovethernetcard": "sriov",
                     "virtualvmxnet": "vmxnet", "virtualvmxnet3": "vmxnet3"}


def canonical_enum(key, value):
    """An enumerated image property as Nova's field coerces it; ValueError (with the
    field's message) when it is not one of the field's values."""
    text = str(value)
    if key in ("hw_architecture", "hw_emulation_architecture"):
        text = text.lower()
        text = {"i386": "i686", "i486": "i686", "i586": "i686", "x86_32": "i686",
                "x86_32p": "i686", "amd64": "x86_64"}.get(text, text)
        if text not in ARCHITECTURES:
            raise ValueError(f"Architecture name '{value}' is not valid")
    elif key == "hw_vm_mode":
        text = {"pv": "xen", "hv": "hvm", "baremetal": "hvm"}.get(text.lower(), text.lower())
        if text not in IMAGE_ENUMS[key]:
            raise ValueError(f"Virtual machine mode '{value}' is not valid")
    elif key == "img_hv_type":
        text = "xen" if text.lower() == "xapi" else text.lower()
        if text not in IMAGE_ENUMS[key]:
            raise ValueError(f"Hypervisor virt type '{value}' is not valid")
    elif key == "hw_scsi_model":
        text = {"lsilogicsas": "lsisas1068", "paravirtual": "vmpvscsi"}.get(text.lower(),
                                                                           text.lower())
    elif key == "hw_vif_model":
        text = VIF_MODEL_ALIASES.get(text.lower(), text.lower())
    elif key == "os_type":
        text = text.lower()
    if text not in IMAGE_ENUMS[key]:
        raise ValueError(f"Field value {value} is invalid")
    return text


def image_meta(props):
    """An image's properties as Nova's image metadata object holds them: legacy names
    mapped, enumerations canonical, integers and booleans typed.  BadRequest with Nova's
    message for a value that does not fit its field."""
    props = props or {}
    meta = {IMAGE_LEGACY_NAMES[k]: v for k, v in props.items() if k in IMAGE_LEGACY_NAMES}
    if props.get("vmware_adaptertype"):
        scsi = props["vmware_adaptertype"] != "ide"
        meta.update(hw_disk_bus="scsi" if scsi else "ide",
                    **({"hw_scsi_model": props["vmware_adaptertype"]} if scsi else {}))
    meta.update((k, v) for k, v in props.items() if k not in IMAGE_LEGACY_NAMES)
    try:
        for key, value in list(meta.items()):
            if key in IMAGE_ENUMS:
                meta[key] = canonical_enum(key, value)
            elif key in IMAGE_INTS or re.fullmatch(r"hw_numa_mem\.\d+", key):
                meta[key] = int(value)
            elif key in IMAGE_BOOLS:
                meta[key] = bool_from_string(value)
    except (ValueError, TypeError) as e:      # (a property that is a list or an object)
        raise BadRequest(f"Invalid image metadata. Error: {e}") from None
    return meta


def flavor_int(specs, key, default=0):
    """An integer extra spec that Nova reads with int()."""
    try:
        return int(specs.get(key, default))
    except ValueError as e:
        raise BadRequest(f"Invalid flavor extra spec. Error: {e}") from None


def cpu_topology_limits(specs, meta):
    """(preferred, maximum) (sockets, cores, threads) from the flavor and the image, as
    nova.virt.hardware.get_cpu_topology_constraints: the image may only lower what the
    flavor allows, and its preferences replace the flavor's."""
    names = ("sockets", "cores", "threads")
    flavor_max = [flavor_int(specs, f"hw:cpu_max_{n}") for n in names]
    image_max = [meta.get(f"hw_cpu_max_{n}", 0) for n in names]
    if any(f and i > f for f, i in zip(flavor_max, image_max)):
        raise BadRequest("Image vCPU topology limits (sockets=%d, cores=%d, threads=%d) "
                         "exceeds the limits of the flavor (sockets=%d, cores=%d, "
                         "threads=%d)" % (*image_max, *flavor_max))
    maximum = [i or f or 65536 for f, i in zip(flavor_max, image_max)]
    flavor_pref = [flavor_int(specs, f"hw:cpu_{n}") for n in names]
    image_pref = [meta.get(f"hw_cpu_{n}", 0) for n in names]
    if any(p > m for p, m in zip(flavor_pref, maximum)):
        flavor_pref = [0, 0, 0]
    if any(p > m for p, m in zip(image_pref, maximum)):
        raise BadRequest("Image vCPU topology (sockets=%d, cores=%d, threads=%d) exceeds "
                         "the limits of the flavor or image (sockets=%d, cores=%d, "
                         "threads=%d)" % (*image_pref, *maximum))
    return (image_pref if any(image_pref) else flavor_pref), maximum


def best_cpu_topology(vcpus, preferred, maximum):
    """Nova's choice among every sockets × cores × threads = vcpus within the maxima:
    fewest threads, then most sockets, then the one that matches most preferences."""
    limits = [min(vcpus, m) for m in maximum]
    possible = [(s, c, t) for s in range(1, limits[0] + 1) for c in range(1, limits[1] + 1)
                for t in range(1, limits[2] + 1) if s * c * t == vcpus]
    if not possible:
        raise GuestRefused("Requested vCPU limits %d:%d:%d are impossible to satisfy for "
                           "vcpus count %d" % (*limits, vcpus))
    possible.sort(key=lambda x: (x[0] * x[1], x[0], x[2]), reverse=True)

    def score(topology):
        return sum(1 for want, got in zip(preferred, topology) if want and want == got)
    return max(possible, key=score)        # max keeps the first of equal scores


def check_guest_request(flavor, image, create=True):
    """What Nova's API checks of a flavor and an image before it takes a server (create,
    or not: rebuild and resize), in its order: BadRequest with its message."""
    props = (image or {}).get("properties") or {}
    if not create and props.get("img_config_drive", "optional") not in ("optional",
                                                                          "mandatory"):
        raise BadRequest(f"Image's config drive option '{props['img_config_drive']}' is "
                         "invalid")
    meta = image_meta(props)
    specs = flavor.get("extra_specs") or {}
    if create:          # (Nova reads the NUMA request first when it builds the instance)
        numa_request(flavor, meta)
    keys = ["virtio_packed_ring", "pmu"] + ["vif_multiqueue_enabled"] * (flavor["vcpus"] > 1)
    for key in keys:
        if f"hw:{key}" in specs and f"hw_{key}" in meta and \
                bool_from_string(specs[f"hw:{key}"]) != meta[f"hw_{key}"]:
            raise BadRequest(
                f"Flavor {flavor['name']} has hw:{key} extra spec explicitly set to "
                f"{bool_from_string(specs[f'hw:{key}'])}, conflicting with image "
                f"{(image or {}).get('name')} which has hw_{key} explicitly set to "
                f"{meta[f'hw_{key}']}.")
        if key == "pmu" and "hw:serial_port_count" in specs:
            try:
                ports = int(specs["hw:serial_port_count"])
            except ValueError:
                raise BadRequest("Number of serial ports specified in flavor is invalid: "
                                 f"expected an integer, got "
                                 f"'{specs['hw:serial_port_count']}'") from None
            if meta.get("hw_serial_port_count", 0) > ports:
                raise BadRequest("Forbidden to exceed flavor value of number of serial "
                                 "ports passed in image meta.")
        if key == "pmu":
            realtime_request(flavor, meta)
            cpu_topology_limits(specs, meta)
    numa_request(flavor, meta)
    return meta


# Guest NUMA and CPU pinning requests, read as nova.virt.hardware.numa_get_constraints
# reads them: a guest has a NUMA topology when it asks for nodes, a page size, or dedicated
# (or mixed) CPUs; its cells split the vCPUs and memory evenly, or as hw:numa_cpus.N and
# hw:numa_mem.N say.  Every contradiction is Nova's 400.

def parse_cpu_spec(spec):
    """A CPU set such as '0-3,^2,6' (Nova's parse_cpu_spec); BadRequest when malformed."""
    wanted, rejected = set(), set()
    for rule in str(spec).split(","):
        rule = rule.strip()
        if not rule:
            continue
        parts = rule.split("-", 1)
        if len(parts) > 1:
            reject = parts[0][:1] == "^"
            try:
                start, end = int(parts[0].lstrip("^").strip()), int(parts[1].strip())
            except ValueError:
                raise BadRequest(f"Invalid range expression {rule!r}") from None
            if start > end:
                raise BadRequest(f"Invalid range expression {rule!r}")
            (rejected if reject else wanted).update(range(start, end + 1))
        elif rule[0] == "^":
            try:
                rejected.add(int(rule[1:].strip()))
            except ValueError:
                raise BadRequest(f"Invalid exclusion expression {rule!r}") from None
        else:
            try:
                wanted.add(int(rule))
            except ValueError:
                raise BadRequest(f"Invalid inclusion expression {rule!r}") from None
    return wanted - rejected


def vcpu_mask(spec, vcpus):
    """A vCPU mask: '^0-1' leaves those out of all the flavor's vCPUs, else a set."""
    if str(spec).strip().startswith("^"):
        return parse_cpu_spec(f"0-{vcpus - 1},{spec}")
    return parse_cpu_spec(spec)


CPU_POLICIES = ("dedicated", "shared", "mixed")
THREAD_POLICIES = ("prefer", "isolate", "require")


def policy_pair(specs, meta, key, what, allowed):
    """(flavor's, image's) hw:KEY / hw_KEY, each one of allowed (Nova's 400 if not)."""
    flavor, image = specs.get(f"hw:{key}"), meta.get(f"hw_{key}")
    for source, value in (("flavor extra specs", flavor), ("image properties", image)):
        if value and value not in allowed:
            raise BadRequest(f"{what} requested from '{source}' is invalid, given: "
                             f"'{value}', available: '{str(allowed)}'.")
    return flavor, image


def cpu_policy_request(specs, meta):
    """hw:cpu_policy / hw_cpu_policy: the flavor's wins, the image may not raise it."""
    flavor, image = policy_pair(specs, meta, "cpu_policy", "CPU policy", CPU_POLICIES)
    forbidden = "Image property 'hw_cpu_policy' is not permitted to override CPU " \
        "pinning policy set against the flavor"
    if flavor == "mixed" and image == "dedicated" or \
            flavor == "shared" and image in ("mixed", "dedicated"):
        raise BadRequest(forbidden)
    return flavor or image or None


def thread_policy_request(specs, meta):
    flavor, image = policy_pair(specs, meta, "cpu_thread_policy", "CPU thread policy",
                                THREAD_POLICIES)
    if flavor in (None, "prefer"):
        return flavor or image
    if image and image != flavor:
        raise BadRequest("Image property 'hw_cpu_thread_policy' is not permitted to "
                         "override CPU thread pinning policy set against the flavor")
    return flavor


def emulator_policy_request(specs):
    policy = specs.get("hw:emulator_threads_policy")
    if policy and policy not in ("share", "isolate"):
        raise BadRequest(f"CPU emulator threads option requested is invalid, given: "
                         f"'{policy}', available: '{str(('share', 'isolate'))}'.")
    return policy or None


def realtime_request(flavor, meta):
    """The realtime vCPUs (hw:cpu_realtime with hw:cpu_realtime_mask), or None."""
    specs, vcpus = flavor.get("extra_specs") or {}, flavor["vcpus"]
    if not bool_from_string(specs.get("hw:cpu_realtime", False)):
        return None
    mask = meta.get("hw_cpu_realtime_mask") or specs.get("hw:cpu_realtime_mask")
    rt = vcpu_mask(mask, vcpus) if mask else set(range(vcpus))
    invalid = "Use of realtime CPUs requires either one or more non-realtime CPU(s) or " \
        "offloaded emulator threads."
    if not rt or rt == set(range(vcpus)) and not emulator_policy_request(specs):
        raise BadRequest(invalid)
    if not rt <= set(range(vcpus)):
        raise BadRequest("Realtime policy vCPU(s) mask is configured with RT vCPUs that "
                         "are not a subset of the vCPUs in the flavor. See "
                         "hw:cpu_realtime_mask or hw_cpu_realtime_mask")
    return rt


def dedicated_mask_request(flavor):
    mask = (flavor.get("extra_specs") or {}).get("hw:cpu_dedicated_mask")
    if not mask:
        return None
    vcpus = flavor["vcpus"]
    pinned = vcpu_mask(mask, vcpus)
    if not pinned or not set(range(vcpus)) - pinned:
        raise BadRequest("Mixed instance must have at least 1 pinned vCPU and 1 unpinned "
                         "vCPU. See 'hw:cpu_dedicated_mask'.")
    if not pinned <= set(range(vcpus)):
        raise BadRequest("Mixed instance dedicated vCPU(s) mask is not a subset of vCPUs "
                         "in the flavor. See \"hw:cpu_dedicated_mask\"")
    return pinned


def page_size_request(specs, meta):
    """hw:mem_page_size (the image's hw_mem_page_size only where the flavor says large or
    any): 'small' -1, 'large' -2, 'any' -3, or a size in KiB."""
    def size(request):
        named = {"any": MEMPAGES_ANY, "large": MEMPAGES_LARGE, "small": MEMPAGES_SMALL}
        if request in named:
            return named[request]
        if request.isdigit():
            return int(request)
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)(B?)\s*", request)
        if not found or (found.group(3) and not found.group(2)):
            raise BadRequest(f"Invalid memory page size '{request}'")
        return int(float(found.group(1)) * 1024 ** "KMGT".find(found.group(2) or "K"))
    flavor, image = specs.get("hw:mem_page_size"), meta.get("hw_mem_page_size")
    if not flavor and image:
        raise BadRequest(f"Page size {image} forbidden against '<empty>'")
    if not flavor:
        return None
    pagesize = size(flavor)
    if image and pagesize in (MEMPAGES_ANY, MEMPAGES_LARGE):
        return size(image)
    if image:
        raise BadRequest(f"Page size {image} forbidden against '{flavor}'")
    return pagesize


MEMPAGES_SMALL, MEMPAGES_LARGE, MEMPAGES_ANY = -1, -2, -3


def int_like(value):
    """oslo's is_int_like: an int, or a string that int() reads back unchanged."""
    try:
        return str(int(value)) == str(value)
    except (TypeError, ValueError):
        return False


def numa_cells_request(specs, meta, key):
    """hw:numa_cpus.N / hw:numa_mem.N of the flavor, else the image's (not both)."""
    parse = parse_cpu_spec if key == "cpus" else int
    flavor = []
    while f"hw:numa_{key}.{len(flavor)}" in specs:
        flavor.append(parse(specs[f"hw:numa_{key}.{len(flavor)}"]))
    image = []
    while f"hw_numa_{key}.{len(image)}" in meta:
        image.append(parse(meta[f"hw_numa_{key}.{len(image)}"]))
    if flavor and image:
        raise BadRequest(f"Image property 'hw_numa_{key}' is not permitted to override "
                         "NUMA configuration set against the flavor")
    return flavor or image or None


def numa_request(flavor, meta):
    """The guest's NUMA topology as numa_get_constraints makes it: None, or
    {"policy", "thread_policy", "emulator", "pagesize", "realtime", "cells": [{"cpus",
    "pcpus", "memory"}]} (cpus float, pcpus are pinned).  BadRequest with Nova's message."""
    specs, vcpus = flavor.get("extra_specs") or {}, flavor["vcpus"]
    policy = cpu_policy_request(specs, meta)
    thread_policy = thread_policy_request(specs, meta)
    realtime = realtime_request(flavor, meta)
    pinned = dedicated_mask_request(flavor)
    emulator = emulator_policy_request(specs)
    if policy in ("shared", None):
        if thread_policy:
            raise BadRequest("Cannot set cpu thread pinning policy in a non dedicated cpu "
                             "pinning policy")
        if emulator == "isolate":
            raise BadRequest("An isolated CPU emulator threads option requires a dedicated "
                             "CPU policy option.")
        if pinned:
            raise BadRequest("Cannot specify 'hw:cpu_dedicated_mask' without the 'mixed' "
                             "policy.")
        if realtime:
            raise BadRequest("Cannot set realtime policy in a non dedicated cpu pinning "
                             "policy")
    elif policy == "dedicated":
        if pinned:
            raise BadRequest("Cannot specify 'hw:cpu_dedicated_mask' without the 'mixed' "
                             "policy.")
    elif bool(realtime) == bool(pinned):
        raise BadRequest("Dedicated CPU set can be specified from either "
                         "'hw:cpu_dedicated_mask' or 'hw:cpu_realtime_mask' when using "
                         "'mixed' CPU policy. 'hw:cpu_dedicated_mask' and "
                         "'hw:cpu_realtime_mask' can not be specified at the same time, or "
                         "be specified with none of them.")
    else:
        pinned = pinned or realtime
    flavor_nodes, image_nodes = specs.get("hw:numa_nodes"), meta.get("hw_numa_nodes")
    if flavor_nodes and image_nodes:
        raise BadRequest("Image property 'hw_numa_nodes' is not permitted to override NUMA "
                         "configuration set against the flavor")
    nodes = flavor_nodes or image_nodes
    if nodes is not None and (not int_like(nodes) or int(nodes) < 1):
        raise BadRequest(f"The property 'numa_nodes' cannot be '{nodes}'. It must be a "
                         "number greater than 0")
    pagesize = page_size_request(specs, meta)
    locked_request(specs, meta)
    if not (nodes or pagesize or specs.get("hw:pmem") or policy in ("dedicated", "mixed")):
        return None
    pinned = set(range(vcpus)) if policy == "dedicated" else (pinned or set())
    return {"policy": policy, "thread_policy": thread_policy, "emulator": emulator,
            "pagesize": pagesize, "realtime": realtime,
            "cells": numa_cells(flavor, meta, int(nodes or 1), pinned)}


def locked_request(specs, meta):
    """hw:locked_memory / hw_locked_memory: only with a page size, never contradicting."""
    flavor, image = specs.get("hw:locked_memory"), meta.get("hw_locked_memory")
    if flavor is not None:
        flavor = bool_from_string(flavor)
        if image is not None and image != flavor:
            raise BadRequest(f"locked_memory value in image ({image}) and flavor ({flavor}) "
                             "conflict. A consistent value is expected if both specified.")
    locked = flavor if flavor is not None else image
    if locked and not (specs.get("hw:mem_page_size") or meta.get("hw_mem_page_size")):
        raise BadRequest("locked_memory value in image or flavor is forbidden when "
                         "mem_page_size is not set.")
    return bool(locked)


def numa_cells(flavor, meta, nodes, pinned):
    """The guest's cells: even shares, or the explicit hw:numa_cpus.N / hw:numa_mem.N."""
    specs, vcpus, memory = flavor.get("extra_specs") or {}, flavor["vcpus"], flavor["ram"]
    cpu_list = numa_cells_request(specs, meta, "cpus")
    mem_list = numa_cells_request(specs, meta, "mem")
    incomplete = "CPU and memory allocation must be provided for all NUMA nodes"
    if cpu_list is None and mem_list is None:
        if vcpus % nodes or memory % nodes:
            raise BadRequest("Instance CPUs and/or memory cannot be evenly distributed "
                             "across instance NUMA nodes. Explicit assignment of CPUs and "
                             "memory to nodes is required")
        per = vcpus // nodes
        cpu_list = [set(range(n * per, (n + 1) * per)) for n in range(nodes)]
        mem_list = [memory // nodes] * nodes
    elif cpu_list is None or mem_list is None or \
            len(cpu_list) != nodes or len(mem_list) != nodes:
        raise BadRequest(incomplete)
    else:
        free = set(range(vcpus))
        for cpus in cpu_list:
            for cpu in sorted(cpus):
                if cpu > vcpus - 1:
                    raise BadRequest(f"CPU number {cpu} is larger than max {vcpus - 1}")
                if cpu not in free:
                    raise BadRequest(f"CPU number {cpu} is assigned to two nodes")
                free.discard(cpu)
        if free:
            raise BadRequest(f"CPU number {free} is not assigned to any node")
        if sum(mem_list) != memory:
            raise BadRequest(f"{sum(mem_list)} MB of memory assigned, but expected "
                             f"{memory} MB")
    return [{"cpus": cpus - pinned, "pcpus": cpus & pinned, "memory": mem}
            for cpus, mem in zip(cpu_list, mem_list)]


UNHONOURED_SPECS = (
    # (flavor extra spec or image property pattern, what it asks for)
    (r"hw:mem_encryption=(?i:1|t|true|on|y|yes)|hw_mem_encryption=True|"
     r"hw:mem_encryption_model|hw_mem_encryption_model", "memory encryption"),
    (r"hw:pmem", "persistent memory"),
    (r"hw:ephemeral_encryption.*|hw_ephemeral_encryption.*", "encrypted local disks"),
    (r"hw:virtio_packed_ring=(?i:1|t|true|on|y|yes)|hw_virtio_packed_ring=True",
     "packed virtqueues"),
    (r"hw:maxphysaddr_.*|hw_maxphysaddr_.*", "a physical address width"),
    (r"hw:viommu_model|hw_viommu_model", "a virtual IOMMU"),
    (r"hw_sound_model", "a sound device"),
    (r"pci_passthrough:alias", "PCI passthrough"),
    (r"accel:device_profile", "accelerators"),
    (r"hw_emulation_architecture=(?!x86_64$).*|hw_vm_mode=(?!hvm$).*",
     "another architecture or virtualization mode"),
)


def unhonoured_requests(specs, meta):
    """[(key, what)] of the flavor's specs and the image's properties minivan does not
    give a guest (and so refuses to build rather than leave out)."""
    found = []
    items = [f"{k}={v}" for k, v in sorted(specs.items())] + \
        [f"{k}={v}" for k, v in sorted(meta.items())]
    for item in items:
        for pattern, what in UNHONOURED_SPECS:
            if re.fullmatch(f"(?:{pattern})(=.*)?", item, re.S) and \
                    not re.fullmatch(r"hw:cpu_policy=shared|hw_cpu_policy=shared", item):
                found.append((item.split("=", 1)[0], what))
                break
    return found


DISK_QOS_KEYS = ("read_bytes_sec", "read_iops_sec", "write_bytes_sec", "write_iops_sec",
                 "total_bytes_sec", "total_iops_sec")
DISK_PREFIXES = {"virtio": "vd", "scsi": "sd", "usb": "sd", "sata": "sd", "ide": "hd",
                 "fdc": "fd"}
VIF_MODELS_FOR = {
    "qemu": ("virtio", "ne2k_pci", "pcnet", "rtl8139", "e1000", "e1000e", "lan9118",
             "spapr-vlan", "vmxnet3", "igb"),
    "kvm": ("virtio", "ne2k_pci", "pcnet", "rtl8139", "e1000", "e1000e", "spapr-vlan",
            "vmxnet3", "igb"),
}
HYPERV_FEATURES = ("<relaxed state='on'/><vapic state='on'/>"
                   "<spinlocks state='on' retries='8191'/>{vendor}<vpindex state='on'/>"
                   "<runtime state='on'/><synic state='on'/><reset state='on'/>"
                   "<frequencies state='on'/><tlbflush state='on'/><ipi state='on'/>")


class GuestHost:
    """What a host offers guests, as the shape needs to know it: its machine types, UEFI
    and Secure Boot firmware, CPU time controls and emulated TPMs.  Read from libvirt
    once."""

    def __init__(self, machines=("pc", "q35"), uefi=False, secure_boot=False,
                 cpu_controller=True, virt_type="qemu", tpm=None):
        self.machines, self.uefi, self.secure_boot = tuple(machines), uefi, secure_boot
        self.cpu_controller, self.virt_type = cpu_controller, virt_type
        self.tpm = tpm       # (versions, models) of emulated TPMs (swtpm), or None


def flavor_bool(specs, key, default=False):
    return bool_from_string(specs[key]) if key in specs else default


class GuestShape:
    """The guest a server's flavor and image ask for, on a host (settings: the daemon's
    options that Nova has as [libvirt] and [DEFAULT] settings).  GuestRefused when the
    host cannot give it."""

    def __init__(self, server, host, machine_types="", cpu_mode="", cpu_models=(),
                 graphics=True):
        flavor = server["flavor"]
        self.server, self.host, self.virt_type = server, host, host.virt_type
        self.vcpus, self.ram = flavor["vcpus"], flavor["ram"]
        self.specs = dict(flavor.get("extra_specs") or {})
        try:
            self._shape(machine_types, cpu_mode, cpu_models, graphics)
        except BadRequest as e:     # extra specs stored before 2.86 checked them, ...
            raise GuestRefused(e.message) from None
        except (ValueError, TypeError) as e:
            raise GuestRefused(f"Invalid flavor extra spec. Error: {e}") from None

    def _shape(self, machine_types, cpu_mode, cpu_models, graphics):
        specs, host = self.specs, self.host
        self.meta = meta = image_meta(self.server.get("image_properties"))
        preferred, maximum = cpu_topology_limits(specs, meta)
        refused = unhonoured_requests(specs, meta)
        if refused:
            raise GuestRefused("minivan does not give guests " + "; ".join(
                f"{what} ({key})" for key, what in refused))
        self.machine = meta.get("hw_machine_type") or \
            machine_type_for(machine_types, "x86_64") or "pc"
        if host.machines and self.machine not in host.machines:
            raise GuestRefused(f"'{self.machine}' is not valid/supported machine type, "
                               f"Supported machine types are: {sorted(host.machines)}")
        self.disk_bus = self._bus(meta.get("hw_disk_bus") or "virtio")
        self.cdrom_bus = self._bus(meta.get("hw_cdrom_bus")
                                   or ("sata" if "q35" in self.machine else "ide"))
        self.topology = best_cpu_topology(self.vcpus, preferred, maximum)
        self.cpu_mode = cpu_mode or "host-model"
        self.cpu_models = list(cpu_models)
        self._devices(specs, meta, graphics)
        self._firmware(specs, meta)
        self._tpm(specs, meta)
        self._tuning(specs)

    def _bus(self, bus):
        if bus not in DISK_PREFIXES:
            raise GuestRefused(f"Requested hardware '{bus}' is not supported by the "
                               f"'{self.virt_type}' virt driver")
        return bus

    def _devices(self, specs, meta, graphics):
        self.vif_model = meta.get("hw_vif_model") or "virtio"
        if self.vif_model not in VIF_MODELS_FOR.get(self.virt_type, ()):
            raise GuestRefused(f"Requested hardware '{self.vif_model}' is not supported by "
                               f"the '{self.virt_type}' virt driver")
        multiqueue = self._flavor_image(specs, meta, "vif_multiqueue_enabled",
                                        convert=bool_from_string) \
            if self.vcpus >= 2 else False
        self.vif_driver = ""
        if self.vif_model == "virtio" and self.virt_type == "qemu":
            self.vif_driver = "<driver name='qemu'/>"
        elif self.vif_model == "virtio" and multiqueue:
            self.vif_driver = f"<driver name='vhost' queues='{self.vcpus}'/>"
        self.scsi_model = meta.get("hw_scsi_model")
        self.graphics = graphics
        self.video_model = meta.get("hw_video_model") or "virtio"
        self.video_ram = meta.get("hw_video_ram", 0)
        max_vram = flavor_int(specs, "hw_video:ram_max_mb")
        if graphics and self.video_ram > max_vram:
            raise GuestRefused(f"The requested amount of video memory {self.video_ram} is "
                               f"higher than the maximum allowed by flavor {max_vram}.")
        self.input_bus = meta.get("hw_input_bus")
        self.tablet = bool(graphics and (self.input_bus or
                                         meta.get("hw_pointer_model", "usbtablet")))
        self.usb_model = meta.get("hw_usb_model") or specs.get("hw:usb_model")
        self.guest_agent = meta.get("hw_qemu_guest_agent", False)
        self.rng = flavor_bool(specs, "hw_rng:allowed", True)
        self.rng_rate = (flavor_int(specs, "hw_rng:rate_bytes"),
                         flavor_int(specs, "hw_rng:rate_period"))
        watchdog = meta.get("hw_watchdog_action") or specs.get("hw:watchdog_action") \
            or "disabled"
        if watchdog not in IMAGE_ENUMS["hw_watchdog_action"]:
            raise GuestRefused(f"Provided watchdog action ({watchdog}) is not supported.")
        self.watchdog = None if watchdog == "disabled" else watchdog
        self.boot_menu = meta["hw_boot_menu"] if "hw_boot_menu" in meta else \
            flavor_bool(specs, "hw:boot_menu")
        # Nova's driver compares the property as given: "Windows" is not "windows"
        self.windows = (self.server.get("image_properties") or {}).get("os_type") == "windows"
        self.hpet = meta.get("hw_time_hpet", False)
        self.hide_hypervisor = flavor_bool(specs, "hw:hide_hypervisor_id") or \
            flavor_bool(specs, "hide_hypervisor_id") or meta.get("img_hide_hypervisor_id",
                                                                 False)
        self.pmu = self._flavor_image(specs, meta, "pmu", convert=bool_from_string)

    def _flavor_image(self, specs, meta, key, prefix="hw", convert=None):
        """A setting both may give (PREFIX:KEY in the flavor, read by convert, and
        PREFIX_KEY in the image): a conflict fails the build as Nova's
        FlavorImageConflict; else whichever is set, or None."""
        flavor_value, image_value = specs.get(f"{prefix}:{key}"), meta.get(f"{prefix}_{key}")
        if flavor_value is not None and convert:
            flavor_value = convert(flavor_value)
        if None not in (flavor_value, image_value) and flavor_value != image_value:
            raise GuestRefused(flavor_image_conflict(self.server, f"{prefix}:{key}",
                                                     flavor_value, image_value))
        return image_value if image_value is not None else flavor_value

    def _firmware(self, specs, meta):
        self.uefi = meta.get("hw_firmware_type") == "uefi"
        if self.uefi and not self.host.uefi:
            raise GuestRefused("UEFI is not supported")
        wanted = self._flavor_image(specs, meta, "secure_boot", prefix="os") or "disabled"
        possible = self.host.secure_boot and self.uefi and "q35" in self.machine
        if wanted == "required" and not possible:
            raise GuestRefused("Secure Boot is not supported by host")
        self.secure_boot = wanted in ("required", "optional") and possible
        self.stateless = self.uefi and meta.get("hw_firmware_stateless", False)

    def _tpm(self, specs, meta):
        """An emulated TPM (swtpm) of the version and model asked for: hw:tpm_version /
        hw_tpm_version, hw:tpm_model / hw_tpm_model (tpm-tis unless said)."""
        self.tpm = None
        version = self._flavor_image(specs, meta, "tpm_version")
        if version is None:
            return
        model = self._flavor_image(specs, meta, "tpm_model") or "tpm-tis"
        if version not in ("1.2", "2.0") or model not in ("tpm-tis", "tpm-crb"):
            raise GuestRefused(f"Invalid TPM version {version!r} or model {model!r}.")
        if model == "tpm-crb" and version != "2.0":
            raise GuestRefused("TPM model CRB is only valid with TPM version 2.0.")
        versions, models = self.host.tpm or ((), ())
        if version not in versions or model not in models:
            raise GuestRefused(f"No valid host was found. No host has an emulated TPM "
                               f"{version} ({model}) (--swtpm-enabled and swtpm)")
        self.tpm = (version, model)

    def tpm_xml(self, secret_uuid):
        if not self.tpm:
            return ""
        version, model = self.tpm
        return (f"<tpm model='{model}'><backend type='emulator' version='{version}'>"
                f"<encryption secret='{secret_uuid}'/></backend></tpm>")

    def _tuning(self, specs):
        self.cputune = [(name, int(specs[f"quota:cpu_{name}"]))
                        for name in ("shares", "quota", "period")
                        if f"quota:cpu_{name}" in specs]
        if self.cputune and not self.host.cpu_controller:
            raise GuestRefused("Requested CPU control policy not supported by host")
        self.disk_qos = [(key, specs[f"quota:disk_{key}"]) for key in DISK_QOS_KEYS
                         if f"quota:disk_{key}" in specs]
        self.bandwidth = {direction: [(key, specs[f"quota:vif_{direction}_{key}"])
                                      for key in ("average", "peak", "burst")
                                      if f"quota:vif_{direction}_{key}" in specs]
                          for direction in ("inbound", "outbound")
                          if f"quota:vif_{direction}_average" in specs}

    # -- names ---------------------------------------------------------------------------

    def disk_dev(self, target, bus=None):
        """The guest device name of the disk in slot target (vdX, minivan's own naming of
        a server's disks): the same letter with the bus's prefix (sda on SATA)."""
        return DISK_PREFIXES[bus or self.disk_bus] + target[2:]

    # -- elements ------------------------------------------------------------------------

    def os_xml(self, boot_dev):
        firmware, loader = "", ""
        if self.uefi:
            yes = "yes" if self.secure_boot else "no"
            firmware = (" firmware='efi'", f"<firmware><feature name='secure-boot' "
                                           f"enabled='{yes}'/></firmware>")
            # Nova also writes <loader secure=...>, which libvirt before 9.2 refuses beside
            # firmware autoselection; the firmware feature asks the same of it
            loader = "<loader stateless='yes'/>" if self.stateless else ""
        attr, inner = firmware or ("", "")
        boot = f"<boot dev='{boot_dev}'/>" if boot_dev else ""
        menu = "<bootmenu enable='yes'/>" if self.boot_menu else ""
        return (f"<os{attr}>{inner}<type arch='x86_64' machine='{xml_escape(self.machine)}'>"
                f"hvm</type>{loader}{boot}<smbios mode='sysinfo'/>{menu}</os>")

    def features_xml(self):
        parts = ["<acpi/>", "<apic/>"]
        if self.windows:
            vendor = "<vendor_id state='on' value='1234567890ab'/>" \
                if self.hide_hypervisor else ""
            parts.append("<hyperv>" + HYPERV_FEATURES.format(vendor=vendor) + "</hyperv>")
        parts.append("<vmcoreinfo/>")
        if self.hide_hypervisor:
            parts.append("<kvm><hidden state='on'/></kvm>")
        if self.pmu is not None:
            parts.append(f"<pmu state='{'on' if self.pmu else 'off'}'/>")
        return "<features>" + "".join(parts) + "</features>"

    def clock_xml(self):
        timers = ""
        if self.virt_type == "kvm":
            timers = ("<timer name='pit' tickpolicy='delay'/>"
                      "<timer name='rtc' tickpolicy='catchup'/>"
                      f"<timer name='hpet' present='{'yes' if self.hpet else 'no'}'/>")
            if self.windows:
                timers += "<timer name='hypervclock' present='yes'/>"
        offset = "localtime" if self.windows else "utc"
        return f"<clock offset='{offset}'>{timers}</clock>"

    def cpu_xml(self):
        sockets, cores, threads = self.topology
        topology = f"<topology sockets='{sockets}' cores='{cores}' threads='{threads}'/>"
        if self.cpu_mode == "none":
            return f"<cpu match='exact'>{topology}</cpu>"
        model = f"<model>{xml_escape(self.cpu_models[0])}</model>" \
            if self.cpu_mode == "custom" and self.cpu_models else ""
        return f"<cpu mode='{self.cpu_mode}' match='exact'>{model}{topology}</cpu>"

    def cputune_xml(self, pins=""):
        """<cputune>: CPU time limits, then the pinning elements (GuestNuma's)."""
        if not self.cputune and not pins:
            return ""
        return "<cputune>" + "".join(f"<{name}>{value}</{name}>"
                                     for name, value in self.cputune) + pins + "</cputune>"

    def iotune_xml(self):
        if not self.disk_qos:
            return ""
        return "<iotune>" + "".join(f"<{key}>{xml_escape(str(value))}</{key}>"
                                    for key, value in self.disk_qos) + "</iotune>"

    def interface_extra_xml(self):
        """The model, driver and bandwidth elements of each of the guest's NICs."""
        bandwidth = ""
        if self.bandwidth:
            bandwidth = "<bandwidth>" + "".join(
                f"<{direction} " + " ".join(f"{key}='{xml_escape(str(value))}'"
                                            for key, value in values) + "/>"
                for direction, values in self.bandwidth.items()) + "</bandwidth>"
        return f"<model type='{self.vif_model}'/>{self.vif_driver}{bandwidth}"

    def devices_tail_xml(self, graphics_listen, tpm_secret=None):
        """The devices after the disks, the NICs and the serial port, in Nova's order."""
        parts = []
        if self.graphics:
            parts.append(f"<graphics type='vnc' autoport='yes' "
                         f"listen='{xml_escape(graphics_listen)}'/>")
            vram = f" vram='{self.video_ram * 1024}'" if self.video_ram else ""
            parts.append(f"<video><model type='{self.video_model}'{vram}/></video>")
            if self.tablet:
                parts.append(f"<input type='tablet' bus='{self.input_bus or 'usb'}'/>")
            if self.input_bus:
                parts.append(f"<input type='keyboard' bus='{self.input_bus}'/>")
        if self.guest_agent:
            parts.append("<channel type='unix'><target type='virtio' "
                         "name='org.qemu.guest_agent.0'/></channel>")
        if self.rng:
            bytes_, period = self.rng_rate
            rate = f"<rate period='{period}' bytes='{bytes_}'/>" if bytes_ and period else ""
            parts.append(f"<rng model='virtio'>{rate}<backend model='random'>/dev/urandom"
                         f"</backend></rng>")
        parts.append(self.tpm_xml(tpm_secret))
        usb = self.tablet and (self.input_bus or "usb") == "usb"
        model = "" if usb else f" model='{self.usb_model or 'none'}'"
        parts.append(f"<controller type='usb' index='0'{model}/>")
        if self.watchdog:
            parts.append(f"<watchdog model='i6300esb' action='{self.watchdog}'/>")
        parts.append("<memballoon model='virtio' autodeflate='on' freePageReporting='on'>"
                     "<stats period='10'/></memballoon>")
        return "".join(parts)


def flavor_image_conflict(server, spec, flavor_value, image_value):
    """Nova's FlavorImageConflict message for extra spec spec (hw:pmu) and its property."""
    return (f"Flavor {server['flavor']['name']} has {spec} extra spec explicitly set to "
            f"{flavor_value}, conflicting with image {server.get('image_ref')} which has "
            f"{spec.replace(':', '_')} explicitly set to {image_value}.")


def server_image_meta(server):
    """The server's image properties as image_meta reads them ({} when they no longer
    fit: the build refused them already)."""
    try:
        return image_meta(server.get("image_properties"))
    except BadRequest:
        return {}


def server_disk_bus(server):
    """The bus of the server's disks and volumes (hw_disk_bus, else virtio)."""
    bus = server_image_meta(server).get("hw_disk_bus") or "virtio"
    return bus if bus in DISK_PREFIXES else "virtio"


def config_drive_slot(server):
    """The slot (vdX) of the config drive: the first after the local disks (and the boot
    volume), as Nova names it."""
    used = len(disk_layout(server)) + (1 if server.get("volume_backed") else 0)
    return "vd" + chr(ord("a") + used)


def config_drive_dev(server, shape):
    """The config drive's device name: its slot on the disks' bus, else the first name
    of its own bus (hda)."""
    prefix = DISK_PREFIXES[shape.cdrom_bus]
    if prefix == DISK_PREFIXES[shape.disk_bus]:
        return prefix + config_drive_slot(server)[2:]
    return prefix + "a"


def cgroup_cpu_controller():
    """True when this host's cgroups control CPU time (the quota:cpu_* limits need it)."""
    try:
        with open("/sys/fs/cgroup/cgroup.controllers", encoding="ascii") as f:
            return "cpu" in f.read().split()
    except OSError:
        return os.path.isdir("/sys/fs/cgroup/cpu")


def vtpm_requested(flavor, props):
    """True when the flavor or the image asks for an emulated TPM (hw:tpm_version)."""
    return bool((flavor.get("extra_specs") or {}).get("hw:tpm_version")
                or (props or {}).get("hw_tpm_version"))


VTPM_REFUSED = {"rebuild": "rebuild", "shelve": "shelve", "rescue": "rescue",
                "evacuate": "evacuate", "migrate": "migrate", "resize": "resize",
                "live-migration": "live-migration"}   # Nova's four, and the moves


def refuse_vtpm_move(server, action_name):
    """400 for what would take a server's emulated TPM from its host (its state stays
    there): Nova's rebuild, shelve, rescue and evacuate, and minivan's moves."""
    if action_name in VTPM_REFUSED and vtpm_requested(server["flavor"],
                                                      server.get("image_properties")):
        raise BadRequest(f"Operation '{VTPM_REFUSED[action_name]}' not supported for "
                         f"vTPM-enabled instance ({server['id']}).")


def vtpm_secret_uuid(server):
    return str(uuid.uuid5(IMAGE_NAMESPACE, "vtpm-secret:" + server["id"]))


def machine_type_for(setting, arch):
    """The machine type --hw-machine-type names for an architecture (a list such as
    'x86_64=q35,aarch64=virt', as Nova's [libvirt] hw_machine_type), or ''."""
    for pair in str(setting or "").split(","):
        name, _, machine = pair.strip().partition("=")
        if name.strip() == arch and machine.strip():
            return machine.strip()
    return ""


# § 9 NUMA and CPU pinning -------------------------------------------------------------
#
# Where a guest with a NUMA topology (hw:numa_nodes, dedicated or mixed CPUs, a page
# size: numa_request) goes on a host, the way Nova fits it (nova/virt/hardware.py
# numa_fit_instance_to_host): the host's cells come from libvirt's capabilities and
# --cpu-dedicated-set / --cpu-shared-set; what the servers already placed there use is
# counted per cell (pinned CPUs, shared vCPUs, memory, pages of each size); a guest cell
# fits a host cell when its memory fits (in pages of the size it asks for, or the host's
# smallest) and its vCPUs do, pinned ones packed onto free cores with their thread
# siblings first.  Guest cells try host cells in every order, the emptiest first.
#   host_numa_cells(caps, dedicated, shared)   the host's cells, or None (no topology)
#   numa_usage(cells, placed)                  what placed guests use of them
#   numa_fit(cells, usage, request, ratios)    the guest's placed cells, or None
#   stored_numa(request, cells)                as the server record keeps them
#   GuestNuma(server, cells, ...)              the domain's elements for them
# The scheduler (numa_place, section 31) fits them per host; the server keeps them as
# numa_topology (and old_numa_topology on the source of a move until it ends).

def format_cpu_spec(cpus):
    """A CPU set as Nova writes it: runs of consecutive ids as ranges ('0-3,6')."""
    parts, run = [], []
    for cpu in sorted(cpus):
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [cpu]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


class NumaConfigError(Exception):
    """--cpu-dedicated-set / --cpu-shared-set name CPUs this host does not have."""


def host_numa_cells(caps_xml, dedicated=None, shared=None):
    """The host's NUMA cells from libvirt's capabilities XML, as Nova's libvirt driver
    reads them: [{"id", "cpuset" (the shared CPUs), "pcpuset" (the dedicated ones),
    "siblings" (thread sibling sets, in Nova's order), "memory" (MiB), "pages"
    [(size KiB, total)]}], or None when libvirt reports no cells.  With neither set
    configured every CPU is both shared and dedicated (Nova's legacy behaviour); with only
    a shared set there are no dedicated CPUs, with only a dedicated set no shared ones."""
    root = ElementTree.fromstring(caps_xml)
    found = root.findall("./host/topology/cells/cell")
    if not found:
        return None
    online = {int(cpu.get("id")) for cell in found for cpu in cell.findall("./cpus/cpu")}
    for option, chosen in (("--cpu-dedicated-set", dedicated), ("--cpu-shared-set", shared)):
        if chosen and not chosen <= online:
            raise NumaConfigError(f"Invalid '{option}' config: one or more of the configured "
                                  f"CPUs is not online. Online cpuset(s): "
                                  f"{sorted(online)}, configured cpuset(s): {sorted(chosen)}")
    shared_set = shared if shared else (set() if dedicated else online)
    dedicated_set = dedicated if dedicated else (set() if shared else shared_set)
    usable = shared_set | dedicated_set
    cells = []
    for cell in found:
        cpus = {int(cpu.get("id")): parse_cpu_spec(cpu.get("siblings") or "")
                for cpu in cell.findall("./cpus/cpu")}
        # Nova keeps the order a set of tuples iterates in (which decides pinning)
        siblings = sorted(set(group) for group in {tuple(s) for s in cpus.values()})
        siblings = [group & usable for group in siblings if group & usable]
        memory = cell.find("./memory")
        cells.append({
            "id": int(cell.get("id")), "cpuset": set(cpus) & shared_set,
            "pcpuset": set(cpus) & dedicated_set, "siblings": siblings,
            "memory": int(memory.text) // 1024 if memory is not None else 0,
            "pages": [(int(p.get("size")), int(p.text or 0))
                      for p in cell.findall("./pages")]})
    return cells


def numa_usage(cells, placed):
    """{cell id: {"pinned", "cpu", "memory", "pages": {size: used}}} of the guests placed
    (their stored numa_topology) on a host's cells."""
    usage = {c["id"]: {"pinned": set(), "cpu": 0, "memory": 0,
                       "pages": collections.Counter()} for c in cells}
    by_id = {c["id"]: c for c in cells}
    for topology in placed:
        for guest in topology["cells"]:
            cell, used = by_id.get(guest["id"]), usage.get(guest["id"])
            if cell is None:
                continue
            size = guest.get("pagesize") or min((s for s, _ in cell["pages"]), default=None)
            if size:
                used["pages"][size] += guest["memory"] * 1024 // size
            used["memory"] += guest["memory"]
            used["cpu"] += len(guest["cpus"])
            if topology["policy"] not in ("dedicated", "mixed"):
                continue
            pinned = set(guest["pinning"].values()) | set(guest.get("reserved") or ())
            if topology.get("thread_policy") == "isolate":
                pinned |= {cpu for group in cell["siblings"] if group & pinned
                           for cpu in group}
            used["pinned"] |= pinned
    return usage


def fits_pages(cell, used, size, memory_kib, use_free=True):
    """Nova's can_fit_pagesize: the memory in whole pages of size, free (or in total);
    None when the cell has no pages of that size."""
    for page_size, total in cell["pages"]:
        if page_size == size:
            pages = total - used["pages"][size] if use_free else total
            return memory_kib <= pages * size and memory_kib % size == 0
    return None


def numa_fit(cells, usage, request, cpu_ratio, ram_ratio):
    """The guest's cells placed on this host's (each with the host cell's "id", its
    "pinning" {vCPU: pCPU}, "reserved" pCPUs for the emulator threads and "pagesize"),
    or None when the request does not fit: Nova's numa_fit_instance_to_host."""
    wanted = request["cells"]
    if not cells or len(cells) < len(wanted):
        return None
    order = list(cells)
    pinned_policy = request["policy"] in ("dedicated", "mixed")
    if len(cells) > len(wanted):
        order.sort(key=lambda c: c["memory"] - usage[c["id"]]["memory"], reverse=True)
        if pinned_policy:
            order.sort(key=lambda c: len(c["pcpuset"] - usage[c["id"]]["pinned"]),
                       reverse=True)
        else:
            order.sort(key=lambda c: usage[c["id"]]["cpu"])
    tried = {}
    for hosts in itertools.permutations(order, len(wanted)):
        placed = []
        for index, (cell, guest) in enumerate(zip(hosts, wanted)):
            key = (cell["id"], index)
            if key not in tried:
                reserve = 1 if request["emulator"] == "isolate" and index == 0 else 0
                tried[key] = fit_cell(cell, usage[cell["id"]], guest, request, reserve,
                                      cpu_ratio, ram_ratio)
            if tried[key] is None:
                break
            placed.append(tried[key])
        else:
            return placed
    return None


def fit_cell(cell, used, guest, request, reserve, cpu_ratio, ram_ratio):
    """One guest cell on one host cell (Nova's _numa_fit_instance_cell), or None."""
    policy, memory_kib = request["policy"], guest["memory"] * 1024
    pinned_policy = policy in ("dedicated", "mixed")
    sizes = sorted((size for size, _ in cell["pages"]), reverse=True)
    pagesize = None
    if request["pagesize"]:
        candidates = {MEMPAGES_SMALL: sizes[-1:], MEMPAGES_LARGE: sizes[:-1],
                      MEMPAGES_ANY: sizes}.get(request["pagesize"], [request["pagesize"]])
        pagesize = next((size for size in candidates
                         if fits_pages(cell, used, size, memory_kib)), None)
        if pagesize is None:
            return None
    elif sizes:
        if not fits_pages(cell, used, sizes[-1], memory_kib, use_free=pinned_policy):
            return None
    elif cell["memory"] - (used["memory"] if pinned_policy else 0) < guest["memory"]:
        return None
    if pinned_policy and len(guest["pcpus"]) + reserve > len(cell["pcpuset"]):
        return None
    if policy != "dedicated" and len(guest["cpus"]) > len(cell["cpuset"]):
        return None
    pinning, reserved = {}, set()
    if pinned_policy:
        free = cell["pcpuset"] - used["pinned"]
        if len(guest["pcpus"]) + reserve > len(free):
            return None
        packed = pack_onto_cores(cell, free, guest["pcpus"], request["thread_policy"],
                                 reserve)
        if packed is None:
            return None
        pinning, reserved = packed
    if policy != "dedicated":
        if used["cpu"] + len(guest["cpus"]) > len(cell["cpuset"]) * cpu_ratio or \
                used["memory"] + guest["memory"] > cell["memory"] * ram_ratio:
            return None
    return {"id": cell["id"], "cpus": set(guest["cpus"]), "pcpus": set(guest["pcpus"]),
            "memory": guest["memory"], "pagesize": pagesize, "pinning": pinning,
            "reserved": reserved}


def pack_onto_cores(cell, free, vcpus, thread_policy, reserve):
    """({vCPU: pCPU}, reserved pCPUs) for the pinned vCPUs on a cell's free pCPUs, thread
    siblings of one core first (Nova's _pack_instance_onto_cores), or None."""
    threads_per_core = max(map(len, cell["siblings"]), default=0) or 1
    by_threads = collections.defaultdict(list)      # free sibling sets with >= n free
    for group in (group & free for group in cell["siblings"]):
        for n in range(1, len(group) + 1):
            by_threads[n].append(group)

    def pinning_of(threads, groups):
        if threads * len(groups) < len(vcpus):
            return None
        usable = itertools.chain(*(list(group)[:threads] for group in groups))
        return list(zip(sorted(vcpus), usable))

    def reserved_of(groups, pairs, whole_cores=False):
        if not pairs or not reserve:
            return set()
        left = [list(group) for group in groups]
        for _, pcpu in pairs:
            for group in list(left):
                if pcpu in group:
                    if whole_cores:
                        left.remove(group)
                    else:
                        group.remove(pcpu)
        return set(list(itertools.chain(*left))[:reserve])

    pairs, reserved = None, set()
    if thread_policy == "isolate":
        if threads_per_core not in by_threads:
            return None
        if threads_per_core != 1 and cell["pcpuset"] != cell["cpuset"]:
            return None
        pairs = pinning_of(1, by_threads[threads_per_core])
        reserved = reserved_of(by_threads[1], pairs, whole_cores=True)
        if not pairs:
            return None
    else:
        if thread_policy == "require" and threads_per_core <= 1:
            return None
        threads = 1
        for threads, groups in sorted(by_threads.items(), reverse=True):
            if thread_policy == "require" and threads <= 1:
                continue
            pairs = pinning_of(threads, groups)
            reserved = reserved_of(by_threads[1], pairs)
            if pairs is None or (reserve and not reserved):
                continue
            break
        if thread_policy != "require" and not pairs:
            singles = [{cpu} for cpu in itertools.chain(*by_threads[1])]
            pairs = pinning_of(threads, singles)
            reserved = reserved_of(singles, pairs)
    if pairs is None or (reserve and not reserved):
        return None
    return dict(pairs), reserved


def stored_numa(request, cells):
    """A fitted topology as the server record keeps it (JSON: lists, string keys)."""
    return {"policy": request["policy"], "thread_policy": request["thread_policy"],
            "emulator": request["emulator"],
            "cells": [dict(c, cpus=sorted(c["cpus"]), pcpus=sorted(c["pcpus"]),
                           pinning={str(v): p for v, p in c["pinning"].items()},
                           reserved=sorted(c["reserved"])) for c in cells]}


class GuestNuma:
    """A server's NUMA elements, as Nova's libvirt driver writes them from the topology
    placed on the host (server["numa_topology"]) and the host's cells as configured now:
    guest cells with their memory, numatune binding each to its host cell, each vCPU
    pinned to its pCPU (or floating over its host cell's shared CPUs), the emulator and
    I/O threads beside them, real-time vCPUs' FIFO scheduling, and huge pages or locked
    memory backing the guest.  A guest without a topology floats over the shared CPU set
    when one is configured."""

    def __init__(self, server, host_cells, shared_set, realtime=None, locked=False):
        self.placed = server.get("numa_topology")
        self.host = {c["id"]: c for c in host_cells or []}
        self.shared_set, self.realtime, self.locked = shared_set, realtime, locked
        # page sizes as Nova reads them: those of the host's first cell
        sizes = sorted(size for size, _ in host_cells[0]["pages"]) if host_cells else []
        self.smallest_page, self.huge_sizes = (sizes[0], set(sizes[1:])) if sizes \
            else (None, set())
        if self.placed and not host_cells:
            raise GuestRefused("This host does not report a NUMA topology, so it cannot "
                               "give the guest the NUMA cells it was placed with")

    def vcpu_attrs(self):
        if self.placed or not self.shared_set:
            return ""
        return f" cpuset='{format_cpu_spec(self.shared_set)}'"

    def memory_backing_xml(self):
        parts = []
        if self.placed and self.smallest_page:
            pages = [f"<page size='{c['pagesize']}' unit='KiB' nodeset='{i}'/>"
                     for i, c in enumerate(self.placed["cells"])
                     if c.get("pagesize") and c["pagesize"] > self.smallest_page]
            if pages:
                parts.append("<hugepages>" + "".join(pages) + "</hugepages>")
        if self.realtime:
            parts.append("<nosharepages/>")
        if self.realtime or self.locked:
            parts.append("<locked/>")
        return "<memoryBacking>" + "".join(parts) + "</memoryBacking>" if parts else ""

    def numatune_xml(self):
        if not self.placed:
            return ""
        nodes = [c["id"] for c in self.placed["cells"]]
        return (f"<numatune><memory mode='strict' nodeset='{format_cpu_spec(nodes)}'/>" +
                "".join(f"<memnode cellid='{i}' mode='strict' nodeset='{node}'/>"
                        for i, node in enumerate(nodes)) + "</numatune>")

    def cputune_parts(self):
        """The pinning elements inside <cputune>, in Nova's order."""
        if not self.placed:
            return ""
        pins, emulator = [], set()
        for cell in self.placed["cells"]:
            host = self.host.get(cell["id"])
            for vcpu in sorted(set(cell["cpus"]) | set(cell["pcpus"])):
                pinned = cell["pinning"].get(str(vcpu))
                cpuset = {pinned} if pinned is not None else (host or {}).get("cpuset", set())
                pins.append((vcpu, cpuset))
                if self.placed["emulator"] == "isolate":
                    emulator |= set(cell.get("reserved") or ())
                elif self.placed["emulator"] == "share" and self.shared_set:
                    emulator |= self.shared_set
                elif not self.realtime or vcpu not in self.realtime:
                    emulator |= cpuset
        xml = ""
        if emulator:
            spec = format_cpu_spec(emulator)
            xml = f"<emulatorpin cpuset='{spec}'/><iothreadpin iothread='1' cpuset='{spec}'/>"
        xml += "".join(f"<vcpupin vcpu='{vcpu}' cpuset='{format_cpu_spec(cpuset)}'/>"
                       for vcpu, cpuset in sorted(pins))
        if self.realtime:
            xml += (f"<vcpusched vcpus='{format_cpu_spec(self.realtime)}' scheduler='fifo' "
                    f"priority='1'/>")
        return xml

    def cpu_numa_xml(self):
        if not self.placed:
            return ""
        shared = ""
        if any(c.get("pagesize") in self.huge_sizes for c in self.placed["cells"]):
            shared = " memAccess='shared'"       # huge pages: Nova shares guest memory
        return "<numa>" + "".join(
            f"<cell id='{i}' cpus='{format_cpu_spec(set(c['cpus']) | set(c['pcpus']))}' "
            f"memory='{c['memory'] * 1024}'{shared}/>"
            for i, c in enumerate(self.placed["cells"])) + "</numa>"


# § 10 hypervisor driver ---------------------------------------------------------------
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


def cpu_has_virtualization(cpuinfo="/proc/cpuinfo"):
    """True when the CPU flags say vmx or svm (a nested /dev/kvm without them fails)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            flags = re.findall(r"^flags\s*:(.*)$", f.read(), re.M)
    except OSError:
        return False
    return any({"vmx", "svm"} & set(line.split()) for line in flags)


def detect_virt_type(cpuinfo="/proc/cpuinfo", kvm_device="/dev/kvm"):
    """kvm where the CPU has vmx/svm and /dev/kvm opens, else qemu (software emulation).
    Where /dev/kvm is hidden from minivan alone (PrivateDevices=), LibvirtDriver.connect
    asks libvirt."""
    try:
        if cpu_has_virtualization(cpuinfo):
            os.close(os.open(kvm_device, os.O_RDWR))
            return "kvm"
    except OSError:
        pass
    return "qemu"


class DriverError(Exception):
    """A hypervisor operation failed; the server gets a fault with this message."""


class GuestAgentMissing(DriverError):
    """The guest has no QEMU guest agent channel (its image sets no hw_qemu_guest_agent)."""


# libvirt domain states -> Nova power states (nova/compute/power_state.py)
NOSTATE, RUNNING, PAUSED, SHUTDOWN, CRASHED, SUSPENDED = 0, 1, 3, 4, 6, 7
LIBVIRT_POWER_STATE = {0: NOSTATE, 1: RUNNING, 2: RUNNING, 3: PAUSED, 4: SHUTDOWN,
                       5: SHUTDOWN, 6: CRASHED, 7: SUSPENDED}
METADATA_NS = "http://openstack.org/minivan/instance/1"
METADATA_KEY = "minivan"


def xml_escape(text):
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&apos;"))


DETACH_RETRY_INTERVAL = 20       # seconds, Nova's [libvirt] device_detach_timeout
DETACH_TIMEOUT = 8 * DETACH_RETRY_INTERVAL   # Nova's device_detach_attempts of them
SHUTDOWN_RETRY_INTERVAL = 10     # seconds, Nova's [libvirt] shutdown_retry_interval


def filter_name(server):
    return "minivan-" + server["id"]


def filter_rule(action, direction, priority, match):
    return (f"<rule action='{action}' direction='{direction}' priority='{priority}'>"
            f"{match}</rule>")


def security_group_match(rule, source):
    """The nwfilter match element of one ingress rule from one source network."""
    net = ipaddress.ip_network(source, strict=False)
    v6 = "-ipv6" if net.version == 6 else ""
    proto = rule.get("ip_protocol") or ""
    attrs = f" srcipaddr='{net.network_address}' srcipmask='{net.prefixlen}'"
    low, high = rule.get("from_port"), rule.get("to_port")
    if proto in ("tcp", "udp"):
        if low not in (None, -1):
            attrs += f" dstportstart='{low}' dstportend='{high if high not in (None, -1) else low}'"
        return f"<{proto}{v6}{attrs}/>"
    if proto == "icmp":
        if low not in (None, -1):
            attrs += f" type='{low}'"
        if high not in (None, -1):
            attrs += f" code='{high}'"
        return f"<{'icmpv6' if v6 else 'icmp'}{attrs}/>"
    return f"<all{v6}{attrs}/>"


def server_filter_xml(server, data):
    """The libvirt network filter of a server's NICs: the ingress rules of its security
    groups (a group source stands for its members' addresses), replies and DHCP in,
    everything out, and the rest of the inbound traffic dropped."""
    groups = {g["name"]: g for g in security_groups_of(data, server["project_id"]).values()}
    rules = [filter_rule("accept", "out", 100, "<all/>"),
             filter_rule("accept", "out", 100, "<all-ipv6/>"),
             filter_rule("accept", "in", 100, "<all state='ESTABLISHED,RELATED'/>"),
             filter_rule("accept", "in", 100, "<all-ipv6 state='ESTABLISHED,RELATED'/>"),
             filter_rule("accept", "in", 110, "<udp srcportstart='67' dstportstart='68'/>")]
    for name in server.get("security_groups", []):
        for rule in groups.get(name, {}).get("rules", []):
            sources = [rule["cidr"]] if rule.get("cidr") else \
                group_member_addresses(data, server["project_id"], rule.get("group_id"))
            rules += [filter_rule("accept", "in", 300, security_group_match(rule, src))
                      for src in sources]
    rules += [filter_rule("drop", "in", 1000, "<all/>"),
              filter_rule("drop", "in", 1000, "<all-ipv6/>")]
    # a fixed uuid: libvirt replaces a filter only when the new definition carries its uuid
    ident = uuid.uuid5(IMAGE_NAMESPACE, "nwfilter:" + server["id"])
    return (f"<filter name='{filter_name(server)}' chain='root'><uuid>{ident}</uuid>"
            f"{''.join(rules)}</filter>")


def group_member_addresses(data, project_id, group_id):
    """The addresses of the project's servers in a security group, as /32 and /128."""
    group = data.get("security_groups", {}).get(group_id or "") or \
        security_groups_of(data, project_id).get(group_id or "")
    if group is None:
        return []
    found = []
    for server in data["servers"].values():
        if server["project_id"] != project_id or server["vm_state"] == "deleted" or \
                group["name"] not in server.get("security_groups", []):
            continue
        for port in server.get("ports", []):
            found += [f"{ip}/{128 if ':' in ip else 32}" for ip, _ in port.get("ips", [])]
    return sorted(set(found))


EVENT_LOOP = []                    # the thread running libvirt's event loop, once started
EVENT_LOOP_LOCK = threading.Lock()


class LibvirtDriver:
    """Nova's ComputeDriver vocabulary over one libvirt connection.

    Every domain minivan creates carries <minivan:instance> metadata naming its
    server; minivan never touches a domain without it."""

    def __init__(self, uri, virt_type="", network="default", instances_dir=None,
                 volume_mount_base=None, firewall="nwfilter", image_cache_dir=None):
        self.uri = uri
        self.image_cache_dir = image_cache_dir or (
            os.path.join(os.path.dirname(instances_dir), "_base") if instances_dir else None)
        self.firewall = firewall == "nwfilter" and not uri.startswith("test:")
        self.volume_mount_base = volume_mount_base
        self.virt_type = virt_type or detect_virt_type()
        self.virt_type_detected = not virt_type
        self.network = network
        self.instances_dir = instances_dir
        self.libvirt = import_libvirt()
        self.conn = None
        self.lock = threading.RLock()
        self.last_error = None
        self.on_event = None
        self.event_id = None
        self.graphics_listen = None    # address of the guests' VNC servers; None: no VNC
        self.files_shared = None       # shares_files() of a remote host, once asked
        self.owner = None              # qemu_owner(), once asked per connection
        self.injected_down = False     # a failure-injection rule says this host is down
        self.volume_passphrase = None  # of encrypted volumes (the fixed key), once set
        self.machine_types = ""        # --hw-machine-type, --cpu-mode, --cpu-models
        self.cpu_mode, self.cpu_models = "", ()
        self.swtpm_enabled = False     # --swtpm-enabled
        self.cpu_dedicated_set = None  # --cpu-dedicated-set, --cpu-shared-set (sets)
        self.cpu_shared_set = None
        self.numa_topology = None      # --numa-topology FILE's capabilities, for this host

    def configure(self, conf, name):
        """The options that shape this host's guests (host name as in --compute-hosts)."""
        self.numa_topology = conf["numa_topology"].get(name)
        self.volume_passphrase = conf["fixed_key"] or None
        self.machine_types, self.cpu_mode = conf["hw_machine_type"], conf["cpu_mode"]
        self.swtpm_enabled = conf["swtpm_enabled"]
        self.cpu_dedicated_set = conf["cpu_dedicated_set"]
        self.cpu_shared_set = conf["cpu_shared_set"]
        self.cpu_models = [m.strip() for m in conf["cpu_models"].split(",") if m.strip()]

    def enable_events(self, callback):
        """Deliver libvirt lifecycle events as callback(server id), from a loop thread.
        Must run before the first connect().  One event loop serves every host."""
        self.on_event = callback
        with EVENT_LOOP_LOCK:
            if EVENT_LOOP:
                return
            self.libvirt.virEventRegisterDefaultImpl()
            libvirt = self.libvirt

            def loop():
                while True:
                    try:
                        libvirt.virEventRunDefaultImpl()
                    except libvirt.libvirtError:
                        time.sleep(1)
            EVENT_LOOP.append(threading.Thread(target=loop, daemon=True,
                                               name="libvirt-events"))
            EVENT_LOOP[0].start()

    def _lifecycle(self, conn, dom, event, detail, opaque):
        if self.on_event is not None:
            self.on_event(dom.UUIDString())

    @property
    def simulated(self):
        """libvirt's test driver: no QEMU, domains live inside this process."""
        return self.uri.startswith("test:")

    def connect(self):
        """Open the connection if it is closed; True when usable."""
        if self.injected_down:
            return False
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
                self.files_shared = self.owner = None
                self.last_error = None
                if self.virt_type_detected and self.virt_type == "qemu" and self.local \
                        and not self.simulated and cpu_has_virtualization() and \
                        not os.path.exists("/dev/kvm") and self.kvm_in_libvirt():
                    self.virt_type = "kvm"   # /dev/kvm hidden from minivan (PrivateDevices=)
                if self.on_event is not None:
                    self.event_id = self.conn.domainEventRegisterAny(
                        None, self.libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None)
                LOG.info("connected to libvirt at %s (%s, guests as %s)", self.uri,
                         self.conn.getType(), self.virt_type)
                return True
            except self.libvirt.libvirtError as e:
                if self.last_error != str(e):
                    LOG.error("libvirt at %s is unreachable: %s", self.uri, e)
                self.last_error = str(e)
                return False

    def kvm_in_libvirt(self):
        """True when this libvirt can start KVM guests (its domain capabilities for kvm)."""
        try:
            self.conn.getDomainCapabilities(None, None, None, "kvm", 0)
            return True
        except self.libvirt.libvirtError:
            return False

    @property
    def available(self):
        return self.conn is not None and not self.injected_down

    def close(self):
        with self.lock:
            if self.conn is not None:
                try:
                    if self.event_id is not None:
                        self.conn.domainEventDeregisterAny(self.event_id)
                        self.event_id = None
                    self.conn.close()
                except self.libvirt.libvirtError:
                    pass
                self.conn = None

    # -- helpers -------------------------------------------------------------
    def _call(self, what, fn, *args):
        """Run a libvirt call; a lost connection is 503, anything else a DriverError.

        libvirt connections are thread-safe: calls run concurrently, only (re)connecting
        takes the lock."""
        if self.injected_down or self.conn is None and not self.connect():
            raise Unavailable("The hypervisor is unreachable.")
        try:
            return fn(*args)
        except self.libvirt.libvirtError as e:
            if self.conn is not None and not self._alive():
                with self.lock:
                    self.conn = None
                raise Unavailable("The hypervisor is unreachable.") from None
            raise DriverError(f"{what} failed: {e.get_error_message()}") from None
        except AttributeError:
            if self.conn is None:       # the connection was dropped meanwhile
                raise Unavailable("The hypervisor is unreachable.") from None
            raise

    def _alive(self):
        try:
            return self.conn.isAlive() == 1
        except self.libvirt.libvirtError:
            return False

    def _domain(self, server, missing_ok=False):
        """The server's own domain (by UUID, checked against our metadata)."""
        def lookup():
            try:
                dom = self.conn.lookupByUUIDString(server["id"])
            except self.libvirt.libvirtError as e:
                if e.get_error_code() == self.libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise
            return dom if self._is_ours(dom) else None
        dom = self._call("looking up the domain", lookup)
        if dom is None and not missing_ok:
            raise DriverError(f"domain {server['instance_name']} does not exist")
        return dom

    def _is_ours(self, dom):
        try:
            dom.metadata(self.libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
            return True
        except self.libvirt.libvirtError:
            return False

    def instance_path(self, server, name=""):
        return os.path.join(self.instances_dir, server["id"], name)

    # -- the domain ------------------------------------------------------------
    def guest_host(self):
        """What this host offers guests (GuestHost): read from libvirt once a connection."""
        if getattr(self, "_guest_host", None) is None or self._guest_host[0] is not self.conn:
            self._guest_host = (self.conn, self._read_guest_host())
        return self._guest_host[1]

    def numa_cells(self):
        """This host's NUMA cells (host_numa_cells), or None: read from libvirt's
        capabilities (or --numa-topology's) once a connection.  NumaConfigError when the
        CPU sets name CPUs the host does not have."""
        if getattr(self, "_numa_cells", None) is None or self._numa_cells[0] is not self.conn:
            caps = self.numa_topology
            if caps is None and self.conn is not None:
                caps = self._call("reading the host's capabilities", self.conn.getCapabilities)
            cells = host_numa_cells(caps, self.cpu_dedicated_set, self.cpu_shared_set) \
                if caps else None
            self._numa_cells = (self.conn, cells)
        return self._numa_cells[1]

    def guest_numa(self, server):
        """The server's GuestNuma on this host (DriverError when the host cannot)."""
        flavor = server["flavor"]
        specs, meta = flavor.get("extra_specs") or {}, server.get("image_properties") or {}
        try:
            cells = self.numa_cells() if server.get("numa_topology") or \
                self.cpu_shared_set else None
            realtime = realtime_request(flavor, image_meta(meta))
            if realtime and emulator_policy_request(specs) == "share" and \
                    not self.cpu_shared_set:
                raise GuestRefused("Use of realtime CPUs requires either one or more "
                                   "non-realtime CPU(s) or offloaded emulator threads: "
                                   "emulator threads shared with other guests need "
                                   "--cpu-shared-set on this host")
            return GuestNuma(server, cells, self.cpu_shared_set, realtime,
                             locked_request(specs, image_meta(meta)))
        except (GuestRefused, NumaConfigError, BadRequest) as e:
            raise DriverError(str(getattr(e, "message", e))) from None

    def _read_guest_host(self):
        if self.simulated or self.conn is None:
            tpm = (("1.2", "2.0"), ("tpm-tis", "tpm-crb")) if self.swtpm_enabled else None
            return GuestHost(machines=(), uefi=True, secure_boot=True,
                             virt_type=self.virt_type, tpm=tpm)
        caps = self._call("reading the host's capabilities", self.conn.getCapabilities)
        machines = set()
        for guest in re.findall(r"<guest>.*?</guest>", caps, re.S):
            if "<arch name='x86_64'>" in guest:
                machines.update(re.findall(r"<machine[^>]*>([^<]+)</machine>", guest))
                machines.update(re.findall(r"<machine[^>]*canonical='([^']+)'", guest))
        domcaps = self._call("reading the domain capabilities",
                             self.conn.getDomainCapabilities, None, "x86_64", "q35",
                             self.virt_type, 0)
        loader = re.search(r"<loader supported='yes'>(.*?)</loader>", domcaps, re.S)
        loader = loader.group(1) if loader else ""
        uefi = bool(re.search(r"<enum name='type'>.*?<value>pflash</value>", loader, re.S))
        secure = bool(re.search(r"<enum name='secure'>.*?<value>yes</value>", loader, re.S))
        controller = cgroup_cpu_controller() if self.local else True   # (its libvirt sees)
        tpm = None
        found = re.search(r"<tpm supported='yes'>(.*?)</tpm>", domcaps, re.S)
        if self.swtpm_enabled and found and "<value>emulator</value>" in found.group(1):
            versions = re.search(r"<enum name='backendVersion'>(.*?)</enum>", found.group(1),
                                 re.S)
            models = re.search(r"<enum name='model'>(.*?)</enum>", found.group(1), re.S)
            tpm = (re.findall(r"<value>([^<]+)</value>", versions.group(1)) if versions
                   else ["1.2", "2.0"],
                   re.findall(r"<value>([^<]+)</value>", models.group(1)) if models else [])
        return GuestHost(machines, uefi, secure, controller, self.virt_type, tpm)

    def guest_shape(self, server):
        """The server's GuestShape on this host; DriverError with the reason when the host
        cannot give it."""
        try:
            return GuestShape(server, self.guest_host(), self.machine_types, self.cpu_mode,
                              self.cpu_models, graphics=bool(self.graphics_listen))
        except GuestRefused as e:
            raise DriverError(str(e)) from None

    def disk_dev(self, server, target):
        """The guest's name of the disk in slot target (vdX): on the bus its image asks for
        (sdX on SATA or SCSI, hdX on IDE)."""
        return DISK_PREFIXES[server_disk_bus(server)] + target[2:]

    def domain_xml(self, server, disks, config_drive=None, rescue=None):
        """libvirt XML for a server: disks is [(path, target, format)]."""
        flavor = server["flavor"]
        shape = self.guest_shape(server)
        domain_type = "test" if self.simulated else self.virt_type
        meta = (f'<minivan:instance xmlns:minivan="{METADATA_NS}">'
                f'<minivan:name>{xml_escape(server["name"])}</minivan:name>'
                f'<minivan:owner project="{xml_escape(server["project_id"])}" '
                f'user="{xml_escape(server["user_id"])}"/>'
                f'<minivan:flavor name="{xml_escape(flavor["name"])}" '
                f'id="{xml_escape(flavor["id"])}"'
                f' memory="{flavor["ram"]}" vcpus="{flavor["vcpus"]}" disk="{flavor["disk"]}"/>'
                f'<minivan:image uuid="{xml_escape(server["image_ref"])}"/>'
                f'<minivan:created>{server["created_at"]}</minivan:created>'
                f'</minivan:instance>')
        devices = self._disks_xml(server, shape, disks, config_drive, rescue)
        for port in server.get("ports", []):
            devices.append(self._interface_xml(port, server, shape))
        console = xml_escape(self.instance_path(server, "console.log"))
        devices.append(f"<serial type='pty'><log file='{console}' append='on'/>"
                       f"<target port='0'/></serial>"
                       f"<console type='pty'><target type='serial' port='0'/></console>")
        if shape.tpm:
            self.vtpm_secret(server)
        devices.append(shape.devices_tail_xml(self.graphics_listen or "",
                                              vtpm_secret_uuid(server)))
        stable = any(len(r) == 5 for r in rescue or [])
        os_xml = shape.os_xml(None if stable else "hd")    # (a boot order is per device)
        numa = self.guest_numa(server)
        cpu = shape.cpu_xml().replace("</cpu>", numa.cpu_numa_xml() + "</cpu>")
        if self.simulated:      # libvirt's test hypervisor: no machine types or CPU models
            os_xml = re.sub(r" machine='[^']*'", "", os_xml)
            cpu = f"<cpu>{numa.cpu_numa_xml()}</cpu>" if numa.placed else ""
        uuid_ = server["id"]
        sysinfo = ("<sysinfo type='smbios'><system>"
                   "<entry name='manufacturer'>OpenStack Foundation</entry>"
                   "<entry name='product'>OpenStack Nova</entry>"
                   f"<entry name='version'>{MINIVAN_RELEASE}</entry>"
                   f"<entry name='serial'>{uuid_}</entry><entry name='uuid'>{uuid_}</entry>"
                   "<entry name='family'>Virtual Machine</entry></system></sysinfo>")
        return (f"<domain type='{domain_type}'><name>{server['instance_name']}</name>"
                f"<uuid>{uuid_}</uuid><metadata>{meta}</metadata>"
                f"<memory unit='KiB'>{flavor['ram'] * 1024}</memory>"
                f"{numa.memory_backing_xml()}{numa.numatune_xml()}"
                f"<vcpu{numa.vcpu_attrs()}>{flavor['vcpus']}</vcpu>{sysinfo}{os_xml}"
                f"{shape.features_xml()}<iothreads>1</iothreads>"
                f"{shape.cputune_xml(numa.cputune_parts())}{shape.clock_xml()}{cpu}"
                f"<devices>{''.join(devices)}</devices></domain>")

    def _disks_xml(self, server, shape, disks, config_drive, rescue):
        """The <disk> elements, Nova's order: local disks, volumes, then the config drive;
        then the SCSI controller.  rescue: (path, target, format) first for a legacy
        rescue; (path, target, format, device, bus) for a stable device rescue, which boots
        first wherever it sits."""
        devices = []
        units = iter(range(1000))     # virtio-scsi disks' unit numbers, in order
        stable = [r for r in rescue or [] if len(r) == 5]

        def scsi_address(bus):
            if bus == "scsi" and shape.scsi_model == "virtio-scsi":
                return f"<address type='drive' controller='0' unit='{next(units)}'/>"
            return ""
        for entry in [r for r in rescue or [] if len(r) == 3] + list(disks) + stable:
            path, target, fmt = entry[:3]
            device, bus = entry[3:] if len(entry) == 5 else ("disk", shape.disk_bus)
            dev = target if len(entry) == 5 else shape.disk_dev(target)
            extra = ("<boot order='1'/>" if len(entry) == 5 else "") + \
                ("<readonly/>" if device == "cdrom" else "")
            devices.append(f"<disk type='file' device='{device}'><driver name='qemu' "
                           f"type='{fmt}' cache='none'/><source file='{xml_escape(path)}'/>"
                           f"<target dev='{dev}' bus='{bus}'/>{shape.iotune_xml()}"
                           f"{scsi_address(bus)}{extra}</disk>")
        for vol in sorted(server.get("volumes", []), key=lambda v: v.get("target") or ""):
            if vol.get("connection_info") and vol.get("target"):
                self.volume_secret(vol)
                devices.append(volume_disk_xml(vol, self.volume_mount_base, self.mount_share,
                                               shape.disk_dev(vol["target"]), shape.disk_bus,
                                               scsi_address(shape.disk_bus)))
        if config_drive:
            dev = config_drive_dev(server, shape)
            devices.append(f"<disk type='file' device='cdrom'><driver name='qemu' type='raw' "
                           f"cache='none'/><source file='{xml_escape(config_drive)}'/>"
                           f"<target dev='{dev}' bus='{shape.cdrom_bus}'/>"
                           f"{shape.iotune_xml()}{scsi_address(shape.cdrom_bus)}</disk>")
        scsi = shape.scsi_model or ("virtio-scsi" if any(r[4] == "scsi" for r in stable)
                                    else None)
        if scsi:
            devices.append(f"<controller type='scsi' index='0' model='{scsi}'/>")
        return devices

    def spawn(self, server, disks, config_drive=None, start=True):
        """Define the server's domain and (unless start is False) boot it."""
        xml = self.domain_xml(server, disks, config_drive)
        self.push_files([path for path, _, _ in disks] + [config_drive] * bool(config_drive))

        def define():
            dom = self.conn.defineXML(xml)
            if start:
                dom.create()
            return dom
        self._call("creating the domain", define)
        if start:
            self._simulated_console(server, "booted")

    def _simulated_console(self, server, what):
        """libvirt's test hypervisor has no serial port: its guests' console says what
        happened to them, so os-getConsoleOutput shows something real about them."""
        if not self.simulated:
            return
        path = self.instance_path(server, "console.log")
        name = server["instance_name"]
        lines = [f"{name} (libvirt test hypervisor): powered on"]
        if what == "booted":
            flavor = server["flavor"]
            lines.append(f"{name}: {flavor['vcpus']} vcpu(s), {flavor['ram']} MiB memory, "
                         f"root disk {flavor['disk']} GiB")
            lines += [f"{name}: eth{i} {port['mac']} on network {port['network']}"
                      for i, port in enumerate(server.get("ports", []))]
        lines.append(f"{name}: {what}")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
        except OSError:
            pass

    def redefine(self, server, disks, config_drive=None, rescue=None):
        """Replace the stopped domain's definition (resize, rescue, unrescue)."""
        xml = self.domain_xml(server, disks, config_drive, rescue)
        self.push_files([entry[0] for entry in disks + (rescue or [])] +
                        [config_drive] * bool(config_drive))
        self._call("redefining the domain", lambda: self.conn.defineXML(xml))

    def destroy(self, server):
        """Stop and undefine the server's domain, if it exists."""
        dom = self._domain(server, missing_ok=True)
        if dom is None:
            return

        def remove():
            if dom.isActive():
                dom.destroy()
            # (with the UEFI variables and the emulated TPM's state, which go with it)
            flags = (self.libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                     | self.libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                     | self.libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                     | getattr(self.libvirt, "VIR_DOMAIN_UNDEFINE_TPM", 0))
            try:
                dom.undefineFlags(flags)
            except self.libvirt.libvirtError:
                dom.undefine()
        self._call("deleting the domain", remove)
        for vol in server.get("volumes", []):      # defined again with the next domain
            self.volume_secret(vol, remove=True)
        if server.get("vtpm_secret"):
            self.vtpm_secret(server, remove=True)

    def live_migrate(self, server, dest, disks, config_drive=None, block=False):
        """Move the running domain to dest's libvirt (a live migration minivan drives over
        both connections; block copies the disks too).  On libvirt's test hypervisor,
        which cannot migrate, the domain is defined and started there instead."""
        if self.simulated or dest.simulated:
            state = self.get_info(server)
            dest.spawn(server, disks, config_drive, start=state in (RUNNING, PAUSED))
            if state == PAUSED:
                dest.pause(server)
            self.destroy(server)
            return
        lv = self.libvirt
        flags = lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_PERSIST_DEST | \
            lv.VIR_MIGRATE_UNDEFINE_SOURCE
        dom = self._domain(server)
        if dest.conn is None:
            raise Unavailable("the destination host's libvirt is unreachable")
        params = {}
        for vol in server.get("volumes", []):
            if vol.get("connection_info"):
                dest.volume_secret(vol)       # the destination's QEMU opens LUKS volumes
        if block:
            # QEMU copies the disks' own layers into empty overlays made there beforehand
            flags |= lv.VIR_MIGRATE_NON_SHARED_INC
            dest.prepare_disks_for_migration(disks, config_drive)
            params[lv.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = [target for _, target, _ in disks]
        self._call("migrating the domain", dom.migrate3, dest.conn, params, flags)
        for vol in server.get("volumes", []):
            self.volume_secret(vol, remove=True)

    def prepare_disks_for_migration(self, disks, config_drive):
        """Empty overlays on the same base images (and the config drive) on this host,
        for a block migration coming in."""
        with tempfile.TemporaryDirectory(prefix="minivan-migration-") as staging:
            sources = {}
            for path, _, _ in disks:
                fresh = os.path.join(staging, os.path.basename(path))
                base = qcow2_backing(path)
                create_qcow2(fresh, virtual_size(path), base,
                             qcow2_backing_format(path) if base else None)
                sources[path] = fresh
            if self.shares_files():
                for path, fresh in sources.items():
                    shutil.move(fresh, path)
                self.secure(list(sources) + [config_drive] * bool(config_drive))
            else:
                self.push_files(list(sources) + [config_drive] * bool(config_drive), sources)

    # -- files on a host that does not share minivan's instances directory --------
    def shares_files(self):
        """True when this host sees minivan's own instances directory (a local libvirt,
        a shared file system, libvirt's test hypervisor).  Elsewhere minivan copies the
        disks through libvirt's storage pools and streams.  A remote host is asked once
        per connection, by a marker file its libvirt can or cannot see."""
        if self.local:
            return True
        if self.files_shared is None:
            self.files_shared = self._call("looking for shared storage", self._probe_shared)
        return self.files_shared

    @property
    def local(self):
        """libvirt's test hypervisor, or a libvirt on this machine through its usual
        socket: it sees minivan's files."""
        parts = urllib.parse.urlsplit(self.uri)
        return self.simulated or self.instances_dir is None or (
            "+" not in parts.scheme and not parts.netloc and "socket=" not in parts.query)

    def _probe_shared(self):
        os.makedirs(self.instances_dir, mode=0o711, exist_ok=True)
        marker = ".minivan-probe-" + secrets.token_hex(8)
        path = os.path.join(self.instances_dir, marker)
        with open(path, "w"):
            pass
        try:
            return self._volume(self._pool(self.instances_dir), marker) is not None
        finally:
            os.unlink(path)

    def _pool(self, directory):
        """A transient directory pool over one directory of this host (made if missing)."""
        lv = self.libvirt
        name = "minivan-" + hashlib.sha1(directory.encode()).hexdigest()[:16]
        xml = (f"<pool type='dir'><name>{name}</name><target><path>{xml_escape(directory)}"
               f"</path><permissions><mode>0711</mode></permissions></target></pool>")
        for _ in range(3):
            try:
                pool = self.conn.storagePoolLookupByName(name)
                if not pool.isActive():
                    pool.create(0)
                pool.refresh(0)
                return pool
            except lv.libvirtError as e:
                if e.get_error_code() != lv.VIR_ERR_NO_STORAGE_POOL:
                    raise
            try:
                return self.conn.storagePoolCreateXML(xml, lv.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
            except lv.libvirtError:
                pass                           # made meanwhile by another thread: look again
        return self.conn.storagePoolLookupByName(name)

    def _volume(self, pool, name):
        try:
            return pool.storageVolLookupByName(name)
        except self.libvirt.libvirtError as e:
            if e.get_error_code() == self.libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise

    def _upload(self, path, source=None, pool=None):
        """Copy the local file source (default: path itself) to path on this host (pool:
        the pool of its directory, when the caller has it)."""
        source = source or path
        pool = pool or self._pool(os.path.dirname(path))
        name = os.path.basename(path)
        old = self._volume(pool, name)
        if old is not None:
            old.delete(0)
        size = os.path.getsize(source)
        vol = pool.createXML(f"<volume><name>{xml_escape(name)}</name><capacity unit='bytes'>"
                             f"{size}</capacity><allocation>0</allocation><target>"
                             f"<format type='raw'/><permissions><mode>0600</mode></permissions>"
                             f"</target></volume>", 0)
        stream = self.conn.newStream(0)
        try:
            vol.upload(stream, 0, size, 0)
            with open(source, "rb") as f:
                stream.sendAll(lambda _stream, n, opaque: opaque.read(n), f)
            stream.finish()
        except BaseException:
            try:
                stream.abort()
            except self.libvirt.libvirtError:
                pass
            raise

    def _download(self, vol, into=None):
        """A volume's bytes; or, with into (a file open for writing), written there as they
        come, so that a large disk is never held in memory."""
        stream = self.conn.newStream(0)
        chunks = []
        vol.download(stream, 0, 0, 0)
        if into is not None:
            stream.recvAll(lambda _stream, data, f: f.write(data), into)
        else:
            stream.recvAll(lambda _stream, data, got: got.append(data) or len(data), chunks)
        stream.finish()
        return b"".join(chunks)

    def push_files(self, paths, sources=None):
        """Copy these files (and the base images behind them, once: they never change)
        to this host, where it does not share the instances directory.  sources: {path:
        the local file to send as path} where that is another file."""
        if self.shares_files():
            self.secure(paths)
            return
        sources = sources or {}

        pools = {}

        def pool_of(path):                    # one look (and refresh) per directory
            directory = os.path.dirname(path)
            if directory not in pools:
                pools[directory] = self._pool(directory)
            return pools[directory]

        def push():
            for path in paths:
                base = qcow2_backing(sources.get(path, path))   # (a source may be staged
                if base:                                         # elsewhere; its chain not)
                    disk_chain([base], self.own_dirs())
                while base:
                    pool = pool_of(base)
                    done = os.path.basename(base) + ".copied"
                    if self._volume(pool, done) is None:
                        self._upload(base, pool=pool)
                        pool.createXML(f"<volume><name>{xml_escape(done)}</name><capacity>0"
                                       f"</capacity><target><format type='raw'/></target>"
                                       f"</volume>", 0)
                    base = qcow2_backing(base)
                self._upload(path, sources.get(path), pool_of(path))
        self._call("copying the disks to the host", push)

    def qemu_owner(self):
        """(uid, gid) this host's QEMU runs as (libvirt's DAC label for the guests' virt
        type), or None where libvirt does not say (the test hypervisor)."""
        if self.owner is None and self.local and urllib.parse.urlsplit(self.uri).path \
                == "/session":
            self.owner = ()                   # QEMU runs as minivan's own user
        if self.owner is None and self.local:
            self.owner = qemu_conf_owner(QEMU_CONF)
        if self.owner is None:                # slow on some hosts: once per connection
            try:
                caps = self._call("reading the host's capabilities",
                                  lambda: self.conn.getCapabilities())
            except DriverError:
                return None
            found = re.search(r"<model>dac</model>.*?<baselabel type='%s'>\+?(\d+):\+?(\d+)"
                              r"</baselabel>" % re.escape(self.virt_type), caps, re.S)
            self.owner = (int(found.group(1)), int(found.group(2))) if found else ()
        return self.owner or None

    def secure(self, paths):
        """The files QEMU opens here (and the base images behind them) become 0600 in
        0700 directories, owned by the user QEMU runs as when minivan runs as root: no
        other user of the host reads or lists a guest's disks."""
        files = disk_chain(paths, self.own_dirs())
        if self.simulated:
            return
        owner = self.qemu_owner() if os.geteuid() == 0 else None
        dirs = {os.path.dirname(path) for path in files}
        for path, mode in [(f, 0o600) for f in files] + [(d, 0o700) for d in dirs]:
            try:
                os.chmod(path, mode)
                if owner and os.stat(path).st_uid != owner[0]:
                    os.chown(path, *owner)
            except OSError as e:
                raise DriverError(f"cannot secure {path}: {e.strerror}") from None
        if owner and owner[0] != os.geteuid():
            for directory in {os.path.dirname(d) for d in dirs}:
                passable_for(directory, *owner)

    def own_dirs(self):
        """The only directories whose files this host's QEMU is given, and whose modes
        minivan changes: the instances directory and the image cache."""
        return [d for d in (self.instances_dir, self.image_cache_dir) if d]

    def pull_files(self, directory):
        """Copy a server's files from this host into minivan's instances directory, where
        the host does not share it."""
        if self.shares_files():
            return

        def pull():
            pool = self._pool(directory)
            os.makedirs(directory, mode=0o700, exist_ok=True)
            for name in pool.listVolumes():
                part = os.path.join(directory, "." + name + ".part")
                try:
                    with open(part, "wb") as f:
                        self._download(pool.storageVolLookupByName(name), f)
                except BaseException:
                    os.unlink(part)
                    raise
                os.replace(part, os.path.join(directory, name))
        self._call("copying the disks from the host", pull)

    def read_file(self, path):
        """A file of this host's instances directory, as bytes (None when absent)."""
        if self.shares_files():
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError:
                return None

        def read():
            vol = self._volume(self._pool(os.path.dirname(path)), os.path.basename(path))
            return None if vol is None else self._download(vol)
        return self._call("reading a file of the host", read)

    def remove_files(self, directory):
        """Remove a server's directory from this host, where it does not share it."""
        if self.shares_files():
            return

        def remove():
            pool = self._pool(directory)
            for name in pool.listVolumes():
                pool.storageVolLookupByName(name).delete(0)
            pool.destroy()
            parent = self._pool(os.path.dirname(directory))
            left = self._volume(parent, os.path.basename(directory))
            if left is not None:
                left.delete(0)                 # the empty directory
        self._call("removing the server's files from the host", remove)

    def abort_job(self, server):
        """Cancel the domain's running job (a live migration)."""
        dom = self._domain(server)
        self._call("aborting the migration", dom.abortJob)

    def exists(self, server):
        return self._domain(server, missing_ok=True) is not None

    def live_xml(self, server):
        """The domain's XML as libvirt has it now (with the addresses it gave the
        devices), or None when there is no domain."""
        dom = self._domain(server, missing_ok=True)
        return None if dom is None else self._call("reading the domain", dom.XMLDesc, 0)

    def get_info(self, server):
        """Nova power state of the server's domain (NOSTATE if it has none)."""
        dom = self._domain(server, missing_ok=True)
        if dom is None:
            return NOSTATE
        state = self._call("reading the domain state", dom.state)[0]
        if state == self.libvirt.VIR_DOMAIN_SHUTOFF and self._call(
                "reading the saved state", dom.hasManagedSaveImage, 0):
            return SUSPENDED
        return LIBVIRT_POWER_STATE.get(state, NOSTATE)

    def power_on(self, server):
        dom = self._domain(server)
        if not self._call("reading the domain state", dom.isActive):
            self._call("starting the domain", dom.create)
            self._simulated_console(server, "booted")
        elif self._call("reading the domain state", dom.state)[0] == \
                self.libvirt.VIR_DOMAIN_PAUSED:
            self._call("resuming the domain", dom.resume)

    def wait_running(self, server, timeout):
        """The domain's power state once it runs, or after timeout seconds.  A domain that
        libvirt is still starting is paused for a moment; one left paused is resumed."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.get_info(server)
            if state != PAUSED or time.monotonic() > deadline:
                return state
            try:
                self.power_on(server)
            except DriverError:
                pass                          # (not resumable while libvirt starts it)
            time.sleep(0.2)

    def power_off(self, server, timeout=60, clean=True):
        """ACPI shutdown, then a hard stop after timeout seconds (0: at once).  As Nova's
        driver, the ACPI request is sent again every SHUTDOWN_RETRY_INTERVAL seconds: a
        guest still booting may not have been listening for the first."""
        dom = self._domain(server)
        if not self._call("reading the domain state", dom.isActive):
            return
        if clean and timeout > 0:
            start = time.monotonic()
            deadline, resend = start + timeout, start
            while time.monotonic() < deadline:
                if time.monotonic() >= resend:
                    try:
                        self._call("shutting the guest down", dom.shutdown)
                    except DriverError:
                        pass
                    resend += SHUTDOWN_RETRY_INTERVAL
                if not self._call("reading the domain state", dom.isActive):
                    return
                time.sleep(0.2)
        if self._call("reading the domain state", dom.isActive):
            self._call("stopping the domain", dom.destroy)

    def reboot(self, server, hard=False):
        dom = self._domain(server)
        if hard or not self._call("reading the domain state", dom.isActive):
            if self._call("reading the domain state", dom.isActive):
                self._call("stopping the domain", dom.destroy)
            self._call("starting the domain", dom.create)
            self._simulated_console(server, "booted")
            return
        self._call("rebooting the guest", dom.reboot, 0)
        self._simulated_console(server, "rebooted")

    def pause(self, server):
        self._call("pausing the domain", self._domain(server).suspend)

    def unpause(self, server):
        self._call("unpausing the domain", self._domain(server).resume)

    def suspend(self, server):
        """Save the guest's memory to disk and stop it (Nova's suspend)."""
        self._call("suspending the domain", self._domain(server).managedSave, 0)

    def resume(self, server):
        self._call("resuming the domain", self._domain(server).create)
        self._simulated_console(server, "resumed")

    def trigger_crash_dump(self, server):
        self._call("injecting an NMI", self._domain(server).injectNMI, 0)

    def set_admin_password(self, server, password):
        if not self.guest_shape(server).guest_agent:
            raise GuestAgentMissing("QEMU guest agent is not enabled")
        dom = self._domain(server)
        self._call("setting the password through the guest agent", dom.setUserPassword,
                   "root", password, 0)

    def get_console_output(self, server):
        """The serial console log (empty when the guest has written nothing)."""
        data = self.read_file(self.instance_path(server, "console.log"))
        return (data or b"").decode("utf-8", "replace")

    def interface_addresses(self, server):
        """{mac: [(address, version)]} from DHCP leases (or libvirt's default source)."""
        dom = self._domain(server, missing_ok=True)
        if dom is None or not self._call("reading the domain state", dom.isActive):
            return {}
        found = {}
        for source in (self.libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0):
            try:
                ifaces = self._call("reading addresses", dom.interfaceAddresses, source)
            except DriverError:
                continue
            for iface in ifaces.values():
                mac = (iface.get("hwaddr") or "").lower()
                for addr in iface.get("addrs") or []:
                    version = 6 if addr["type"] == 1 else 4
                    found.setdefault(mac, []).append((addr["addr"], version))
            if found:
                break
        return found

    def get_diagnostics(self, server):
        """Counters for the 2.48 diagnostics view."""
        dom = self._domain(server)

        def read():
            state, max_mem, mem, vcpus, cpu_time = dom.info()
            stats = {"state": state, "max_memory_kb": max_mem, "memory_kb": mem,
                     "vcpus": vcpus, "cpu_time": cpu_time, "cpu_details": [], "disks": [],
                     "nics": []}
            if dom.isActive():
                try:
                    for i, vcpu in enumerate(dom.vcpus()[0]):
                        stats["cpu_details"].append({"id": i, "time": vcpu[2]})
                except self.libvirt.libvirtError:
                    pass
                for target in ("vda", "vdb", "vdc"):
                    try:
                        rd_req, rd_bytes, wr_req, wr_bytes, errs = dom.blockStats(target)
                    except self.libvirt.libvirtError:
                        continue
                    stats["disks"].append({"read_bytes": rd_bytes, "read_requests": rd_req,
                                           "write_bytes": wr_bytes, "write_requests": wr_req,
                                           "errors_count": errs})
            return stats
        return self._call("reading diagnostics", read)

    def network_name(self, network_id):
        """Name of the libvirt network with this UUID, or None."""
        def lookup():
            try:
                return self.conn.networkLookupByUUIDString(network_id).name()
            except self.libvirt.libvirtError:
                return None
        return self._call("looking up the network", lookup)

    def list_networks(self):
        """The host's libvirt networks with their IPv4 addressing."""
        def read():
            nets = []
            for net in self.conn.listAllNetworks():
                xml = net.XMLDesc(0)
                ip = re.search(r"<ip address='([^']+)' (?:netmask='([^']+)'|prefix='(\d+)')", xml)
                bridge = re.search(r"<bridge name='([^']+)'", xml)
                dhcp = re.search(r"<range start='([^']+)' end='([^']+)'", xml)
                record = {"id": net.UUIDString(), "label": net.name(),
                          "bridge": bridge.group(1) if bridge else None,
                          "forward": "<forward" in xml, "cidr": None, "netmask": None,
                          "gateway": None, "broadcast": None, "dhcp_server": None,
                          "dhcp_start": dhcp.group(1) if dhcp else None}
                if ip:
                    mask = ip.group(2) or ip.group(3)
                    network = ipaddress.ip_network(f"{ip.group(1)}/{mask}", strict=False)
                    record.update({"cidr": str(network), "netmask": str(network.netmask),
                                   "gateway": ip.group(1), "dhcp_server": ip.group(1),
                                   "broadcast": str(network.broadcast_address)})
                nets.append(record)
            return sorted(nets, key=lambda n: n["label"])
        return self._call("listing networks", read)

    def network_id(self, name):
        """UUID of the libvirt network with this name, or None."""
        def lookup():
            try:
                return self.conn.networkLookupByName(name).UUIDString()
            except self.libvirt.libvirtError:
                return None
        return self._call("looking up the network", lookup)

    def _interface_xml(self, port, server, shape=None):
        """A NIC on the port's libvirt network, behind the server's network filter (or a
        Neutron port, plugged as Neutron bound it), with the model, driver and bandwidth
        the server's image and flavor ask for."""
        extra = (shape or self.guest_shape(server)).interface_extra_xml()
        if port.get("neutron"):
            return neutron_interface_xml(port, extra)
        ref = f"<filterref filter='{filter_name(server)}'/>" if self.firewall else ""
        return (f"<interface type='network'><source network='{xml_escape(port['network'])}'/>"
                f"<mac address='{port['mac']}'/>{extra}{ref}</interface>")

    def define_filter(self, server, xml):
        """Create or replace the server's network filter (libvirt applies a change to the
        running NICs at once).  A libvirt without network filters turns filtering off."""
        if not self.firewall:
            return

        def define():
            try:
                self.conn.nwfilterDefineXML(xml)
            except self.libvirt.libvirtError as e:
                if e.get_error_code() in (self.libvirt.VIR_ERR_NO_SUPPORT,
                                          self.libvirt.VIR_ERR_NO_CONNECT):
                    LOG.warning("libvirt at %s has no network filters: security group rules "
                                "are not enforced (%s)", self.uri, e.get_error_message())
                    self.firewall = False
                    return
                raise
        self._call("defining the network filter", define)

    def undefine_filter(self, server):
        if not self.firewall:
            return

        def undefine():
            try:
                self.conn.nwfilterLookupByName(filter_name(server)).undefine()
            except self.libvirt.libvirtError:
                pass
        self._call("removing the network filter", undefine)

    def _device_flags(self, dom):
        flags = self.libvirt.VIR_DOMAIN_AFFECT_CONFIG
        if dom.isActive():
            flags |= self.libvirt.VIR_DOMAIN_AFFECT_LIVE
        return flags

    def attach_interface(self, server, port):
        dom = self._domain(server)
        self._call("attaching the interface", lambda: dom.attachDeviceFlags(
            self._interface_xml(port, server), self._device_flags(dom)))

    def detach_interface(self, server, port):
        dom = self._domain(server)
        self._call("detaching the interface", lambda: dom.detachDeviceFlags(
            self._interface_xml(port, server), self._device_flags(dom)))

    def mount_share(self, export, options, point):
        """Mount an NFS share at point on this driver's host, by a transient libvirt netfs
        pool (nfs_pool_xml); a pool of that name left from before is stopped first."""
        lv, name = self.libvirt, nfs_pool_name(point)
        xml = nfs_pool_xml(export, options, point)
        if self.local:
            os.makedirs(point, exist_ok=True)

        def mount():
            try:
                old = self.conn.storagePoolLookupByName(name)
                if old.isActive():
                    old.destroy()
                if old.isPersistent():
                    old.undefine()
            except lv.libvirtError as e:
                if e.get_error_code() != lv.VIR_ERR_NO_STORAGE_POOL:
                    raise
            self.conn.storagePoolCreateXML(xml, 0 if self.local else
                                           lv.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
        self._call(f"mounting NFS share {export} at {point}", mount)

    def attach_volume(self, server, vol):
        """Plug a volume's disk into the domain: live and in its definition; the test
        hypervisor, which has no hot-plug, gets it in its definition."""
        dom = self._domain(server)
        self.volume_secret(vol)
        xml = volume_disk_xml(vol, self.volume_mount_base, self.mount_share,
                              self.disk_dev(server, vol["target"]), server_disk_bus(server))
        if self.simulated:
            self.redefine_config(server)
            return
        self._call("attaching the volume", lambda: dom.attachDeviceFlags(
            xml, self._device_flags(dom)))

    def vtpm_secret(self, server, remove=False):
        """The libvirt secret swtpm encrypts a server's TPM state with (its passphrase is
        the server record's vtpm_secret): defined before the domain, removed with it."""
        if self.simulated:
            return
        if remove:
            self._secret("TPM", vtpm_secret_uuid(server))
            return
        if not server.get("vtpm_secret"):
            raise DriverError("the server has no TPM passphrase (it was made before its "
                              "flavor asked for a TPM)")
        xml = (f"<secret ephemeral='no' private='yes'><uuid>{vtpm_secret_uuid(server)}</uuid>"
               f"<usage type='vtpm'><name>{server['id']}</name></usage></secret>")
        self._secret("TPM", vtpm_secret_uuid(server), xml, server["vtpm_secret"].encode())

    def volume_secret(self, vol, remove=False):
        """The libvirt secret of an encrypted volume: defined (again) with the passphrase
        before its disk is used, or removed once it is detached."""
        if not vol.get("encryption") or self.simulated:
            return
        if remove:
            self._secret("volume", volume_secret_uuid(vol))
            return
        if not self.volume_passphrase:
            raise DriverError(f"volume {vol['id']} is encrypted and no fixed key is set "
                              "(MINIVAN_FIXED_KEY)")
        self._secret("volume", volume_secret_uuid(vol), volume_secret_xml(vol),
                     self.volume_passphrase.encode())

    def _secret(self, what, secret_uuid, xml=None, value=None):
        """Define a libvirt secret (xml) with its value, or (no xml) remove it."""
        if xml is None:
            def undefine():
                try:
                    self.conn.secretLookupByUUIDString(secret_uuid).undefine()
                except self.libvirt.libvirtError as e:
                    if e.get_error_code() != self.libvirt.VIR_ERR_NO_SECRET:
                        raise
            self._call(f"removing the {what}'s secret", undefine)
            return
        secret = self._call(f"defining the {what}'s secret",
                            lambda: self.conn.secretDefineXML(xml))
        self._call(f"setting the {what}'s secret", secret.setValue, value)

    def detach_volume(self, server, vol):
        """Unplug a volume's disk (a guest that ignores the unplug request is detached
        from the definition and left to let go of it at its next shutdown).  As Nova's
        driver, the request goes to the guest again every DETACH_RETRY_INTERVAL seconds:
        a guest still booting misses it."""
        dom = self._domain(server, missing_ok=True)
        if dom is None:
            return
        if self.simulated:
            self.redefine_config(server)
            return
        dev = self.disk_dev(server, vol["target"])
        xml = (f"<disk type='file' device='disk'><target dev='{dev}' "
               f"bus='{server_disk_bus(server)}'/></disk>")
        live = self._call("reading the domain state", dom.isActive)
        self._call("detaching the volume", lambda: dom.detachDeviceFlags(
            xml, self._device_flags(dom)))
        # a live unplug only asks the guest: the volume is free once the disk is gone
        start = time.monotonic()
        resend = start + DETACH_RETRY_INTERVAL
        while live and f"<target dev='{dev}'" in self._call(
                "reading the domain", dom.XMLDesc, 0):
            now = time.monotonic()
            if now > start + DETACH_TIMEOUT or not self._call("reading the domain state",
                                                              dom.isActive):
                if self._call("reading the domain state", dom.isActive):
                    raise DriverError(f"the guest did not release {dev} within "
                                      f"{DETACH_TIMEOUT} seconds")
                break
            if now > resend:
                resend = now + DETACH_RETRY_INTERVAL
                self._resend_detach(dom, xml)
            time.sleep(0.5)

    def _resend_detach(self, dom, xml):
        """Ask the running guest again to let go of a device (its definition has none)."""
        try:
            dom.detachDeviceFlags(xml, self.libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except self.libvirt.libvirtError as e:
            LOG.info("asking the guest again to release a device: %s", e)

    def swap_volume(self, server, old, new):
        """Copy a volume's data to another volume under the guest and switch to it: a
        live block copy and pivot on a running guest, an offline copy otherwise."""
        dom = self._domain(server)
        swapped = dict(server, volumes=[new if v["bdm_uuid"] == old["bdm_uuid"] else v
                                        for v in server.get("volumes", [])])
        if not self.simulated and self._call("reading the domain state", dom.isActive):
            target = self.disk_dev(server, old["target"])

            def copy():
                dom.blockCopy(target, volume_disk_xml(new, self.volume_mount_base,
                                                      self.mount_share, target,
                                                      server_disk_bus(server)),
                              None, self.libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT)
                deadline = time.monotonic() + 3600
                while True:
                    info = dom.blockJobInfo(target, 0)
                    if not info:
                        raise DriverError("the block copy ended before it was complete")
                    if info.get("end") and info["cur"] == info["end"]:
                        break
                    if time.monotonic() > deadline:
                        dom.blockJobAbort(target, 0)
                        raise DriverError("the block copy did not finish within an hour")
                    time.sleep(0.2)
                dom.blockJobAbort(target, self.libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
            self._call("copying the volume", copy)
        elif not self.simulated:
            paths = []
            for vol in (old, new):
                kind, fmt, source = volume_source(vol["connection_info"],
                                                  self.volume_mount_base, self.mount_share)
                if kind != "file":
                    raise DriverError("an offline volume swap needs file-backed volumes")
                paths.append((re.search(r"file='([^']*)'", source).group(1), fmt))
            qemu_img("convert", "-n", "-f", paths[0][1], "-O", paths[1][1], paths[0][0],
                     paths[1][0])
        self.redefine_config(swapped)

    def volume_path(self, vol):
        kind, _, source = volume_source(vol["connection_info"], self.volume_mount_base,
                                        self.mount_share)
        if kind != "file":
            raise DriverError("assisted snapshots need file-backed (NFS) volumes")
        return re.search(r"file='([^']*)'", source).group(1).replace("&apos;", "'")

    def snapshot_volume(self, server, vol, new_file):
        """Move the volume's disk onto new_file, a qcow2 overlay that already exists next
        to it (an external disk-only snapshot that reuses the file)."""
        new_path = os.path.join(os.path.dirname(self.volume_path(vol)),
                                os.path.basename(new_file))
        if not os.path.exists(new_path):
            raise DriverError(f"{new_file} does not exist on the volume's share")
        dom = self._domain(server)
        moved = dict(vol, connection_info=dict(vol["connection_info"], data=dict(
            vol["connection_info"]["data"], name=os.path.basename(new_file), format="qcow2")))
        if self.simulated:
            self.redefine_config(dict(server, volumes=[
                moved if v["bdm_uuid"] == vol["bdm_uuid"] else v
                for v in server.get("volumes", [])]))
            return
        desc = self._call("reading the domain", dom.XMLDesc, 0)
        targets = [re.search(r"<target dev='([^']+)'", disk).group(1) for disk in
                   re.findall(r"<disk .*?</disk>", desc, re.S) if "<target dev=" in disk]
        dev = self.disk_dev(server, vol["target"])
        others = "".join(f"<disk name='{t}' snapshot='no'/>" for t in targets if t != dev)
        xml = (f"<domainsnapshot><disks><disk name='{dev}' snapshot='external' "
               f"type='file'><driver type='qcow2'/><source file='{xml_escape(new_path)}'/>"
               f"</disk>{others}</disks></domainsnapshot>")
        flags = (self.libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                 | self.libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
                 | self.libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA)
        self._call("snapshotting the volume", dom.snapshotCreateXML, xml, flags)

    def merge_volume_snapshot(self, server, vol, file_to_merge, merge_target):
        """Take a snapshot's file out of the volume's backing chain: pull it into the
        active file (rebase onto file_to_merge, which may be None: no backing file), or
        commit file_to_merge down into merge_target."""
        active = self.volume_path(vol)
        where = os.path.dirname(active)
        dom = self._domain(server)
        running = not self.simulated and self._call("reading the domain state",
                                                    dom.isActive)
        target = self.disk_dev(server, vol["target"])

        def wait_job():
            deadline = time.monotonic() + 3600
            while dom.blockJobInfo(target, 0):      # a pull or commit ends by itself
                if time.monotonic() > deadline:
                    raise DriverError("the block job did not end within an hour")
                time.sleep(0.2)

        if merge_target is None:
            base = os.path.join(where, os.path.basename(file_to_merge)) if file_to_merge \
                else None
            if running:
                flags = self.libvirt.VIR_DOMAIN_BLOCK_REBASE_RELATIVE if base else 0

                def rebase():
                    dom.blockRebase(target, base, 0, flags)
                    wait_job()
                self._call("merging the snapshot", rebase)
            else:
                fmt = ["-F", chain_format(active, base) or image_format(base)] if base else []
                qemu_img("rebase", "-q", "-b", os.path.basename(base) if base else "", *fmt,
                         active)
            return
        if not running:
            raise DriverError("committing a volume snapshot needs a running guest")
        base = os.path.join(where, os.path.basename(merge_target))
        top = os.path.join(where, os.path.basename(file_to_merge))

        def commit():
            dom.blockCommit(target, base, top, 0,
                            self.libvirt.VIR_DOMAIN_BLOCK_COMMIT_RELATIVE)
            wait_job()
        self._call("merging the snapshot", commit)

    def resize_volume(self, server, vol, size):
        """Tell a running guest that a volume's disk is now size bytes."""
        dom = self._domain(server, missing_ok=True)
        if dom is None or self.simulated:
            return

        def grow():
            if dom.isActive():
                dom.blockResize(self.disk_dev(server, vol["target"]), size,
                                self.libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        self._call("resizing the volume", grow)

    def redefine_config(self, server):
        """Re-write the domain's definition from the server record."""
        instance = self.instance_path(server)
        drive = os.path.join(instance, "disk.config")
        self.redefine(server, server_disks(instance, server),
                      drive if os.path.exists(drive) else None)

    def _dhcp_host(self, port, command):
        """Add or delete the DHCP reservation that pins a port's fixed IP to its MAC."""
        def update():
            network = self.conn.networkLookupByName(port["network"])
            flags = self.libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
            if network.isActive():
                flags |= self.libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE
            network.update(command, self.libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1,
                           f"<host mac='{port['mac']}' ip='{xml_escape(port['fixed_ip'])}'/>",
                           flags)
        self._call(f"reserving {port['fixed_ip']} on network {port['network']}", update)

    def open_serial_console(self, server):
        """A libvirt stream on the running guest's serial console (its pty)."""
        if self.simulated:
            raise DriverError("libvirt's test hypervisor has no consoles")
        dom = self._domain(server)

        def open_console():
            if not dom.isActive():
                raise DriverError(f"{server['instance_name']} is not running")
            stream = self.conn.newStream(0)
            dom.openConsole(None, stream, self.libvirt.VIR_DOMAIN_CONSOLE_FORCE)
            return stream
        return self._call("opening the serial console", open_console)

    def open_vnc(self, server):
        """A socket to the running guest's VNC server: handed over by libvirt where the
        connection is local, else by TCP to the address and port the domain has."""
        if self.simulated:
            raise DriverError("libvirt's test hypervisor has no graphics")
        dom = self._domain(server)

        def open_graphics():
            if not dom.isActive():
                raise DriverError(f"{server['instance_name']} is not running")
            try:
                return socket.socket(fileno=dom.openGraphicsFD(0, 0))
            except self.libvirt.libvirtError:
                found = re.search(r"<graphics type='vnc' port='(\d+)'[^>]*listen='([^']+)'",
                                  dom.XMLDesc(0))
                if not found:
                    raise
                return socket.create_connection((found.group(2), int(found.group(1))), 10)
        return self._call("opening the VNC console", open_graphics)

    def lease_mac(self, network, address):
        """The MAC that holds a DHCP lease of this address on a network, or None."""
        if self.simulated:
            return None

        def read():
            try:
                leases = self.conn.networkLookupByName(network).DHCPLeases()
            except self.libvirt.libvirtError:
                return None
            return next((lease["mac"].lower() for lease in leases
                         if lease.get("ipaddr") == address), None)
        return self._call("reading DHCP leases", read)

    def reserve_address(self, port):
        self._dhcp_host(port, self.libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST)

    def release_address(self, port):
        try:
            self._dhcp_host(port, self.libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE)
        except DriverError as e:
            LOG.warning("releasing %s: %s", port["fixed_ip"], e)

    def own_domains(self):
        """{server id: power state} of every domain minivan created on this host."""
        def scan():
            return {d.UUIDString(): LIBVIRT_POWER_STATE.get(d.state()[0], NOSTATE)
                    for d in self.conn.listAllDomains() if self._is_ours(d)}
        return self._call("listing domains", scan)

    def get_available_resource(self):
        """Host capacity: vcpus, memory_mb, local_gb, hypervisor type and version."""
        def read():
            model, memory_mb, cpus, *_ = self.conn.getInfo()
            disk = shutil.disk_usage(existing_parent(self.instances_dir)) \
                if self.instances_dir else None
            return {"vcpus": cpus, "memory_mb": memory_mb, "cpu_model": model,
                    "local_gb": disk.total // 2 ** 30 if disk else 0,
                    "free_disk_gb": disk.free // 2 ** 30 if disk else 0,
                    "hypervisor_type": self.conn.getType(),
                    "hypervisor_version": self.conn.getVersion(),
                    "hypervisor_hostname": self.conn.getHostname()}
        return self._call("reading host resources", read)


# -- disks ---------------------------------------------------------------------

def existing_parent(path):
    """The path, or its nearest ancestor that exists (the file system it will be on)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def qemu_img(*args):
    tool = shutil.which("qemu-img")
    if not tool:
        raise DriverError("qemu-img is not installed (Debian/Ubuntu: apt install qemu-utils)")
    done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise DriverError("qemu-img %s failed: %s" % (args[0], done.stderr.strip()[-300:]))
    return done.stdout


def image_format(path):
    """qcow2 or raw, from the file's first bytes (for volume files whose chain records no
    format; never for an image)."""
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == b"QFI\xfb" else "raw"


def virtual_size(path):
    return json.loads(qemu_img("info", "-U", "--output=json", path))["virtual-size"]


def image_virtual_size(path, fmt):
    """A checked base image's virtual size: a qcow2 header's (bytes 24-31), else (raw)
    the file's size."""
    if fmt == "qcow2":
        with open(path, "rb") as f:
            head = f.read(32)
        if head[:4] == b"QFI\xfb" and len(head) == 32:
            return int.from_bytes(head[24:32], "big")
    return os.path.getsize(path)


def disk_bytes(size):
    """Bytes of a size as qemu-img takes it: an int, or digits with K, M, G or T."""
    if isinstance(size, int):
        return size
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if size[-1:].upper() in units:
        return int(size[:-1]) * units[size[-1].upper()]
    return int(size)


def create_qcow2(path, size, backing=None, backing_format=None):
    """An empty qcow2 (version 3) image of size bytes, on the image backing when given:
    what `qemu-img create -f qcow2 [-b B -F F]` writes, without a process per disk.

    64 KiB clusters: the header (with the backing format extension and the backing
    file's name) in cluster 0, the refcount table in 1, its one refcount block in 2
    (16-bit counts, one per cluster in use), and the zeroed L1 table from 3 on."""
    cluster_bits = 16
    cluster = 1 << cluster_bits
    size = disk_bytes(size)
    l1_size = max(1, -(-size // (cluster * (cluster // 8))))
    l1_clusters = -(-l1_size * 8 // cluster)
    used = 3 + l1_clusters
    if used > cluster // 2:
        raise DriverError(f"a disk of {size} bytes is too large")
    extensions = b""
    name = os.fsencode(backing) if backing else b""
    if backing:
        if backing_format not in ("raw", "qcow2"):
            raise DriverError(f"the base image {backing} has no checked format")
        fmt = backing_format.encode()
        extensions += struct.pack(">II", 0xE2792ACA, len(fmt)) + fmt + b"\0" * (-len(fmt) % 8)
    extensions += struct.pack(">II", 0, 0)
    header_length = 104
    backing_offset = header_length + len(extensions) if backing else 0
    if backing_offset + len(name) > cluster:
        raise DriverError("the base image's path is too long")
    header = struct.pack(">4sIQIIQIIQQIIQQQQII", b"QFI\xfb", 3, backing_offset, len(name),
                         cluster_bits, size, 0, l1_size, 3 * cluster, cluster, 1, 0, 0,
                         0, 0, 0, 4, header_length)
    part = path + ".part"
    with open(part, "wb") as f:
        f.write(header + extensions + name)
        f.seek(cluster)
        f.write(struct.pack(">Q", 2 * cluster))
        f.seek(2 * cluster)
        f.write(struct.pack(">H", 1) * used)
        f.truncate(used * cluster)
    os.replace(part, path)


QEMU_CONF = "/etc/libvirt/qemu.conf"


def passable_for(directory, uid, gid):
    """DriverError unless this user can pass through the directory and all above it."""
    path = os.path.abspath(directory)
    while True:
        st = os.stat(path)
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            raise DriverError(f"QEMU (uid {uid}) cannot reach the instances directory "
                              f"through {path}: chmod o+x {path}")
        if path == os.path.dirname(path):
            return
        path = os.path.dirname(path)


def qemu_conf_owner(path):
    """(uid, gid) of the user and group libvirt's qemu.conf runs QEMU as (names or +N
    numbers); None when the file does not say, or names someone unknown here."""
    import grp
    import pwd
    found = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                match = re.match(r'\s*(user|group)\s*=\s*"([^"]*)"', line)
                if match:
                    found[match.group(1)] = match.group(2)
    except OSError:
        return None
    if "user" not in found:
        return None
    try:
        user = found["user"]
        entry = None if user.startswith("+") else pwd.getpwnam(user)
        uid = int(user[1:]) if entry is None else entry.pw_uid
        group = found.get("group")
        if group is None:
            gid = entry.pw_gid if entry is not None else uid
        else:
            gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        return None
    return uid, gid


def qcow2_backing_format(path):
    """The backing file's format a qcow2 image names in its header extension, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head[:4] != b"QFI\xfb" or len(head) < 104:
        return None
    offset = 72 if int.from_bytes(head[4:8], "big") == 2 else \
        int.from_bytes(head[100:104], "big")
    while offset + 8 <= len(head):
        kind, length = struct.unpack(">II", head[offset:offset + 8])
        if kind == 0:
            return None
        if kind == 0xE2792ACA:
            return head[offset + 8:offset + 8 + length].decode("ascii", "replace")
        offset += 8 + length + (-length % 8)
    return None


def chain_format(top, target):
    """The format the qcow2 chain from top records for the file target (in the header of
    the file that has target as its backing file), or None where none records it."""
    path, seen = top, set()
    while path and path not in seen:
        seen.add(path)
        below = qcow2_backing(path)
        if below and os.path.basename(below) == os.path.basename(target):
            return qcow2_backing_format(path)
        path = below
    return None


def disk_chain(paths, roots):
    """These disk files and the backing files their qcow2 headers name, which must all
    lie in minivan's own directories (roots): DriverError for any other file."""
    inside = [os.path.realpath(root) for root in roots]
    files = []
    for path in paths:
        while path and path not in files:
            real = os.path.realpath(path)
            if not any(os.path.commonpath([real, root]) == root for root in inside):
                raise DriverError(f"{path} is not in minivan's instances directory or image "
                                  "cache: it is not given to QEMU")
            files.append(path)
            path = qcow2_backing(path)
    return files


def qcow2_backing(path):
    """The backing file a qcow2 image names (header bytes 8-19), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
            if head[:4] != b"QFI\xfb" or len(head) < 20:
                return None
            offset = int.from_bytes(head[8:16], "big")
            size = int.from_bytes(head[16:20], "big")
            if not offset or not 0 < size < 4096:
                return None
            f.seek(offset)
            name = f.read(size).decode("utf-8", "replace")
    except OSError:
        return None
    return os.path.join(os.path.dirname(path), name)


def disk_layout(server):
    """[(file name, target, size for qemu-img)] of a server's disks, root first.

    Blank local block device mappings (server['local_disks'], GB) replace the flavor's
    ephemeral disk; a swap mapping (server['swap_mb']) replaces the flavor's swap."""
    flavor = server["flavor"]
    layout = [(None, None) if server.get("volume_backed") else ("disk", None)]
    local = server.get("local_disks") or []
    if local:
        layout += [(f"disk.eph{i}", "%dG" % size) for i, size in enumerate(local)]
    elif flavor.get("ephemeral"):
        layout.append(("disk.eph0", "%dG" % flavor["ephemeral"]))
    swap = server.get("swap_mb", flavor.get("swap"))
    if swap:
        layout.append(("disk.swap", "%dM" % swap))
    return [(name, "vd" + chr(ord("a") + i), size) for i, (name, size) in enumerate(layout)
            if name is not None]


def server_disks(instance_dir, server):
    """The (path, target, format) list of the server's disks."""
    return [(os.path.join(instance_dir, name), target, "qcow2")
            for name, target, _ in disk_layout(server)]


def create_server_disks(instance_dir, base, server):
    """The root overlay on the checked base image (base: (path, format) of image_base;
    none for a volume-backed server), plus ephemeral and swap disks."""
    os.makedirs(instance_dir, mode=0o700, exist_ok=True)
    flavor = server["flavor"]
    root = os.path.join(instance_dir, "disk")
    if server.get("volume_backed"):
        pass
    elif base:
        # the overlay at the flavor's size or the image's, the larger
        size = max(flavor["disk"] * 2 ** 30, image_virtual_size(*base))
        create_qcow2(root, size, *base)
    else:
        create_qcow2(root, max(flavor["disk"], 1) * 2 ** 30)
    create_missing_disks(instance_dir, server)
    return server_disks(instance_dir, server)


def create_missing_disks(instance_dir, server):
    """Blank qcow2 files for the server's ephemeral and swap disks not there yet."""
    for name, _, size in disk_layout(server)[1:]:
        path = os.path.join(instance_dir, name)
        if not os.path.exists(path):
            create_qcow2(path, size)


# § 11 image inspection ----------------------------------------------------------------
#
# An image minivan did not write itself is hostile until its bytes are read: a qcow2
# header can name a backing file or an external data file anywhere on the host, a vmdk
# descriptor can name extents, and bytes that are not what the image's disk_format says
# make QEMU read them as something else.  inspect_image() reads only headers (no
# qemu-img on untrusted files) and says which formats the bytes are and what makes them
# unsafe; check_image() holds an image to its declared disk_format as Nova does before
# a boot; ImageCache keeps images under the hash of their bytes, verified when reused.

INSPECTED_FORMATS = ("raw", "qcow2", "vhd", "vhdx", "vmdk", "vdi", "qed", "iso", "gpt",
                     "luks")
AMI_FORMATS = ("ami", "aki", "ari")
CONVERTED_FORMATS = ("vmdk", "vhd", "vhdx", "vdi")    # booted from a qcow2 copy
QEMU_FORMAT_NAMES = {"vhd": "vpc"}                    # qemu-img names what Glance does not
QCOW2_KNOWN_INCOMPATIBLE = 0b1011     # dirty, corrupt, compression type (bit 2: data file)
VMDK_SAFE_TYPES = ("monolithicsparse", "streamoptimized")
VHDX_METADATA = "8B7CA206-4790-4B9A-B8FE-575F050F886E"
VHDX_VIRTUAL_SIZE = "2FA54224-CD1B-4876-B211-5DBED83BF4B8"
VHDX_PARENT_LOCATOR = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C"


class ImageUnacceptable(DriverError):
    """Nova's ImageUnacceptable: this host will not boot the image."""

    def __init__(self, image_id, reason):
        super().__init__(f"Image {image_id} is unacceptable: {reason}")
        self.image_id, self.reason = image_id, reason


class ImageFormatError(Exception):
    """Bytes that start like a format but do not parse as it."""


class Inspection:
    """What an image file's bytes are: format (the one format, 'raw' when nothing more
    specific matched, None when several did), formats (every match), virtual_size,
    problems (why it is unsafe; empty when safe) and error (why no one format)."""

    def __init__(self, formats, size, virtual_sizes, problems):
        self.formats = sorted(formats) or ["raw"]
        self.error = None
        if set(self.formats) == {"iso", "gpt"}:      # a bootable ISO's hybrid MBR
            self.formats = ["iso"]
        if len(self.formats) > 1:
            self.error = "Multiple formats detected: " + ",".join(self.formats)
        self.format = None if self.error else self.formats[0]
        self.virtual_size = virtual_sizes.get(self.format) or size
        self.problems = problems.get(self.format, []) if self.format else []
        self.truncated_qcow2 = False       # a qcow2 magic on too few bytes to be one

    @property
    def safe(self):
        return self.format is not None and not self.problems


class ImageReader:
    """Random access to the first bytes of a file, read once in 1 MiB pieces."""

    def __init__(self, f, size):
        self.f, self.size, self.pieces = f, size, {}

    def read(self, offset, length):
        out = b""
        while length > 0 and offset < self.size:
            piece, within = divmod(offset, 1 << 20)
            if piece not in self.pieces:
                self.f.seek(piece << 20)
                self.pieces[piece] = self.f.read(1 << 20)
            chunk = self.pieces[piece][within:within + length]
            if not chunk:
                break
            out += chunk
            offset, length = offset + len(chunk), length - len(chunk)
        return out


def inspect_qcow2(r):
    head = r.read(0, 512)
    if head[:4] != b"QFI\xfb":
        return None
    if len(head) < 512:         # raw, to Glance and Nova; check_image refuses it
        return None
    version, backing, _, _, size = struct.unpack(">IQIIQ", head[4:32])
    problems = []
    if backing:
        problems.append("Image has a backing file")
    if version == 3:
        incompatible = int.from_bytes(head[72:80], "big")
        if incompatible & 0b100:
            problems.append("Image has data_file set")
        if incompatible & ~(QCOW2_KNOWN_INCOMPATIBLE | 0b100):
            problems.append("Unknown QCOW2 features found")
    elif version != 2:
        problems.append("Unsupported qcow2 version")
    return size, problems


def inspect_qed(r):
    head = r.read(0, 512)
    if head[:4] != b"QED\0" or len(head) < 512:
        return None
    return int.from_bytes(head[48:56], "little"), ["This file format is not allowed"]


def inspect_vhd(r):
    head = r.read(0, 512)
    if not head.startswith(b"conectix"):
        return None
    if len(head) < 512:
        return 0, ["Incomplete file"]
    return int.from_bytes(head[48:56], "big"), []


def vhdx_guid(raw):
    a, b, c = struct.unpack("<IHH", raw[:8])
    return "%08X-%04X-%04X-%s-%s" % (a, b, c, raw[8:10].hex().upper(), raw[10:16].hex().upper())


def inspect_vhdx(r):
    if not r.read(0, 8) == b"vhdxfile":
        return None
    table = r.read(192 << 10, 64 << 10)
    if len(table) < 64 << 10:
        return 0, ["Incomplete file"]
    if table[:4] != b"regi":
        raise ImageFormatError("VHDX region table signature not found")
    count = int.from_bytes(table[8:12], "little")
    if count >= 2048:
        raise ImageFormatError("VHDX region count over 2047")
    entries = [table[16 + 32 * i:48 + 32 * i] for i in range(count)]
    meta = next((int.from_bytes(e[16:24], "little") for e in entries
                 if len(e) == 32 and vhdx_guid(e[:16]) == VHDX_METADATA), None)
    if meta is None:
        return 0, []
    region = r.read(meta, 32 * 2048)
    if region[:8] != b"metadata":
        raise ImageFormatError("VHDX metadata signature not found")
    items = int.from_bytes(region[10:12], "little")
    found, problems = 0, []
    for i in range(min(items, 2047)):
        entry = region[32 + 32 * i:64 + 32 * i]
        guid = vhdx_guid(entry[:16]) if len(entry) == 32 else None
        if guid == VHDX_VIRTUAL_SIZE:
            offset = int.from_bytes(entry[16:20], "little")
            found = int.from_bytes(r.read(meta + offset, 8), "little")
        elif guid == VHDX_PARENT_LOCATOR:
            problems.append("Image names a parent disk")
    return found, problems


def inspect_vdi(r):
    head = r.read(0, 512)
    if len(head) < 512 or int.from_bytes(head[0x40:0x44], "little") != 0xBEDA107F:
        return None
    return int.from_bytes(head[0x170:0x178], "little"), []


def inspect_iso(r):
    descriptor = r.read(32 << 10, 2 << 10)
    if len(descriptor) < 2048 or descriptor[1:6] not in (b"CD001", b"NSR02", b"NSR03"):
        return None
    if descriptor[0] != 1:
        return 0, []
    blocks = int.from_bytes(descriptor[80:84], "little")
    return blocks * int.from_bytes(descriptor[128:130], "little"), []


def inspect_gpt(r):
    """A partition table (MBR, or GPT's protective MBR) at the start of a raw disk."""
    mbr = r.read(0, 512)
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        return None
    if mbr[0x10] == 2 and mbr[0x15] == 0xF8:      # a FAT file system's boot sector
        return None
    problems, used, gpt = [], [], False
    for i in range(4):
        entry = mbr[446 + 16 * i:462 + 16 * i]
        if entry[0] not in (0x00, 0x80):
            problems.append(f"MBR PTE {i} has invalid boot flag")
            break
        if entry[4]:
            used.append(i)
        if entry[4] == 0xEE:
            gpt = True
            if entry[1:4] != b"\x00\x02\x00":
                problems.append("GPT MBR has invalid start CHS")
                break
            if int.from_bytes(entry[8:12], "little") != 1:
                problems.append("GPT MBR has invalid start LBA")
                break
    if not problems and gpt and used != [0]:
        problems.append("GPT MBR defines invalid extra partitions")
    if not problems and not used:
        problems.append("GPT MBR has no partitions defined")
    return 0, problems


def inspect_luks(r):
    head = r.read(0, 8)
    if head[:6] != b"LUKS\xba\xbe":
        return None
    return 0, ["Encrypted images are not supported"]


def vmdk_descriptor(r):
    """(descriptor text, lowercased, or None; the sparse header's fields or None)."""
    head = r.read(0, 512)
    if len(head) < 64:
        return None, None
    if head[:4] != b"KDMV":
        try:
            text = head.decode("ascii")
        except UnicodeDecodeError:
            return None, None
        if not all(c.isprintable() or c.isspace() for c in text):
            return None, None
        data, header = r.read(0, 4096), None          # a descriptor file alone
    else:
        header = struct.unpack("<4sIIQQQQIQQ", head[:64])
        if header[1] not in (1, 2, 3):
            raise ImageFormatError("unsupported VMDK version")
        if header[5] * 512 != 512:
            raise ImageFormatError("VMDK descriptor in the wrong place")
        wanted = min(header[6] * 512, (1 << 20) - 1)
        data = r.read(512, wanted)
        if len(data) < wanted:
            return None, header
    data = data.split(b"\0", 1)[0]
    try:
        return data.decode("ascii").lower(), header
    except UnicodeDecodeError:
        return None, header


def inspect_vmdk(r):
    text, header = vmdk_descriptor(r)
    kind = None
    if text is not None:
        found = re.search(r'createtype="([^"]{0,63})"', text)
        kind = found.group(1) if found else None
    if header is None and kind is None:
        return None
    problems = []
    if text is None:
        problems.append("No descriptor found")      # or an incomplete one
    elif kind not in VMDK_SAFE_TYPES:
        problems.append("Unsupported subformat")
    else:
        extents = []
        for line in (x.strip() for x in text.split("\n")):
            if not line or line.startswith("#") or line.startswith("ddb"):
                continue
            if "=" in line and " " not in line.split("=")[0]:
                continue
            if line.split(" ")[0] not in ("rw", "rdonly", "noaccess"):
                problems.append("Invalid VMDK descriptor data")
                break
            extents.append(line)
        if not problems and any("/" in line for line in extents):
            problems.append("Invalid extent filenames found")
        elif not problems and not extents:
            problems.append("No extents found")
    if header is None and not problems:
        problems.append("A VMDK descriptor without its data")     # minivan's own rule
    if header is not None and header[9] == 0xFFFFFFFFFFFFFFFF and not problems:
        problems += vmdk_footer_problems(r, header)
    sectors = header[3] if header is not None else 0
    return (sectors * 512 if kind in VMDK_SAFE_TYPES else 0), problems


def vmdk_footer_problems(r, header):
    """A streamOptimized vmdk's footer must repeat its header, then end the stream."""
    if r.size < 1536 + 512:
        return ["Footer marker is invalid"]
    tail = r.read(r.size - 1536, 1536)
    footer = struct.unpack("<4sIIQQQQIQQ", tail[512:576])
    if footer[0] != header[0] or footer[1] != header[1]:
        return ["Header and footer do not match"]
    if footer[5:7] != header[5:7]:
        return ["Footer specifies a different descriptor than header"]
    if footer[9] == 0xFFFFFFFFFFFFFFFF:
        return ["Footer indicates another footer"]
    zero = b"\0" * 496
    _, size, kind = struct.unpack("<QII", tail[:16])
    if size or kind != 3 or tail[16:512] != zero:
        return ["Footer marker is invalid"]
    value, size, kind = struct.unpack("<QII", tail[1024:1040])
    if value or size or kind or tail[1040:1536] != zero:
        return ["End-of-stream marker is invalid"]
    return []


INSPECTORS = {"qcow2": inspect_qcow2, "qed": inspect_qed, "vhd": inspect_vhd,
              "vhdx": inspect_vhdx, "vdi": inspect_vdi, "iso": inspect_iso,
              "gpt": inspect_gpt, "luks": inspect_luks, "vmdk": inspect_vmdk}


def inspect_image(path):
    """The Inspection of an image file, from its headers alone."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        r = ImageReader(f, size)
        formats, sizes, problems = [], {}, {}
        for name, inspect in INSPECTORS.items():
            try:
                found = inspect(r)
            except (ImageFormatError, struct.error, IndexError) as e:
                LOG.debug("%s: not %s (%s)", path, name, e)
                continue
            if found is not None:
                formats.append(name)
                sizes[name], problems[name] = found
        inspection = Inspection(formats, size, sizes, problems)
        inspection.truncated_qcow2 = size < 512 and r.read(0, 4) == b"QFI\xfb"
    return inspection


def check_image(image, inspection, max_virtual_size):
    """The format QEMU (or qemu-img convert) reads the image as, once its bytes agree
    with its disk_format and are safe: Nova's checks before a boot, plus a size limit
    and a truncated qcow2 header refused (minivan's own).  ImageUnacceptable if not."""
    declared = image.get("disk_format")
    image_id = image["id"]
    if declared not in AMI_FORMATS and declared not in INSPECTED_FORMATS:
        raise ImageUnacceptable(image_id, "Image not in a supported format")
    if inspection.format is None:
        raise ImageUnacceptable(image_id, "Image content does not match disk_format")
    if inspection.truncated_qcow2:          # minivan's own rule: QEMU would not read it
        raise ImageUnacceptable(image_id, "Image has a truncated qcow2 header")
    if inspection.problems:
        LOG.error("image %s failed its safety check: %s", image_id,
                  "; ".join(inspection.problems))
        raise ImageUnacceptable(image_id, "Image does not pass safety check")
    found = inspection.format
    if declared in AMI_FORMATS:
        ok = found in ("raw", "gpt", "iso")
    else:
        ok = found == declared or (declared == "raw" and found == "gpt")
    if not ok:
        LOG.warning("image %s is declared %s but its bytes are %s", image_id, declared, found)
        raise ImageUnacceptable(image_id, "Image content does not match disk_format")
    if inspection.virtual_size > max_virtual_size:
        raise ImageUnacceptable(image_id, f"Image virtual size {inspection.virtual_size} is "
                                          f"over this host's limit of {max_virtual_size}")
    if found in ("qed", "luks"):
        raise ImageUnacceptable(image_id, f"Image format {found} is not supported")
    return "qcow2" if found == "qcow2" else found if found in CONVERTED_FORMATS else "raw"


class ImageCache:
    """_base/: image bytes named by their sha512 (sha512-HEX), never by an image id a
    user can choose or predict; a file is hashed again when reused if it changed since
    this process last hashed it.  Images booted from a converted copy keep it beside
    (HEX.qcow2, minivan's own file, with its own hash in HEX.qcow2.sha512)."""

    def __init__(self, directory):
        self.dir = directory
        self.locks = collections.defaultdict(threading.Lock)
        self.verified = {}                # path -> the stat of the bytes last hashed

    def path(self, digest):
        return os.path.join(self.dir, "sha512-" + digest)

    def lock(self, key):
        return self.locks[key]

    @staticmethod
    def _stat(path):
        st = os.stat(path)
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def lookup(self, digest):
        """The cached file of these bytes, verified; None when absent (or wrong: removed)."""
        if not digest or not re.match(r"^[0-9a-f]{128}$", digest):
            return None
        path = self.path(digest)
        return path if self.verify(path, digest) else None

    def verify(self, path, digest):
        try:
            if self.verified.get(path) == self._stat(path):
                return True
            got = file_sha512(path)
        except OSError:
            return False
        if got != digest:
            LOG.error("cached image %s does not hold the bytes its name says: removed", path)
            remove_quietly(path)
            return False
        self.verified[path] = self._stat(path)
        return True

    def store(self, image_id, produce, checks=(), size=None):
        """Cache the bytes produce(write) writes; checks: [(algo, hex)] they must match,
        size: their length.  Returns the path.  Nothing partial is ever left behind."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        sha512 = hashlib.sha512()
        others = [(hashlib.new(algo), value) for algo, value in checks
                  if value and algo != "sha512"]
        got = [0]
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".fetch-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                def write(chunk):
                    sha512.update(chunk)
                    for digest, _ in others:
                        digest.update(chunk)
                    got[0] += len(chunk)
                    try:
                        f.write(chunk)
                    except OSError as e:     # this host's fault, not the source's
                        raise DriverError(f"writing image {image_id} failed: "
                                          f"{e.strerror or e}") from None
                produce(write)
                f.flush()
                os.fsync(f.fileno())
            wanted = [value for algo, value in checks if value and algo == "sha512"]
            if size and got[0] != size:
                raise DriverError(f"downloading image {image_id} failed "
                                  f"({got[0]} of {size} bytes)")
            if any(sha512.hexdigest() != v for v in wanted) or \
                    any(d.hexdigest() != v for d, v in others):
                raise DriverError(f"image {image_id} does not match its checksum")
            path = self.path(sha512.hexdigest())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
            fsync_directory(self.dir)
        finally:
            remove_quietly(tmp)
        self.verified[path] = self._stat(path)
        return path

    def boot_form(self, image, path, max_virtual_size):
        """(path, 'raw' or 'qcow2') of what a disk of this image stands on: the cached
        bytes once check_image passes, or their qcow2 conversion (vmdk, vhd, vhdx, vdi)."""
        fmt = check_image(image, inspect_image(path), max_virtual_size)
        if fmt in ("raw", "qcow2"):
            return path, fmt
        converted = path + ".qcow2"
        with self.lock(converted):
            try:
                with open(converted + ".sha512", encoding="ascii") as f:
                    digest = f.read().strip()
            except OSError:
                digest = None
            if digest and self.verify(converted, digest):
                return converted, "qcow2"
            tmp = os.path.join(self.dir, "." + os.path.basename(converted) + ".part")
            try:
                qemu_img("convert", "-q", "-f", QEMU_FORMAT_NAMES.get(fmt, fmt), "-O", "qcow2",
                         path, tmp)
                check = inspect_image(tmp)
                if check.format != "qcow2" or not check.safe:
                    raise ImageUnacceptable(image["id"], "Converted to qcow2, but format is "
                                                         f"now {check.format}")
                digest = file_sha512(tmp)
                os.chmod(tmp, 0o600)
                os.replace(tmp, converted)
                write_private(converted + ".sha512", digest + "\n")
                fsync_directory(self.dir)
            except DriverError as e:
                if isinstance(e, ImageUnacceptable):
                    raise
                raise ImageUnacceptable(image["id"], f"Unable to convert image to qcow2: "
                                                     f"{e}") from None
            finally:
                remove_quietly(tmp)
            self.verified[converted] = self._stat(converted)
            return converted, "qcow2"


def file_sha512(path):
    digest = hashlib.sha512()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_base(app, image):
    """(path, format) of the checked base a server's disk of this image stands on: the
    image's bytes fetched into the cache by its source, then checked (and converted)."""
    cache = app.image_cache
    path = app.images.fetch(image, cache)
    return cache.boot_form(image, path, app.conf["image_max_virtual_size"])


# § 12 images --------------------------------------------------------------------------
#
# The image source seam.  LocalImages serves the images directory: every image file
# there is an image, with an id drawn at random when it is first seen (never one an
# image has or had); a sidecar FILE.json may name it and set its disk_format,
# min_disk/min_ram and properties.  The directory's images are the operator's (owned by
# no project).  Snapshots and uploads are written there too.  Either source's fetch()
# puts an image's bytes into the ImageCache of §10, checked against their hash.

IMAGE_SUFFIXES = (".qcow2", ".img", ".raw", ".qcow", ".iso", ".vmdk", ".vhd", ".vhdx", ".vdi")
LOCAL_IMAGE_FORMATS = {".qcow2": "qcow2", ".raw": "raw"}
IMAGE_NAMESPACE = uuid.UUID("5b0f2c1e-6f55-4b8e-9d6f-6d696e697661")   # minivan's uuid5 ids


class LocalImages:
    """Images kept as files in one directory, with their records in the state."""

    def __init__(self, directory, store, clock):
        self.dir = directory
        self.store = store
        self.clock = clock
        self.lock = threading.Lock()

    def scan(self):
        """Register new files and forget records whose file is gone."""
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            names = []
        with self.lock:
            known = {img["file"]: img for img in self.store.data["images"].values()
                     if img.get("file")}
            ops = []
            taken = set(self.store.data["images"]) | set(self.store.data["deleted_images"])
            for name in names:
                path = os.path.join(self.dir, name)
                if not name.endswith(IMAGE_SUFFIXES) or name in known \
                        or not os.path.isfile(path):
                    continue
                record = self._record_for(name, path, taken)
                taken.add(record["id"])
                ops.append(["set", ["images", record["id"]], record])
            present = set(names)
            for image_id, img in self.store.data["images"].items():
                if img.get("file") not in present and img.get("status") == "active":
                    ops += [["del", ["images", image_id]],
                            ["set", ["deleted_images", image_id], isotime(self.clock.now())]]
            if ops:
                self.store.commit(ops)

    def _record_for(self, name, path, taken):
        """A new file's record.  Its id is the sidecar's, else a random one (never one
        an image has or had: taken); its disk_format is the sidecar's, else that of its
        extension (.qcow2, .raw), else none (it will not boot until a sidecar says)."""
        sidecar = {}
        try:
            with open(path + ".json", encoding="utf-8") as f:
                sidecar = json.load(f)
        except (OSError, ValueError):
            sidecar = {}
        if not isinstance(sidecar, dict):
            sidecar = {}
        mtime = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
        stamp = isotime_us(mtime.replace(tzinfo=None))
        image_id = str(sidecar.get("id") or "")
        if not is_uuid_like(image_id) or image_id in taken:
            if image_id:
                LOG.warning("image file %s: its sidecar's id %s is taken or not a UUID; "
                            "it gets a new one", name, image_id)
            image_id = str(uuid.uuid4())
        disk_format = sidecar.get("disk_format") or LOCAL_IMAGE_FORMATS.get(
            os.path.splitext(name)[1])
        if disk_format not in DISK_FORMATS:
            LOG.warning("image file %s has no disk_format: give it a sidecar %s.json with "
                        '"disk_format" (e.g. qcow2, raw, iso)', name, name)
            disk_format = None
        return {
            "id": image_id,
            "name": str(sidecar.get("name") or name.rsplit(".", 1)[0]), "file": name,
            "disk_format": disk_format, "container_format": "bare",
            "size": os.path.getsize(path), "status": "active",
            "visibility": sidecar.get("visibility", "public"), "owner": sidecar.get("owner"),
            "min_disk": int(sidecar.get("min_disk", 0)), "min_ram": int(sidecar.get("min_ram", 0)),
            "properties": {str(k): str(v) for k, v in (sidecar.get("properties") or {}).items()},
            "os_hash_algo": None, "os_hash_value": None,
            "created_at": stamp, "updated_at": stamp,
        }

    def list(self):
        self.scan()
        with self.store.reading():
            return sorted(self.store.data["images"].values(),
                          key=lambda i: (i["created_at"], i["id"]), reverse=True)

    def get(self, image_id):
        image = self.store.data["images"].get(image_id)
        if image is None:
            self.scan()
            image = self.store.data["images"].get(image_id)
        return image

    def visible(self, image, ident):
        return image["visibility"] in ("public", "community") or ident.is_admin \
            or image.get("owner") == ident.project_id

    def path(self, image):
        return os.path.join(self.dir, image["file"])

    def fetch(self, image, cache):
        """The image's bytes in the image cache (an ImageCache), copied once; a copy
        whose hash is not the image's is refused."""
        known = image.get("os_hash_value") if image.get("os_hash_algo") == "sha512" else None
        with cache.lock(image["id"]):
            found = cache.lookup(known)
            if found:
                return found

            def copy(write):
                try:
                    with open(self.path(image), "rb") as src:
                        for chunk in iter(lambda: src.read(1 << 20), b""):
                            write(chunk)
                except OSError as e:
                    raise DriverError(f"cannot copy image {image['id']}: {e}") from None
            path = cache.store(image["id"], copy, [("sha512", known)])
            if not known:
                digest = os.path.basename(path)[len("sha512-"):]
                self.store.commit([["set", ["images", image["id"], "os_hash_algo"], "sha512"],
                                   ["set", ["images", image["id"], "os_hash_value"], digest]])
            return path

    def reserve_snapshot(self, name, owner, properties, min_disk, min_ram):
        """A 'queued' record for a snapshot still being written (no file yet)."""
        image_id = str(uuid.uuid4())
        now = isotime_us(self.clock.now())
        record = {"id": image_id, "name": name, "file": f"{image_id}.qcow2",
                  "disk_format": "qcow2", "container_format": "bare", "size": 0,
                  "status": "queued", "visibility": "private", "owner": owner,
                  "min_disk": min_disk, "min_ram": min_ram, "properties": properties,
                  "os_hash_algo": None, "os_hash_value": None, "created_at": now,
                  "updated_at": now}

        def plan(data):
            record["sequence"] = data["counters"].get("image", 0) + 1
            return [["set", ["images", image_id], record],
                    ["set", ["counters", "image"], record["sequence"]]]
        self.store.transaction(plan)
        return record

    def finish_snapshot(self, record, source_disk):
        """Write the disk into the reserved image's file; it is active only once the file
        and its directory entry are on disk."""
        path = os.path.join(self.dir, record["file"])
        tmp = os.path.join(self.dir, "." + record["file"] + ".part")
        os.makedirs(self.dir, exist_ok=True)
        try:
            if source_disk and os.path.exists(source_disk):
                qemu_img("convert", "-q", "-U", "-O", "qcow2", source_disk, tmp)
            else:
                qemu_img("create", "-q", "-f", "qcow2", tmp, "1G")
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_directory(self.dir)
        finally:
            remove_quietly(tmp)
        self.store.commit([["set", ["images", record["id"]], dict(
            record, status="active", size=os.path.getsize(path),
            updated_at=isotime_us(self.clock.now()))]])

    def create_empty(self, name, owner, properties):
        """An active image with no data, for a volume-backed server's snapshot."""
        record = self.reserve_image(str(uuid.uuid4()), name, owner, properties, 0, 0,
                                    visibility="private", disk_format="raw",
                                    container_format="bare")
        return self.store_upload(record, iter(()))

    def reserve_image(self, image_id, name, owner, properties, min_disk, min_ram,
                      visibility="shared", disk_format=None, container_format=None, tags=(),
                      protected=False):
        """A queued image record (Glance's POST /v2/images); data comes with store_upload."""
        now = isotime_us(self.clock.now())
        record = {"id": image_id, "name": name, "file": None, "disk_format": disk_format,
                  "container_format": container_format, "size": 0, "status": "queued",
                  "visibility": visibility, "owner": owner, "min_disk": min_disk,
                  "min_ram": min_ram, "properties": properties, "tags": list(tags),
                  "protected": protected, "checksum": None, "os_hash_algo": None,
                  "os_hash_value": None, "created_at": now, "updated_at": now}
        self.store.commit([["set", ["images", image_id], record]])
        return record

    def update_image(self, image, changes, properties):
        record = dict(image, properties=properties, updated_at=isotime_us(self.clock.now()),
                      **changes)
        self.store.commit([["set", ["images", image["id"]], record]])
        return record

    def store_upload(self, image, stream, check=None):
        """Write uploaded image data into the directory, with its checksums; then active,
        once the file and its directory entry are on disk.  check(path) may look at the
        bytes first: it returns changes to the record, or raises to refuse them (the
        image is queued again and nothing is kept)."""
        os.makedirs(self.dir, exist_ok=True)
        tmp = os.path.join(self.dir, f".{image['id']}.part")
        md5, sha512, size = hashlib.md5(usedforsecurity=False), hashlib.sha512(), 0
        fmt = image.get("disk_format")
        filename = image["id"] + (f".{fmt}" if fmt in ("qcow2", "raw") else ".img")
        self.store.commit([["set", ["images", image["id"], "status"], "saving"]])
        try:
            with open(tmp, "wb") as f:
                for chunk in stream:
                    md5.update(chunk)
                    sha512.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            changes = check(tmp) if check else {}
            os.replace(tmp, os.path.join(self.dir, filename))
            fsync_directory(self.dir)
        except OSError as e:
            self.store.commit([["set", ["images", image["id"], "status"], "queued"]])
            raise Unavailable(f"cannot store the image data: {e}") from None
        except BaseException:
            self.store.commit([["set", ["images", image["id"], "status"], "queued"]])
            raise
        finally:
            remove_quietly(tmp)
        record = dict(image, file=filename, status="active", size=size,
                      container_format=image.get("container_format") or "bare",
                      checksum=md5.hexdigest(), os_hash_algo="sha512",
                      os_hash_value=sha512.hexdigest(), updated_at=isotime_us(self.clock.now()),
                      **changes)
        self.store.commit([["set", ["images", image["id"]], record]])
        return record

    def forget_partial_uploads(self):
        """At start: uploads a crash cut off are queued again, their partial files gone."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            names = []
        for name in names:
            if name.startswith(".") and name.endswith(".part"):
                remove_quietly(os.path.join(self.dir, name))
        ops = [["set", ["images", image_id, "status"], "queued"]
               for image_id, img in self.store.data["images"].items()
               if img.get("status") == "saving"]
        if ops:
            self.store.commit(ops)

    def delete(self, image):
        """Forget the image; its id stays taken (as Glance keeps deleted rows)."""
        if image.get("file"):
            for path in (self.path(image), self.path(image) + ".json"):
                remove_quietly(path)
        self.store.commit([["del", ["images", image["id"]]],
                           ["set", ["deleted_images", image["id"]],
                            isotime(self.clock.now())]])

    def taken(self, image_id):
        """True when an image has or had this id."""
        return image_id in self.store.data["images"] or \
            image_id in self.store.data["deleted_images"]

    def set_properties(self, image, properties):
        self.store.commit([["set", ["images", image["id"], "properties"], properties]])


class GlanceImages:
    """Images kept in a real Glance (v2), found in the Keystone catalog or --glance-url.

    Calls use minivan's service token (an admin of the service project), so background
    work (downloads, snapshot uploads) never depends on a caller's token; minivan itself
    applies Glance's visibility rules to the caller."""

    CORE = ("id", "name", "status", "visibility", "protected", "os_hidden", "checksum",
            "os_hash_algo", "os_hash_value", "min_ram", "min_disk", "size", "virtual_size",
            "disk_format", "container_format", "owner", "created_at", "updated_at", "tags",
            "self", "file", "schema", "direct_url", "locations", "stores")

    def __init__(self, url, auth, clock):
        self.url = url.rstrip("/")
        self.auth = auth
        self.clock = clock

    # -- HTTP -------------------------------------------------------------------
    def _request(self, method, path, body=None, headers=None, data=None, stream_to=None):
        """(status, parsed JSON or None); stream_to=callable(chunk) receives a download."""
        for attempt in (0, 1):
            hdrs = {"X-Auth-Token": self.auth.service_token_value(force=attempt == 1),
                    "Accept": "application/json"}
            hdrs.update(headers or {})
            payload = data
            if body is not None:
                payload = json_bytes(body)
                hdrs.setdefault("Content-Type", "application/json")
            request = urllib.request.Request(self.url + path, data=payload, method=method,
                                             headers=hdrs)
            try:
                with urllib.request.urlopen(request, timeout=600) as resp:
                    if stream_to is not None:
                        for chunk in iter(lambda: resp.read(1 << 20), b""):
                            stream_to(chunk)
                        return resp.status, None
                    raw = resp.read()
                    return resp.status, json.loads(raw) if raw else None
            except urllib.error.HTTPError as e:
                e.read()
                if e.code == 401 and attempt == 0:
                    continue
                return e.code, None
            except (OSError, ValueError, http.client.HTTPException) as e:
                LOG.error("Glance at %s is unreachable: %s", self.url, e)
                raise Unavailable("The image service is unreachable.") from None
        return 401, None

    def record(self, doc):
        """Glance's image JSON in the form minivan keeps image records."""
        def stamp(text):
            parsed = parse_keystone_time(text)
            return isotime_us(parsed) if parsed else isotime_us(self.clock.now())
        return {"id": doc["id"], "name": doc.get("name"), "file": None,
                "disk_format": doc.get("disk_format"),
                "container_format": doc.get("container_format"), "size": doc.get("size") or 0,
                "status": doc.get("status"), "visibility": doc.get("visibility", "shared"),
                "owner": doc.get("owner"), "min_disk": doc.get("min_disk") or 0,
                "min_ram": doc.get("min_ram") or 0, "checksum": doc.get("checksum"),
                "os_hash_algo": doc.get("os_hash_algo"),
                "os_hash_value": doc.get("os_hash_value"), "tags": doc.get("tags", []),
                "protected": doc.get("protected", False),
                "created_at": stamp(doc.get("created_at")),
                "updated_at": stamp(doc.get("updated_at")),
                "properties": {k: "" if v is None else str(v) for k, v in doc.items()
                               if k not in self.CORE}}

    # -- the image source seam ----------------------------------------------------
    def scan(self):
        return None

    def list(self):
        images, path = [], "/v2/images?limit=1000"
        while path:
            status, doc = self._request("GET", path)
            if status != 200:
                raise Unavailable(f"The image service answered {status} to a list.")
            images += [self.record(i) for i in doc.get("images", [])]
            path = doc.get("next")
        return images

    def get(self, image_id):
        if not re.match(r"^[0-9a-fA-F-]{32,36}$", image_id or ""):
            return None
        status, doc = self._request("GET", "/v2/images/" + image_id)
        if status == 404:
            return None
        if status != 200:
            raise Unavailable(f"The image service answered {status}.")
        return self.record(doc)

    def visible(self, image, ident):
        return image["visibility"] in ("public", "community") or ident.is_admin \
            or image.get("owner") == ident.project_id

    def path(self, image):
        raise NotFound("Image data lives in the image service.")

    def fetch(self, image, cache):
        """Download once into the image cache (an ImageCache), checking Glance's hash
        and size."""
        algo = image.get("os_hash_algo") if image.get("os_hash_value") else None
        checks = [(algo, image["os_hash_value"])] if algo else []
        if image.get("checksum"):
            checks.append(("md5", image["checksum"]))
        with cache.lock(image["id"]):
            found = cache.lookup(image["os_hash_value"] if algo == "sha512" else None)
            if found:
                return found

            def download(write):
                status, _ = self._request("GET", f"/v2/images/{image['id']}/file",
                                          stream_to=write)
                if status != 200:
                    raise DriverError(f"downloading image {image['id']} failed (HTTP "
                                      f"{status})")
            return cache.store(image["id"], download, checks, size=image.get("size") or 0)

    def reserve_snapshot(self, name, owner, properties, min_disk, min_ram):
        body = dict(properties, name=name, disk_format="qcow2", container_format="bare",
                    visibility="private", owner=owner, min_disk=min_disk, min_ram=min_ram)
        status, doc = self._request("POST", "/v2/images", body)
        if status != 201:
            raise Unavailable(f"The image service refused the snapshot record ({status}).")
        return self.record(doc)

    def create_empty(self, name, owner, properties):
        """An active image with no data (raw, size 0), as Nova makes for volume-backed
        snapshots: its block_device_mapping property is what boots."""
        body = dict(properties, name=name, disk_format="raw", container_format="bare",
                    visibility="private", owner=owner)
        status, doc = self._request("POST", "/v2/images", body)
        if status != 201:
            raise Unavailable(f"The image service refused the snapshot record ({status}).")
        status, _ = self._request("PUT", f"/v2/images/{doc['id']}/file", data=b"", headers={
            "Content-Type": "application/octet-stream", "Content-Length": "0"})
        if status not in (200, 204):
            raise Unavailable(f"The image service refused the empty image ({status}).")
        return self.record(dict(doc, status="active"))

    def finish_snapshot(self, record, source_disk):
        with tempfile.TemporaryDirectory(dir=os.path.dirname(source_disk) or None) as tmp:
            path = os.path.join(tmp, "snapshot.qcow2")
            qemu_img("convert", "-q", "-U", "-O", "qcow2", source_disk, path)
            with open(path, "rb") as data:
                status, _ = self._request(
                    "PUT", f"/v2/images/{record['id']}/file", data=data,
                    headers={"Content-Type": "application/octet-stream",
                             "Content-Length": str(os.path.getsize(path))})
        if status not in (200, 204):
            raise DriverError(f"uploading the snapshot to the image service failed ({status})")

    def delete(self, image):
        status, _ = self._request("DELETE", "/v2/images/" + image["id"])
        if status not in (204, 404):
            raise Unavailable(f"The image service answered {status} to a delete.")

    def set_properties(self, image, properties):
        ops = [{"op": "remove", "path": "/" + k} for k in image["properties"]
               if k not in properties]
        ops += [{"op": "add", "path": "/" + k, "value": v} for k, v in properties.items()]
        status, _ = self._request(
            "PATCH", "/v2/images/" + image["id"], data=json_bytes(ops),
            headers={"Content-Type": "application/openstack-images-v2.1-json-patch"})
        if status != 200:
            raise BadRequest(f"The image service refused the change ({status}).")


# § 13 image service -------------------------------------------------------------------
#
# Without a Glance anywhere, minivan serves the part of the Glance v2 API the clients use
# over its local image directory, under /image on its own port: versions, the image
# schemas, list (filters, sort, paging), show, create, upload, download, update (JSON
# patch) and delete.

GLANCE_CORE = ("id", "name", "status", "visibility", "protected", "os_hidden", "checksum",
               "os_hash_algo", "os_hash_value", "min_ram", "min_disk", "size", "virtual_size",
               "disk_format", "container_format", "owner", "created_at", "updated_at", "tags",
               "self", "file", "schema")
GLANCE_WRITABLE = {"name", "visibility", "protected", "os_hidden", "min_ram", "min_disk",
                   "disk_format", "container_format", "tags", "id"}
DISK_FORMATS = ("ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso",
                "ploop")
CONTAINER_FORMATS = ("ami", "ari", "aki", "bare", "ovf", "ova", "docker", "compressed")


class GlanceError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code, self.message = code, message


def glance_time(text):
    return isotime(parse_isotime(text)) if text else None


def glance_image_view(image):
    view = {"id": image["id"], "name": image["name"],
            "status": "active" if image["status"] == "active" else image["status"],
            "visibility": image["visibility"], "protected": image.get("protected", False),
            "os_hidden": image.get("os_hidden", False), "checksum": image.get("checksum"),
            "os_hash_algo": image.get("os_hash_algo"), "os_hash_value": image.get("os_hash_value"),
            "min_ram": image["min_ram"], "min_disk": image["min_disk"],
            "size": image["size"] if image["status"] == "active" else None,
            "virtual_size": image.get("virtual_size"), "disk_format": image["disk_format"],
            "container_format": image["container_format"], "owner": image.get("owner"),
            "created_at": glance_time(image["created_at"]),
            "updated_at": glance_time(image["updated_at"]), "tags": list(image.get("tags", [])),
            "self": f"/v2/images/{image['id']}", "file": f"/v2/images/{image['id']}/file",
            "schema": "/v2/schemas/image"}
    for key, value in image["properties"].items():
        view.setdefault(key, value)
    return view


def glance_schema():
    props = {"id": {"type": "string"}, "name": {"type": ["null", "string"], "maxLength": 255},
             "status": {"type": "string", "enum": ["queued", "saving", "active", "killed",
                                                   "deleted", "uploading", "importing",
                                                   "pending_delete", "deactivated"]},
             "visibility": {"type": "string", "enum": ["community", "public", "private",
                                                       "shared"]},
             "protected": {"type": "boolean"}, "os_hidden": {"type": "boolean"},
             "checksum": {"type": ["null", "string"]}, "owner": {"type": ["null", "string"]},
             "os_hash_algo": {"type": ["null", "string"]},
             "os_hash_value": {"type": ["null", "string"]},
             "size": {"type": ["null", "integer"]}, "virtual_size": {"type": ["null", "integer"]},
             "container_format": {"type": ["null", "string"],
                                  "enum": [None] + list(CONTAINER_FORMATS)},
             "disk_format": {"type": ["null", "string"], "enum": [None] + list(DISK_FORMATS)},
             "created_at": {"type": "string"}, "updated_at": {"type": "string"},
             "tags": {"type": "array", "items": {"type": "string", "maxLength": 255}},
             "min_ram": {"type": "integer"}, "min_disk": {"type": "integer"},
             "self": {"type": "string"}, "file": {"type": "string"},
             "schema": {"type": "string"}}
    return {"name": "image", "properties": props,
            "additionalProperties": {"type": "string"},
            "links": [{"rel": "self", "href": "{self}"}, {"rel": "enclosure", "href": "{file}"},
                      {"rel": "describedby", "href": "{schema}"}]}


def glance_upload_check(image, path):
    """What Glance does with an upload's bytes ([image_format] require_image_format_match,
    its default): they must be the declared disk_format (raw accepts anything, and a
    format Glance cannot inspect accepts what it does not recognise) and pass the
    safety checks; else 415.  Returns the record's virtual_size."""
    inspection = inspect_image(path)
    declared = image["disk_format"]
    if inspection.format is None:
        raise GlanceError(415, inspection.error)
    found = inspection.format
    if found == declared:
        size = inspection.virtual_size
    elif found == "raw" and declared not in INSPECTED_FORMATS:
        size = 0
    elif declared == "raw":
        LOG.warning("image %s claims disk_format raw but is %s", image["id"], found)
        size = os.path.getsize(path)
    else:
        raise GlanceError(415, f"Image disk_format {declared} does not match stream data "
                               f"{found}")
    if inspection.problems:
        LOG.warning("image %s (%s) failed safety checks: %s", image["id"], found,
                    "; ".join(inspection.problems))
        raise GlanceError(415, "Image failed safety checks")
    return {"virtual_size": size or None}


def image_change_allowed(image, ident):
    """Glance's default policy for changing or deleting an image: an admin, or a member
    of the project that owns it."""
    return ident.is_admin or ("member" in ident.roles and image.get("owner") is not None
                              and image.get("owner") == ident.project_id)


class ImageService:
    """The Glance v2 subset, over App.images (LocalImages)."""

    def __init__(self, app):
        self.app = app

    def handle(self, method, rest, query, headers, body, stream):
        """Returns a Response; errors become Glance-style JSON bodies."""
        base = self.app.base_url(headers, False)
        try:
            if rest in ("", "/"):
                return Response(300, self.versions(base))
            if rest == "/versions":
                return Response(200, self.versions(base))
            ident = self.app.auth.identify(headers.get("X-Auth-Token"))
            parts = [urllib.parse.unquote(p) for p in rest.split("/") if p]
            if parts[:1] != ["v2"]:
                raise GlanceError(404, "The resource could not be found.")
            return self.route(method, parts[1:], query, headers, body, stream, ident)
        except GlanceError as e:
            title = STATUS_TEXT.get(e.code, "Error")
            return Response(e.code, {"code": f"{e.code} {title}", "title": title,
                                     "message": e.message})
        except Fault as fault:
            return Response(fault.code, fault.body())

    def versions(self, base):
        return {"versions": [{"id": "v2.16", "status": "CURRENT", "links": [
            {"rel": "self", "href": base + "/image/v2/"}]}]}

    def route(self, method, parts, query, headers, body, stream, ident):
        images = self.app.images
        if parts in (["schemas", "image"], ["schemas", "images"]):
            schema = glance_schema()
            if parts[1] == "images":
                schema = {"name": "images", "properties": {"images": {
                    "type": "array", "items": schema}}, "links": []}
            return Response(200, schema)
        if parts == ["images"] and method == "GET":
            self.check_role(ident, "reader", "get_images")
            return Response(200, self.list(ident, query))
        if parts == ["images"] and method == "POST":
            return Response(201, glance_image_view(self.create(ident, body)))
        if len(parts) >= 2 and parts[0] == "images":
            image = images.get(parts[1])
            if image is None or not images.visible(image, ident) or \
                    not (ident.is_admin or "reader" in ident.roles):
                raise GlanceError(404, f"No image found with ID {parts[1]}")
            if len(parts) == 2 and method in ("GET", "HEAD"):
                return Response(200, glance_image_view(image))
            if len(parts) == 2 and method == "DELETE":
                self.check_owner(image, ident, "delete")
                if image.get("protected"):
                    raise GlanceError(403, f"Image {image['id']} is protected and cannot be "
                                           "deleted.")
                images.delete(image)
                return Response(204, None)
            if len(parts) == 2 and method == "PATCH":
                self.check_owner(image, ident, "modify")
                return Response(200, glance_image_view(self.patch(image, body, ident)))
            if parts[2:] == ["file"] and method == "PUT":
                self.check_owner(image, ident, "upload")
                return Response(204, None) if self.upload(image, headers, stream) else None
            if parts[2:] == ["file"] and method == "GET":
                self.check_role(ident, "member", "download")
                if image["status"] != "active":
                    return Response(204, None)
                with open(images.path(image), "rb") as f:
                    return Response(200, f.read(), content_type="application/octet-stream")
        raise GlanceError(404, "The resource could not be found.")

    @staticmethod
    def check_role(ident, role, what):
        """Glance's default policies: reading needs a reader, writing a member."""
        if not ident.is_admin and role not in ident.roles:
            raise GlanceError(403, f"You are not authorized to {what} images.")

    @staticmethod
    def check_owner(image, ident, what):
        """Only an admin, or a member of the project that owns the image, changes it
        (the image directory's images, owned by no project, are the operator's)."""
        if not image_change_allowed(image, ident):
            raise GlanceError(403, f"You are not permitted to {what} this image.")

    def list(self, ident, query):
        items = [i for i in self.app.images.list() if self.app.images.visible(i, ident)]
        filters = {k: v[-1] for k, v in query.items()}
        for key in ("name", "status", "visibility", "disk_format", "container_format", "owner"):
            if key in filters:
                wanted = filters[key]
                if key == "name" and wanted.startswith("in:"):
                    names = wanted[3:].split(",")
                    items = [i for i in items if i["name"] in names]
                else:
                    items = [i for i in items if str(glance_image_view(i).get(key)) == wanted]
        if "tag" in filters:
            items = [i for i in items if filters["tag"] in i.get("tags", [])]
        key = filters.get("sort_key", "created_at")
        reverse = filters.get("sort_dir", "desc") == "desc"
        items.sort(key=lambda i: (str(glance_image_view(i).get(key)), i["id"]), reverse=reverse)
        if "marker" in filters:
            ids = [i["id"] for i in items]
            if filters["marker"] not in ids:
                raise GlanceError(400, f"marker {filters['marker']} not found")
            items = items[ids.index(filters["marker"]) + 1:]
        try:
            limit = int(filters.get("limit", 25))
        except ValueError:
            raise GlanceError(400, "limit param must be an integer") from None
        page = items[:limit]
        body = {"images": [glance_image_view(i) for i in page], "schema": "/v2/schemas/images",
                "first": "/v2/images"}
        if len(items) > limit and page:
            body["next"] = "/v2/images?" + urllib.parse.urlencode(
                dict([(k, v) for k, v in filters.items() if k != "marker"],
                     marker=page[-1]["id"]))
        return body

    def create(self, ident, body):
        if not isinstance(body, dict):
            raise GlanceError(400, "Body must be a JSON object.")
        for key in ("disk_format", "container_format"):
            allowed = DISK_FORMATS if key == "disk_format" else CONTAINER_FORMATS
            if body.get(key) is not None and body[key] not in allowed:
                raise GlanceError(400, f"Invalid value '{body[key]}' for {key}")
        if body.get("visibility", "shared") not in ("public", "private", "shared", "community"):
            raise GlanceError(400, "Invalid visibility value")
        owner = body.get("owner") or ident.project_id
        if not ident.is_admin and ("member" not in ident.roles or owner != ident.project_id):
            raise GlanceError(403, "You are not authorized to create images for this "
                                   "project.")
        if body.get("visibility") == "public" and not ident.is_admin:
            raise GlanceError(403, "You are not authorized to complete publicize_image "
                                   "action.")
        image_id = str(body.get("id") or uuid.uuid4())
        if not is_uuid_like(image_id):
            raise GlanceError(400, "id must be a UUID")
        if self.app.images.get(image_id) is not None or self.app.images.taken(image_id):
            raise GlanceError(409, f"Image with identifier {image_id} already exists!")
        props = {k: str(v) for k, v in body.items() if k not in GLANCE_WRITABLE
                 and k not in GLANCE_CORE}
        try:
            min_disk, min_ram = int(body.get("min_disk", 0)), int(body.get("min_ram", 0))
        except (TypeError, ValueError):
            raise GlanceError(400, "min_disk and min_ram must be integers") from None
        return self.app.images.reserve_image(
            image_id, body.get("name"), owner, props, min_disk, min_ram,
            visibility=body.get("visibility", "shared"),
            disk_format=body.get("disk_format"), container_format=body.get("container_format"),
            tags=[str(t) for t in body.get("tags", [])], protected=bool(body.get("protected")))

    def patch(self, image, body, ident):
        if not isinstance(body, list):
            raise GlanceError(400, "A JSON patch (a list of operations) is required.")
        changes, props = {}, dict(image["properties"])
        for op in body:
            if not isinstance(op, dict) or op.get("op") not in ("add", "replace", "remove") \
                    or not str(op.get("path", "")).startswith("/"):
                raise GlanceError(400, "Invalid JSON patch operation.")
            key = op["path"][1:]
            if key in ("name", "visibility", "protected", "os_hidden", "min_ram", "min_disk",
                       "tags", "disk_format", "container_format"):
                if op["op"] == "remove":
                    raise GlanceError(403, f"Attribute '{key}' is read-only.")
                changes[key] = op["value"]
            elif key in GLANCE_CORE:
                raise GlanceError(403, f"Attribute '{key}' is read-only.")
            elif op["op"] == "remove":
                if key not in props:
                    raise GlanceError(409, f"Property {key} does not exist.")
                props.pop(key)
            else:
                props[key] = str(op.get("value"))
        wanted = changes.get("visibility", image["visibility"])
        if wanted != image["visibility"]:
            if wanted not in ("public", "private", "shared", "community"):
                raise GlanceError(400, "Invalid visibility value")
            if wanted == "public" and not ident.is_admin:
                raise GlanceError(403, "You are not authorized to complete publicize_image "
                                       "action.")
        return self.app.images.update_image(image, changes, props)

    def upload(self, image, headers, stream):
        if image["status"] != "queued":
            raise GlanceError(409, f"Image status transition from {image['status']} to saving "
                                   "is not allowed")
        if not image.get("disk_format") or not image.get("container_format"):
            missing = [k for k in ("disk_format", "container_format") if not image.get(k)]
            raise GlanceError(400, f"Propert{'ies' if len(missing) > 1 else 'y'} "
                                   f"{', '.join(missing)} must be set prior to saving data.")
        check = (lambda path: glance_upload_check(image, path)) \
            if image["container_format"] == "bare" else None
        self.app.images.store_upload(image, stream, check)
        return True


# § 14 volumes -------------------------------------------------------------------------
#
# Cinder v3, found in the Keystone catalog (volumev3 / block-storage) or --cinder-url.
# Calls a request makes carry the caller's token, so Cinder applies its own policy and the
# volumes it creates belong to the caller's project; work that outlives the request
# (completing an attachment, deleting a volume with its server) uses minivan's service
# token.  Attachments follow Nova's 3.44 flow: reserve (attachment without connector) at
# the API, connect (attachment update with the host connector) and complete on the
# compute side, delete on detach.

CINDER_VERSION = "volume 3.44"
REIMAGE_TIMEOUT_PER_GB = 20    # seconds per GB a rebuild waits for Cinder's reimage (Nova's)
VOLUME_TARGETS = "vd" + "".join(chr(c) for c in range(ord("a"), ord("z") + 1))


class ServiceError(Exception):
    """Another OpenStack service refused a call: its status and its own message."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


def call_service(service, url, method, headers, body, error, message_of):
    """One JSON call to another OpenStack service: its answer; error(status, its message)
    when it refuses; Unavailable when it does not answer (within 60 s)."""
    headers = dict(headers, Accept="application/json")
    data = None
    if body is not None:
        data = json_bytes(body)
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            raw = resp.read()
            return json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raise error(e.code, message_of(e.read(), e.code)) from None
    except (OSError, ValueError, http.client.HTTPException) as e:
        LOG.error("the %s at %s is unreachable: %s", service, url, e)
        raise Unavailable(f"The {service} is unreachable.") from None


class VolumeError(ServiceError):
    """Cinder refused a call."""


class VolumeGone(DriverError):
    """A volume waited for is no longer in Cinder."""


class Cinder:
    """The block storage service: volumes, snapshots and attachments over Cinder's v3 API."""

    def __init__(self, url, auth, clock):
        self.url = url.rstrip("/")
        self.auth = auth
        self.clock = clock

    def project_url(self, project_id):
        """The endpoint for a project: templates and the service project's URL are
        rewritten for it; a URL without a project id is used as it is."""
        url = self.url.replace("%(project_id)s", project_id) \
            .replace("$(project_id)s", project_id).replace("%(tenant_id)s", project_id)
        own = self.auth.service_project_id
        if own and url.endswith("/" + own):
            url = url[:-len(own)] + project_id
        return url

    def call(self, ident, method, path, body=None, version=CINDER_VERSION):
        """One Cinder call as the caller (ident) or, with ident None, as minivan."""
        for attempt in (0, 1):
            service = self.auth.service_token_value(force=attempt == 1)
            if ident is None:
                project, token = self.auth.service_project_id, service
            else:
                project, token = ident.project_id, ident.token
            headers = {"X-Auth-Token": token, "X-Service-Token": service,
                       "OpenStack-API-Version": version}
            try:
                return call_service("block storage service", self.project_url(project) + path,
                                    method, headers, body, VolumeError, cinder_message)
            except VolumeError as e:
                if e.status != 401 or attempt or ident is not None:
                    raise
        raise VolumeError(401, "minivan's service token was refused by Cinder")

    # -- volumes --------------------------------------------------------------------
    def get(self, ident, volume_id):
        """The volume, or None when Cinder does not know it (for this caller)."""
        if not re.match(r"^[0-9a-fA-F-]{32,36}$", volume_id or ""):
            return None
        try:
            return self.call(ident, "GET", "/volumes/" + volume_id)["volume"]
        except VolumeError as e:
            if e.status in (400, 403, 404):
                return None
            raise Unavailable(f"The block storage service answered {e.status}.") from None

    def list(self, ident):
        volumes, path = [], "/volumes/detail?limit=1000"
        while path:
            doc = self.call(ident, "GET", path)
            volumes += doc.get("volumes", [])
            nxt = [link["href"] for link in doc.get("volumes_links", [])
                   if link.get("rel") == "next"]
            path = "/volumes/detail?" + urllib.parse.urlsplit(nxt[0]).query if nxt else None
        return volumes

    def create(self, ident, size, name=None, description=None, snapshot_id=None,
               image_id=None, volume_type=None, metadata=None, zone=None):
        spec = {"size": size, "name": name, "description": description,
                "snapshot_id": snapshot_id, "imageRef": image_id, "volume_type": volume_type,
                "metadata": metadata or {}, "availability_zone": zone}
        body = {"volume": {k: v for k, v in spec.items() if v is not None}}
        return self.call(ident, "POST", "/volumes", body)["volume"]

    def delete(self, ident, volume_id):
        self.call(ident, "DELETE", "/volumes/" + volume_id)

    def wait(self, ident, volume_id, want=("available",), timeout=600):
        """Poll until the volume reaches a wanted status; error states raise."""
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            volume = self.get(ident, volume_id)
            if volume is None:
                raise VolumeGone(f"volume {volume_id} disappeared")
            if volume["status"] in want:
                return volume
            if volume["status"].startswith("error") or time.monotonic() > deadline:
                raise DriverError(f"volume {volume_id} is {volume['status']}, not "
                                  f"{' or '.join(want)}")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def action(self, ident, volume_id, name, args=None):
        self.call(ident, "POST", f"/volumes/{volume_id}/action", {name: args})

    def reimage(self, ident, volume_id, image_id):
        """Write the image over a reserved volume (3.68); Cinder tells the compute service
        with a volume-reimaged event when it is done."""
        self.call(ident, "POST", f"/volumes/{volume_id}/action", {
            "os-reimage": {"image_id": image_id, "reimage_reserved": True}},
            version="volume 3.68")

    # -- snapshots ------------------------------------------------------------------
    def get_snapshot(self, ident, snapshot_id):
        if not re.match(r"^[0-9a-fA-F-]{32,36}$", snapshot_id or ""):
            return None
        try:
            return self.call(ident, "GET", "/snapshots/" + snapshot_id)["snapshot"]
        except VolumeError as e:
            if e.status in (400, 403, 404):
                return None
            raise Unavailable(f"The block storage service answered {e.status}.") from None

    def list_snapshots(self, ident):
        return self.call(ident, "GET", "/snapshots/detail?limit=1000").get("snapshots", [])

    def create_snapshot(self, ident, volume_id, force=False, name=None, description=None):
        body = {"snapshot": {"volume_id": volume_id, "force": force, "name": name,
                             "description": description}}
        return self.call(ident, "POST", "/snapshots", body)["snapshot"]

    def delete_snapshot(self, ident, snapshot_id):
        self.call(ident, "DELETE", "/snapshots/" + snapshot_id)

    # -- attachments (3.44) -----------------------------------------------------------
    def attachment_create(self, ident, volume_id, server_id, connector=None):
        body = {"attachment": {"volume_uuid": volume_id, "instance_uuid": server_id}}
        if connector is not None:
            body["attachment"]["connector"] = connector
        return self.call(ident, "POST", "/attachments", body)["attachment"]

    def attachment_update(self, ident, attachment_id, connector):
        """The attachment, its connection_info in the nested shape libvirt code reads
        ({"driver_volume_type": ..., "data": {...}}): the 3.44 API returns it flat."""
        attachment = self.call(ident, "PUT", "/attachments/" + attachment_id,
                               {"attachment": {"connector": connector}})["attachment"]
        return dict(attachment, connection_info=nested_connection_info(
            attachment.get("connection_info") or {}))

    def encryption(self, ident, volume_id):
        """A volume's encryption metadata (provider, cipher, key_size, encryption_key_id),
        or {} for a plain one."""
        return self.call(ident, "GET", f"/volumes/{volume_id}/encryption") or {}

    def attachment_get(self, attachment_id):
        attachment = self.call(None, "GET", "/attachments/" + attachment_id)["attachment"]
        return dict(attachment, connection_info=nested_connection_info(
            attachment.get("connection_info") or {}))

    def snapshot_status(self, snapshot_id, status):
        """Tell Cinder how an assisted snapshot went (progress 90%: the compute side is
        done), as Nova's libvirt driver does; failures are only logged."""
        try:
            self.call(None, "POST", f"/snapshots/{snapshot_id}/action", {
                "os-update_snapshot_status": {"status": status, "progress": "90%"}})
        except (VolumeError, Unavailable) as e:
            LOG.error("telling Cinder snapshot %s is %s failed: %s", snapshot_id, status, e)

    def wait_snapshot_settled(self, snapshot_id, status, timeout=600):
        """Wait until Cinder moves the snapshot out of status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snap = self.get_snapshot(None, snapshot_id)
            if snap is None or snap["status"] != status:
                return
            time.sleep(0.5)
        raise DriverError(f"snapshot {snapshot_id} stayed {status}")

    def attachment_complete(self, ident, attachment_id):
        self.call(ident, "POST", f"/attachments/{attachment_id}/action", {"os-complete": None})

    def attachment_delete(self, ident, attachment_id):
        try:
            self.call(ident, "DELETE", "/attachments/" + attachment_id)
        except VolumeError as e:
            if e.status != 404:
                raise


# A Cinder call that ends a server's use of a volume (deleting an attachment, rolling a
# detach back) is not dropped when it fails: the volume would stay "attaching",
# "detaching" or "in-use" in Cinder for ever.  It is kept in the state and made again,
# with a growing pause, until Cinder takes it or answers that the thing is gone.

class VolumeCleanups:
    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()

    def later(self, seconds):
        return isotime_us(self.app.clock.now() + datetime.timedelta(seconds=seconds))

    def call(self, kind, volume_id, attachment_id):
        cinder = self.app.volumes
        if cinder is None:
            raise Unavailable("The block storage service is unavailable.")
        if kind == "attachment_delete":
            cinder.attachment_delete(None, attachment_id)
        else:
            cinder.action(None, volume_id, "os-roll_detaching")

    def attempt(self, kind, volume_id, attachment_id):
        """Make the call once: None when Cinder took it (or the thing is gone), else the
        error's text."""
        try:
            self.call(kind, volume_id, attachment_id)
        except (VolumeError, Unavailable, DriverError) as e:
            if not (isinstance(e, VolumeError) and e.status == 404):
                return str(getattr(e, "message", None) or e)
        return None

    def do(self, server_id, kind, volume_id, attachment_id=None):
        """Make the call; when Cinder fails it, keep it to be made again.  None, or the
        error's text."""
        error = self.attempt(kind, volume_id, attachment_id)
        if error is None:
            return None
        entry = {"server_id": server_id, "call": kind, "volume_id": volume_id,
                 "attachment_id": attachment_id, "attempts": 1, "last_error": error[:255],
                 "created_at": isotime(self.app.clock.now()),
                 "next_try": self.later(5)}
        self.app.store.commit([["set", ["volume_cleanups", str(uuid.uuid4())], entry]])
        LOG.warning("server %s: %s of volume %s failed (%s); it is made again until "
                    "Cinder takes it", server_id, kind, volume_id, error)
        return error

    def retry_due(self):
        """Make again each kept call whose pause is over; returns how many are left."""
        with self.lock:
            now = self.later(0)
            due = [(k, dict(v)) for k, v in list(self.app.store.data["volume_cleanups"]
                                                 .items()) if v["next_try"] <= now]
            for key, entry in due:
                error = self.attempt(entry["call"], entry["volume_id"], entry["attachment_id"])
                if error is not None:
                    entry["attempts"] += 1
                    entry["last_error"] = error[:255]
                    entry["next_try"] = self.later(min(3600, 5 * 2 ** entry["attempts"]))
                    self.app.store.commit([["set", ["volume_cleanups", key], entry]])
                    continue
                LOG.info("server %s: %s of volume %s done after %d attempts",
                         entry["server_id"], entry["call"], entry["volume_id"],
                         entry["attempts"] + 1)
                self.app.store.commit([["del", ["volume_cleanups", key]]])
            return len(self.app.store.data["volume_cleanups"])


def volume_cleanup_loop(app, stop, interval=5.0):
    while not stop.wait(interval):
        try:
            app.volume_cleanups.retry_due()
        except Exception:  # noqa: BLE001 - the loop must survive anything
            LOG.exception("retrying the volume clean-ups failed")


def nested_connection_info(info):
    """{"driver_volume_type": ..., "data": {...}}, from the flat form of the 3.44 API."""
    if info and "data" not in info:
        return {"driver_volume_type": info.get("driver_volume_type"),
                "data": {k: v for k, v in info.items() if k != "driver_volume_type"}}
    return info


def cinder_message(raw, status):
    """The message of a Cinder fault body ({"badRequest": {"message": ...}})."""
    try:
        doc = json.loads(raw)
        inner = next(iter(doc.values())) if isinstance(doc, dict) and doc else {}
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    except (ValueError, TypeError, StopIteration):
        pass
    return f"Cinder answered {status}"


def host_connector(conf):
    """What Cinder needs to export a volume to this host (os-brick's connector shape)."""
    initiator = None
    try:
        with open("/etc/iscsi/initiatorname.iscsi", encoding="utf-8") as f:
            for line in f:
                if line.startswith("InitiatorName="):
                    initiator = line.split("=", 1)[1].strip()
    except OSError:
        pass
    connector = {"host": conf["host"], "ip": conf["my_ip"], "platform": "x86_64",
                 "os_type": "linux", "multipath": False, "do_local_attach": False}
    if initiator:
        connector["initiator"] = initiator
    return connector


def nfs_mount_point(mount_base, export):
    """Where an NFS share is mounted: os-brick names the directory by the share's md5."""
    return os.path.join(mount_base, hashlib.md5(export.encode("utf-8"),
                                                usedforsecurity=False).hexdigest())


def ensure_nfs_mounted(mount_base, export, options=None, mount=None):
    """Mount the share unless something is mounted there already (a share that another
    service, or the administrator, mounted at the same place is used as it is).  The
    mount itself is mount(export, options, point): libvirt's, on the host whose QEMU opens
    the volume (LibvirtDriver.mount_share)."""
    point = nfs_mount_point(mount_base, export)
    if is_mount_point(point):
        return point
    if not re.match(r"^[A-Za-z0-9.:\[\]_-]+:/", export) or (options or "").startswith("-"):
        raise DriverError(f"NFS share {export!r} is not of the form host:/path")
    if mount is None:
        raise DriverError(f"NFS share {export} is not mounted at {point}")
    mount(export, options, point)
    return point


def nfs_pool_name(point):
    return "minivan-nfs-" + os.path.basename(point)[:16]


def nfs_pool_xml(export, options, point):
    """A libvirt netfs storage pool that mounts an NFS share at point: libvirtd runs
    mount(8) in the host's own mount namespace, where QEMU opens the volumes, so the
    share is seen by QEMU even when minivan runs in a namespace of its own (systemd's
    ProtectSystem=), and on every host minivan drives."""
    host, _, path = export.rpartition(":/")
    opts = [o for o in (options or "").replace(" ", ",").split(",") if o]
    mount_opts = "".join(f"<fs:option name='{xml_escape(o)}'/>" for o in opts)
    return (f"<pool type='netfs' xmlns:fs='http://libvirt.org/schemas/storagepool/fs/1.0'>"
            f"<name>{nfs_pool_name(point)}</name>"
            f"<source><host name='{xml_escape(host.strip('[]'))}'/>"
            f"<dir path='/{xml_escape(path)}'/><format type='nfs'/></source>"
            f"<target><path>{xml_escape(point)}</path></target>"
            + (f"<fs:mount_opts>{mount_opts}</fs:mount_opts>" if mount_opts else "")
            + "</pool>")


def is_mount_point(path):
    """True when something is mounted on path; /proc/self/mounts also sees bind mounts
    within one filesystem, which os.path.ismount cannot tell from a directory."""
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and re.sub(r"\\([0-7]{3})", lambda m: chr(int(
                        m.group(1), 8)), fields[1]) == path:
                    return True
    except OSError:
        pass
    return os.path.ismount(path)


def volume_source(connection_info, mount_base, mount=None):
    """(disk type, format, <source> XML) for a Cinder connection_info; an NFS share not
    mounted yet is mounted with mount (ensure_nfs_mounted)."""
    kind = (connection_info.get("driver_volume_type") or "").lower()
    data = connection_info.get("data") or {}
    fmt = data.get("format") or "raw"
    if fmt not in ("raw", "qcow2"):
        raise DriverError(f"volume format {fmt} is not supported")
    if kind in ("nfs", "remotefs", "glusterfs", "quobyte", "vzstorage"):
        export = data.get("export")
        if not export or not data.get("name"):
            raise DriverError(f"{kind} connection info lacks export or name")
        point = ensure_nfs_mounted(mount_base, export, data.get("options"), mount)
        path = os.path.join(point, os.path.basename(data["name"]))
        if data.get("encrypted"):
            fmt = encrypted_file_format(path, fmt)
        return "file", fmt, f"<source file='{xml_escape(path)}'/>"
    if kind in ("local", "file"):
        path = data.get("device_path") or data.get("path")
        if not path:
            raise DriverError("local connection info lacks device_path")
        if path.startswith("/dev/") or os.path.exists(path) and stat_is_block(path):
            # (as Nova's: a /dev path is a block device, whether or not this process
            # sees /dev, which systemd's PrivateDevices= hides)
            return "block", fmt, f"<source dev='{xml_escape(path)}'/>"
        return "file", fmt, f"<source file='{xml_escape(path)}'/>"
    if kind == "iscsi":
        iqn, portal = data.get("target_iqn"), data.get("target_portal") or ""
        if not iqn or not portal or data.get("auth_method"):
            raise DriverError("iSCSI volumes need target_iqn and target_portal, without CHAP")
        host, _, port = portal.rpartition(":")
        host = host.strip("[]") or portal
        return "network", fmt, (f"<source protocol='iscsi' name='{xml_escape(iqn)}/"
                                f"{int(data.get('target_lun') or 0)}'><host "
                                f"name='{xml_escape(host)}' port='{xml_escape(port or '3260')}'"
                                f"/></source>")
    if kind == "rbd":
        name = data.get("name")
        if not name:
            raise DriverError("rbd connection info lacks name")
        hosts = "".join(f"<host name='{xml_escape(h)}' port='{xml_escape(str(p))}'/>"
                        for h, p in zip(data.get("hosts") or [], data.get("ports") or []))
        auth = ""
        if data.get("auth_enabled"):
            if not data.get("secret_uuid"):
                raise DriverError("rbd volumes with cephx need a libvirt secret_uuid")
            auth = (f"<auth username='{xml_escape(data.get('auth_username') or '')}'>"
                    f"<secret type='ceph' uuid='{xml_escape(data['secret_uuid'])}'/></auth>")
        return "network", fmt, (f"<source protocol='rbd' name='{xml_escape(name)}'>{hosts}"
                                f"</source>{auth}")
    raise DriverError(f"volumes of type {kind or '(none)'} cannot be attached by minivan")


def encrypted_file_format(path, fmt):
    """Cinder's NFS driver writes an encrypted volume as a qcow2 image with QEMU's LUKS
    inside, yet reports the format it was asked for (raw); the file's header tells.  (A
    guest cannot forge it: the header lies outside what QEMU decrypts for the guest.)
    Only a qcow2 without a backing file is taken."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return fmt              # not readable from here: the host that opens it decides
    if len(head) == 16 and head[:4] == b"QFI\xfb" and not int.from_bytes(head[8:16], "big"):
        return "qcow2"
    return fmt


def stat_is_block(path):
    return stat.S_ISBLK(os.stat(path).st_mode)


def volume_disk_xml(vol, mount_base, mount=None, dev=None, bus="virtio", address=""):
    """The <disk> element of an attached volume (its serial is the volume id) as the
    guest's dev on bus; an encrypted one names the libvirt secret QEMU decrypts it with."""
    kind, fmt, source = volume_source(vol["connection_info"], mount_base, mount)
    read_only = "<readonly/>" if (vol["connection_info"].get("data") or {}) \
        .get("access_mode") == "ro" else ""
    encryption = ""
    if vol.get("encryption"):
        encryption = (f"<encryption format='luks'><secret type='passphrase' "
                      f"uuid='{volume_secret_uuid(vol)}'/></encryption>")
    return (f"<disk type='{kind}' device='disk'><driver name='qemu' type='{fmt}' "
            f"cache='none'/>{source}<target dev='{dev or vol['target']}' bus='{bus}'/>"
            f"<serial>{xml_escape(vol['id'])}</serial>{encryption}{read_only}{address}</disk>")


# Encrypted volumes.  Cinder formats a volume of an encryption type with a key from its
# key manager; without Barbican (devstack's default) that is one fixed key, shared with
# Nova as [key_manager] fixed_key and with minivan as MINIVAN_FIXED_KEY.  LUKS (v1) volumes are
# opened by QEMU itself, as Nova's libvirt driver opens them: a libvirt secret per volume
# holds the passphrase, the key's bytes in lowercase hex, as Nova and Cinder derive it.
# Other providers (LUKS2, plain dm-crypt) on raw volumes need os-brick's encryptors on the
# host, which minivan does not have: their attach fails with the reason.  (Cinder's NFS
# driver writes every encrypted volume as a qcow2 image with QEMU's LUKS inside, which
# QEMU opens whatever the provider.)

FIXED_KEY_ID = "00000000-0000-0000-0000-000000000000"   # the fixed-key managers' one key
NATIVE_LUKS_PROVIDERS = ("luks", "LuksEncryptor", "nova.volume.encryptors.luks.LuksEncryptor",
                         "os_brick.encryptors.luks.LuksEncryptor")


def volume_encryption(app, ident, vol):
    """What an attached volume's record keeps of its encryption ({"format": "luks"}), or
    None for a plain volume; DriverError for one minivan cannot open."""
    data = (vol.get("connection_info") or {}).get("data") or {}
    if not data.get("encrypted"):
        return None
    meta = app.volumes.encryption(ident, vol["id"])
    provider = meta.get("provider")
    # a qcow2 volume (Cinder's NFS driver) carries QEMU's own LUKS encryption whatever
    # the type's provider says; a raw one is QEMU's to open only as LUKS v1
    if provider not in NATIVE_LUKS_PROVIDERS and data.get("format") != "qcow2":
        raise DriverError(f"volume {vol['id']} is encrypted by {provider}, which needs a "
                          "host encryptor; minivan opens LUKS (v1) volumes only")
    if meta.get("encryption_key_id") != FIXED_KEY_ID:
        raise DriverError(f"the key of volume {vol['id']} is not the fixed key (minivan "
                          "has no Barbican client)")
    if not app.conf["fixed_key"]:
        raise DriverError(f"volume {vol['id']} is encrypted and no fixed key is set "
                          "(MINIVAN_FIXED_KEY)")
    return {"format": "luks"}


def volume_secret_uuid(vol):
    return str(uuid.uuid5(IMAGE_NAMESPACE, "volume-secret:" + vol["id"]))


def volume_secret_xml(vol):
    return (f"<secret ephemeral='no' private='yes'><uuid>{volume_secret_uuid(vol)}</uuid>"
            f"<usage type='volume'><volume>{xml_escape(vol['id'])}</volume></usage>"
            "</secret>")


def used_targets(server):
    """Disk slots the server's local disks and volumes take (and its config drive's,
    when the disks are not on virtio: its CD-ROM bus may then share their names, whatever
    machine type the host gives it)."""
    taken = {target for _, target, _ in disk_layout(server)}
    if server.get("config_drive") and server_disk_bus(server) != "virtio":
        taken.add(config_drive_slot(server))
    taken.update(v["target"] for v in server.get("volumes", []) if v.get("target"))
    return taken


def next_target(server, wanted=None):
    """A free vdX target: the wanted one (/dev/vdc, vdc) if free, else the first free."""
    taken = used_targets(server)
    if wanted:
        name = wanted.rsplit("/", 1)[-1]
        if name.startswith("vd") and name not in taken and re.match(r"^vd[a-z]$", name):
            return name
    for letter in VOLUME_TARGETS[2:]:
        if "vd" + letter not in taken:
            return "vd" + letter
    raise Forbidden("The maximum allowed number of disk devices (26) to attach to a single "
                    "instance has been exceeded.")


# § 15 networks ------------------------------------------------------------------------
#
# With Neutron in the catalog (or --neutron-url), a server's NICs are Neutron ports, as in
# Nova: minivan creates them (or takes the ones given) at build time, bound to the
# server's host, plugs each as its binding's vif_type says, waits for Neutron's
# network-vif-plugged event, and deletes the ports it created when the server goes.
# minivan calls Neutron as its service user (admin), for the server's project.

class NetworkError(ServiceError):
    """Neutron refused a call."""


class Neutron:
    """The network service: networks, ports and security groups over Neutron's v2.0 API."""

    def __init__(self, url, auth):
        url = url.rstrip("/")
        self.url = url if url.endswith("/v2.0") else url + "/v2.0"
        self.auth = auth

    def call(self, method, path, body=None):
        """One Neutron call as minivan's service user."""
        for attempt in (0, 1):
            headers = {"X-Auth-Token": self.auth.service_token_value(force=attempt == 1)}
            try:
                return call_service("network service", self.url + path, method, headers,
                                    body, NetworkError, neutron_message)
            except NetworkError as e:
                if e.status != 401 or attempt:
                    raise
        raise NetworkError(401, "minivan's service token was refused by Neutron")

    def _get(self, kind, item_id):
        if not is_uuid_like(item_id or ""):
            return None
        try:
            return self.call("GET", f"/{kind}s/{item_id}")[kind]
        except NetworkError as e:
            if e.status == 404:
                return None
            raise Unavailable(f"The network service answered {e.status}.") from None

    def network(self, network_id):
        return self._get("network", network_id)

    def port(self, port_id):
        return self._get("port", port_id)

    def networks(self, project_id):
        """The networks a project may use: its own and the shared ones."""
        found = {}
        for query in (f"project_id={urllib.parse.quote(project_id)}", "shared=true"):
            for net in self.call("GET", "/networks?" + query)["networks"]:
                found.setdefault(net["id"], net)
        return by_creation(found.values())

    def visible_networks(self, project_id, is_admin):
        """The networks Neutron shows a caller: every one to an admin; to others their
        own, the shared and the external ones (which every project may see)."""
        if is_admin:
            return by_creation(self.call("GET", "/networks")["networks"])
        found = {n["id"]: n for n in self.networks(project_id)}
        for net in self.call("GET", "/networks?router%3Aexternal=true")["networks"]:
            found.setdefault(net["id"], net)
        return by_creation(found.values())

    def find_security_groups(self, project_id, wanted, missing=BadRequest):
        """A project's security groups, each found by name or else by id, as Nova finds
        them (Neutron makes 'default' itself).  A name two groups share is a conflict."""
        groups, found = self.security_groups(project_id), []
        for want in wanted:
            named = [g for g in groups if g["name"] == want]
            if len(named) > 1:
                raise Conflict(f"Multiple security groups found matching '{want}'. Use an ID "
                               "to be more specific.")
            match = named or [g for g in groups if g["id"] == want]
            if not match:
                raise missing(f"Security group {want} not found.")
            found.append(match[0])
        return found

    def security_group_ids(self, project_id, names):
        return [g["id"] for g in self.find_security_groups(project_id, names)]

    def floating_ips(self, **query):
        """Floating IPs by query; none where Neutron has no router service."""
        try:
            return self.call("GET", "/floatingips?" + urllib.parse.urlencode(query))[
                "floatingips"]
        except NetworkError as e:
            if e.status == 404:
                return []
            raise

    def security_groups(self, project_id=None):
        query = "?" + urllib.parse.urlencode({"project_id": project_id}) if project_id else ""
        return self.call("GET", "/security-groups" + query)["security_groups"]

    def security_group(self, group_id):
        return self._get("security_group", group_id)

    def security_group_rule(self, rule_id):
        return self._get("security_group_rule", rule_id)

    def auto_allocated_network(self, project_id):
        """The network of Neutron's auto-allocated topology for a project (made on first
        ask), or None where Neutron cannot make one."""
        try:
            doc = self.call("GET", "/auto-allocated-topology/" +
                            urllib.parse.quote(project_id))
        except NetworkError as e:
            LOG.info("Neutron cannot auto-allocate a network for %s: %s", project_id, e)
            return None
        return (doc or {}).get("auto_allocated_topology", {}).get("id")

    def create_port(self, spec):
        return self.call("POST", "/ports", {"port": spec})["port"]

    def update_port(self, port_id, spec):
        return self.call("PUT", f"/ports/{port_id}", {"port": spec})["port"]

    def delete_port(self, port_id):
        try:
            self.call("DELETE", f"/ports/{port_id}")
        except NetworkError as e:
            if e.status != 404:
                raise


def neutron_message(raw, status):
    """The message of a Neutron fault body ({"NeutronError": {"message": ...}})."""
    try:
        doc = json.loads(raw)
        inner = doc.get("NeutronError") if isinstance(doc, dict) else None
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    except (ValueError, TypeError, AttributeError):
        pass
    return f"Neutron answered {status}"


def by_creation(networks):
    """Neutron networks oldest first (their ids break ties)."""
    return sorted(networks, key=lambda n: (n.get("created_at") or "", n["id"]))


def neutron_port_record(port, network_name, created, tag=None):
    """How a server record keeps a Neutron port."""
    return {"id": port["id"], "mac": port["mac_address"], "network": network_name,
            "network_id": port["network_id"], "fixed_ip": None,
            "ips": [[ip["ip_address"], 6 if ":" in ip["ip_address"] else 4]
                    for ip in port.get("fixed_ips") or []],
            "tag": tag, "neutron": True, "created": created,
            "subnet_ids": [ip.get("subnet_id") for ip in port.get("fixed_ips") or []],
            "vif_type": port.get("binding:vif_type"),
            "vif_details": port.get("binding:vif_details") or {},
            "resource_request": port.get("resource_request")}


def neutron_interface_xml(port, extra="<model type='virtio'/>"):
    """libvirt XML plugging a Neutron port as its binding says: an Open vSwitch port of
    the integration bridge (vif_type ovs), a Linux bridge port (vif_type bridge) or a
    bare tap device (vif_type tap)."""
    details = port.get("vif_details") or {}
    dev = "tap" + port["id"][:11]
    if port.get("vif_type") == "ovs":
        bridge = details.get("bridge_name") or "br-int"
        return (f"<interface type='bridge'><mac address='{port['mac']}'/>"
                f"<source bridge='{xml_escape(bridge)}'/><virtualport type='openvswitch'>"
                f"<parameters interfaceid='{port['id']}'/></virtualport>"
                f"<target dev='{dev}'/>{extra}</interface>")
    if port.get("vif_type") == "bridge":
        bridge = details.get("bridge_name") or "brq" + port["network_id"][:11]
        return (f"<interface type='bridge'><mac address='{port['mac']}'/>"
                f"<source bridge='{xml_escape(bridge)}'/><target dev='{dev}'/>"
                f"{extra}</interface>")
    if port.get("vif_type") == "tap":
        # a bare tap device that Neutron's backend wires up by its name
        return (f"<interface type='ethernet'><mac address='{port['mac']}'/>"
                f"<target dev='{dev}'/>{extra}</interface>")
    if port.get("vif_type") in (None, "unbound", "binding_failed"):
        raise DriverError(f"Binding failed for port {port['id']}, please check neutron logs "
                          "for more information.")
    raise DriverError(f"Unsupported VIF type {port.get('vif_type')} of port {port['id']}")


# § 16 quotas --------------------------------------------------------------------------

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
    if version >= ((2, 50) if classes else (2, 36)):
        keys = [k for k in keys if k not in NETWORK_QUOTAS]
    if version >= (2, 57):
        keys = [k for k in keys if k not in FILE_QUOTAS]
    if classes and version < (2, 50):
        keys = [k for k in keys if k not in ("server_groups", "server_group_members")]
    return keys


def class_limits(data, name="default"):
    """Limits of a quota class: the defaults overridden by what was set on it."""
    limits = dict(QUOTA_DEFAULTS)
    limits.update(data["quota_classes"].get(name, {}))
    return limits


def project_limits(data, project_id, user_id=None):
    limits = class_limits(data)
    limits.update(data["quotas"].get(project_id, {}))
    if user_id is not None:
        limits.update(data["user_quotas"].get(project_id, {}).get(user_id, {}))
    return limits


class ServerIndex:
    """Sums over the servers kept up to date from the store's changes (a watcher sees each
    server record before and after it is set), so that reading them does not walk every
    server.  Subclasses say what a server adds, with add(server, +1 or -1)."""

    def __init__(self, store):
        self.store = store
        self.sums = collections.defaultdict(lambda: [0, 0, 0])
        with store.reading():
            for server in store.data["servers"].values():
                self.add(server, 1)
        store.watchers.append(self.watch)

    def add(self, server, sign):
        raise NotImplementedError

    def watch(self, op, data):
        path = op[1]
        if path[0] != "servers" or len(path) != 2:
            return
        old = data["servers"].get(path[1])
        if old is not None:
            self.add(old, -1)
        if op[0] == "set":
            self.add(op[2], 1)


class ServerUsage(ServerIndex):
    """Instances, cores and RAM each project (and each of its users) holds, so that a
    quota check does not walk every server."""

    def add(self, server, sign):
        if server.get("vm_state") == "deleted":
            return
        flavor = server.get("flavor", {})
        for key in ((server.get("project_id"), None),
                    (server.get("project_id"), server.get("user_id"))):
            total = self.sums[key]
            total[0] += sign
            total[1] += sign * flavor.get("vcpus", 0)
            total[2] += sign * flavor.get("ram", 0)

    def counts(self, project_id, user_id=None):
        total = self.sums.get((project_id, user_id), (0, 0, 0))
        return {"instances": total[0], "cores": total[1], "ram": total[2]}


class ServerOrder:
    """Each project's servers, and all servers (under None), as (created_at, id) keys in
    order, kept from the store's changes like ServerIndex: a page of servers in the
    default order reads its slice, not every server."""

    def __init__(self, store):
        self.keys = collections.defaultdict(list)
        with store.reading():
            for server in store.data["servers"].values():
                for scope in (None, server.get("project_id")):
                    self.keys[scope].append(self.key(server))
            for keys in self.keys.values():
                keys.sort()
        store.watchers.append(self.watch)

    @staticmethod
    def key(server):
        return (server.get("created_at") or "", server["id"])

    def watch(self, op, data):
        path = op[1]
        if path[0] != "servers" or len(path) != 2:
            return
        old = data["servers"].get(path[1])
        new = op[2] if op[0] == "set" else None
        if old is not None and new is not None and self.key(old) == self.key(new) and \
                old.get("project_id") == new.get("project_id"):
            return
        if old is not None:
            for scope in (None, old.get("project_id")):
                keys = self.keys[scope]
                at = bisect.bisect_left(keys, self.key(old))
                if at < len(keys) and keys[at] == self.key(old):
                    del keys[at]
        if new is not None:
            for scope in (None, new.get("project_id")):
                bisect.insort(self.keys[scope], self.key(new))

    def newest_first(self, scope, after=None):
        """Server ids of a project (None: all), newest first, from just after the key
        after.  Read under the store's lock."""
        keys = self.keys.get(scope, ())
        at = len(keys) if after is None else bisect.bisect_left(keys, after)
        while at > 0:
            at -= 1
            yield keys[at][1]


def usage(data, project_id, user_id=None, index=None):
    """Live counts of what a project (or one of its users) holds (its servers' from the
    ServerUsage index when given one)."""
    used = {k: 0 for k in QUOTA_DEFAULTS}
    if index is not None:
        used.update(index.counts(project_id, user_id))
    for server in data["servers"].values() if index is None else ():
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
    return used


# § 17 views ---------------------------------------------------------------------------

SINCE_CACHE = {}                   # '2.47' -> (2, 47): views ask thousands of times


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
        self.memo = {}                  # what a handler computes once per request

    @property
    def store(self):
        return self.app.store

    def since(self, version):
        if isinstance(version, str):
            parsed = SINCE_CACHE.get(version)
            if parsed is None:
                parsed = SINCE_CACHE[version] = parse_version(version)
            version = parsed
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
        pairs = sorted([(k, v) for k, v in self.query_pairs if k != "marker"]
                       + [("marker", marker)], key=lambda pair: pair[0])
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
    if req.q("limit") is not None and int(req.q("limit")) == 0:
        return [], None
    page = items[:limit]
    more = len(page) == limit and limit > 0
    return page, (key(page[-1]) if more and page else None)


# § 18 API: versions and extensions ----------------------------------------------------

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
        raise NotFound()
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
    raise NotFound()


# § 19 API: flavors, extra specs, flavor access ----------------------------------------

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
    keys = [k for k in FLAVOR_SORT_KEYS if not (k == "rxtx_factor" and req.since("2.102"))]
    for name, value, allowed in (("sort_key", sort_key, keys),
                                 ("sort_dir", sort_dir, ["asc", "desc"])):
        if value not in allowed:
            raise BadRequest(f"Invalid input for query parameters {name}. Value: {value}. "
                             f"'{value}' is not one of {allowed!r}")
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
            if name is not None and not regex_match(name, f["name"]):
                continue
            flavors.append(f)
    field = FLAVOR_SORT_KEYS[sort_key]
    flavors.sort(key=lambda f: (f[field] is None, f[field] if f[field] is not None else 0,
                                f["seq"]), reverse=sort_dir == "desc")
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
    flavorid = str(uuid.uuid4()) if not flavorid else str(flavorid).strip()
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
    body = validate_body(req, tenant_access_schema("addTenantAccess"))
    tenant = body["addTenantAccess"]["tenant"]
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
    set_extra_specs(req, clean_extra_specs(req, body["extra_specs"]))
    return 200, body


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
    set_extra_specs(req, clean_extra_specs(req, body))
    return 200, body


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


# § 20 API: keypairs -------------------------------------------------------------------

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
        raise BadRequest("Keypair data is invalid: failed to generate X509 fingerprint. "
                         "Error message: not a PEM certificate") from None
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
                    return private, f.read().strip()
            LOG.warning("ssh-keygen failed (%s); generating the key in Python",
                        done.stderr.decode(errors="replace").strip())
    n, e, d, p, q = rsa_generate()
    blob = ssh_string(b"ssh-rsa") + ssh_mpint(e) + ssh_mpint(n)
    public = "ssh-rsa " + base64.b64encode(blob).decode("ascii") + " Generated-by-Nova"
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
    return query.get("user_id", [None])[0]


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
    check_keypair_quota(req, user_id)
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


def check_keypair_quota(req, user_id):
    data = req.store.data
    owned = data["keypairs"].get(user_id, {})
    limit = project_limits(data, req.ident.project_id, user_id)["key_pairs"]
    if limit >= 0 and len(owned) + 1 > limit:
        raise Forbidden("Quota exceeded, too many key pairs.")


def check_keypair_room(req, user_id, name):
    """Quota first, then the name (Nova's order: 403 before 409)."""
    check_keypair_quota(req, user_id)
    if name in req.store.data["keypairs"].get(user_id, {}):
        raise Conflict(f"Key pair '{name}' already exists.")


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


# § 21 API: limits, quota sets, quota classes ------------------------------------------

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


def quota_target(req, rule, persona, with_user=True, verify=True):
    """(project, user or None) of an os-quota-sets call, authorized and verified."""
    allowed = ["user_id"] if with_user else []
    query = validate_query(req, allowed, strict_since="2.75" if with_user else None)
    project_id = req.params["id"]
    authorize(req, rule, persona, project_id)
    if verify and not req.app.auth.project_exists(project_id):
        raise BadRequest(f"Project ID {project_id} is not a valid project.")
    return project_id, query.get("user_id", [None])[0]


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


def settable_quota(data, project_id, user_id, key):
    """(minimum, maximum) a quota may be set to, as Nova's get_settable_quotas (-1: none)."""
    users = data["user_quotas"].get(project_id, {})
    if user_id is None:
        explicit = [q[key] for q in users.values() if key in q and q[key] >= 0]
        return max(sum(explicit), usage(data, project_id)[key]), -1
    project_limit = project_limits(data, project_id)[key]
    used = usage(data, project_id, user_id)[key]
    if project_limit == -1:
        return used, -1
    others = sum(q[key] for u, q in users.items() if u != user_id and key in q and q[key] >= 0)
    return used, max(project_limit - others, 0)


def quota_sets_update(req):
    """PUT /os-quota-sets/{id}"""
    project_id, user_id = quota_target(req, "os_compute_api:os-quota-sets:update", "admin")
    body = validate_body(req, quota_update_schema("quota_set", quota_keys(req.version),
                                                  True))["quota_set"]
    force = bool_from_string(body.pop("force", False))
    values = {k: to_int_field(k, v, -1) for k, v in body.items()}

    def plan(data):
        for key, value in values.items():
            minimum, maximum = settable_quota(data, project_id, user_id, key)
            if force:
                continue
            if minimum != -1 and value != -1 and value < minimum:
                raise BadRequest(f"Quota limit {value} for {key} must be greater than or "
                                 f"equal to already used and reserved {minimum}.")
            if maximum != -1 and (value == -1 or value > maximum):
                raise BadRequest(f"Quota limit {value} for {key} must be less than or equal "
                                 f"to {maximum}.")
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
    project_id, user_id = quota_target(req, "os_compute_api:os-quota-sets:delete", "admin",
                                       verify=False)

    def plan(data):
        if user_id is None:
            return [["del", ["quotas", project_id]], ["del", ["user_quotas", project_id]]]
        return [["del", ["user_quotas", project_id, user_id]]]

    req.store.transaction(plan)
    return 202, None


def quota_class_name(req, update=False):
    name = req.params["id"]
    if not update:
        validate_query(req, (), strict_since="2.102")
    elif len(name) > 255:
        raise BadRequest(f"quota_class_name has {len(name)} characters, more than 255.")
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
    name = quota_class_name(req, update=True)
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


# § 22 API: availability zones ---------------------------------------------------------

def compute_zones(app):
    """The availability zones of the compute hosts."""
    return {host_zone(app, host) for host in app.compute_host_names()} or \
        {app.conf["availability_zone"]}


def availability_zones_index(req):
    """GET /os-availability-zone: a zone is available while one of its compute services
    is enabled."""
    validate_query(req, (), strict_since="2.102")
    enabled = {r["zone"] for r in service_records(req.app)
               if r["binary"] == "nova-compute" and not r["disabled"]}
    return 200, {"availabilityZoneInfo": [
        {"zoneName": zone, "zoneState": {"available": zone in enabled}, "hosts": None}
        for zone in sorted(compute_zones(req.app))]}


def availability_zones_detail(req):
    """GET /os-availability-zone/detail"""
    validate_query(req, (), strict_since="2.102")
    now = isotime_us(req.app.clock.now())
    zones = {}
    for record in service_records(req.app):
        hosts = zones.setdefault(record["zone"], {})
        hosts.setdefault(record["host"], {})[record["binary"]] = {
            "available": record["up"], "active": not record["disabled"], "updated_at": now}
    return 200, {"availabilityZoneInfo": [
        {"zoneName": zone, "zoneState": {"available": zone == "internal" or any(
            s["active"] for services in hosts.values() for s in services.values())},
         "hosts": hosts} for zone, hosts in sorted(zones.items())]}


# § 23 servers: states, lookups, views -------------------------------------------------

STATUS_BY_VM_STATE = {
    "active": "ACTIVE", "building": "BUILD", "stopped": "SHUTOFF", "resized": "VERIFY_RESIZE",
    "paused": "PAUSED", "suspended": "SUSPENDED", "rescued": "RESCUE", "error": "ERROR",
    "deleted": "DELETED", "soft-delete": "SOFT_DELETED", "shelved": "SHELVED",
    "shelved_offloaded": "SHELVED_OFFLOADED",
}
RESIZE_TASKS = ("resize_prep", "resize_migrating", "resize_migrated", "resize_finish")
REBUILD_TASKS = ("rebuilding", "rebuild_block_device_mapping", "rebuild_spawning")
STATUS_BY_TASK = {
    "active": dict([(t, "REBOOT") for t in ("rebooting", "reboot_pending", "reboot_started")]
                   + [(t, "HARD_REBOOT") for t in ("rebooting_hard", "reboot_pending_hard",
                                                    "reboot_started_hard")]
                   + [("updating_password", "PASSWORD"), ("migrating", "MIGRATING")]
                   + [(t, "REBUILD") for t in REBUILD_TASKS]
                   + [(t, "RESIZE") for t in RESIZE_TASKS]),
    "stopped": dict([(t, "RESIZE") for t in RESIZE_TASKS]
                    + [(t, "REBUILD") for t in REBUILD_TASKS]),
    "resized": {"resize_reverting": "REVERT_RESIZE"},
    "paused": {"migrating": "MIGRATING"},
    "error": {t: "REBUILD" for t in REBUILD_TASKS},
}
ALL_STATUSES = set(STATUS_BY_VM_STATE.values()) | {"REBOOT", "HARD_REBOOT", "PASSWORD",
                                                   "MIGRATING", "REBUILD", "RESIZE",
                                                   "REVERT_RESIZE", "UNKNOWN"}
PROGRESS_STATUSES = ("ACTIVE", "BUILD", "REBUILD", "RESIZE", "VERIFY_RESIZE", "MIGRATING")


def server_status(server):
    vm, task = server["vm_state"], server.get("task_state")
    return STATUS_BY_TASK.get(vm, {}).get(task) or STATUS_BY_VM_STATE.get(vm, "UNKNOWN")


def find_server(req, server_id, include_deleted=False):
    """The caller's server (any server for admins); 404 as Nova otherwise."""
    server = req.store.data["servers"].get(server_id)
    if server is None or (server["vm_state"] == "deleted" and not include_deleted) or (
            server["project_id"] != req.ident.project_id and not req.ident.is_admin):
        raise NotFound(f"Instance {server_id} could not be found.")
    return server


def host_id(server):
    if not server.get("host"):
        return ""
    return hashlib.sha224((server["project_id"] + server["host"]).encode()).hexdigest()


def server_addresses(server, with_ext=True):
    addresses = {}
    for port in server.get("ports", []):
        entries = addresses.setdefault(port["network"], [])
        kinds = [(addr, version, "fixed") for addr, version in port.get("ips", [])] + [
            (addr, 6 if ":" in addr else 4, "floating") for addr in port.get("floating", [])]
        for addr, version, kind in kinds:
            item = {"version": version, "addr": addr}
            if with_ext:
                item = {"OS-EXT-IPS-MAC:mac_addr": port["mac"], "version": version,
                        "addr": addr, "OS-EXT-IPS:type": kind}
            entries.append(item)
    return addresses


def server_image_view(req, server):
    if not server["image_ref"]:
        return ""
    view = {"id": server["image_ref"], "links": [
        {"rel": "bookmark", "href": req.bookmark_link("images", server["image_ref"])}]}
    if req.since("2.98"):
        view["properties"] = dict(server.get("image_properties") or {})
    return view


def server_flavor_view(req, server):
    flavor = server["flavor"]
    if not req.since("2.47"):
        return {"id": flavor["id"], "links": [
            {"rel": "bookmark", "href": req.bookmark_link("flavors", flavor["id"])}]}
    view = {"vcpus": flavor["vcpus"], "ram": flavor["ram"], "disk": flavor["disk"],
            "ephemeral": flavor["ephemeral"], "swap": flavor["swap"],
            "original_name": flavor["name"]}
    if policy_allows(req.ident, "reader", server["project_id"]):
        view["extra_specs"] = dict(flavor.get("extra_specs") or {})
    return view


def server_fault_view(req, server):
    fault = server.get("fault")
    view = {"code": fault["code"], "created": fault["created"], "message": fault["message"]}
    if fault.get("details") and (req.ident.is_admin or fault["code"] != 500):
        view["details"] = fault["details"]
    return view


def server_view(req, server, kind="show"):
    """A server as Nova shows it: kind is show, detail, update or rebuild."""
    status = server_status(server)
    full = kind in ("show", "detail") or req.since("2.75")
    view = {"accessIPv4": server.get("access_ip_v4") or "",
            "accessIPv6": server.get("access_ip_v6") or "",
            "addresses": server_addresses(server, with_ext=kind in ("show", "detail")),
            "created": stored_isotime(server["created_at"]),
            "flavor": server_flavor_view(req, server), "hostId": host_id(server),
            "id": server["id"], "image": server_image_view(req, server),
            "links": req.links("servers", server["id"]), "metadata": dict(server["metadata"]),
            "name": server["name"], "status": status, "tenant_id": server["project_id"],
            "user_id": server["user_id"],
            "updated": stored_isotime(server["updated_at"]),
            "OS-DCF:diskConfig": server.get("disk_config", "MANUAL")}
    if status in PROGRESS_STATUSES:
        view["progress"] = server.get("progress", 0)
    if server.get("fault") and server["vm_state"] in ("error", "deleted"):
        view["fault"] = server_fault_view(req, server)
    if kind == "rebuild" and "admin_pass" in server:
        view["adminPass"] = server["admin_pass"]
    if full:
        add_full_server_fields(req, server, view)
        if kind == "rebuild":
            view.pop("OS-EXT-SRV-ATTR:user_data", None)
    if kind == "rebuild":
        if req.since("2.54"):
            view["key_name"] = server.get("key_name")
        if req.since("2.57"):
            view["user_data"] = server.get("user_data")
    add_versioned_server_fields(req, server, view, kind)
    return view


def add_full_server_fields(req, server, view):
    admin = policy_allows(req.ident, "admin")
    view["OS-EXT-AZ:availability_zone"] = server["availability_zone"]
    view["config_drive"] = "True" if server.get("config_drive") else ""
    view["key_name"] = server.get("key_name")
    view["OS-SRV-USG:launched_at"] = server.get("launched_at")
    view["OS-SRV-USG:terminated_at"] = server.get("terminated_at")
    if server.get("ports") and server.get("security_groups"):
        view["security_groups"] = [{"name": n} for n in server["security_groups"]]
    if admin:
        view["OS-EXT-SRV-ATTR:host"] = server.get("host")
        view["OS-EXT-SRV-ATTR:instance_name"] = server["instance_name"]
        view["OS-EXT-SRV-ATTR:hypervisor_hostname"] = server.get("node")
    if req.since("2.3") and admin:
        view["OS-EXT-SRV-ATTR:hostname"] = server["hostname"]
        view["OS-EXT-SRV-ATTR:kernel_id"] = ""
        view["OS-EXT-SRV-ATTR:launch_index"] = server.get("launch_index", 0)
        view["OS-EXT-SRV-ATTR:ramdisk_id"] = ""
        view["OS-EXT-SRV-ATTR:reservation_id"] = server["reservation_id"]
        view["OS-EXT-SRV-ATTR:root_device_name"] = server.get("root_device_name")
        view["OS-EXT-SRV-ATTR:user_data"] = server.get("user_data")
    elif req.since("2.90"):
        view["OS-EXT-SRV-ATTR:hostname"] = server["hostname"]
    view["OS-EXT-STS:task_state"] = server.get("task_state")
    view["OS-EXT-STS:vm_state"] = server["vm_state"]
    view["OS-EXT-STS:power_state"] = server.get("power_state", NOSTATE)
    attached = [v for v in server.get("volumes", []) if v.get("id")]
    volumes = [{"id": v["id"]} for v in attached]
    if req.since("2.3"):
        for item, vol in zip(volumes, attached):
            item["delete_on_termination"] = vol.get("delete_on_termination", False)
    view["os-extended-volumes:volumes_attached"] = volumes
    if req.since("2.16") and admin:
        view["host_status"] = host_status(req.app, server, request_compute_services(req))


def request_compute_services(req):
    """{host: compute service record}, read once per request."""
    if "compute_services" not in req.memo:
        req.memo["compute_services"] = {r["host"]: r for r in service_records(req.app)
                                        if r["binary"] == "nova-compute"}
    return req.memo["compute_services"]


def add_versioned_server_fields(req, server, view, kind):
    if req.since("2.9"):
        view["locked"] = bool(server.get("locked"))
    if req.since("2.19"):
        view["description"] = server.get("description")
    if req.since("2.26"):
        view["tags"] = list(server.get("tags", []))
    if req.since("2.63"):
        view["trusted_image_certificates"] = server.get("trusted_image_certificates")
    if req.since("2.71") and kind != "detail":
        view["server_groups"] = list(server.get("server_groups", []))
    if req.since("2.73"):
        view["locked_reason"] = server.get("locked_reason")
    if req.since("2.96"):
        view["pinned_availability_zone"] = server.get("pinned_availability_zone")
    if req.since("2.100"):
        view["scheduler_hints"] = dict(server.get("scheduler_hints") or {})


# § 24 encoded views --------------------------------------------------------------------
#
# A server's view is the same bytes for every caller who sees it alike, until the server
# changes: servers/detail and server show send views kept encoded, and build only those
# of servers changed since.  A view is kept with the server's revision, which the store
# bumps after each change to the server (after, so a view built from the data before
# it is never taken for a view of the data after).  Callers see a server alike when
# they share the microversion, the links' base, and what policy lets them see of it:
# the admin fields, the flavor's extra specs, a fault's details, the host's status.
# A whole page of servers/detail in the default order is kept too, for the few latest
# (caller, query) pairs, until any server changes.

class ViewCache:
    """Encoded server views by server id and variant, for up to `capacity` servers
    (the least recently used go first)."""

    VARIANTS = 8                 # per server (microversions, callers); the oldest goes
    PAGES = 8                    # whole pages, by caller and query; the oldest goes

    def __init__(self, store, capacity):
        self.capacity = capacity
        self.revisions = {}      # server id -> revision: a new one after each change
        self.counter = itertools.count(1)
        self.generation = 0      # bumped when the whole servers collection is replaced
        self.entries = collections.OrderedDict()   # id -> (revision, {variant: bytes})
        self.pages = collections.OrderedDict()     # page key -> (servers revision, bytes)
        self.servers_revision = 0                  # a new one after any server's change
        self.lock = threading.Lock()
        self.hits = self.misses = self.page_hits = 0
        store.after.append(self.changed)

    def changed(self, op):
        path = op[1]
        if not path or path[0] != "servers":
            return
        self.servers_revision = next(self.counter)
        if len(path) == 1:
            with self.lock:
                self.generation += 1
                self.entries.clear()
            return
        server_id = path[1]
        if len(path) == 2 and op[0] == "del":     # gone for good
            with self.lock:
                self.entries.pop(server_id, None)
                self.revisions.pop(server_id, None)
            return
        self.revisions[server_id] = next(self.counter)   # never the same one twice

    def revision(self, server_id):
        return (self.generation, self.revisions.get(server_id, 0))

    def views(self, req, servers, kind):
        """The encoded views of servers (a list), building the ones not kept."""
        if not self.capacity:
            return [json_bytes(server_view(req, s, kind)) for s in servers]
        wanted = [(s, self.revision(s["id"]), view_variant(req, s, kind)) for s in servers]
        out = [None] * len(wanted)
        with self.lock:
            entries = self.entries
            for i, (server, revision, variant) in enumerate(wanted):
                entry = entries.get(server["id"])
                if entry is not None and entry[0] == revision:
                    out[i] = entry[1].get(variant)
                    if out[i] is not None:
                        entries.move_to_end(server["id"])
        built = []
        for i, (server, revision, variant) in enumerate(wanted):
            if out[i] is None:
                out[i] = json_bytes(server_view(req, server, kind))
                built.append(i)
        self.hits += len(out) - len(built)
        self.misses += len(built)
        if built:
            with self.lock:
                for i in built:
                    server, revision, variant = wanted[i]
                    if self.revision(server["id"]) != revision:
                        continue                 # changed meanwhile: this one is old
                    entry = self.entries.get(server["id"])
                    if entry is None or entry[0] != revision:
                        entry = self.entries[server["id"]] = (revision, {})
                    elif len(entry[1]) >= self.VARIANTS:      # the oldest goes
                        del entry[1][next(iter(entry[1]))]
                    entry[1][variant] = out[i]
                    self.entries.move_to_end(server["id"])
                while len(self.entries) > self.capacity:
                    self.entries.popitem(last=False)
        return out

    def page(self, key):
        """A kept page's bytes, or None; with the revision to keep a page built now."""
        revision = self.servers_revision
        if not self.capacity:
            return None, revision
        with self.lock:
            kept = self.pages.get(key)
            if kept is None or kept[0] != revision:
                return None, revision
            self.pages.move_to_end(key)
            self.page_hits += 1
            return kept[1], revision

    def keep_page(self, key, revision, body):
        """Keep a page built from data read after `revision` was current.  A server that
        changed meanwhile bumped it, so such a page is never served."""
        if not self.capacity:
            return
        with self.lock:
            if revision != self.servers_revision:
                return
            self.pages[key] = (revision, body)
            self.pages.move_to_end(key)
            while len(self.pages) > self.PAGES:
                self.pages.popitem(last=False)


def page_key(req, scope):
    """What a default-order page of servers/detail depends on besides the servers: the
    caller's roles and project, the request's shape, and (for an admin from 2.16 on) the
    status of every compute host."""
    ident = req.ident
    key = (req.version, req.legacy, req.base_url, req.project_in_url, ident.project_id,
           frozenset(ident.roles), scope, tuple(sorted(
               (name, tuple(values)) for name, values in req.query.items())))
    if policy_allows(ident, "admin") and req.since("2.16"):
        services = request_compute_services(req)
        key += tuple(sorted((host, host_status(req.app, {"host": host}, services))
                            for host in services))
    return key


def view_variant(req, server, kind):
    """What, besides the server, its view depends on for this caller (see §23)."""
    project = server["project_id"]
    memo = req.memo.setdefault("view_variants", {})
    variant = memo.get((kind, project))
    if variant is None:
        admin = policy_allows(req.ident, "admin")
        variant = memo[(kind, project)] = (
            kind, req.version, req.legacy, req.base_url, req.project_in_url, admin,
            policy_allows(req.ident, "reader", project), req.ident.is_admin,
            admin and req.since("2.16") and (kind in ("show", "detail") or req.since("2.75")))
    if not variant[-1]:
        return variant
    key = (kind, project, server.get("host"))
    with_host = memo.get(key)
    if with_host is None:
        with_host = memo[key] = variant + (host_status(req.app, server,
                                                       request_compute_services(req)),)
    return with_host


def encoded_body(key, items, tail=None):
    """b'{"key": [item, ...], more...}' from encoded items and a dict tail."""
    parts = [b'{"' + key.encode() + b'": [']
    for item in items:
        parts.append(item)
        parts.append(b", ")
    if items:
        parts.pop()
    parts.append(b"]")
    for name, value in (tail or {}).items():
        parts.append(b", " + json_bytes(name) + b": " + json_bytes(value))
    parts.append(b"}")
    return b"".join(parts)


# § 25 servers: the compute engine -----------------------------------------------------
#
# API handlers check and record a state change under the store's lock, answer,
# and hand the slow part to Compute, which runs it in a thread (one at a time
# per server) and records the outcome.

OPERATION = threading.local()      # request_id: the operation this thread runs for


class Compute:
    """Runs server operations against the driver and records their outcome."""

    def __init__(self, app):
        self.app = app
        self.store = app.store
        self.locks = collections.defaultdict(threading.Lock)
        self.threads = set()
        self.threads_lock = threading.Lock()
        self.vif_waiters = {}          # server id -> {port id: Event}, while a build waits
        self.reimage_waiters = {}      # (server id, volume id) -> Event, while a rebuild waits
        self.vif_lock = threading.Lock()
        self.build_slots = app.conf.get("max_concurrent_builds", 10)   # 0: no limit
        self.build_queue = queue.Queue()   # builds waiting for one of the build workers
        self.build_workers = 0
        self.queued = 0                    # builds queued or running there

    def driver_of(self, server):
        """The driver of the host the server is on (the first host's before it has one)."""
        return self.app.host_driver(server.get("host"))

    def now(self):
        return isotime_us(self.app.clock.now())

    # -- records -------------------------------------------------------------------
    def update(self, server_id, **fields):
        """Set fields of a server record (durably) and bump updated_at."""
        self.store.wait_durable(self.update_soon(server_id, **fields))

    def update_soon(self, server_id, **fields):
        """update() without waiting for the disk: returns what store.wait_durable takes."""
        def plan(data):
            server = data["servers"].get(server_id)
            if server is None:
                return []
            fields.setdefault("updated_at", self.now())
            if server.get("task_state") == "deleting" and "task_state" in fields and \
                    fields.get("vm_state") not in ("deleted", "error"):
                # a delete came in while this operation ran: it stays on record (a
                # restart finishes it) until the delete itself ends
                fields["task_state"] = "deleting"
            return [["set", ["servers", server_id], dict(server, **fields)]]
        return self.store.apply(plan)

    def fail(self, server_id, exc, vm_state="error"):
        """Record a failed operation: ERROR with a fault, as Nova does."""
        code = 503 if isinstance(exc, Unavailable) else 500
        message = str(getattr(exc, "message", None) or exc) or type(exc).__name__
        LOG.error("server %s: %s", server_id, message)
        self.update(server_id, vm_state=vm_state, task_state=None,
                    fault={"code": code, "message": message[:255], "created":
                           isotime(self.app.clock.now()), "details": message})

    def record_action(self, req, server_id, action):
        """Start an instance action (os-instance-actions) for this request."""
        entry = {"action": action, "instance_uuid": server_id, "request_id": req.request_id,
                 "user_id": req.ident.user_id, "project_id": req.ident.project_id,
                 "start_time": self.now(), "finish_time": None, "message": None,
                 "updated_at": self.now(), "events": []}

        def plan(data):
            actions = unpack(data["instance_actions"].get(server_id, []))
            actions.append(entry)
            return [["set", ["instance_actions", server_id], actions]]
        self.store.transaction(plan)
        return req.request_id

    def finish_event(self, server_id, request_id, event, started, error=None):
        def plan(data):
            actions = unpack(data["instance_actions"].get(server_id, []))
            for action in actions:
                if action["request_id"] == request_id:
                    action["events"] = action["events"] + [{
                        "event": event, "start_time": started, "finish_time": self.now(),
                        "result": "Error" if error else "Success",
                        "traceback": error, "host": self.store.data["servers"].get(
                            server_id, {}).get("host") or self.app.conf["host"],
                        "details": error}]
                    action["finish_time"] = self.now()
                    action["updated_at"] = self.now()
                    if error:
                        action["message"] = "Error"
            return [["set", ["instance_actions", server_id], actions]]
        self.store.transaction(plan)

    # -- running operations --------------------------------------------------------
    def run(self, server_id, request_id, event, work, on_error=None, build=False,
            delayed=False):
        """Run work(server) in the background, serialised per server.  A build waits
        for one of --max-concurrent-builds build workers (as Nova's option)."""
        def body():
            started = self.now()
            with self.locks[server_id]:
                server = self.store.data["servers"].get(server_id)
                if server is None or server.get("vm_state") == "deleted":
                    return      # (a build still queued when its server was deleted)
                error = None
                OPERATION.request_id = request_id
                try:
                    work(server)
                except (DriverError, Unavailable, OSError, Fault) as e:
                    error = str(getattr(e, "message", None) or e)
                    (on_error or self.fail)(server_id, e)
                except Exception as e:  # noqa: BLE001 - a bug must not kill the worker
                    LOG.exception("server %s: %s failed", server_id, event)
                    error = repr(e)
                    (on_error or self.fail)(server_id, e)
                finally:
                    OPERATION.request_id = None
                if request_id:
                    self.finish_event(server_id, request_id, event, started, error)

        delay = self.app.faults.build_delay(self.store.data["servers"].get(server_id, {})) \
            if build and not delayed and self.app.faults is not None else 0
        if delay:                        # failure injection: the build waits first
            def later():
                time.sleep(delay)
                self.run(server_id, request_id, event, work, on_error, build, delayed=True)
            thread = threading.Thread(target=self._tracked, args=(later,), daemon=True,
                                      name=f"delay-{server_id[:8]}")
            with self.threads_lock:
                self.threads.add(thread)
            thread.start()
            return
        if build and self.build_slots:
            with self.threads_lock:
                self.queued += 1
                start = self.build_workers < min(self.build_slots, self.queued)
                if start:
                    self.build_workers += 1
            self.build_queue.put(body)
            if start:
                threading.Thread(target=self._build_worker, daemon=True,
                                 name="build-worker").start()
            return
        thread = threading.Thread(target=self._tracked, args=(body,), daemon=True,
                                  name=f"{event}-{server_id[:8]}")
        with self.threads_lock:
            self.threads.add(thread)
        thread.start()

    def _build_worker(self):
        """Run queued builds; ends after 5 idle seconds."""
        while True:
            try:
                body = self.build_queue.get(timeout=5)
            except queue.Empty:
                with self.threads_lock:
                    if self.build_queue.empty():
                        self.build_workers -= 1
                        return
                continue
            try:
                body()
            finally:
                with self.threads_lock:
                    self.queued -= 1

    def _tracked(self, body):
        try:
            body()
        finally:
            with self.threads_lock:
                self.threads.discard(threading.current_thread())

    def wait_idle(self, timeout=60):
        """Wait for every background operation to finish (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.threads_lock:
                threads, queued = list(self.threads), self.queued
            if not threads and not queued:
                return True
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            if queued:
                time.sleep(0.002)
        return False

    # -- building --------------------------------------------------------------------
    def instance_dir(self, server):
        return os.path.join(self.app.conf["instances_dir"], server["id"])

    def build(self, server, admin_pass, ident=None):
        """scheduling -> networking -> block_device_mapping -> spawning -> ACTIVE.

        ident is the caller: volumes made for the server are made with its token."""
        server_id = server["id"]
        if self.app.faults is not None:
            self.app.faults.fail_build(server)
        self.update(server_id, task_state="scheduling")
        self.place(server_id, server.get("requested_host"))
        self.update(server_id, task_state="networking")
        server = self.store.data["servers"][server_id]
        if server.get("requested_networks"):
            self.allocate_ports(server_id)
        for port in server.get("ports", []):
            if port.get("fixed_ip"):
                self.driver_of(server).reserve_address(port)
        self.update(server_id, task_state="block_device_mapping")
        disks = self.prepare_disks(server)
        if server.get("volumes"):
            self.prepare_volumes(server_id, ident)
        self.update(server_id, task_state="spawning")
        server = self.store.data["servers"][server_id]
        if server.get("ports"):
            self.driver_of(server).define_filter(server,
                                                 server_filter_xml(server, self.store.data))
        drive = self.make_config_drive(server, admin_pass) if server.get("config_drive") else None
        waiters = self.expect_plugged(server)
        self.driver_of(server).spawn(server, disks, drive)
        self.wait_plugged(server, waiters)
        for vol in server.get("volumes", []):
            self.app.volumes.attachment_complete(ident, vol["attachment_id"])
        self.update(server_id, vm_state="active", task_state=None, power_state=RUNNING,
                    launched_at=self.now(), progress=0)
        self.refresh_addresses(server_id)

    def place(self, server_id, requested=None, exclude=(), flavor=None, force=False,
              moving=False):
        """Choose a host with the scheduler and record the server there (its claim);
        returns the host.  No host fits -> NoValidHost.  A move (moving) keeps its
        source as migration_source, which holds the old flavor there until it ends;
        flavor is the flavor the server will have there."""
        with self.app.scheduler_lock:
            server = self.store.data["servers"][server_id]
            numa, claimed = {}, {}
            asked = sorted(k for k in ((flavor or server["flavor"]).get("extra_specs") or {})
                           if re.fullmatch(r"(resources|trait)[A-Za-z0-9_-]*:.+", k))
            if asked and self.app.placement is None:
                raise NoValidHost("minivan gives guests Placement resources and traits "
                                  f"({', '.join(asked)}) only where the cloud has Placement")
            if self.app.placement is not None:
                host, claimed = place_with_placement(
                    self.app, server, flavor or server["flavor"], requested, exclude, force,
                    moving, numa)
            else:
                host = schedule(self.app, server, flavor or server["flavor"],
                                requested=requested, exclude=exclude, force=force,
                                numa_out=numa)
            changes = {"host": host, "node": host, "numa_topology": numa.get("topology"),
                       "availability_zone": host_zone(self.app, host), **claimed}
            if moving:
                changes.update(move_consumer=claimed.get("move_consumer"),
                               migration_source=server.get("host"),
                               old_numa_topology=server.get("numa_topology"),
                               new_flavor=flavor if flavor is not None and
                               flavor != server["flavor"] else None)
            # the claim counts from here; the next placement need not wait for the disk
            seq = self.update_soon(server_id, **changes)
        self.store.wait_durable(seq)
        return host

    def prepare_disks(self, server):
        directory = self.instance_dir(server)
        image = self.app.images.get(server["image_ref"]) if server["image_ref"] else None
        if server["image_ref"] and image is None:
            raise DriverError(f"Image {server['image_ref']} could not be found.")
        base = image_base(self.app, image) if image else None
        return create_server_disks(directory, base, server)

    def make_config_drive(self, server, admin_pass):
        path = os.path.join(self.instance_dir(server), "disk.config")
        write_config_drive(path, config_drive_files(self.app, server, admin_pass))
        return path

    def build_failed(self, server_id, exc):
        """A failed build leaves nothing behind: no domain, disks or claim; the ports and
        volumes it made are deleted and the ones it was given are handed back.  Those
        that could not be released stay on record, for the server's delete to retry."""
        server = self.store.data["servers"].get(server_id)
        kept = self.cleanup(server, failed_build=True) if server is not None else {}
        if isinstance(exc, ImageUnacceptable):     # as Nova's BuildAbortException
            exc = DriverError(f"Build of instance {server_id} aborted: {exc}")
        self.fail(server_id, exc)
        self.update(server_id, power_state=NOSTATE, host=None, node=None,   # no claim left
                    **kept)

    def cleanup(self, server, keep_volumes=False, failed_build=False):
        """Remove the domain, its filter and files; the volumes' attachments end (and
        delete_on_termination volumes go) unless keep_volumes (shelve offload).  A failed
        build (failed_build) also deletes the volumes it made; returns the ports and
        volumes that could not be released."""
        try:
            if self.app.drivers and (server.get("host") or not server.get("launched_at")):
                driver = self.driver_of(server)
                driver.destroy(server)
                for port in server.get("ports", []):
                    if port.get("fixed_ip"):
                        driver.release_address(port)
                driver.undefine_filter(server)
                driver.remove_files(self.instance_dir(server))
                if server.get("migration_source") not in (None, server.get("host")):
                    self.app.host_driver(server["migration_source"]).remove_files(
                        self.instance_dir(server))
        except (DriverError, Unavailable) as e:
            LOG.warning("server %s: removing its domain failed: %s", server["id"], e)
        ports = self.release_ports(server, unbind_only=keep_volumes)
        if keep_volumes:
            self.disconnect_volumes(server)
            volumes = server.get("volumes", [])
        else:
            volumes = self.release_volumes(server, made_too=failed_build)
        shutil.rmtree(self.instance_dir(server), ignore_errors=True)
        return {"ports": ports, "volumes": volumes}

    def refresh_filters(self, project_id):
        """Re-write the network filters of a project's servers after its security groups,
        their rules or its servers' addresses changed (nothing to do where no host
        filters)."""
        if not any(driver.firewall for driver in self.app.drivers.values()):
            return
        data = self.store.data
        for server in list(data["servers"].values()):
            if server["project_id"] != project_id or not server.get("ports") or \
                    server["vm_state"] in ("deleted", "building", "shelved_offloaded"):
                continue
            driver = self.app.drivers.get(server.get("host"))
            if driver is None or not driver.firewall:
                continue
            try:
                driver.define_filter(server, server_filter_xml(server, data))
            except (DriverError, Unavailable) as e:
                LOG.warning("server %s: updating its network filter failed: %s",
                            server["id"], e)

    # -- Neutron ports ------------------------------------------------------------------
    def neutron(self):
        neutron = self.app.network
        if neutron is None:
            raise Unavailable("The network service is unreachable.")
        return neutron

    def allocate_ports(self, server_id):
        """The server's Neutron ports, made (or taken) and bound to its host."""
        server = self.store.data["servers"][server_id]
        for request in server["requested_networks"]:
            record = self.make_port(server, request)
            self.change_ports(server_id, lambda ports, r=record: ports + [r])
        self.update(server_id, requested_networks=[])

    def make_port(self, server, request):
        """One Neutron port for the server, bound to its host: the requested port, or a
        new one on the requested network (with its fixed IP and security groups)."""
        neutron = self.neutron()
        spec = {"device_id": server["id"], "binding:host_id": server["host"],
                "device_owner": "compute:" + (server.get("availability_zone") or "nova")}
        allocation = ((server.get("port_allocations") or {}).get(server["host"]) or {}).get(
            request["port_id"])
        if allocation:          # the providers Placement gave its resource request (§32)
            spec["binding:profile"] = {"allocation": allocation}
        try:
            if request["port_id"]:
                port, created = neutron.update_port(request["port_id"], spec), False
            else:
                network = neutron.network(request["network_id"]) or {}
                spec.update(network_id=request["network_id"], project_id=server["project_id"])
                if request["fixed_ip"]:
                    spec["fixed_ips"] = [{"ip_address": request["fixed_ip"]}]
                if server.get("security_group_ids") and \
                        network.get("port_security_enabled", True):
                    spec["security_groups"] = server["security_group_ids"]
                port, created = neutron.create_port(spec), True
            network = neutron.network(port["network_id"]) or {}
        except NetworkError as e:
            raise DriverError(f"Network setup failed: {e.message}") from None
        return neutron_port_record(port, network.get("name") or port["network_id"], created,
                                   request.get("tag"))

    def bind_ports(self, server_id, host):
        """Bind the server's Neutron ports to a host (None: unbound) and learn how to
        plug them there."""
        server = self.store.data["servers"].get(server_id) or {}
        ports = [p for p in server.get("ports", []) if p.get("neutron")]
        if not ports:
            return
        neutron = self.neutron()
        bound = {}
        allocations = (server.get("port_allocations") or {}).get(host) or {}
        for port in ports:
            spec = {"binding:host_id": host}
            if allocations.get(port["id"]):
                spec["binding:profile"] = {"allocation": allocations[port["id"]]}
            try:
                bound[port["id"]] = neutron.update_port(port["id"], spec)
            except NetworkError as e:
                raise DriverError(f"Binding port {port['id']} failed: {e.message}") from None

        def rebound(current):
            return [dict(p, vif_type=bound[p["id"]].get("binding:vif_type"),
                         vif_details=bound[p["id"]].get("binding:vif_details") or {})
                    if p["id"] in bound else p for p in current]
        self.change_ports(server_id, rebound)

    def release_ports(self, server, unbind_only=False):
        """Ports minivan made go with the server; the ones it was given are handed back
        (unbound, no device).  unbind_only (shelve offload) keeps them all, unbound."""
        ports = [p for p in server.get("ports", []) if p.get("neutron")]
        if not ports:
            return []
        kept = []
        for port in ports:
            try:
                neutron = self.neutron()
                if unbind_only:
                    neutron.update_port(port["id"], {"binding:host_id": None})
                    kept.append(port)
                elif port.get("created"):
                    neutron.delete_port(port["id"])
                else:
                    neutron.update_port(port["id"], {"device_id": "", "device_owner": "",
                                                     "binding:host_id": None})
            except NetworkError as e:
                if e.status != 404:              # a port already gone is released
                    LOG.warning("server %s: releasing port %s failed: %s", server["id"],
                                port["id"], e)
                    kept.append(port)
            except Unavailable as e:
                LOG.warning("server %s: releasing port %s failed: %s", server["id"],
                            port["id"], e)
                kept.append(port)
        return kept

    def expect_plugged(self, server):
        """Waiters for Neutron's network-vif-plugged events of the server's ports, set up
        before they are plugged (a simulated host plugs nothing)."""
        ports = [p["id"] for p in server.get("ports", []) if p.get("neutron")]
        if not ports or not self.app.conf["vif_plugging_timeout"] or \
                self.driver_of(server).simulated:
            return {}
        waiters = {port_id: threading.Event() for port_id in ports}
        with self.vif_lock:
            self.vif_waiters[server["id"]] = waiters
        return waiters

    def wait_plugged(self, server, waiters):
        deadline = time.monotonic() + self.app.conf["vif_plugging_timeout"]
        try:
            for port_id, event in waiters.items():
                if event.wait(max(0.0, deadline - time.monotonic())):
                    continue
                if self.app.conf["vif_plugging_is_fatal"]:
                    raise DriverError("Virtual Interface creation failed")
                LOG.warning("server %s: port %s was not reported plugged in time",
                            server["id"], port_id)
        finally:
            with self.vif_lock:
                self.vif_waiters.pop(server["id"], None)

    def vif_plugged(self, server_id, port_id):
        with self.vif_lock:
            event = self.vif_waiters.get(server_id, {}).get(port_id)
        if event is not None:
            event.set()

    def refresh_ports(self, server):
        """network-changed: the server's Neutron ports as Neutron has them now."""
        neutron = self.neutron()
        fresh, floating = {}, {}
        for port in server.get("ports", []):
            if port.get("neutron"):
                fresh[port["id"]] = neutron.port(port["id"])
                floating[port["id"]] = [f["floating_ip_address"] for f in
                                        neutron.floating_ips(port_id=port["id"])]

        def changed(current):
            result = []
            for p in current:
                if p["id"] in fresh:
                    if fresh[p["id"]] is None:
                        continue                    # deleted in Neutron meanwhile
                    new = neutron_port_record(fresh[p["id"]], p["network"], p["created"])
                    p = dict(p, ips=new["ips"], subnet_ids=new["subnet_ids"],
                             floating=floating[p["id"]])
                result.append(p)
            return result
        self.change_ports(server["id"], changed)

    # -- volumes ----------------------------------------------------------------------
    def set_volume(self, server_id, vol):
        """Add or replace (by bdm_uuid) one volume mapping of the server record."""
        def plan(data):
            server = data["servers"].get(server_id)
            if server is None:
                return []
            vols = [v for v in server.get("volumes", []) if v["bdm_uuid"] != vol["bdm_uuid"]]
            vols.append(vol)
            vols.sort(key=lambda v: (v.get("boot_index") != 0, v.get("target") or ""))
            return [["set", ["servers", server_id, "volumes"], vols]]
        self.store.transaction(plan)

    def drop_volume(self, server_id, bdm_uuid):
        def plan(data):
            server = data["servers"].get(server_id)
            if server is None:
                return []
            return [["set", ["servers", server_id, "volumes"],
                     [v for v in server.get("volumes", []) if v["bdm_uuid"] != bdm_uuid]]]
        self.store.transaction(plan)

    def prepare_volumes(self, server_id, ident):
        """Make the volumes the server's mappings ask for, reserve and connect each one
        (Cinder's attachment update with this host's connector gives the connection)."""
        cinder = self.app.volumes
        if cinder is None:
            raise DriverError("the block storage service is gone from the catalog")
        server = self.store.data["servers"][server_id]
        for vol in list(server.get("volumes", [])):
            vol = dict(vol)
            src = vol.get("source") or {}
            if not vol.get("id"):
                made = cinder.create(ident, src["size"], name=f"{server['name']}-blank-vol"
                                     if src["type"] == "blank" else None,
                                     snapshot_id=src.get("snapshot_id"),
                                     image_id=src.get("image_id"),
                                     volume_type=src.get("volume_type"))
                vol["id"], vol["created"] = made["id"], True
                self.set_volume(server_id, vol)
                cinder.wait(ident, vol["id"])
            if not vol.get("attachment_id"):
                vol["attachment_id"] = cinder.attachment_create(ident, vol["id"],
                                                                server_id)["id"]
                self.set_volume(server_id, vol)
            self.connect_volume(server, vol, ident)

    def connect_volume(self, server, vol, ident):
        """Give a reserved volume's attachment this host's connector: its connection."""
        attachment = self.app.volumes.attachment_update(
            ident, vol["attachment_id"], dict(host_connector(self.app.conf),
                                              mountpoint=vol["device"]))
        vol = dict(vol, connection_info=attachment.get("connection_info") or {})
        volume_source(vol["connection_info"], self.app.conf["volume_mount_base"],
                      self.driver_of(server).mount_share)
        vol["encryption"] = volume_encryption(self.app, ident, vol)
        self.set_volume(server["id"], vol)

    def disconnect_volumes(self, server):
        """Shelve offload, as Nova: each volume stays the server's (a new attachment with
        no host connector holds it) while its connection to this host ends."""
        cinder = self.app.volumes if server.get("volumes") else None
        if cinder is None:
            return
        for vol in server.get("volumes", []):
            if not vol.get("id") or not vol.get("attachment_id"):
                continue
            held = cinder.attachment_create(None, vol["id"], server["id"])
            cinder.attachment_delete(None, vol["attachment_id"])
            self.set_volume(server["id"], dict(vol, attachment_id=held["id"],
                                               connection_info=None))

    def release_volumes(self, server, made_too=False):
        """Delete the server's attachments; delete the volumes marked
        delete_on_termination (and with made_too, the ones minivan made for it) once
        Cinder has let go of them.  Returns the volumes that could not be released."""
        volumes = server.get("volumes", [])
        cinder = self.app.volumes if volumes else None
        if cinder is None:
            return list(volumes)
        kept = []
        for vol in volumes:
            try:
                if vol.get("attachment_id"):
                    cinder.attachment_delete(None, vol["attachment_id"])
                if vol.get("id") and (vol.get("delete_on_termination") or
                                      made_too and vol.get("created")):
                    cinder.wait(None, vol["id"], want=("available", "error"), timeout=120)
                    cinder.delete(None, vol["id"])
            except VolumeGone:
                continue                            # released already
            except (VolumeError, DriverError, Unavailable) as e:
                LOG.warning("server %s: releasing volume %s failed: %s", server["id"],
                            vol.get("id"), e)
                kept.append(vol)
        return kept

    def attach_volume(self, server, vol, ident):
        """Connect a reserved volume and plug it into the guest."""
        cinder = self.app.volumes
        try:
            if server["vm_state"] != "shelved_offloaded":
                attachment = cinder.attachment_update(ident, vol["attachment_id"], dict(
                    host_connector(self.app.conf), mountpoint=vol["device"]))
                vol = dict(vol, connection_info=attachment.get("connection_info") or {})
                vol["encryption"] = volume_encryption(self.app, ident, vol)
                self.set_volume(server["id"], vol)
                current = self.store.data["servers"][server["id"]]
                self.driver_of(current).attach_volume(current, vol)
            cinder.attachment_complete(ident, vol["attachment_id"])
        except (DriverError, Unavailable, VolumeError) as e:
            self.drop_volume(server["id"], vol["bdm_uuid"])
            self.end_volume_use(server["id"], "attachment_delete", vol["id"],
                                vol["attachment_id"])
            raise DriverError(f"attaching volume {vol['id']} failed: {e}") from None

    def detach_volume(self, server, vol):
        """Unplug the volume, then end its attachment in Cinder."""
        cinder = self.app.volumes
        self.drop_volume(server["id"], vol["bdm_uuid"])
        current = self.store.data["servers"][server["id"]]
        try:
            if vol.get("connection_info") and self.driver_of(current).exists(current):
                self.driver_of(current).detach_volume(current, vol)
        except (DriverError, Unavailable) as e:
            self.set_volume(server["id"], vol)
            self.end_volume_use(server["id"], "roll_detaching", vol["id"])
            raise DriverError(f"detaching volume {vol['id']} failed: {e}") from None
        try:
            self.driver_of(current).volume_secret(vol, remove=True)
        except (DriverError, Unavailable) as e:
            LOG.warning("server %s: the secret of volume %s stays: %s", server["id"],
                        vol["id"], e)
        cinder.attachment_delete(None, vol["attachment_id"])

    def end_volume_use(self, server_id, kind, volume_id, attachment_id=None):
        """A clean-up call to Cinder (VolumeCleanups): made now, or kept and made again;
        a failure also shows as a failed event of the operation running."""
        error = self.app.volume_cleanups.do(server_id, kind, volume_id, attachment_id)
        if error:
            self.record_cleanup_failure(server_id, f"{kind} of volume {volume_id} failed "
                                        f"({error}); minivan makes it again until Cinder "
                                        f"takes it")

    def record_cleanup_failure(self, server_id, message):
        request_id = getattr(OPERATION, "request_id", None)
        if request_id:
            self.finish_event(server_id, request_id, "compute_volume_cleanup", self.now(),
                              message)

    def swap_volume(self, server, old, new_id, attachment_id):
        """Move the guest from a migrating volume to its new one, then tell Cinder."""
        cinder = self.app.volumes
        new = dict(old, id=new_id, attachment_id=attachment_id)
        try:
            attachment = cinder.attachment_update(None, attachment_id, dict(
                host_connector(self.app.conf), mountpoint=old["device"]))
            new["connection_info"] = attachment.get("connection_info") or {}
            new["encryption"] = volume_encryption(self.app, None, new)
            self.driver_of(server).swap_volume(server, old, new)
            cinder.attachment_complete(None, attachment_id)
        except (DriverError, Unavailable, VolumeError) as e:
            self.end_volume_use(server["id"], "attachment_delete", new_id, attachment_id)
            self.end_volume_use(server["id"], "roll_detaching", old["id"])
            raise DriverError(f"swapping volume {old['id']} failed: {e}") from None
        self.set_volume(server["id"], new)
        try:
            done = cinder.call(None, "POST", f"/volumes/{old['id']}/action", {
                "os-migrate_volume_completion": {"new_volume": new_id, "error": False}})
            self.set_volume(server["id"], dict(new, id=(done or {}).get("save_volume_id",
                                                                         new_id)))
        except (VolumeError, Unavailable) as e:
            LOG.error("server %s: finishing the swap of volume %s in Cinder failed: %s",
                      server["id"], old["id"], e)
            self.record_cleanup_failure(server["id"], f"os-migrate_volume_completion of "
                                        f"volume {old['id']} failed: {e}")
        self.end_volume_use(server["id"], "attachment_delete", old["id"],
                            old["attachment_id"])

    def volume_snapshot_create(self, server, volume_id, info):
        """Cinder's NFS snapshot of an attached volume: the guest's disk moves onto the
        qcow2 overlay Cinder made (new_file); Cinder hears 'creating' at 90%."""
        cinder = self.app.volumes
        vol = next(v for v in server.get("volumes", []) if v.get("id") == volume_id)
        try:
            self.driver_of(server).snapshot_volume(server, vol, info["new_file"])
        except (DriverError, Unavailable) as e:
            cinder.snapshot_status(info["snapshot_id"], "error")
            raise DriverError(f"snapshot of volume {volume_id} failed: {e}") from None
        cinder.snapshot_status(info["snapshot_id"], "creating")
        cinder.wait_snapshot_settled(info["snapshot_id"], "creating")
        self.refresh_connection(server["id"], volume_id)

    def volume_snapshot_delete(self, server, volume_id, snapshot_id, info):
        """Merge a deleted snapshot's file out of the guest's backing chain."""
        cinder = self.app.volumes
        vol = next(v for v in server.get("volumes", []) if v.get("id") == volume_id)
        try:
            self.driver_of(server).merge_volume_snapshot(server, vol, info.get("file_to_merge"),
                                              info.get("merge_target_file"))
        except (DriverError, Unavailable) as e:
            cinder.snapshot_status(snapshot_id, "error_deleting")
            raise DriverError(f"deleting a snapshot of volume {volume_id} failed: {e}") \
                from None
        cinder.snapshot_status(snapshot_id, "deleting")
        self.refresh_connection(server["id"], volume_id)

    def refresh_connection(self, server_id, volume_id):
        """Read the volume's connection info again from its Cinder attachment."""
        server = self.store.data["servers"].get(server_id) or {}
        vol = next((v for v in server.get("volumes", []) if v.get("id") == volume_id), None)
        if vol is None or not vol.get("attachment_id"):
            return
        attachment = self.app.volumes.attachment_get(vol["attachment_id"])
        if attachment.get("connection_info"):
            self.set_volume(server_id, dict(vol, connection_info=attachment["connection_info"]))

    def extend_volume(self, server, volume_id):
        """A volume-extended event: tell the guest its disk grew."""
        vol = next((v for v in server.get("volumes", []) if v.get("id") == volume_id), None)
        if vol is None or self.app.volumes is None:
            return
        volume = self.app.volumes.get(None, volume_id)
        if volume is not None and vol.get("connection_info"):
            self.driver_of(server).resize_volume(server, vol, int(volume["size"]) * 2 ** 30)

    def refresh_addresses(self, server_id):
        """Learn each port's address from libvirt (DHCP leases) and record it."""
        server = self.store.data["servers"].get(server_id)
        if server is None or not server.get("ports") or self.app.driver is None:
            return
        try:
            found = self.driver_of(server).interface_addresses(server)
        except (DriverError, Unavailable):
            return

        before = {p["id"]: p.get("ips") for p in server.get("ports", [])}

        def with_addresses(ports):
            """The server's current ports (read under the lock) with what libvirt knows."""
            result = []
            for port in ports:
                ips = None if port.get("neutron") else found.get(port["mac"].lower())
                if port.get("fixed_ip"):
                    ips = [(port["fixed_ip"], 6 if ":" in port["fixed_ip"] else 4)]
                result.append(dict(port, ips=[list(x) for x in ips]) if ips else port)
            return result

        self.change_ports(server_id, with_addresses)
        now = self.store.data["servers"].get(server_id) or {}
        if {p["id"]: p.get("ips") for p in now.get("ports", [])} != before:
            self.refresh_filters(server["project_id"])

    def change_ports(self, server_id, change):
        """Replace the server's ports with change(current ports), atomically: NIC attach,
        detach and address learning never overwrite each other."""
        def plan(data):
            server = data["servers"].get(server_id)
            if server is None:
                return []
            ports = change(list(server.get("ports", [])))
            if ports == server.get("ports", []):
                return []
            return [["set", ["servers", server_id], dict(server, ports=ports,
                                                         updated_at=self.now())]]
        self.store.transaction(plan)

    def delete(self, server):
        """Remove the domain and disks; the record stays, as DELETED."""
        self.cleanup(server)
        now = self.now()
        self.update(server["id"], vm_state="deleted", task_state=None, power_state=NOSTATE,
                    terminated_at=now, deleted_at=now)
        self.leave_groups(server["id"])
        self.refresh_filters(server["project_id"])     # its addresses leave group rules

    def leave_groups(self, server_id):
        def plan(data):
            return [["set", ["server_groups", gid, "members"],
                     [m for m in group["members"] if m != server_id]]
                    for gid, group in data["server_groups"].items()
                    if server_id in group["members"]]
        self.store.transaction(plan)

    # -- start-up and the power-state sweep ------------------------------------------
    def servers_on(self, host):
        """The stored servers of a compute host; those with no host count as the first's."""
        first = next(iter(self.app.drivers), None)
        return [s for s in list(self.store.data["servers"].values())
                if (s.get("host") or first) == host]

    def reconcile(self, hosts=None):
        """Make stored servers and libvirt domains agree after a (re)start of minivan, or
        of the connection to a host (hosts: those hosts only)."""
        for project_id in {s["project_id"] for s in self.store.data["servers"].values()}:
            self.refresh_filters(project_id)
        for host in hosts or self.app.compute_host_names():
            try:
                domains = self.app.drivers[host].own_domains()
            except (DriverError, Unavailable) as e:
                LOG.error("cannot reconcile the servers of host %s: %s", host, e)
                continue
            for server in self.servers_on(host):
                try:
                    with self.locks[server["id"]]:
                        self.reconcile_one(self.store.data["servers"][server["id"]], domains)
                except (DriverError, Unavailable, OSError) as e:
                    self.fail(server["id"], e)
            self.remove_moved_domains(host, domains)

    def remove_moved_domains(self, host, domains):
        """A host that comes back after its servers were evacuated still has their
        domains: undefine them (their disks live on, shared, with the servers)."""
        for server_id in domains:
            server = self.store.data["servers"].get(server_id)
            if server is None or not server.get("host") or server["host"] == host or \
                    server.get("migration_source") == host:
                continue
            LOG.info("server %s now lives on %s: removing its old domain from %s",
                     server_id, server["host"], host)
            try:
                self.app.drivers[host].destroy(server)
                self.app.drivers[host].undefine_filter(server)
            except (DriverError, Unavailable) as e:
                LOG.warning("server %s: removing its old domain failed: %s", server_id, e)

    def reconcile_one(self, server, domains):
        server_id, vm, task = server["id"], server["vm_state"], server.get("task_state")
        if vm == "deleted":
            return
        if task in ("deleting", "soft-deleting") and vm != "soft-delete":
            self.delete(server)
            return
        if vm == "building":
            self.cleanup(server)
            self.fail(server_id, DriverError("the build was interrupted by a restart of minivan"))
            self.update(server_id, power_state=NOSTATE)
            return
        self.drop_unfinished_attachments(server)
        needs_domain = vm != "shelved_offloaded" and (vm != "error" or server.get("launched_at"))
        if server_id not in domains:
            if not needs_domain or (vm == "error" and not server.get("host")):
                if task is not None:           # an operation the restart interrupted
                    self.update(server_id, task_state=None)
                return
            if self.driver_of(server).simulated:
                self.redefine_simulated(server)
                return
            self.fail(server_id, DriverError(f"domain {server['instance_name']} is missing"))
            return
        if task is not None:
            self.update(server_id, task_state=None)
        state = domains[server_id]
        if self.app.conf["resume_guests_state_on_host_boot"] and server.get(
                "power_state") == RUNNING and state in (SHUTDOWN, PAUSED) and vm == "active":
            # (paused, not by its user: libvirt was starting it when minivan stopped)
            LOG.info("server %s was running before the host went down: starting it", server_id)
            self.update(server_id, task_state="powering-on")     # busy until it runs
            self.driver_of(server).power_on(server)
            state = self.driver_of(server).wait_running(server, 30)
        self.update(server_id, power_state=state, task_state=None)

    def drop_unfinished_attachments(self, server):
        """Volume attachments a restart interrupted (reserved, never connected) are
        given back to Cinder and forgotten, as a failed attach would be."""
        if server["vm_state"] == "shelved_offloaded":
            return
        for vol in server.get("volumes", []):
            if vol.get("connection_info") or vol.get("boot_index") == 0:
                continue
            LOG.warning("server %s: the attachment of volume %s was interrupted",
                        server["id"], vol.get("id"))
            self.drop_volume(server["id"], vol["bdm_uuid"])
            if vol.get("attachment_id"):
                self.end_volume_use(server["id"], "attachment_delete", vol.get("id"),
                                    vol["attachment_id"])

    def redefine_simulated(self, server):
        """libvirt's test driver forgets domains with the process: define them again."""
        disks = server_disks(self.instance_dir(server), server)
        power = server.get("power_state")
        self.driver_of(server).spawn(server, disks, self.config_drive_path(server),
                                     start=power in (RUNNING, PAUSED))
        if power == PAUSED:
            self.driver_of(server).pause(server)
        if server.get("task_state") is not None:
            self.update(server["id"], task_state=None)

    def sync_power_states(self):
        """Nova's periodic sync: a guest that stopped by itself becomes SHUTOFF."""
        for host, driver in list(self.app.drivers.items()):
            if not driver.available:
                continue
            try:
                domains = driver.own_domains()
            except (DriverError, Unavailable):
                continue
            for server in self.servers_on(host):
                if server["id"] in domains:
                    self.sync_server(server, domains[server["id"]])

    def sync_one(self, server_id):
        """A lifecycle event arrived for this server's domain."""
        server = self.store.data["servers"].get(server_id)
        if server is None or not server.get("host") or self.app.driver is None:
            return
        try:
            state = self.driver_of(server).get_info(server)
        except (DriverError, Unavailable):
            return
        self.sync_server(server, state)

    def sync_server(self, server, state):
        """Record the domain's power state; learn addresses; reclaim soft-deleted servers.
        Skips a server an operation holds; a change is checked again under its lock."""
        server_id = server["id"]
        lock = self.locks[server_id]
        if not lock.acquire(blocking=False):
            return
        try:
            self._sync_server(server_id, state)
        finally:
            lock.release()

    def _sync_server(self, server_id, state):
        server = self.store.data["servers"].get(server_id)
        if server is None:
            return
        busy = server["vm_state"] in ("deleted", "building") or server.get("task_state")
        if busy:
            return
        if state != server.get("power_state"):
            try:                               # the state seen may be older than the lock
                state = self.driver_of(server).get_info(server)
            except (DriverError, Unavailable):
                return
        if state != server.get("power_state"):
            changes = {"power_state": state}
            if server["vm_state"] == "active" and state in (SHUTDOWN, CRASHED):
                LOG.info("server %s stopped by itself: now SHUTOFF", server_id)
                changes["vm_state"] = "stopped"
            self.update(server_id, **changes)
        if server["vm_state"] == "active" and server.get("ports") and not all(
                p.get("ips") for p in server["ports"]):
            self.refresh_addresses(server_id)
        window = self.app.conf["resize_confirm_window"]
        if server["vm_state"] == "resized" and window > 0 and (
                self.app.clock.now() - parse_isotime(server["updated_at"])).total_seconds() \
                >= window:
            LOG.info("server %s: confirming its resize after %d seconds", server_id, window)
            self.confirm_resize(server)
        deleted_at = server.get("deleted_at")
        if server["vm_state"] == "soft-delete" and deleted_at:
            age = (self.app.clock.now() - parse_isotime(deleted_at)).total_seconds()
            if age >= self.app.conf["reclaim_instance_interval"]:
                self.run(server_id, None, "reclaim", self.delete)

    def delete_failed(self, server_id, exc):
        self.fail(server_id, exc)

    def soft_delete(self, server):
        """Power off and keep the server (SOFT_DELETED) until reclaimed or restored."""
        self.driver_of(server).power_off(server, timeout=self.app.conf["shutdown_timeout"])
        self.update(server["id"], task_state=None, power_state=SHUTDOWN,
                    deleted_at=self.now())

    def restore(self, server):
        self.driver_of(server).power_on(server)
        self.update(server["id"], vm_state="active", task_state=None, power_state=RUNNING,
                    deleted_at=None)

    def restart_if(self, server, was_active):
        """Start the domain again when the server was running before the operation."""
        if was_active:
            self.driver_of(server).power_on(server)
        return {"power_state": RUNNING if was_active else SHUTDOWN}

    def resize(self, server, new_flavor, was_active, requested=None, kind="resize"):
        """Resize (kind 'resize') or cold-migrate (kind 'migration', same flavor, never to
        the same host) to the host the scheduler picks: stop, keep the old root disk for
        a revert, grow it, define the domain there, start again; VERIFY_RESIZE."""
        server_id = server["id"]
        source = server.get("host")
        dest = self.place(server_id, requested, exclude=(source,) if kind == "migration"
                          else (), flavor=new_flavor, moving=True)
        number = record_migration(self.app, server, new_flavor, source, dest, kind,
                                  consumer=self.move_consumer(server_id, source))
        try:
            self.move_disks(server, source, dest, new_flavor, was_active)
        except (DriverError, Unavailable, OSError) as e:
            set_migration_status(self.store, server_id, "error", self.app.clock,
                                 number=number)
            self.update(server_id, host=source, node=source, migration_source=None,
                        new_flavor=None, availability_zone=host_zone(self.app, source),
                        numa_topology=server.get("numa_topology"), old_numa_topology=None)
            self.roll_back_move(server, source, dest, was_active, e)
            raise MoveFailed(f"moving the server to {dest} failed: {e}") from None
        set_migration_status(self.store, server_id, "finished", self.app.clock, number=number)

    def move_consumer(self, server_id, source):
        """The consumer that holds a move's source allocations in Placement (made by its
        claim, §32), or None."""
        server = self.store.data["servers"][server_id]
        return server.get("move_consumer") if server.get("migration_source") == source \
            else None

    def roll_back_move(self, server, source, dest, was_active, error):
        """A resize or migration failed half-way: the old disk and the domain on the source
        come back as they were.  If that fails too, the server is in ERROR."""
        LOG.warning("server %s: moving to %s failed (%s): back to %s", server["id"], dest,
                    error, source)
        try:
            root = os.path.join(self.instance_dir(server), "disk")
            if os.path.exists(root + ".resize"):
                os.replace(root + ".resize", root)
            stranded = None
            if dest != source:
                try:
                    self.app.host_driver(dest).destroy(server)
                    self.app.host_driver(dest).remove_files(self.instance_dir(server))
                except (DriverError, Unavailable) as e:   # the destination may be what failed
                    stranded = e
                self.bind_ports(server["id"], source)
            old = dict(self.store.data["servers"][server["id"]], flavor=server["flavor"],
                       host=source)
            src = self.driver_of(old)
            src.redefine(old, self.extra_disks(old), self.config_drive_path(server))
            if old.get("ports") and src.firewall:
                src.define_filter(old, server_filter_xml(old, self.store.data))
            # a guest started there may still run: never a second one here (the
            # reconcile removes that domain once the destination answers)
            keep_stopped = stranded is not None and getattr(error, "started_on", None) == dest
            self.update(server["id"], **self.restart_if(old, was_active and not keep_stopped))
        except (DriverError, Unavailable, OSError) as e:
            raise DriverError(f"moving the server failed ({error}), and so did putting it "
                              f"back on {source}: {e}") from None
        if keep_stopped:
            raise DriverError(f"moving the server to {dest} failed ({error}), and its guest "
                              f"there could not be removed ({stranded}): it stays stopped on "
                              f"{source}")

    def move_disks(self, server, source, dest, new_flavor, was_active):
        server_id = server["id"]
        directory = self.instance_dir(server)
        src = self.app.host_driver(source)
        dst = self.app.host_driver(dest)
        self.update(server_id, task_state="resize_migrating")
        src.power_off(server, timeout=self.app.conf["shutdown_timeout"])
        src.pull_files(directory)
        root = os.path.join(directory, "disk")
        if os.path.exists(root):
            shutil.copyfile(root, root + ".resize")
            if new_flavor["disk"] * 2 ** 30 > virtual_size(root):
                qemu_img("resize", "-q", root, "%dG" % new_flavor["disk"])
        self.update(server_id, task_state="resize_migrated")
        if dest != source:
            self.bind_ports(server_id, dest)
        grown = dict(self.store.data["servers"][server_id], flavor=new_flavor)
        if dest != source:
            src.destroy(server)
            src.undefine_filter(server)
            if grown.get("ports") and dst.firewall:
                dst.define_filter(grown, server_filter_xml(grown, self.store.data))
        disks = self.extra_disks(grown)
        self.update(server_id, task_state="resize_finish")
        dst.redefine(grown, disks, self.config_drive_path(server))
        try:
            state = self.restart_if(grown, was_active)
        except (DriverError, Unavailable) as e:
            e.started_on = dest          # the guest may be running there despite this
            raise
        self.update(server_id, vm_state="resized", task_state=None, flavor=new_flavor,
                    new_flavor=None, old_flavor=server["flavor"],
                    old_vm_state="active" if was_active else "stopped", **state)

    def extra_disks(self, server):
        """Root disk plus ephemeral and swap disks sized for the server's flavor."""
        directory = self.instance_dir(server)
        create_missing_disks(directory, server)
        return server_disks(directory, server)

    def config_drive_path(self, server):
        path = os.path.join(self.instance_dir(server), "disk.config")
        return path if os.path.exists(path) else None

    def confirm_resize(self, server):
        set_migration_status(self.store, server["id"], "confirmed", self.app.clock)
        backup = os.path.join(self.instance_dir(server), "disk.resize")
        if os.path.exists(backup):
            os.unlink(backup)
        source = server.get("migration_source")
        if source not in (None, server.get("host")):
            try:
                self.app.host_driver(source).remove_files(self.instance_dir(server))
            except (DriverError, Unavailable) as e:
                LOG.warning("server %s: removing its files from %s failed: %s",
                            server["id"], source, e)
        self.update(server["id"], vm_state=server.get("old_vm_state") or "active",
                    task_state=None, old_flavor=None, old_vm_state=None,
                    migration_source=None, old_numa_topology=None)

    def revert_resize(self, server):
        """Back to the old flavor, and to the source host of a move."""
        server_id = server["id"]
        set_migration_status(self.store, server_id, "reverted", self.app.clock)
        was_active = server.get("old_vm_state", "active") == "active"
        source = server.get("migration_source") or server.get("host")
        dst = self.driver_of(server)
        dst.power_off(server, timeout=self.app.conf["shutdown_timeout"])
        if source != server.get("host"):
            dst.destroy(server)
            dst.undefine_filter(server)
            dst.remove_files(self.instance_dir(server))
        root = os.path.join(self.instance_dir(server), "disk")
        if os.path.exists(root + ".resize"):
            os.replace(root + ".resize", root)
        if source != server.get("host"):
            self.bind_ports(server_id, source)
        old = dict(self.store.data["servers"][server_id],
                   flavor=server.get("old_flavor") or server["flavor"], host=source,
                   numa_topology=server.get("old_numa_topology"))
        src = self.driver_of(old)
        if source != server.get("host") and old.get("ports") and src.firewall:
            src.define_filter(old, server_filter_xml(old, self.store.data))
        src.redefine(old, self.extra_disks(old), self.config_drive_path(server))
        state = self.restart_if(old, was_active)
        self.update(server_id, vm_state="active" if was_active else "stopped", task_state=None,
                    flavor=old["flavor"], old_flavor=None, old_vm_state=None, host=source,
                    node=source, migration_source=None,
                    numa_topology=old["numa_topology"], old_numa_topology=None,
                    availability_zone=host_zone(self.app, source), **state)

    def live_migrate(self, server, requested, force, block):
        """Move a running (or paused) guest to another host without stopping it."""
        server_id = server["id"]
        source = server["host"]
        dest = self.place(server_id, requested, exclude=(source,), force=force, moving=True)
        number = record_migration(self.app, server, server["flavor"], source, dest,
                                  "live-migration", status="preparing",
                                  consumer=self.move_consumer(server_id, source))
        try:
            self.bind_ports(server_id, dest)
            moving = dict(self.store.data["servers"][server_id], host=dest)
            dst = self.driver_of(moving)
            if moving.get("ports") and dst.firewall:
                dst.define_filter(moving, server_filter_xml(moving, self.store.data))
            set_migration_status(self.store, server_id, "running", self.app.clock,
                                 number=number)
            src = self.app.host_driver(source)
            shared = src.shares_files() and dst.shares_files()
            if block and shared:
                raise MoveFailed(f"Block migration of instance {server_id} cannot be used: "
                                 f"{source} and {dest} share the instances directory.")
            if not block and not shared and block is not None:
                raise MoveFailed(f"{source} and {dest} do not share the instances directory: "
                                 f"live migration of instance {server_id} needs "
                                 f"block_migration true or auto.")
            src.live_migrate(
                moving, dst, self.extra_disks(moving), self.config_drive_path(server),
                not shared)
        except BaseException:
            self.update(server_id, host=source, node=source, migration_source=None,
                        availability_zone=host_zone(self.app, source),
                        numa_topology=server.get("numa_topology"), old_numa_topology=None)
            set_migration_status(self.store, server_id, "error", self.app.clock,
                                 number=number)
            try:
                self.bind_ports(server_id, source)
            except (DriverError, Unavailable) as e:
                LOG.warning("server %s: binding its ports back failed: %s", server_id, e)
            raise
        try:
            self.app.host_driver(source).undefine_filter(server)
            if not shared:
                self.app.host_driver(source).remove_files(self.instance_dir(server))
        except (DriverError, Unavailable) as e:
            LOG.warning("server %s: removing what it left on %s failed: %s", server_id,
                        source, e)
        set_migration_status(self.store, server_id, "completed", self.app.clock, number=number)
        self.update(server_id, task_state=None, migration_source=None,
                    old_numa_topology=None,
                    power_state=self.driver_of(moving).get_info(moving))

    def evacuate(self, server, requested, force, admin_pass, stop):
        """Rebuild a server of a host that is down on another host, from its disks (the
        instances directory is shared) or, where they are gone, from its image."""
        server_id = server["id"]
        source = server["host"]
        number = record_migration(self.app, server, server["flavor"], source, None,
                                  "evacuation", status="pre-migrating")
        try:
            dest = self.place(server_id, requested, exclude=(source,), force=force)
            set_migration_status(self.store, server_id, "pre-migrating", self.app.clock,
                                 number=number, dest=dest, dest_ip=host_ip(self.app, dest))
            self.update(server_id, task_state="rebuild_spawning")
            self.bind_ports(server_id, dest)
            here = self.store.data["servers"][server_id]
            if self.app.host_driver(source).files_shared is False:
                # its disks were on the lost host: minivan's copy is old, start afresh
                shutil.rmtree(self.instance_dir(here), ignore_errors=True)
            if not os.path.exists(os.path.join(self.instance_dir(here), "disk")) and \
                    here.get("image_ref") and not here.get("volume_backed"):
                self.prepare_disks(here)
            driver = self.driver_of(here)
            if here.get("ports") and driver.firewall:
                driver.define_filter(here, server_filter_xml(here, self.store.data))
            drive = self.make_config_drive(here, admin_pass) if here.get("config_drive") \
                else None
            driver.spawn(here, self.extra_disks(here), drive, start=not stop)
        except BaseException:
            set_migration_status(self.store, server_id, "failed", self.app.clock,
                                 number=number)
            raise
        set_migration_status(self.store, server_id, "done", self.app.clock, number=number)
        self.update(server_id, vm_state="stopped" if stop else "active", task_state=None,
                    power_state=SHUTDOWN if stop else RUNNING)
        self.refresh_addresses(server_id)

    def rebuild(self, server, was_active, admin_pass):
        """New root disk from the (new) image, same domain identity."""
        server_id = server["id"]
        if self.driver_of(server).exists(server):     # an ERROR server may have none
            self.driver_of(server).power_off(server,
                                             timeout=self.app.conf["shutdown_timeout"])
        self.update(server_id, task_state="rebuild_block_device_mapping")
        self.driver_of(server).destroy(server)
        directory = self.instance_dir(server)
        self.driver_of(server).pull_files(directory)
        for name in ("disk", "disk.config"):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                os.unlink(path)
        image = self.app.images.get(server["image_ref"])
        if image is None:
            raise DriverError(f"Image {server['image_ref']} could not be found.")
        base = image_base(self.app, image)
        root = os.path.join(directory, "disk")
        create_qcow2(root, max(server["flavor"]["disk"] * 2 ** 30, image_virtual_size(*base)),
                     *base)
        self.update(server_id, task_state="rebuild_spawning")
        self.respawn(server_id, was_active, admin_pass)

    def rebuild_boot_volume(self, server, was_active, admin_pass, image, ident):
        """2.93's rebuild of a volume-backed server, as Nova's: the guest stops, its boot
        volume is held by a new attachment without a host while Cinder writes the image
        over it, and once Cinder says (a volume-reimaged event) it is connected again and
        the guest defined and started anew."""
        server_id, cinder = server["id"], self.app.volumes
        if cinder is None:
            raise DriverError("the block storage service is gone from the catalog")
        root = next((v for v in server.get("volumes", []) if v.get("boot_index") == 0), None)
        if root is None:
            raise DriverError("the server has no boot volume")
        if self.driver_of(server).exists(server):
            self.driver_of(server).power_off(server, timeout=self.app.conf["shutdown_timeout"])
        self.update(server_id, task_state="rebuild_block_device_mapping")
        self.driver_of(server).destroy(server)
        held = cinder.attachment_create(ident, root["id"], server_id)
        cinder.attachment_delete(ident, root["attachment_id"])
        root = dict(root, attachment_id=held["id"], connection_info=None)
        self.set_volume(server_id, root)
        done = threading.Event()
        done.failed = False
        with self.vif_lock:
            self.reimage_waiters[(server_id, root["id"])] = done
        try:
            cinder.reimage(ident, root["id"], image["id"])
            size = (cinder.get(ident, root["id"]) or {}).get("size") or 1
            if not done.wait(REIMAGE_TIMEOUT_PER_GB * size):
                raise DriverError(f"Cinder did not report volume {root['id']} written "
                                  f"within {REIMAGE_TIMEOUT_PER_GB * size} s")
            if done.failed:
                raise DriverError(f"Cinder failed to write image {image['id']} to volume "
                                  f"{root['id']}")
        finally:
            with self.vif_lock:
                self.reimage_waiters.pop((server_id, root["id"]), None)
        self.update(server_id, task_state="rebuild_spawning")
        self.connect_volume(server, root, ident)
        cinder.attachment_complete(ident, root["attachment_id"])
        self.respawn(server_id, was_active, admin_pass)

    def respawn(self, server_id, was_active, admin_pass):
        """The end of a rebuild: a new config drive, the domain defined (and started)."""
        server = self.store.data["servers"][server_id]
        drive = self.make_config_drive(server, admin_pass) if server.get("config_drive") \
            else None
        self.driver_of(server).spawn(server, self.extra_disks(server), drive, start=was_active)
        self.update(server_id, vm_state="active" if was_active else "stopped", task_state=None,
                    power_state=RUNNING if was_active else SHUTDOWN, launched_at=self.now())

    def volume_reimaged(self, server_id, volume_id, failed=False):
        """Cinder's volume-reimaged event for a rebuild that waits for it."""
        with self.vif_lock:
            done = self.reimage_waiters.get((server_id, volume_id))
        if done is not None:
            done.failed = failed
            done.set()

    def snapshot(self, server, image):
        """Copy the root disk into the image (pausing a running guest meanwhile)."""
        self.update(server["id"], task_state="image_pending_upload")
        root = os.path.join(self.instance_dir(server), "disk")
        paused = False
        if self.driver_of(server).get_info(server) == RUNNING:
            self.driver_of(server).pause(server)
            paused = True
        try:
            self.update(server["id"], task_state="image_uploading")
            self.driver_of(server).pull_files(self.instance_dir(server))
            self.app.images.finish_snapshot(image, root)
        finally:
            if paused:
                self.driver_of(server).unpause(server)

    def rotate_backups(self, server, backup_type, rotation):
        """Keep only the newest `rotation` backups of this server and type."""
        backups = [img for img in self.app.images.list()
                   if img["properties"].get("image_type") == "backup"
                   and img["properties"].get("instance_uuid") == server["id"]
                   and img["properties"].get("backup_type") == backup_type]
        backups.sort(key=lambda i: (i["created_at"], i.get("sequence", 0)), reverse=True)
        for img in backups[rotation:]:
            self.app.images.delete(img)

    def shelve(self, server):
        """Snapshot to an image, stop, and (offload time 0) free the host."""
        server_id = server["id"]
        image = None
        if not server.get("volume_backed"):          # a boot volume keeps the root disk
            self.update(server_id, task_state="shelving_image_pending_upload")
            image = self.app.images.reserve_snapshot(
                server["name"] + "-shelved", server["project_id"],
                snapshot_properties(server, {"image_type": "snapshot"}),
                server["flavor"]["disk"], 0)
        self.driver_of(server).power_off(server, timeout=self.app.conf["shutdown_timeout"])
        if image is not None:
            self.update(server_id, task_state="shelving_image_uploading")
            self.driver_of(server).pull_files(self.instance_dir(server))
            self.app.images.finish_snapshot(image, os.path.join(self.instance_dir(server),
                                                                "disk"))
        self.update(server_id, vm_state="shelved", task_state=None, power_state=SHUTDOWN,
                    shelved_image_id=image["id"] if image else None, shelved_at=self.now())
        if self.app.conf["shelved_offload_time"] == 0:
            self.shelve_offload(self.store.data["servers"][server_id])

    def shelve_offload(self, server):
        self.update(server["id"], task_state="shelving_offloading")
        self.cleanup(server, keep_volumes=True)
        self.update(server["id"], vm_state="shelved_offloaded", task_state=None,
                    power_state=SHUTDOWN, host=None, node=None)

    def unshelve(self, server, requested=None):
        server_id = server["id"]
        image_id = server.get("shelved_image_id")
        if server["vm_state"] == "shelved":
            self.driver_of(server).power_on(server)
        else:
            image = self.app.images.get(image_id) if image_id else None
            if image is None and not server.get("volume_backed"):
                raise DriverError("the shelved image of this server is gone")
            self.update(server_id, task_state="scheduling")
            host = self.place(server_id, requested)
            self.bind_ports(server_id, host)
            self.update(server_id, task_state="spawning")
            server = self.store.data["servers"][server_id]
            base = image_base(self.app, image) if image else None
            disks = create_server_disks(self.instance_dir(server), base, server)
            if server.get("volumes"):
                self.prepare_volumes(server_id, None)
            server = self.store.data["servers"][server_id]
            if server.get("ports"):
                self.driver_of(server).define_filter(server,
                                                     server_filter_xml(server, self.store.data))
            drive = self.make_config_drive(server, None) if server.get("config_drive") else None
            self.driver_of(server).spawn(server, disks, drive)
            for vol in server.get("volumes", []):
                self.app.volumes.attachment_complete(None, vol["attachment_id"])
        self.update(server_id, vm_state="active", task_state=None, power_state=RUNNING,
                    shelved_image_id=None, shelved_at=None)
        image = self.app.images.get(image_id) if image_id else None
        if image is not None:
            self.app.images.delete(image)
        self.refresh_addresses(server_id)

    def unshelve_failed(self, server_id, exc):
        """An unshelve that fails leaves the server shelved (offloaded: no host, nothing
        left there), with the fault on record, as Nova's does."""
        server = self.store.data["servers"].get(server_id)
        if server is None or server["vm_state"] != "shelved_offloaded":
            self.fail(server_id, exc)
            return
        self.cleanup(server, keep_volumes=True)
        self.fail(server_id, exc, vm_state="shelved_offloaded")
        self.update(server_id, host=None, node=None, power_state=SHUTDOWN)

    def rescue(self, server, image, was, stable=None):
        """Boot the rescue image: in the legacy way with the server's own disk attached
        second; in a stable device rescue (stable: (device, bus)) beside the server's
        disks and volumes, which keep their places."""
        self.driver_of(server).power_off(server, timeout=self.app.conf["shutdown_timeout"])
        directory = self.instance_dir(server)
        self.driver_of(server).pull_files(directory)
        base = image_base(self.app, image)
        rescue_disk = os.path.join(directory, "disk.rescue")
        os.makedirs(directory, mode=0o700, exist_ok=True)
        create_qcow2(rescue_disk, image_virtual_size(*base), *base)
        if stable:
            disks = self.extra_disks(server)
            shape = self.driver_of(server).guest_shape(server)
            used = {shape.disk_dev(t) for _, t, _ in disks} | {
                shape.disk_dev(v["target"]) for v in server.get("volumes", [])
                if v.get("target")}
            if server.get("config_drive"):
                used.add(config_drive_dev(server, shape))
            prefix = RESCUE_BUSES[stable[1]]
            target = next(prefix + c for c in "abcdefghijklmnopqrstuvwxyz"
                          if prefix + c not in used)
            self.driver_of(server).redefine(server, disks, self.config_drive_path(server),
                                            rescue=[(rescue_disk, target, "qcow2", *stable)])
        else:
            disks = [(p, "vd" + chr(ord(t[-1]) + 1), f)
                     for p, t, f in self.extra_disks(server)]
            # as Nova's legacy rescue: the rescue disk, the server's own disks, no volumes
            self.driver_of(server).redefine(dict(server, volumes=[]), disks,
                                            self.config_drive_path(server),
                                            rescue=[(rescue_disk, "vda", "qcow2")])
        self.driver_of(server).power_on(server)
        self.update(server["id"], vm_state="rescued", task_state=None, power_state=RUNNING,
                    rescued_from=was)

    def unrescue(self, server):
        self.driver_of(server).power_off(server, timeout=0, clean=False)
        self.driver_of(server).pull_files(self.instance_dir(server))
        rescue_disk = os.path.join(self.instance_dir(server), "disk.rescue")
        self.driver_of(server).redefine(server, self.extra_disks(server),
                                        self.config_drive_path(server))
        if os.path.exists(rescue_disk):
            os.unlink(rescue_disk)
        self.driver_of(server).power_on(server)
        self.update(server["id"], vm_state="active", task_state=None, power_state=RUNNING,
                    rescued_from=None)


# § 26 config drive --------------------------------------------------------------------

def metadata_hostname(conf, server):
    """The hostname a guest's metadata gives: with --dhcp-domain after it, as Nova's."""
    domain = conf.get("dhcp_domain")
    return f"{server['hostname']}.{domain}" if domain else server["hostname"]


def device_address(address, disk_bus=None):
    """(bus, address) of a libvirt <address> element as Nova's device metadata names
    them: PCI as 0000:00:03.0, a SCSI/IDE/USB disk's drive as controller:bus:target:unit."""
    if address is None:
        return "none", "none"
    try:
        if address.get("type") == "pci":
            d, b, s, f = (int(address.get(k), 16) for k in ("domain", "bus", "slot",
                                                             "function"))
            return "pci", f"{d:04x}:{b:02x}:{s:02x}.{f:x}"
        if address.get("type") == "drive" and disk_bus in ("scsi", "ide", "usb"):
            return disk_bus, ":".join(address.get(k, "0") for k in ("controller", "bus",
                                                                     "target", "unit"))
    except (TypeError, ValueError):
        pass
    return "none", "none"


def device_metadata(app, server):
    """The 'devices' of a guest's metadata, as Nova's libvirt driver builds them: each
    tagged NIC (by MAC) and tagged volume (by disk target) with the bus and address the
    domain gave it.  Before the domain exists (a config drive made at boot) they are
    listed without an address."""
    nics = {p.get("mac"): p["tag"] for p in server.get("ports", []) if p.get("tag")}
    bus = server_disk_bus(server)
    disks = {DISK_PREFIXES[bus] + v["target"][2:]: v for v in server.get("volumes", [])
             if v.get("tag") and v.get("target")}
    if not nics and not disks:
        return []
    xml = None
    if server.get("host"):
        try:
            xml = app.compute.driver_of(server).live_xml(server)
        except (DriverError, Unavailable) as e:
            LOG.info("server %s: no device addresses for its metadata: %s", server["id"], e)
    found = []           # (kind, key, bus, address) in the domain's device order
    if xml:
        try:
            devices = ElementTree.fromstring(xml).find("devices")
        except ElementTree.ParseError:
            devices = None
        for dev in list(devices) if devices is not None else []:
            if dev.tag == "interface" and dev.find("mac") is not None:
                mac = dev.find("mac").get("address")
                if mac in nics:
                    found.append(("nic", mac) + device_address(dev.find("address")))
            elif dev.tag == "disk" and dev.find("target") is not None:
                target = dev.find("target")
                if target.get("dev") in disks:
                    found.append(("disk", target.get("dev")) + device_address(
                        dev.find("address"), target.get("bus")))
    else:
        found = [("nic", mac, "none", "none") for mac in nics] + \
            [("disk", target, "none", "none") for target in disks]
    result = []
    for kind, key, bus, address in found:
        if kind == "nic":
            result.append({"type": "nic", "bus": bus, "address": address, "mac": key,
                           "tags": [nics[key]], "vf_trusted": False})
        else:
            result.append({"type": "disk", "bus": bus, "address": address,
                           "serial": disks[key].get("id"), "tags": [disks[key]["tag"]]})
    return result


def config_drive_files(app, server, admin_pass):
    """{path: bytes} of a config drive: OpenStack and EC2 layouts, as Nova writes them."""
    hostname = metadata_hostname(app.conf, server)
    meta = {"uuid": server["id"], "name": server["name"], "hostname": hostname,
            "launch_index": server.get("launch_index", 0),
            "availability_zone": server["availability_zone"],
            "project_id": server["project_id"], "meta": dict(server["metadata"]),
            "devices": device_metadata(app, server),
            "random_seed": base64.b64encode(os.urandom(512)).decode()}
    if server.get("key_name") and server.get("key_data"):
        meta["public_keys"] = {server["key_name"]: server["key_data"]}
        meta["keys"] = [{"name": server["key_name"], "type": "ssh", "data": server["key_data"]}]
    if admin_pass:
        meta["admin_pass"] = admin_pass
    links, networks = [], []
    for i, port in enumerate(server.get("ports", [])):
        links.append({"id": f"tap{port['id'][:11]}", "vif_id": port["id"],
                      "type": "ethernet", "ethernet_mac_address": port["mac"], "mtu": 1500})
        networks.append({"id": f"network{i}", "type": "ipv4_dhcp", "link": links[-1]["id"],
                         "network_id": port.get("network_id", port["network"])})
    files = {}
    if server.get("personality"):
        meta["files"] = []
        for i, item in enumerate(server["personality"]):
            content = "/content/%04d" % i
            files["openstack" + content] = base64.b64decode(item.get("contents", ""))
            meta["files"].append({"path": item.get("path"), "content_path": content})
    for root in ("openstack/latest", "openstack/2012-08-10"):
        files[f"{root}/meta_data.json"] = json_bytes(meta)
        files[f"{root}/network_data.json"] = json_bytes({"links": links, "networks": networks,
                                                         "services": []})
        files[f"{root}/vendor_data.json"] = b"{}"
        files[f"{root}/vendor_data2.json"] = b"{}"
        if server.get("user_data"):
            files[f"{root}/user_data"] = base64.b64decode(server["user_data"])
    ec2 = {"instance-id": server["instance_name"], "hostname": hostname,
           "local-hostname": hostname, "placement": {
               "availability-zone": server["availability_zone"]},
           "reservation-id": server["reservation_id"], "ami-launch-index": 0}
    if meta.get("public_keys"):
        ec2["public-keys"] = {"0": {"openssh-key": server["key_data"]}}
    files["ec2/latest/meta-data.json"] = json_bytes(ec2)
    if server.get("user_data"):
        files["ec2/latest/user-data"] = base64.b64decode(server["user_data"])
    return files


def write_config_drive(path, files):
    """An ISO 9660 image labelled config-2: genisoimage, mkisofs or xorriso where present,
    else minivan's own ISO writer."""
    tool = shutil.which("genisoimage") or shutil.which("mkisofs") or shutil.which("xorrisofs")
    if not tool:
        write_iso(path, files, "config-2")
        os.chmod(path, 0o600)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            target = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(data)
        done = subprocess.run([tool, "-o", path, "-ldots", "-allow-lowercase",
                               "-allow-multidot", "-l", "-quiet", "-J", "-r", "-V", "config-2",
                               tmp], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise DriverError("building the config drive failed: " + done.stderr.strip()[-300:])
    os.chmod(path, 0o600)


# A small ISO 9660 writer with Joliet names, for hosts without genisoimage/xorriso.
# Enough for a config drive: a few directories of a few files, one sector each.

SECTOR = 2048
ISO_MIN_SECTORS = 512


def iso_both16(n):
    return n.to_bytes(2, "little") + n.to_bytes(2, "big")


def iso_both32(n):
    return n.to_bytes(4, "little") + n.to_bytes(4, "big")


def iso_dir_date(dt):
    return bytes([dt.year - 1900, dt.month, dt.day, dt.hour, dt.minute, dt.second, 0])


def iso_vd_date(dt):
    return dt.strftime("%Y%m%d%H%M%S00").encode("ascii") + b"\x00"


def iso_record(ident, lba, size, is_dir, dt):
    pad = b"\x00" if len(ident) % 2 == 0 else b""
    length = 33 + len(ident) + len(pad)
    return (bytes([length, 0]) + iso_both32(lba) + iso_both32(size) + iso_dir_date(dt)
            + bytes([2 if is_dir else 0, 0, 0]) + iso_both16(1) + bytes([len(ident)])
            + ident + pad)


def iso_names(files):
    """Directories (tuples of path parts, root first, breadth-first) and their children."""
    dirs = {(): set()}
    for path in files:
        parts = tuple(path.strip("/").split("/"))
        for depth in range(1, len(parts)):
            dirs.setdefault(parts[:depth], set())
            dirs[parts[:depth - 1]].add(parts[:depth])
        dirs[parts[:-1]].add(parts)
    order = sorted(dirs, key=lambda d: (len(d), d))
    return order, dirs


def primary_name(name, is_dir, taken):
    """An ISO 9660 level-1 name (8.3, upper case) for the primary hierarchy."""
    stem, _, ext = name.upper().rpartition(".") if "." in name and not is_dir else (
        name.upper(), "", "")
    clean = lambda text, n: re.sub(r"[^A-Z0-9_]", "_", text)[:n] or "_"  # noqa: E731
    stem, ext = clean(stem, 8), clean(ext, 3) if ext else ""
    candidate = stem if is_dir else f"{stem}.{ext}" if ext else stem + "."
    counter = 0
    while candidate in taken:
        counter += 1
        tag = str(counter)
        base = stem[:8 - len(tag)] + tag
        candidate = base if is_dir else f"{base}.{ext}" if ext else base + "."
    taken.add(candidate)
    return candidate.encode("ascii") + (b"" if is_dir else b";1")


def write_iso(path, files, label, now=None):
    """Write files ({'dir/name': bytes}) as an ISO 9660 image with Joliet names."""
    now = now or datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    order, children = iso_names(files)
    first_dir = 23                     # 16 system area, 3 descriptors, 4 path tables
    lba = {("p", d): first_dir + i for i, d in enumerate(order)}
    lba.update({("j", d): first_dir + len(order) + i for i, d in enumerate(order)})
    next_lba = first_dir + 2 * len(order)
    for name in sorted(files):
        lba[("f", tuple(name.strip("/").split("/")))] = next_lba
        next_lba += max(1, -(-len(files[name]) // SECTOR))
    # at least 1 MiB: busybox's findfs (cirros) probes past 64 KiB and finds no label on
    # a shorter device
    total = max(next_lba, ISO_MIN_SECTORS)
    idents = {}
    for tree in ("p", "j"):
        for d in order:
            taken = set()
            for child in sorted(children[d]):
                is_dir = child in children
                idents[(tree, child)] = primary_name(child[-1], is_dir, taken) if tree == "p" \
                    else child[-1][:64].encode("utf-16-be")

    def directory(tree, d):
        parent = d[:-1] if d else ()
        data = iso_record(b"\x00", lba[(tree, d)], SECTOR, True, now)
        data += iso_record(b"\x01", lba[(tree, parent)], SECTOR, True, now)
        for child in sorted(children[d], key=lambda c: idents[(tree, c)]):
            if child in children:
                data += iso_record(idents[(tree, child)], lba[(tree, child)], SECTOR, True, now)
            else:
                size = len(files["/".join(child)] if "/".join(child) in files
                           else files["/" + "/".join(child)])
                data += iso_record(idents[(tree, child)], lba[("f", child)], size, False, now)
        if len(data) > SECTOR:
            raise DriverError("config drive directory too large for the built-in ISO writer")
        return data.ljust(SECTOR, b"\x00")

    def path_table(tree, big):
        endian = "big" if big else "little"
        table, numbers = b"", {}
        for number, d in enumerate(order, 1):
            numbers[d] = number
            ident = b"\x00" if not d else idents[(tree, d)]
            parent = numbers[d[:-1]] if d else 1
            entry = bytes([len(ident), 0]) + lba[(tree, d)].to_bytes(4, endian) + \
                parent.to_bytes(2, endian) + ident
            table += entry + (b"\x00" if len(ident) % 2 else b"")
        return table

    tables = {(t, big): path_table(t, big) for t in ("p", "j") for big in (False, True)}

    def descriptor(kind, tree):
        joliet = tree == "j"
        text = (lambda s, n: (s + " " * n).encode("utf-16-be")[:n]) if joliet else \
            (lambda s, n: s.encode("ascii").ljust(n, b" ")[:n])
        blank = (lambda n: ("\u0020" * (n // 2)).encode("utf-16-be")) if joliet else \
            (lambda n: b" " * n)
        root = iso_record(b"\x00", lba[(tree, ())], SECTOR, True, now)
        table_size = len(tables[(tree, False)])
        base = 19 if tree == "p" else 21
        escape = b"%/E".ljust(32, b"\x00") if joliet else b"\x00" * 32
        vd = (bytes([kind]) + b"CD001\x01\x00" + text("LINUX", 32) + text(label, 32)
              + b"\x00" * 8 + iso_both32(total) + escape + iso_both16(1) + iso_both16(1)
              + iso_both16(SECTOR) + iso_both32(table_size) + base.to_bytes(4, "little")
              + b"\x00" * 4 + (base + 1).to_bytes(4, "big") + b"\x00" * 4 + root
              + blank(128) + blank(128) + blank(128) + text("MINIVAN", 128) + blank(37)
              + blank(37) + blank(37) + iso_vd_date(now) + iso_vd_date(now)
              + b"0" * 16 + b"\x00" + iso_vd_date(now) + b"\x01\x00")
        return vd.ljust(SECTOR, b"\x00")

    with open(path, "wb") as f:
        f.write(b"\x00" * SECTOR * 16)
        f.write(descriptor(1, "p"))
        f.write(descriptor(2, "j"))
        f.write((b"\xffCD001\x01").ljust(SECTOR, b"\x00"))
        for key in (("p", False), ("p", True), ("j", False), ("j", True)):
            if len(tables[key]) > SECTOR:
                raise DriverError("config drive too large for the built-in ISO writer")
            f.write(tables[key].ljust(SECTOR, b"\x00"))
        for tree in ("p", "j"):
            for d in order:
                f.write(directory(tree, d))
        for name in sorted(files):
            data = files[name]
            f.write(data + b"\x00" * (max(1, -(-len(data) // SECTOR)) * SECTOR - len(data)))
        f.truncate(total * SECTOR)


# § 27 API: servers --------------------------------------------------------------------

DESCRIPTION_255 = {"type": ["string", "null"], "minLength": 0, "maxLength": 255,
                   "pattern": DESCRIPTION_PATTERN}
METADATA_SCHEMA = {"type": "object", "additionalProperties": False, "patternProperties": {
    r"^[a-zA-Z0-9-_:. ]{1,255}$": {"type": "string", "maxLength": 255}}}
TAG_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 60, "pattern": r"^[^,/]*$"}
BOOL_LIKE = {"type": ["boolean", "string"], "enum": BOOLEAN_STRINGS}
IPV4 = {"type": "string", "format": "ipv4"}
IPV6 = {"type": "string", "format": "ipv6"}
HOSTNAME_290 = {"type": "string", "minLength": 2, "maxLength": 63,
                "pattern": r"^[a-zA-Z0-9]+[a-zA-Z0-9-]*[a-zA-Z0-9]+$"}
HOSTNAME_294 = {"type": "string", "minLength": 1, "maxLength": 255,
                "pattern": r"^[a-zA-Z0-9-._]*$"}
MAX_TAGS = 50


def hostname_schema(req):
    return HOSTNAME_294 if req.since("2.94") else HOSTNAME_290


def server_name_schema(req):
    return {"type": "string", "minLength": 1, "maxLength": 255} if req.legacy else name_schema()


def create_server_schema(req):
    bdm = {"type": "object", "additionalProperties": False, "properties": {
        "virtual_name": {"type": "string", "maxLength": 255},
        "volume_id": {"type": "string", "format": "uuid"},
        "snapshot_id": {"type": "string", "format": "uuid"},
        "volume_size": int_or_digits(1), "device_name": {
            "type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[a-zA-Z0-9._/-]*$"},
        "delete_on_termination": BOOL_LIKE, "no_device": {},
        "connection_info": {"type": "string", "maxLength": 16777215},
        "source_type": {"type": "string", "enum": ["volume", "image", "snapshot", "blank"]},
        "uuid": {"type": "string", "minLength": 1, "maxLength": 255,
                 "pattern": r"^[a-zA-Z0-9._-]*$"},
        "image_id": {"type": "string", "format": "uuid"},
        "destination_type": {"type": "string", "enum": ["local", "volume"]},
        "guest_format": {"type": "string", "maxLength": 255},
        "device_type": {"type": "string", "maxLength": 255},
        "disk_bus": {"type": "string", "maxLength": 255},
        "boot_index": {"type": ["integer", "string", "null"], "pattern": r"^-?[0-9]+$"}}}
    network = {"type": "object", "additionalProperties": False, "properties": {
        "fixed_ip": {"type": "string"}, "port": {"type": ["string", "null"], "format": "uuid"},
        "uuid": {"type": "string", "format": "uuid"} if req.since("2.37") else {"type": "string"}}}
    if req.since("2.42") or (2, 32) <= req.version < (2, 37):
        network["properties"]["tag"] = TAG_SCHEMA
    if req.since("2.42") or req.version == (2, 32):
        bdm["properties"]["tag"] = TAG_SCHEMA
    if req.since("2.67"):
        bdm["properties"]["volume_type"] = {"type": ["string", "null"], "maxLength": 255}
    props = {
        "name": server_name_schema(req),
        "imageRef": {"type": "string"}, "flavorRef": {"type": ["string", "integer"],
                                                     "minLength": 1},
        "adminPass": {"type": "string"}, "metadata": METADATA_SCHEMA,
        "networks": {"type": "array", "items": network},
        "OS-DCF:diskConfig": {"type": "string", "enum": ["AUTO", "MANUAL"]},
        "accessIPv4": IPV4, "accessIPv6": IPV6,
        "availability_zone": dict(server_name_schema(req)),
        "block_device_mapping": {"type": "array", "items": bdm},
        "block_device_mapping_v2": {"type": "array", "items": bdm},
        "config_drive": BOOL_LIKE, "key_name": dict(server_name_schema(req)),
        "min_count": {"type": ["integer", "string"], "minimum": 1, "pattern": r"^[0-9]+$"},
        "max_count": {"type": ["integer", "string"], "minimum": 1, "pattern": r"^[0-9]+$"},
        "return_reservation_id": BOOL_LIKE,
        "security_groups": {"type": "array", "items": {
            "type": "object", "properties": {"name": dict(server_name_schema(req))}}},
        "user_data": {"type": ["string", "null"] if req.legacy else "string",
                      "maxLength": 65535},
    }
    if not req.since("2.57"):
        props["personality"] = {"type": "array", "items": {"type": "object", "properties": {
            "path": {"type": "string"}, "contents": {"type": "string"}}}}
    if req.since("2.19"):
        props["description"] = DESCRIPTION_255
    if req.since("2.37"):
        props["networks"] = {"type": ["array", "string"], "items": network}
    if req.since("2.52"):
        props["tags"] = {"type": "array", "maxItems": MAX_TAGS, "items": TAG_SCHEMA}
    if req.since("2.63"):
        props["trusted_image_certificates"] = {"type": ["array", "null"], "minItems": 1,
                                               "maxItems": 50, "uniqueItems": True,
                                               "items": {"type": "string", "minLength": 1}}
    if req.since("2.74"):
        host = {"type": "string", "minLength": 1, "maxLength": 255,
                "pattern": r"^[a-zA-Z0-9-._]*$"}
        props["host"], props["hypervisor_hostname"] = host, dict(host)
    if req.since("2.90"):
        props["hostname"] = hostname_schema(req)
    required = ["name", "flavorRef"] + (["networks"] if req.since("2.37") else [])
    hints = {"type": "object"}
    return {"type": "object", "additionalProperties": False, "required": ["server"],
            "properties": {"server": {"type": "object", "additionalProperties": False,
                                      "required": required, "properties": props},
                           "os:scheduler_hints": hints, "OS-SCH-HNT:scheduler_hints": hints}}


def check_create_formats(spec, req):
    """Formats the small validator leaves to code: UUIDs, IPs, base64, enums."""
    image = spec.get("imageRef")
    if image and not is_uuid_like(image.rstrip("/").rsplit("/", 1)[-1]):
        raise BadRequest(f"Invalid input for field/attribute imageRef. Value: {image}. "
                         f"'{image}' is not a 'uuid'")
    for field, version in (("accessIPv4", 4), ("accessIPv6", 6)):
        if field in spec:
            check_ip(field, spec[field], version)
            spec[field] = ipaddress.ip_address(spec[field]).compressed
    if "user_data" in spec and spec["user_data"] is not None:
        try:
            base64.b64decode(spec["user_data"], validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("Invalid input for field/attribute user_data. Value: "
                             f"{spec['user_data']}. '{spec['user_data']}' is not a "
                             "'base64'") from None
    networks = spec.get("networks")
    if isinstance(networks, str) and networks not in ("auto", "none"):
        raise BadRequest(f"Invalid input for field/attribute networks. Value: {networks}. "
                         f"'{networks}' is not one of ['none', 'auto']")
    for net in networks if isinstance(networks, list) else []:
        if "fixed_ip" in net:
            check_ip("fixed_ip", net["fixed_ip"], None)
    for item in spec.get("personality", []):
        try:
            base64.b64decode(item.get("contents", ""), validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("Personality content for %s cannot be decoded"
                             % item.get("path")) from None


def check_ip(field, value, version):
    try:
        parsed = ipaddress.ip_address(value)
    except ValueError:
        parsed = None
    if parsed is None or (version and parsed.version != version):
        kind = {4: "ipv4", 6: "ipv6", None: "ipv4 or ipv6"}[version]
        raise BadRequest(f"Invalid input for field/attribute {field}. Value: {value}. "
                         f"'{value}' is not a '{kind}'")


def ref_id(ref):
    """A flavor or image reference: an id or a URL whose last segment is the id."""
    return str(ref).rstrip("/").rsplit("/", 1)[-1]


def server_create_plan(req, spec, hints, volumes=()):
    """Everything a create needs resolved before any record is written (volumes: the
    entries plan_volumes made, which asks Cinder and so runs outside the transaction)."""
    flavor_id = ref_id(spec["flavorRef"])
    flavor = req.store.data["flavors"].get(flavor_id)
    if flavor is None or not flavor_visible(req, flavor):
        raise BadRequest("Invalid flavorRef provided.")
    image = resolve_boot_image(req, spec, volumes)
    if image is not None:
        if flavor["ram"] < image.get("min_ram", 0):
            raise BadRequest("Flavor's memory is too small for requested image.")
        if flavor["disk"] and flavor["disk"] < image.get("min_disk", 0):
            raise BadRequest("Flavor's disk is too small for requested image.")
        if flavor["disk"] == 0 and not req.ident.is_admin:
            raise Forbidden("Only volume-backed servers are allowed for flavors with zero disk.")
        check_guest_request(flavor, image)
    key_name, key_data = spec.get("key_name"), None
    if key_name is not None:
        kp = req.store.data["keypairs"].get(req.ident.user_id, {}).get(key_name)
        if kp is None:
            raise BadRequest("Invalid key_name provided.")
        key_data = kp["public_key"]
    zone = spec.get("availability_zone")
    requested = None
    if zone is not None:
        name, _, forced = zone.partition(":")
        if name and name not in compute_zones(req.app):
            raise BadRequest("The requested availability zone is not available")
        forced = forced.split(":")
        if any(forced):
            authorize(req, "os_compute_api:servers:create:forced_host", "admin")
            requested = forced[0] or forced[-1]
            if requested not in req.app.drivers:
                raise BadRequest(f"No valid host was found. Compute host {requested} "
                                 "could not be found.")
    for host_field in ("host", "hypervisor_hostname"):
        if host_field in spec:
            authorize(req, "compute:servers:create:requested_destination", "admin")
            if spec[host_field] not in req.app.drivers:
                raise BadRequest(f"Compute host {spec[host_field]} could not be found.")
            requested = spec[host_field]
    groups = [g.get("name", "default") for g in spec.get("security_groups") or
              [{"name": "default"}]]
    neutron, group_ids = req.app.network, None
    if neutron is not None:
        networks = []
        neutron_networks = resolve_neutron_networks(req, neutron, spec.get("networks"))
        if neutron_networks:
            found = neutron.find_security_groups(req.ident.project_id, groups)
            groups, group_ids = [g["name"] for g in found], [g["id"] for g in found]
    else:
        networks, neutron_networks = resolve_networks(req, spec.get("networks")), None
        known = {g["name"] for g in security_groups_of(req.store.data, req.ident.project_id)
                 .values()}
        for group in groups:
            if group not in known:
                raise BadRequest(f"Security group {group} not found.")
    metadata = spec.get("metadata") or {}
    limits = project_limits(req.store.data, req.ident.project_id, req.ident.user_id)
    if 0 <= limits["metadata_items"] < len(metadata):
        raise Forbidden("Quota exceeded for metadata_items: Requested %d, but already used 0 "
                        "of %d metadata_items" % (len(metadata), limits["metadata_items"]))
    check_personality_quota(spec.get("personality") or [], limits)
    local_disks, swap_mb = blank_local_disks(spec, flavor)
    return {"flavor": flavor, "image": image, "key_name": key_name, "key_data": key_data,
            "networks": networks, "security_groups": groups, "metadata": metadata,
            "hints": hints, "local_disks": local_disks, "swap_mb": swap_mb,
            "volumes": list(volumes), "requested_host": requested,
            "neutron_networks": neutron_networks, "security_group_ids": group_ids}


def blank_local_disks(spec, flavor):
    """Sizes of blank local disks (GB) and of a swap disk (MB) asked for by block device
    mappings; they must fit in the flavor's ephemeral and swap sizes, as in Nova."""
    local, swap = [], None
    for bdm in spec.get("block_device_mapping_v2") or []:
        if bdm.get("source_type") != "blank" or bdm.get("destination_type", "local") != "local":
            continue
        if bdm.get("guest_format") == "swap":
            swap = int(bdm.get("volume_size") or flavor["swap"])
            if swap > flavor["swap"]:
                raise BadRequest("Swap drive requested is larger than instance type allows.")
            continue
        local.append(int(bdm.get("volume_size") or flavor["ephemeral"]))
    if sum(local) > flavor["ephemeral"] or (local and not all(local)):
        raise BadRequest("Ephemeral disks requested are larger than the instance type allows. "
                         "If no size is given in one block device mapping, flavor ephemeral "
                         "size will be used.")
    return local, swap


def check_personality_quota(files, limits):
    if 0 <= limits["injected_files"] < len(files):
        raise Forbidden("Quota exceeded for injected_files: Requested %d, but already used 0 "
                        "of %d injected_files" % (len(files), limits["injected_files"]))
    for item in files:
        if 0 <= limits["injected_file_path_bytes"] < len(item.get("path", "")):
            raise Forbidden("Quota exceeded for injected_file_path_bytes.")
        if 0 <= limits["injected_file_content_bytes"] < len(base64.b64decode(
                item.get("contents", ""))):
            raise Forbidden("Quota exceeded for injected_file_content_bytes.")


def resolve_boot_image(req, spec, volumes=()):
    """The image a server boots from: imageRef, or a boot_index 0 image mapping; None
    for a server that boots from a volume."""
    if any(v["boot_index"] == 0 for v in volumes):
        return None
    image_ref = spec.get("imageRef") or ""
    for bdm in spec.get("block_device_mapping_v2") or []:
        if str(bdm.get("boot_index")) == "0" and bdm.get("source_type") == "image":
            image_ref = bdm.get("uuid") or bdm.get("image_id") or image_ref
    if not image_ref:
        raise BadRequest("Block Device Mapping is Invalid: Boot sequence for the instance and "
                         "image/block device mapping combination is not valid.")
    return find_active_image(req, ref_id(image_ref))


def find_active_image(req, image_id):
    image = req.app.images.get(image_id)
    if image is None or not req.app.images.visible(image, req.ident):
        raise BadRequest(f"Image {image_id} could not be found.")
    if image["status"] != "active":
        raise BadRequest(f"Image {image_id} is not active.")
    return image


def image_volume_mappings(req, spec):
    """The volume mappings an image made from a volume-backed server carries (Nova's
    bdm_v2 block_device_mapping property), when the create boots from that image."""
    ref = spec.get("imageRef")
    # (a boot_index 0 mapping of the image itself, as openstackclient sends, is the image)
    if not ref or any(str(b.get("boot_index")) == "0" and not (
            b.get("source_type") == "image" and b.get("destination_type", "local") == "local"
            and ref_id(b.get("uuid") or "") == ref_id(ref))
            for b in spec.get("block_device_mapping_v2") or []):
        return []
    image = req.app.images.get(ref_id(ref))
    props = (image or {}).get("properties") or {}
    if image is None or not props.get("block_device_mapping") or \
            not req.app.images.visible(image, req.ident):
        return []
    try:
        mapping = json.loads(props["block_device_mapping"])
        if not isinstance(mapping, list):
            raise ValueError("not a list")
        wanted = [{k: v for k, v in m.items() if v is not None} for m in mapping
                  if isinstance(m, dict) and m.get("destination_type") == "volume"]
        for m in wanted:
            check_schema(create_server_schema(req)["properties"]["server"]["properties"]
                         ["block_device_mapping_v2"]["items"], m, lenient=True)
    except (ValueError, SchemaError) as e:
        raise BadRequest(f"Image {image['id']} has a block_device_mapping that is not "
                         f"valid: {e}") from None
    return wanted


def volume_mappings(spec, from_image=()):
    """The create's block device mappings that are volumes, legacy ones converted."""
    wanted = list(from_image) + [
        dict(b) for b in spec.get("block_device_mapping_v2") or []
        if b.get("destination_type") == "volume"
        or b.get("source_type") in ("volume", "snapshot")]
    for legacy in spec.get("block_device_mapping") or []:
        if legacy.get("no_device") or not (legacy.get("volume_id") or legacy.get("snapshot_id")):
            continue
        root = (legacy.get("device_name") or "").rsplit("/", 1)[-1] in ("vda", "sda", "xvda",
                                                                         "hda")
        wanted.append({"source_type": "volume" if legacy.get("volume_id") else "snapshot",
                       "destination_type": "volume",
                       "uuid": legacy.get("volume_id") or legacy.get("snapshot_id"),
                       "volume_size": legacy.get("volume_size"),
                       "device_name": legacy.get("device_name"),
                       "delete_on_termination": legacy.get("delete_on_termination", False),
                       "boot_index": 0 if root else None})
    return wanted


def boot_index_of(bdm):
    value = bdm.get("boot_index")
    if value is None:
        return None
    value = int(value)
    return value if value >= 0 else None


def plan_volumes(req, spec, count):
    """Check the volume mappings against Cinder; the volume entries of a new server."""
    wanted = volume_mappings(spec, image_volume_mappings(req, spec))
    if not wanted:
        return []
    cinder = req.app.volumes
    if cinder is None:
        raise BadRequest("Block Device Mapping is Invalid: volumes need the block storage "
                         "service, which this cloud does not have.")
    entries = []
    for bdm in wanted:
        source = bdm.get("source_type") or "volume"
        try:
            size = int(bdm["volume_size"]) if bdm.get("volume_size") not in (None, "") \
                else None
            boot_index = boot_index_of(bdm)
        except (TypeError, ValueError):
            raise BadRequest("Block Device Mapping is Invalid: volume_size and boot_index "
                             "must be integers.") from None
        if source not in ("volume", "snapshot", "image", "blank") or (size is not None
                                                                      and size < 1):
            raise BadRequest("Block Device Mapping is Invalid: "
                             f"source_type {source!r} with volume_size {size!r}.")
        entry = {"id": None, "source": {"type": source, "size": size,
                                        "volume_type": bdm.get("volume_type")},
                 "boot_index": boot_index, "tag": bdm.get("tag"),
                 "requested_device": bdm.get("device_name"),
                 "delete_on_termination": bool_from_string(
                     bdm.get("delete_on_termination", False)),
                 "attachment_id": None, "connection_info": None}
        ref = bdm.get("uuid") or bdm.get("volume_id") or bdm.get("snapshot_id") or \
            bdm.get("image_id")
        if source != "blank" and not ref:
            raise BadRequest("Block Device Mapping is Invalid: Missing device UUID.")
        if source == "volume":
            # (as Nova: the volume's bootable flag matters where it, not imageRef, says
            # how the server boots)
            entry["id"] = check_boot_volume(req, cinder, ref, count,
                                            boot_index == 0 and not spec.get("imageRef"))
        elif source == "snapshot":
            snap = cinder.get_snapshot(req.ident, ref)
            if snap is None:
                raise BadRequest(f"Block Device Mapping is Invalid: failed to get snapshot "
                                 f"{ref}.")
            if snap["status"] != "available":
                raise BadRequest(f"Invalid snapshot: snapshot {ref} status must be "
                                 f"available, not {snap['status']}")
            entry["source"].update(snapshot_id=ref, size=size or snap["size"])
        elif source == "image":
            image = find_active_image(req, ref)
            if not size:
                raise BadRequest("Block Device Mapping is Invalid: Images with "
                                 "destination_type 'volume' need to have a non-zero size "
                                 "specified")
            if size < (image.get("min_disk") or 0):
                raise BadRequest("Volume is smaller than the minimum size specified in image "
                                 f"metadata. Volume size is {size * 2 ** 30} bytes, minimum "
                                 f"size is {image['min_disk'] * 2 ** 30} bytes.")
            entry["source"]["image_id"] = image["id"]
        elif not size:
            raise BadRequest("Block Device Mapping is Invalid: Blank volumes (source: "
                             "'blank', dest: 'volume') need to have non-zero size")
        entries.append(entry)
    if sum(1 for e in entries if e["boot_index"] == 0) > 1:
        raise BadRequest("Block Device Mapping is Invalid: Boot sequence for the instance and "
                         "image/block device mapping combination is not valid.")
    return entries


def check_boot_volume(req, cinder, volume_id, count, root=False):
    """An existing volume given to a create: it must exist and be free, and the root one
    bootable (Cinder's flag, a string 'true'/'false')."""
    volume = cinder.get(req.ident, volume_id)
    if volume is None:
        raise BadRequest(f"Block Device Mapping is Invalid: failed to get volume {volume_id}.")
    if root and not bool_from_string(volume.get("bootable", True)):
        raise BadRequest(f"Block Device {volume_id} is not bootable.")
    if count > 1:
        raise BadRequest("Cannot attach one or more volumes to multiple instances")
    if volume["status"] != "available" and not (volume.get("multiattach")
                                                and volume["status"] == "in-use"):
        raise BadRequest(f"Invalid volume: volume {volume_id} status must be available, "
                         f"not {volume['status']}")
    return volume["id"]


def assign_volume_targets(record, entries):
    """Give each volume entry its bdm_uuid and disk target (a boot volume is vda)."""
    record["volume_backed"] = any(e["boot_index"] == 0 for e in entries)
    record["volumes"] = []
    for entry in sorted(entries, key=lambda e: e["boot_index"] != 0):
        vol = {k: v for k, v in entry.items() if k != "requested_device"}
        vol["bdm_uuid"] = str(uuid.uuid4())
        vol["source"] = dict(entry["source"])
        vol["target"] = "vda" if entry["boot_index"] == 0 else \
            next_target(record, entry.get("requested_device"))
        vol["device"] = "/dev/" + vol["target"]
        record["volumes"].append(vol)
    return record


def resolve_networks(req, requested):
    """[(network name, fixed_ip)] for a create's networks field."""
    default = req.app.conf["network"]
    if requested is None or requested == "auto":
        return [(default, None)]
    if requested == "none":
        return []
    result = []
    for net in requested:
        if net.get("port"):
            raise BadRequest(f"Port {net['port']} could not be found.")
        name = default
        if net.get("uuid"):
            name = req.app.network_name(net["uuid"])
            if name is None:
                raise BadRequest(f"Network {net['uuid']} could not be found.")
        result.append((name, net.get("fixed_ip")))
    return result


def resolve_neutron_networks(req, neutron, requested):
    """[{network_id, fixed_ip, port_id, tag}] of a create's networks field, checked against
    Neutron as Nova checks them (a network the caller cannot use is 'not found')."""
    project = req.ident.project_id
    if requested is None or requested == "auto":
        usable = [n for n in neutron.networks(project) if not n.get("router:external")]
        if not usable:
            if requested != "auto":
                return []
            network_id = neutron.auto_allocated_network(project)
            if network_id is None:
                raise BadRequest(f"Unable to automatically allocate a network for project "
                                 f"{project}")
            usable = [{"id": network_id}]
        if len(usable) > 1:
            raise Conflict("Multiple possible networks found, use a Network ID to be more "
                           "specific.")
        return [{"network_id": usable[0]["id"], "fixed_ip": None, "port_id": None,
                 "tag": None}]
    if requested == "none":
        return []
    result = []
    for net in requested:
        if net.get("port"):
            port = neutron.port(net["port"])
            if port is None or port["project_id"] != project and not req.ident.is_admin:
                raise BadRequest(f"Port {net['port']} could not be found.")
            if port.get("device_id"):
                raise Conflict(f"Port {net['port']} is still in use.")
            result.append({"network_id": port["network_id"], "fixed_ip": None,
                           "port_id": port["id"], "tag": net.get("tag")})
            continue
        network = neutron.network(net.get("uuid")) if net.get("uuid") else None
        if network is None or not (network.get("shared") or network["project_id"] == project
                                   or req.ident.is_admin):
            raise BadRequest(f"Network {net.get('uuid')} could not be found.")
        result.append({"network_id": network["id"], "fixed_ip": net.get("fixed_ip"),
                       "port_id": None, "tag": net.get("tag")})
    return result


def new_mac():
    return "fa:16:3e:%02x:%02x:%02x" % tuple(secrets.token_bytes(3))


def sanitize_hostname(name, default="server"):
    """A server's hostname from its name, as Nova's sanitize_hostname makes it (63
    characters of Latin-1; spaces, underscores and dots become hyphens; other marks go)."""
    text = name.encode("latin-1", "ignore").decode("latin-1")[:63]
    text = re.sub(r"[ _.]", "-", text)
    text = re.sub(r"[^\w.-]+", "", text).lower().strip(".-")
    return text or default[:63]


def server_counts(plan, count):
    flavor = plan["flavor"]
    return {"instances": count, "cores": flavor["vcpus"] * count, "ram": flavor["ram"] * count}


def check_server_quota(req, data, plan, min_count, max_count):
    """How many servers fit the quotas (max_count down to min_count), else 403."""
    project, user = req.ident.project_id, req.ident.user_id
    for scope_user in (None, user):
        limits = project_limits(data, project, scope_user)
        used = usage(data, project, scope_user, req.app.usage)
        fits = max_count
        for resource, per in server_counts(plan, 1).items():
            if limits[resource] >= 0 and per:
                fits = min(fits, (limits[resource] - used[resource]) // per)
        if fits < min_count:
            want = server_counts(plan, min_count)
            over = [r for r in ("instances", "cores", "ram")
                    if limits[r] >= 0 and used[r] + want[r] > limits[r]]
            resource = over[0]
            raise Forbidden(f"Quota exceeded for {resource}: Requested {want[resource]}, but "
                            f"already used {used[resource]} of {limits[resource]} {resource}")
        max_count = fits
    return max_count


def new_server_record(req, spec, plan, index, count, reservation_id, instance_number):
    record = server_record_fields(req, spec, plan, index, count, reservation_id,
                                  instance_number)
    if plan["swap_mb"] is not None:
        record["swap_mb"] = plan["swap_mb"]
    return record


def server_record_fields(req, spec, plan, index, count, reservation_id, instance_number):
    now = isotime_us(req.app.clock.now())
    name = spec["name"]
    if count > 1:
        name = f"{name}-{index + 1}"
    flavor = {k: plan["flavor"][k] for k in ("id", "name", "ram", "vcpus", "disk", "ephemeral",
                                               "swap", "rxtx_factor", "extra_specs")}
    image = plan["image"]
    hostname = spec.get("hostname") or sanitize_hostname(name)
    if spec.get("hostname") and count > 1:
        hostname = f"{spec['hostname']}-{index + 1}"
    server_id = str(uuid.uuid4())
    return assign_volume_targets({
        "id": server_id, "name": name, "project_id": req.ident.project_id,
        "user_id": req.ident.user_id, "created_at": now, "updated_at": now,
        "launched_at": None, "terminated_at": None, "deleted_at": None,
        "vm_state": "building", "task_state": "scheduling", "power_state": NOSTATE,
        "flavor": flavor, "image_ref": image["id"] if image else "",
        "image_properties": dict(image.get("properties") or {}) if image else {},
        "key_name": plan["key_name"], "key_data": plan["key_data"],
        "metadata": dict(plan["metadata"]), "tags": list(spec.get("tags") or []),
        "user_data": spec.get("user_data"),
        "description": spec["description"] if "description" in spec else name,
        "hostname": hostname, "access_ip_v4": spec.get("accessIPv4", ""),
        "access_ip_v6": spec.get("accessIPv6", ""),
        "disk_config": spec.get("OS-DCF:diskConfig", "MANUAL"),
        "config_drive": bool_from_string(spec.get("config_drive", False))
        or req.app.conf["force_config_drive"],
        "availability_zone": (spec.get("availability_zone") or "").split(":")[0]
        or req.app.conf["availability_zone"],
        "pinned_availability_zone": (spec.get("availability_zone") or "").split(":")[0] or None,
        "requested_host": plan.get("requested_host"),
        "host": None, "node": None, "instance_name": instance_name(
            req.app.conf["instance_name_template"], instance_number, server_id, hostname),
        "reservation_id": reservation_id, "launch_index": index, "locked": False,
        "locked_by": None, "locked_reason": None, "fault": None, "progress": 0,
        "ports": [{"id": str(uuid.uuid4()), "mac": new_mac(), "network": net,
                   "fixed_ip": fixed, "ips": []} for net, fixed in plan["networks"]],
        "security_groups": plan["security_groups"] if plan["networks"] or
        plan.get("neutron_networks") else [],
        "requested_networks": plan.get("neutron_networks"),
        "security_group_ids": plan.get("security_group_ids"),
        "scheduler_hints": plan["hints"],
        "trusted_image_certificates": spec.get("trusted_image_certificates"),
        "root_device_name": "/dev/vda", "server_groups": [], "volumes": [],
        "personality": [dict(p) for p in spec.get("personality") or []],
        "local_disks": list(plan["local_disks"]),
        **({"vtpm_secret": secrets.token_hex(32)} if vtpm_requested(
            plan["flavor"], (image or {}).get("properties")) else {}),
    }, plan["volumes"])


def servers_create(req):
    """POST /servers"""
    authorize(req, "os_compute_api:servers:create", "member", req.ident.project_id)
    body = validate_body(req, create_server_schema(req))
    spec = body["server"]
    hints = body.get("os:scheduler_hints") or body.get("OS-SCH-HNT:scheduler_hints") or {}
    check_create_formats(spec, req)
    if not req.app.compute_available():
        raise Unavailable("The hypervisor is unreachable; try again later.")
    min_count = int(spec.get("min_count", 1))
    max_count = int(spec.get("max_count", min_count))
    if min_count > max_count:
        raise BadRequest("min_count must be <= max_count")
    if max_count > 1 and (spec.get("hostname") and not req.since("2.94")):
        raise BadRequest("Unable to specify hostname with multiple instances")
    if max_count > 1 and isinstance(spec.get("networks"), list) and any(
            n.get("port") for n in spec["networks"]):
        raise BadRequest("Unable to launch multiple instances with a single configured port "
                         "ID. Please launch your instance one by one with different ports.")
    admin_pass = spec.get("adminPass") or secrets.token_urlsafe(9)[:12]
    reservation_id = "r-" + "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                                    for _ in range(8))
    created = []
    volumes = plan_volumes(req, spec, max_count)

    def plan_fn(data):
        plan = server_create_plan(req, spec, hints, volumes)
        count = check_server_quota(req, data, plan, min_count, max_count)
        number = data["counters"]["instance"]
        ops = []
        group_id = hints.get("group")
        group_id = (group_id[0] if group_id else None) if isinstance(group_id, list) \
            else group_id
        for index in range(count):
            number += 1
            record = new_server_record(req, spec, plan, index, count, reservation_id, number)
            if group_id:
                record["server_groups"] = [group_id]
            created.append(record)
            ops.append(["set", ["servers", record["id"]], record])
        if group_id:
            ops += join_server_group(req, data, group_id, [r["id"] for r in created])
        ops.append(["set", ["counters", "instance"], number])
        return ops

    req.store.transaction(plan_fn)
    compute = req.app.compute
    for record in created:
        rid = compute.record_action(req, record["id"], "create")
        compute.run(record["id"], rid, "compute__do_build_and_run_instance",
                    lambda server, pw=admin_pass: compute.build(server, pw, req.ident),
                    on_error=compute.build_failed, build=True)
    if bool_from_string(spec.get("return_reservation_id", False)):
        return 202, {"reservation_id": reservation_id}
    first = created[0]
    view = {"id": first["id"], "links": req.links("servers", first["id"]),
            "OS-DCF:diskConfig": first["disk_config"]}
    if first["ports"]:
        view["security_groups"] = [{"name": n} for n in first["security_groups"]]
    if req.app.conf["enable_instance_password"]:
        view["adminPass"] = admin_pass
    return 202, {"server": view}, {"Location": req.self_link("servers", first["id"])}


def servers_show(req):
    """GET /servers/{server_id}"""
    validate_query(req, (), strict_since="2.102")
    server = find_server(req, req.params["server_id"])
    return 200, b'{"server": ' + req.app.views.views(req, [server], "show")[0] + b"}"


# -- list -------------------------------------------------------------------------

SERVER_SORT_KEYS = {
    "access_ip_v4": "access_ip_v4", "access_ip_v6": "access_ip_v6",
    "auto_disk_config": "disk_config", "availability_zone": "availability_zone",
    "config_drive": "config_drive", "created_at": "created_at",
    "display_description": "description", "display_name": "name", "host": "host",
    "hostname": "hostname", "image_ref": "image_ref", "instance_type_id": "flavor_id",
    "kernel_id": None, "key_name": "key_name", "launch_index": "launch_index",
    "launched_at": "launched_at", "locked_by": "locked_by", "node": "node",
    "power_state": "power_state", "progress": "progress", "project_id": "project_id",
    "ramdisk_id": None, "root_device_name": "root_device_name", "task_state": "task_state",
    "terminated_at": "terminated_at", "updated_at": "updated_at", "user_id": "user_id",
    "uuid": "id", "vm_state": "vm_state",
}
IGNORED_SORT_KEYS = {"architecture", "cell_name", "cleaned", "default_ephemeral_device",
                     "default_swap_device", "deleted", "deleted_at", "disable_terminate",
                     "ephemeral_gb", "ephemeral_key_uuid", "id", "key_data", "launched_on",
                     "memory_mb", "os_type", "reservation_id", "root_gb", "shutdown_terminate",
                     "user_data", "vcpus", "vm_mode"}
JOINED_FILTERS = {"block_device_mapping", "services", "metadata", "system_metadata",
                  "info_cache", "security_groups", "pci_devices"}
SERVER_QUERY_KEYS = [
    "user_id", "project_id", "tenant_id", "launch_index", "image_ref", "image", "kernel_id",
    "ramdisk_id", "hostname", "key_name", "power_state", "vm_state", "task_state", "host",
    "node", "flavor", "reservation_id", "launched_at", "terminated_at", "availability_zone",
    "name", "display_name", "description", "display_description", "locked_by", "uuid",
    "root_device_name", "config_drive", "access_ip_v4", "access_ip_v6", "auto_disk_config",
    "progress", "sort_key", "sort_dir", "all_tenants", "soft_deleted", "deleted", "status",
    "changes-since", "ip", "ip6", "created_at", "block_device_mapping", "services", "metadata",
    "system_metadata", "info_cache", "security_groups", "pci_devices", "limit", "marker"]


def public_server_filters(req):
    allowed = {"reservation_id", "name", "status", "image", "flavor", "ip", "changes-since",
               "all_tenants", "limit", "marker", "sort_key", "sort_dir"}
    if req.since("2.5"):
        allowed.add("ip6")
    if req.since("2.26"):
        allowed |= {"tags", "tags-any", "not-tags", "not-tags-any"}
    if req.since("2.66"):
        allowed.add("changes-before")
    if req.since("2.73"):
        allowed.add("locked")
    if req.since("2.83"):
        allowed |= {"availability_zone", "config_drive", "key_name", "created_at",
                    "launched_at", "terminated_at", "power_state", "task_state", "vm_state",
                    "progress", "user_id"}
    if req.since("2.90"):
        allowed.add("hostname")
    return allowed


def server_query(req):
    keys = list(SERVER_QUERY_KEYS)
    if req.since("2.26"):
        keys += ["tags", "tags-any", "not-tags", "not-tags-any"]
    if req.since("2.66"):
        keys.append("changes-before")
    if req.since("2.73"):
        keys.append("locked")
    strict = req.since("2.75") and not req.legacy
    query = {}
    for key, values in req.query.items():
        if key in keys or key.startswith("_"):
            query[key] = values[-1]
        elif strict:
            raise BadRequest(f"Additional properties are not allowed ('{key}' was unexpected)")
    for key in query:
        if key in JOINED_FILTERS or key.startswith("_"):
            raise BadRequest(f"Invalid filter field: {key}.")
    if not req.ident.is_admin:
        allowed = public_server_filters(req)
        query = {k: v for k, v in query.items() if k in allowed}
    return query


def parse_changes_time(name, text):
    try:
        value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"Invalid input for query parameters {name}. Value: {text}. "
                         f"'{text}' is not a 'date-time'") from None
    if value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return value


def regex_match(pattern, value):
    try:
        return re.search(pattern, value or "") is not None
    except re.error:
        return pattern in (value or "")


# query keys that select nothing by themselves (handled before or after matching)
UNFILTERED_KEYS = {"limit", "marker", "sort_key", "sort_dir", "all_tenants", "project_id",
                   "tenant_id", "status", "changes-since", "changes-before", "deleted"}


def server_matches(server, query, statuses, since, before, deleted_wanted):
    if server["vm_state"] == "deleted" and not (since or before or deleted_wanted):
        return False
    if deleted_wanted is True and server["vm_state"] != "deleted":
        return False
    if since or before:
        updated = parse_isotime(server["updated_at"])
        if since and updated < since or before and updated > before:
            return False
    if statuses is not None and server_status(server) not in statuses:
        return False
    if not query.keys() - UNFILTERED_KEYS:
        return True
    checks = [("name", server["name"]), ("display_name", server["name"]),
              ("description", server.get("description")),
              ("display_description", server.get("description")),
              ("hostname", server["hostname"])]
    for key, value in checks:
        if key in query and not regex_match(query[key], value):
            return False
    equal = {"reservation_id": server["reservation_id"], "image": server["image_ref"],
             "image_ref": server["image_ref"], "flavor": server["flavor"]["id"],
             "host": server.get("host"), "node": server.get("node"),
             "key_name": server.get("key_name"), "user_id": server["user_id"],
             "availability_zone": server["availability_zone"], "uuid": server["id"],
             "vm_state": server["vm_state"], "task_state": server.get("task_state"),
             "power_state": str(server.get("power_state")),
             "launch_index": str(server.get("launch_index")),
             "locked_by": server.get("locked_by"), "progress": str(server.get("progress")),
             "access_ip_v4": server.get("access_ip_v4"), "access_ip_v6": server.get("access_ip_v6"),
             "root_device_name": server.get("root_device_name"),
             "config_drive": "True" if server.get("config_drive") else "",
             "auto_disk_config": str(server.get("disk_config") == "AUTO")}
    for key, value in equal.items():
        if key in query and key not in ("image", "flavor") and str(value) != query[key]:
            return False
    if "image" in query and server["image_ref"] != ref_id(query["image"]):
        return False
    if "flavor" in query and server["flavor"]["id"] != ref_id(query["flavor"]):
        return False
    if "locked" in query and bool(server.get("locked")) != bool_from_string(query["locked"]):
        return False
    addresses = [(a, v) for p in server.get("ports", []) for a, v in p.get("ips", [])]
    if "ip" in query and not any(v == 4 and regex_match(query["ip"], a) for a, v in addresses):
        return False
    if "ip6" in query and not any(v == 6 and regex_match(query["ip6"], a) for a, v in addresses):
        return False
    return tags_match(server.get("tags", []), query)


def tags_match(tags, query):
    def listed(key):
        return [t for t in query[key].split(",") if t] if key in query else None
    all_of, any_of = listed("tags"), listed("tags-any")
    not_all, not_any = listed("not-tags"), listed("not-tags-any")
    if all_of is not None and not set(all_of) <= set(tags):
        return False
    if any_of is not None and not set(any_of) & set(tags):
        return False
    if not_all is not None and set(not_all) <= set(tags):
        return False
    if not_any is not None and set(not_any) & set(tags):
        return False
    return True


def server_sort(req):
    keys = req.query.get("sort_key", [])
    dirs = req.query.get("sort_dir", [])
    result = []
    for i, key in enumerate(keys):
        direction = dirs[i] if i < len(dirs) else (dirs[0] if dirs else "desc")
        if direction not in ("asc", "desc"):
            raise BadRequest(f"Invalid sort_dir: {direction}")
        if key in IGNORED_SORT_KEYS or (key == "locked" and not req.since("2.73")):
            continue
        if key == "locked":
            result.append(("locked", direction))
            continue
        if key not in SERVER_SORT_KEYS:
            raise BadRequest(f"Invalid sort_key: {key}")
        if key in ("host", "node") and not req.ident.is_admin:
            raise Forbidden("Only administrators can sort servers by host or node.")
        result.append((key, direction))
    return result or [("created_at", "desc")]


def sort_servers(servers, order):
    def value(server, key):
        if key == "instance_type_id":
            return server["flavor"]["id"]
        field = SERVER_SORT_KEYS.get(key, key)
        return server.get(field) if field else None
    servers = sorted(servers, key=lambda s: s["id"], reverse=True)
    for key, direction in reversed(order):
        servers.sort(key=lambda s: (value(s, key) is None, str(value(s, key)) if not isinstance(
            value(s, key), (int, float)) else value(s, key)), reverse=direction == "desc")
    return servers


def server_list(req, detail):
    query = server_query(req)
    project = req.ident.project_id
    all_tenants = "all_tenants" in query and (query["all_tenants"] == "" or bool_from_string(
        query["all_tenants"]))
    if "all_tenants" in query:
        rule = "os_compute_api:servers:%s:get_all_tenants" % ("detail" if detail else "index")
        authorize(req, rule, "admin")
    statuses = None
    if "status" in query:
        wanted = query["status"].upper()
        if wanted not in ALL_STATUSES:
            if req.since("2.38"):
                raise BadRequest("Invalid status value")
            return 200, {"servers": []}
        statuses = {wanted}
    since = parse_changes_time("changes-since", query["changes-since"]) \
        if "changes-since" in query else None
    before = parse_changes_time("changes-before", query["changes-before"]) \
        if "changes-before" in query else None
    if since and before and before < since:
        raise BadRequest("The value of changes-since must be less than or equal to "
                         "changes-before.")
    deleted_wanted = None
    if "deleted" in query:
        deleted_wanted = bool_from_string(query["deleted"])
    order = server_sort(req)
    # without all_tenants a project's own servers only: Nova drops tenant_id and sets
    # project_id to the caller's (lp:#1185290), for admins too
    owner = query.get("project_id") or query.get("tenant_id")
    scope = owner if all_tenants else project

    filtered = bool(statuses or since or before or deleted_wanted or
                    query.keys() - UNFILTERED_KEYS)
    if filtered:
        def wanted(s):
            return (scope is None or s["project_id"] == scope) and \
                server_matches(s, query, statuses, since, before, deleted_wanted)
    else:                           # no filter: what server_matches comes to
        def wanted(s):
            return (scope is None or s["project_id"] == scope) and \
                s["vm_state"] != "deleted"
    key = None
    if detail and order == [("created_at", "desc")] and not filtered:
        key = page_key(req, scope)
        kept, revision = req.app.views.page(key)
        if kept is not None:
            return 200, kept
    with req.store.reading():
        if order == [("created_at", "desc")]:
            page, marker = newest_page(req, scope, wanted)
        else:
            servers = [s for s in req.store.data["servers"].values() if wanted(s)]
    if order != [("created_at", "desc")]:
        page, marker = paginate(req, sort_servers(servers, order), lambda s: s["id"])
    links = {} if marker is None else {
        "servers_links": req.next_link("servers/detail" if detail else "servers", marker)}
    if detail:
        body = encoded_body("servers", req.app.views.views(req, page, "detail"), links)
        if key is not None:
            req.app.views.keep_page(key, revision, body)
        return 200, body
    body = {"servers": [{"id": s["id"], "links": req.links("servers", s["id"]),
                         "name": s["name"]} for s in page]}
    body.update(links)
    return 200, body


def newest_page(req, scope, wanted):
    """paginate() over a scope's servers in the default order (newest first), reading
    only as many as the page takes from the ServerOrder index.  Under the store's lock."""
    limit, _ = limit_param(req)
    servers = req.store.data["servers"]
    after = None
    marker = req.q("marker")
    if marker is not None:
        if marker not in servers or not wanted(servers[marker]):
            raise BadRequest("marker [%s] not found" % marker)
        after = ServerOrder.key(servers[marker])
    if req.q("limit") is not None and int(req.q("limit")) == 0:
        return [], None
    page = []
    for server_id in req.app.server_order.newest_first(scope, after):
        if len(page) == limit:
            break
        if wanted(servers[server_id]):
            page.append(servers[server_id])
    more = len(page) == limit and limit > 0
    return page, (page[-1]["id"] if more and page else None)


def servers_index(req):
    """GET /servers"""
    return server_list(req, detail=False)


def servers_detail(req):
    """GET /servers/detail"""
    return server_list(req, detail=True)


# -- update, delete -----------------------------------------------------------------

def servers_update(req):
    """PUT /servers/{server_id}"""
    props = {"name": server_name_schema(req),
             "OS-DCF:diskConfig": {"type": "string", "enum": ["AUTO", "MANUAL"]},
             "accessIPv4": IPV4, "accessIPv6": IPV6}
    if req.since("2.19"):
        props["description"] = DESCRIPTION_255
    if req.since("2.90"):
        props["hostname"] = hostname_schema(req)
    if req.since("2.104"):
        props["pinned_availability_zone"] = {"type": ["string", "null"], "minLength": 1,
                                             "maxLength": 255}
    spec = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["server"], "properties": {"server": {
                                   "type": "object", "additionalProperties": False,
                                   "properties": props}}})["server"]
    for field, version in (("accessIPv4", 4), ("accessIPv6", 6)):
        if field in spec:
            check_ip(field, spec[field], version)
            spec[field] = ipaddress.ip_address(spec[field]).compressed
    fields = {"name": "name", "OS-DCF:diskConfig": "disk_config", "accessIPv4": "access_ip_v4",
              "accessIPv6": "access_ip_v6", "description": "description",
              "hostname": "hostname"}
    server_id = req.params["server_id"]

    def plan(data):
        server = find_server(req, server_id)
        check_not_locked(req, server)
        changes = {fields[k]: v for k, v in spec.items() if k in fields}
        if "pinned_availability_zone" in spec:
            changes["pinned_availability_zone"] = pin_zone(req, server,
                                                           spec["pinned_availability_zone"])
        changes["updated_at"] = isotime_us(req.app.clock.now())
        return [["set", ["servers", server_id], dict(server, **changes)]]

    req.store.transaction(plan)
    return 200, {"server": server_view(req, req.store.data["servers"][server_id], "update")}


def pin_zone(req, server, zone):
    current = server.get("pinned_availability_zone")
    if zone is None:
        return None
    if zone != server["availability_zone"]:
        raise Conflict(f"Cannot pin server {server['id']} to availability zone {zone}: it is "
                       f"in {server['availability_zone']}.")
    if current not in (None, zone):
        raise Conflict(f"Server {server['id']} is already pinned to {current}.")
    return zone


def check_not_locked(req, server):
    """A locked server refuses changes from everyone but admins (409)."""
    if server.get("locked") and not req.ident.is_admin:
        raise Conflict(f"Instance {server['id']} is locked")


def servers_delete(req):
    """DELETE /servers/{server_id}"""
    server_id = req.params["server_id"]
    soft = req.app.conf["reclaim_instance_interval"] > 0
    compute = req.app.compute

    def plan(data):
        server = find_server(req, server_id)
        check_not_locked(req, server)
        if server.get("task_state") == "deleting":
            return []
        if soft and server["vm_state"] not in ("soft-delete", "error", "building"):
            return [["set", ["servers", server_id], dict(
                server, vm_state="soft-delete", task_state="soft-deleting",
                updated_at=isotime_us(req.app.clock.now()))]]
        return [["set", ["servers", server_id], dict(
            server, task_state="deleting", updated_at=isotime_us(req.app.clock.now()))]]

    ops = req.store.transaction(plan)
    if ops:
        server = req.store.data["servers"][server_id]
        rid = compute.record_action(req, server_id, "delete")
        if server["vm_state"] == "soft-delete":
            compute.run(server_id, rid, "compute_soft_delete_instance", compute.soft_delete)
        else:
            compute.run(server_id, rid, "compute_terminate_instance", compute.delete,
                        on_error=compute.delete_failed)
    return 204, None


# -- actions ------------------------------------------------------------------------
#
# Each action: check the states Nova allows (409 otherwise), set the task state,
# answer, and let Compute do the work.  ACTION_RULES is Nova's
# @check_instance_state table for the actions minivan runs.

ACTION_RULES = {
    # action: (nova's name in messages, allowed vm_states, allowed task_states or None=any)
    "reboot_soft": ("reboot", {"active"}, {None}),
    "reboot_hard": ("reboot", {"active", "stopped", "paused", "suspended", "error"},
                    {None, "rebooting", "reboot_pending", "reboot_started", "rebooting_hard",
                     "reboot_pending_hard", "reboot_started_hard"}),
    "start": ("start", {"stopped"}, {None}),
    "stop": ("stop", {"active", "rescued", "error"}, {None}),
    "pause": ("pause", {"active"}, {None}),
    "unpause": ("unpause", {"paused"}, {None}),
    "suspend": ("suspend", {"active"}, {None}),
    "resume": ("resume", {"suspended"}, {None}),
    "rescue": ("rescue", {"active", "stopped", "error"}, {None}),
    "unrescue": ("unrescue", {"rescued"}, {None}),
    "resize": ("resize", {"active", "stopped"}, {None}),
    "migrate": ("migrate", {"active", "stopped"}, {None}),
    "os-migrateLive": ("live_migration", {"active", "paused"}, {None}),
    "evacuate": ("evacuate", {"active", "stopped", "error"}, {None}),
    "confirmResize": ("confirm_resize", {"resized"}, {None}),
    "revertResize": ("revert_resize", {"resized"}, {None}),
    "rebuild": ("rebuild", {"active", "stopped", "error"}, {None}),
    "createImage": ("createImage", {"active", "stopped", "paused", "suspended"}, {None}),
    "createBackup": ("createBackup", {"active", "stopped", "paused", "suspended"}, {None}),
    "shelve": ("shelve", {"active", "stopped", "paused", "suspended"}, {None}),
    "shelveOffload": ("shelve_offload", {"shelved"}, {None}),
    "unshelve": ("unshelve", {"shelved", "shelved_offloaded"}, {None}),
    "trigger_crash_dump": ("trigger_crash_dump",
                           {"active", "paused", "rescued", "resized", "error"}, {None}),
    "changePassword": ("set_admin_password", {"active"}, {None}),
    "restore": ("restore", {"soft-delete"}, None),
    "forceDelete": ("force_delete", {"soft-delete"}, None),
    "injectNetworkInfo": ("inject_network_info", set(STATUS_BY_VM_STATE), None),
    "metadata": ("update metadata", {"active", "paused", "suspended", "stopped", "shelved",
                                     "shelved_offloaded", "building"}, None),
}


def begin_action(req, rule, task_state, action_name, extra=None, check_lock=True,
                 check_host=True):
    """Check the server's state for rule, set task_state (and extra fields) durably."""
    server_id = req.params["server_id"]
    name, vm_states, task_states = ACTION_RULES[rule]

    def plan(data):
        server = find_server(req, server_id)
        refuse_vtpm_move(server, action_name)
        if check_lock:
            check_not_locked(req, server)
        if server["vm_state"] not in vm_states:
            raise Conflict(f"Cannot '{name}' instance {server_id} while it is in vm_state "
                           f"{server['vm_state']}")
        if task_states is not None and server.get("task_state") not in task_states:
            raise Conflict(f"Cannot '{name}' instance {server_id} while it is in task_state "
                           f"{server['task_state']}")
        changes = dict(extra or {}, task_state=task_state,
                       updated_at=isotime_us(req.app.clock.now()))
        return [["set", ["servers", server_id], dict(server, **changes)]]

    if check_host:
        host = req.store.data["servers"].get(server_id, {}).get("host")
        if not (req.app.compute_available(host) if host else
                any(d.available for d in req.app.drivers.values())):
            raise Unavailable("The hypervisor is unreachable; try again later.")
    req.store.transaction(plan)
    rid = req.app.compute.record_action(req, server_id, action_name)
    return req.store.data["servers"][server_id], rid


def run_action(req, rule, task_state, action_name, event, work, extra=None,
               check_host=True, on_error=None):
    """begin_action, then work(server) in the background; the server's state is restored
    (with a fault) if work fails."""
    server, rid = begin_action(req, rule, task_state, action_name, extra,
                               check_host=check_host)
    compute = req.app.compute
    before = {"vm_state": server["vm_state"]}

    def failed(server_id, exc):
        compute.fail(server_id, exc, vm_state=before["vm_state"] if isinstance(
            exc, (Unavailable, NoValidHost, MoveFailed)) else "error")

    compute.run(server["id"], rid, event, work, on_error=on_error or failed)
    return server


def settle(compute, server_id, **fields):
    """Finish an action: task_state back to None plus the new state."""
    compute.update(server_id, task_state=None, **fields)


def server_action_reboot(req):
    """POST /servers/{server_id}/action reboot"""
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["reboot"], "properties": {"reboot": {
                                   "type": "object", "additionalProperties": False,
                                   "required": ["type"], "properties": {"type": {
                                       "type": "string",
                                       "enum": ["HARD", "Hard", "hard", "SOFT", "Soft",
                                                "soft"]}}}}})
    hard = body["reboot"]["type"].upper() == "HARD"
    compute = req.app.compute

    def work(server):
        compute.update(server["id"], task_state="reboot_started_hard" if hard
                       else "reboot_started")
        compute.driver_of(server).reboot(server, hard=hard)
        settle(compute, server["id"], vm_state="active", power_state=RUNNING)
        compute.refresh_addresses(server["id"])

    run_action(req, "reboot_hard" if hard else "reboot_soft",
               "rebooting_hard" if hard else "rebooting", "reboot",
               "compute_reboot_instance", work)
    return 202, None


def simple_action(req, rule, task, action, event, operation, final):
    """An action that calls one driver operation and lands in one state."""
    compute = req.app.compute

    def work(server):
        getattr(compute.driver_of(server), operation)(server)
        settle(compute, server["id"], **final)

    run_action(req, rule, task, action, event, work)
    return 202, None


def null_body(req, key):
    validate_body(req, {"type": "object", "additionalProperties": False, "required": [key],
                        "properties": {key: {}}})


def server_action_start(req):
    """POST /servers/{server_id}/action os-start"""
    null_body(req, "os-start")
    return simple_action(req, "start", "powering-on", "start", "compute_start_instance",
                         "power_on", {"vm_state": "active", "power_state": RUNNING})


def server_action_stop(req):
    """POST /servers/{server_id}/action os-stop"""
    null_body(req, "os-stop")
    compute = req.app.compute

    def work(server):
        compute.driver_of(server).power_off(server, timeout=req.app.conf["shutdown_timeout"])
        settle(compute, server["id"], vm_state="stopped", power_state=SHUTDOWN)

    run_action(req, "stop", "powering-off", "stop", "compute_stop_instance", work)
    return 202, None


def server_action_pause(req):
    """POST /servers/{server_id}/action pause"""
    null_body(req, "pause")
    return simple_action(req, "pause", "pausing", "pause", "compute_pause_instance", "pause",
                         {"vm_state": "paused", "power_state": PAUSED})


def server_action_unpause(req):
    """POST /servers/{server_id}/action unpause"""
    null_body(req, "unpause")
    return simple_action(req, "unpause", "unpausing", "unpause", "compute_unpause_instance",
                         "unpause", {"vm_state": "active", "power_state": RUNNING})


def server_action_suspend(req):
    """POST /servers/{server_id}/action suspend"""
    null_body(req, "suspend")
    return simple_action(req, "suspend", "suspending", "suspend", "compute_suspend_instance",
                         "suspend", {"vm_state": "suspended", "power_state": SHUTDOWN})


def server_action_resume(req):
    """POST /servers/{server_id}/action resume"""
    null_body(req, "resume")
    return simple_action(req, "resume", "resuming", "resume", "compute_resume_instance",
                         "resume", {"vm_state": "active", "power_state": RUNNING})


def server_action_trigger_crash_dump(req):
    """POST /servers/{server_id}/action trigger_crash_dump"""
    validate_body(req, {"type": "object", "additionalProperties": False,
                        "required": ["trigger_crash_dump"],
                        "properties": {"trigger_crash_dump": {"type": "null"}}})
    server, rid = begin_action(req, "trigger_crash_dump", None, "trigger_crash_dump")
    compute = req.app.compute
    compute.run(server["id"], rid, "compute_trigger_crash_dump",
                lambda server: compute.driver_of(server).trigger_crash_dump(server))
    return 202, None


def server_action_lock(req):
    """POST /servers/{server_id}/action lock"""
    props = {}
    if req.since("2.73"):
        props["locked_reason"] = {"type": "string", "minLength": 1, "maxLength": 255}
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["lock"], "properties": {"lock": {
                                   "type": ["object", "null"], "additionalProperties": False,
                                   "properties": props}}})
    reason = (body["lock"] or {}).get("locked_reason")
    server_id = req.params["server_id"]

    def plan(data):
        server = find_server(req, server_id)
        who = "admin" if req.ident.is_admin else "owner"
        return [["set", ["servers", server_id], dict(
            server, locked=True, locked_by=who, locked_reason=reason,
            updated_at=isotime_us(req.app.clock.now()))]]

    req.store.transaction(plan)
    req.app.compute.record_action(req, server_id, "lock")
    return 202, None


def server_action_unlock(req):
    """POST /servers/{server_id}/action unlock"""
    null_body(req, "unlock")
    server_id = req.params["server_id"]

    def plan(data):
        server = find_server(req, server_id)
        if server.get("locked_by") == "admin" and not req.ident.is_admin:
            authorize(req, "os_compute_api:os-lock-server:unlock:unlock_override", "admin")
        return [["set", ["servers", server_id], dict(
            server, locked=False, locked_by=None, locked_reason=None,
            updated_at=isotime_us(req.app.clock.now()))]]

    req.store.transaction(plan)
    req.app.compute.record_action(req, server_id, "unlock")
    return 202, None


def server_action_reset_state(req):
    """POST /servers/{server_id}/action os-resetState"""
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["os-resetState"], "properties": {"os-resetState": {
                                   "type": "object", "additionalProperties": False,
                                   "required": ["state"], "properties": {"state": {
                                       "type": "string", "enum": ["active", "error"]}}}}})
    server_id = req.params["server_id"]

    def plan(data):
        server = find_server(req, server_id)
        return [["set", ["servers", server_id], dict(
            server, vm_state=body["os-resetState"]["state"], task_state=None,
            updated_at=isotime_us(req.app.clock.now()))]]

    req.store.transaction(plan)
    req.app.compute.record_action(req, server_id, "reset_state")
    return 202, None


def server_action_inject_network_info(req):
    """POST /servers/{server_id}/action injectNetworkInfo"""
    validate_body(req, {"type": "object", "additionalProperties": False,
                        "required": ["injectNetworkInfo"],
                        "properties": {"injectNetworkInfo": {}}})
    server, rid = begin_action(req, "injectNetworkInfo", None, "inject_network_info",
                               check_lock=False)
    compute = req.app.compute
    compute.run(server["id"], rid, "compute_inject_network_info",
                lambda s: compute.refresh_addresses(s["id"]))
    return 202, None


def server_action_get_console_output(req):
    """POST /servers/{server_id}/action os-getConsoleOutput"""
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["os-getConsoleOutput"],
                               "properties": {"os-getConsoleOutput": {
                                   "type": "object", "additionalProperties": False,
                                   "properties": {"length": {
                                       "type": ["integer", "string", "null"],
                                       "pattern": r"^-?[0-9]+$"}}}}})
    length = body["os-getConsoleOutput"].get("length")
    if length is not None:
        length = int(length)
        if length < -1:
            raise BadRequest("length must be -1 or a positive number")
    server = find_server(req, req.params["server_id"])
    if server["vm_state"] in ("building",) or server.get("power_state") == NOSTATE:
        raise Conflict(f"Instance {server['id']} is not ready")
    output = req.app.compute.driver_of(server).get_console_output(server)
    if length is not None:       # Nova's _tail_log: the last `length` '\n'-separated pieces
        output = "\n".join(output.split("\n")[-length:]) if length else ""
    return 200, {"output": output}


def server_action_change_password(req):
    """POST /servers/{server_id}/action changePassword"""
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["changePassword"], "properties": {
                                   "changePassword": {"type": "object",
                                                      "additionalProperties": False,
                                                      "required": ["adminPass"],
                                                      "properties": {"adminPass": {
                                                          "type": "string"}}}}})
    server, rid = begin_action(req, "changePassword", "updating_password", "changePassword")
    compute = req.app.compute
    try:
        compute.driver_of(server).set_admin_password(server, body["changePassword"]["adminPass"])
    except (DriverError, Unavailable) as e:
        settle(compute, server["id"])
        compute.finish_event(server["id"], rid, "compute_set_admin_password",
                             compute.now(), str(e))
        if isinstance(e, GuestAgentMissing):
            raise Conflict(str(e)) from None
        raise Conflict(f"Failed to set admin password on {server['id']} because the guest "
                       "agent is not running in it") from None
    settle(compute, server["id"])
    compute.finish_event(server["id"], rid, "compute_set_admin_password", compute.now())
    return 202, None


def server_action_resize(req):
    """POST /servers/{server_id}/action resize"""
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["resize"], "properties": {"resize": {
                                   "type": "object", "additionalProperties": False,
                                   "required": ["flavorRef"], "properties": {
                                       "flavorRef": {"type": ["string", "integer"],
                                                     "minLength": 1},
                                       "OS-DCF:diskConfig": {"type": "string",
                                                             "enum": ["AUTO", "MANUAL"]}}}}})
    server = find_server(req, req.params["server_id"])
    refuse_vtpm_move(server, "resize")
    flavor = req.store.data["flavors"].get(ref_id(body["resize"]["flavorRef"]))
    if flavor is None or not flavor_visible(req, flavor):
        raise BadRequest("Unable to locate requested flavor.")
    if flavor["id"] == server["flavor"]["id"]:
        raise BadRequest("When resizing, instances must change flavor!")
    volume_backed = not server.get("image_ref")          # its root disk is a volume
    if flavor["disk"] == 0 and server["flavor"]["disk"] != 0 and not volume_backed:
        raise BadRequest("Resize to zero disk flavor is not allowed.")
    if flavor["disk"] < server["flavor"]["disk"] and not volume_backed:
        raise BadRequest("Resize of the server to a flavor with a smaller disk is not allowed.")
    check_guest_request(flavor, {"name": server["image_ref"],
                                 "properties": server.get("image_properties")},
                        create=False)
    new = {k: flavor[k] for k in server["flavor"]}
    extra = check_resize_quota(req, server, new)
    # as Nova: the one given, else MANUAL (auto_disk_config = given or False)
    extra["disk_config"] = body["resize"].get("OS-DCF:diskConfig", "MANUAL")
    compute = req.app.compute
    was_active = server["vm_state"] == "active"
    if server["vm_state"] in ("active", "stopped") and server.get("host"):
        check_fits(req, server, new)

    def work(server):
        compute.resize(server, new, was_active)

    run_action(req, "resize", "resize_prep", "resize", "compute_resize_instance", work,
               extra=extra)
    return 202, None


def check_fits(req, server, flavor, **where):
    """400 at once when no host can take the server with this flavor, as Nova's conductor
    answers a resize or cold migration."""
    with req.app.scheduler_lock:
        try:
            schedule(req.app, server, flavor, **where)
        except NoValidHost as e:
            raise BadRequest(str(e)) from None


def check_resize_quota(req, server, new):
    delta = {"cores": new["vcpus"] - server["flavor"]["vcpus"],
             "ram": new["ram"] - server["flavor"]["ram"]}
    data = req.store.data
    limits = project_limits(data, server["project_id"])
    used = usage(data, server["project_id"], index=req.app.usage)
    for resource, more in delta.items():
        if more > 0 and limits[resource] >= 0 and used[resource] + more > limits[resource]:
            raise Forbidden(f"Quota exceeded for {resource}: Requested {more}, but already "
                            f"used {used[resource]} of {limits[resource]} {resource}")
    return {}


def server_action_confirm_resize(req):
    """POST /servers/{server_id}/action confirmResize"""
    null_body(req, "confirmResize")
    server, rid = begin_action(req, "confirmResize", "resize_confirming", "confirmResize")
    compute = req.app.compute
    compute.confirm_resize(server)
    compute.finish_event(server["id"], rid, "compute_confirm_resize", compute.now())
    return 204, None


def server_action_revert_resize(req):
    """POST /servers/{server_id}/action revertResize"""
    null_body(req, "revertResize")
    compute = req.app.compute
    run_action(req, "revertResize", "resize_reverting", "revertResize",
               "compute_revert_resize", compute.revert_resize)
    return 202, None


HOST_NAME = {"type": "string", "minLength": 1, "maxLength": 255,
             "pattern": r"^[a-zA-Z0-9-._]*$"}


def moving_server(req, host, rule):
    """The server of a move request, with a requested destination host checked."""
    server = find_server(req, req.params["server_id"])
    if host is not None:
        authorize(req, rule, "admin")
        if host not in req.app.drivers:
            raise BadRequest(f"Compute host {host} could not be found.")
        if host == server.get("host"):
            raise BadRequest(f"Unable to migrate instance ({server['id']}) to current host "
                             f"({host}).")
    return server


def server_action_migrate(req):
    """POST /servers/{server_id}/action migrate: a cold migration to another host, which
    the scheduler picks unless an admin names it (2.56); VERIFY_RESIZE at the end."""
    props = {"host": dict(HOST_NAME, type=["string", "null"])} if req.since("2.56") else {}
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["migrate"], "properties": {"migrate": {
                                   "type": ["object", "null"], "additionalProperties": False,
                                   "properties": props}}})
    host = (body["migrate"] or {}).get("host")
    server = moving_server(req, host, "os_compute_api:os-migrate-server:migrate:host")
    refuse_vtpm_move(server, "migrate")
    compute = req.app.compute
    if server["vm_state"] in ("active", "stopped"):
        check_fits(req, server, server["flavor"], requested=host,
                   exclude=(server.get("host"),))
    was_active = server["vm_state"] == "active"
    run_action(req, "migrate", "resize_prep", "migrate", "compute_resize_instance",
               lambda current: compute.resize(current, current["flavor"], was_active,
                                              requested=host, kind="migration"))
    return 202, None


def server_action_migrate_live(req):
    """POST /servers/{server_id}/action os-migrateLive"""
    props = {"host": dict(HOST_NAME, type=["string", "null"]),
             "block_migration": {"type": ["boolean", "string"], "enum": BOOLEAN_STRINGS + (
                 ["auto"] if req.since("2.25") else [])}}
    if not req.since("2.25"):
        props["disk_over_commit"] = BOOL_LIKE
    if req.since("2.30") and not req.since("2.68"):
        props["force"] = BOOL_LIKE
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["os-migrateLive"], "properties": {
                                   "os-migrateLive": {
                                       "type": "object", "additionalProperties": False,
                                       "required": [k for k in ("block_migration", "host",
                                                                "disk_over_commit")
                                                    if k in props],
                                       "properties": props}}})
    spec = body["os-migrateLive"]
    host = spec.get("host")
    server = moving_server(req, host, "os_compute_api:os-migrate-server:migrate_live:host")
    refuse_vtpm_move(server, "live-migration")
    block = None if spec["block_migration"] == "auto" else \
        bool_from_string(spec["block_migration"])
    if block and all(driver.local for driver in req.app.drivers.values()):
        raise BadRequest(f"Block migration of instance {server['id']} cannot be used: the "
                         "instances directory is shared storage.")
    force = host is not None and bool_from_string(spec.get("force", False))
    compute = req.app.compute
    run_action(req, "os-migrateLive", "migrating", "live-migration",
               "compute_live_migration",
               lambda current: compute.live_migrate(current, host, force, block),
               on_error=lambda server_id, exc: compute.fail(
                   server_id, exc, vm_state=server["vm_state"]))
    return 202, None


def server_action_evacuate(req):
    """POST /servers/{server_id}/action evacuate: rebuild the server of a host that is
    down on another host (stopped there from 2.95)."""
    props = {"host": HOST_NAME, "adminPass": {"type": "string"}}
    required = []
    if not req.since("2.14"):
        props["onSharedStorage"] = BOOL_LIKE
        required.append("onSharedStorage")
    if req.since("2.29") and not req.since("2.68"):
        props["force"] = BOOL_LIKE
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["evacuate"], "properties": {"evacuate": {
                                   "type": "object", "additionalProperties": False,
                                   "required": required, "properties": props}}})
    spec = body["evacuate"]
    server = find_server(req, req.params["server_id"])
    host = spec.get("host")
    if host is not None:
        if host not in req.app.drivers:
            raise NotFound(f"Compute host {host} not found.")
        if host == server.get("host"):
            raise BadRequest("The target host can't be the same one.")
    shared = bool_from_string(spec.get("onSharedStorage", True))
    if not req.since("2.14") and shared and spec.get("adminPass"):
        raise BadRequest("admin password can't be changed on existing disk")
    password = spec.get("adminPass") or (
        None if not req.since("2.14") and shared else secrets.token_urlsafe(9)[:12])
    source = server.get("host")
    service = compute_service(req.app, source) if source else None
    if server["vm_state"] in ACTION_RULES["evacuate"][1] and service is not None and \
            service["up"]:
        raise BadRequest(f"Compute service of {source} is still in use.")
    force = host is not None and bool_from_string(spec.get("force", False))
    stop = req.since("2.95") or server["vm_state"] == "stopped"
    compute = req.app.compute
    server, rid = begin_action(req, "evacuate", "rebuilding", "evacuate", check_host=False)
    compute.run(server["id"], rid, "compute_rebuild_instance",
                lambda current: compute.evacuate(current, host, force, password, stop))
    if req.since("2.14"):
        return 200, None
    return 200, {"adminPass": password} if req.app.conf["enable_instance_password"] else None


def rebuild_schema(req):
    props = {"name": server_name_schema(req), "imageRef": {"type": "string"},
             "adminPass": {"type": "string"}, "metadata": METADATA_SCHEMA,
             "preserve_ephemeral": BOOL_LIKE,
             "OS-DCF:diskConfig": {"type": "string", "enum": ["AUTO", "MANUAL"]},
             "accessIPv4": IPV4, "accessIPv6": IPV6}
    if not req.since("2.57"):
        props["personality"] = {"type": "array"}
    if req.since("2.19"):
        props["description"] = DESCRIPTION_255
    if req.since("2.54"):
        props["key_name"] = {"type": ["string", "null"], "minLength": 1, "maxLength": 255}
    if req.since("2.57"):
        props["user_data"] = {"type": ["string", "null"], "maxLength": 65535}
    if req.since("2.63"):
        props["trusted_image_certificates"] = {"type": ["array", "null"], "minItems": 1,
                                               "maxItems": 50, "uniqueItems": True}
    if req.since("2.90"):
        props["hostname"] = hostname_schema(req)
    return {"type": "object", "additionalProperties": False, "required": ["rebuild"],
            "properties": {"rebuild": {"type": "object", "additionalProperties": False,
                                       "required": ["imageRef"], "properties": props}}}


def server_action_rebuild(req):
    """POST /servers/{server_id}/action rebuild"""
    spec = validate_body(req, rebuild_schema(req))["rebuild"]
    check_create_formats(spec, req)
    server = find_server(req, req.params["server_id"])
    image = resolve_boot_image(req, {"imageRef": spec["imageRef"]})
    # a volume-backed server: before 2.93 not with an image (it has none of its own), from
    # 2.93 its boot volume is written again with the image (Cinder's reimage, 3.68)
    reimage = bool(server.get("volume_backed"))
    if reimage and not req.since("2.93"):
        raise BadRequest(f"Image {image['id']} is unacceptable: Unable to rebuild with a "
                         "different image for a volume-backed server.")
    if server["flavor"]["ram"] < image.get("min_ram", 0):
        raise BadRequest("Flavor's memory is too small for requested image.")
    if server["flavor"]["disk"] and server["flavor"]["disk"] < image.get("min_disk", 0):
        raise BadRequest("Flavor's disk is too small for requested image.")
    check_guest_request(server["flavor"], image, create=False)
    if image["id"] != server.get("image_ref") and numa_request(
            server["flavor"], image_meta(server.get("image_properties"))) != numa_request(
            server["flavor"], image_meta(image.get("properties"))):
        raise BadRequest("An instance's NUMA topology cannot be changed as part of a "
                         "rebuild. The image provided is invalid for this instance.")
    extra = {"image_ref": "" if reimage else image["id"],
             "image_properties": dict(image.get("properties") or {})}
    for field, key in (("name", "name"), ("metadata", "metadata"),
                       ("OS-DCF:diskConfig", "disk_config"), ("accessIPv4", "access_ip_v4"),
                       ("accessIPv6", "access_ip_v6"), ("description", "description"),
                       ("user_data", "user_data"), ("hostname", "hostname"),
                       ("trusted_image_certificates", "trusted_image_certificates")):
        if field in spec:
            extra[key] = spec[field]
    if "key_name" in spec:
        extra["key_name"], extra["key_data"] = None, None
        if spec["key_name"] is not None:
            kp = req.store.data["keypairs"].get(req.ident.user_id, {}).get(spec["key_name"])
            if kp is None:
                raise BadRequest("Invalid key_name provided.")
            extra["key_name"], extra["key_data"] = spec["key_name"], kp["public_key"]
    admin_pass = spec.get("adminPass") or secrets.token_urlsafe(9)[:12]
    compute = req.app.compute
    was_active = server["vm_state"] != "stopped"    # as Nova: only a stopped one stays off

    def work(server):
        if reimage:
            compute.rebuild_boot_volume(server, was_active, admin_pass, image, req.ident)
        else:
            compute.rebuild(server, was_active, admin_pass)

    server = run_action(req, "rebuild", "rebuilding", "rebuild", "compute_rebuild_instance",
                        work, extra=extra)
    view_server = dict(server)
    if req.app.conf["enable_instance_password"]:
        view_server["admin_pass"] = admin_pass
    return 202, {"server": server_view(req, view_server, "rebuild")}


def snapshot_properties(server, extra):
    props = {"image_type": "snapshot", "instance_uuid": server["id"],
             "base_image_ref": server["image_ref"], "user_id": server["user_id"],
             "owner_project_name": server["project_id"], "image_location": "snapshot"}
    props.update(server.get("image_properties") or {})
    props.update(extra)
    return {k: str(v) for k, v in props.items()}


def snapshot_response(req, image):
    if req.since("2.45"):
        return 202, {"image_id": image["id"]}
    return 202, None, {"Location": req.bookmark_link("images", image["id"])}


def server_action_create_image(req):
    """POST /servers/{server_id}/action createImage"""
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["createImage"], "properties": {"createImage": {
                                   "type": "object", "additionalProperties": False,
                                   "required": ["name"], "properties": {
                                       "name": server_name_schema(req),
                                       "metadata": METADATA_SCHEMA}}}})["createImage"]
    server = find_server(req, req.params["server_id"])
    check_image_meta_quota(req, body.get("metadata") or {})
    properties = snapshot_properties(server, body.get("metadata") or {})
    if server.get("volume_backed"):
        return snapshot_response(req, snapshot_volume_backed(req, server, body["name"],
                                                             properties))
    image = start_snapshot(req, server, body["name"], properties, "createImage",
                           "image_snapshot")
    return snapshot_response(req, image)


def snapshot_volume_backed(req, server, name, properties):
    """Nova's snapshot of a volume-backed server: a Cinder snapshot of each volume, and an
    empty image whose block_device_mapping boots new servers from those snapshots."""
    begin_action(req, "createImage", None, "createImage")
    cinder = req.app.volumes
    if cinder is None:
        raise Conflict("The block storage service is gone from the catalog.")
    mapping = []
    for vol in server.get("volumes", []):
        if not vol.get("id"):
            continue
        try:
            snap = cinder.create_snapshot(req.ident, vol["id"], force=True,
                                          name=f"snapshot for {name}")
        except VolumeError as e:
            raise cinder_fault(e) from None
        mapping.append({"source_type": "snapshot", "destination_type": "volume",
                        "snapshot_id": snap["id"], "volume_size": snap["size"],
                        "boot_index": vol.get("boot_index"), "device_name": vol.get("device"),
                        "delete_on_termination": bool(vol.get("delete_on_termination")),
                        "tag": vol.get("tag"), "volume_id": None, "image_id": None,
                        "no_device": None, "guest_format": None, "disk_bus": None,
                        "device_type": None, "volume_type": None})
    properties = dict(properties, root_device_name=server.get("root_device_name")
                      or "/dev/vda", bdm_v2="True", block_device_mapping=json.dumps(mapping))
    properties.pop("base_image_ref", None)
    image = req.app.images.create_empty(name, server["project_id"], properties)
    req.app.compute.update(server["id"], task_state=None)
    return image


def check_image_meta_quota(req, metadata):
    if req.since("2.39"):
        return
    limit = project_limits(req.store.data, req.ident.project_id)["metadata_items"]
    if 0 <= limit < len(metadata):
        raise Forbidden(f"Quota exceeded for metadata_items: Requested {len(metadata)}, but "
                        f"already used 0 of {limit} metadata_items")


def start_snapshot(req, server, name, properties, rule, task, rotation=None):
    flavor = server["flavor"]
    image_min_ram = int((req.app.images.get(server["image_ref"]) or {}).get("min_ram", 0)) \
        if server["image_ref"] else 0
    begin_action(req, rule, task, rule)
    image = req.app.images.reserve_snapshot(name, server["project_id"], properties,
                                            flavor["disk"], image_min_ram)
    compute = req.app.compute
    rid = req.request_id

    def work(server):
        compute.snapshot(server, image)
        if rotation is not None:
            compute.rotate_backups(server, properties["backup_type"], rotation)
        settle(compute, server["id"])

    def failed(server_id, exc):
        req.app.images.delete(image)
        compute.fail(server_id, exc, vm_state=server["vm_state"])
        compute.update(server_id, task_state=None)

    compute.run(server["id"], rid, "compute_snapshot_instance", work, on_error=failed)
    return image


def server_action_create_backup(req):
    """POST /servers/{server_id}/action createBackup"""
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["createBackup"], "properties": {"createBackup": {
                                   "type": "object", "additionalProperties": False,
                                   "required": ["name", "backup_type", "rotation"],
                                   "properties": {"name": server_name_schema(req),
                                                  "backup_type": {"type": "string"},
                                                  "rotation": int_or_digits(0),
                                                  "metadata": METADATA_SCHEMA}}}})["createBackup"]
    server = find_server(req, req.params["server_id"])
    if server.get("volume_backed"):
        raise BadRequest("Backup is not supported for volume-backed instances.")
    check_image_meta_quota(req, body.get("metadata") or {})
    props = snapshot_properties(server, dict(body.get("metadata") or {}, image_type="backup",
                                             backup_type=body["backup_type"]))
    image = start_snapshot(req, server, body["name"], props, "createBackup", "image_backup",
                           rotation=int(body["rotation"]))
    return snapshot_response(req, image)


def server_action_shelve(req):
    """POST /servers/{server_id}/action shelve"""
    null_body(req, "shelve")
    compute = req.app.compute
    run_action(req, "shelve", "shelving", "shelve", "compute_shelve_instance", compute.shelve)
    return 202, None


def server_action_shelve_offload(req):
    """POST /servers/{server_id}/action shelveOffload"""
    null_body(req, "shelveOffload")
    compute = req.app.compute
    run_action(req, "shelveOffload", "shelving_offloading", "shelveOffload",
               "compute_shelve_offload_instance", compute.shelve_offload)
    return 202, None


def server_action_unshelve(req):
    """POST /servers/{server_id}/action unshelve"""
    props = {}
    if req.since("2.77"):
        props["availability_zone"] = {"type": ["string", "null"]} if req.since("2.91") else \
            {"type": "string"}
    if req.since("2.91"):
        props["host"] = {"type": "string", "minLength": 1, "maxLength": 255}
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["unshelve"], "properties": {"unshelve": {
                                   "type": ["object", "null"], "additionalProperties": False,
                                   "properties": props}}})
    spec = body["unshelve"] or {}
    server = find_server(req, req.params["server_id"])
    zone = spec.get("availability_zone")
    if zone and zone not in compute_zones(req.app):
        raise BadRequest("The requested availability zone is not available")
    if spec.get("host"):
        authorize(req, "os_compute_api:os-shelve:unshelve_to_host", "admin")
        if spec["host"] not in req.app.drivers:
            raise BadRequest(f"Compute host {spec['host']} could not be found.")
    if ("availability_zone" in spec or "host" in spec) and \
            server["vm_state"] != "shelved_offloaded":
        raise Conflict(f"The server {server['id']} is not in SHELVED_OFFLOADED state: an "
                       "availability zone or host can only be given for such a server.")
    if spec.get("host") and zone and host_zone(req.app, spec["host"]) != zone:
        raise BadRequest(f"Host {spec['host']} is not in availability zone {zone}.")
    compute = req.app.compute

    def work(current):
        if "availability_zone" in spec:
            compute.update(current["id"], pinned_availability_zone=zone)
        compute.unshelve(compute.store.data["servers"][current["id"]], spec.get("host"))
    run_action(req, "unshelve", "unshelving", "unshelve", "compute_unshelve_instance", work,
               on_error=compute.unshelve_failed)
    return 202, None


RESCUE_BUSES = {"virtio": "vd", "scsi": "sd", "usb": "sd", "sata": "sd", "ide": "hd"}


def stable_rescue_device(props):
    """(device, bus) of a stable device rescue, where the rescue image asks for one
    (hw_rescue_device, hw_rescue_bus): the server's disks keep their places and the
    rescue disk joins them, to boot first.  None: the legacy rescue."""
    if "hw_rescue_device" not in props and "hw_rescue_bus" not in props:
        return None
    device = props.get("hw_rescue_device") or "disk"
    if device not in ("disk", "cdrom"):
        raise BadRequest(f"Requested rescue device '{device}' is not supported")
    bus = props.get("hw_rescue_bus") or ("ide" if device == "cdrom" else "virtio")
    if bus not in RESCUE_BUSES or (device == "cdrom" and bus == "virtio"):
        raise BadRequest(f"Requested rescue bus '{bus}' is not supported by the libvirt "
                         "virt driver")
    return device, bus


def server_action_rescue(req):
    """POST /servers/{server_id}/action rescue"""
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["rescue"], "properties": {"rescue": {
                                   "type": ["object", "null"], "additionalProperties": False,
                                   "properties": {"adminPass": {"type": "string"},
                                                  "rescue_image_ref": {"type": "string"}}}}})
    spec = body["rescue"] or {}
    server = find_server(req, req.params["server_id"])
    image_ref = spec.get("rescue_image_ref") or server["image_ref"]
    image = resolve_boot_image(req, {"imageRef": image_ref}) if image_ref else None
    props = (image or {}).get("properties") or {}
    if image is not None and props.get("block_device_mapping"):
        raise BadRequest(f"Requested rescue image '{image_ref}' is not supported")
    stable = stable_rescue_device(props)
    if server.get("volume_backed") and not (
            req.since("2.87") and "hw_rescue_device" in props and "hw_rescue_bus" in props):
        raise BadRequest(f"Instance {server['id']} cannot be rescued: Cannot rescue a "
                         "volume-backed instance")
    if image is None:
        raise BadRequest(f"Instance {server['id']} cannot be rescued: it has no image; "
                         "give rescue_image_ref")
    admin_pass = spec.get("adminPass") or secrets.token_urlsafe(9)[:12]
    compute = req.app.compute
    was = server["vm_state"]

    def work(server):
        try:
            compute.rescue(server, image, was, stable)
        except ImageUnacceptable as e:        # as Nova's InstanceNotRescuable
            raise DriverError(f"Instance {server['id']} cannot be rescued: Driver Error: "
                              f"{e}") from None

    run_action(req, "rescue", "rescuing", "rescue", "compute_rescue_instance", work)
    if req.app.conf["enable_instance_password"]:
        return 200, {"adminPass": admin_pass}
    return 200, {}


def server_action_unrescue(req):
    """POST /servers/{server_id}/action unrescue"""
    null_body(req, "unrescue")
    compute = req.app.compute
    run_action(req, "unrescue", "unrescuing", "unrescue", "compute_unrescue_instance",
               compute.unrescue)
    return 202, None


def server_action_restore(req):
    """POST /servers/{server_id}/action restore"""
    null_body(req, "restore")
    compute = req.app.compute
    run_action(req, "restore", "restoring", "restore", "compute_restore_instance",
               compute.restore)
    return 202, None


def server_action_force_delete(req):
    """POST /servers/{server_id}/action forceDelete"""
    null_body(req, "forceDelete")
    compute = req.app.compute
    run_action(req, "forceDelete", "deleting", "forceDelete", "compute_terminate_instance",
               compute.delete)
    return 202, None


def security_group_action(req, key, change):
    name = validate_body(req, {"type": "object", "required": [key], "properties": {key: {
        "type": "object", "additionalProperties": False, "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1}}}}})[key]["name"]
    server_id = req.params["server_id"]
    neutron = req.app.network
    if neutron is not None:
        return neutron_security_group_action(req, neutron, name, key == "addSecurityGroup")

    def plan(data):
        server = find_server(req, server_id)
        if name not in {g["name"] for g in security_groups_of(data, server["project_id"])
                        .values()}:
            raise NotFound(f"Security group {name} not found.")
        groups = change(list(server.get("security_groups", [])), name, server_id)
        return [["set", ["servers", server_id], dict(
            server, security_groups=groups, updated_at=isotime_us(req.app.clock.now()))]]

    req.store.transaction(plan)
    req.app.compute.refresh_filters(req.store.data["servers"][server_id]["project_id"])
    return 202, None


def neutron_security_group_action(req, neutron, name, adding):
    """add/removeSecurityGroup with Neutron: the group (by name, else by id) joins or
    leaves every port."""
    server = find_server(req, req.params["server_id"])
    check_not_locked(req, server)
    group = neutron.find_security_groups(server["project_id"], [name], NotFound)[0]
    names, ids = list(server.get("security_groups", [])), server.get("security_group_ids")
    if ids is None or len(ids) != len(names):
        ids = neutron.security_group_ids(server["project_id"], names)
    ids = list(ids)
    if adding:
        if group["id"] in ids:
            raise BadRequest(f"Security group {name} is already associated with the "
                             f"instance {server['id']}")
        names, ids = names + [group["name"]], ids + [group["id"]]
    else:
        if group["id"] not in ids:
            raise BadRequest(f"Security group {name} not associated with the instance "
                             f"{server['id']}")
        del names[ids.index(group["id"])]
        ids.remove(group["id"])
    try:
        for port in server.get("ports", []):
            if port.get("neutron"):
                neutron.update_port(port["id"], {"security_groups": ids})
    except NetworkError as e:
        raise neutron_fault(e) from None
    req.app.compute.update(server["id"], security_groups=names, security_group_ids=ids)
    return 202, None


def server_action_add_security_group(req):
    """POST /servers/{server_id}/action addSecurityGroup"""
    def add(groups, name, server_id):
        if name in groups:
            raise BadRequest(f"Security group {name} is already associated with the instance "
                             f"{server_id}")
        return groups + [name]
    return security_group_action(req, "addSecurityGroup", add)


def server_action_remove_security_group(req):
    """POST /servers/{server_id}/action removeSecurityGroup"""
    def remove(groups, name, server_id):
        if name not in groups:
            raise BadRequest(f"Security group {name} not associated with the instance "
                             f"{server_id}")
        return [g for g in groups if g != name]
    return security_group_action(req, "removeSecurityGroup", remove)


# -- sub-resources ------------------------------------------------------------------

def server_ips_index(req):
    """GET /servers/{server_id}/ips"""
    validate_query(req, (), strict_since="2.102")
    server = find_server(req, req.params["server_id"])
    return 200, {"addresses": server_addresses(server, with_ext=False)}


def server_ips_show(req):
    """GET /servers/{server_id}/ips/{id}"""
    validate_query(req, (), strict_since="2.102")
    server = find_server(req, req.params["server_id"])
    addresses = server_addresses(server, with_ext=False)
    network = req.params["id"]
    if network not in addresses:
        raise NotFound("Instance is not a member of specified network")
    return 200, {network: addresses[network]}


def metadata_change(req, change):
    """Apply change(old metadata) -> new metadata to the server, checking state and quota."""
    server_id = req.params["server_id"]

    def plan(data):
        server = find_server(req, server_id)
        check_not_locked(req, server)
        name, vm_states, _ = ACTION_RULES["metadata"]
        if server["vm_state"] not in vm_states:
            raise Conflict(f"Cannot '{name}' instance {server_id} while it is in vm_state "
                           f"{server['vm_state']}")
        new = change(dict(server["metadata"]))
        limit = project_limits(data, server["project_id"])["metadata_items"]
        if 0 <= limit < len(new):
            raise Forbidden(f"Quota exceeded for metadata_items: Requested {len(new)}, but "
                            f"already used 0 of {limit} metadata_items")
        return [["set", ["servers", server_id], dict(
            server, metadata=new, updated_at=isotime_us(req.app.clock.now()))]]

    req.store.transaction(plan)
    return req.store.data["servers"][server_id]["metadata"]


def metadata_body(req, key="metadata"):
    return validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": [key], "properties": {key: METADATA_SCHEMA}})[key]


def server_metadata_index(req):
    """GET /servers/{server_id}/metadata"""
    validate_query(req, (), strict_since="2.102")
    return 200, {"metadata": dict(find_server(req, req.params["server_id"])["metadata"])}


def server_metadata_create(req):
    """POST /servers/{server_id}/metadata"""
    items = metadata_body(req)
    return 200, {"metadata": metadata_change(req, lambda old: dict(old, **items))}


def server_metadata_update_all(req):
    """PUT /servers/{server_id}/metadata"""
    items = metadata_body(req)
    return 200, {"metadata": metadata_change(req, lambda old: dict(items))}


def server_metadata_show(req):
    """GET /servers/{server_id}/metadata/{id}"""
    validate_query(req, (), strict_since="2.102")
    metadata = find_server(req, req.params["server_id"])["metadata"]
    key = req.params["id"]
    if key not in metadata:
        raise NotFound("Metadata item was not found")
    return 200, {"meta": {key: metadata[key]}}


def single_meta_item(req):
    """The {"meta": {key: value}} body of PUT .../metadata/{id}: one item, the URL's key."""
    item = metadata_body(req, "meta")
    if len(item) != 1:
        raise BadRequest("Request body contains too many items")
    if req.params["id"] not in item:
        raise BadRequest("Request body and URI mismatch")
    return item


def without_key(key, missing):
    """A metadata change removing key (404 with this message when it is not there)."""
    def change(old):
        if key not in old:
            raise NotFound(missing)
        del old[key]
        return old
    return change


def server_metadata_update(req):
    """PUT /servers/{server_id}/metadata/{id}"""
    item = single_meta_item(req)
    metadata_change(req, lambda old: dict(old, **item))
    return 200, {"meta": item}


def server_metadata_delete(req):
    """DELETE /servers/{server_id}/metadata/{id}"""
    metadata_change(req, without_key(req.params["id"], "Metadata item was not found"))
    return 204, None


# tags (2.26)

def tags_change(req, change):
    server_id = req.params["server_id"]

    def plan(data):
        server = find_server(req, server_id)
        check_not_locked(req, server)
        if server["vm_state"] not in ("active", "paused", "suspended", "stopped", "shelved",
                                      "shelved_offloaded", "building", "error", "rescued",
                                      "resized") or server.get("task_state") == "deleting":
            raise Conflict(f"Cannot 'update tags' instance {server_id} while it is in "
                           f"vm_state {server['vm_state']}")
        tags = change(list(server.get("tags", [])))
        if len(tags) > MAX_TAGS:
            raise BadRequest(f"The number of tags exceeded the per-server limit {MAX_TAGS}")
        return [["set", ["servers", server_id], dict(
            server, tags=tags, updated_at=isotime_us(req.app.clock.now()))]]

    req.store.transaction(plan)
    return req.store.data["servers"][server_id]["tags"]


def check_tag(tag):
    if not 1 <= len(tag) <= 60 or "/" in tag or "," in tag:
        raise BadRequest(f"Tag '{tag}' is invalid. It must be 1 to 60 characters long and "
                         "contain neither '/' nor ','.")


def server_tags_index(req):
    """GET /servers/{server_id}/tags"""
    validate_query(req, (), strict_since="2.102")
    return 200, {"tags": list(find_server(req, req.params["server_id"]).get("tags", []))}


def server_tags_update_all(req):
    """PUT /servers/{server_id}/tags"""
    tags = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["tags"], "properties": {"tags": {
                                   "type": "array", "items": TAG_SCHEMA}}})["tags"]
    unique = list(dict.fromkeys(tags))
    return 200, {"tags": tags_change(req, lambda old: unique)}


def server_tags_delete_all(req):
    """DELETE /servers/{server_id}/tags"""
    tags_change(req, lambda old: [])
    return 204, None


def server_tags_show(req):
    """GET /servers/{server_id}/tags/{id}"""
    validate_query(req, (), strict_since="2.102")
    tag = req.params["id"]
    if tag not in find_server(req, req.params["server_id"]).get("tags", []):
        raise NotFound(f"Tag {tag} could not be found.")
    return 204, None


def server_tags_update(req):
    """PUT /servers/{server_id}/tags/{id}"""
    tag = req.params["id"]
    check_tag(tag)
    existed = tag in find_server(req, req.params["server_id"]).get("tags", [])
    tags_change(req, lambda old: old if tag in old else old + [tag])
    if existed:
        return 204, None
    return 201, None, {"Location": req.self_link("servers", req.params["server_id"], "tags", tag)}


def server_tags_delete(req):
    """DELETE /servers/{server_id}/tags/{id}"""
    tag = req.params["id"]

    def change(old):
        if tag not in old:
            raise NotFound(f"Tag {tag} could not be found.")
        return [t for t in old if t != tag]

    tags_change(req, change)
    return 204, None


# interfaces (os-interface)

INTERFACE_STATES = ("active", "paused", "stopped")


def interface_view(req, server, port):
    if port.get("neutron"):
        network_id = port["network_id"]
        subnets = port.get("subnet_ids") or []
    else:
        network_id = req.app.driver.network_id(port["network"]) if req.app.driver else None
        network_id = network_id or str(uuid.uuid5(IMAGE_NAMESPACE,
                                                  "network:" + port["network"]))
        subnets = [str(uuid.uuid5(IMAGE_NAMESPACE, "subnet:" + port["network"]))] * len(
            port.get("ips", []))
    view = {"port_state": "ACTIVE", "fixed_ips": [
        {"subnet_id": subnet, "ip_address": addr}
        for (addr, _), subnet in zip(port.get("ips", []), subnets)],
        "port_id": port["id"], "net_id": network_id, "mac_addr": port["mac"]}
    if req.since("2.70"):
        view["tag"] = port.get("tag")
    return view


def server_interfaces_index(req):
    """GET /servers/{server_id}/os-interface"""
    validate_query(req, (), strict_since="2.102")
    server = find_server(req, req.params["server_id"])
    return 200, {"interfaceAttachments": [interface_view(req, server, p)
                                          for p in server.get("ports", [])]}


def find_port(server, port_id):
    for port in server.get("ports", []):
        if port["id"] == port_id:
            return port
    raise NotFound(f"Network interface {port_id} could not be found.")


def server_interfaces_show(req):
    """GET /servers/{server_id}/os-interface/{id}"""
    validate_query(req, (), strict_since="2.102")
    server = find_server(req, req.params["server_id"])
    return 200, {"interfaceAttachment": interface_view(req, server,
                                                       find_port(server, req.params["id"]))}


def interface_schema(req):
    props = {"net_id": {"type": "string", "format": "uuid"},
             "port_id": {"type": "string", "format": "uuid"},
             "fixed_ips": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
                 "type": "object", "additionalProperties": False,
                 "required": ["ip_address"], "properties": {"ip_address": {"type": "string"}}}}}
    if req.since("2.49"):
        props["tag"] = TAG_SCHEMA
    return {"type": "object", "additionalProperties": False, "properties": {
        "interfaceAttachment": {"type": "object", "additionalProperties": False,
                                "properties": props}}}


def server_interfaces_create(req):
    """POST /servers/{server_id}/os-interface"""
    spec = (validate_body(req, interface_schema(req)) or {}).get("interfaceAttachment") or {}
    if req.app.network is not None:
        server = find_server(req, req.params["server_id"])
        return 200, {"interfaceAttachment": interface_view(
            req, server, attach_neutron_port(req, spec))}
    if spec.get("port_id"):
        raise NotFound(f"Port {spec['port_id']} could not be found.")
    network = req.app.conf["network"]
    if spec.get("net_id"):
        network = req.app.network_name(spec["net_id"])
        if network is None:
            raise NotFound(f"Network {spec['net_id']} could not be found.")
    fixed = None
    for item in spec.get("fixed_ips") or []:
        check_ip("ip_address", item["ip_address"], None)
        fixed = item["ip_address"]
    server = find_server(req, req.params["server_id"])
    port = attach_port(req, server, network, fixed, spec.get("tag"))
    return 200, {"interfaceAttachment": interface_view(req, server, port)}


def check_interface_change(req, server, action, needs_host=False):
    """409 while a NIC cannot be plugged or unplugged (locked, busy, or in a state that
    does not allow it; needs_host: also without a host)."""
    check_not_locked(req, server)
    if server["vm_state"] not in INTERFACE_STATES or server.get("task_state") or \
            needs_host and not server.get("host"):
        raise Conflict(f"Cannot '{action}' instance {server['id']} while it is in "
                       f"vm_state {server['vm_state']}")


def attach_port(req, server, network, fixed=None, tag=None):
    """A new NIC on a libvirt network, plugged into the (running) guest at once."""
    port = {"id": str(uuid.uuid4()), "mac": new_mac(), "network": network, "fixed_ip": fixed,
            "ips": [[fixed, 6 if ":" in fixed else 4]] if fixed else [], "tag": tag}
    check_interface_change(req, server, "attach_interface")
    driver = req.app.compute.driver_of(server)
    started = req.app.compute.now()
    try:
        driver.define_filter(server, server_filter_xml(server, req.store.data))
        driver.attach_interface(server, port)
    except DriverError:
        raise Conflict(f"Failed to attach network adapter device to {server['id']}") from None
    req.app.compute.change_ports(server["id"], lambda ports: ports + [port])
    if not server.get("security_groups"):
        req.app.compute.update(server["id"], security_groups=["default"])
    record_done_action(req, server["id"], "attach_interface", started)
    return port


def record_done_action(req, server_id, action, started):
    """An instance action done within its request, with its successful compute_<action>
    event (what Tempest's waiters look for).  A refused one (409) leaves no record: a
    rejected request changes nothing."""
    compute = req.app.compute
    rid = compute.record_action(req, server_id, action)
    compute.finish_event(server_id, rid, "compute_" + action, started)


def attach_neutron_port(req, spec):
    """os-interface with Neutron: the given port, or a new one on the given (or only)
    network, bound to the server's host and hot-plugged."""
    neutron = req.app.network
    server = find_server(req, req.params["server_id"])
    check_interface_change(req, server, "attach_interface", needs_host=True)
    if spec.get("port_id"):
        wanted = [{"port": spec["port_id"], "tag": spec.get("tag")}]
    elif spec.get("net_id"):
        fixed = [item["ip_address"] for item in spec.get("fixed_ips") or []]
        wanted = [{"uuid": spec["net_id"], "fixed_ip": fixed[0] if fixed else None,
                   "tag": spec.get("tag")}]
    else:
        wanted = None
    requests = resolve_neutron_networks(req, neutron, wanted)
    if not requests:
        raise BadRequest("No network is available to attach an interface to.")
    compute = req.app.compute
    if server.get("security_group_ids") is None:
        server = dict(server, security_group_ids=neutron.security_group_ids(
            server["project_id"], server.get("security_groups") or ["default"]))
    started = compute.now()
    port = compute.make_port(server, requests[0])
    try:
        compute.driver_of(server).attach_interface(server, port)
    except DriverError:
        compute.release_ports({"id": server["id"], "ports": [port]})
        raise Conflict(f"Failed to attach network adapter device to {server['id']}") from None
    compute.change_ports(server["id"], lambda ports: ports + [port])
    record_done_action(req, server["id"], "attach_interface", started)
    return port


def server_interfaces_delete(req):
    """DELETE /servers/{server_id}/os-interface/{id}"""
    server = find_server(req, req.params["server_id"])
    detach_port(req, server, find_port(server, req.params["id"]))
    return 202, None


def detach_port(req, server, port):
    check_interface_change(req, server, "detach_interface")
    started = req.app.compute.now()
    try:
        req.app.compute.driver_of(server).detach_interface(server, port)
    except DriverError:
        raise Conflict(f"Failed to detach network adapter device from {server['id']}") \
            from None
    req.app.compute.change_ports(server["id"], lambda ports: [p for p in ports
                                                               if p["id"] != port["id"]])
    req.app.compute.release_ports({"id": server["id"], "ports": [port]})
    record_done_action(req, server["id"], "detach_interface", started)


def server_action_add_fixed_ip(req):
    """POST /servers/{server_id}/action addFixedIp: one more NIC, on that network (up to
    2.43, as Nova's multinic)"""
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["addFixedIp"], "properties": {"addFixedIp": {
                                   "type": "object", "additionalProperties": False,
                                   "required": ["networkId"], "properties": {"networkId": {
                                       "type": ["string", "number"], "minLength": 1,
                                       "maxLength": 36}}}}})
    network_id = str(body["addFixedIp"]["networkId"])
    server = find_server(req, req.params["server_id"])
    if req.app.network is not None:
        attach_neutron_port(req, {"net_id": network_id})
        return 202, None
    network = req.app.network_name(network_id)
    if network is None:
        raise BadRequest(f"Network {network_id} could not be found.")
    attach_port(req, server, network)
    return 202, None


def server_action_remove_fixed_ip(req):
    """POST /servers/{server_id}/action removeFixedIp: the NIC with that address goes"""
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["removeFixedIp"], "properties": {"removeFixedIp": {
                                   "type": "object", "additionalProperties": False,
                                   "required": ["address"], "properties": {"address": {
                                       "type": "string"}}}}})
    address = body["removeFixedIp"]["address"]
    check_ip("address", address, None)
    server = find_server(req, req.params["server_id"])
    for port in server.get("ports", []):
        if port.get("fixed_ip") == address or any(ip == address for ip, _ in port["ips"]):
            detach_port(req, server, port)
            return 202, None
    raise BadRequest(f"Instance {server['id']} doesn't have fixed IP '{address}'.")


# volume attachments

ATTACH_STATES = ("active", "paused", "stopped", "resized", "soft-delete", "shelved",
                 "shelved_offloaded")
SWAP_STATES = ("active", "paused", "resized")


def limited(req, items):
    """Nova's offset/limit paging of a list (common.limited)."""
    values = {}
    for name in ("offset", "limit"):
        text = req.q(name)
        if text is None:
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise BadRequest(f"{name} param must be an integer") from None
        if values[name] < 0:
            raise BadRequest(f"{name} param must be positive")
    offset = values.get("offset", 0)
    limit = min(values.get("limit") or req.app.conf["max_limit"], req.app.conf["max_limit"])
    return items[offset:offset + limit]


def volume_attachment_view(req, server, vol, listing=True):
    view = {} if req.since("2.89") and listing else {"id": vol["id"]}
    view.update(volumeId=vol["id"], serverId=server["id"])
    if vol.get("device"):
        view["device"] = vol["device"]
    if req.since("2.70"):
        view["tag"] = vol.get("tag")
    if req.since("2.79"):
        view["delete_on_termination"] = bool(vol.get("delete_on_termination"))
    if req.since("2.89") and listing:
        view["attachment_id"] = vol.get("attachment_id")
        view["bdm_uuid"] = vol["bdm_uuid"]
    return view


def attached_volume(server, volume_id):
    vol = next((v for v in server.get("volumes", []) if v.get("id") == volume_id), None)
    if vol is None:
        raise NotFound(f"Instance {server['id']} is not attached to volume {volume_id}")
    return vol


def server_volume_attachments_index(req):
    """GET /servers/{server_id}/os-volume_attachments"""
    validate_query(req, ["limit", "offset"], strict_since="2.75")
    server = find_server(req, req.params["server_id"])
    authorize(req, "os_compute_api:os-volumes-attachments:index", "reader",
              server["project_id"])
    vols = [v for v in server.get("volumes", []) if v.get("id")]
    if req.since("2.89"):
        vols = [v for v in vols if v.get("attachment_id")]
    return 200, {"volumeAttachments": [volume_attachment_view(req, server, v)
                                       for v in limited(req, vols)]}


def server_volume_attachments_show(req):
    """GET /servers/{server_id}/os-volume_attachments/{id}"""
    validate_query(req, (), strict_since="2.102")
    server = find_server(req, req.params["server_id"])
    authorize(req, "os_compute_api:os-volumes-attachments:show", "reader",
              server["project_id"])
    vol = attached_volume(server, req.params["id"])
    return 200, {"volumeAttachment": volume_attachment_view(req, server, vol)}


def volume_attachment_schema(req):
    props = {"volumeId": {"type": "string", "format": "uuid"},
             "device": {"type": ["string", "null"], "pattern": DEVICE_PATTERN}}
    if req.since("2.49"):
        props["tag"] = TAG_SCHEMA
    if req.since("2.79"):
        props["delete_on_termination"] = BOOL_LIKE
    return {"type": "object", "additionalProperties": False, "required": ["volumeAttachment"],
            "properties": {"volumeAttachment": {
                "type": "object", "additionalProperties": False, "required": ["volumeId"],
                "properties": props}}}


DEVICE_PATTERN = r"(^/dev/x{0,1}[a-z]{0,1}d{0,1})([a-z]+)[0-9]*$"


def volume_state_check(req, server, method, states=ATTACH_STATES):
    check_not_locked(req, server)
    if server["vm_state"] not in states or server.get("task_state"):
        what = "task_state" if server["vm_state"] in states else "vm_state"
        value = server.get("task_state") if what == "task_state" else server["vm_state"]
        raise Conflict(f"Cannot '{method}' instance {server['id']} while it is in "
                       f"{what} {value}")
    if server["vm_state"] in ("shelved", "shelved_offloaded") and not req.since("2.20"):
        raise Conflict(f"Cannot '{method}' instance {server['id']} while it is in vm_state "
                       f"{server['vm_state']}")


def the_volume(req, volume_id, fault=NotFound):
    """The caller's volume from Cinder (404, or fault, when it has none)."""
    cinder = req.app.volumes
    volume = cinder.get(req.ident, volume_id) if cinder is not None else None
    if volume is None:
        raise fault(f"Volume {volume_id} could not be found.")
    return cinder, volume


def check_not_attached(req, server, volume):
    """Nova's duplicate-attachment checks, against every server minivan holds."""
    holders = [s["id"] for s in req.store.data["servers"].values()
               if s["vm_state"] != "deleted" and any(
                   v.get("id") == volume["id"] for v in s.get("volumes", []))]
    if holders and not volume.get("multiattach"):
        raise BadRequest(f"Invalid volume: volume {volume['id']} is already attached to "
                         f"instances: {' '.join(holders)}")
    if server["id"] in holders:
        raise BadRequest(f"Invalid volume: volume {volume['id']} already attached")


def server_volume_attachments_create(req):
    """POST /servers/{server_id}/os-volume_attachments"""
    spec = validate_body(req, volume_attachment_schema(req))["volumeAttachment"]
    server = find_server(req, req.params["server_id"])
    authorize(req, "os_compute_api:os-volumes-attachments:create", "member",
              server["project_id"])
    volume_state_check(req, server, "attach_volume")
    cinder, volume = the_volume(req, spec["volumeId"])
    check_not_attached(req, server, volume)
    if server["vm_state"] == "shelved_offloaded" and spec.get("tag"):
        raise BadRequest("Tagged volume attachment is not supported for shelved-offloaded "
                         "instances.")
    vol = {"id": volume["id"], "bdm_uuid": str(uuid.uuid4()), "boot_index": None,
           "tag": spec.get("tag"), "source": {"type": "volume"},
           "delete_on_termination": bool_from_string(spec.get("delete_on_termination", False)),
           "target": next_target(server, spec.get("device")), "connection_info": None}
    vol["device"] = "/dev/" + vol["target"]
    try:
        vol["attachment_id"] = cinder.attachment_create(req.ident, volume["id"],
                                                        server["id"])["id"]
    except VolumeError as e:
        raise BadRequest(f"Invalid volume: {e.message}") from None
    compute = req.app.compute
    compute.set_volume(server["id"], vol)
    rid = compute.record_action(req, server["id"], "attach_volume")
    compute.run(server["id"], rid, "compute_attach_volume",
                lambda s, ident=req.ident: compute.attach_volume(s, vol, ident),
                on_error=lambda sid, exc: LOG.error("server %s: %s", sid, exc))
    if req.since("2.101"):
        return 202, None
    view = {"id": vol["id"], "serverId": server["id"], "volumeId": vol["id"],
            "device": vol["device"]}
    if req.since("2.70"):
        view["tag"] = vol["tag"]
    if req.since("2.79"):
        view["delete_on_termination"] = vol["delete_on_termination"]
    return 200, {"volumeAttachment": view}


def server_volume_attachments_update(req):
    """PUT /servers/{server_id}/os-volume_attachments/{id}"""
    schema = volume_attachment_schema(req)
    inner = schema["properties"]["volumeAttachment"]["properties"]
    if req.since("2.85"):
        inner.update(serverId={"type": "string", "format": "uuid"},
                     id={"type": "string", "format": "uuid"}, tag=TAG_SCHEMA,
                     delete_on_termination=BOOL_LIKE)
    else:
        for key in ("device", "tag", "delete_on_termination"):
            inner.pop(key, None)
    spec = validate_body(req, schema)["volumeAttachment"]
    server = find_server(req, req.params["server_id"])
    old_id = req.params["id"]
    swap = not req.since("2.85") or spec["volumeId"] != old_id
    if swap:
        authorize(req, "os_compute_api:os-volumes-attachments:swap", "service")
    else:
        authorize(req, "os_compute_api:os-volumes-attachments:update", "member",
                  server["project_id"])
    if req.since("2.85"):
        update_attachment_fields(req, server, old_id, spec)
    if swap:
        swap_volume(req, server, old_id, spec["volumeId"])
    return 202, None


def update_attachment_fields(req, server, volume_id, spec):
    vol = attached_volume(server, volume_id)
    for key, current in (("id", volume_id), ("serverId", server["id"]),
                         ("device", vol.get("device")), ("tag", vol.get("tag"))):
        if key in spec and spec[key] != current:
            raise BadRequest(f"The {key} property is not mutable")
    if "delete_on_termination" in spec:
        wanted = bool_from_string(spec["delete_on_termination"], strict=True)

        def plan(data):
            current = data["servers"][server["id"]].get("volumes", [])
            return [["set", ["servers", server["id"], "volumes"],
                     [dict(v, delete_on_termination=wanted) if v["bdm_uuid"] == vol["bdm_uuid"]
                      else v for v in current]]]
        req.store.transaction(plan)


def swap_volume(req, server, old_id, new_id):
    """Cinder's volume migration asks for the guest to move to the new volume."""
    cinder, old = the_volume(req, old_id)
    if not old.get("migration_status"):
        raise Conflict(f"volume {old_id} is not migrating; this API should only be called "
                       f"by Cinder")
    _, new = the_volume(req, new_id, fault=BadRequest)
    vol = attached_volume(server, old_id)
    volume_state_check(req, server, "swap_volume", SWAP_STATES)
    if new.get("attach_status") == "attached" or new["status"] == "in-use":
        raise BadRequest("Invalid volume: New volume must be detached in order to swap.")
    if int(new["size"]) < int(old["size"]):
        raise BadRequest("Invalid volume: New volume must be the same size or larger.")
    try:
        cinder.action(req.ident, old_id, "os-begin_detaching")
    except VolumeError as e:
        raise BadRequest(f"Invalid volume: {e.message}") from None
    try:
        attachment = cinder.attachment_create(req.ident, new_id, server["id"])
    except VolumeError as e:
        cinder.action(req.ident, old_id, "os-roll_detaching")
        raise BadRequest(f"Invalid volume: {e.message}") from None
    compute = req.app.compute
    rid = compute.record_action(req, server["id"], "swap_volume")
    compute.run(server["id"], rid, "compute_swap_volume",
                lambda s: compute.swap_volume(s, vol, new_id, attachment["id"]),
                on_error=lambda sid, exc: LOG.error("server %s: %s", sid, exc))


def server_volume_attachments_delete(req):
    """DELETE /servers/{server_id}/os-volume_attachments/{id}"""
    server = find_server(req, req.params["server_id"])
    authorize(req, "os_compute_api:os-volumes-attachments:delete", "member",
              server["project_id"])
    volume_id = req.params["id"]
    if server["vm_state"] in ("shelved", "shelved_offloaded") and not req.since("2.20"):
        raise Conflict(f"Cannot 'detach_volume' instance {server['id']} while it is in "
                       f"vm_state {server['vm_state']}")
    cinder, volume = the_volume(req, volume_id)
    vol = attached_volume(server, volume_id)
    if vol.get("boot_index") == 0:
        raise BadRequest("Cannot detach a root device volume")
    volume_state_check(req, server, "detach_volume")
    if vol.get("connection_info") is None and server["vm_state"] != "shelved_offloaded" \
            and volume["status"] != "in-use":
        raise BadRequest(f"Invalid volume: Unable to detach volume {volume_id}: it is still "
                         f"being attached")
    try:
        cinder.action(req.ident, volume_id, "os-begin_detaching")
    except VolumeError as e:
        raise BadRequest(f"Invalid volume: {e.message}") from None
    compute = req.app.compute
    rid = compute.record_action(req, server["id"], "detach_volume")
    compute.run(server["id"], rid, "compute_detach_volume",
                lambda s: compute.detach_volume(s, vol),
                on_error=lambda sid, exc: LOG.error("server %s: %s", sid, exc))
    return 202, None


# remote consoles: serial consoles and noVNC through minivan's own proxies (each off until
# its listen option is set); SPICE is off, as in a Nova whose [spice] console is disabled



class ConsoleTokens:
    """Console tokens: each opens one console session within ttl seconds
    (--console-token-ttl)."""

    def __init__(self, ttl, monotonic=time.monotonic):
        self.ttl = ttl
        self.monotonic = monotonic          # replaceable in tests
        self.tokens = {}
        self.lock = threading.Lock()

    def issue(self, server, console_type):
        token = str(uuid.uuid4())
        with self.lock:
            now = self.monotonic()
            self.tokens = {k: v for k, v in self.tokens.items() if v["expires"] > now}
            self.tokens[token] = {"server_id": server["id"], "type": console_type,
                                  "host": server.get("host"), "expires": now + self.ttl}
        return token

    def peek(self, token):
        with self.lock:
            record = self.tokens.get(token)
            return record if record and record["expires"] > self.monotonic() else None

    def take(self, token):
        with self.lock:
            record = self.tokens.pop(token, None)
            return record if record and record["expires"] > self.monotonic() else None


def console_url(req, server, protocol, console_type):
    """A one-time URL of the server's console on minivan's proxy."""
    conf = req.app.conf
    serial = protocol == "serial" and console_type == "serial" and conf["serial_console_listen"]
    vnc = protocol == "vnc" and console_type == "novnc" and conf["vnc_listen"]
    if not (serial or vnc):
        raise BadRequest(f"Unavailable console type {console_type}.")
    if not server.get("host"):
        raise Conflict(f"Instance {server['id']} is not ready")
    token = req.app.console_tokens.issue(server, console_type)
    if vnc:
        base = conf["vnc_url"] or "http://%s/vnc_lite.html" % conf["vnc_listen"]
        return f"{base}?path=%3Ftoken%3D{token}"
    base = conf["serial_console_url"] or "ws://%s/" % conf["serial_console_listen"]
    return f"{base}?token={token}"


def console_action(req, key, types):
    spec = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": [key], "properties": {key: {
                                   "type": "object", "additionalProperties": False,
                                   "required": ["type"], "properties": {"type": {
                                       "type": "string", "enum": types}}}}})[key]
    server = find_server(req, req.params["server_id"])
    authorize(req, "os_compute_api:os-remote-consoles", "member", server["project_id"])
    protocol = {"novnc": "vnc", "xvpvnc": "vnc", "spice-html5": "spice"}.get(spec["type"],
                                                                            "serial")
    return 200, {"console": {"type": spec["type"],
                             "url": console_url(req, server, protocol, spec["type"])}}


def server_action_get_vnc_console(req):
    """POST /servers/{server_id}/action os-getVNCConsole"""
    return console_action(req, "os-getVNCConsole", ["novnc", "xvpvnc"])


def server_action_get_spice_console(req):
    """POST /servers/{server_id}/action os-getSPICEConsole"""
    return console_action(req, "os-getSPICEConsole", ["spice-html5"])


def server_action_get_serial_console(req):
    """POST /servers/{server_id}/action os-getSerialConsole"""
    return console_action(req, "os-getSerialConsole", ["serial"])


def server_remote_consoles_create(req):
    """POST /servers/{server_id}/remote-consoles"""
    protocols = ["vnc", "spice", "serial", "rdp"] + (["mks"] if req.since("2.8") else [])
    types = ["novnc", "xvpvnc", "spice-html5", "serial", "rdp-html5"] + \
        (["webmks"] if req.since("2.8") else []) + (["spice-direct"] if req.since("2.99")
                                                    else [])
    spec = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["remote_console"], "properties": {
                                   "remote_console": {
                                       "type": "object", "additionalProperties": False,
                                       "required": ["protocol", "type"], "properties": {
                                           "protocol": {"type": "string", "enum": protocols},
                                           "type": {"type": "string", "enum": types}}}}})
    spec = spec["remote_console"]
    server = find_server(req, req.params["server_id"])
    authorize(req, "os_compute_api:os-remote-consoles", "member", server["project_id"])
    if spec["protocol"] == "rdp":
        raise BadRequest("Unavailable console type rdp.")
    url = console_url(req, server, spec["protocol"], spec["type"])
    return 200, {"remote_console": {"protocol": spec["protocol"], "type": spec["type"],
                                    "url": url}}


def console_auth_tokens_show(req):
    """GET /os-console-auth-tokens/{id}"""
    validate_query(req, (), strict_since="2.99")
    if not req.since("2.31"):
        raise BadRequest("The requested console type details are not accessible")
    record = req.app.console_tokens.peek(req.params["id"])
    if record is None:
        raise NotFound("Token not found")
    return 200, {"console": {"instance_uuid": record["server_id"], "host": record["host"],
                             "port": 0, "internal_access_path": None}}


# instance actions

def action_view(req, action, with_events):
    view = {"action": action["action"], "instance_uuid": action["instance_uuid"],
            "message": action.get("message"), "project_id": action["project_id"],
            "request_id": action["request_id"], "start_time": action["start_time"],
            "user_id": action["user_id"]}
    if req.since("2.58"):
        view["updated_at"] = action.get("updated_at")
    if not with_events:
        return view
    admin = req.ident.is_admin
    if not admin and not req.since("2.51"):
        return view
    events = []
    for event in action.get("events", []):
        item = {"event": event["event"], "start_time": event["start_time"],
                "finish_time": event["finish_time"], "result": event["result"]}
        if admin:
            item["traceback"] = event.get("traceback")
        if req.since("2.62"):
            item["hostId"] = hashlib.sha224((action["project_id"] + event["host"]).encode()
                                            ).hexdigest()
            if admin:
                item["host"] = event["host"]
        if req.since("2.84") and (admin or event.get("result") == "Error"):
            item["details"] = event.get("details")
        events.append(item)
    view["events"] = events
    return view


def instance_actions_for(req):
    server_id = req.params["server_id"]
    find_server(req, server_id, include_deleted=req.since("2.21"))
    return unpack(req.store.data["instance_actions"].get(server_id, []))


def instance_actions_index(req):
    """GET /servers/{server_id}/os-instance-actions"""
    allowed = ["limit", "marker", "changes-since"] if req.since("2.58") else []
    if req.since("2.66"):
        allowed.append("changes-before")
    query = validate_query(req, allowed, strict_since="2.58")
    actions = [a for _, a in sorted(enumerate(instance_actions_for(req)),
                                    key=lambda pair: (pair[1]["start_time"], pair[0]),
                                    reverse=True)]
    if "changes-since" in query:
        since = parse_changes_time("changes-since", query["changes-since"][-1])
        actions = [a for a in actions if parse_isotime(a["updated_at"]) >= since]
    if "changes-before" in query:
        before = parse_changes_time("changes-before", query["changes-before"][-1])
        actions = [a for a in actions if parse_isotime(a["updated_at"]) <= before]
    body = {}
    if req.since("2.58"):
        actions, marker = paginate(req, actions, lambda a: a["request_id"],
                                   "Marker %s could not be found.")
        if marker is not None:
            body["links"] = req.next_link(
                f"servers/{req.params['server_id']}/os-instance-actions", marker)
    body = dict({"instanceActions": [action_view(req, a, False) for a in actions]}, **body)
    return 200, body


def instance_actions_show(req):
    """GET /servers/{server_id}/os-instance-actions/{id}"""
    validate_query(req, (), strict_since="2.102")
    for action in instance_actions_for(req):
        if action["request_id"] == req.params["id"]:
            return 200, {"instanceAction": action_view(req, action, True)}
    raise NotFound(f"Action for request_id {req.params['id']} on instance "
                   f"{req.params['server_id']} not found")


# diagnostics, password, topology, security groups

def server_diagnostics_index(req):
    """GET /servers/{server_id}/diagnostics"""
    validate_query(req, (), strict_since="2.102")
    server = find_server(req, req.params["server_id"])
    if server["vm_state"] in ("building",) or server.get("power_state") == NOSTATE:
        raise Conflict(f"Cannot 'get_diagnostics' instance {server['id']} while it is in "
                       f"vm_state {server['vm_state']}")
    if not server.get("host"):
        raise Conflict(f"Instance {server['id']} is not ready")
    try:
        stats = req.app.compute.driver_of(server).get_diagnostics(server)
    except DriverError as e:
        raise Conflict(f"Cannot 'get_diagnostics' instance {server['id']}: {e}") from None
    if not req.since("2.48"):
        old = {"cpu%d_time" % c["id"]: c["time"] for c in stats["cpu_details"]}
        old["memory"] = stats["memory_kb"]
        for i, disk in enumerate(stats["disks"]):
            name = "vd" + chr(ord("a") + i)
            old.update({f"{name}_read": disk["read_bytes"], f"{name}_write": disk["write_bytes"],
                        f"{name}_read_req": disk["read_requests"],
                        f"{name}_write_req": disk["write_requests"],
                        f"{name}_errors": disk["errors_count"]})
        return 200, old
    state = {RUNNING: "running", PAUSED: "paused", SHUTDOWN: "shutdown", CRASHED: "crashed",
             SUSPENDED: "suspended"}.get(LIBVIRT_POWER_STATE.get(stats["state"], 0), "pending")
    launched = parse_isotime(server["launched_at"]) if server.get("launched_at") else None
    uptime = int((req.app.clock.now() - launched).total_seconds()) if launched else 0
    driver = req.app.compute.driver_of(server)
    return 200, {"state": state, "driver": "libvirt", "hypervisor": driver.virt_type
                 if not driver.simulated else "test", "hypervisor_os": "linux",
                 "uptime": uptime, "config_drive": bool(server.get("config_drive")),
                 "num_cpus": len(stats["cpu_details"]) or server["flavor"]["vcpus"],
                 "num_nics": len(server.get("ports", [])), "num_disks": len(stats["disks"]),
                 "memory_details": {"maximum": stats["max_memory_kb"] // 1024,
                                    "used": stats["memory_kb"] // 1024},
                 "cpu_details": [{"id": c["id"], "time": c["time"], "utilisation": None}
                                 for c in stats["cpu_details"]],
                 "nic_details": [{"mac_address": p["mac"], "rx_octets": None, "rx_errors": None,
                                  "rx_drop": None, "rx_packets": None, "rx_rate": None,
                                  "tx_octets": None, "tx_errors": None, "tx_drop": None,
                                  "tx_packets": None, "tx_rate": None}
                                 for p in server.get("ports", [])],
                 "disk_details": [{"read_bytes": d["read_bytes"],
                                   "read_requests": d["read_requests"],
                                   "write_bytes": d["write_bytes"],
                                   "write_requests": d["write_requests"],
                                   "errors_count": d["errors_count"]} for d in stats["disks"]]}


def server_password_index(req):
    """GET /servers/{server_id}/os-server-password"""
    validate_query(req, (), strict_since="2.102")
    server = find_server(req, req.params["server_id"])
    return 200, {"password": server.get("password") or ""}


def server_password_clear(req):
    """DELETE /servers/{server_id}/os-server-password"""
    server_id = req.params["server_id"]

    def plan(data):
        server = find_server(req, server_id)
        return [["set", ["servers", server_id], dict(server, password="")]]

    req.store.transaction(plan)
    return 204, None


def server_topology_index(req):
    """GET /servers/{server_id}/topology"""
    validate_query(req, (), strict_since="2.102")
    server = find_server(req, req.params["server_id"])
    topology = server.get("numa_topology")
    if not topology:
        return 200, {"nodes": [], "pagesize_kb": None}
    host_info = policy_allows(req.ident, "admin", server["project_id"])
    nodes, pagesize = [], None
    for cell in topology["cells"]:
        # (siblings: Nova 34 keeps no guest thread topology per cell, so always none)
        node = {"vcpu_set": sorted(set(cell["cpus"]) | set(cell["pcpus"])), "siblings": [],
                "memory_mb": cell["memory"]}
        if host_info:
            node["host_node"] = cell["id"]
            node["cpu_pinning"] = {str(v): p for v, p in sorted(
                cell["pinning"].items(), key=lambda item: int(item[0]))}
        pagesize = cell.get("pagesize") or pagesize
        nodes.append(node)
    return 200, {"nodes": nodes, "pagesize_kb": pagesize}


def server_security_groups_index(req):
    """GET /servers/{server_id}/os-security-groups"""
    validate_query(req, (), strict_since="2.102")
    server = find_server(req, req.params["server_id"])
    data = req.store.data
    neutron = req.app.network
    if neutron is not None and any(p.get("neutron") for p in server.get("ports", [])):
        groups = {g["id"]: g for g in neutron.security_groups(server["project_id"])}
        ids = set()
        for port in server.get("ports", []):
            if port.get("neutron"):
                ids.update((neutron.port(port["id"]) or {}).get("security_groups") or [])
        return 200, {"security_groups": [neutron_group_view(groups[i], groups)
                                         for i in sorted(ids) if i in groups]}
    by_name = {g["name"]: g for g in security_groups_of(data, server["project_id"]).values()}
    return 200, {"security_groups": [security_group_view(by_name[name], data)
                                     for name in server.get("security_groups", [])
                                     if name in by_name]}


# § 28 API: images ---------------------------------------------------------------------

def image_view(req, image, detail=True):
    view = {"id": image["id"], "name": image["name"], "links": req.links("images", image["id"])
            + [{"rel": "alternate", "type": "application/vnd.openstack.image",
                "href": req.base_url + "/image/v2/images/" + image["id"]}]}
    if not detail:
        return view
    created = isotime(parse_isotime(image["created_at"]))
    status = {"active": "ACTIVE", "queued": "SAVING", "saving": "SAVING"}.get(
        image["status"], "UNKNOWN")
    view.update({"OS-EXT-IMG-SIZE:size": image["size"], "created": created,
                 "updated": isotime(parse_isotime(image["updated_at"])),
                 "metadata": dict(image["properties"]), "minDisk": image["min_disk"],
                 "minRam": image["min_ram"], "progress": 100 if status == "ACTIVE" else 25,
                 "status": status})
    server = image["properties"].get("instance_uuid")
    if server:
        view["server"] = {"id": server, "links": req.links("servers", server)}
    return view


def find_image(req, image_id):
    image = req.app.images.get(image_id)
    if image is None or not req.app.images.visible(image, req.ident):
        raise NotFound("Image not found.")
    return image


def image_list(req, detail):
    query = validate_query(req, ["name", "status", "changes-since", "server", "type",
                                 "minRam", "minDisk", "limit", "marker"])
    images = [i for i in req.app.images.list() if req.app.images.visible(i, req.ident)]
    if "name" in query:
        images = [i for i in images if i["name"] == query["name"][-1]]
    if "status" in query:
        wanted = query["status"][-1].upper()
        images = [i for i in images if image_view(req, i)["status"] == wanted]
    for param, field in (("minRam", "min_ram"), ("minDisk", "min_disk")):
        if param in query:
            try:
                bound = int(query[param][-1])
            except ValueError:
                raise BadRequest(f"Invalid {param} filter [{query[param][-1]}]") from None
            images = [i for i in images if i[field] >= bound]
    if "server" in query:
        ref = ref_id(query["server"][-1])
        images = [i for i in images if i["properties"].get("instance_uuid") == ref]
    if "type" in query:
        images = [i for i in images if i["properties"].get("image_type") == query["type"][-1]]
    page, marker = paginate(req, images, lambda i: i["id"])
    body = {"images": [image_view(req, i, detail) for i in page]}
    if marker is not None:
        body["images_links"] = req.next_link("images/detail" if detail else "images", marker)
    return 200, body


def images_index(req):
    """GET /images"""
    return image_list(req, detail=False)


def images_detail(req):
    """GET /images/detail"""
    return image_list(req, detail=True)


def images_show(req):
    """GET /images/{id}"""
    return 200, {"image": image_view(req, find_image(req, req.params["id"]))}


def images_delete(req):
    """DELETE /images/{id}"""
    image = find_image(req, req.params["id"])
    if not image_change_allowed(image, req.ident):
        raise Forbidden("You are not allowed to delete the image.")
    in_use = [s["id"] for s in req.store.data["servers"].values()
              if s.get("shelved_image_id") == image["id"] and s["vm_state"] != "deleted"]
    if in_use:
        raise Conflict(f"Image {image['id']} is the shelved image of server {in_use[0]}.")
    req.app.images.delete(image)
    return 204, None


def image_meta_change(req, change):
    image = find_image(req, req.params["image_id"])
    if not image_change_allowed(image, req.ident):
        raise Forbidden(f"Not authorized for image {image['id']}.")
    new = change(dict(image["properties"]))
    limit = project_limits(req.store.data, req.ident.project_id)["metadata_items"]
    if 0 <= limit < len(new):
        raise Forbidden(f"Quota exceeded for metadata_items: Requested {len(new)}, but "
                        f"already used 0 of {limit} metadata_items")
    req.app.images.set_properties(image, new)
    return new


def image_metadata_index(req):
    """GET /images/{image_id}/metadata"""
    return 200, {"metadata": dict(find_image(req, req.params["image_id"])["properties"])}


def image_metadata_create(req):
    """POST /images/{image_id}/metadata"""
    items = metadata_body(req)
    return 200, {"metadata": image_meta_change(req, lambda old: dict(old, **items))}


def image_metadata_update_all(req):
    """PUT /images/{image_id}/metadata"""
    items = metadata_body(req)
    return 200, {"metadata": image_meta_change(req, lambda old: dict(items))}


def image_metadata_show(req):
    """GET /images/{image_id}/metadata/{id}"""
    properties = find_image(req, req.params["image_id"])["properties"]
    if req.params["id"] not in properties:
        raise NotFound("Image not found.")
    return 200, {"meta": {req.params["id"]: properties[req.params["id"]]}}


def image_metadata_update(req):
    """PUT /images/{image_id}/metadata/{id}"""
    item = single_meta_item(req)
    image_meta_change(req, lambda old: dict(old, **item))
    return 200, {"meta": item}


def image_metadata_delete(req):
    """DELETE /images/{image_id}/metadata/{id}"""
    image_meta_change(req, without_key(req.params["id"], "Image not found."))
    return 204, None



# § 29 API: networks and security groups -----------------------------------------------
#
# Without Neutron, networks are the host's libvirt networks and security groups are
# minivan's own records (every project has its 'default'); with Neutron, the security
# groups are Neutron's.

def network_records(req):
    """The networks, as [{id, label, bridge, cidr, netmask, gateway, ...}]: Neutron's that
    the caller may use, else the libvirt networks."""
    neutron = req.app.network
    if neutron is not None:
        return [{"id": n["id"], "label": n["name"], "cidr": None, "mtu": n.get("mtu"),
                 "project_id": n.get("project_id"), "external": n.get("router:external")}
                for n in neutron.visible_networks(req.ident.project_id, req.ident.is_admin)]
    if req.app.driver is None:
        return []
    return req.app.driver.list_networks()


def network_view(net, full):
    if not full:
        return {"id": net["id"], "label": net["label"], "cidr": net["cidr"]}
    keys = ("bridge", "bridge_interface", "broadcast", "cidr", "cidr_v6", "created_at",
            "deleted", "deleted_at", "dhcp_server", "dhcp_start", "dns1", "dns2",
            "enable_dhcp", "gateway", "gateway_v6", "host", "id", "injected", "label",
            "multi_host", "netmask", "netmask_v6", "priority", "project_id", "rxtx_base",
            "share_address", "updated_at", "vlan", "vpn_private_address",
            "vpn_public_address", "vpn_public_port", "mtu")
    view = {k: None for k in keys}
    view.update({k: v for k, v in net.items() if k in keys})
    view["deleted"] = "False"
    view["injected"] = "False"
    view["multi_host"] = "False"
    view["enable_dhcp"] = "True" if net.get("dhcp_start") else "False"
    view["share_address"] = "False"
    return view


def find_network(req, network_id):
    for net in network_records(req):
        if net["id"] == network_id:
            return net
    raise NotFound(f"Network {network_id} could not be found.")


def networks_index(req):
    """GET /os-networks"""
    return 200, {"networks": [network_view(n, True) for n in network_records(req)]}


def networks_show(req):
    """GET /os-networks/{id}"""
    return 200, {"network": network_view(find_network(req, req.params["id"]), True)}


def tenant_networks_index(req):
    """GET /os-tenant-networks"""
    return 200, {"networks": [network_view(n, False) for n in network_records(req)]}


def tenant_networks_show(req):
    """GET /os-tenant-networks/{id}"""
    return 200, {"network": network_view(find_network(req, req.params["id"]), False)}


def floating_ip_pools_index(req):
    """GET /os-floating-ip-pools"""
    validate_query(req, (), strict_since="2.102")
    neutron = req.app.network
    if neutron is not None:
        external = neutron.call("GET", "/networks?router%3Aexternal=true")["networks"]
        return 200, {"floating_ip_pools": [{"name": n["name"]} for n in external]}
    pools = [n for n in network_records(req) if n.get("forward")]
    return 200, {"floating_ip_pools": [{"name": n["label"]} for n in pools]}


# Floating IPs (up to 2.35; addFloatingIp/removeFloatingIp up to 2.43) are Neutron's,
# shown in nova-network's shape.  Without Neutron there are none, as in a cloud with no
# external network.

def floating_ip_view(neutron, fip, names):
    """Nova's view of a Neutron floating IP (names: network id -> name, filled as met)."""
    instance_id = None
    if fip.get("port_id"):
        port = fip.get("port_details") or neutron.port(fip["port_id"]) or {}
        instance_id = port.get("device_id") or None
    network_id = fip["floating_network_id"]
    if network_id not in names:
        names[network_id] = (neutron.network(network_id) or {}).get("name")
    return {"fixed_ip": fip.get("fixed_ip_address"), "id": fip["id"],
            "instance_id": instance_id, "ip": fip["floating_ip_address"],
            "pool": names[network_id] or network_id}


def floating_ip_visible(req, fip):
    return fip is not None and (req.ident.is_admin or
                                fip.get("project_id") == req.ident.project_id)


def find_floating_ip(req, neutron, fip_id):
    fip = neutron._get("floatingip", fip_id) if neutron is not None else None
    if not floating_ip_visible(req, fip):
        raise NotFound(f"Floating IP not found for ID {fip_id}")
    return fip


def floating_ips_by_address(req, neutron, address):
    if neutron is None:
        return []
    try:
        found = neutron.floating_ips(floating_ip_address=address)
    except NetworkError as e:
        raise neutron_fault(e) from None
    return [f for f in found if floating_ip_visible(req, f)]


def refresh_port_holders(req, port_ids):
    """Show the servers holding these Neutron ports with their floating IPs as now."""
    wanted = {p for p in port_ids if p}
    for server in list(req.store.data["servers"].values()):
        if any(p["id"] in wanted for p in server.get("ports", []) if p.get("neutron")):
            req.app.compute.refresh_ports(server)


def floating_ips_index(req):
    """GET /os-floating-ips"""
    neutron = req.app.network
    if neutron is None:
        return 200, {"floating_ips": []}
    try:
        fips = neutron.floating_ips(project_id=req.ident.project_id)
        names = {}
        return 200, {"floating_ips": [floating_ip_view(neutron, f, names) for f in fips]}
    except NetworkError as e:
        raise neutron_fault(e) from None


def floating_ips_show(req):
    """GET /os-floating-ips/{id}"""
    neutron = req.app.network
    fip = find_floating_ip(req, neutron, req.params["id"])
    return 200, {"floating_ip": floating_ip_view(neutron, fip, {})}


def floating_ips_create(req):
    """POST /os-floating-ips: a floating IP from the pool named (an external network)."""
    body = validate_body(req, {"type": ["object", "null"], "properties": {
        "pool": {"type": ["string", "null"]}}})
    pool = (body or {}).get("pool") or req.app.conf["default_floating_pool"]
    neutron = req.app.network
    if neutron is None:
        raise NotFound("Floating IP pool not found.")
    try:
        external = neutron.call("GET", "/networks?router%3Aexternal=true")["networks"]
        match = [n for n in external if n["name"] == pool]
        if len(match) > 1:
            raise Conflict(f"Multiple floating IP pools matches found for name '{pool}'")
        match = match or [n for n in external if n["id"] == pool]
        if not match:
            raise NotFound("Floating IP pool not found.")
        fip = neutron.call("POST", "/floatingips", {"floatingip": {
            "floating_network_id": match[0]["id"],
            "project_id": req.ident.project_id}})["floatingip"]
    except NetworkError as e:
        if e.status == 409 and "quota" in e.message.lower():
            raise Forbidden(f"IP allocation over quota in pool {pool}.") from None
        if e.status == 409:
            raise NotFound(f"No more floating IPs in pool {pool}.") from None
        raise neutron_fault(e) from None
    return 200, {"floating_ip": floating_ip_view(neutron, fip, {match[0]["id"]: pool})}


def floating_ips_delete(req):
    """DELETE /os-floating-ips/{id}: released, and gone from its server's addresses."""
    neutron = req.app.network
    fip = find_floating_ip(req, neutron, req.params["id"])
    try:
        neutron.call("DELETE", f"/floatingips/{fip['id']}")
    except NetworkError as e:
        raise neutron_fault(e) from None
    refresh_port_holders(req, [fip.get("port_id")])
    return 202, None


def floating_address_body(req, action, fields):
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": [action], "properties": {action: {
                                   "type": "object", "additionalProperties": False,
                                   "required": ["address"], "properties": {
                                       field: {"type": "string"} for field in fields}}}})
    for field in fields:
        if field in body[action]:
            check_ip(f"{action}/{field}", body[action][field], None)
    return body[action]


def server_action_add_floating_ip(req):
    """POST /servers/{server_id}/action addFloatingIp: the floating IP is associated with
    the server's fixed address (the one given, else its first IPv4 one)."""
    spec = floating_address_body(req, "addFloatingIp", ("address", "fixed_address"))
    address, server_id = spec["address"], req.params["server_id"]
    server = find_server(req, server_id)
    ports = server.get("ports", [])
    if not ports:
        raise BadRequest("Instance network is not ready yet")
    fixed = [(addr, port) for port in ports for addr, _ in port.get("ips", [])]
    if not fixed:
        raise BadRequest("No fixed IPs associated to instance")
    if "fixed_address" in spec:
        chosen = [(a, p) for a, p in fixed if a == spec["fixed_address"]]
        if not chosen:
            raise BadRequest("Specified fixed address not assigned to instance")
    else:
        chosen = [(a, p) for a, p in fixed if ipaddress.ip_address(a).version == 4]
        if not chosen:
            raise BadRequest(f"Unable to associate floating IP {address} to any fixed IPs "
                             f"for instance {server_id}. Instance has no fixed IPv4 "
                             "addresses to associate.")
    fixed_address, port = chosen[0]
    neutron = req.app.network
    fips = floating_ips_by_address(req, neutron, address)
    if not fips:
        raise NotFound("floating IP not found")
    try:
        if len(fips) > 1 or not port.get("neutron"):
            raise NetworkError(400, "the address is not one floating IP of a Neutron port")
        neutron.call("PUT", f"/floatingips/{fips[0]['id']}", {"floatingip": {
            "port_id": port["id"], "fixed_ip_address": fixed_address}})
    except NetworkError as e:
        if e.status >= 500:
            raise neutron_fault(e) from None
        if e.status == 409:
            raise BadRequest(e.message) from None
        raise BadRequest(f"Unable to associate floating IP {address} to fixed IP "
                         f"{fixed_address} for instance {server_id}. Error: "
                         f"{e.message}") from None
    refresh_port_holders(req, [port["id"], fips[0].get("port_id")])
    return 202, None


def server_action_remove_floating_ip(req):
    """POST /servers/{server_id}/action removeFloatingIp"""
    address = floating_address_body(req, "removeFloatingIp", ("address",))["address"]
    server = find_server(req, req.params["server_id"])
    neutron = req.app.network
    fips = floating_ips_by_address(req, neutron, address)
    if not fips:
        raise NotFound(f"Floating IP not found for address {address}.")
    if len(fips) > 1:
        raise Conflict(f"Multiple floating IPs are found for address {address}.")
    fip = fips[0]
    held = {p["id"] for p in server.get("ports", []) if p.get("neutron")}
    if fip.get("port_id") not in held:
        raise Conflict(f"Floating IP {address} is not associated with instance "
                       f"{server['id']}.")
    try:
        neutron.call("PUT", f"/floatingips/{fip['id']}", {"floatingip": {"port_id": None}})
    except NetworkError as e:
        raise neutron_fault(e) from None
    refresh_port_holders(req, [fip["port_id"]])
    return 202, None


# With Neutron, security groups are Neutron's, shown in nova-network's shape (ingress
# rules only), and a server's groups are those of its ports.

def neutron_group_view(group, groups_by_id):
    rules = []
    for rule in group.get("security_group_rules") or []:
        if rule.get("direction") != "ingress":
            continue
        source = groups_by_id.get(rule.get("remote_group_id") or "")
        low, high = rule.get("port_range_min"), rule.get("port_range_max")
        rules.append({"id": rule["id"], "parent_group_id": group["id"],
                      "ip_protocol": rule.get("protocol"),
                      "from_port": -1 if low is None else low,
                      "to_port": -1 if high is None else high,
                      "ip_range": {"cidr": rule["remote_ip_prefix"]}
                      if rule.get("remote_ip_prefix") else {},
                      "group": {"name": source["name"], "tenant_id": source["project_id"]}
                      if source else {}})
    return {"id": group["id"], "name": group["name"],
            "description": group.get("description") or "", "tenant_id": group["project_id"],
            "rules": rules}


def neutron_groups(req, neutron, all_projects=False):
    groups = neutron.security_groups(None if all_projects else req.ident.project_id)
    return groups, {g["id"]: g for g in groups}


def checked_group_id(value):
    """Nova answers 400 to a security group (or rule) id that is not a uuid."""
    if not is_uuid_like(value):
        raise BadRequest("Security group id should be uuid")
    return value


def neutron_group(req, neutron, group_id):
    group = neutron.security_group(checked_group_id(group_id))
    if group is None or group["project_id"] != req.ident.project_id and \
            not req.ident.is_admin:
        raise NotFound(f"Security group {group_id} not found.")
    return group


def neutron_fault(e):
    """A Neutron refusal as Nova's fault: its 4xx status and message."""
    if e.status == 404:
        return NotFound(e.message)
    if e.status == 409:
        return Conflict(e.message)
    if e.status == 403:
        return Forbidden(e.message)
    if 400 <= e.status < 500:
        return BadRequest(e.message)
    return Unavailable(f"The network service answered {e.status}.")


def security_groups_of(data, project_id):
    """The project's groups, with its 'default' group even before it was ever stored."""
    groups = {g["id"]: g for g in data.get("security_groups", {}).values()
              if g["tenant_id"] == project_id}
    if not any(g["name"] == "default" for g in groups.values()):
        default = default_security_group(project_id)
        groups[default["id"]] = default
    return groups


def default_security_group(project_id):
    return {"id": str(uuid.uuid5(IMAGE_NAMESPACE, "security-group:" + project_id)),
            "name": "default", "description": "Default security group",
            "tenant_id": project_id, "rules": []}


def security_group_view(group, data):
    rules = []
    for rule in group["rules"]:
        source = data.get("security_groups", {}).get(rule.get("group_id") or "")
        rules.append({"from_port": rule["from_port"], "to_port": rule["to_port"],
                      "ip_protocol": rule["ip_protocol"], "id": rule["id"],
                      "parent_group_id": group["id"],
                      "ip_range": {"cidr": rule["cidr"]} if rule.get("cidr") else {},
                      "group": {"name": source["name"], "tenant_id": source["tenant_id"]}
                      if source else {}})
    return {"id": group["id"], "name": group["name"], "description": group["description"],
            "tenant_id": group["tenant_id"], "rules": rules}


def find_security_group(req, data, group_id):
    checked_group_id(group_id)
    groups = security_groups_of(data, req.ident.project_id)
    if group_id not in groups:
        if req.ident.is_admin and group_id in data.get("security_groups", {}):
            return data["security_groups"][group_id]
        raise NotFound(f"Security group {group_id} not found.")
    return groups[group_id]


def security_groups_index(req):
    """GET /os-security-groups"""
    query = validate_query(req, ["limit", "offset", "all_tenants"])
    data = req.store.data
    neutron = req.app.network
    if neutron is not None:
        groups, by_id = neutron_groups(req, neutron, "all_tenants" in query and
                                       req.ident.is_admin)
        return 200, {"security_groups": [neutron_group_view(g, by_id) for g in groups]}
    if "all_tenants" in query and req.ident.is_admin:
        groups = list(data.get("security_groups", {}).values())
    else:
        groups = list(security_groups_of(data, req.ident.project_id).values())
    groups.sort(key=lambda g: (g["name"] != "default", g["name"], g["id"]))
    offset = int(query.get("offset", ["0"])[-1] or 0) if str(
        query.get("offset", ["0"])[-1]).isdigit() else 0
    limit = query.get("limit", [None])[-1]
    groups = groups[offset:offset + int(limit)] if limit and str(limit).isdigit() else \
        groups[offset:]
    return 200, {"security_groups": [security_group_view(g, data) for g in groups]}


def security_group_body(req):
    spec = validate_body(req, {"type": "object", "required": ["security_group"], "properties": {
        "security_group": {"type": "object", "required": ["name", "description"],
                           "properties": {"name": {"type": "string", "maxLength": 255},
                                          "description": {"type": "string",
                                                          "maxLength": 255}}}}})
    spec = spec["security_group"]
    if not spec["name"].strip():
        raise BadRequest("Security group name is a required field.")
    return spec


def security_groups_create(req):
    """POST /os-security-groups"""
    spec = security_group_body(req)
    neutron = req.app.network
    if neutron is not None:
        try:
            group = neutron.call("POST", "/security-groups", {"security_group": {
                "name": spec["name"], "description": spec["description"],
                "project_id": req.ident.project_id}})["security_group"]
        except NetworkError as e:
            raise neutron_fault(e) from None
        return 200, {"security_group": neutron_group_view(group, {})}

    def plan(data):
        groups = security_groups_of(data, req.ident.project_id)
        if any(g["name"] == spec["name"] for g in groups.values()):
            raise BadRequest(f"Security group {spec['name']} already exists")
        limit = project_limits(data, req.ident.project_id)["security_groups"]
        if 0 <= limit <= len(groups):
            raise Forbidden("Quota exceeded, too many security groups.")
        group = {"id": str(uuid.uuid4()), "name": spec["name"],
                 "description": spec["description"], "tenant_id": req.ident.project_id,
                 "rules": []}
        created.append(group)
        return [["set", ["security_groups", group["id"]], group]]

    created = []
    req.store.transaction(plan)
    return 200, {"security_group": security_group_view(created[0], req.store.data)}


def security_groups_show(req):
    """GET /os-security-groups/{id}"""
    neutron = req.app.network
    if neutron is not None:
        group = neutron_group(req, neutron, req.params["id"])
        return 200, {"security_group": neutron_group_view(
            group, neutron_groups(req, neutron, req.ident.is_admin)[1])}
    group = find_security_group(req, req.store.data, req.params["id"])
    return 200, {"security_group": security_group_view(group, req.store.data)}


def security_groups_update(req):
    """PUT /os-security-groups/{id}"""
    spec = security_group_body(req)
    neutron = req.app.network
    if neutron is not None:
        group = neutron_group(req, neutron, req.params["id"])
        try:
            group = neutron.call("PUT", f"/security-groups/{group['id']}", {
                "security_group": {"name": spec["name"],
                                   "description": spec["description"]}})["security_group"]
        except NetworkError as e:
            raise neutron_fault(e) from None
        return 200, {"security_group": neutron_group_view(group, {})}

    def plan(data):
        group = find_security_group(req, data, req.params["id"])
        if group["name"] == "default" and spec["name"] != "default":
            raise BadRequest("Unable to update the default security group.")
        updated.append(dict(group, name=spec["name"], description=spec["description"]))
        return [["set", ["security_groups", group["id"]], updated[0]]]

    updated = []
    req.store.transaction(plan)
    return 200, {"security_group": security_group_view(updated[0], req.store.data)}


def security_groups_delete(req):
    """DELETE /os-security-groups/{id}"""
    neutron = req.app.network
    if neutron is not None:
        group = neutron_group(req, neutron, req.params["id"])
        if group["name"] == "default" and not req.ident.is_admin:
            # Neutron refuses this to the owner (409), which Nova answers with 400
            raise BadRequest("Insufficient rights for removing default security group.")
        try:
            neutron.call("DELETE", f"/security-groups/{group['id']}")
        except NetworkError as e:
            if e.status == 409:
                raise BadRequest(e.message) from None
            raise neutron_fault(e) from None
        return 202, None

    def plan(data):
        group = find_security_group(req, data, req.params["id"])
        if group["name"] == "default":
            raise BadRequest("Removing default security group not allowed.")
        in_use = [s for s in data["servers"].values() if s["project_id"] == group["tenant_id"]
                  and s["vm_state"] != "deleted" and group["name"] in s.get("security_groups",
                                                                             [])]
        if in_use:
            raise BadRequest(f"Security group is still in use by server {in_use[0]['id']}")
        return [["del", ["security_groups", group["id"]]]]

    req.store.transaction(plan)
    return 202, None


def parse_rule_port(value, name):
    if value is None or value == "":
        return None
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"Invalid port range {name}: {value}.") from None
    if not -1 <= port <= 65535:
        raise BadRequest(f"Invalid port range {name}: {value}.")
    return port


def nova_rule_key(rule):
    """(group, cidr, from, to, protocol) of a Neutron rule as Nova reads it to find a
    duplicate: no prefix is 0.0.0.0/0, a protocol without ports covers them all."""
    proto = rule.get("protocol")
    low, high = rule.get("port_range_min"), rule.get("port_range_max")
    if proto and low is None and high is None:
        low, high = (1, 65535) if proto.upper() in ("TCP", "UDP") else (-1, -1)
    return (rule.get("remote_group_id"), rule.get("remote_ip_prefix") or "0.0.0.0/0", low,
            high, proto)


def rule_cidr(value):
    """A rule's cidr as Nova takes it: kept as given (URL-unquoted), '0.0.0.0/0' when
    absent; an address without a prefix, or a non-zero network with prefix 0, is 400."""
    if not value:
        return "0.0.0.0/0"
    text = urllib.parse.unquote(str(value))
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        net = None
    if net is None or "/" not in text or not text.split("/", 1)[1]:
        raise BadRequest(f"Invalid cidr {text}.")
    if net.prefixlen == 0 and not ipaddress.ip_interface(text).ip.is_unspecified:
        raise BadRequest(f"Bad prefix for network in cidr {text}")
    return text


def security_group_rules_create(req):
    """POST /os-security-group-rules"""
    spec = validate_body(req, {"type": "object", "required": ["security_group_rule"],
                               "properties": {"security_group_rule": {
                                   "type": "object", "required": ["parent_group_id"],
                                   "properties": {"parent_group_id": {"type": "string",
                                                                      "format": "uuid"},
                                                  "group_id": {"type": ["string", "null"],
                                                               "format": "uuid"}}}}})
    spec = spec["security_group_rule"]
    protocol = spec.get("ip_protocol")
    protocol = str(protocol).lower() if protocol not in (None, "") else None
    if protocol not in (None, "tcp", "udp", "icmp"):
        raise BadRequest(f"Invalid IP protocol {spec.get('ip_protocol')}.")
    low, high = parse_rule_port(spec.get("from_port"), "from_port"), parse_rule_port(
        spec.get("to_port"), "to_port")
    if protocol in ("tcp", "udp") and (low is None or high is None or low > high or low < 1):
        raise BadRequest("Invalid port range: from_port must be <= to_port, both 1-65535.")
    if protocol == "icmp" and any(v is not None and v > 255 for v in (low, high)):
        raise BadRequest("Type and Code must be integers for ICMP protocol type, from -1 to "
                         "255.")
    cidr = rule_cidr(spec.get("cidr")) if not spec.get("group_id") else None
    neutron = req.app.network
    if neutron is not None:
        group = neutron_group(req, neutron, spec["parent_group_id"])
        source = neutron_group(req, neutron, spec["group_id"]) if spec.get("group_id") \
            else None
        body = {"security_group_id": group["id"], "direction": "ingress",
                "ethertype": "IPv6" if cidr and ":" in cidr else "IPv4",
                "protocol": protocol, "remote_ip_prefix": cidr,
                "remote_group_id": source["id"] if source else None,
                "project_id": req.ident.project_id}
        if protocol in ("tcp", "udp") or protocol == "icmp" and low not in (None, -1):
            body["port_range_min"] = low
            body["port_range_max"] = None if protocol == "icmp" and high == -1 else high
        # Nova's duplicate check, on its reading of the group's rules (a cidr rule only:
        # a group rule never matches there, and Neutron's 409 for it becomes 403)
        new = (None, cidr, low, high, protocol)
        if source is None and any(nova_rule_key(other) == new
                                  for other in group.get("security_group_rules") or []):
            raise BadRequest(f"This rule already exists in group {group['id']}")
        try:
            rule = neutron.call("POST", "/security-group-rules",
                                {"security_group_rule": body})["security_group_rule"]
        except NetworkError as e:
            if e.status == 409:             # Nova's reading: the group's rule quota
                raise Forbidden(e.message) from None
            raise neutron_fault(e) from None
        view = neutron_group_view(dict(group, security_group_rules=[rule]),
                                  {source["id"]: source} if source else {})
        return 200, {"security_group_rule": view["rules"][0]}

    def plan(data):
        group = find_security_group(req, data, spec["parent_group_id"])
        if spec.get("group_id"):
            find_security_group(req, data, spec["group_id"])
        rule = {"id": str(uuid.uuid4()), "ip_protocol": protocol, "from_port": low,
                "to_port": high, "cidr": cidr, "group_id": spec.get("group_id")}
        for other in group["rules"]:
            if {k: other[k] for k in rule if k != "id"} == {k: rule[k] for k in rule
                                                            if k != "id"}:
                raise BadRequest("This rule already exists in group "
                                 f"{spec['parent_group_id']}")
        created.append((rule, group))
        return [["set", ["security_groups", group["id"]], dict(group,
                                                               rules=group["rules"] + [rule])]]

    created = []
    req.store.transaction(plan)
    rule, group = created[0]
    req.app.compute.refresh_filters(group["tenant_id"])
    view = [r for r in security_group_view(dict(group, rules=[rule]), req.store.data)["rules"]]
    return 200, {"security_group_rule": view[0]}


def security_group_rules_delete(req):
    """DELETE /os-security-group-rules/{id}"""
    rule_id = checked_group_id(req.params["id"])
    neutron = req.app.network
    if neutron is not None:
        rule = neutron.security_group_rule(rule_id)
        # the caller's own rule, or one in the caller's group (its owner asked only then)
        if rule is None or rule["project_id"] != req.ident.project_id and \
                not req.ident.is_admin and (neutron.security_group(
                    rule["security_group_id"]) or {}).get("project_id") != \
                req.ident.project_id:
            raise NotFound(f"Security group rule {rule_id} not found.")
        try:
            neutron.call("DELETE", f"/security-group-rules/{rule_id}")
        except NetworkError as e:
            raise neutron_fault(e) from None
        return 202, None

    def plan(data):
        for group in security_groups_of(data, req.ident.project_id).values():
            if any(r["id"] == rule_id for r in group["rules"]):
                return [["set", ["security_groups", group["id"]], dict(
                    group, rules=[r for r in group["rules"] if r["id"] != rule_id])]]
        raise NotFound(f"Security group rule {rule_id} not found.")

    req.store.transaction(plan)
    req.app.compute.refresh_filters(req.ident.project_id)
    return 202, None



# § 30 API: volumes and events ---------------------------------------------------------
#
# Nova's volume and snapshot proxies (up to 2.35) over Cinder, server external events
# (Neutron's and Cinder's notices about a server's ports and volumes), and assisted
# volume snapshots.

def proxy_volume_view(volume):
    """Cinder's volume in the shape of Nova's os-volumes (camelCase)."""
    attachments = [{}]
    if volume.get("attachments"):
        first = volume["attachments"][0]
        attachments = [{"id": volume["id"], "volumeId": volume["id"],
                        "serverId": first.get("server_id")}]
        if first.get("device"):
            attachments[0]["device"] = first["device"]
    return {"id": volume["id"], "status": volume["status"], "size": volume["size"],
            "availabilityZone": volume.get("availability_zone"),
            "createdAt": volume.get("created_at"), "attachments": attachments,
            "displayName": volume.get("name"), "displayDescription": volume.get("description"),
            "volumeType": volume.get("volume_type"), "snapshotId": volume.get("snapshot_id"),
            "metadata": volume.get("metadata") or {}}


def proxy_snapshot_view(snap):
    return {"id": snap["id"], "volumeId": snap["volume_id"], "status": snap["status"],
            "size": snap["size"], "createdAt": snap.get("created_at"),
            "displayName": snap.get("name"), "displayDescription": snap.get("description")}


def volume_service(req):
    """Cinder, or 404 for calls that need one in a cloud that has none."""
    if req.app.volumes is None:
        raise NotFound("This cloud has no block storage service.")
    return req.app.volumes


def cinder_fault(e, not_found=NotFound):
    """Cinder's refusal as Nova's proxy passes it on."""
    if e.status == 404:
        return not_found(e.message)
    if e.status == 403 or e.status == 413:
        return Forbidden(e.message)
    if e.status in (400, 409):
        return BadRequest(e.message)
    return Unavailable(f"The block storage service answered {e.status}.")


def volume_list(req, rule):
    authorize(req, rule, "reader", req.ident.project_id)
    validate_query(req, ["limit", "offset"], strict_since="2.75")
    try:
        volumes = req.app.volumes.list(req.ident) if req.app.volumes is not None else []
    except VolumeError as e:
        raise cinder_fault(e) from None
    return 200, {"volumes": [proxy_volume_view(v) for v in limited(req, volumes)]}


def volumes_index(req):
    """GET /os-volumes"""
    return volume_list(req, "os_compute_api:os-volumes:list")


def volumes_detail(req):
    """GET /os-volumes/detail"""
    return volume_list(req, "os_compute_api:os-volumes:detail")


def volumes_show(req):
    """GET /os-volumes/{id}"""
    authorize(req, "os_compute_api:os-volumes:show", "reader", req.ident.project_id)
    _, volume = the_volume(req, req.params["id"])
    return 200, {"volume": proxy_volume_view(volume)}


VOLUME_CREATE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["volume"],
    "properties": {"volume": {
        "type": "object", "additionalProperties": False, "required": ["size"],
        "properties": {
            "volume_type": {"type": "string"}, "metadata": {"type": "object"},
            "snapshot_id": {"type": "string"},
            "size": {"type": ["integer", "string"], "minimum": 1, "pattern": r"^[0-9]+$"},
            "availability_zone": {"type": "string"}, "display_name": {"type": "string"},
            "display_description": {"type": "string"}}}}}


def volumes_create(req):
    """POST /os-volumes"""
    authorize(req, "os_compute_api:os-volumes:create", "member", req.ident.project_id)
    spec = validate_body(req, VOLUME_CREATE_SCHEMA)["volume"]
    cinder = volume_service(req)
    size = int(spec["size"])
    if size < 1:
        raise BadRequest("Invalid input for field/attribute size. Value: 0. 0 is less than "
                         "the minimum of 1")
    if spec.get("snapshot_id") and cinder.get_snapshot(req.ident, spec["snapshot_id"]) is None:
        raise NotFound(f"Snapshot {spec['snapshot_id']} could not be found.")
    try:
        volume = cinder.create(req.ident, size, spec.get("display_name"),
                               spec.get("display_description"), spec.get("snapshot_id"),
                               volume_type=spec.get("volume_type"),
                               metadata=spec.get("metadata"),
                               zone=spec.get("availability_zone"))
    except VolumeError as e:
        raise cinder_fault(e, not_found=BadRequest) from None
    return 200, {"volume": proxy_volume_view(volume)}, {
        "Location": req.self_link("os-volumes", volume["id"])}


def volumes_delete(req):
    """DELETE /os-volumes/{id}"""
    authorize(req, "os_compute_api:os-volumes:delete", "member", req.ident.project_id)
    cinder, volume = the_volume(req, req.params["id"])
    try:
        cinder.delete(req.ident, volume["id"])
    except VolumeError as e:
        raise cinder_fault(e) from None
    return 202, None


def snapshot_list(req, rule):
    authorize(req, rule, "reader", req.ident.project_id)
    try:
        snaps = req.app.volumes.list_snapshots(req.ident) if req.app.volumes is not None \
            else []
    except VolumeError as e:
        raise cinder_fault(e) from None
    return 200, {"snapshots": [proxy_snapshot_view(s) for s in limited(req, snaps)]}


def snapshots_index(req):
    """GET /os-snapshots"""
    return snapshot_list(req, "os_compute_api:os-volumes:snapshots:list")


def snapshots_detail(req):
    """GET /os-snapshots/detail"""
    return snapshot_list(req, "os_compute_api:os-volumes:snapshots:detail")


def the_snapshot(req, snapshot_id):
    cinder = req.app.volumes
    snap = cinder.get_snapshot(req.ident, snapshot_id) if cinder is not None else None
    if snap is None:
        raise NotFound(f"Snapshot {snapshot_id} could not be found.")
    return cinder, snap


def snapshots_show(req):
    """GET /os-snapshots/{id}"""
    validate_query(req, (), strict_since="2.102")
    authorize(req, "os_compute_api:os-volumes:snapshots:show", "reader", req.ident.project_id)
    return 200, {"snapshot": proxy_snapshot_view(the_snapshot(req, req.params["id"])[1])}


SNAPSHOT_CREATE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["snapshot"],
    "properties": {"snapshot": {
        "type": "object", "additionalProperties": False, "required": ["volume_id"],
        "properties": {"volume_id": {"type": "string"}, "force": BOOL_LIKE,
                       "display_name": {"type": "string"},
                       "display_description": {"type": "string"}}}}}


def snapshots_create(req):
    """POST /os-snapshots"""
    authorize(req, "os_compute_api:os-volumes:snapshots:create", "member",
              req.ident.project_id)
    spec = validate_body(req, SNAPSHOT_CREATE_SCHEMA)["snapshot"]
    cinder, volume = the_volume(req, spec["volume_id"])
    try:
        snap = cinder.create_snapshot(req.ident, volume["id"],
                                      bool_from_string(spec.get("force", False), strict=True),
                                      spec.get("display_name"),
                                      spec.get("display_description"))
    except VolumeError as e:
        raise cinder_fault(e) from None
    return 200, {"snapshot": proxy_snapshot_view(snap)}


def snapshots_delete(req):
    """DELETE /os-snapshots/{id}"""
    authorize(req, "os_compute_api:os-volumes:snapshots:delete", "member",
              req.ident.project_id)
    cinder, snap = the_snapshot(req, req.params["id"])
    try:
        cinder.delete_snapshot(req.ident, snap["id"])
    except VolumeError as e:
        raise cinder_fault(e) from None
    return 202, None


# server external events

EVENT_NAMES = [((2, 1), ("network-changed", "network-vif-plugged", "network-vif-unplugged",
                         "network-vif-deleted")),
               ((2, 51), ("volume-extended",)), ((2, 76), ("power-update",)),
               ((2, 82), ("accelerator-request-bound",)), ((2, 93), ("volume-reimaged",))]


def event_schema(req):
    names = [n for since, group in EVENT_NAMES if req.version >= since for n in group]
    return {"type": "object", "additionalProperties": False, "required": ["events"],
            "properties": {"events": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False,
                "required": ["name", "server_uuid"], "properties": {
                    "name": {"type": "string", "enum": names},
                    "server_uuid": {"type": "string", "format": "uuid"},
                    "status": {"type": "string", "enum": ["failed", "completed",
                                                          "in-progress"]},
                    "tag": {"type": "string", "maxLength": 255}}}}}}


def server_external_events_create(req):
    """POST /os-server-external-events"""
    authorize(req, "os_compute_api:os-server-external-events:create", "service")
    events = validate_body(req, event_schema(req))["events"]
    results, accepted = [], 0
    for event in events:
        result = dict(event, status=event.get("status", "completed"))
        result["code"] = accept_event(req, result)
        if result["code"] == 200:
            accepted += 1
        else:
            result["status"] = "failed"
        results.append(result)
    if not accepted:
        raise NotFound("No instances found for any event")
    return (200 if accepted == len(results) else 207), {"events": results}


def accept_event(req, event):
    """The per-event code: 200 taken, 404 unknown server, 422 a server with no host,
    400 an event that does not fit the server."""
    server = req.store.data["servers"].get(event["server_uuid"])
    if server is None or server["vm_state"] == "deleted":
        return 404
    if not server.get("host") or server["vm_state"] == "shelved_offloaded":
        return 422
    name, compute = event["name"], req.app.compute
    if name in ("volume-extended", "volume-reimaged"):
        if not any(v.get("id") == event.get("tag") for v in server.get("volumes", [])):
            return 400
        if name == "volume-reimaged":
            compute.volume_reimaged(server["id"], event["tag"], event["status"] == "failed")
        if name == "volume-extended":
            rid = compute.record_action(req, server["id"], "extend_volume")
            compute.run(server["id"], rid, "compute_extend_volume",
                        lambda s, vid=event["tag"]: compute.extend_volume(s, vid),
                        on_error=lambda sid, exc: LOG.error("server %s: %s", sid, exc))
    elif name == "power-update":
        if event.get("tag") not in ("POWER_ON", "POWER_OFF"):
            return 400
        power_on = event["tag"] == "POWER_ON"
        rid = compute.record_action(req, server["id"], "start" if power_on else "stop")

        def work(s):
            if power_on:
                compute.driver_of(s).power_on(s)
                settle(compute, s["id"], vm_state="active", power_state=RUNNING)
            else:
                compute.driver_of(s).power_off(s, timeout=req.app.conf["shutdown_timeout"])
                settle(compute, s["id"], vm_state="stopped", power_state=SHUTDOWN)
        compute.run(server["id"], rid, "compute_power_update", work)
    elif name == "network-vif-deleted":
        compute.change_ports(server["id"], lambda ports: [
            p for p in ports if p["id"] != event.get("tag")])
    elif name == "network-vif-plugged" and event["status"] == "completed":
        compute.vif_plugged(server["id"], event.get("tag"))
    elif name == "network-changed" and any(p.get("neutron") for p in server.get("ports", [])):
        compute.run(server["id"], None, "network_changed", compute.refresh_ports,
                    on_error=lambda sid, exc: LOG.error("server %s: %s", sid, exc))
    LOG.info("server %s: event %s (%s) %s", server["id"], name, event.get("tag"),
             event["status"])
    return 200


# assisted volume snapshots

def assisted_volume_snapshots_create(req):
    """POST /os-assisted-volume-snapshots"""
    authorize(req, "os_compute_api:os-assisted-volume-snapshots:create", "service")
    spec = validate_body(req, {
        "type": "object", "additionalProperties": False, "required": ["snapshot"],
        "properties": {"snapshot": {
            "type": "object", "additionalProperties": False,
            "required": ["volume_id", "create_info"], "properties": {
                "volume_id": {"type": "string", "minLength": 1},
                "create_info": {
                    "type": "object", "additionalProperties": False,
                    "required": ["snapshot_id", "type", "new_file"], "properties": {
                        "snapshot_id": {"type": "string", "minLength": 1},
                        "type": {"type": "string", "enum": ["qcow2"]},
                        "new_file": {"type": "string", "minLength": 1},
                        "id": {"type": "string", "minLength": 1}}}}}}})["snapshot"]
    server = volume_holder(req, spec["volume_id"])
    check_snapshot_ready(server, "volume_snapshot_create")
    info = spec["create_info"]
    compute = req.app.compute
    compute.run(server["id"], None, "compute_volume_snapshot_create",
                lambda s: compute.volume_snapshot_create(s, spec["volume_id"], info),
                on_error=lambda sid, exc: LOG.error("server %s: %s", sid, exc))
    return 200, {"snapshot": {"id": info.get("id"), "volumeId": spec["volume_id"]}}


def assisted_volume_snapshots_delete(req):
    """DELETE /os-assisted-volume-snapshots/{id}"""
    authorize(req, "os_compute_api:os-assisted-volume-snapshots:delete", "service")
    validate_query(req, ["delete_info"], strict_since="2.75")
    try:
        info = json.loads(req.q("delete_info") or "")
        volume_id = info["volume_id"]
    except (ValueError, TypeError, KeyError) as e:
        raise BadRequest(f"delete_info is not valid: {e}") from None
    if not isinstance(volume_id, str) or info.get("type", "qcow2") != "qcow2":
        raise BadRequest("delete_info is not valid: a qcow2 volume_id is needed")
    server = volume_holder(req, volume_id)
    check_snapshot_ready(server, "volume_snapshot_delete")
    if info.get("merge_target_file") is not None and server["vm_state"] != "active":
        raise BadRequest(f"Instance {server['id']} in vm_state {server['vm_state']} cannot "
                         f"perform volume_snapshot_delete while the instance is in this state.")
    compute, snapshot_id = req.app.compute, req.params["id"]
    compute.run(server["id"], None, "compute_volume_snapshot_delete",
                lambda s: compute.volume_snapshot_delete(s, volume_id, snapshot_id, info),
                on_error=lambda sid, exc: LOG.error("server %s: %s", sid, exc))
    return 204, None


def check_snapshot_ready(server, method):
    """Nova's checks: the server has a host and no task (400, as its API answers)."""
    if not server.get("host"):
        raise BadRequest(f"Instance {server['id']} is not ready")
    if server.get("task_state"):
        raise BadRequest(f"Instance {server['id']} in task_state {server['task_state']} "
                         f"cannot perform {method} while the instance is in this state.")


def volume_holder(req, volume_id):
    """The server a volume is attached to (400 as Nova when there is none)."""
    for server in req.store.data["servers"].values():
        if server["vm_state"] != "deleted" and any(
                v.get("id") == volume_id for v in server.get("volumes", [])):
            return server
    raise BadRequest(f"No volume Block Device Mapping with id {volume_id}.")


# § 31 API: server groups --------------------------------------------------------------
#
# The scheduler (§30) keeps affinity groups' members on one host and anti-affinity
# groups' apart (max_server_per_host each); a member that cannot be placed so fails its
# build as in Nova ("No valid host was found"); the soft policies only weigh.

GROUP_POLICIES = ("anti-affinity", "affinity", "soft-anti-affinity", "soft-affinity")


def server_group_view(req, group):
    view = {"id": group["id"], "name": group["name"], "members": list(group["members"])}
    if req.since("2.64"):
        view["policy"] = group["policy"]
        view["rules"] = dict(group.get("rules") or {})
    else:
        view["policies"] = [group["policy"]]
        view["metadata"] = {}
    if req.since("2.13"):
        view["project_id"] = group["project_id"]
        view["user_id"] = group["user_id"]
    return view


def find_server_group(req, group_id):
    group = req.store.data["server_groups"].get(group_id)
    if group is None or (group["project_id"] != req.ident.project_id and not req.ident.is_admin):
        raise NotFound(f"Server group {group_id} could not be found.")
    return group


def server_groups_index(req):
    """GET /os-server-groups"""
    query = validate_query(req, ["all_projects", "limit", "offset"], strict_since="2.75")
    groups = [g for g in req.store.data["server_groups"].values()
              if g["project_id"] == req.ident.project_id or (
                  "all_projects" in query and req.ident.is_admin)]
    groups.sort(key=lambda g: (g.get("created_at", ""), g["id"]))
    try:
        offset = int(query.get("offset", ["0"])[-1])
        limit = int(query["limit"][-1]) if "limit" in query else None
    except ValueError:
        raise BadRequest("limit and offset must be integers") from None
    if offset < 0 or (limit is not None and limit < 0):
        raise BadRequest("limit and offset must be >= 0")
    groups = groups[offset:] if limit is None else groups[offset:offset + limit]
    return 200, {"server_groups": [server_group_view(req, g) for g in groups]}


def server_groups_show(req):
    """GET /os-server-groups/{id}"""
    validate_query(req, (), strict_since="2.102")
    return 200, {"server_group": server_group_view(req, find_server_group(req, req.params["id"]))}


def server_groups_create(req):
    """POST /os-server-groups"""
    if req.since("2.64"):
        props = {"name": name_schema(), "policy": {"type": "string", "enum": list(
            GROUP_POLICIES)}, "rules": {"type": "object", "additionalProperties": False,
                                        "properties": {"max_server_per_host": {
                                            "type": ["integer", "string"], "minimum": 1,
                                            "pattern": r"^[0-9]+$"}}}}
        required = ["name", "policy"]
    else:
        allowed = list(GROUP_POLICIES) if req.since("2.15") else ["anti-affinity", "affinity"]
        props = {"name": name_schema(), "policies": {
            "type": "array", "minItems": 1, "maxItems": 1, "uniqueItems": True,
            "items": {"type": "string", "enum": allowed}}}
        required = ["name", "policies"]
    spec = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["server_group"], "properties": {"server_group": {
                                   "type": "object", "additionalProperties": False,
                                   "required": required, "properties": props}}})["server_group"]
    policy = spec.get("policy") or spec["policies"][0]
    rules = {}
    if spec.get("rules"):
        if policy != "anti-affinity":
            raise BadRequest("Only anti-affinity policy supports rules.")
        rules["max_server_per_host"] = int(spec["rules"]["max_server_per_host"])
        if rules["max_server_per_host"] < 1:
            raise BadRequest("max_server_per_host must be >= 1")
    group = {"id": str(uuid.uuid4()), "name": spec["name"], "policy": policy, "rules": rules,
             "members": [], "project_id": req.ident.project_id, "user_id": req.ident.user_id,
             "created_at": isotime_us(req.app.clock.now())}

    def plan(data):
        limits = project_limits(data, req.ident.project_id, req.ident.user_id)
        used = usage(data, req.ident.project_id)["server_groups"]
        if 0 <= limits["server_groups"] <= used:
            raise Forbidden("Quota exceeded, too many server groups.")
        return [["set", ["server_groups", group["id"]], group]]

    req.store.transaction(plan)
    return 200, {"server_group": server_group_view(req, group)}


def server_groups_delete(req):
    """DELETE /os-server-groups/{id}"""
    group_id = req.params["id"]

    def plan(data):
        find_server_group(req, group_id)
        return [["del", ["server_groups", group_id]]]

    req.store.transaction(plan)
    return 204, None


def join_server_group(req, data, group_id, server_ids):
    """Ops adding new servers to a group named in the scheduler hints (400/403 as Nova)."""
    group = data["server_groups"].get(group_id)
    if group is None or group["project_id"] != req.ident.project_id and not req.ident.is_admin:
        raise BadRequest(f"Invalid server group {group_id}")
    limit = project_limits(data, req.ident.project_id)["server_group_members"]
    if 0 <= limit < len(group["members"]) + len(server_ids):
        raise Forbidden("Quota exceeded, too many servers in group")
    return [["set", ["server_groups", group_id, "members"], group["members"] + server_ids]]


# § 32 API: services and hypervisors ---------------------------------------------------
#
# One minivan process plays Nova's conductor, scheduler and compute on its host.  Their
# records (enabled/disabled, forced down) are kept in the state; 'up' means alive: the
# compute service is up while the hypervisor answers.

SERVICE_BINARIES = ("nova-conductor", "nova-scheduler", "nova-compute")


def service_key(app, host, binary):
    """Where a service's status is stored: by binary for this host's services, by
    binary@host for the other compute hosts."""
    return binary if host == app.conf["host"] else f"{binary}@{host}"


@functools.lru_cache(maxsize=1024)
def service_uuid(host, binary):
    return str(uuid.uuid5(IMAGE_NAMESPACE, f"service:{host}:{binary}"))


def service_records(app):
    """The services with their stored status, in id order: this host's conductor and
    scheduler, then a nova-compute per compute host."""
    stored = app.store.data.get("services", {})
    here = app.conf["host"]
    placed = [(here, "nova-conductor"), (here, "nova-scheduler")] + [
        (host, "nova-compute") for host in app.compute_host_names()]
    records = []
    for number, (host, binary) in enumerate(placed, 1):
        key = service_key(app, host, binary)
        state = stored.get(key, {})
        if state.get("deleted"):
            continue
        records.append({"number": number, "binary": binary, "host": host, "key": key,
                        "uuid": service_uuid(host, binary),
                        "zone": host_zone(app, host) if binary == "nova-compute"
                        else "internal",
                        "disabled": state.get("disabled", False),
                        "disabled_reason": state.get("disabled_reason"),
                        "forced_down": state.get("forced_down", False),
                        "up": (app.compute_available(host) if binary == "nova-compute"
                               else True) and not state.get("forced_down", False)})
    return records


def compute_service(app, host):
    """The nova-compute record of a host, or None (not configured, or deleted)."""
    for record in service_records(app):
        if record["binary"] == "nova-compute" and record["host"] == host:
            return record
    return None


def host_status(app, server, services=None):
    """A server's host_status (2.16): UP, DOWN (forced down), MAINTENANCE (disabled),
    UNKNOWN (not answering), or '' without a host.  services: {host: compute service
    record}, when the caller has them."""
    if not server.get("host"):
        return ""
    service = services.get(server["host"]) if services is not None else \
        compute_service(app, server["host"])
    if service is None:
        return "UNKNOWN"
    if service["forced_down"]:
        return "DOWN"
    if not service["up"]:
        return "UNKNOWN"
    return "MAINTENANCE" if service["disabled"] else "UP"


def service_view(req, record):
    view = {"id": record["uuid"] if req.since("2.53") else record["number"],
            "binary": record["binary"], "disabled_reason": record["disabled_reason"],
            "host": record["host"], "state": "up" if record["up"] else "down",
            "status": "disabled" if record["disabled"] else "enabled",
            "updated_at": isotime_us(req.app.clock.now()), "zone": record["zone"]}
    if req.since("2.11"):
        view["forced_down"] = record["forced_down"]
    return view


def services_index(req):
    """GET /os-services"""
    query = validate_query(req, ["host", "binary"], strict_since="2.75")
    records = [r for r in service_records(req.app)
               if r["host"] == query.get("host", [r["host"]])[-1]
               and r["binary"] == query.get("binary", [r["binary"]])[-1]]
    return 200, {"services": [service_view(req, r) for r in records]}


def set_service(req, record, **changes):
    def plan(data):
        current = dict(data.get("services", {}).get(record["key"], {}))
        current.update(changes)
        return [["set", ["services", record["key"]], current]]
    req.store.transaction(plan)


def find_service_record(req, host, binary):
    for record in service_records(req.app):
        if record["host"] == host and record["binary"] == binary:
            return record
    raise NotFound(f"Service {binary} on host {host} could not be found.")


def services_update(req):
    """PUT /os-services/{id}"""
    if req.since("2.53"):
        return services_update_by_uuid(req)
    action = req.params["id"]
    props = {"host": {"type": "string", "minLength": 1, "maxLength": 255},
             "binary": {"type": "string", "minLength": 1, "maxLength": 255}}
    if action == "disable-log-reason":
        props["disabled_reason"] = {"type": "string", "minLength": 1, "maxLength": 255}
    if action == "force-down" and req.since("2.11"):
        props["forced_down"] = BOOL_LIKE
    if action not in ("enable", "disable", "disable-log-reason") and not (
            action == "force-down" and req.since("2.11")):
        raise NotFound("Unknown action")
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["host", "binary"] + (
                                   ["forced_down"] if action == "force-down" else []),
                               "properties": props})
    record = find_service_record(req, body["host"], body["binary"])
    view = {"host": record["host"], "binary": record["binary"]}
    if action == "force-down":
        forced = bool_from_string(body["forced_down"])
        set_service(req, record, forced_down=forced)
        view["forced_down"] = forced
    else:
        disabled = action != "enable"
        reason = body.get("disabled_reason") if disabled else None
        set_service(req, record, disabled=disabled, disabled_reason=reason)
        view["status"] = "disabled" if disabled else "enabled"
        if action == "disable-log-reason":
            view["disabled_reason"] = reason
    return 200, {"service": view}


def services_update_by_uuid(req):
    body = validate_body(req, {"type": "object", "additionalProperties": False, "properties": {
        "status": {"type": "string", "enum": ["enabled", "disabled"]},
        "disabled_reason": {"type": "string", "minLength": 1, "maxLength": 255},
        "forced_down": BOOL_LIKE}})
    records = {r["uuid"]: r for r in service_records(req.app)}
    if not is_uuid_like(req.params["id"]):
        raise BadRequest(f"Invalid uuid {req.params['id']}")
    record = records.get(req.params["id"])
    if record is None:
        raise NotFound(f"Service {req.params['id']} could not be found.")
    if not body:
        raise BadRequest("At least one of status or forced_down must be specified.")
    if "disabled_reason" in body and body.get("status") != "disabled":
        raise BadRequest("Specifying 'disabled_reason' with status 'enabled' is invalid.")
    if record["binary"] != "nova-compute" and "forced_down" in body:
        raise BadRequest("Updating a non nova-compute service is not supported.")
    changes = {}
    if "status" in body:
        changes["disabled"] = body["status"] == "disabled"
        changes["disabled_reason"] = body.get("disabled_reason") if changes["disabled"] else None
    if "forced_down" in body:
        changes["forced_down"] = bool_from_string(body["forced_down"])
    set_service(req, record, **changes)
    return 200, {"service": service_view(req, find_service_record(req, record["host"],
                                                                   record["binary"]))}


def services_delete(req):
    """DELETE /os-services/{id}"""
    key = req.params["id"]
    for record in service_records(req.app):
        if key in (record["uuid"], str(record["number"])) and (
                req.since("2.53") == is_uuid_like(key)):
            hosting = [s for s in req.store.data["servers"].values()
                       if s.get("host") == record["host"] and s["vm_state"] != "deleted"]
            if record["binary"] == "nova-compute" and hosting:
                raise Conflict("Unable to delete compute service that is hosting instances. "
                               "Migrate or delete the instances first.")
            set_service(req, record, deleted=True)
            return 204, None
    if req.since("2.53") and not is_uuid_like(key):
        raise BadRequest(f"Invalid uuid {key}")
    raise NotFound(f"Service {key} could not be found.")


def host_resources(app, host):
    """What libvirt says a compute host has; zeros while it does not answer."""
    driver = app.drivers.get(host)
    try:
        res = driver.get_available_resource() if driver is not None and driver.available \
            else None
    except (DriverError, Unavailable):
        res = None
    return res or {"vcpus": 0, "memory_mb": 0, "local_gb": 0, "free_disk_gb": 0,
                   "hypervisor_type": "QEMU", "hypervisor_version": 0, "cpu_model": ""}


def hypervisor_records(app, hosts=None):
    """Each compute host as Nova's hypervisor (compute node), from libvirt and the servers
    on it, in id order."""
    services = {r["host"]: r for r in service_records(app) if r["binary"] == "nova-compute"}
    live, held = collections.defaultdict(list), collections.defaultdict(list)
    for server in app.store.data["servers"].values():
        if server.get("host") and server["vm_state"] != "deleted":
            live[server["host"]].append(server)
            source = server.get("migration_source")
            if source and source != server["host"]:     # its old flavor, until the move ends
                held[source].append(dict(server, flavor=server.get("old_flavor") or
                                         server["flavor"]))
    records = []
    for number, host in enumerate(app.compute_host_names(), 1):
        if hosts is not None and host not in hosts:
            continue
        servers = live[host]
        vcpus, ram, disk = usage_of(servers + held[host])
        records.append({"host": host, "number": number, "res": host_resources(app, host),
                        "servers": servers, "service": services.get(host),
                        "vcpus_used": vcpus,
                        "memory_mb_used": int(app.conf["reserved_host_memory_mb"]) + ram,
                        "local_gb_used": disk,
                        "uuid": str(uuid.uuid5(IMAGE_NAMESPACE, "hypervisor:" + host))})
    return records


# The scheduler: Nova's filters, then its weighers, over the compute hosts.  A server
# counts against the host in its record from the moment it is placed (its claim); a
# server resized to another host also holds its old flavor on its source until confirmed.

NO_VALID_HOST = "No valid host was found. There are not enough hosts available."


class NoValidHost(DriverError):
    """The scheduler found no host for a request."""


class MoveFailed(DriverError):
    """A move failed and the server is back where it was, as it was."""


def server_claims(server):
    """[(host, vcpus, MB, GB)] of what a server holds: its flavor (the new one while it
    resizes) on its host, and its old flavor on the source of a move until it ends."""
    if server["vm_state"] == "deleted":
        return []
    held = []
    if server.get("host"):
        held.append((server["host"], placed_flavor(dict(
            server, flavor=server.get("new_flavor") or server["flavor"]),
            server.get("numa_topology"))))
    source = server.get("migration_source")
    if source and source != server.get("host"):
        held.append((source, placed_flavor(dict(
            server, flavor=server.get("old_flavor") or server["flavor"]),
            server.get("old_numa_topology"))))
    return [(host, f["vcpus"], f["ram"], f["disk"]) for host, f in held]


class Claims(ServerIndex):
    """What the servers hold on each host, kept up to date from the store's changes, so
    that placing a server costs the same with 10 or 10,000 servers."""

    def add(self, server, sign):
        for host, vcpus, ram, disk in server_claims(server):
            total = self.sums[host]
            total[0] += sign * vcpus
            total[1] += sign * ram
            total[2] += sign * disk

    def by_host(self, skip=None):
        """{host: (vcpus, MB, GB)} held, without what the server skip holds."""
        with self.store.reading():
            sums = {host: list(total) for host, total in self.sums.items()}
            server = self.store.data["servers"].get(skip) if skip else None
            for host, vcpus, ram, disk in server_claims(server) if server else []:
                sums[host] = [sums[host][0] - vcpus, sums[host][1] - ram,
                              sums[host][2] - disk]
        return sums


def placed_flavor(server, numa=None):
    """What a server takes from its host: a volume-backed root disk takes no local disk;
    vCPUs pinned to a --cpu-dedicated-set are dedicated CPUs (Placement's PCPU), not shared
    ones (numa: the server's placed NUMA topology)."""
    flavor = server["flavor"]
    disk = 0 if server.get("volume_backed") else flavor["disk"]
    vcpus = flavor["vcpus"]
    if numa and numa.get("pcpu"):
        vcpus -= sum(len(cell["pcpus"]) for cell in numa["cells"])
    return {"vcpus": vcpus, "ram": flavor["ram"],
            "disk": disk + flavor["ephemeral"] + -(-int(flavor.get("swap") or 0) // 1024)}


def shared_vcpus(conf, res):
    """A host's CPUs for guests that float (Placement's VCPU, os-hypervisors' vcpus): all
    of them, or --cpu-shared-set's; none where only --cpu-dedicated-set is set."""
    if conf.get("cpu_shared_set"):
        return min(res["vcpus"], len(conf["cpu_shared_set"]))
    return 0 if conf.get("cpu_dedicated_set") else res["vcpus"]


def host_capacity(app, res, host, claims):
    """(free vcpus, free MB, free GB) of a host with resources res (host_resources) after
    allocation ratios and reservations."""
    conf = app.conf
    vcpus, ram, disk = claims.get(host, (0, 0, 0))
    shared = shared_vcpus(conf, res)
    return (shared * conf["cpu_allocation_ratio"] - vcpus,
            res["memory_mb"] * conf["ram_allocation_ratio"] - conf["reserved_host_memory_mb"]
            - ram,
            res["local_gb"] * conf["disk_allocation_ratio"]
            - conf["reserved_host_disk_mb"] / 1024 - disk)


def group_members_on(data, group, server_id):
    """{host: count} of a server group's other live members."""
    counts = collections.Counter()
    for member in group["members"]:
        other = data["servers"].get(member)
        if member != server_id and other and other.get("host") and \
                other["vm_state"] not in ("deleted", "error"):
            counts[other["host"]] += 1
    return counts


def numa_placed_on(data, host, skip):
    """The NUMA topologies guests hold on a host: placed there, or kept on the source of a
    move until it ends."""
    for other in data["servers"].values():
        if other["id"] == skip or other["vm_state"] == "deleted":
            continue
        if other.get("host") == host and other.get("numa_topology"):
            yield other["numa_topology"]
        elif other.get("migration_source") == host and other.get("old_numa_topology"):
            yield other["old_numa_topology"]


def numa_place(app, server, request, host):
    """(the request's cells fitted on host's free NUMA cells, None) or (None, why not)."""
    try:
        cells = app.host_driver(host).numa_cells()
    except (NumaConfigError, DriverError, Unavailable) as e:
        return None, f"its NUMA cells cannot be read: {e}"
    if not cells:
        return None, "it reports no NUMA topology"
    usage = numa_usage(cells, numa_placed_on(app.store.data, host, server["id"]))
    fitted = numa_fit(cells, usage, request, app.conf["cpu_allocation_ratio"],
                      app.conf["ram_allocation_ratio"])
    if fitted is None:
        return None, "the guest's NUMA topology does not fit its free NUMA cells"
    return fitted, None


def schedule(app, server, flavor, requested=None, exclude=(), force=False, numa_out=None):
    """The host for a server (with this flavor) by Nova's default filters and weighers;
    NoValidHost when none passes.  requested narrows the choice to one host; force
    (Nova's forced host) skips the filters, but not a NUMA topology's fit.  numa_out
    (a dict) gets the guest's NUMA topology on the chosen host as "topology"."""
    data = app.store.data
    hosts = [h for h in app.compute_host_names() if h not in exclude]
    if requested is not None:
        hosts = [h for h in hosts if h == requested]
    image = server.get("image_properties") or {}
    try:
        request = numa_request(flavor, image_meta(image))
    except BadRequest as e:
        LOG.warning("scheduling server %s: its NUMA request is invalid: %s", server["id"],
                    e.message)
        raise NoValidHost(NO_VALID_HOST) from None
    fits = {}

    def chosen(host):
        if numa_out is not None:
            numa_out["topology"] = None if request is None else dict(
                stored_numa(request, fits[host]), pcpu=bool(app.conf.get("cpu_dedicated_set")))
        return host
    if force:
        if not hosts:
            raise NoValidHost(NO_VALID_HOST)
        if request is not None:
            fits[hosts[0]], reason = numa_place(app, server, request, hosts[0])
            if reason:
                LOG.info("scheduling server %s: forced host %s: %s", server["id"], hosts[0],
                         reason)
                raise NoValidHost(NO_VALID_HOST)
        return chosen(hosts[0])
    claims = app.claims.by_host(skip=server["id"])
    need = placed_flavor(dict(server, flavor=flavor), request and {
        "pcpu": bool(app.conf.get("cpu_dedicated_set")), "cells": request["cells"]})
    services = {r["host"]: r for r in service_records(app) if r["binary"] == "nova-compute"}
    hints = server.get("scheduler_hints") or {}
    groups = [data["server_groups"][g] for g in server.get("server_groups", [])
              if g in data["server_groups"]]
    image = server.get("image_properties") or {}
    wanted_type = (image.get("img_hv_type") or image.get("hypervisor_type") or "").lower()
    wanted_arch = (image.get("hw_architecture") or image.get("architecture") or "").lower()

    def host_of(server_ids):
        if isinstance(server_ids, str):
            server_ids = [server_ids]
        return {data["servers"].get(i, {}).get("host") for i in server_ids} - {None}

    def passes(host):
        service = services.get(host)
        if service is None or service["disabled"] or not service["up"]:
            return "its compute service is disabled or down"
        zone = server.get("pinned_availability_zone")
        if zone and host_zone(app, host) != zone:
            return f"it is not in availability zone {zone}"
        res = host_resources(app, host)
        hv_type = res["hypervisor_type"].lower()
        if wanted_type and wanted_type != hv_type and not (
                wanted_type in ("qemu", "kvm") and hv_type == "qemu"):
            return f"the image wants hypervisor type {wanted_type}"
        if wanted_arch and wanted_arch not in ("x86_64", "amd64", "x86-64"):
            return f"the image wants architecture {wanted_arch}"
        vcpus, ram, disk = capacity[host] = host_capacity(app, res, host, claims)
        if need["vcpus"] > vcpus or need["ram"] > ram or need["disk"] > disk:
            return "it has not enough vCPUs, memory or disk left"
        for group in groups:
            members = group_members_on(data, group, server["id"])
            if group["policy"] == "affinity" and members and host not in members:
                return f"server group {group['id']} keeps its members together"
            if group["policy"] == "anti-affinity" and members[host] >= (
                    group.get("rules") or {}).get("max_server_per_host", 1):
                return f"server group {group['id']} keeps its members apart"
        if hints.get("same_host") and host_of(hints["same_host"]) - {host}:
            return "the same_host hint names servers elsewhere"
        if hints.get("different_host") and host in host_of(hints["different_host"]):
            return "the different_host hint names servers here"
        if request is not None:
            fits[host], reason = numa_place(app, server, request, host)
            return reason
        return None

    fit, capacity = [], {}
    for host in hosts:
        reason = passes(host)
        if reason:
            LOG.info("scheduling server %s: host %s is filtered out: %s", server["id"], host,
                     reason)
        else:
            fit.append(host)
    if not fit:
        raise NoValidHost(NO_VALID_HOST)
    return chosen(max(fit, key=lambda h: host_weight(app, h, fit, capacity, groups,
                                                     server["id"])))


def host_weight(app, host, fit, capacity, groups, server_id):
    """Nova's weighers, each normalised over the hosts that passed: free RAM (times
    --ram-weight-multiplier), and members of soft-(anti-)affinity groups; ties go to the
    host listed first."""
    def normalised(values, value):
        low, high = min(values), max(values)
        return 0.0 if high == low else (value - low) / (high - low)
    free = {h: capacity[h][1] for h in fit}
    weight = app.conf["ram_weight_multiplier"] * normalised(list(free.values()), free[host])
    for group in groups:
        if group["policy"] in ("soft-affinity", "soft-anti-affinity"):
            members = group_members_on(app.store.data, group, server_id)
            counts = [members[h] for h in fit]
            sign = 1 if group["policy"] == "soft-affinity" else -1
            weight += sign * normalised(counts, members[host])
    return weight - fit.index(host) * 1e-9


def host_ip(app, host):
    """A compute host's address: the one in its remote libvirt URI, else this host's."""
    uri = dict(app.conf["compute_hosts"]).get(host, "")
    remote = urllib.parse.urlsplit(uri).hostname if "+" in uri.split(":", 1)[0] else None
    return remote or app.conf["my_ip"]


def hypervisor_view(req, hyp, detail, with_servers=False):
    service = hyp["service"] or {"number": 0, "uuid": str(uuid.uuid4()), "disabled": True,
                                 "disabled_reason": "deleted", "up": False}
    view = {"id": hyp["uuid"] if req.since("2.53") else hyp["number"],
            "hypervisor_hostname": hyp["host"],
            "state": "up" if service["up"] else "down",
            "status": "disabled" if service["disabled"] else "enabled"}
    if detail:
        res = hyp["res"]
        view.update({"hypervisor_type": res["hypervisor_type"],
                     "hypervisor_version": res["hypervisor_version"],
                     "host_ip": host_ip(req.app, hyp["host"]),
                     "service": {"id": service["uuid"] if req.since("2.53") else
                                 service["number"], "host": hyp["host"],
                                 "disabled_reason": service["disabled_reason"]}})
        if req.since("2.88"):
            view["uptime"] = host_uptime()
        else:
            cpu = {"arch": "x86_64", "model": res.get("cpu_model", ""), "vendor": "",
                   "topology": {"cells": 1, "sockets": 1, "cores": res["vcpus"], "threads": 1},
                   "features": []}
            view.update({"vcpus": shared_vcpus(req.app.conf, res),
                         "vcpus_used": hyp["vcpus_used"],
                         "memory_mb": res["memory_mb"], "memory_mb_used": hyp["memory_mb_used"],
                         "local_gb": res["local_gb"], "local_gb_used": hyp["local_gb_used"],
                         "free_ram_mb": res["memory_mb"] - hyp["memory_mb_used"],
                         "free_disk_gb": res["local_gb"] - hyp["local_gb_used"],
                         "disk_available_least": res["free_disk_gb"],
                         "current_workload": sum(1 for s in hyp["servers"]
                                                 if s.get("task_state")),
                         "running_vms": len(hyp["servers"]),
                         "cpu_info": cpu if req.since("2.28") else json.dumps(cpu)})
    if with_servers:
        view["servers"] = [{"name": s["instance_name"], "uuid": s["id"]} for s in hyp["servers"]]
    return view


def host_uptime():
    """The host's uptime line, as `uptime` prints it."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10,
                              check=True).stdout.rstrip("\n")
    except (OSError, subprocess.SubprocessError):
        return None


def hypervisor_list(req, detail):
    allowed = []
    if req.since("2.33"):
        allowed += ["limit", "marker"]
    if req.since("2.53"):
        allowed += ["hypervisor_hostname_pattern", "with_servers"]
    query = validate_query(req, allowed, strict_since="2.33")
    hyps = hypervisor_records(req.app)
    pattern = query.get("hypervisor_hostname_pattern", [None])[-1]
    if pattern is not None:
        hyps = [h for h in hyps if pattern in h["host"]]
        if not hyps:
            raise NotFound(f"No hypervisor matching '{pattern}' could be found.")
    with_servers = bool_from_string(query.get("with_servers", ["false"])[-1])
    marker = None
    if req.since("2.33"):
        hyps, marker = paginate(req, hyps, lambda h: h["uuid"] if req.since("2.53")
                                else str(h["number"]), "marker [%s] not found")
    body = {"hypervisors": [hypervisor_view(req, h, detail, with_servers) for h in hyps]}
    if marker is not None:
        body["hypervisors_links"] = req.next_link(
            "os-hypervisors/detail" if detail else "os-hypervisors", marker)
    return 200, body


def hypervisors_index(req):
    """GET /os-hypervisors"""
    return hypervisor_list(req, detail=False)


def hypervisors_detail(req):
    """GET /os-hypervisors/detail"""
    return hypervisor_list(req, detail=True)


def find_hypervisor(req, hypervisor_id):
    for hyp in hypervisor_records(req.app):
        if hypervisor_id == (hyp["uuid"] if req.since("2.53") else str(hyp["number"])):
            return hyp
    if req.since("2.53") and not is_uuid_like(hypervisor_id):
        raise BadRequest(f"Invalid uuid {hypervisor_id}")
    raise NotFound(f"Hypervisor with ID '{hypervisor_id}' could not be found.")


def hypervisors_show(req):
    """GET /os-hypervisors/{id}"""
    query = validate_query(req, ["with_servers"] if req.since("2.53") else [],
                           strict_since="2.53")
    hyp = find_hypervisor(req, req.params["id"])
    with_servers = bool_from_string(query.get("with_servers", ["false"])[-1])
    return 200, {"hypervisor": hypervisor_view(req, hyp, True, with_servers)}


def hypervisors_uptime(req):
    """GET /os-hypervisors/{id}/uptime"""
    hyp = find_hypervisor(req, req.params["id"])
    view = hypervisor_view(req, hyp, False)
    view["uptime"] = host_uptime()
    return 200, {"hypervisor": view}


def hypervisors_statistics(req):
    """GET /os-hypervisors/statistics"""
    keys = ("vcpus", "vcpus_used", "memory_mb", "memory_mb_used", "local_gb", "local_gb_used",
            "free_ram_mb", "free_disk_gb", "current_workload", "running_vms",
            "disk_available_least")
    views = [hypervisor_view(req, h, True) for h in hypervisor_records(req.app)]
    stats = {"count": len(views)}
    stats.update({k: sum(v[k] for v in views) for k in keys})
    return 200, {"hypervisor_statistics": stats}


def matching_hypervisors(req):
    hyps = [h for h in hypervisor_records(req.app) if req.params["id"] in h["host"]]
    if not hyps:
        raise NotFound(f"No hypervisor matching '{req.params['id']}' could be found.")
    return hyps


def hypervisors_search(req):
    """GET /os-hypervisors/{id}/search"""
    return 200, {"hypervisors": [hypervisor_view(req, h, False)
                                 for h in matching_hypervisors(req)]}


def hypervisors_servers(req):
    """GET /os-hypervisors/{id}/servers"""
    views = []
    for hyp in matching_hypervisors(req):
        view = hypervisor_view(req, hyp, False, with_servers=True)
        if not view["servers"]:
            view.pop("servers")
        views.append(view)
    return 200, {"hypervisors": views}



# os-hosts (up to 2.42): this host's services, its resources; no host power control

def host_services(req):
    return [r for r in service_records(req.app) if not r["disabled"]]


def hosts_index(req):
    """GET /os-hosts"""
    zone = req.q("zone")
    hosts = [{"host_name": r["host"], "service": r["binary"].split("-", 1)[1],
              "zone": r["zone"]} for r in host_services(req)
             if not zone or r["zone"] == zone]
    return 200, {"hosts": hosts}


def known_host(req, name, message="Host {} could not be found."):
    if name != req.app.conf["host"] and name not in req.app.drivers:
        raise NotFound(message.format(name))
    return name


def hosts_show(req):
    """GET /os-hosts/{id}"""
    host = req.params["id"]
    found = hypervisor_records(req.app, hosts=[host])
    if not found:
        raise NotFound(f"Compute host {host} could not be found.")
    hyp = found[0]

    def resource(project, cpu, memory_mb, disk_gb):
        return {"resource": {"host": host, "project": project, "cpu": cpu,
                             "memory_mb": memory_mb, "disk_gb": disk_gb}}
    servers = hyp["servers"]
    resources = [resource("(total)", hyp["res"]["vcpus"], hyp["res"]["memory_mb"],
                          hyp["res"]["local_gb"]),
                 resource("(used_now)", hyp["vcpus_used"], hyp["memory_mb_used"],
                          hyp["local_gb_used"]),
                 resource("(used_max)", *usage_of(servers))]
    for project in sorted({s["project_id"] for s in servers}):
        resources.append(resource(project, *usage_of(
            [s for s in servers if s["project_id"] == project])))
    return 200, {"host": resources}


def usage_of(servers):
    """(vcpus, memory MB, disk GB) the servers' flavors add up to."""
    return (sum(s["flavor"]["vcpus"] for s in servers),
            sum(s["flavor"]["ram"] for s in servers),
            sum(s["flavor"]["disk"] + s["flavor"]["ephemeral"] for s in servers))


HOST_MODE = {"type": "string", "enum": ["enable", "disable", "Enable", "Disable", "ENABLE",
                                        "DISABLE"]}


def hosts_update(req):
    """PUT /os-hosts/{id}"""
    validate_body(req, {"type": "object", "additionalProperties": False,
                        "minProperties": 1,
                        "properties": {"status": HOST_MODE, "maintenance_mode": HOST_MODE}})
    known_host(req, req.params["id"])
    raise NotImplementedFault("The requested functionality is not supported.")


def host_power_action(req):
    """GET /os-hosts/{id}/reboot, /shutdown, /startup"""
    known_host(req, req.params["id"])
    raise NotImplementedFault("The requested functionality is not supported.")


hosts_reboot = hosts_shutdown = hosts_startup = host_power_action


# os-baremetal-nodes (up to 2.35): Nova's proxy to Ironic; a libvirt cloud has no bare
# metal nodes, and Nova itself refuses every change through this API

def baremetal_nodes_index(req):
    """GET /os-baremetal-nodes"""
    return 200, {"nodes": []}


def baremetal_nodes_show(req):
    """GET /os-baremetal-nodes/{id}"""
    raise NotFound(f"Node {req.params['id']} could not be found.")


def no_ironic_proxy(command):
    raise BadRequest(f"Command not supported. Please use Ironic command {command} to "
                     "perform this action.")


def baremetal_nodes_create(req):
    """POST /os-baremetal-nodes"""
    no_ironic_proxy("node-create")


def baremetal_nodes_delete(req):
    """DELETE /os-baremetal-nodes/{id}"""
    no_ironic_proxy("node-delete")


def baremetal_node_action_add_interface(req):
    """POST /os-baremetal-nodes/{id}/action add_interface"""
    no_ironic_proxy("port-create")


def baremetal_node_action_remove_interface(req):
    """POST /os-baremetal-nodes/{id}/action remove_interface"""
    no_ironic_proxy("port-delete")

# os-instance_usage_audit_log: the usage audit of the last completed month

def audit_period(before):
    """(begin, end) of the last month that ended before this time, as Nova's
    last_completed_audit_period with its default period, month."""
    end = before.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    begin = (end - datetime.timedelta(days=1)).replace(day=1)
    return begin, end


def audit_log(req, before):
    """The audit of the period: with --instance-usage-audit, each compute host audited
    the servers that lived on it; without, no host ran it (as Nova with the audit off)."""
    begin, end = audit_period(before)
    hosts = req.app.compute_host_names()
    log = {}
    if req.app.conf["instance_usage_audit"]:
        counts = collections.Counter()
        for server in req.store.data["servers"].values():
            launched = parse_isotime(server["launched_at"]) if server.get("launched_at") \
                else None
            ended = parse_isotime(server["terminated_at"]) if server.get("terminated_at") \
                else None
            if launched and launched < end and (ended is None or ended >= begin):
                counts[server.get("host") or hosts[0]] += 1
        for host in hosts:
            log[host] = {"state": "DONE", "instances": counts[host], "errors": 0,
                         "message": f"Instance usage audit ran for host {host}, "
                                    f"{counts[host]} instances."}
    done = len(log)
    return {"period_beginning": str(begin), "period_ending": str(end),
            "num_hosts": len(hosts), "num_hosts_done": done, "num_hosts_running": 0,
            "num_hosts_not_run": len(hosts) - done,
            "hosts_not_run": [] if done else list(hosts),
            "total_instances": sum(h["instances"] for h in log.values()), "total_errors": 0,
            "overall_status": "ALL hosts done. 0 errors." if done == len(hosts) else
            f"{done} of {len(hosts)} hosts done. 0 errors.",
            "log": log}


def instance_usage_audit_log_index(req):
    """GET /os-instance_usage_audit_log"""
    validate_query(req, (), strict_since="2.102")
    return 200, {"instance_usage_audit_logs": audit_log(req, req.app.clock.now())}


def instance_usage_audit_log_show(req):
    """GET /os-instance_usage_audit_log/{id}"""
    validate_query(req, (), strict_since="2.102")
    text = req.params["id"]
    try:
        before = datetime.datetime.strptime(
            text, "%Y-%m-%d %H:%M:%S.%f" if "." in text else "%Y-%m-%d %H:%M:%S")
        return 200, {"instance_usage_audit_log": audit_log(req, before)}
    except (ValueError, OverflowError):
        raise BadRequest(f"Invalid timestamp for date {text}") from None


# § 33 Placement -----------------------------------------------------------------------
#
# Where the cloud has Placement (the catalog's "placement" service, or --placement-url),
# minivan does there what Nova's resource tracker, scheduler and conductor do:
#   - each compute host is a resource provider (its hypervisor's uuid and name) with VCPU,
#     PCPU, MEMORY_MB and DISK_GB inventories, the COMPUTE_* traits that apply and, as
#     Placement aggregates, the host aggregates it is in; written when minivan's view of
#     them changes, so that what an operator sets in Placement (a reserved amount, say)
#     stays until then;
#   - the scheduler takes its candidate hosts from GET /allocation_candidates, then its own
#     filters and weighers choose, and the chosen candidate is claimed with the server as
#     consumer (a claim that loses a race moves on to the next host, as Nova's alternates);
#   - a move's source allocation is held by the migration's uuid until the move ends, as
#     Nova's; every other change of a server's allocations (confirm, revert, delete,
#     shelve-offload, a failed move) follows from its record: a worker writes what the
#     record says it should hold;
#   - at start and every --placement-interval seconds minivan compares every server's
#     allocations with Placement's and mends them, and removes the allocations of its own
#     gone servers and ended migrations (nova-manage placement heal_allocations and
#     audit), and logs what it mended.
# Without Placement none of this runs and minivan's own accounting (§31) is all there is.

PLACEMENT_VERSION = "1.39"
# the traits of Nova's libvirt driver that apply to every minivan host: what its guests
# can have (the architecture, image types, disk buses, NIC and video models) and do
# (tagged devices, interface and volume attach, extend, multi-attach, trusted certificates,
# rescue of volume-backed servers).  Nova's others are left out where minivan refuses what
# they promise: accelerators, PCI NUMA affinity, sound, virtual IOMMUs, packed virtqueues,
# emulated architectures.
PLACEMENT_TRAITS = (
    "COMPUTE_NODE", "HW_ARCH_X86_64", "COMPUTE_ARCH_X86_64", "COMPUTE_DEVICE_TAGGING", "COMPUTE_NET_ATTACH_INTERFACE",
    "COMPUTE_NET_ATTACH_INTERFACE_WITH_TAG", "COMPUTE_VOLUME_ATTACH_WITH_TAG",
    "COMPUTE_VOLUME_EXTEND", "COMPUTE_VOLUME_MULTI_ATTACH", "COMPUTE_TRUSTED_CERTS",
    "COMPUTE_RESCUE_BFV", "COMPUTE_IMAGE_TYPE_AKI", "COMPUTE_IMAGE_TYPE_AMI",
    "COMPUTE_IMAGE_TYPE_ARI", "COMPUTE_IMAGE_TYPE_ISO", "COMPUTE_IMAGE_TYPE_QCOW2",
    "COMPUTE_IMAGE_TYPE_RAW", "COMPUTE_STORAGE_BUS_VIRTIO", "COMPUTE_STORAGE_BUS_IDE",
    "COMPUTE_STORAGE_BUS_SCSI", "COMPUTE_STORAGE_BUS_SATA", "COMPUTE_STORAGE_BUS_USB",
    "COMPUTE_STORAGE_BUS_FDC", "COMPUTE_NET_VIF_MODEL_VIRTIO", "COMPUTE_NET_VIF_MODEL_E1000",
    "COMPUTE_NET_VIF_MODEL_E1000E", "COMPUTE_NET_VIF_MODEL_NE2K_PCI",
    "COMPUTE_NET_VIF_MODEL_PCNET", "COMPUTE_NET_VIF_MODEL_RTL8139",
    "COMPUTE_NET_VIF_MODEL_VMXNET3", "COMPUTE_NET_VIF_MODEL_SPAPR_VLAN",
    "COMPUTE_GRAPHICS_MODEL_VGA", "COMPUTE_GRAPHICS_MODEL_CIRRUS",
    "COMPUTE_GRAPHICS_MODEL_VIRTIO", "COMPUTE_GRAPHICS_MODEL_BOCHS",
    "COMPUTE_GRAPHICS_MODEL_NONE", "COMPUTE_GRAPHICS_MODEL_QXL",
    "COMPUTE_GRAPHICS_MODEL_VMVGA",
)
HOST_DEPENDENT_TRAITS = ("COMPUTE_SECURITY_UEFI_SECURE_BOOT", "COMPUTE_SECURITY_TPM_1_2",
                         "COMPUTE_SECURITY_TPM_2_0", "HW_CPU_HYPERTHREADING")
STATUS_DISABLED_TRAIT = "COMPUTE_STATUS_DISABLED"
# libvirt's x86 CPU feature names that have a trait, as Nova maps them: the feature's name in
# capitals without "-" and ".", or the trait(s) after "="
CPU_FEATURE_TRAITS = {
    feature: ["HW_CPU_X86_" + t for t in (traits.split(",") if traits else [
        feature.upper().replace("-", "").replace(".", "")])]
    for feature, _, traits in (item.partition("=") for item in (
        "3dnow abm aes=AESNI amx-bf16 amx-int8 amx-tile avx avx2 avx512bw avx512cd "
        "avx512dq avx512er avx512f avx512pf avx512vl avx512vnni avx512vbmi avx512ifma "
        "avx512vbmi2 avx512bitalg vaes=AVX512VAES gfni=AVX512GFNI "
        "vpclmulqdq=AVX512VPCLMULQDQ avx512-vpopcntdq bmi1=BMI bmi2 pclmuldq=CLMUL f16c "
        "fma=FMA3 fma4 mmx mpx sha-ni=SHA sse sse2 sse3 sse4.1 sse4.2 sse4a ssse3 "
        "svm=SVM,AMD_SVM tbm vmx=VMX,INTEL_VMX xop").split())}


def cpu_feature_traits(features):
    """The HW_CPU_X86_* traits of a set of libvirt CPU feature names."""
    return {t for f in features for t in CPU_FEATURE_TRAITS.get(f, ())}


def host_cpu_features(driver):
    """The libvirt feature names of a host's CPU, its model's included (libvirt's
    baselineCPU, expanded), where guests get the host's CPU as Nova reports it: KVM with
    --cpu-mode host-model or host-passthrough.  Empty elsewhere (under TCG Nova reports
    none either) or where libvirt cannot say."""
    if driver.simulated or driver.conn is None or driver.virt_type != "kvm" or \
            driver.cpu_mode not in ("", "host-model", "host-passthrough"):
        return set()
    caps = driver._call("reading the host's capabilities", driver.conn.getCapabilities)
    cpu = re.search(r"<host>.*?(<cpu>.*?</cpu>)", caps, re.S)
    if cpu is None:
        return set()
    expand_features = 1             # VIR_CONNECT_BASELINE_CPU_EXPAND_FEATURES
    expanded = driver._call("expanding the host's CPU features", driver.conn.baselineCPU,
                            [cpu.group(1)], expand_features)
    return {name for policy, name in re.findall(
        r"<feature\s+policy='([^']*)'\s+name='([^']+)'", expanded or "")
        if policy != "disable"}


class PlacementError(ServiceError):
    """Placement refused a call: its status, its error code (e.g.
    placement.concurrent_update) and its message."""

    def __init__(self, status, raw):
        code, detail = None, raw
        try:
            error = json.loads(raw)["errors"][0]
            code, detail = error.get("code"), error.get("detail") or error.get("title")
        except (ValueError, KeyError, IndexError, TypeError):
            pass
        super().__init__(status, detail)
        self.code = code


class Placement:
    """Placement's API as minivan's service user."""

    def __init__(self, url, auth):
        self.url = url.rstrip("/")
        self.auth = auth

    def call(self, method, path, body=None, version=PLACEMENT_VERSION):
        for attempt in (0, 1):
            headers = {"X-Auth-Token": self.auth.service_token_value(force=attempt == 1),
                       "OpenStack-API-Version": "placement " + version}
            try:
                return call_service("placement service", self.url + path, method, headers,
                                    body, PlacementError,
                                    lambda raw, status: raw.decode("utf-8", "replace"))
            except PlacementError as e:
                if e.status != 401 or attempt:
                    raise
        raise PlacementError(401, "minivan's service token was refused by Placement")

    def get_or_none(self, path):
        try:
            return self.call("GET", path)
        except PlacementError as e:
            if e.status == 404:
                return None
            raise

    def allocations(self, consumer):
        """(allocations {rp: resources}, consumer generation or None) of a consumer."""
        doc = self.call("GET", f"/allocations/{consumer}")
        return ({rp: a["resources"] for rp, a in doc.get("allocations", {}).items()},
                doc.get("consumer_generation"))


def provider_uuid(host):
    """A compute host's resource provider: its hypervisor's uuid (2.53's id)."""
    return str(uuid.uuid5(IMAGE_NAMESPACE, "hypervisor:" + host))


def host_inventory(app, host):
    """The inventories of a compute host's provider, as Nova's libvirt driver reports them;
    None while its libvirt does not answer."""
    driver = app.drivers.get(host)
    if driver is None or not driver.available:
        return None
    res = host_resources(app, host)
    if not res["memory_mb"]:
        return None
    conf = app.conf

    def inventory(total, ratio=1.0, reserved=0):
        return {"total": total, "reserved": reserved, "min_unit": 1, "max_unit": total,
                "step_size": 1, "allocation_ratio": float(ratio)}
    shared = shared_vcpus(conf, res)
    inv = {}
    if shared:
        inv["VCPU"] = inventory(shared, conf["cpu_allocation_ratio"])
    if conf.get("cpu_dedicated_set"):
        inv["PCPU"] = inventory(len(conf["cpu_dedicated_set"]))
    inv["MEMORY_MB"] = inventory(res["memory_mb"], conf["ram_allocation_ratio"],
                                 conf["reserved_host_memory_mb"])
    if res["local_gb"]:
        inv["DISK_GB"] = inventory(res["local_gb"], conf["disk_allocation_ratio"],
                                   -(-int(conf["reserved_host_disk_mb"]) // 1024))
    return inv


def host_traits(app, host, disabled):
    """The traits of a compute host's provider: Nova's libvirt driver's that apply, Secure
    Boot's where the host has the firmware, the emulated TPM versions it offers
    (--swtpm-enabled), hyperthreading's where its cores have sibling threads, and
    COMPUTE_STATUS_DISABLED while its compute service is disabled."""
    traits = set(PLACEMENT_TRAITS)
    driver = app.drivers.get(host)
    try:
        offers = driver.guest_host() if driver is not None and driver.available else None
        cells = driver.numa_cells() if offers is not None else None
    except (DriverError, Unavailable, NumaConfigError):
        offers = cells = None
    if offers is not None and offers.secure_boot:
        traits.add("COMPUTE_SECURITY_UEFI_SECURE_BOOT")
    if offers is not None and offers.tpm:
        traits |= {"COMPUTE_SECURITY_TPM_" + v.replace(".", "_") for v in offers.tpm[0]}
    if any(len(siblings) > 1 for cell in cells or () for siblings in cell["siblings"]):
        traits.add("HW_CPU_HYPERTHREADING")
    if disabled:
        traits.add(STATUS_DISABLED_TRAIT)
    return traits


def host_aggregates(app, host):
    return sorted(a["uuid"] for a in app.store.data.get("aggregates", {}).values()
                  if host in a["hosts"])


def flavor_resources(app, server, flavor=None, numa=None):
    """What a server with this flavor takes from its host's provider, as Nova's request:
    VCPU (or PCPU for dedicated CPUs), MEMORY_MB and DISK_GB, with the flavor's
    resources:RC overrides."""
    placed = placed_flavor(dict(server, flavor=flavor or server["flavor"]), numa)
    flavor = flavor or server["flavor"]
    res = {"VCPU": placed["vcpus"], "PCPU": flavor["vcpus"] - placed["vcpus"],
           "MEMORY_MB": placed["ram"], "DISK_GB": placed["disk"]}
    for key, value in (flavor.get("extra_specs") or {}).items():
        if key.startswith("resources:"):
            try:
                res[key.split(":", 1)[1]] = int(value)
            except ValueError:
                pass
    return {rc: amount for rc, amount in res.items() if amount > 0}


def port_request_groups(port_id, request):
    """[(group id, {"resources", "required"})] and the same_subtree list of a Neutron port's
    resource_request: the request groups of Neutron's port-resource-request-groups format,
    or the port's one group (its id the port's) of the format before it."""
    request = request or {}
    if "request_groups" in request:
        return ([(g["id"], g) for g in request["request_groups"] if g.get("resources")],
                request.get("same_subtree") or [])
    return ([(port_id, request)] if request.get("resources") else []), []


def port_requests(app, server):
    """{port id: resource_request} of the Neutron ports a server has or will be given."""
    found = {p["id"]: p.get("resource_request") for p in server.get("ports", [])
             if p.get("neutron")}
    wanted = [r["port_id"] for r in server.get("requested_networks") or []
              if r.get("port_id") and r["port_id"] not in found]
    if wanted and app.network is not None:
        for port_id in wanted:
            try:
                port = app.network.port(port_id)
            except Unavailable:
                port = None
            found[port_id] = (port or {}).get("resource_request")
    return {k: v for k, v in found.items() if v}


def candidate_query(app, server, flavor, numa, requested=None, ports=None):
    """The GET /allocation_candidates query of Nova's scheduler for a server with this
    flavor: its resources, the flavor's trait:T (required/forbidden) and granular
    resourcesN:/traitN: groups, the ports' resource requests, and never a disabled host."""
    specs = flavor.get("extra_specs") or {}
    groups = {"": {"resources": flavor_resources(app, server, flavor, numa), "required": []}}
    for key, value in sorted(specs.items()):
        match = re.fullmatch(r"(resources|trait)([A-Za-z0-9_-]*):(.+)", key)
        if not match:
            continue
        kind, suffix, name = match.groups()
        group = groups.setdefault(suffix, {"resources": {}, "required": []})
        if kind == "resources" and suffix:
            try:
                group["resources"][name] = int(value)
            except ValueError:
                pass
        elif kind == "trait" and value in ("required", "forbidden"):
            group["required"].append(name if value == "required" else "!" + name)
    subtrees = []
    for port_id, request in sorted((ports or {}).items()):
        port_groups, same = port_request_groups(port_id, request)
        for group_id, group in port_groups:      # each group its own provider, as Nova's
            groups[group_id] = {"resources": dict(group["resources"]),
                                "required": list(group.get("required") or [])}
        if len(same) > 1:
            subtrees.append(",".join(same))
    query = [("limit", "1000"), ("root_required", "!" + STATUS_DISABLED_TRAIT)]
    query += [("same_subtree", same) for same in subtrees]
    for suffix, group in groups.items():
        resources = {rc: n for rc, n in group["resources"].items() if n > 0}
        if resources:
            query.append(("resources" + suffix, ",".join(
                f"{rc}:{n}" for rc, n in sorted(resources.items()))))
        if group["required"]:
            query.append(("required" + suffix, ",".join(group["required"])))
    if len(groups) > 2 or (len(groups) == 2 and "" in groups):
        query.append(("group_policy", specs.get("group_policy", "none")))
    if requested is not None:
        query.append(("in_tree", provider_uuid(requested)))
    return query


PLACEMENT_FIELDS = ("host", "migration_source", "flavor", "new_flavor", "old_flavor",
                    "move_consumer", "numa_topology", "old_numa_topology", "placement_claims",
                    "volume_backed")


def placement_view(server):
    """What of a server record decides its allocations in Placement."""
    return tuple(server.get(k) for k in PLACEMENT_FIELDS) + (
        server.get("vm_state") == "deleted",)


class PlacementSync:
    """Keeps Placement in step with minivan: the hosts' providers, and each server's
    allocations (a worker writes the allocations a changed server record says it holds)."""

    def __init__(self, app):
        self.app = app
        self.pending = {}               # server id -> move consumers to look at too
        self.cond = threading.Condition()
        self.wake = threading.Event()   # the providers need a look (services, aggregates)
        self.reported = {}              # host -> (inventory, traits, aggregates) written
        self.cpu_traits = {}            # host -> (its libvirt connection, its CPU's traits)
        app.store.watchers.append(self.watch)

    @property
    def client(self):
        return self.app.placement

    # -- what the store's changes mean ------------------------------------------------
    def watch(self, op, data):
        path = op[1]
        if path[0] in ("aggregates", "services"):
            self.wake.set()
        if path[0] != "servers" or len(path) < 2:
            return
        old = data["servers"].get(path[1]) or {}
        new = op[2] if op[0] == "set" and len(path) == 2 else {}
        if len(path) == 2 and placement_view(old) == placement_view(new):
            return                      # nothing Placement holds for it changed
        consumers = {c for c in (old.get("move_consumer"), new.get("move_consumer")) if c}
        with self.cond:
            self.pending.setdefault(path[1], set()).update(consumers)
            self.cond.notify()

    # -- providers --------------------------------------------------------------------
    def report_providers(self):
        """Create or bring up to date every compute host's provider; returns the hosts
        whose provider was written."""
        placement = self.client
        if placement is None:
            return []
        services = {r["host"]: r for r in service_records(self.app)
                    if r["binary"] == "nova-compute"}
        written = []
        for host in self.app.compute_host_names():
            try:
                if self.report_host(placement, host, services.get(host)):
                    written.append(host)
            except (PlacementError, Unavailable) as e:
                LOG.warning("placement: reporting compute host %s failed: %s", host,
                            getattr(e, "message", e))
        return written

    def report_host(self, placement, host, service):
        rp = provider_uuid(host)
        inventory = host_inventory(self.app, host)
        last = self.reported.get(host)
        inventory = inventory if inventory is not None else (last or (None,))[0]
        traits = host_traits(self.app, host, bool(service and service["disabled"])) | \
            self.host_cpu_traits(host)
        aggregates = host_aggregates(self.app, host)
        if last == (inventory, traits, aggregates):
            return False
        provider = placement.get_or_none(f"/resource_providers/{rp}")
        if provider is None:
            placement.call("POST", "/resource_providers", {"name": host,
                                                                      "uuid": rp})
            LOG.info("placement: compute host %s is resource provider %s", host, rp)
        if inventory is not None and (last is None or last[0] != inventory):
            current = placement.call("GET", f"/resource_providers/{rp}/inventories")
            if current["inventories"] != inventory:
                placement.call("PUT", f"/resource_providers/{rp}/inventories",
                               {"resource_provider_generation":
                                current["resource_provider_generation"],
                                "inventories": inventory})
        if last is None or last[1] != traits:
            current = placement.call("GET", f"/resource_providers/{rp}/traits")
            # traits others put there (other than the ones minivan decides) are kept
            own = set(PLACEMENT_TRAITS) | {STATUS_DISABLED_TRAIT} | set(
                HOST_DEPENDENT_TRAITS) | cpu_feature_traits(CPU_FEATURE_TRAITS)
            wanted = (set(current["traits"]) - own) | traits
            if set(current["traits"]) != wanted:
                placement.call("PUT", f"/resource_providers/{rp}/traits",
                               {"resource_provider_generation":
                                current["resource_provider_generation"],
                                "traits": sorted(wanted)})
        if last is None or last[2] != aggregates:
            current = placement.call("GET", f"/resource_providers/{rp}/aggregates")
            if sorted(current["aggregates"]) != aggregates:
                placement.call("PUT", f"/resource_providers/{rp}/aggregates",
                               {"resource_provider_generation":
                                current["resource_provider_generation"],
                                "aggregates": aggregates})
        self.reported[host] = (inventory, traits, aggregates)
        return True

    def host_cpu_traits(self, host):
        """A host's CPU feature traits, read once per libvirt connection."""
        driver = self.app.drivers.get(host)
        if driver is None or not driver.available:
            return set()
        known = self.cpu_traits.get(host)
        if known is None or known[0] is not driver.conn:
            try:
                known = (driver.conn, cpu_feature_traits(host_cpu_features(driver)))
            except (DriverError, Unavailable) as e:
                LOG.warning("placement: the CPU features of compute host %s cannot be read: "
                            "%s", host, e)
                return set()
            self.cpu_traits[host] = known
        return known[1]

    # -- allocations ------------------------------------------------------------------
    def wanted(self, server_id, move_consumers=()):
        """{consumer: {rp: resources}} a server's record says it holds: its flavor (the new
        one while it resizes) on its host's provider, and the old one on its source's under
        its move's consumer until the move ends; the candidate it was given is kept where
        it still matches."""
        with self.app.store.reading():
            server = self.app.store.data["servers"].get(server_id)
            server = json.loads(json.dumps(server)) if server else None
        wanted = {server_id: {}}
        wanted.update({c: {} for c in move_consumers})
        if server is None or server["vm_state"] == "deleted":
            return wanted, server
        if server.get("move_consumer"):
            wanted[server["move_consumer"]] = {}
        claimed = server.get("placement_claims") or {}

        def on(host, flavor, numa):
            rp = provider_uuid(host)
            derived = {rp: flavor_resources(self.app, server, flavor, numa)}
            given = claimed.get(host)
            if given and given.get(rp) == derived[rp]:
                return given
            return derived
        if server.get("host"):
            wanted[server_id] = on(server["host"], server.get("new_flavor") or
                                   server["flavor"], server.get("numa_topology"))
        source = server.get("migration_source")
        if source and source != server.get("host") and server.get("move_consumer"):
            wanted[server["move_consumer"]] = on(source, server.get("old_flavor") or
                                                 server["flavor"],
                                                 server.get("old_numa_topology"))
        return wanted, server

    def write(self, server_id, move_consumers=(), why="changed"):
        """Make Placement hold what the server's record says; returns what it changed
        ({consumer: (before, after)}).  Holds the scheduler's lock, so that it never
        writes between a claim and the record of it."""
        placement = self.client
        if placement is None:
            return {}
        for attempt in range(4):
            with self.app.scheduler_lock:
                wanted, server = self.wanted(server_id, move_consumers)
                current = {c: placement.allocations(c) for c in wanted}
                changed = {c: (current[c][0], a) for c, a in wanted.items()
                           if current[c][0] != a}
                if not changed:
                    return {}
                try:
                    if server is None:      # its record is gone: so are its allocations
                        for consumer in changed:
                            placement.call("DELETE", f"/allocations/{consumer}")
                    else:
                        placement.call("POST", "/allocations", {
                            consumer: allocation_body(server, allocations, current[
                                consumer][1], consumer == server_id)
                            for consumer, (_, allocations) in changed.items()})
                except PlacementError as e:
                    if e.status in (404, 409) and attempt < 3:    # moved meanwhile: again
                        LOG.info("placement: server %s changed in Placement while it was "
                                 "written (%s): reading it again", server_id, e.message)
                        continue
                    raise
            for consumer, (before, after) in changed.items():
                LOG.info("placement: %s allocations of %s %s: %s -> %s", why,
                         "server" if consumer == server_id else "migration", consumer,
                         before or "none", after or "none")
            return changed
        return {}

    def run_pending(self):
        with self.cond:
            pending, self.pending = self.pending, {}
        for server_id, consumers in pending.items():
            try:
                self.write(server_id, consumers)
            except (PlacementError, Unavailable) as e:
                LOG.warning("placement: writing the allocations of server %s failed: %s",
                            server_id, getattr(e, "message", e))
                with self.cond:
                    self.pending.setdefault(server_id, set()).update(consumers)

    def heal(self):
        """heal_allocations and audit: every server's allocations on the compute hosts'
        providers as its record says, and what minivan's gone servers and ended migrations
        left there removed.  Returns {consumer: (before, after)} of what it mended."""
        placement = self.client
        if placement is None:
            return {}
        held = collections.defaultdict(dict)        # consumer -> {root rp: resources}
        roots = set()
        for host in self.app.compute_host_names():
            rp = provider_uuid(host)
            try:
                doc = placement.get_or_none(f"/resource_providers/{rp}/allocations")
            except (PlacementError, Unavailable):
                continue
            if doc is None:             # the provider is gone: made again at the next report
                self.reported.pop(host, None)
                self.wake.set()
                continue
            roots.add(rp)
            for consumer, allocation in doc["allocations"].items():
                held[consumer][rp] = allocation["resources"]
        data = self.app.store.data
        with self.app.store.reading():
            servers = [(s["id"], s.get("move_consumer")) for s in data["servers"].values()
                       if s["vm_state"] != "deleted"]
            migrations = {m["uuid"] for m in data.get("migrations", {}).values()}
        mended, seen = {}, set()
        for server_id, move in servers:
            wanted, _ = self.wanted(server_id, {move} if move else ())
            seen.update(wanted)
            if all({rp: r for rp, r in allocations.items() if rp in roots} ==
                   held.get(consumer, {}) for consumer, allocations in wanted.items()):
                continue
            try:
                mended.update(self.write(server_id, {move} if move else (), why="healed"))
            except (PlacementError, Unavailable) as e:
                LOG.warning("placement: healing server %s failed: %s", server_id,
                            getattr(e, "message", e))
        for consumer in set(held) - seen:
            try:
                if consumer in data["servers"]:
                    mended.update(self.write(consumer, why="healed"))
                elif consumer in migrations:
                    mended.update(self.remove(placement, consumer))
                else:
                    LOG.warning("placement: consumer %s holds resources of minivan's compute "
                                "hosts but is none of its servers or migrations: left alone",
                                consumer)
            except (PlacementError, Unavailable) as e:
                LOG.warning("placement: healing consumer %s failed: %s", consumer,
                            getattr(e, "message", e))
        return mended

    def remove(self, placement, consumer):
        """Remove the allocations of an ended migration."""
        before, _ = placement.allocations(consumer)
        try:
            placement.call("DELETE", f"/allocations/{consumer}")
        except PlacementError as e:
            if e.status != 404:
                raise
            return {}
        LOG.info("placement: healed allocations of migration %s: %s -> none", consumer,
                 before)
        return {consumer: (before, {})}

    def loop(self, stop):
        """Providers at start and whenever minivan's view of them changes (their resources,
        a service disabled, an aggregate); allocations as servers change; every
        --placement-interval seconds a look at the providers and a heal."""
        interval = max(1, self.app.conf["placement_interval"])
        next_full = 0.0
        while not stop.is_set():
            if self.client is not None:
                now = time.monotonic()
                if self.wake.is_set() or now >= next_full:
                    self.wake.clear()
                    self.report_providers()
                if now >= next_full:
                    mended = self.heal()
                    if mended:
                        LOG.info("placement: healed the allocations of %d consumers",
                                 len(mended))
                    next_full = now + interval
                self.run_pending()
            else:
                with self.cond:
                    self.pending.clear()
            with self.cond:
                if not self.pending:
                    self.cond.wait(timeout=0.5)


def allocation_body(server, allocations, generation, instance=True):
    """One consumer's part of a POST /allocations body."""
    return {"allocations": {rp: {"resources": r} for rp, r in allocations.items()},
            "consumer_generation": generation, "project_id": server["project_id"],
            "user_id": server["user_id"],
            "consumer_type": "INSTANCE" if instance else "MIGRATION"}


def claim_candidate(app, server, host, allocations, moving):
    """Claim a candidate (allocations {rp: resources}) on host for a server; a move
    (moving, to another host) passes the server's allocations on its source to a new
    consumer, its migration's, in the same call, as Nova's conductor.  Returns (that
    consumer or None, what it holds); PlacementError when Placement refuses (the candidate
    was taken meanwhile).  A consumer changed by someone else between the read and the
    write is read again, as Nova's report client does."""
    placement = app.placement
    for attempt in range(4):
        current, generation = placement.allocations(server["id"])
        body = {server["id"]: allocation_body(server, allocations, generation)}
        move, held = None, {}
        if moving and server.get("host") and host != server["host"]:
            move = str(uuid.uuid4())
            held = current or {provider_uuid(server["host"]): flavor_resources(
                app, server, None, server.get("numa_topology"))}
            body[move] = allocation_body(server, held, None, instance=False)
        try:
            placement.call("POST", "/allocations", body)
        except PlacementError as e:
            if e.code == "placement.concurrent_update" and attempt < 3:
                LOG.info("placement: server %s changed in Placement while it was claimed: "
                         "reading it again", server["id"])
                continue
            raise
        return move, held
    raise PlacementError(409, "the claim kept conflicting")


def placement_candidates(app, server, flavor, requested=None, ports=None):
    """{host: [(allocations {rp: resources}, mappings {group: [rp]})]} of Placement's
    allocation candidates for a server with this flavor (and its ports' resource requests,
    ports), by the compute host whose provider tree they are in."""
    try:
        request = numa_request(flavor, image_meta(server.get("image_properties") or {}))
    except BadRequest:
        request = None
    numa = request and {"pcpu": bool(app.conf.get("cpu_dedicated_set")),
                        "cells": request["cells"]}
    query = candidate_query(app, server, flavor, numa, requested, ports)
    doc = app.placement.call("GET", "/allocation_candidates?" +
                             urllib.parse.urlencode(query))
    roots = {provider_uuid(h): h for h in app.compute_host_names()}
    summaries = doc.get("provider_summaries", {})
    found = collections.defaultdict(list)
    for candidate in doc.get("allocation_requests", []):
        allocations = {rp: a["resources"] for rp, a in candidate["allocations"].items()}
        hosts = {roots.get((summaries.get(rp) or {}).get("root_provider_uuid"),
                           roots.get(rp)) for rp in allocations}
        if len(hosts) == 1 and None not in hosts:
            found[hosts.pop()].append((allocations, candidate.get("mappings") or {}))
    return found


def port_allocations(ports, mappings):
    """{port id: the binding profile's "allocation"} of a claim: for each port with a
    resource request, the provider of each of its groups ({group id: rp}), or for a port
    of the format before groups, the provider of its one group."""
    found = {}
    for port_id, request in (ports or {}).items():
        groups, _ = port_request_groups(port_id, request)
        chosen = {g: (mappings.get(g) or [None])[0] for g, _ in groups}
        if "request_groups" in request:
            found[port_id] = chosen
        elif chosen:
            found[port_id] = chosen[port_id]
    return found


def place_with_placement(app, server, flavor, requested, exclude, force, moving, numa_out):
    """schedule() with Placement: candidates first, then minivan's filters and weighers,
    then the claim; a claim Placement refuses tries the next host.  Returns (host, changes
    for the server's record)."""
    tried = set(exclude)
    ports = port_requests(app, server)
    for _ in range(max(3, len(app.compute_host_names()))):
        if force:
            host = schedule(app, server, flavor, requested=requested, exclude=tried,
                            force=True, numa_out=numa_out)
            numa = numa_out.get("topology")
            claim, mappings = {provider_uuid(host): flavor_resources(app, server, flavor,
                                                                     numa)}, {}
        else:
            try:
                candidates = placement_candidates(app, server, flavor, requested, ports)
            except PlacementError as e:
                LOG.warning("scheduling server %s: Placement refused the candidates query: "
                            "%s", server["id"], e.message)
                raise NoValidHost(NO_VALID_HOST) from None
            without = {h for h in app.compute_host_names() if h not in candidates}
            host = schedule(app, server, flavor, requested=requested,
                            exclude=tried | without, numa_out=numa_out)
            claim, mappings = candidates[host][0]
        try:
            move, before = claim_candidate(app, server, host, claim, moving)
        except PlacementError as e:
            LOG.info("scheduling server %s: Placement refused the claim on %s (%s): next "
                     "host", server["id"], host, e.message)
            tried.add(host)
            if force:
                raise NoValidHost(NO_VALID_HOST) from None
            continue
        # the ports' providers by host: a revert binds them to the source's again
        changes = {"placement_claims": {host: claim},
                   "port_allocations": {host: port_allocations(ports, mappings)}}
        if move is None:
            return host, changes
        changes["placement_claims"][server["host"]] = before
        changes["port_allocations"][server["host"]] = (server.get("port_allocations") or {
            }).get(server["host"], {})
        return host, dict(changes, move_consumer=move)
    raise NoValidHost(NO_VALID_HOST)


def placement_loop(app, stop):
    app.placement_sync.loop(stop)


# § 34 API: simple tenant usage --------------------------------------------------------

def usage_period(req, query):
    """(start, end) of a usage query: ISO times, default the last day up to now."""
    now = req.app.clock.now()
    def parse(name, default):
        if name not in query:
            return default
        text = query[name][-1]
        try:
            value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(f"Invalid {name} time: {text}") from None
        if value.tzinfo is not None:
            value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return value
    start, end = parse("start", now - datetime.timedelta(days=1)), parse("end", now)
    if start > end:
        raise BadRequest("Invalid start time. The start time cannot occur after the end time.")
    return start, end


def server_usage(server, start, end, now):
    """One server's usage in [start, end], or None when it did not exist then."""
    launched = parse_isotime(server["launched_at"] or server["created_at"])
    ended = parse_isotime(server["terminated_at"]) if server.get("terminated_at") else None
    if launched > end or (ended and ended < start):
        return None
    begin, finish = max(launched, start), min(ended or end, end)
    hours = max((finish - begin).total_seconds(), 0) / 3600.0
    flavor = server["flavor"]
    state = server["vm_state"] if server["vm_state"] != "deleted" else "terminated"
    return {"instance_id": server["id"], "name": server["name"], "hours": hours,
            "memory_mb": flavor["ram"], "local_gb": flavor["disk"] + flavor["ephemeral"],
            "vcpus": flavor["vcpus"], "tenant_id": server["project_id"], "flavor": flavor["name"],
            "started_at": isotime_us(launched), "ended_at": isotime_us(ended) if ended else None,
            "state": state, "uptime": int((min(ended or now, now) - launched).total_seconds())}


def usage_page(req, start, end, project_id=None):
    """[(server, its usage)] of the servers (of one project) that existed in [start,
    end], in Nova's order (created_at, id); from 2.40 one page of them, by instance
    (marker: an instance id), with the marker of the next page or None."""
    now = req.app.clock.now()
    servers = sorted((s for s in req.store.data["servers"].values()
                      if project_id is None or s["project_id"] == project_id),
                     key=lambda s: (s["created_at"], s["id"]))
    pairs = [(s, u) for s in servers for u in [server_usage(s, start, end, now)] if u]
    if not req.since("2.40"):
        return pairs, None
    return paginate(req, pairs, lambda pair: pair[0]["id"])


def tenant_usage(project_id, usages, start, end, detailed):
    body = {"tenant_id": project_id, "start": isotime_us(start), "stop": isotime_us(end),
            "total_hours": sum(u["hours"] for u in usages),
            "total_vcpus_usage": sum(u["hours"] * u["vcpus"] for u in usages),
            "total_memory_mb_usage": sum(u["hours"] * u["memory_mb"] for u in usages),
            "total_local_gb_usage": sum(u["hours"] * u["local_gb"] for u in usages)}
    if detailed:
        body["server_usages"] = usages
    return body


def simple_tenant_usage_index(req):
    """GET /os-simple-tenant-usage"""
    allowed = ["start", "end", "detailed"] + (["limit", "marker"] if req.since("2.40") else [])
    query = validate_query(req, allowed, strict_since="2.75")
    start, end = usage_period(req, query)
    detailed = bool_from_string(query.get("detailed", ["0"])[-1])
    page, marker = usage_page(req, start, end)
    projects = {}                       # in the order of each project's first server
    for server, usage in page:
        projects.setdefault(server["project_id"], []).append(usage)
    result = {"tenant_usages": [tenant_usage(project_id, usages, start, end, detailed)
                                for project_id, usages in projects.items()]}
    if marker is not None:
        result["tenant_usages_links"] = req.next_link("os-simple-tenant-usage", marker)
    return 200, result


def simple_tenant_usage_show(req):
    """GET /os-simple-tenant-usage/{id}"""
    allowed = ["start", "end"] + (["limit", "marker"] if req.since("2.40") else [])
    query = validate_query(req, allowed, strict_since="2.75")
    project_id = req.params["id"]
    authorize(req, "os_compute_api:os-simple-tenant-usage:show", "reader", project_id)
    start, end = usage_period(req, query)
    page, marker = usage_page(req, start, end, project_id)
    if not page:
        return 200, {"tenant_usage": {}}
    result = {"tenant_usage": tenant_usage(project_id, [u for _, u in page], start, end,
                                           True)}
    if marker is not None:
        result["tenant_usage_links"] = req.next_link(
            "os-simple-tenant-usage/" + project_id, marker)
    return 200, result


# § 35 API: aggregates -----------------------------------------------------------------
#
# Host aggregates over this one host; an aggregate's availability_zone metadata becomes the
# zone of its hosts, as in Nova.

def aggregate_view(req, agg):
    view = {"availability_zone": agg["metadata"].get("availability_zone"),
            "created_at": agg["created_at"], "deleted": False, "deleted_at": None,
            "hosts": list(agg["hosts"]), "id": agg["id"], "metadata": dict(agg["metadata"]),
            "name": agg["name"], "updated_at": agg.get("updated_at")}
    if req.since("2.41"):
        view["uuid"] = agg["uuid"]
    return view


def host_zone(app, host=None):
    """A host's availability zone: its aggregates' availability_zone, else the default."""
    host = host or app.conf["host"]
    for agg in sorted(app.store.data.get("aggregates", {}).values(), key=lambda a: a["id"]):
        if host in agg["hosts"] and agg["metadata"].get("availability_zone"):
            return agg["metadata"]["availability_zone"]
    return app.conf["availability_zone"]


def find_aggregate(req, data, aggregate_id):
    agg = data.get("aggregates", {}).get(str(aggregate_id))
    if agg is None:
        raise NotFound(f"Aggregate {aggregate_id} could not be found.")
    return agg


def aggregate_zone_schema(req):
    return {"type": ["string", "null"], "minLength": 1, "maxLength": 255}


def check_zone_name(zone):
    if zone is not None and (":" in zone or zone != zone.strip()):
        raise BadRequest("Invalid input received: Availability zone name must not contain ':' "
                         "or start or end with spaces.")


def aggregates_index(req):
    """GET /os-aggregates"""
    validate_query(req, (), strict_since="2.102")
    aggs = sorted(req.store.data.get("aggregates", {}).values(), key=lambda a: a["id"])
    return 200, {"aggregates": [aggregate_view(req, a) for a in aggs]}


def aggregates_show(req):
    """GET /os-aggregates/{id}"""
    validate_query(req, (), strict_since="2.102")
    return 200, {"aggregate": aggregate_view(req, find_aggregate(req, req.store.data,
                                                                  req.params["id"]))}


def aggregates_create(req):
    """POST /os-aggregates"""
    spec = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["aggregate"], "properties": {"aggregate": {
                                   "type": "object", "additionalProperties": False,
                                   "required": ["name"], "properties": {
                                       "name": server_name_schema(req),
                                       "availability_zone": aggregate_zone_schema(req)}}}})
    spec = spec["aggregate"]
    check_zone_name(spec.get("availability_zone"))
    created = []

    def plan(data):
        aggs = data.get("aggregates", {})
        if any(a["name"] == spec["name"] for a in aggs.values()):
            raise Conflict(f"Aggregate {spec['name']} already exists.")
        number = data["counters"].get("aggregate", 0) + 1
        metadata = {"availability_zone": spec["availability_zone"]} \
            if spec.get("availability_zone") else {}
        agg = {"id": number, "uuid": str(uuid.uuid4()), "name": spec["name"], "hosts": [],
               "metadata": metadata, "created_at": isotime_us(req.app.clock.now()),
               "updated_at": None}
        created.append(agg)
        return [["set", ["aggregates", str(number)], agg],
                ["set", ["counters", "aggregate"], number]]

    req.store.transaction(plan)
    view = aggregate_view(req, created[0])
    for key in ("hosts", "metadata"):
        view.pop(key)
    return 200, {"aggregate": view}


def aggregate_change(req, change):
    """Apply change(aggregate, data) -> new aggregate; answer the aggregate."""
    def plan(data):
        agg = find_aggregate(req, data, req.params["id"])
        new = change(dict(agg), data)
        new["updated_at"] = isotime_us(req.app.clock.now())
        changed.append(new)
        return [["set", ["aggregates", str(agg["id"])], new]]
    changed = []
    req.store.transaction(plan)
    return 200, {"aggregate": aggregate_view(req, changed[0])}


def aggregates_update(req):
    """PUT /os-aggregates/{id}"""
    spec = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["aggregate"], "properties": {"aggregate": {
                                   "type": "object", "additionalProperties": False,
                                   "minProperties": 1, "properties": {
                                       "name": {"type": "string", "minLength": 1,
                                                "maxLength": 255},
                                       "availability_zone": aggregate_zone_schema(req)}}}})
    spec = spec["aggregate"]
    if not spec:
        raise BadRequest("The request body must name 'name' or 'availability_zone'.")
    check_zone_name(spec.get("availability_zone"))

    def change(agg, data):
        if "name" in spec and any(a["name"] == spec["name"] and a["id"] != agg["id"]
                                  for a in data.get("aggregates", {}).values()):
            raise Conflict(f"Aggregate {spec['name']} already exists.")
        if "name" in spec:
            agg["name"] = spec["name"]
        if "availability_zone" in spec:
            metadata = dict(agg["metadata"])
            if spec["availability_zone"]:
                metadata["availability_zone"] = spec["availability_zone"]
            else:
                metadata.pop("availability_zone", None)
            agg["metadata"] = metadata
        return agg

    return aggregate_change(req, change)


def aggregates_delete(req):
    """DELETE /os-aggregates/{id}"""
    def plan(data):
        agg = find_aggregate(req, data, req.params["id"])
        if agg["hosts"]:
            raise BadRequest(f"Cannot remove aggregate {agg['id']}: it still has hosts.")
        return [["del", ["aggregates", str(agg["id"])]]]
    req.store.transaction(plan)
    return 200, None


def aggregate_host_body(req, key):
    return validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": [key], "properties": {key: {
                                   "type": "object", "additionalProperties": False,
                                   "required": ["host"], "properties": {"host": {
                                       "type": "string", "minLength": 1, "maxLength": 255,
                                       "pattern": r"^[a-zA-Z0-9-._]*$"}}}}})[key]["host"]


def aggregate_action_add_host(req):
    """POST /os-aggregates/{id}/action add_host"""
    host = aggregate_host_body(req, "add_host")
    if host not in req.app.drivers:
        raise NotFound(f"Compute host {host} could not be found.")

    def change(agg, data):
        if host in agg["hosts"]:
            raise Conflict(f"Aggregate {agg['id']} already has host {host}.")
        zone = agg["metadata"].get("availability_zone")
        current = host_zone(req.app, host)
        if zone and current != zone and current != req.app.conf["availability_zone"]:
            raise Conflict(f"Cannot add host to aggregate {agg['id']}. Reason: One or more "
                           "hosts already in availability zone(s) " + current + ".")
        agg["hosts"] = agg["hosts"] + [host]
        return agg

    return aggregate_change(req, change)


def aggregate_action_remove_host(req):
    """POST /os-aggregates/{id}/action remove_host"""
    host = aggregate_host_body(req, "remove_host")

    def change(agg, data):
        if host not in agg["hosts"]:
            raise NotFound(f"Cannot remove host {host} in aggregate {agg['id']}: not found.")
        agg["hosts"] = [h for h in agg["hosts"] if h != host]
        return agg

    return aggregate_change(req, change)


def aggregate_action_set_metadata(req):
    """POST /os-aggregates/{id}/action set_metadata"""
    metadata = validate_body(req, {"type": "object", "additionalProperties": False,
                                   "required": ["set_metadata"], "properties": {
                                       "set_metadata": {
                                           "type": "object", "additionalProperties": False,
                                           "required": ["metadata"], "properties": {
                                               "metadata": {
                                                   "type": "object",
                                                   "additionalProperties": False,
                                                   "patternProperties": {
                                                       r"^[a-zA-Z0-9-_:. ]{1,255}$": {
                                                           "type": ["string", "null"],
                                                           "maxLength": 255}}}}}}})
    items = metadata["set_metadata"]["metadata"]
    check_zone_name(items.get("availability_zone"))

    def change(agg, data):
        new = dict(agg["metadata"])
        for key, value in items.items():
            if value is None:
                new.pop(key, None)
            else:
                new[key] = value
        agg["metadata"] = new
        return agg

    return aggregate_change(req, change)



def aggregate_images_create(req):
    """POST /os-aggregates/{id}/images"""
    body = validate_body(req, {"type": "object", "additionalProperties": False,
                               "required": ["cache"], "properties": {"cache": {
                                   "type": "array", "minItems": 1, "items": {
                                       "type": "object", "additionalProperties": False,
                                       "required": ["id"], "properties": {
                                           "id": {"type": "string", "format": "uuid"}}}}}})
    agg = find_aggregate(req, req.store.data, req.params["id"])
    images = []
    for item in body["cache"]:
        image = req.app.images.get(item["id"])
        if image is None:
            raise BadRequest(f"Image {item['id']} could not be found.")
        images.append(image)
    if set(agg["hosts"]) & set(req.app.drivers):
        def precache():
            for image in images:
                try:
                    image_base(req.app, image)
                except (DriverError, Unavailable, OSError) as e:
                    LOG.warning("pre-caching image %s failed: %s", image["id"], e)
        threading.Thread(target=precache, daemon=True, name="image-precache").start()
    return 202, None


# § 36 API: migrations -----------------------------------------------------------------
#
# Every move is a migration record: resize, migration (cold), live-migration and
# evacuation, with Nova's statuses.  A server's own migrations list shows its live
# migrations in progress, which can be aborted or forced to complete.

def record_migration(app, server, new_flavor, source, dest, kind, status="migrating",
                     consumer=None):
    """A move's migration record; returns its id.  kind is Nova's migration_type:
    resize, migration, live-migration or evacuation; consumer is the uuid that holds its
    source's allocations in Placement (its uuid, as in Nova)."""
    def plan(data):
        number = data["counters"].get("migration", 0) + 1
        now = isotime_us(app.clock.now())
        record = {"id": number, "uuid": consumer or str(uuid.uuid4()),
                  "instance_uuid": server["id"],
                  "source_compute": source, "dest_compute": dest, "source_node": source,
                  "dest_node": dest, "dest_host": host_ip(app, dest) if dest else None,
                  "status": status,
                  "old_instance_type_id": server["flavor"].get("seq") or flavor_seq(
                      data, server["flavor"]["id"]),
                  "new_instance_type_id": new_flavor.get("seq") or flavor_seq(
                      data, new_flavor["id"]),
                  "migration_type": kind, "created_at": now, "updated_at": now,
                  "user_id": server["user_id"], "project_id": server["project_id"]}
        return [["set", ["migrations", str(number)], record],
                ["set", ["counters", "migration"], number]]
    app.store.transaction(plan)
    return app.store.data["counters"]["migration"]


def flavor_seq(data, flavor_id):
    flavor = data["flavors"].get(flavor_id)
    return flavor["seq"] if flavor else None


def set_migration_status(store, server_id, status, clock, only=("migrating", "finished"),
                         number=None, dest=None, dest_ip=None):
    """Move migration number (default: the server's open resize or cold migration) to
    status; dest fills in the destination an evacuation found."""
    def plan(data):
        ops = []
        for key, mig in data.get("migrations", {}).items():
            if mig["instance_uuid"] == server_id and (
                    key == str(number) if number is not None else
                    mig["status"] in only and mig["migration_type"] in ("resize",
                                                                        "migration")):
                changed = dict(mig, status=status, updated_at=isotime_us(clock.now()))
                if dest is not None:
                    changed.update(dest_compute=dest, dest_node=dest, dest_host=dest_ip)
                ops.append(["set", ["migrations", key], changed])
        return ops
    store.transaction(plan)


def migration_view(req, mig, with_hosts=True):
    view = {k: mig[k] for k in ("created_at", "dest_compute", "dest_host", "dest_node", "id",
                                "instance_uuid", "new_instance_type_id",
                                "old_instance_type_id", "source_compute", "source_node",
                                "status", "updated_at")}
    if not with_hosts:           # os-migrations:index:host is the admin's (Nova's _output)
        view.update(dest_compute=None, dest_host=None, dest_node=None, source_compute=None,
                    source_node=None)
    if req.since("2.23"):
        view["migration_type"] = mig["migration_type"]
    if req.since("2.59"):
        view["uuid"] = mig["uuid"]
    if req.since("2.80"):
        view["user_id"], view["project_id"] = mig["user_id"], mig["project_id"]
    return view


def migrations_index(req):
    """GET /os-migrations"""
    allowed = ["hidden", "host", "instance_uuid", "source_compute", "status", "migration_type"]
    if req.since("2.59"):
        allowed += ["limit", "marker", "changes-since"]
    if req.since("2.66"):
        allowed.append("changes-before")
    if req.since("2.80"):
        allowed += ["user_id", "project_id"]
    query = {k: v[-1] for k, v in validate_query(req, allowed, strict_since="2.59").items()}
    # as Nova's MigrationsController._index: another project's (or every project's)
    # migrations need index:all_projects, and their hosts index:host (both admin's)
    wanted = (req.query.get("project_id") or [None])[-1]
    if wanted is None or wanted != req.ident.project_id:
        authorize(req, "os_compute_api:os-migrations:index:all_projects", "admin")
    if wanted is not None:
        query["project_id"] = wanted
    with_hosts = policy_allows(req.ident, "admin")
    migs = sorted(req.store.data.get("migrations", {}).values(),
                  key=lambda m: (m["created_at"], m["id"]), reverse=True)
    for key in ("instance_uuid", "status", "migration_type", "source_compute", "user_id",
                "project_id"):
        if key in query:
            migs = [m for m in migs if str(m.get(key)) == query[key]]
    if "host" in query:
        migs = [m for m in migs if query["host"] in (m["source_compute"], m["dest_compute"])]
    for key, keep in (("changes-since", lambda m, t: parse_isotime(m["updated_at"]) >= t),
                      ("changes-before", lambda m, t: parse_isotime(m["updated_at"]) <= t)):
        if key in query:
            moment = parse_changes_time(key, query[key])
            migs = [m for m in migs if keep(m, moment)]
    body = {}
    if req.since("2.59"):
        migs, marker = paginate(req, migs, lambda m: m["uuid"],
                                "Marker %s could not be found.")
        if marker is not None:
            body["migrations_links"] = req.next_link("os-migrations", marker)
    return 200, dict({"migrations": [migration_view(req, m, with_hosts) for m in migs]},
                     **body)


LIVE_MIGRATION_OPEN = ("queued", "preparing", "running")


def server_live_migrations(req, statuses=LIVE_MIGRATION_OPEN):
    server_id = find_server(req, req.params["server_id"])["id"]
    return [m for m in sorted(req.store.data.get("migrations", {}).values(),
                              key=lambda m: m["id"])
            if m["instance_uuid"] == server_id and m["migration_type"] == "live-migration"
            and (statuses is None or m["status"] in statuses)]


def server_migration_view(req, mig):
    view = {"created_at": mig["created_at"], "dest_compute": mig["dest_compute"],
            "dest_host": mig["dest_host"], "dest_node": mig["dest_node"], "id": mig["id"],
            "server_uuid": mig["instance_uuid"], "source_compute": mig["source_compute"],
            "source_node": mig["source_node"], "status": mig["status"],
            "updated_at": mig["updated_at"]}
    view.update({f"{what}_{kind}_bytes": 0 for what in ("disk", "memory")
                 for kind in ("processed", "remaining", "total")})
    if req.since("2.59"):
        view["uuid"] = mig["uuid"]
    if req.since("2.80"):
        view["user_id"], view["project_id"] = mig["user_id"], mig["project_id"]
    return view


def server_migrations_index(req):
    """GET /servers/{server_id}/migrations: its live migrations in progress"""
    validate_query(req, (), strict_since="2.102")
    return 200, {"migrations": [server_migration_view(req, m)
                                for m in server_live_migrations(req)]}


def find_server_migration(req):
    server_id = req.params["server_id"]
    for mig in server_live_migrations(req, statuses=None):
        if str(mig["id"]) == req.params["id"]:
            return mig
    raise NotFound(f"Migration {req.params['id']} for instance {server_id} could not be "
                   "found.")


def server_migrations_show(req):
    """GET /servers/{server_id}/migrations/{id}"""
    validate_query(req, (), strict_since="2.102")
    mig = find_server_migration(req)
    if mig["status"] not in LIVE_MIGRATION_OPEN:
        raise NotFound(f"In-progress live migration {mig['id']} is not found for server "
                       f"{mig['instance_uuid']}.")
    return 200, {"migration": server_migration_view(req, mig)}


def server_migrations_delete(req):
    """DELETE /servers/{server_id}/migrations/{id}: abort a live migration"""
    mig = find_server_migration(req)
    allowed = LIVE_MIGRATION_OPEN if req.since("2.65") else ("running",)
    if mig["status"] not in allowed:
        raise BadRequest(f"Migration {mig['id']} state of instance {mig['instance_uuid']} is "
                         f"{mig['status']}. Cannot abort live migration while the migration "
                         "is in this state.")
    server = find_server(req, req.params["server_id"])
    req.app.host_driver(mig["source_compute"]).abort_job(server)
    return 202, None


def server_migration_action_force_complete(req):
    """POST /servers/{server_id}/migrations/{id}/action force_complete: pause the guest
    so that its memory stops changing and the migration ends"""
    validate_body(req, {"type": "object", "additionalProperties": False,
                        "required": ["force_complete"],
                        "properties": {"force_complete": {"type": "null"}}})
    mig = find_server_migration(req)
    server = find_server(req, req.params["server_id"])
    if mig["status"] != "running":
        raise BadRequest(f"Migration {mig['id']} state of instance {mig['instance_uuid']} is "
                         f"{mig['status']}. Cannot force_complete while the migration is in "
                         "this state.")
    if server["vm_state"] != "active":
        raise Conflict(f"Cannot 'force_complete' instance {server['id']} while it is in "
                       f"vm_state {server['vm_state']}")
    req.app.host_driver(mig["source_compute"]).pause(server)
    return 202, None


# § 37 metadata service ----------------------------------------------------------------
#
# The OpenStack and EC2 metadata APIs for guests without a config drive, on their own
# listener (--metadata-listen).  A guest is known by its source address: the address of
# one of its ports on a libvirt network.

EC2_VERSIONS = ("1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15",
                "2008-02-01", "2008-09-01", "2009-04-04", "latest")
OPENSTACK_VERSIONS = ("2012-08-10", "latest")
# where Nova's OpenStack metadata has the guest's password (from 2013-04-04 on)
PASSWORD_VERSIONS = ("2013-04-04", "2013-10-17", "2015-10-15", "2016-06-30", "2016-10-06",
                     "2017-02-22", "2018-08-27", "2020-10-14", "latest")
PASSWORD_MAX_BYTES = 4 * 255          # Nova keeps it in four system metadata values of 255


class MetadataApp:
    """Answers metadata requests for the server whose port has the caller's address."""

    def __init__(self, app):
        self.app = app
        self.conf = app.conf

    @property
    def stopping(self):
        return self.app.stopping

    def server_at(self, address):
        """The server with a port at this address; a guest that asks before minivan saw
        its DHCP lease is found by the lease's MAC."""
        servers = [s for s in self.app.store.data["servers"].values()
                   if s["vm_state"] != "deleted"]
        for server in servers:
            for port in server.get("ports", []):
                if any(ip == address for ip, _ in port.get("ips", [])):
                    return server
        networks = {p["network"] for s in servers for p in s.get("ports", [])}
        macs = set()
        for driver in list(self.app.drivers.values()):
            try:
                macs |= {driver.lease_mac(net, address) for net in networks} - {None}
            except (DriverError, Unavailable):
                continue
        for server in servers:
            if any(p["mac"].lower() in macs for p in server.get("ports", [])):
                self.app.compute.refresh_addresses(server["id"])
                return server
        return None

    def handle(self, method, target, headers, body=b"", secure=False, stream=None,
               client=None):
        path = urllib.parse.urlsplit(target).path
        parts = path.strip("/").split("/")
        is_password = len(parts) == 3 and parts[0] == "openstack" and \
            parts[1] in PASSWORD_VERSIONS and parts[2] == "password"
        if method not in ("GET", "HEAD") and not (method == "POST" and is_password):
            return Response(405, b"Method not allowed\n", content_type="text/plain")
        if self.conf["service_metadata_proxy"]:       # (as Nova: every request is relayed)
            server, refusal = self.relayed_server(headers)
            if refusal:
                return refusal
            client = (headers.get("X-Forwarded-For") or client).split(",")[0].strip()
        else:
            if headers.get("X-Instance-ID") is not None:
                LOG.warning("metadata request from %s carries X-Instance-ID, but "
                            "--service-metadata-proxy is off: it is known by its address",
                            client)
            server = self.server_at(client)
        if server is None:
            LOG.info("metadata request from %s, which is no server's address", client)
            return Response(404, b"No server has this address\n", content_type="text/plain")
        if is_password:
            return self.password(server, method, body)
        answer = self.lookup(server, path.rstrip("/") if path != "/" else "/", client)
        if answer is None:
            return Response(404, b"Not found\n", content_type="text/plain")
        data, ctype = answer
        return Response(200, data, content_type=ctype)

    def relayed_server(self, headers):
        """(server, None) for a request Neutron's metadata agent relays, or (None, the
        answer that refuses it), as Nova's metadata handler checks it: the three headers
        once each, the instance id signed with the shared secret (HMAC-SHA256), and the
        server in the project the agent names."""
        def one(name):
            values = headers.get_all(name) or []
            return values[0] if len(values) == 1 else None
        instance_id, signature = one("X-Instance-ID"), one("X-Instance-ID-Signature")
        tenant_id = one("X-Tenant-ID")
        if not (instance_id and signature and tenant_id):
            LOG.warning("relayed metadata request without exactly one X-Instance-ID, "
                        "X-Instance-ID-Signature and X-Tenant-ID")
            return None, Response(400, b"X-Instance-ID, X-Instance-ID-Signature and "
                                       b"X-Tenant-ID are each needed once\n",
                                  content_type="text/plain")
        secret = self.conf["metadata_proxy_shared_secret"] or ""
        expected = hmac.new(secret.encode("utf-8"), instance_id.encode("utf-8"),
                            hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            LOG.warning("relayed metadata request for %s with a wrong signature", instance_id)
            return None, Response(403, b"Invalid proxy request signature.\n",
                                  content_type="text/plain")
        server = self.app.store.data["servers"].get(instance_id)
        if server is None or server["vm_state"] == "deleted" or \
                server["project_id"] != tenant_id:
            return None, Response(404, b"No such server in that project\n",
                                  content_type="text/plain")
        return server, None

    def password(self, server, method, body):
        """openstack/<version>/password, as Nova keeps it: the guest posts its password
        (encrypted with its key) once, and the API's os-server-password shows it until it is
        cleared; a second post while one is set is a conflict."""
        if method != "POST":
            return Response(200, (server.get("password") or "").encode(),
                            content_type="text/plain")
        if len(body) > PASSWORD_MAX_BYTES:
            return Response(400, b"Request is too large.\n", content_type="text/plain")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return Response(400, b"The password is not UTF-8 text.\n", content_type="text/plain")

        def plan(data):
            current = data["servers"].get(server["id"])
            if current is None or current["vm_state"] == "deleted":
                raise NotFound("No such server")
            if current.get("password"):
                raise Conflict("The password is set already")
            return [["set", ["servers", server["id"], "password"], text]]
        try:
            self.app.store.transaction(plan)
        except (NotFound, Conflict) as e:
            return Response(e.code, (e.message + "\n").encode(), content_type="text/plain")
        return Response(200, b"", content_type="text/plain")

    def lookup(self, server, path, client):
        files = config_drive_files(self.app, server, None)
        if path == "/":
            return "\n".join(EC2_VERSIONS + ("openstack",)).encode(), "text/plain"
        if path == "/openstack":
            return "\n".join(OPENSTACK_VERSIONS).encode(), "text/plain"
        parts = path.strip("/").split("/")
        if parts[0] == "openstack" and len(parts) >= 2:
            version = "latest" if parts[1] not in OPENSTACK_VERSIONS else parts[1]
            root = f"openstack/{'latest' if version == 'latest' else '2012-08-10'}"
            if len(parts) == 2:
                names = sorted([p.rsplit("/", 1)[1] for p in files if p.startswith(root + "/")]
                               + (["password"] if parts[1] in PASSWORD_VERSIONS else []))
                return "\n".join(names).encode(), "text/plain"
            name = "/".join(parts[2:])
            data = files.get(f"{root}/{name}")
            if data is None:
                return None
            return data, "application/json" if name.endswith(".json") else "text/plain"
        if parts[0] in EC2_VERSIONS:
            return self.ec2(server, parts[1:], files, client)
        return None

    def ec2(self, server, parts, files, client):
        """The EC2 tree: /<version>/meta-data/... and /<version>/user-data."""
        if parts == ["user-data"]:
            data = files.get("ec2/latest/user-data")
            return (data, "text/plain") if data is not None else None
        if not parts:
            names = ["meta-data"] + (["user-data"] if "ec2/latest/user-data" in files else [])
            return "\n".join(names).encode(), "text/plain"
        if parts[0] != "meta-data":
            return None
        if parts[1:2] == ["public-keys"]:
            return self.ec2_public_keys(server, parts[2:])
        hostname = metadata_hostname(self.app.conf, server)
        # as Nova: the first fixed and the first floating IPv4 address of the server's ports
        ipv4 = [item for items in server_addresses(server).values() for item in items
                if item["version"] == 4]
        fixed = [item["addr"] for item in ipv4 if item["OS-EXT-IPS:type"] == "fixed"]
        floating = [item["addr"] for item in ipv4 if item["OS-EXT-IPS:type"] == "floating"]
        tree = {"ami-id": server["image_ref"],
                "ami-launch-index": str(server.get("launch_index", 0)),
                "hostname": hostname, "instance-id": server["instance_name"],
                "instance-type": server["flavor"]["name"], "local-hostname": hostname,
                "local-ipv4": fixed[0] if fixed else client,
                "public-hostname": hostname,
                "public-ipv4": floating[0] if floating else "",
                "placement": {"availability-zone": server["availability_zone"]},
                "reservation-id": server["reservation_id"],
                "security-groups": "\n".join(server.get("security_groups", []))}
        node = tree
        for part in parts[1:]:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        if isinstance(node, dict):
            names = [k + ("/" if isinstance(v, dict) else "") for k, v in sorted(node.items())]
            if parts[1:] == [] and server.get("key_data"):
                names = sorted(names + ["public-keys/"])
            return "\n".join(names).encode(), "text/plain"
        return str(node).encode(), "text/plain"

    def ec2_public_keys(self, server, rest):
        if not server.get("key_data"):
            return None
        answers = {(): f"0={server['key_name']}", ("0",): "openssh-key",
                   ("0", "openssh-key"): server["key_data"]}
        answer = answers.get(tuple(rest))
        return (answer.encode(), "text/plain") if answer is not None else None


def metadata_listener(app, conf):
    """The metadata Server on --metadata-listen (host:port), or None when it is off."""
    spec = conf["metadata_listen"]
    if not spec:
        return None
    host, _, port = spec.rpartition(":")
    try:
        port = int(port)
    except ValueError:
        raise ConfigError(f"--metadata-listen must be HOST:PORT, not {spec!r}") from None
    return Server(MetadataApp(app), host.strip("[]") or "0.0.0.0", port)


# the serial console proxy: a WebSocket per console token, bridged to the guest's serial
# console through a libvirt stream (what websockify and nova-serialproxy do for Nova)

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class ConsoleProxyHandler(http.server.BaseHTTPRequestHandler):
    """GET /?token=T with a WebSocket upgrade opens that token's console, once; other GETs
    fetch noVNC's files on the VNC proxy."""

    protocol_version = "HTTP/1.1"
    server_version = "minivan"
    sys_version = ""
    timeout = 30                 # for the handshake; a session then lives on TCP keepalive

    def log_message(self, fmt, *args):
        LOG.info("console proxy %s: %s", self.client_address[0], fmt % args)

    def refuse(self, status, message):
        data = (message + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        app = self.server.app
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        key = self.headers.get("Sec-WebSocket-Key")
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            if self.server.static_dir:
                return self.send_static()
            return self.refuse(400, "This is a WebSocket console proxy.")
        record = app.console_tokens.take((query.get("token") or [""])[0])
        if record is None or record["type"] not in self.server.console_types:
            # as Nova's proxies: the WebSocket opens, then closes with nothing sent
            LOG.info("console proxy %s: a console token that is not valid (or was used)",
                     self.client_address[0])
            self.upgrade(key)
            self.wfile.write(websocket_frame(8, b""))
            self.close_connection = True
            return None
        server = app.store.data["servers"].get(record["server_id"])
        if server is None or server["vm_state"] == "deleted" or not server.get("host") \
                or app.driver is None:
            return self.refuse(404, "The server is gone.")
        try:
            driver = app.compute.driver_of(server)
            stream = driver.open_serial_console(server) if record["type"] == "serial" \
                else SocketConsole(driver.open_vnc(server))
        except (DriverError, Unavailable, OSError) as e:
            return self.refuse(409, f"The console cannot be opened: {e}")
        self.upgrade(key)
        LOG.info("console of server %s opened from %s", server["id"], self.client_address[0])
        self.close_connection = True
        self.bridge(stream)

    def upgrade(self, key):
        """The WebSocket handshake's 101 answer."""
        accept = base64.b64encode(hashlib.sha1((key + WEBSOCKET_GUID).encode(),
                                               usedforsecurity=False).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        wanted = [p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if "binary" in wanted:
            self.send_header("Sec-WebSocket-Protocol", "binary")
        self.end_headers()

    def send_static(self):
        """One of noVNC's files, from --novnc-dir."""
        root = os.path.realpath(self.server.static_dir)
        rel = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        path = os.path.realpath(os.path.join(root, rel or "vnc_lite.html"))
        if not path.startswith(root + os.sep) or not os.path.isfile(path):
            return self.refuse(404, "Not found.")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return self.refuse(404, "Not found.")
        types = {".html": "text/html", ".js": "application/javascript", ".css": "text/css",
                 ".svg": "image/svg+xml", ".png": "image/png", ".ico": "image/x-icon",
                 ".json": "application/json"}
        self.send_response(200)
        self.send_header("Content-Type", types.get(os.path.splitext(path)[1],
                                                   "application/octet-stream"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def bridge(self, stream):
        """Guest output to WebSocket frames in one thread, frames to the guest here."""
        sock = self.connection
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        lock = threading.Lock()
        done = threading.Event()

        def guest_to_client():
            try:
                while not done.is_set():
                    data = stream.recv(4096)
                    if not isinstance(data, bytes) or not data:
                        break
                    with lock:
                        sock.sendall(websocket_frame(2, data))
            except Exception:  # noqa: BLE001 - the console or the socket went away
                pass
            done.set()
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        threading.Thread(target=guest_to_client, daemon=True, name="console-out").start()
        try:
            while not done.is_set():
                frame = read_websocket_frame(self.rfile)
                if frame is None or frame[0] == 8:
                    break
                opcode, payload = frame
                if opcode == 9:
                    with lock:
                        sock.sendall(websocket_frame(10, payload))
                elif opcode in (0, 1, 2) and payload:
                    stream.send(payload)
        except Exception:  # noqa: BLE001 - the client went away
            pass
        done.set()
        try:
            stream.abort()
        except Exception:  # noqa: BLE001 - already closed
            pass


def websocket_frame(opcode, payload):
    """One unmasked server frame."""
    head = bytes([0x80 | opcode])
    size = len(payload)
    if size < 126:
        head += bytes([size])
    elif size < 65536:
        head += bytes([126]) + size.to_bytes(2, "big")
    else:
        head += bytes([127]) + size.to_bytes(8, "big")
    return head + payload


def read_websocket_frame(rfile, limit=1 << 20):
    """(opcode, unmasked payload) of the next client frame; None at the end."""
    head = rfile.read(2)
    if len(head) < 2:
        return None
    opcode, size = head[0] & 0x0F, head[1] & 0x7F
    if size == 126:
        size = int.from_bytes(rfile.read(2), "big")
    elif size == 127:
        size = int.from_bytes(rfile.read(8), "big")
    if size > limit:
        return None
    mask = rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
    data = rfile.read(size)
    if len(data) < size:
        return None
    return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


class SocketConsole:
    """A socket (to a VNC server) with the calls bridge() makes on a libvirt stream."""

    def __init__(self, sock):
        self.sock = sock

    def recv(self, size):
        return self.sock.recv(size)

    def send(self, data):
        self.sock.sendall(data)

    def abort(self):
        self.sock.close()


class ConsoleProxy(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app, bind, port, console_types=("serial",), static_dir=""):
        self.app = app
        self.console_types = console_types
        self.static_dir = static_dir
        self.address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        super().__init__((bind, port), ConsoleProxyHandler)


def console_proxy_listener(app, conf, kind="serial"):
    """The serial console proxy on --serial-console-listen (kind serial) or the noVNC one
    on --vnc-listen (kind vnc); None when it is off."""
    option = "serial_console_listen" if kind == "serial" else "vnc_listen"
    spec = conf[option]
    if not spec:
        return None
    host, _, port = spec.rpartition(":")
    try:
        port = int(port)
    except ValueError:
        raise ConfigError(f"--{option.replace('_', '-')} must be HOST:PORT, not {spec!r}") \
            from None
    if kind == "serial":
        return ConsoleProxy(app, host.strip("[]") or "0.0.0.0", port)
    return ConsoleProxy(app, host.strip("[]") or "0.0.0.0", port, ("novnc",),
                        conf["novnc_dir"])


def graphics_address(uri):
    """Where guests of a host reached by this libvirt URI listen for VNC: loopback on this
    host, the host's address elsewhere."""
    scheme = uri.split(":", 1)[0]
    remote = urllib.parse.urlsplit(uri).hostname if "+" in scheme else None
    if not remote or remote in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    try:
        return socket.gethostbyname(remote)
    except OSError:
        raise ConfigError(f"cannot resolve the compute host {remote} of {uri}") from None


# § 38 failure injection ---------------------------------------------------------------
#
# For people who test their own tools against minivan: with --fault-injection, an admin
# makes builds fail or wait, actions and deletes fail, and hosts go down, on purpose.
# Rules live in memory (a restart clears them); server metadata keys do the same for
# one server.

FAULT_KINDS = ("build", "build_delay", "action", "delete", "host_down", "store_hang")
FAULT_RULE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["fault"],
    "properties": {"fault": {
        "type": "object", "additionalProperties": False, "required": ["kind"],
        "properties": {
            "kind": {"type": "string", "enum": list(FAULT_KINDS)},
            "name": {"type": "string", "minLength": 1, "maxLength": 255},
            "action": {"type": "string", "minLength": 1, "maxLength": 255},
            "count": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000000},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "message": {"type": "string", "minLength": 1, "maxLength": 255},
            "seconds": {"type": "number", "minimum": 0, "maximum": 3600},
            "host": {"type": "string", "minLength": 1, "maxLength": 255}}}}}


class InjectedFault(Fault):
    """An API answer a failure-injection rule asked for."""

    def __init__(self, code, message):
        self.code = code
        super().__init__(message)


class FaultRules:
    """The failure-injection rules, and the servers' own minivan:* metadata keys."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.rules = {}                # id -> rule
        self.delete_failures = {}      # server id -> minivan:fail_delete failures left

    def add(self, spec):
        rule = {"id": str(uuid.uuid4()), "kind": spec["kind"], "name": spec.get("name", ".*"),
                "action": spec.get("action", "*"), "count": spec.get("count", 1),
                "status": spec.get("status", 500),
                "message": spec.get("message", "Injected fault"),
                "seconds": spec.get("seconds", 0), "host": spec.get("host"), "fired": 0}
        try:
            re.compile(rule["name"])
        except re.error as e:
            raise BadRequest(f"Invalid name pattern: {e}") from None
        if rule["kind"] == "host_down":
            if rule["host"] not in self.app.drivers:
                raise BadRequest(f"host_down needs a compute host; {rule['host']!r} is not one")
            rule["count"] = None
        elif rule["host"] is not None:
            raise BadRequest("Only host_down rules name a host.")
        if rule["kind"] in ("build_delay", "store_hang") and not rule["seconds"]:
            raise BadRequest(f"A {rule['kind']} rule needs seconds.")
        if rule["kind"] == "store_hang":        # the state store's lock held that long
            LOG.warning("failure injection: the state store hangs for %s s", rule["seconds"])
            threading.Thread(target=self.hang_store, args=(rule["seconds"],), daemon=True,
                             name="store-hang").start()
            return dict(rule, count=0)
        with self.lock:
            self.rules[rule["id"]] = rule
        if rule["kind"] == "host_down":
            LOG.warning("failure injection: compute host %s is down", rule["host"])
            self.app.drivers[rule["host"]].injected_down = True
        return dict(rule)

    def hang_store(self, seconds):
        with self.app.store.cond:
            time.sleep(seconds)

    def remove(self, rule_id):
        with self.lock:
            rule = self.rules.pop(rule_id, None)
            still_down = {r["host"] for r in self.rules.values() if r["kind"] == "host_down"}
        if rule is None:
            raise NotFound(f"Fault rule {rule_id} could not be found.")
        if rule["kind"] == "host_down" and rule["host"] not in still_down:
            LOG.warning("failure injection: compute host %s is back", rule["host"])
            self.app.drivers[rule["host"]].injected_down = False

    def list(self):
        with self.lock:
            return [dict(rule) for rule in self.rules.values()]

    def take(self, kind, server, action=None):
        """The first rule of this kind that matches the server (and action), used once
        more (a rule whose count is spent goes away); None when none matches."""
        with self.lock:
            for rule in list(self.rules.values()):
                if rule["kind"] != kind or not re.search(rule["name"], server.get("name", "")):
                    continue
                if kind == "action" and rule["action"] not in ("*", action):
                    continue
                rule["fired"] += 1
                if rule["count"] is not None:
                    rule["count"] -= 1
                    if rule["count"] <= 0:
                        del self.rules[rule["id"]]
                LOG.warning("failure injection: %s of server %s (%s)", kind, server["id"],
                            rule["message"])
                return rule
        return None

    def fail_build(self, server):
        """Raise the build failure a rule or minivan:fail_build asks for."""
        rule = self.take("build", server)
        if rule is not None:
            raise DriverError(rule["message"])
        message = server.get("metadata", {}).get("minivan:fail_build")
        if message:
            raise DriverError(message if message.lower() not in BOOL_TRUE
                              else "Injected fault")

    def build_delay(self, server):
        """Seconds a build waits first (a rule, or minivan:build_delay)."""
        rule = self.take("build_delay", server)
        if rule is not None:
            return rule["seconds"]
        try:
            return min(3600.0, max(0.0, float(server.get("metadata", {}).get(
                "minivan:build_delay", 0))))
        except ValueError:
            return 0.0

    def fail_api(self, kind, server, action=None):
        """Raise the answer a rule (or minivan:fail_delete) gives this request."""
        rule = self.take(kind, server, action)
        if rule is not None:
            raise InjectedFault(rule["status"], rule["message"])
        if kind != "delete":
            return
        with self.lock:
            left = self.delete_failures.get(server["id"])
            if left is None:
                try:
                    left = int(server.get("metadata", {}).get("minivan:fail_delete", 0))
                except ValueError:
                    left = 0
            if left > 0:
                self.delete_failures[server["id"]] = left - 1
                raise InjectedFault(500, "Injected fault: minivan:fail_delete")


def faults_endpoint(app, method, path, headers, body):
    """/minivan/v1/faults[/{id}]: list, create and delete failure-injection rules (admin
    only; 404 unless --fault-injection)."""
    if app.faults is None:
        raise NotFound("Failure injection is off (--fault-injection).")
    ident = app.auth.identify(headers.get("X-Auth-Token"))
    if not ident.is_admin:
        raise Forbidden("Only administrators can inject failures.")
    rest = path[len("/minivan/v1/faults"):].strip("/")
    if not rest and method == "GET":
        return 200, {"faults": app.faults.list()}
    if not rest and method == "POST":
        ctype = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype not in JSON_TYPES_ALLOWED:
            raise BadMediaType()
        try:
            doc = json.loads((body or b"").decode("utf-8"), parse_constant=reject_constant)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise BadRequest("Malformed request body") from None
        validate_body(type("FaultRequest", (), {"body": doc, "legacy": False}),
                      FAULT_RULE_SCHEMA)
        return 201, {"fault": app.faults.add(doc["fault"])}
    if rest and "/" not in rest and method == "DELETE":
        app.faults.remove(rest)
        return 204, None
    if rest and "/" not in rest and method == "GET":
        for rule in app.faults.list():
            if rule["id"] == rest:
                return 200, {"fault": rule}
        raise NotFound(f"Fault rule {rest} could not be found.")
    raise BadMethod(headers={"Allow": "GET, POST" if not rest else "GET, DELETE"})


# § 39 ROUTES and ACTIONS --------------------------------------------------------------
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
GET    /images                                        -                    2.1  2.35  any     images_index                     -
GET    /images/detail                                 -                    2.1  2.35  any     images_detail                    -
GET    /images/{id}                                   -                    2.1  2.35  any     images_show                      -
DELETE /images/{id}                                   -                    2.1  2.35  any     images_delete                    -
GET    /images/{image_id}/metadata                    -                    2.1  2.38  any     image_metadata_index             -
POST   /images/{image_id}/metadata                    -                    2.1  2.38  any     image_metadata_create            -
PUT    /images/{image_id}/metadata                    -                    2.1  2.38  any     image_metadata_update_all        -
GET    /images/{image_id}/metadata/{id}               -                    2.1  2.38  any     image_metadata_show              -
PUT    /images/{image_id}/metadata/{id}               -                    2.1  2.38  any     image_metadata_update            -
DELETE /images/{image_id}/metadata/{id}               -                    2.1  2.38  any     image_metadata_delete            -
GET    /limits                                        -                    2.1  2.104 any     limits_index                     os_compute_api:limits
GET    /os-agents                                     -                    -    -     gone    gone                             -
POST   /os-agents                                     -                    -    -     gone    gone                             -
PUT    /os-agents/{id}                                -                    -    -     gone    gone                             -
DELETE /os-agents/{id}                                -                    -    -     gone    gone                             -
GET    /os-aggregates                                 -                    2.1  2.104 admin   aggregates_index                 os_compute_api:os-aggregates:index
POST   /os-aggregates                                 -                    2.1  2.104 admin   aggregates_create                os_compute_api:os-aggregates:create
GET    /os-aggregates/{id}                            -                    2.1  2.104 admin   aggregates_show                  os_compute_api:os-aggregates:show
PUT    /os-aggregates/{id}                            -                    2.1  2.104 admin   aggregates_update                os_compute_api:os-aggregates:update
DELETE /os-aggregates/{id}                            -                    2.1  2.104 admin   aggregates_delete                os_compute_api:os-aggregates:delete
POST   /os-aggregates/{id}/action                     add_host             2.1  2.104 admin   aggregate_action_add_host        os_compute_api:os-aggregates:add_host
POST   /os-aggregates/{id}/action                     remove_host          2.1  2.104 admin   aggregate_action_remove_host     os_compute_api:os-aggregates:remove_host
POST   /os-aggregates/{id}/action                     set_metadata         2.1  2.104 admin   aggregate_action_set_metadata    os_compute_api:os-aggregates:set_metadata
POST   /os-aggregates/{id}/images                     -                    2.81 2.104 admin   aggregate_images_create          compute:aggregates:images
POST   /os-assisted-volume-snapshots                  -                    2.1  2.104 service assisted_volume_snapshots_create os_compute_api:os-assisted-volume-snapshots:create
DELETE /os-assisted-volume-snapshots/{id}             -                    2.1  2.104 service assisted_volume_snapshots_delete os_compute_api:os-assisted-volume-snapshots:delete
GET    /os-availability-zone                          -                    2.1  2.104 any     availability_zones_index         os_compute_api:os-availability-zone:list
GET    /os-availability-zone/detail                   -                    2.1  2.104 admin   availability_zones_detail        os_compute_api:os-availability-zone:detail
GET    /os-baremetal-nodes                            -                    2.1  2.35  admin   baremetal_nodes_index            os_compute_api:os-baremetal-nodes:list
POST   /os-baremetal-nodes                            -                    2.1  2.35  any     baremetal_nodes_create           -
GET    /os-baremetal-nodes/{id}                       -                    2.1  2.35  admin   baremetal_nodes_show             os_compute_api:os-baremetal-nodes:show
DELETE /os-baremetal-nodes/{id}                       -                    2.1  2.35  any     baremetal_nodes_delete           -
POST   /os-baremetal-nodes/{id}/action                add_interface        2.1  2.35  any     baremetal_node_action_add_interface -
POST   /os-baremetal-nodes/{id}/action                remove_interface     2.1  2.35  any     baremetal_node_action_remove_interface -
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
GET    /os-console-auth-tokens/{id}                   -                    2.1  2.104 admin   console_auth_tokens_show         os_compute_api:os-console-auth-tokens
GET    /os-fixed-ips/{id}                             -                    -    -     gone    gone                             -
POST   /os-fixed-ips/{id}/action                      reserve              -    -     gone    gone                             -
POST   /os-fixed-ips/{id}/action                      unreserve            -    -     gone    gone                             -
GET    /os-floating-ip-dns                            -                    -    -     gone    gone                             -
PUT    /os-floating-ip-dns/{id}                       -                    -    -     gone    gone                             -
DELETE /os-floating-ip-dns/{id}                       -                    -    -     gone    gone                             -
GET    /os-floating-ip-dns/{domain_id}/entries/{id}   -                    -    -     gone    gone                             -
PUT    /os-floating-ip-dns/{domain_id}/entries/{id}   -                    -    -     gone    gone                             -
DELETE /os-floating-ip-dns/{domain_id}/entries/{id}   -                    -    -     gone    gone                             -
GET    /os-floating-ip-pools                          -                    2.1  2.35  any     floating_ip_pools_index          os_compute_api:os-floating-ip-pools
GET    /os-floating-ips                               -                    2.1  2.35  reader  floating_ips_index               os_compute_api:os-floating-ips:list
POST   /os-floating-ips                               -                    2.1  2.35  member  floating_ips_create              os_compute_api:os-floating-ips:create
GET    /os-floating-ips/{id}                          -                    2.1  2.35  reader  floating_ips_show                os_compute_api:os-floating-ips:show
DELETE /os-floating-ips/{id}                          -                    2.1  2.35  member  floating_ips_delete              os_compute_api:os-floating-ips:delete
GET    /os-floating-ips-bulk                          -                    -    -     gone    gone                             -
POST   /os-floating-ips-bulk                          -                    -    -     gone    gone                             -
GET    /os-floating-ips-bulk/{id}                     -                    -    -     gone    gone                             -
PUT    /os-floating-ips-bulk/{id}                     -                    -    -     gone    gone                             -
GET    /os-fping                                      -                    -    -     gone    gone                             -
GET    /os-fping/{id}                                 -                    -    -     gone    gone                             -
GET    /os-hosts                                      -                    2.1  2.42  admin   hosts_index                      os_compute_api:os-hosts:list
GET    /os-hosts/{id}                                 -                    2.1  2.42  admin   hosts_show                       os_compute_api:os-hosts:show
PUT    /os-hosts/{id}                                 -                    2.1  2.42  admin   hosts_update                     os_compute_api:os-hosts:update
GET    /os-hosts/{id}/reboot                          -                    2.1  2.42  admin   hosts_reboot                     os_compute_api:os-hosts:reboot
GET    /os-hosts/{id}/shutdown                        -                    2.1  2.42  admin   hosts_shutdown                   os_compute_api:os-hosts:shutdown
GET    /os-hosts/{id}/startup                         -                    2.1  2.42  admin   hosts_startup                    os_compute_api:os-hosts:start
GET    /os-hypervisors                                -                    2.1  2.104 admin   hypervisors_index                os_compute_api:os-hypervisors:list
GET    /os-hypervisors/detail                         -                    2.1  2.104 admin   hypervisors_detail               os_compute_api:os-hypervisors:list-detail
GET    /os-hypervisors/statistics                     -                    2.1  2.87  admin   hypervisors_statistics           os_compute_api:os-hypervisors:statistics
GET    /os-hypervisors/{id}                           -                    2.1  2.104 admin   hypervisors_show                 os_compute_api:os-hypervisors:show
GET    /os-hypervisors/{id}/search                    -                    2.1  2.52  admin   hypervisors_search               os_compute_api:os-hypervisors:search
GET    /os-hypervisors/{id}/servers                   -                    2.1  2.52  admin   hypervisors_servers              os_compute_api:os-hypervisors:servers
GET    /os-hypervisors/{id}/uptime                    -                    2.1  2.87  admin   hypervisors_uptime               os_compute_api:os-hypervisors:uptime
GET    /os-instance_usage_audit_log                   -                    2.1  2.104 admin   instance_usage_audit_log_index   os_compute_api:os-instance-usage-audit-log:list
GET    /os-instance_usage_audit_log/{id}              -                    2.1  2.104 admin   instance_usage_audit_log_show    os_compute_api:os-instance-usage-audit-log:show
GET    /os-keypairs                                   -                    2.1  2.104 owner   keypairs_index                   os_compute_api:os-keypairs:index
POST   /os-keypairs                                   -                    2.1  2.104 owner   keypairs_create                  os_compute_api:os-keypairs:create
GET    /os-keypairs/{id}                              -                    2.1  2.104 owner   keypairs_show                    os_compute_api:os-keypairs:show
DELETE /os-keypairs/{id}                              -                    2.1  2.104 owner   keypairs_delete                  os_compute_api:os-keypairs:delete
GET    /os-migrations                                 -                    2.1  2.104 manager migrations_index                       os_compute_api:os-migrations:index
GET    /os-networks                                   -                    2.1  2.35  reader  networks_index                   os_compute_api:os-networks:list
POST   /os-networks                                   -                    -    -     gone    gone                             -
POST   /os-networks/add                               -                    -    -     gone    gone                             -
GET    /os-networks/{id}                              -                    2.1  2.35  reader  networks_show                    os_compute_api:os-networks:show
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
POST   /os-security-group-rules                       -                    2.1  2.35  member  security_group_rules_create      os_compute_api:os-security-groups:rule:create
DELETE /os-security-group-rules/{id}                  -                    2.1  2.35  member  security_group_rules_delete      os_compute_api:os-security-groups:rule:delete
GET    /os-security-groups                            -                    2.1  2.35  reader  security_groups_index            os_compute_api:os-security-groups:get
POST   /os-security-groups                            -                    2.1  2.35  member  security_groups_create           os_compute_api:os-security-groups:create
GET    /os-security-groups/{id}                       -                    2.1  2.35  reader  security_groups_show             os_compute_api:os-security-groups:show
PUT    /os-security-groups/{id}                       -                    2.1  2.35  member  security_groups_update           os_compute_api:os-security-groups:update
DELETE /os-security-groups/{id}                       -                    2.1  2.35  member  security_groups_delete           os_compute_api:os-security-groups:delete
POST   /os-server-external-events                     -                    2.1  2.104 service server_external_events_create    os_compute_api:os-server-external-events:create
GET    /os-server-groups                              -                    2.1  2.104 reader  server_groups_index              os_compute_api:os-server-groups:index
POST   /os-server-groups                              -                    2.1  2.104 member  server_groups_create             os_compute_api:os-server-groups:create
GET    /os-server-groups/{id}                         -                    2.1  2.104 reader  server_groups_show               os_compute_api:os-server-groups:show
DELETE /os-server-groups/{id}                         -                    2.1  2.104 member  server_groups_delete             os_compute_api:os-server-groups:delete
GET    /os-services                                   -                    2.1  2.104 admin   services_index                   os_compute_api:os-services:list
PUT    /os-services/{id}                              -                    2.1  2.104 admin   services_update                  os_compute_api:os-services:update
DELETE /os-services/{id}                              -                    2.1  2.104 admin   services_delete                  os_compute_api:os-services:delete
GET    /os-simple-tenant-usage                        -                    2.1  2.104 admin   simple_tenant_usage_index        os_compute_api:os-simple-tenant-usage:list
GET    /os-simple-tenant-usage/{id}                   -                    2.1  2.104 reader  simple_tenant_usage_show         os_compute_api:os-simple-tenant-usage:show
GET    /os-snapshots                                  -                    2.1  2.35  reader  snapshots_index                  os_compute_api:os-volumes:snapshots:list
POST   /os-snapshots                                  -                    2.1  2.35  member  snapshots_create                 os_compute_api:os-volumes:snapshots:create
GET    /os-snapshots/detail                           -                    2.1  2.35  reader  snapshots_detail                 os_compute_api:os-volumes:snapshots:detail
GET    /os-snapshots/{id}                             -                    2.1  2.35  reader  snapshots_show                   os_compute_api:os-volumes:snapshots:show
DELETE /os-snapshots/{id}                             -                    2.1  2.35  member  snapshots_delete                 os_compute_api:os-volumes:snapshots:delete
GET    /os-tenant-networks                            -                    2.1  2.35  reader  tenant_networks_index            os_compute_api:os-tenant-networks:list
POST   /os-tenant-networks                            -                    -    -     gone    gone                             -
GET    /os-tenant-networks/{id}                       -                    2.1  2.35  reader  tenant_networks_show             os_compute_api:os-tenant-networks:show
DELETE /os-tenant-networks/{id}                       -                    -    -     gone    gone                             -
GET    /os-volumes                                    -                    2.1  2.35  reader  volumes_index                    os_compute_api:os-volumes:list
POST   /os-volumes                                    -                    2.1  2.35  member  volumes_create                   os_compute_api:os-volumes:create
GET    /os-volumes/detail                             -                    2.1  2.35  reader  volumes_detail                   os_compute_api:os-volumes:detail
GET    /os-volumes/{id}                               -                    2.1  2.35  reader  volumes_show                     os_compute_api:os-volumes:show
DELETE /os-volumes/{id}                               -                    2.1  2.35  member  volumes_delete                   os_compute_api:os-volumes:delete
GET    /os-volumes_boot                               -                    2.1  2.102 reader  servers_index                    os_compute_api:servers:index
POST   /os-volumes_boot                               -                    2.1  2.102 member  servers_create                   os_compute_api:servers:create
GET    /os-volumes_boot/detail                        -                    2.1  2.102 reader  servers_detail                   os_compute_api:servers:detail
GET    /os-volumes_boot/{id}                          -                    2.1  2.102 reader  servers_show                     os_compute_api:servers:show
PUT    /os-volumes_boot/{id}                          -                    2.1  2.102 member  servers_update                   os_compute_api:servers:update
DELETE /os-volumes_boot/{id}                          -                    2.1  2.102 member  servers_delete                   os_compute_api:servers:delete
POST   /os-volumes_boot/{id}/action                   confirmResize        2.1  2.102 member  server_action_confirm_resize     os_compute_api:servers:confirm_resize
POST   /os-volumes_boot/{id}/action                   revertResize         2.1  2.102 member  server_action_revert_resize      os_compute_api:servers:revert_resize
POST   /os-volumes_boot/{id}/action                   reboot               2.1  2.102 member  server_action_reboot             os_compute_api:servers:reboot
POST   /os-volumes_boot/{id}/action                   resize               2.1  2.102 member  server_action_resize             os_compute_api:servers:resize
POST   /os-volumes_boot/{id}/action                   rebuild              2.1  2.102 member  server_action_rebuild            os_compute_api:servers:rebuild
POST   /os-volumes_boot/{id}/action                   createImage          2.1  2.102 member  server_action_create_image       os_compute_api:servers:create_image
POST   /os-volumes_boot/{id}/action                   os-start             2.1  2.102 member  server_action_start              os_compute_api:servers:start
POST   /os-volumes_boot/{id}/action                   os-stop              2.1  2.102 member  server_action_stop               os_compute_api:servers:stop
POST   /os-volumes_boot/{id}/action                   trigger_crash_dump   2.17 2.102 member  server_action_trigger_crash_dump os_compute_api:servers:trigger_crash_dump
GET    /servers                                       -                    2.1  2.104 reader  servers_index                    os_compute_api:servers:index
POST   /servers                                       -                    2.1  2.104 member  servers_create                   os_compute_api:servers:create
GET    /servers/detail                                -                    2.1  2.104 reader  servers_detail                   os_compute_api:servers:detail
GET    /servers/{server_id}                           -                    2.1  2.104 reader  servers_show                     os_compute_api:servers:show
PUT    /servers/{server_id}                           -                    2.1  2.104 member  servers_update                   os_compute_api:servers:update
DELETE /servers/{server_id}                           -                    2.1  2.104 member  servers_delete                   os_compute_api:servers:delete
POST   /servers/{server_id}/action                    confirmResize        2.1  2.104 member  server_action_confirm_resize     os_compute_api:servers:confirm_resize
POST   /servers/{server_id}/action                    revertResize         2.1  2.104 member  server_action_revert_resize      os_compute_api:servers:revert_resize
POST   /servers/{server_id}/action                    reboot               2.1  2.104 member  server_action_reboot             os_compute_api:servers:reboot
POST   /servers/{server_id}/action                    resize               2.1  2.104 member  server_action_resize             os_compute_api:servers:resize
POST   /servers/{server_id}/action                    rebuild              2.1  2.104 member  server_action_rebuild            os_compute_api:servers:rebuild
POST   /servers/{server_id}/action                    createImage          2.1  2.104 member  server_action_create_image       os_compute_api:servers:create_image
POST   /servers/{server_id}/action                    os-start             2.1  2.104 member  server_action_start              os_compute_api:servers:start
POST   /servers/{server_id}/action                    os-stop              2.1  2.104 member  server_action_stop               os_compute_api:servers:stop
POST   /servers/{server_id}/action                    trigger_crash_dump   2.17 2.104 member  server_action_trigger_crash_dump os_compute_api:servers:trigger_crash_dump
POST   /servers/{server_id}/action                    resetNetwork         -    -     gone    gone                             -
POST   /servers/{server_id}/action                    injectNetworkInfo    2.1  2.104 admin   server_action_inject_network_info os_compute_api:os-admin-actions:inject_network_info
POST   /servers/{server_id}/action                    os-resetState        2.1  2.104 admin   server_action_reset_state        os_compute_api:os-admin-actions:reset_state
POST   /servers/{server_id}/action                    changePassword       2.1  2.104 member  server_action_change_password    os_compute_api:os-admin-password
POST   /servers/{server_id}/action                    os-getConsoleOutput  2.1  2.104 member  server_action_get_console_output os_compute_api:os-console-output
POST   /servers/{server_id}/action                    createBackup         2.1  2.104 member  server_action_create_backup      os_compute_api:os-create-backup
POST   /servers/{server_id}/action                    restore              2.1  2.104 member  server_action_restore            os_compute_api:os-deferred-delete:restore
POST   /servers/{server_id}/action                    forceDelete          2.1  2.104 member  server_action_force_delete       os_compute_api:os-deferred-delete:force
POST   /servers/{server_id}/action                    evacuate             2.1  2.104 admin   server_action_evacuate           os_compute_api:os-evacuate
POST   /servers/{server_id}/action                    addFloatingIp        2.1  2.43  member  server_action_add_floating_ip    os_compute_api:os-floating-ips:add
POST   /servers/{server_id}/action                    removeFloatingIp     2.1  2.43  member  server_action_remove_floating_ip os_compute_api:os-floating-ips:remove
POST   /servers/{server_id}/action                    lock                 2.1  2.104 member  server_action_lock               os_compute_api:os-lock-server:lock
POST   /servers/{server_id}/action                    unlock               2.1  2.104 member  server_action_unlock             os_compute_api:os-lock-server:unlock
POST   /servers/{server_id}/action                    migrate              2.1  2.104 manager server_action_migrate            os_compute_api:os-migrate-server:migrate
POST   /servers/{server_id}/action                    os-migrateLive       2.1  2.104 manager server_action_migrate_live       os_compute_api:os-migrate-server:migrate_live
POST   /servers/{server_id}/action                    addFixedIp           2.1  2.43  member  server_action_add_fixed_ip       os_compute_api:os-multinic:add
POST   /servers/{server_id}/action                    removeFixedIp        2.1  2.43  member  server_action_remove_fixed_ip    os_compute_api:os-multinic:remove
POST   /servers/{server_id}/action                    pause                2.1  2.104 member  server_action_pause              os_compute_api:os-pause-server:pause
POST   /servers/{server_id}/action                    unpause              2.1  2.104 member  server_action_unpause            os_compute_api:os-pause-server:unpause
POST   /servers/{server_id}/action                    os-getVNCConsole     2.1  2.5   member  server_action_get_vnc_console    os_compute_api:os-remote-consoles
POST   /servers/{server_id}/action                    os-getSPICEConsole   2.1  2.5   member  server_action_get_spice_console  os_compute_api:os-remote-consoles
POST   /servers/{server_id}/action                    os-getRDPConsole     -    -     gone    gone                             -
POST   /servers/{server_id}/action                    os-getSerialConsole  2.1  2.5   member  server_action_get_serial_console os_compute_api:os-remote-consoles
POST   /servers/{server_id}/action                    rescue               2.1  2.104 member  server_action_rescue             os_compute_api:os-rescue
POST   /servers/{server_id}/action                    unrescue             2.1  2.104 member  server_action_unrescue           os_compute_api:os-unrescue
POST   /servers/{server_id}/action                    addSecurityGroup     2.1  2.104 member  server_action_add_security_group os_compute_api:os-security-groups:add
POST   /servers/{server_id}/action                    removeSecurityGroup  2.1  2.104 member  server_action_remove_security_group os_compute_api:os-security-groups:remove
POST   /servers/{server_id}/action                    shelve               2.1  2.104 member  server_action_shelve             os_compute_api:os-shelve:shelve
POST   /servers/{server_id}/action                    shelveOffload        2.1  2.104 admin   server_action_shelve_offload     os_compute_api:os-shelve:shelve_offload
POST   /servers/{server_id}/action                    unshelve             2.1  2.104 member  server_action_unshelve           os_compute_api:os-shelve:unshelve
POST   /servers/{server_id}/action                    suspend              2.1  2.104 member  server_action_suspend            os_compute_api:os-suspend-server:suspend
POST   /servers/{server_id}/action                    resume               2.1  2.104 member  server_action_resume             os_compute_api:os-suspend-server:resume
GET    /servers/{server_id}/consoles                  -                    -    -     gone    gone                             -
POST   /servers/{server_id}/consoles                  -                    -    -     gone    gone                             -
GET    /servers/{server_id}/consoles/{id}             -                    -    -     gone    gone                             -
DELETE /servers/{server_id}/consoles/{id}             -                    -    -     gone    gone                             -
GET    /servers/{server_id}/diagnostics               -                    2.1  2.104 admin   server_diagnostics_index         os_compute_api:os-server-diagnostics
GET    /servers/{server_id}/ips                       -                    2.1  2.104 reader  server_ips_index                 os_compute_api:ips:index
GET    /servers/{server_id}/ips/{id}                  -                    2.1  2.104 reader  server_ips_show                  os_compute_api:ips:show
GET    /servers/{server_id}/metadata                  -                    2.1  2.104 reader  server_metadata_index            os_compute_api:server-metadata:index
POST   /servers/{server_id}/metadata                  -                    2.1  2.104 member  server_metadata_create           os_compute_api:server-metadata:create
PUT    /servers/{server_id}/metadata                  -                    2.1  2.104 member  server_metadata_update_all       os_compute_api:server-metadata:update_all
GET    /servers/{server_id}/metadata/{id}             -                    2.1  2.104 reader  server_metadata_show             os_compute_api:server-metadata:show
PUT    /servers/{server_id}/metadata/{id}             -                    2.1  2.104 member  server_metadata_update           os_compute_api:server-metadata:update
DELETE /servers/{server_id}/metadata/{id}             -                    2.1  2.104 member  server_metadata_delete           os_compute_api:server-metadata:delete
GET    /servers/{server_id}/migrations                -                    2.23 2.104 manager server_migrations_index                os_compute_api:servers:migrations:index
GET    /servers/{server_id}/migrations/{id}           -                    2.23 2.104 admin   server_migrations_show                 os_compute_api:servers:migrations:show
DELETE /servers/{server_id}/migrations/{id}           -                    2.24 2.104 manager server_migrations_delete               os_compute_api:servers:migrations:delete
POST   /servers/{server_id}/migrations/{id}/action    force_complete       2.22 2.104 manager server_migration_action_force_complete os_compute_api:servers:migrations:force_complete
GET    /servers/{server_id}/os-instance-actions       -                    2.1  2.104 reader  instance_actions_index           os_compute_api:os-instance-actions:list
GET    /servers/{server_id}/os-instance-actions/{id}  -                    2.1  2.104 reader  instance_actions_show            os_compute_api:os-instance-actions:show
GET    /servers/{server_id}/os-interface              -                    2.1  2.104 reader  server_interfaces_index          os_compute_api:os-attach-interfaces:list
POST   /servers/{server_id}/os-interface              -                    2.1  2.104 member  server_interfaces_create         os_compute_api:os-attach-interfaces:create
GET    /servers/{server_id}/os-interface/{id}         -                    2.1  2.104 reader  server_interfaces_show           os_compute_api:os-attach-interfaces:show
DELETE /servers/{server_id}/os-interface/{id}         -                    2.1  2.104 member  server_interfaces_delete         os_compute_api:os-attach-interfaces:delete
GET    /servers/{server_id}/os-server-password        -                    2.1  2.104 reader  server_password_index            os_compute_api:os-server-password:show
DELETE /servers/{server_id}/os-server-password        -                    2.1  2.104 member  server_password_clear            os_compute_api:os-server-password:clear
GET    /servers/{server_id}/os-virtual-interfaces     -                    -    -     gone    gone                             -
GET    /servers/{server_id}/os-volume_attachments     -                    2.1  2.104 reader  server_volume_attachments_index  os_compute_api:os-volumes-attachments:index
POST   /servers/{server_id}/os-volume_attachments     -                    2.1  2.104 member  server_volume_attachments_create os_compute_api:os-volumes-attachments:create
GET    /servers/{server_id}/os-volume_attachments/{id} -                    2.1  2.104 reader  server_volume_attachments_show   os_compute_api:os-volumes-attachments:show
PUT    /servers/{server_id}/os-volume_attachments/{id} -                    2.1  2.104 member  server_volume_attachments_update os_compute_api:os-volumes-attachments:update
DELETE /servers/{server_id}/os-volume_attachments/{id} -                    2.1  2.104 member  server_volume_attachments_delete os_compute_api:os-volumes-attachments:delete
POST   /servers/{server_id}/remote-consoles           -                    2.6  2.104 member  server_remote_consoles_create    os_compute_api:os-remote-consoles
GET    /servers/{server_id}/os-security-groups        -                    2.1  2.104 reader  server_security_groups_index     os_compute_api:os-security-groups:list
GET    /servers/{server_id}/shares                    -                    2.97 2.104 reader  -                                os_compute_api:os-server-shares:index
POST   /servers/{server_id}/shares                    -                    2.97 2.104 member  -                                os_compute_api:os-server-shares:create
GET    /servers/{server_id}/shares/{id}               -                    2.97 2.104 reader  -                                os_compute_api:os-server-shares:show
DELETE /servers/{server_id}/shares/{id}               -                    2.97 2.104 member  -                                os_compute_api:os-server-shares:delete
GET    /servers/{server_id}/tags                      -                    2.26 2.104 reader  server_tags_index                os_compute_api:os-server-tags:index
PUT    /servers/{server_id}/tags                      -                    2.26 2.104 member  server_tags_update_all           os_compute_api:os-server-tags:update_all
DELETE /servers/{server_id}/tags                      -                    2.26 2.104 member  server_tags_delete_all           os_compute_api:os-server-tags:delete_all
GET    /servers/{server_id}/tags/{id}                 -                    2.26 2.104 reader  server_tags_show                 os_compute_api:os-server-tags:show
PUT    /servers/{server_id}/tags/{id}                 -                    2.26 2.104 member  server_tags_update               os_compute_api:os-server-tags:update
DELETE /servers/{server_id}/tags/{id}                 -                    2.26 2.104 member  server_tags_delete               os_compute_api:os-server-tags:delete
GET    /servers/{server_id}/topology                  -                    2.78 2.104 reader  server_topology_index            compute:server:topology:index
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


def index_routes(routes):
    """{(segment count, first segment): the routes that may match such a path, in table
    order}; the first segment None stands for any other (routes that begin with a
    parameter)."""
    index = {}
    for route in routes:
        n = len(route.segments)
        first = route.segments[0] if n else None
        if first is not None and first.startswith("{"):
            first = None
        index.setdefault((n, first), [])
    for (n, first), bucket in index.items():
        bucket.extend(r for r in routes if len(r.segments) == n and (
            not n or r.segments[0] == first or r.segments[0].startswith("{")))
    return index


ROUTE_INDEX = index_routes(ROUTES)


def find_routes(segments):
    """(routes of the most specific matching path, params) or ([], None)."""
    best, best_key, params = [], None, None
    n = len(segments)
    candidates = ROUTE_INDEX.get((n, segments[0] if n else None)) or \
        ROUTE_INDEX.get((n, None), ())
    for route in candidates:
        got = route.match(segments)
        if got is None:
            continue
        key = route.specificity()
        if best_key is None or key > best_key:
            best, best_key, params = [route], key, got
        elif key == best_key and route.path == best[0].path:
            best.append(route)
    return best, params


# § 40 HTTP front end ------------------------------------------------------------------

JSON_TYPES_ALLOWED = ("", "text/plain", "application/json",
                      "application/vnd.openstack.compute+json")
SECRET_FIELDS = re.compile(r'("(?:private_key|adminPass|password|auth_token|token|user_data|'
                           r'OS-EXT-SRV-ATTR:user_data|contents|new_password)"\s*:\s*)'
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

    def __init__(self, conf, store, auth=None, driver=None, clock=None, drivers=None):
        self.conf = conf
        self.store = store
        self.clock = clock or Clock()
        self.auth = auth or NoAuth(conf["noauth_identity"])
        if drivers is None:
            drivers = {conf["compute_hosts"][0][0]: driver} if driver is not None else {}
        self.drivers = dict(drivers)            # compute host name -> its LibvirtDriver
        self.driver = next(iter(self.drivers.values()), None)   # the first host's
        self.scheduler_lock = threading.Lock()
        self.started_at = self.clock.now()
        self.stopping = False
        self._images = None
        self.services = {}              # option -> (client or None, when it was looked up)
        self.images_lock = threading.Lock()
        self.compute = Compute(self)
        self.volume_cleanups = VolumeCleanups(self)
        self.claims = Claims(store)
        self.usage = ServerUsage(store)
        self.server_order = ServerOrder(store)
        self.views = ViewCache(store, conf["view_cache_servers"])
        self.faults = FaultRules(self) if conf.get("fault_injection") else None
        self.image_service = ImageService(self)
        self.image_cache = ImageCache(os.path.join(conf["data_dir"], "_base"))
        self.console_tokens = ConsoleTokens(conf["console_token_ttl"])
        self.placement_sync = PlacementSync(self)

    @property
    def images(self):
        """The image source: Glance when configured or in the catalog, else the local
        image directory.  Found on first use (503 while Keystone cannot say)."""
        if self._images is None:
            with self.images_lock:
                if self._images is None:
                    self._images = self.find_image_source()
        return self._images

    def find_image_source(self):
        url = self.conf["glance_url"]
        if url == "local":
            url = ""
        elif not url and isinstance(self.auth, KeystoneAuth):
            url = self.auth.find_endpoint("image", region=self.conf["region"])
        if url and isinstance(self.auth, KeystoneAuth):
            LOG.info("images come from Glance at %s", url)
            return GlanceImages(url, self.auth, self.clock)
        if url:
            LOG.warning("--glance-url needs --auth keystone (Glance needs tokens): using the "
                        "local image directory")
        images = LocalImages(self.conf["images_dir"], self.store, self.clock)
        images.forget_partial_uploads()
        return images

    @property
    def volumes(self):
        """The block storage service (Cinder), or None when this cloud has none."""
        return self.catalog_service(
            "cinder_url", ("volumev3", "block-storage"),
            lambda url: Cinder(url, self.auth, self.clock),
            "volumes come from Cinder at %s", "servers get no volumes")

    @property
    def network(self):
        """The network service (Neutron), or None when this cloud has none: servers'
        NICs then join libvirt networks."""
        return self.catalog_service(
            "neutron_url", ("network",), lambda url: Neutron(url, self.auth),
            "ports come from Neutron at %s", "servers use libvirt networks")

    @property
    def placement(self):
        """The Placement service, or None when this cloud has none."""
        return self.catalog_service(
            "placement_url", ("placement",), lambda url: Placement(url, self.auth),
            "resource providers and allocations are kept in Placement at %s",
            "minivan keeps its own accounting only")

    def catalog_service(self, option, types, make, found, without):
        """A client for the service at --OPTION, else at the first of these catalog types;
        None without one.  Found on first use; a catalog without one is asked again after
        a minute."""
        cached = self.services.get(option)
        if cached is not None and (cached[0] is not None
                                   or time.monotonic() - cached[1] < 60):
            return cached[0]
        url = self.conf[option]
        keystone = isinstance(self.auth, KeystoneAuth)
        for service_type in types if not url and keystone else ():
            url = url or self.auth.find_endpoint(service_type, region=self.conf["region"])
        service = None
        if url and keystone:
            LOG.info(found, url)
            service = make(url)
        elif url:
            LOG.warning("--%s needs --auth keystone (the service needs tokens): %s",
                        option.replace("_", "-"), without)
        self.services[option] = (service, time.monotonic())
        return service

    def network_name(self, network_id):
        """The libvirt network with this UUID, or None."""
        if self.driver is None:
            return None
        return self.driver.network_name(network_id)

    def compute_available(self, host=None):
        """Whether a compute host (default: the first) is reachable."""
        driver = self.drivers.get(host) if host else self.driver
        return driver is not None and driver.available

    def host_driver(self, host):
        """The driver of a compute host; None (no host) means the first host's."""
        driver = self.drivers.get(host) if host else self.driver
        if driver is None:
            if not self.drivers:
                raise Unavailable("minivan runs without a hypervisor.")
            raise Unavailable(f"Compute host {host} is not configured.")
        return driver

    def compute_host_names(self):
        return list(self.drivers)

    # -- entry point -------------------------------------------------------------
    def handle(self, method, target, headers, body=b"", secure=False, stream=None,
               client=None):
        """One HTTP request in, one Response out; never raises.

        body is None when the client sent more than --max-body-size (413); stream is an
        iterator of chunks for image uploads, which have no size limit."""
        split = urllib.parse.urlsplit(target)
        path = split.path or "/"
        base = self.base_url(headers, secure)
        if path == "/healthcheck":
            if not self.store_answers():
                return Response(503, b"the state store does not answer\n",
                                content_type="text/plain")
            return Response(200, b"OK", content_type="text/plain")
        if path == "/image" or path.startswith("/image/"):
            return self.handle_image(method, path[len("/image"):], split.query, headers, body,
                                     stream)
        if path == "/minivan/v1/faults" or path.startswith("/minivan/v1/faults/"):
            return self.handle_faults(method, path, headers, body)
        if body is None and not path.startswith("/v2"):
            return Response(413, TooLarge().body())
        if path in ("", "/"):
            return Response(200, versions_root(base))
        for root, legacy in (("/v2.1", False), ("/v2", True)):
            if path == root or path.startswith(root + "/"):
                return self.handle_api(method, path[len(root):], split.query, headers, body,
                                       base, legacy)
        return Response(300, versions_choices(base, path))

    def store_answers(self, timeout=5):
        """True when the state store's lock can be had within timeout seconds."""
        if not self.store.cond.acquire(timeout=timeout):
            return False
        self.store.cond.release()
        return True

    def check_host(self, headers):
        if not self.host_allowed(headers.get("Host")):
            raise Forbidden("minivan runs without authentication (--auth noauth): it answers "
                            "only requests addressed to a loopback name or address, or to "
                            "--public-url's host")

    def host_allowed(self, host):
        """In noauth, where every caller may be admin, only a request addressed to a
        loopback name or address (or --public-url's host) is answered: a web page the
        operator visits cannot reach the API by rebinding its own name to 127.0.0.1."""
        if self.conf["auth"] != "noauth" or self.conf["noauth_allow_remote"] or not host:
            return True
        try:
            name = urllib.parse.urlsplit("//" + host).hostname or ""
        except ValueError:
            return False
        return is_loopback_address(name) or \
            name == urllib.parse.urlsplit(self.conf["public_url"]).hostname

    def side_service(self, method, shown, work, fault_response, error_body):
        """Answer a request outside the compute API (/image, /minivan/v1/faults): work()
        gives the Response; a Fault becomes fault_response(fault), a bug a 500 with
        error_body(message); each gets a request id and one access-log line."""
        request_id = new_request_id()
        token = CURRENT_REQUEST.set(request_id)
        try:
            resp = work()
        except Fault as fault:
            resp = fault_response(fault)
        except Exception as exc:  # noqa: BLE001 - the daemon keeps serving
            LOG.exception("unexpected error in %s %s", method, shown)
            resp = Response(500, error_body(unexpected_error_message(exc)))
        resp.headers.append(("x-openstack-request-id", request_id))
        LOG.info("\"%s %s\" status: %s len: %s", method, shown, resp.status, len(resp.payload))
        CURRENT_REQUEST.reset(token)
        return resp

    def handle_image(self, method, rest, query, headers, body, stream):
        """The standalone image service (a Glance v2 subset), in Glance's error shape."""
        def work():
            self.check_host(headers)
            if not isinstance(self.images, LocalImages):
                return Response(404, {"code": "404 Not Found", "title": "Not Found",
                                      "message": "This cloud's images are in Glance: minivan's "
                                                 "own image service is off."})
            if body is None:
                return Response(413, {"code": "413 Request Entity Too Large",
                                      "title": "Request Entity Too Large",
                                      "message": "Request is too large."})
            doc = None
            if body and stream is None:
                try:
                    doc = json.loads(body.decode("utf-8"), parse_constant=reject_constant)
                except (ValueError, UnicodeDecodeError, RecursionError):
                    return Response(400, {"code": "400 Bad Request", "title": "Bad Request",
                                          "message": "Malformed JSON in request body."})
            pairs = urllib.parse.parse_qs(query, keep_blank_values=True)
            return self.image_service.handle(method, rest, pairs, headers, doc, stream)
        return self.side_service(
            method, "/image" + rest, work, lambda fault: Response(fault.code, fault.body()),
            lambda message: {"code": "500 Internal Server Error", "title": "Error",
                             "message": message})

    def handle_faults(self, method, path, headers, body):
        """/minivan/v1/faults, in Nova's fault shape."""
        def work():
            if body is None:
                raise TooLarge()
            self.check_host(headers)
            return Response(*faults_endpoint(self, method, path, headers, body))
        return self.side_service(method, path, work,
                                 lambda fault: self.fault_response(fault, None),
                                 lambda message: {"computeFault": {"code": 500,
                                                                   "message": message}})

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
            self.check_host(headers)
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
        if rest in ("", "/"):
            if method not in ("GET", "HEAD"):
                raise BadMethod(headers={"Allow": "GET"})
            return Response(200, {"version": version_entry(req.base_url,
                                                           "v2.0" if req.legacy else "v2.1", True)})
        req.ident = self.auth.identify(req.headers.get("X-Auth-Token"))
        # a trailing slash leaves an empty last segment ('/images/' is an image with an
        # empty id: 404), as Nova's router does
        segments = [urllib.parse.unquote(s) for s in rest.split("/")[1:]]
        if segments and segments[0] not in KNOWN_ROOTS:
            project = segments.pop(0)
            if project != req.ident.project_id:
                raise BadRequest(f"Malformed request URL: URL's project_id '{project}' doesn't "
                                 f"match Context's project_id '{req.ident.project_id}'")
            req.project_in_url = project
        if segments == [""]:
            segments = []
        routes, params = find_routes(segments)
        if not routes or "" in params.values():
            raise NotFound()                # an empty id ('/images/') matches nothing
        want = "GET" if method == "HEAD" else method
        candidates = [r for r in routes if r.method == want]
        if not candidates:
            allow = sorted({r.method for r in routes} | ({"HEAD"} if any(
                r.method == "GET" for r in routes) else set()))
            raise BadMethod(headers={"Allow": ", ".join(allow)})
        if segments[:1] == ["os-volumes_boot"] and "id" in params:
            params["server_id"] = params["id"]     # the old alias of /servers
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
        if self.faults is not None and "server_id" in req.params and route.handler and (
                route.action or (method == "DELETE" and route.path == "/servers/{server_id}")):
            self.faults.fail_api("action" if route.action else "delete",
                                 find_server(req, req.params["server_id"]), route.action)
        if route.handler is None:
            if "server_id" in req.params:
                find_server(req, req.params["server_id"])
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
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            # each answer goes out whole at once (head and body may be two writes)
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, ssl.SSLError, socket.timeout, TimeoutError):
            self.close_connection = True

    def handle_one_request(self):
        """One request; the --client-timeout clock runs from its first byte to the end
        of its body (an idle keep-alive connection waits `timeout` for the next one)."""
        sock = self.connection
        if not isinstance(sock, ssl.SSLSocket):
            try:
                if not sock.recv(1, socket.MSG_PEEK):
                    self.close_connection = True
                    return
            except OSError:
                self.close_connection = True
                return
        self.server.receiving(sock)
        try:
            super().handle_one_request()
        finally:
            self.server.received(sock)

    def dispatch(self):
        app = self.server.app
        self.server.begin_request()
        try:
            stream = None
            if self.command == "PUT" and re.match(r"^/image/v2/images/[^/?]+/file(\?|$)",
                                                  self.path):
                body, stream = b"", self.body_chunks()
            else:
                body = self.read_body()
            self.server.received(self.connection)    # (an upload may take its time)
            if body is False:
                return
            resp = app.handle(self.command, self.path, self.headers, body,
                              secure=isinstance(self.connection, ssl.SSLSocket), stream=stream,
                              client=self.client_address[0])
            if stream is not None:
                for _ in stream:        # drain what the handler did not read
                    pass
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

    def body_chunks(self):
        """The request body as an iterator of chunks, however large (image uploads)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    self.close_connection = True
                    return
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield self.rfile.read(size)
                self.rfile.readline(1024)
        try:
            left = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            left = 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                self.close_connection = True
                return
            left -= len(chunk)
            yield chunk

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
        lines = ["%s %d %s" % (self.protocol_version, resp.status,
                               STATUS_TEXT.get(resp.status, ""))]
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
        if head or len(resp.payload) < 65536:
            self.wfile.write(head_bytes + (b"" if head else resp.payload))
        else:                               # a large body is not copied once more
            self.wfile.write(head_bytes)
            self.wfile.write(resp.payload)
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
        self.slots = threading.BoundedSemaphore(app.conf.get("max_connections", 1000))
        self.client_timeout = app.conf.get("client_timeout", 60)
        self.reading = {}              # socket -> when its request must have arrived
        self.reading_lock = threading.Lock()
        self.closed = threading.Event()
        self.tls = tls_context
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

    def server_activate(self):
        super().server_activate()
        threading.Thread(target=self.cut_slow_clients, daemon=True,
                         name="slow-clients").start()

    def server_close(self):
        self.closed.set()
        super().server_close()

    def process_request(self, request, client_address):
        """A thread per connection, up to --max-connections; past that, 503 at once."""
        if not self.slots.acquire(blocking=False):
            LOG.warning("%d connections already (--max-connections): refusing one from %s",
                        self.app.conf.get("max_connections", 1000), client_address[0])
            if not isinstance(request, ssl.SSLSocket):
                body = json.dumps(Unavailable("Too many connections; try again.").body())
                try:
                    request.sendall(("HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                                     "application/json\r\nRetry-After: 1\r\nConnection: "
                                     "close\r\nX-OpenStack-Request-ID: %s\r\n"
                                     "Content-Length: %d\r\n\r\n%s"
                                     % (new_request_id(), len(body), body)).encode())
                except OSError:
                    pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def receiving(self, sock):
        with self.reading_lock:
            self.reading[sock] = time.monotonic() + self.client_timeout

    def received(self, sock):
        with self.reading_lock:
            self.reading.pop(sock, None)

    def cut_slow_clients(self):
        """Close the connections whose request has not arrived in --client-timeout."""
        while not self.closed.wait(1):
            now = time.monotonic()
            with self.reading_lock:
                late = [sock for sock, deadline in self.reading.items() if deadline < now]
                for sock in late:
                    del self.reading[sock]
            for sock in late:
                LOG.warning("a client took more than %d s to send its request: closing it",
                            self.client_timeout)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

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


# § 41 systemd and signals -------------------------------------------------------------

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


def watchdog_loop(stop, healthy, environ=None):
    """Pings systemd's watchdog at half its interval, each time healthy() says the serving
    loop and the state store answer: a hung minivan is restarted by systemd."""
    environ = os.environ if environ is None else environ
    try:
        interval = int(environ.get("WATCHDOG_USEC", "0")) / 2e6
    except ValueError:
        return
    while interval and not stop.wait(interval):
        if healthy(max(0.1, min(interval, 5))):
            sd_notify("WATCHDOG=1", environ)
        else:
            LOG.error("minivan does not answer its own /healthcheck: systemd's watchdog is "
                      "not pinged")


def answers_healthcheck(server, timeout):
    """True when GET /healthcheck, sent to minivan's own listening socket, gets 200 within
    timeout: the serving loop accepts, a handler runs, and the store answers."""
    host, port = server.server_address[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        if server.tls is not None:
            context = ssl._create_unverified_context()      # ourselves, by address
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", "/healthcheck")
            return conn.getresponse().status == 200
        finally:
            conn.close()
    except (OSError, http.client.HTTPException):
        return False


def power_sync_loop(app, events, stop):
    """Lifecycle events as they come, plus Nova's periodic sweep over every guest."""
    interval = app.conf["sync_power_state_interval"]
    next_sweep = time.monotonic() + interval
    while not stop.is_set():
        try:
            server_id = events.get(timeout=max(0.1, next_sweep - time.monotonic()))
        except queue.Empty:
            server_id = None
        try:
            if server_id is not None:
                app.compute.sync_one(server_id)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + interval
                if app.compute_available():
                    app.compute.sync_power_states()
        except Exception:  # noqa: BLE001 - the sweep must survive anything
            LOG.exception("power state sync failed")


def reconnect_loop(app, stop, interval=5.0):
    """Keeps each compute host's libvirt connection open; reads go on while one is down,
    and a host that comes back has its servers reconciled with its domains."""
    while not stop.is_set():
        for host, driver in list(app.drivers.items()):
            was_up = driver.available
            if driver.connect() and not was_up:
                LOG.info("compute host %s is back: reconciling its servers", host)
                try:
                    app.compute.reconcile([host])
                except Exception:  # noqa: BLE001 - the loop must survive anything
                    LOG.exception("reconciling the servers of host %s failed", host)
        stop.wait(interval)


# § 42 main ----------------------------------------------------------------------------

def configure_drivers(conf, drivers):
    for name, driver in drivers.items():
        driver.configure(conf, name)


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
    # a request waiting for the interpreter waits at most this long for another thread
    # (a writer, a snapshot's reaper, a long list) to give it up: 1 ms, not Python's 5 ms
    sys.setswitchinterval(0.001)
    stop = threading.Event()
    try:
        drivers = {name: LibvirtDriver(uri, conf["virt_type"], conf["network"],
                                       conf["instances_dir"], conf["volume_mount_base"],
                                       conf["firewall"],
                                       os.path.join(conf["data_dir"], "_base"))
                   for name, uri in conf["compute_hosts"]}
        if conf["vnc_listen"]:
            for (name, uri), driver in zip(conf["compute_hosts"], drivers.values()):
                driver.graphics_listen = graphics_address(uri)
        configure_drivers(conf, drivers)
        store = open_store(conf)
        os.makedirs(conf["instances_dir"], mode=0o711, exist_ok=True)  # QEMU passes through
    except (ConfigError, StateError) as e:
        print(f"minivan: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"minivan: cannot make the instances directory {conf['instances_dir']}: "
              f"{e.strerror}", file=sys.stderr)
        return 2
    for binary, state in list(store.data.get("services", {}).items()):
        if state.get("deleted"):            # a deleted service registers again at start
            store.commit([["del", ["services", binary, "deleted"]]])
    auth = KeystoneAuth(conf, Clock()) if conf["auth"] == "keystone" else None
    app = App(conf, store, auth=auth, drivers=drivers)
    try:
        server = listen(app, conf)
    except (OSError, ConfigError) as e:
        store.close()
        print(f"minivan: cannot listen on [{conf['bind']}]:{conf['port']}: {e}", file=sys.stderr)
        return 2
    if conf["auth"] == "noauth":
        LOG.warning("AUTHENTICATION IS OFF (--auth noauth): any caller is admin by default; "
                    "listening on %s only", conf["bind"])
    events = queue.Queue()
    for driver in drivers.values():
        driver.enable_events(events.put)
    up = [host for host, driver in drivers.items() if driver.connect()]
    if up:      # meanwhile the API answers; each server is locked while it is reconciled
        threading.Thread(target=app.compute.reconcile, args=(up,), daemon=True,
                         name="reconcile").start()
    threading.Thread(target=reconnect_loop, args=(app, stop), daemon=True,
                     name="libvirt-reconnect").start()
    threading.Thread(target=power_sync_loop, args=(app, events, stop), daemon=True,
                     name="power-sync").start()
    threading.Thread(target=volume_cleanup_loop, args=(app, stop), daemon=True,
                     name="volume-cleanups").start()
    threading.Thread(target=placement_loop, args=(app, stop), daemon=True,
                     name="placement").start()
    threading.Thread(target=watchdog_loop, args=(
        stop, functools.partial(answers_healthcheck, server)), daemon=True,
        name="watchdog").start()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    serving = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    serving.start()
    try:
        metadata = metadata_listener(app, conf)
    except (OSError, ConfigError) as e:
        print(f"minivan: cannot serve metadata on {conf['metadata_listen']}: {e}",
              file=sys.stderr)
        return 2
    if metadata is not None:
        threading.Thread(target=metadata.serve_forever, name="metadata", daemon=True).start()
        LOG.info("metadata service for guests on %s", conf["metadata_listen"])
    proxies = []
    for kind, option in (("serial", "serial_console_listen"), ("vnc", "vnc_listen")):
        try:
            proxy = console_proxy_listener(app, conf, kind)
        except (OSError, ConfigError) as e:
            print(f"minivan: cannot serve {kind} consoles on {conf[option]}: {e}",
                  file=sys.stderr)
            return 2
        if proxy is not None:
            proxies.append(proxy)
            threading.Thread(target=proxy.serve_forever, name=kind + "-consoles",
                             daemon=True).start()
            LOG.info("%s console proxy on %s", kind, conf[option])
    scheme = "https" if conf["tls_cert"] else "http"
    LOG.info("minivan serving the compute API %s-%s on %s://[%s]:%d/v2.1 (auth %s, data %s)",
             version_text(MIN_VERSION), version_text(MAX_VERSION), scheme, conf["bind"],
             server.server_port, conf["auth"], conf["data_dir"])
    sd_notify("READY=1\nSTATUS=serving the compute API")
    while not stop.wait(0.5):   # wake up now and then: a signal may reach another thread
        pass
    sd_notify("STOPPING=1")
    LOG.info("stopping: no new connections, finishing requests in flight")
    app.stopping = True
    if metadata is not None:
        metadata.shutdown()
    for proxy in proxies:
        proxy.shutdown()
    server.shutdown()
    server.server_close()
    server.drain()
    app.compute.wait_idle(timeout=conf["shutdown_timeout"])
    store.close()
    for driver in drivers.values():
        driver.close()
    LOG.info("stopped; state saved in %s", conf["data_dir"])
    return 0


def run_from_bytecode():
    """Run as `python3 minivan.py`, Python compiled this file from source, and the
    compiler's memory (some 30 MB) stays with the process.  So the script replaces
    itself (os.execv: same PID, as systemd expects) with an interpreter that imports
    minivan from its cached bytecode in __pycache__, written here when missing or
    stale.  Where that cannot be written, it runs on as it is."""
    import importlib.util
    import py_compile
    source = os.path.abspath(__file__)
    try:
        cached = importlib.util.cache_from_source(source)
        st = os.stat(source)
        with open(cached, "rb") as f:
            head = f.read(16)
        fresh = len(head) == 16 and head[:4] == importlib.util.MAGIC_NUMBER and \
            int.from_bytes(head[4:8], "little") == 0 and \
            int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF and \
            int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF
    except (OSError, NotImplementedError):
        fresh = False
    if not fresh:
        try:
            py_compile.compile(source, cfile=cached, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
        except (OSError, py_compile.PyCompileError, NameError):
            return
    code = ("import sys; sys.path.insert(0, %r); import minivan; "
            "sys.exit(minivan.main())" % os.path.dirname(source))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, "-c", code, *sys.argv[1:]])
    except OSError:
        return


if __name__ == "__main__":
    run_from_bytecode()
    sys.exit(main())
