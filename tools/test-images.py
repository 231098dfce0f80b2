#!/usr/bin/env python3
"""test-images.py - the image-format corpus Tempest's ImagesFormatTest reads.

    tools/test-images.py DIR

Makes in DIR the images that OpenStack's os-test-images project describes (the same
names, formats and verdicts: which an image service and a compute service must accept
and which they must refuse), and DIR/manifest.yaml in that project's schema, which is
what Tempest's [image] images_manifest_file names.  devstack builds that corpus for
every job with Glance; this script builds it from local tools, since a test host may
reach package mirrors only.

Needs qemu-img (qemu-utils), genisoimage and sfdisk (fdisk); an image whose tool lacks
the format (qed, UDF) is left out of the manifest, as upstream does.  Stdlib only:
the manifest is written as YAML by hand.
"""
import os
import shutil
import struct
import subprocess
import sys

MB = 1024 * 1024


def run(*command, cwd):
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


def qemu_img_create(cwd, fmt, name, size, *options):
    run("qemu-img", "create", "-f", fmt, *options, name, str(size), cwd=cwd)


def blank_raw(cwd, name, size=MB):
    with open(os.path.join(cwd, name), "wb") as f:
        f.truncate(size)


def iso(cwd, name, label, *options):
    run("genisoimage", "-quiet", *options, "-V", label, "-o", name, "/etc/hosts", cwd=cwd)


def supports_qed():
    shown = subprocess.run(["qemu-img", "-h"], capture_output=True, text=True).stdout
    return any(line.startswith("Supported formats:") and " qed" in line
               for line in shown.splitlines())


def supports_udf():
    shown = subprocess.run(["genisoimage", "-help"], capture_output=True, text=True)
    return "-udf" in shown.stdout + shown.stderr


# -- the corpus: (name, format, usable, insecure, maker(dir, filename)) -------------------

def make_qcow2(cwd, fn):
    qemu_img_create(cwd, "qcow2", fn, 10 * MB)


def make_qcow2_backing(cwd, fn):
    """A qcow2 whose backing file is a host file: reading the image reads the host."""
    qemu_img_create(cwd, "qcow2", fn, 10 * MB, "-F", "raw", "-b", "/etc/hosts")


def make_qcow2_data_file(cwd, fn):
    """A qcow2 whose data lives in an external data file (which is not shipped)."""
    qemu_img_create(cwd, "qcow2", fn, 10 * MB, "-o", "data_file=extdata,data_file_raw=on")
    os.remove(os.path.join(cwd, "extdata"))


def make_raw(cwd, fn):
    blank_raw(cwd, fn)


def make_gpt(cwd, fn):
    """A raw disk holding only a GPT label (protective MBR, headers, no partitions)."""
    blank_raw(cwd, fn)
    subprocess.run(["sfdisk", "--quiet", os.path.join(cwd, fn)], input="label: gpt\n",
                   text=True, check=True, stdout=subprocess.DEVNULL)


def make_qed(cwd, fn):
    qemu_img_create(cwd, "qed", fn, 10 * MB)


def make_iso(cwd, fn):
    iso(cwd, fn, "standard-iso9660")


def make_udf(cwd, fn):
    iso(cwd, fn, "standard-udf", "-udf")


def make_iso_qcow2_system_area(cwd, fn):
    """An ISO whose unused system area (its first 32 KiB) holds a qcow2 header: a reader
    that trusts the first magic it sees takes it for qcow2."""
    iso(cwd, fn, "iso-with-qcow2")
    qemu_img_create(cwd, "qcow2", "header.qcow2", 10 * MB)
    with open(os.path.join(cwd, "header.qcow2"), "rb") as f:
        head = f.read(32 * 1024)
    os.remove(os.path.join(cwd, "header.qcow2"))
    with open(os.path.join(cwd, fn), "r+b") as f:
        f.write(head)


def vmdk_maker(subformat):
    def make(cwd, fn):
        qemu_img_create(cwd, "vmdk", fn, 10 * MB, "-o", f"subformat={subformat}")
    return make


def make_vmdk_flat_missing(cwd, fn):
    """A monolithicFlat descriptor without its flat extent."""
    qemu_img_create(cwd, "vmdk", fn, 10 * MB, "-o", "subformat=monolithicFlat")
    os.remove(os.path.join(cwd, fn[:-len(".vmdk")] + "-flat.vmdk"))


def make_vmdk_flat_leak(cwd, fn):
    """A monolithicFlat descriptor whose extent is a host file."""
    flat = fn[:-len(".vmdk")] + "-flat.vmdk"
    qemu_img_create(cwd, "vmdk", fn, 10 * MB, "-o", "subformat=monolithicFlat")
    path = os.path.join(cwd, fn)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace(f'"{flat}"', '"/etc/hosts"'))
    os.remove(os.path.join(cwd, flat))


def make_vmdk_sparse_host_extent(cwd, fn):
    """A monolithicSparse whose embedded descriptor names a host file as its extent."""
    qemu_img_create(cwd, "vmdk", fn, 10 * MB, "-o", "subformat=monolithicSparse")
    with open(os.path.join(cwd, fn), "r+b") as f:
        header = f.read(512)
        offset, size = struct.unpack("<QQ", header[28:44])   # descriptor sector, sectors
        f.seek(offset * 512)
        descriptor = f.read(size * 512)
        changed = descriptor.replace(f'"{fn}"'.encode(), b'"/etc/hosts"')
        assert changed != descriptor, "no extent line in the embedded descriptor"
        f.seek(offset * 512)
        f.write(changed[:size * 512].ljust(size * 512, b"\0"))


def make_vmdk_sparse_footer(cwd, fn):
    """A monolithicSparse that says its grain directory is in a footer (the header's
    gdOffset is all ones) and ends with footer marker, footer (a copy of the header)
    and end-of-stream marker, as streamOptimized writers do."""
    qemu_img_create(cwd, "vmdk", fn, 10 * MB, "-o", "subformat=monolithicSparse")
    with open(os.path.join(cwd, fn), "r+b") as f:
        header = f.read(512)
        f.seek(56)                                            # gdOffset
        f.write(struct.pack("<Q", 0xFFFFFFFFFFFFFFFF))
        f.seek(0, os.SEEK_END)
        marker = bytearray(512)
        marker[12:16] = struct.pack("<I", 3)                  # marker type: footer
        f.write(bytes(marker) + header + bytes(512))          # then end-of-stream


CORPUS = [
    ("standard-qcow2v3", "qcow2", True, False, make_qcow2),
    ("qcow-with-backing", "qcow2", False, True, make_qcow2_backing),
    ("qcow-with-datafile", "qcow2", False, True, make_qcow2_data_file),
    ("raw-blank", "raw", True, False, make_raw),
    ("gpt-blank", "gpt", True, False, make_gpt),
    ("standard", "qed", False, False, make_qed),
    ("standard-iso9660", "iso", True, False, make_iso),
    ("standard-udf", "iso", True, False, make_udf),
    ("iso-with-qcow2-in-system", "iso", False, True, make_iso_qcow2_system_area),
    ("vmdk-monolithicSparse", "vmdk", True, False, vmdk_maker("monolithicSparse")),
    ("vmdk-streamOptimized", "vmdk", True, False, vmdk_maker("streamOptimized")),
    ("vmdk-monolithicFlat", "vmdk", False, False, make_vmdk_flat_missing),
    ("vmdk-monolithicFlat-leak", "vmdk", False, True, make_vmdk_flat_leak),
    ("vmdk-sparse-with-url-backing", "vmdk", False, True, make_vmdk_sparse_host_extent),
    ("vmdk-sparse-with-footer", "vmdk", True, False, make_vmdk_sparse_footer),
]


def main(argv):
    if len(argv) != 2 or argv[1].startswith("-"):
        sys.exit("usage: tools/test-images.py DIR")
    missing = [tool for tool in ("qemu-img", "genisoimage", "sfdisk") if not shutil.which(tool)]
    if missing:
        sys.exit(f"test-images: {', '.join(missing)} not found "
                 "(apt-get install qemu-utils genisoimage fdisk)")
    out = argv[1]
    os.makedirs(out, exist_ok=True)
    lacking = {"qed": not supports_qed(), "standard-udf": not supports_udf()}
    lines = ["images:"]
    for name, fmt, usable, insecure, make in CORPUS:
        if lacking.get(fmt) or lacking.get(name):
            print(f"test-images: {name}: not supported by the local tools, left out")
            continue
        filename = f"{name}.{fmt}"
        if os.path.exists(os.path.join(out, filename)):
            os.remove(os.path.join(out, filename))
        make(out, filename)
        lines += [f"- name: {name}", f"  format: {fmt}", f"  filename: {filename}",
                  f"  usable: {str(usable).lower()}", f"  insecure: {str(insecure).lower()}"]
    with open(os.path.join(out, "manifest.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"test-images: {(len(lines) - 1) // 5} images and manifest.yaml in {out}")


if __name__ == "__main__":
    main(sys.argv)
