#!/usr/bin/env python3
"""nova-guest.py - the domain XML Nova's own libvirt driver writes for a guest.

Runs in the virtualenv tools/setup-venvs.sh makes with nova 34.0.0 (.venv-nova).  Reads a
JSON list of cases on stdin and writes a JSON list of results on stdout, one per case:

    case:   {"flavor": {"vcpus", "ram", "disk", "ephemeral", "swap", "extra_specs"},
             "image": {"disk_format", "properties"},
             "config_drive": bool, "ports": N,
             "conf": {"libvirt": {"virt_type": "kvm", ...}, "DEFAULT": {...}, ...},
             "host": {"uefi": bool, "secure_boot": bool, "cpu_nodes": 1, "cpu_cores": 2,
                      "cpu_threads": 1, "cpu_sockets": 1, "kB_mem": 16780000,
                      "mempages": [[[size KiB, count], ...] per cell]},
             "placed": [{"flavor", "image"}, ...],  guests already on the host, in order
             "limits": {"cpu": ratio, "ram": ratio},  the scheduler's NUMA limits
             "fit_only": bool,                    only the NUMA fit, no domain
             "provider": bool}                    the host's resource provider instead
    result: {"xml": "<domain ...>", "caps": "<capabilities ...>",
             "numa": [{"id", "cpus", "pcpus", "memory", "pagesize", "pinning",
                       "reserved"}] or None}
            or {"stage": "api" | "placed" | "build", "error": "ExceptionClass",
                "message": "...", "caps": ...}
            or, for "provider": {"inventory": {RC: {...}}, "traits": [...]}, what Nova's
                driver (update_provider_tree) and resource tracker (COMPUTE_NODE and the
                driver's capability traits) give the compute node's provider

"api" is what Nova's API refuses with 400 (image properties that do not fit their fields,
flavor and image that contradict each other); "build" is what nova-compute fails with
(the server goes to ERROR).  Nothing here touches a real libvirtd: Nova's driver runs
against the fake libvirt module its own tests use (nova/tests/fixtures/libvirt.py),
configured like an x86_64 host.
"""

import json
import os
import sys
import tempfile
import uuid

import fixtures  # noqa: E402

import nova.conf  # noqa: E402
from nova import context as nova_context  # noqa: E402
from nova import exception  # noqa: E402
from nova import objects  # noqa: E402
from nova.compute import api as compute_api  # noqa: E402
from nova.compute import provider_tree  # noqa: E402
from nova.network import model as network_model  # noqa: E402
from nova.tests import fixtures as nova_fixtures  # noqa: E402
from nova.tests.fixtures import libvirt as fakelibvirt  # noqa: E402
from nova.virt import driver as virt_driver  # noqa: E402
from nova.virt import fake as fake_virt  # noqa: E402
from nova.virt import hardware  # noqa: E402
from nova.virt.libvirt import blockinfo, imagebackend  # noqa: E402
from nova.virt.libvirt import driver as libvirt_driver  # noqa: E402

CONF = nova.conf.CONF
INSTANCE_UUID = "3f9d2b4e-8f1e-4c57-9a3e-0d6c1e2b7a11"
PORT_IDS = ["6f0c1e9a-0d7b-4e55-9b1e-%012d" % i for i in range(8)]


def network_info(count):
    """Ports as Neutron binds them with ML2/OVS (os-vif's ovs VIF on br-int)."""
    vifs = []
    for i in range(count):
        subnet = network_model.Subnet(
            cidr="10.0.%d.0/24" % i, gateway=network_model.IP(address="10.0.%d.1" % i),
            ips=[network_model.FixedIP(address="10.0.%d.5" % i)])
        network = network_model.Network(
            id=str(uuid.uuid5(uuid.NAMESPACE_URL, "net%d" % i)), bridge="br-int",
            label="net%d" % i, subnets=[subnet], meta={"mtu": 1442})
        vifs.append(network_model.VIF(
            id=PORT_IDS[i], address="fa:16:3e:00:00:%02x" % i, network=network,
            type=network_model.VIF_TYPE_OVS, vnic_type=network_model.VNIC_TYPE_NORMAL,
            devname="tap" + PORT_IDS[i][:11],
            details={"port_filter": True, "ovs_hybrid_plug": False,
                     "datapath_type": "system", "bridge_name": "br-int"},
            ovs_interfaceid=PORT_IDS[i], active=True, profile={}))
    return network_model.NetworkInfo(vifs)


def make_instance(flavor, image, config_drive):
    """An Instance object with what the driver reads."""
    sysmeta = {"image_base_image_ref": image["id"],
               "image_disk_format": image.get("disk_format", "qcow2"),
               "vtpm_secret_uuid": "0b4d3a56-2d8e-4b4f-9d66-1a9b7c3e2f10"}
    for key, value in image.get("properties", {}).items():
        sysmeta["image_" + key] = value
    props = image.get("properties", {})
    return objects.Instance(
        id=1, uuid=INSTANCE_UUID, display_name="guest", project_id="p", user_id="u",
        image_ref=image["id"], root_gb=flavor.root_gb, ephemeral_gb=flavor.ephemeral_gb,
        memory_mb=flavor.memory_mb, vcpus=flavor.vcpus, system_metadata=sysmeta,
        flavor=flavor, old_flavor=None, new_flavor=None, instance_type_id=flavor.id,
        pci_devices=objects.PciDeviceList(), numa_topology=None,
        config_drive="True" if config_drive else "", vm_mode=None, vm_state=None,
        kernel_id=None, ramdisk_id=None, os_type=props.get("os_type"), vcpu_model=None,
        host="host", node="host", task_state=None, trusted_certs=None, resources=None,
        migration_context=None, info_cache=None, launched_at=None, cleaned=False,
        ephemeral_key_uuid=None)


def configure(conf):
    """Nova's defaults, then what the case sets ({group: {option: value}})."""
    CONF.clear_override("virt_type", group="libvirt")
    for group, options in conf.items():
        for name, value in options.items():
            CONF.set_override(name, value, group=None if group == "DEFAULT" else group)


def reset(conf):
    for group, options in conf.items():
        for name in options:
            CONF.clear_override(name, group=None if group == "DEFAULT" else group)


def api_checks(image, flavor):
    """What nova-api checks for this flavor and image before it accepts the server."""
    image_meta = objects.ImageMeta.from_dict(image)
    option = image.get("properties", {}).get("img_config_drive", "optional")
    if option not in ("optional", "mandatory"):
        raise exception.InvalidImageConfigDrive(config_drive=option)
    hardware.get_packed_virtqueue_constraint(flavor, image)
    compute_api.API._validate_flavor_image_numa_pci(image, flavor, validate_numa=True)
    return image_meta


def make_flavor(spec):
    return objects.Flavor(
        id=1, name="f", flavorid="f", memory_mb=spec["ram"], vcpus=spec["vcpus"],
        root_gb=spec.get("disk", 1), ephemeral_gb=spec.get("ephemeral", 0),
        swap=spec.get("swap", 0), extra_specs=dict(spec.get("extra_specs", {})),
        vcpu_weight=None, rxtx_factor=1.0)


def make_image(spec):
    return {"id": "155d900f-4e14-4e4c-a73d-069cbf4541e6", "name": "image",
            "disk_format": spec.get("disk_format", "qcow2"),
            "container_format": "bare", "status": "active", "size": 0, "min_ram": 0,
            "min_disk": 0, "properties": dict(spec.get("properties", {}))}


def cells_of(fitted):
    """A fitted instance NUMA topology as plain data."""
    if fitted is None:
        return None
    return [{"id": c.id, "cpus": sorted(c.cpuset), "pcpus": sorted(c.pcpuset),
             "memory": c.memory, "pagesize": c.pagesize,
             "pinning": {str(v): p for v, p in (c.cpu_pinning or {}).items()},
             "reserved": sorted(c.cpuset_reserved or ())} for c in fitted.cells]


def build(case, tmp):
    flavor = make_flavor(case["flavor"])
    image = make_image(case["image"])
    try:
        image_meta = api_checks(image, flavor)
    except (ValueError, exception.NovaException) as e:     # every one of them is a 400
        return {"stage": "api", "error": type(e).__name__, "message": str(e)}

    host = case.get("host", {})
    mempages = [fakelibvirt.create_mempages([tuple(p) for p in cell])
                for cell in host["mempages"]] if host.get("mempages") else None
    info = fakelibvirt.HostInfo(
        cpu_nodes=host.get("cpu_nodes", 1), cpu_sockets=host.get("cpu_sockets", 1),
        cpu_cores=host.get("cpu_cores", 2), cpu_threads=host.get("cpu_threads", 1),
        kB_mem=host.get("kB_mem", 16780000), mempages=mempages)
    conn = fakelibvirt.Connection("qemu:///system", host_info=info)
    drvr = libvirt_driver.LibvirtDriver(fake_virt.FakeVirtAPI(), True)
    drvr._host.get_connection = lambda: conn
    drvr._host._supports_uefi = host.get("uefi", True)
    drvr._host._supports_secure_boot = host.get("secure_boot", True)
    drvr._host._supports_amd_sev = False
    drvr._host._supports_intel_tdx = False
    drvr._disk_cachemode = "none"
    if case.get("provider"):
        return provider(drvr)
    instance = make_instance(flavor, image, case.get("config_drive"))
    caps = conn.getCapabilities()
    limits = case.get("limits")
    limits = limits and objects.NUMATopologyLimits(
        cpu_allocation_ratio=limits["cpu"], ram_allocation_ratio=limits["ram"])
    fitted = None
    try:
        host_topology = drvr._get_host_numa_topology()
        for earlier in case.get("placed", []):      # the resource tracker's usage
            wanted = hardware.numa_get_constraints(
                make_flavor(earlier["flavor"]),
                objects.ImageMeta.from_dict(make_image(earlier["image"])))
            got = hardware.numa_fit_instance_to_host(host_topology, wanted, None, limits)
            if got is None:
                return {"stage": "placed", "error": "NoValidHost", "caps": caps,
                        "message": "an earlier guest does not fit"}
            host_topology = hardware.numa_usage_from_instance_numa(host_topology, got)
        topology = hardware.numa_get_constraints(flavor, image_meta)
        if topology is not None:
            fitted = hardware.numa_fit_instance_to_host(host_topology, topology, None,
                                                        limits)
            if fitted is None:
                return {"stage": "build", "error": "NoValidHost", "caps": caps,
                        "message": "No valid host was found. "}
            instance.numa_topology = fitted
        if case.get("fit_only"):             # the fit alone, without the domain
            return {"caps": caps, "numa": cells_of(fitted)}
        disk_info = blockinfo.get_disk_info(CONF.libvirt.virt_type, instance, image_meta)
        cfg = drvr._get_guest_config(
            instance, network_info(case.get("ports", 1)), image_meta, disk_info,
            context=nova_context.get_admin_context())
        return {"xml": cfg.to_xml(), "caps": caps, "numa": cells_of(fitted)}
    except Exception as e:     # every failure of the driver is a build failure
        return {"stage": "build", "error": type(e).__name__, "message": str(e),
                "caps": caps}


def provider(drvr):
    drvr._update_host_specific_capabilities()       # as init_host does
    tree = provider_tree.ProviderTree()
    tree.new_root("node", str(uuid.uuid4()))
    drvr.update_provider_tree(tree, "node")
    data = tree.data("node")
    traits = set(data.traits) | {"COMPUTE_NODE"} | {
        trait for capability, trait in virt_driver.CAPABILITY_TRAITS_MAP.items()
        if drvr.capabilities.get(capability)}
    return {"inventory": data.inventory, "traits": sorted(traits)}


class Oracle(fixtures.Fixture):
    """The process set-up of Nova's own libvirt driver tests."""

    def _setUp(self):
        self.tmp = self.useFixture(fixtures.TempDir()).path
        CONF([], project="nova", default_config_files=[])
        objects.register_all()
        nova.conf.neutron.register_dynamic_opts(CONF)     # as nova-compute at start-up
        nova.conf.devices.register_dynamic_opts(CONF)
        CONF.set_override("instances_path", self.tmp)
        self.useFixture(nova_fixtures.LibvirtFixture())
        self.useFixture(nova_fixtures.CGroupsFixture())
        self.useFixture(fixtures.MonkeyPatch(
            "nova.virt.libvirt.imagebackend.Image.resolve_driver_format",
            imagebackend.Image._get_driver_format))
        self.useFixture(fixtures.MockPatch(
            "nova.objects.InstanceList.get_by_host",
            return_value=objects.InstanceList(objects=[])))
        self.useFixture(fixtures.MockPatch(
            "nova.virt.libvirt.host.Host._log_host_capabilities"))
        self.useFixture(fixtures.MockPatch("nova.objects.Instance.save"))


def main():
    cases = json.load(sys.stdin)
    results = []
    with tempfile.TemporaryDirectory():
        with Oracle() as oracle:
            for case in cases:
                conf = case.get("conf", {})
                configure(conf)
                try:
                    results.append(build(case, oracle.tmp))
                finally:
                    reset(conf)
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
