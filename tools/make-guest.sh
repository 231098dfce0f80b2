#!/usr/bin/env bash
# make-guest.sh OUT.qcow2 - build minivan's tiny self-booting test guest from Debian packages.
#
# The image: an MBR disk (syslinux boot code) with one FAT partition holding syslinux, a
# Debian cloud kernel and a busybox initramfs.  Built with sfdisk/mkfs.fat/mtools/syslinux
# on a plain file: no mounts, no loop devices, no root needed beyond installing packages.
# Boots under BIOS (SeaBIOS, i440fx 'pc' machine), TCG or KVM, 256 MiB is plenty.
#
# What the guest prints on the serial console (ttyS0), one line each:
#   minivan-guest booted kernel=<version> uptime=<s>
#   minivan-guest uuid <uuid>                  if a config drive (label config-2, ISO 9660
#   minivan-guest hostname <name>              or VFAT, cdrom or disk) holds meta_data.json
#   minivan-guest ip <iface> <addr>/<prefix>   per NIC that got a DHCP lease (busybox udhcpc)
#   minivan-guest ready <addr> ...             after DHCP (addresses, or 'none')
#   minivan-guest metadata uuid <uuid> instance-id <id>   from http://169.254.169.254 (the
#                                              metadata service; 'metadata none' if silent)
#   minivan-guest acpi power button, powering off    on ACPI shutdown (virDomainShutdown)
# then a root shell stays on the console (virsh console).
#
# Downloaded .debs and the kernel bits taken from them are cached in
# ${MINIVAN_GUEST_CACHE:-${XDG_CACHE_HOME:-~/.cache}/minivan-guest}: re-runs need no download.
# Kernel: the newest one already in that cache; else (or with MINIVAN_GUEST_REFRESH=1) the
# one linux-image-cloud-amd64 depends on now; MINIVAN_GUEST_KERNEL=linux-image-... forces one.
# Host tools (installed with apt when missing): fdisk dosfstools mtools syslinux
# syslinux-common cpio kmod qemu-utils.
set -euo pipefail

T0=$(date +%s.%N)
took() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f s", b - a }'; }
say() { echo "make-guest: $*"; }
die() { echo "make-guest: $*" >&2; exit 1; }

[[ $# == 1 && $1 != -* ]] || die "usage: $0 OUT.qcow2"
OUT=$(realpath -m "$1")
mkdir -p "$(dirname "$OUT")"
CACHE=${MINIVAN_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/minivan-guest}
mkdir -p "$CACHE/debs"

# Kernel modules the guest loads, by name; their dependencies are added from modules.dep.
MODULES=(virtio_pci virtio_net virtio_blk     # virtio NIC and disks
         button evdev                         # ACPI power button -> /dev/input/event*
         ata_piix sr_mod sd_mod isofs         # config drive as IDE cdrom (ISO 9660)
         vfat nls_cp437 nls_ascii)            # config drive in VFAT format

# --- host tools -----------------------------------------------------------------------
need=()
for pair in sfdisk:fdisk mkfs.fat:dosfstools mcopy:mtools syslinux:syslinux \
            cpio:cpio depmod:kmod qemu-img:qemu-utils; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
[[ -e /usr/lib/syslinux/mbr/mbr.bin ]] || need+=(syslinux-common)
if ((${#need[@]})); then
    [[ $(id -u) == 0 ]] || die "missing host tools; as root: apt-get install ${need[*]}"
    say "installing ${need[*]}"
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        --no-install-recommends "${need[@]}" >/dev/null
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/make-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# fetch_deb PACKAGE -> path of its .deb (candidate version) in the cache
fetch_deb() {
    local pkg=$1 file
    file=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's|^Filename: .*/||p' | head -n1)
    if [[ -z $file ]]; then
        apt-get -o DPkg::Lock::Timeout=300 update -qq >&2 || true
        file=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's|^Filename: .*/||p' | head -n1)
    fi
    [[ -n $file ]] || { echo "make-guest: apt knows no package $pkg" >&2; return 1; }
    if [[ ! -s $CACHE/debs/$file ]]; then
        # (apt-get download names the file after the version, epoch as %3a: take what comes)
        local dl=$WORK/download-$pkg debs=()
        mkdir -p "$dl"
        (cd "$dl" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null) ||
            { echo "make-guest: apt-get download $pkg failed" >&2; return 1; }
        debs=("$dl"/*.deb)
        local got=${debs[0]}
        [[ -s $got ]] || { echo "make-guest: apt-get download $pkg gave no .deb" >&2; return 1; }
        mv "$got" "$CACHE/debs/$file.part"
        mv "$CACHE/debs/$file.part" "$CACHE/debs/$file"
        echo "make-guest: downloaded $file ($(( $(stat -c %s "$CACHE/debs/$file") / 1024 )) KiB)" >&2
    fi
    echo "$CACHE/debs/$file"
}

# --- kernel: vmlinuz + the modules above, taken from the .deb (never installed) ----------
t=$(date +%s.%N)
KPKG=${MINIVAN_GUEST_KERNEL:-}
if [[ -z $KPKG && ${MINIVAN_GUEST_REFRESH:-0} != 1 ]]; then
    # newest kernel already in the cache: no apt look-up at all (fast, works offline)
    KPKG=$(find "$CACHE" -maxdepth 2 -path "$CACHE/kernel-*/modules.load" 2>/dev/null |
           sed "s|^$CACHE/kernel-||; s|/modules.load$||" | sort -V | tail -n1)
    KPKG=${KPKG:+linux-image-$KPKG}
fi
if [[ -z $KPKG ]]; then
    KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
           awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
fi
if [[ -z $KPKG ]]; then
    apt-get -o DPkg::Lock::Timeout=300 update -qq || true
    KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
           awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
fi
[[ -n $KPKG ]] || die "cannot resolve linux-image-cloud-amd64 (apt-get update?)"
KVER=${KPKG#linux-image-}
KDIR=$CACHE/kernel-$KVER     # vmlinuz, modules/*.ko, modules.load (load order)
if [[ ! -s $KDIR/modules.load ]]; then
    deb=$(fetch_deb "$KPKG")
    X=$WORK/kernel
    mkdir -p "$X"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$X" "./boot/vmlinuz-$KVER" "./lib/modules/$KVER"
    depmod -b "$X" "$KVER"     # the .deb ships no modules.dep (its postinst would make it)
    rm -rf "$KDIR.new" && mkdir -p "$KDIR.new/modules"
    cp "$X/boot/vmlinuz-$KVER" "$KDIR.new/vmlinuz"
    # Load order: for each wanted module, its dependencies (modules.dep lists them so that
    # the last one is loaded first), then itself; each module once.
    awk -v want="${MODULES[*]}" '
        function base(p) { sub(/.*\//, "", p); sub(/\.ko(\.[a-z]+)?$/, "", p); return p }
        BEGIN { n = split(want, w, " "); for (i = 1; i <= n; i++) wanted[w[i]] = i }
        { m = $1; sub(/:$/, "", m); k = base(m); path[k] = m; deps[k] = ""
          for (i = NF; i >= 2; i--) deps[k] = deps[k] " " $i }
        END {
            for (i = 1; i <= n; i++) {
                if (!(w[i] in path)) { print "make-guest: no module " w[i] > "/dev/stderr"; exit 1 }
                c = split(deps[w[i]], d, " ")
                for (j = 1; j <= c; j++) { b = base(d[j]); if (!(b in seen)) { seen[b]; print b, d[j] } }
                if (!(w[i] in seen)) { seen[w[i]]; print w[i], path[w[i]] }
            }
        }' "$X/lib/modules/$KVER/modules.dep" > "$WORK/order"
    while read -r name rel; do
        src=$X/lib/modules/$KVER/$rel dst=$KDIR.new/modules/$name.ko
        case $rel in   # busybox insmod wants plain .ko (bookworm's are; newer kernels compress)
            *.ko.xz) xz -dc "$src" > "$dst" ;;
            *.ko.zst) zstd -qdc "$src" > "$dst" ;;
            *.ko.gz) gzip -dc "$src" > "$dst" ;;
            *) cp "$src" "$dst" ;;
        esac
        echo "$name" >> "$KDIR.new/modules.load"
    done < "$WORK/order"
    rm -rf "$KDIR" "$X" && mv "$KDIR.new" "$KDIR"
    say "kernel $KVER prepared in $(took "$t")"
else
    say "kernel $KVER from cache"
fi

# --- busybox (static) from its .deb ----------------------------------------------------
BB=$CACHE/busybox-static
if [[ ! -x $BB/busybox ]]; then
    deb=$(fetch_deb busybox-static)
    mkdir -p "$WORK/bb" "$BB"
    dpkg-deb -x "$deb" "$WORK/bb"
    cp "$WORK/bb/bin/busybox" "$BB/busybox.new" && mv "$BB/busybox.new" "$BB/busybox"
fi

# --- initramfs ---------------------------------------------------------------------------
R=$WORK/initramfs
mkdir -p "$R"/{bin,dev,proc,sys,tmp,run,mnt/config,etc/acpi/power,lib/modules}
cp "$BB/busybox" "$R/bin/busybox"
cp "$KDIR"/modules/*.ko "$R/lib/modules/"
cp "$KDIR/modules.load" "$R/etc/modules.load"

cat > "$R/init" <<'INIT'
#!/bin/busybox sh
# PID 1 of the minivan test guest.  Everything lives in the initramfs.
/bin/busybox --install -s /bin
export PATH=/bin HOME=/ TERM=vt100
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
log() { echo "minivan-guest $*"; }
log "booted kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"

while read -r m; do
    insmod "/lib/modules/$m.ko" 2>/dev/null || log "insmod $m failed"
done < /etc/modules.load

# ACPI power button (virDomainShutdown, 'virsh shutdown') -> clean power-off.
cat > /etc/acpi/power/off <<'EOF'
#!/bin/sh
echo "minivan-guest acpi power button, powering off" > /dev/console
umount -a -r 2>/dev/null
sync
poweroff -f
EOF
chmod 755 /etc/acpi/power/off
echo "PWRF power/off" > /etc/acpi/actions
acpid -c /etc/acpi -a /etc/acpi/actions -l /dev/null

# Config drive: any block device labelled config-2 (ISO 9660 cdrom, or VFAT disk).
name=minivan-guest
for dev in $(findfs LABEL=config-2 2>/dev/null; findfs LABEL=CONFIG-2 2>/dev/null); do
    mount -o ro "$dev" /mnt/config 2>/dev/null || continue
    md=/mnt/config/openstack/latest/meta_data.json
    if [ -f "$md" ]; then
        json=$(tr ',{}' '\n\n\n' < "$md")
        uuid=$(echo "$json" | sed -n 's/^ *"uuid": *"\([^"]*\)".*/\1/p' | head -n1)
        host=$(echo "$json" | sed -n 's/^ *"hostname": *"\([^"]*\)".*/\1/p' | head -n1)
        [ -n "$uuid" ] && log "uuid $uuid"
        [ -n "$host" ] && { name=${host%%.*}; log "hostname $host"; }
    fi
    umount /mnt/config
    break
done
hostname "$name"

cat > /etc/udhcpc.script <<'EOF'
#!/bin/sh
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
bound|renew)
    old=$(ip -4 -o addr show dev "$interface" | awk '{print $4}')
    if [ "$old" != "$ip/${mask:-24}" ]; then
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        echo "minivan-guest ip $interface $ip/${mask:-24}" > /dev/console
    fi
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface" ;;
esac
exit 0
EOF
chmod 755 /etc/udhcpc.script

ip link set lo up
for nic in /sys/class/net/eth*; do
    [ -e "$nic" ] || continue
    nic=${nic##*/}
    ip link set "$nic" up
    # returns once leased (udhcpc then stays in the background to renew), or after ~10 s
    udhcpc -i "$nic" -b -t 10 -T 1 -A 3 -s /etc/udhcpc.script -x "hostname:$name" \
        >/dev/null 2>&1 &
done
wait
addrs=$(ip -4 -o addr show scope global | awk '{ sub(/\/.*/, "", $4); printf " %s", $4 }')
log "ready${addrs:- none}"

# Metadata service at 169.254.169.254 (on-link, as the host's bridge holds that address):
# what it says of this guest, or 'none' when nothing answers.
if [ -n "$addrs" ]; then
    nic=$(ip -4 -o addr show scope global | awk '{print $2; exit}')
    ip route add 169.254.169.254/32 dev "$nic" 2>/dev/null
    # (busybox nc: the static busybox's wget crashes resolving even a literal address)
    md_get() {
        printf 'GET %s HTTP/1.0\r\nHost: 169.254.169.254\r\n\r\n' "$1" |
            nc -w 3 169.254.169.254 80 2>/dev/null | sed '1,/^\r*$/d'
    }
    md=$(md_get /openstack/latest/meta_data.json)
    uuid=$(echo "$md" | tr ',{}' '\n\n\n' | sed -n 's/^ *"uuid": *"\([^"]*\)".*/\1/p' | head -n1)
    iid=$(md_get /latest/meta-data/instance-id)
    if [ -n "$uuid" ]; then
        log "metadata uuid $uuid instance-id ${iid:-?}"
    else
        log "metadata none"
    fi
fi

# A root shell on the console, forever (PID 1 must not exit).
while :; do
    setsid cttyhack sh -l
    sleep 1
done
INIT
chmod 755 "$R/init"
(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -6n > "$WORK/initrd.gz"

# --- disk: MBR + one bootable FAT partition from 1 MiB, filled with mtools ----------------
KSIZE=$(stat -c %s "$KDIR/vmlinuz")
ISIZE=$(stat -c %s "$WORK/initrd.gz")
MIB=$(( (KSIZE + ISIZE) / 1048576 + 10 ))      # content + 1 MiB gap + slack for FAT/syslinux
((MIB >= 32)) || MIB=32
RAW=$WORK/disk.raw
truncate -s "${MIB}M" "$RAW"
printf 'label: dos\nstart=2048, type=c, bootable\n' | sfdisk -q "$RAW"
PART_SECTORS=$(( MIB * 2048 - 2048 ))
mkfs.fat -n MINIVAN --offset 2048 "$RAW" $(( PART_SECTORS / 2 )) >/dev/null
cat > "$WORK/syslinux.cfg" <<'CFG'
DEFAULT guest
PROMPT 0
TIMEOUT 0
LABEL guest
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=tty0 console=ttyS0,115200n8 quiet panic=-1
CFG
export MTOOLS_SKIP_CHECK=1
cp "$KDIR/vmlinuz" "$WORK/vmlinuz"
mcopy -i "$RAW@@1M" "$WORK/vmlinuz" "$WORK/initrd.gz" "$WORK/syslinux.cfg" ::/
syslinux --offset $(( 2048 * 512 )) --install "$RAW"            # ldlinux.sys + boot sector
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$RAW" bs=440 count=1 conv=notrunc status=none
qemu-img convert -f raw -O qcow2 "$RAW" "$OUT.tmp"
chmod 644 "$OUT.tmp"
mv "$OUT.tmp" "$OUT"

say "built $OUT in $(took "$T0"): $(du -k "$OUT" | cut -f1) KiB on disk, virtual ${MIB} MiB" \
    "(kernel $KVER $((KSIZE / 1024)) KiB, initramfs $((ISIZE / 1024)) KiB, ${#MODULES[@]} modules + deps)"
