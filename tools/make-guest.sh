#!/usr/bin/env bash
# make-guest.sh OUT.qcow2 - build minivan's tiny self-booting test guest from Debian packages.
#
# The image: an MBR disk (syslinux boot code) with one FAT partition holding syslinux, a
# Debian kernel (the generic one) and a busybox initramfs.  Built with sfdisk/mkfs.fat/mtools/syslinux
# on a plain file: no mounts, no loop devices, no root needed beyond installing packages.
# Boots under BIOS (SeaBIOS, i440fx 'pc' or q35) or UEFI (OVMF), TCG or KVM; 256 MiB is
# plenty.
#
# What the guest prints on the serial console (ttyS0), one line each:
#   minivan-guest booted kernel=<version> uptime=<s>
#   minivan-guest uuid <uuid>                  if a config drive (label config-2, ISO 9660
#   minivan-guest hostname <name>              or VFAT, cdrom or disk) holds meta_data.json
#   minivan-guest ip <iface> <addr>/<prefix>   per NIC that got a DHCP lease (busybox udhcpc)
#   minivan-guest hw disk <dev> <driver> <controller's driver>   per disk (virtio_blk
#                                              virtio-pci, sd ahci, sd virtio_scsi, ...)
#   minivan-guest hw nic <iface> <driver>      per NIC (virtio_net, e1000, ...)
#   minivan-guest hw cpu sockets S cores C threads T
#   minivan-guest hw rng <device>|none         the hardware RNG (virtio_rng.0)
#   minivan-guest hw watchdog <identity>|none  the watchdog (i6300ESB timer)
#   minivan-guest hw tpm 1|2|none              the TPM's major version
#   minivan-guest hw firmware uefi|bios        how it booted
#   minivan-guest hw secureboot 1|0            under UEFI: whether Secure Boot is on
#   minivan-guest ready <addr> ...             after DHCP (addresses, or 'none')
#   minivan-guest metadata uuid <uuid> instance-id <id>   from http://169.254.169.254 (the
#                                              metadata service; 'metadata none' if silent)
#   minivan-guest ssh key <type> <comment>     the key of the config drive or the metadata
#                                              service, for root and cirros
#   minivan-guest sshd listening               dropbear on port 22
#   minivan-guest acpi power button, powering off    on ACPI shutdown (virDomainShutdown)
# then a root shell stays on the console (virsh console).
#
# For Tempest's validation and scenario tests, as cirros offers them: the user cirros
# (root's powers; sudo runs what it is given), the key from the config drive or the
# metadata service, the hostname given, DHCP with classless static routes (option 121)
# and DNS, lsblk, blkid, mkfs -t ext4 and ext4, ip, ping, nc, hostname, and curl for plain
# http URLs.  dropbear, e2fsprogs and util-linux come from their .debs with every
# library they need.
#
# MINIVAN_GUEST_SECURE_BOOT=1: the UEFI boot goes through Debian's signed shim and GRUB
# (shim-signed, grub-efi-amd64-signed: Microsoft's key, then Debian's), so the guest boots
# with Secure Boot on under OVMF's firmware with Microsoft's keys enrolled.
# Downloaded .debs and the kernel bits taken from them are cached in
# ${MINIVAN_GUEST_CACHE:-${XDG_CACHE_HOME:-~/.cache}/minivan-guest}: re-runs need no download.
# Kernel: the newest one already in that cache; else (or with MINIVAN_GUEST_REFRESH=1) the
# one linux-image-amd64 depends on now; MINIVAN_GUEST_KERNEL=linux-image-... forces one.
# (Debian's cloud kernel lacks the AHCI, e1000 and i6300esb drivers the guest shape tests
# need.)
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
         vfat nls_cp437 nls_ascii             # config drive in VFAT format
         ahci virtio_scsi e1000               # the buses and NIC an image may ask for
         virtio-rng i6300esb                  # the RNG and the watchdog a flavor gives
         efivarfs                             # UEFI variables: is Secure Boot on
         ext4 crc32c_generic)                 # the volumes Tempest formats and mounts

# --- host tools -----------------------------------------------------------------------
need=()
for pair in sfdisk:fdisk mkfs.fat:dosfstools mcopy:mtools syslinux:syslinux \
            cpio:cpio depmod:kmod qemu-img:qemu-utils; do
    command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
[[ -e /usr/lib/syslinux/mbr/mbr.bin ]] || need+=(syslinux-common)
[[ -e /usr/lib/SYSLINUX.EFI/efi64/syslinux.efi ]] || need+=(syslinux-efi)
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
           sed "s|^$CACHE/kernel-||; s|/modules.load$||" | { grep -v cloud || true; } | sort -V | tail -n1)
    KPKG=${KPKG:+linux-image-$KPKG}
fi
if [[ -z $KPKG ]]; then
    KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
           awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
fi
if [[ -z $KPKG ]]; then
    apt-get -o DPkg::Lock::Timeout=300 update -qq || true
    KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null |
           awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
fi
[[ -n $KPKG ]] || die "cannot resolve linux-image-amd64 (apt-get update?)"
KVER=${KPKG#linux-image-}
KDIR=$CACHE/kernel-$KVER     # vmlinuz, modules/*.ko, modules.load (load order)
if [[ ! -s $KDIR/modules.load || $(cat "$KDIR/modules.want" 2>/dev/null) != "${MODULES[*]}" ]]; then
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
    echo "${MODULES[*]}" > "$KDIR.new/modules.want"
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

# --- userland beyond busybox: an SSH server and the disk tools Tempest runs --------------
# Binaries and every library they need, all from the .debs (never the host's files).
USERLAND_PACKAGES=(dropbear-bin libtomcrypt1 libtommath1 libgmp10 zlib1g libcrypt1 libc6
                   e2fsprogs libext2fs2 libcom-err2 libss2 libblkid1 libuuid1
                   util-linux libmount1 libsmartcols1 libudev1 libselinux1 libpcre2-8-0
                   libcap-ng0 libtinfo6 libsystemd0 liblzma5 libzstd1 liblz4-1 libgcrypt20
                   libgpg-error0)
USERLAND_BINARIES=(usr/sbin/dropbear sbin/mke2fs sbin/mkfs bin/lsblk sbin/blkid)
U=$CACHE/userland
stamp="${USERLAND_PACKAGES[*]} ${USERLAND_BINARIES[*]}"
if [[ ! -s $U/stamp || $(cat "$U/stamp") != "$stamp" ]]; then
    rm -rf "$U.new" && mkdir -p "$U.new/tree"
    for pkg in "${USERLAND_PACKAGES[@]}"; do
        deb=$(fetch_deb "$pkg")
        dpkg-deb -x "$deb" "$U.new/tree"
    done
    echo "$stamp" > "$U.new/stamp"
    rm -rf "$U" && mv "$U.new" "$U"
fi
# copy_elf FILE: FILE (path in the tree) and the libraries it needs, into the initramfs
copy_elf() {
    local rel=$1 lib found dir
    [[ -e $R/$rel ]] && return
    mkdir -p "$R/$(dirname "$rel")"
    cp -L "$U/tree/$rel" "$R/$rel"
    for lib in $(readelf -d "$U/tree/$rel" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        found=
        for dir in lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu; do
            [[ -e $U/tree/$dir/$lib ]] && { found=$dir/$lib; break; }
        done
        [[ -n $found ]] || die "no $lib for $rel in the userland packages: add its package"
        copy_elf "$found"
    done
}

# --- initramfs ---------------------------------------------------------------------------
R=$WORK/initramfs
mkdir -p "$R"/{bin,dev,proc,sys,tmp,run,var/run,mnt/config,etc/acpi/power,lib/modules}
cp "$BB/busybox" "$R/bin/busybox"
for bin in "${USERLAND_BINARIES[@]}" lib64/ld-linux-x86-64.so.2; do
    copy_elf "$bin"
done
ln -s mke2fs "$R/sbin/mkfs.ext4"
# the login user Tempest uses (image_ssh_user cirros): root's powers, as cirros's sudo
# gives them; sudo runs the command it is given
mkdir -p "$R/etc/dropbear" "$R/home/cirros/.ssh" "$R/root/.ssh" "$R/usr/bin"
printf 'root:x:0:0:root:/root:/bin/sh\ncirros:x:0:0:cirros:/home/cirros:/bin/sh\n' > "$R/etc/passwd"
printf 'root:*:19000:0:99999:7:::\ncirros:*:19000:0:99999:7:::\n' > "$R/etc/shadow"
printf 'root:x:0:\n' > "$R/etc/group"
printf '/bin/sh\n' > "$R/etc/shells"
chmod 700 "$R/home/cirros/.ssh" "$R/root/.ssh"
cat > "$R/usr/bin/sudo" <<'SUDO'
#!/bin/sh
# sudo for a user who is root already: options are dropped, the command runs.
while [ $# -gt 0 ]; do
    case $1 in
        -u|-g|-C|-h|-p|-U) shift 2 ;;
        --) shift; break ;;
        -i|-s) shift; [ $# -eq 0 ] && exec /bin/sh -l ;;
        -*) shift ;;
        *) break ;;
    esac
done
[ $# -eq 0 ] && exec /bin/sh -l
exec "$@"
SUDO
cat > "$R/usr/bin/curl" <<'CURL'
#!/bin/sh
# curl for plain http://HOST[:PORT]/PATH, as Tempest's checks call it: the body on
# stdout; -X METHOD and -d DATA (a POST, as curl makes it); other options are dropped.
url= method= data= has_data=
while [ $# -gt 0 ]; do
    case $1 in
        -X|--request) method=$2; shift 2 ;;
        -d|--data|--data-raw|--data-binary) data=$2; has_data=1; shift 2 ;;
        -o|-m|--max-time|--connect-timeout|-H|-w|-u) shift 2 ;;
        -*) shift ;;
        *) url=$1; shift ;;
    esac
done
[ -z "$method" ] && { [ -n "$has_data" ] && method=POST || method=GET; }
rest=${url#http://}
hostport=${rest%%/*}
path=/${rest#*/}
[ "$rest" = "$hostport" ] && path=/
host=${hostport%:*}
port=${hostport##*:}
[ "$port" = "$hostport" ] && port=80
{
    printf '%s %s HTTP/1.0\r\nHost: %s\r\n' "$method" "$path" "$hostport"
    [ -n "$has_data" ] && printf 'Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %s\r\n' "${#data}"
    printf '\r\n%s' "$data"
} | nc -w 5 "$host" "$port" | sed '1,/^\r*$/d'
CURL
chmod 755 "$R/usr/bin/sudo" "$R/usr/bin/curl"
cp "$KDIR"/modules/*.ko "$R/lib/modules/"
cp "$KDIR/modules.load" "$R/etc/modules.load"

cat > "$R/init" <<'INIT'
#!/bin/busybox sh
# PID 1 of the minivan test guest.  Everything lives in the initramfs.
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=vt100
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
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
drives() { findfs LABEL=config-2 2>/dev/null; findfs LABEL=CONFIG-2 2>/dev/null; }
# (a cdrom behind the IDE controller shows up a moment after its module loads)
n=0
while [ -z "$(drives)" ] && [ $n -lt 20 ] && ls /sys/class/scsi_host/ >/dev/null 2>&1 &&
      [ -z "$(ls /sys/class/block | grep '^sr')" ]; do
    sleep 0.1; n=$((n + 1))
done
for dev in $(drives); do
    mount -o ro "$dev" /mnt/config 2>/dev/null || continue
    md=/mnt/config/openstack/latest/meta_data.json
    if [ -f "$md" ]; then
        json=$(tr ',{}' '\n\n\n' < "$md")
        uuid=$(echo "$json" | sed -n 's/^ *"uuid": *"\([^"]*\)".*/\1/p' | head -n1)
        host=$(echo "$json" | sed -n 's/^ *"hostname": *"\([^"]*\)".*/\1/p' | head -n1)
        [ -n "$uuid" ] && log "uuid $uuid"
        [ -n "$host" ] && { name=${host%%.*}; log "hostname $host"; }
        # the first of public_keys: {"name": "ssh-rsa AAAA... comment\n"}
        key=$(echo "$json" | sed -n '/"public_keys"/{n;p;}' |
              sed -n 's/^ *"[^"]*": *"\(.*\)" *$/\1/p' | sed 's/\\n$//' | head -n1)
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
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    # option 121 (how Neutron's OVN hands out the metadata route): "NET/LEN GW" pairs
    set -- $staticroutes
    while [ $# -ge 2 ]; do
        if [ "$2" = 0.0.0.0 ]; then
            ip route replace "$1" dev "$interface"
        else
            ip route replace "$1" via "$2" dev "$interface"
        fi
        shift 2
    done
    if [ -n "$dns" ]; then
        : > /etc/resolv.conf
        [ -n "$domain" ] && echo "search $domain" >> /etc/resolv.conf
        for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
    fi ;;
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
        -p "/var/run/udhcpc.$nic.pid" \
        -O staticroutes -O dns -O domain \
        >/dev/null 2>&1 &
done
wait
# What the guest was given, as the guest sees it (the guest shape tests read these):
# each disk with its driver and its controller's, each NIC's driver, the CPU topology, the
# RNG, the watchdog, and the firmware it booted through.
driver_of() { [ -e "$1/driver" ] && basename "$(readlink "$1/driver")"; }
for b in /sys/class/block/*; do
    [ -e "$b/device" ] && [ ! -e "$b/partition" ] || continue
    p=$(readlink -f "$b/device") ctl=
    while [ "$p" != /sys/devices ] && [ -n "$p" ]; do
        p=${p%/*}
        ctl=$(driver_of "$p") && break
    done
    log "hw disk ${b##*/} $(driver_of "$b/device" || echo ?) ${ctl:-?}"
done
for n in /sys/class/net/eth*; do
    [ -e "$n" ] && log "hw nic ${n##*/} $(driver_of "$n/device" || echo ?)"
done
cpus=$(ls -d /sys/devices/system/cpu/cpu[0-9]* | wc -l)
sockets=$(cat /sys/devices/system/cpu/cpu[0-9]*/topology/physical_package_id | sort -u | wc -l)
cores=$(for c in /sys/devices/system/cpu/cpu[0-9]*/topology; do
            echo "$(cat "$c/physical_package_id"):$(cat "$c/core_id")"; done | sort -u | wc -l)
log "hw cpu sockets $sockets cores $((cores / sockets)) threads $((cpus / cores))"
log "hw rng $(cat /sys/class/misc/hw_random/rng_current 2>/dev/null || echo none)"
log "hw watchdog $(cat /sys/class/watchdog/watchdog0/identity 2>/dev/null || echo none)"
log "hw tpm $(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null || echo none)"
if [ -d /sys/firmware/efi ]; then
    log "hw firmware uefi"
    mount -t efivarfs efivarfs /sys/firmware/efi/efivars 2>/dev/null
    # SecureBoot: 4 bytes of attributes, then 1 (on) or 0 (off)
    sb=$(dd if=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c \
            bs=1 skip=4 count=1 2>/dev/null | od -An -tu1)
    log "hw secureboot $(echo ${sb:-0})"
else
    log "hw firmware bios"
fi

addrs=$(ip -4 -o addr show scope global | awk '{ sub(/\/.*/, "", $4); printf " %s", $4 }')
log "ready${addrs:- none}"

# Metadata service at 169.254.169.254 (on-link, as the host's bridge holds that address):
# what it says of this guest, or 'none' when nothing answers.
if [ -n "$addrs" ]; then
    nic=$(ip -4 -o addr show scope global | awk '{print $2; exit}')
    ip route add 169.254.169.254/32 dev "$nic" 2>/dev/null   # (unless DHCP routed it)
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
        [ -n "$key" ] || key=$(md_get /latest/meta-data/public-keys/0/openssh-key)
    else
        log "metadata none"
    fi
fi

# SSH: dropbear on port 22 (host keys made at the first connection), the key from the
# config drive or the metadata service for root and cirros
if [ -n "$key" ]; then
    for home in /root /home/cirros; do
        echo "$key" > "$home/.ssh/authorized_keys"
        chmod 600 "$home/.ssh/authorized_keys"
    done
    log "ssh key ${key%% *} ${key##* }"
fi
dropbear -R -p 22 -E 2>/dev/null
log "sshd listening"

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
# UEFI firmware starts \EFI\BOOT\BOOTX64.EFI of a FAT partition: syslinux's EFI build,
# which reads the syslinux.cfg beside it; or, for Secure Boot, Debian's signed shim, which
# starts Debian's signed GRUB beside it, which checks the (Debian-signed) kernel
mmd -i "$RAW@@1M" ::/EFI ::/EFI/BOOT
if [[ ${MINIVAN_GUEST_SECURE_BOOT:-0} == 1 ]]; then
    for pkg in shim-signed grub-efi-amd64-signed; do
        dpkg-deb --fsys-tarfile "$(fetch_deb "$pkg")" | tar -x -C "$WORK" \
            --wildcards './usr/lib/shim/shimx64.efi.signed' \
            './usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed' 2>/dev/null || true
    done
    [[ -s $WORK/usr/lib/shim/shimx64.efi.signed &&
       -s $WORK/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed ]] ||
        die "no signed shim or GRUB in shim-signed / grub-efi-amd64-signed"
    cat > "$WORK/grub.cfg" <<'CFG'
set timeout=0
linux /vmlinuz console=tty0 console=ttyS0,115200n8 quiet panic=-1
initrd /initrd.gz
boot
CFG
    mmd -i "$RAW@@1M" ::/EFI/debian ::/boot ::/boot/grub
    mcopy -i "$RAW@@1M" "$WORK/usr/lib/shim/shimx64.efi.signed" ::/EFI/BOOT/BOOTX64.EFI
    mcopy -i "$RAW@@1M" "$WORK/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed" \
        ::/EFI/BOOT/grubx64.efi
    for dir in EFI/BOOT EFI/debian boot/grub; do
        mcopy -i "$RAW@@1M" "$WORK/grub.cfg" "::/$dir/grub.cfg"
    done
else
    mcopy -i "$RAW@@1M" /usr/lib/SYSLINUX.EFI/efi64/syslinux.efi ::/EFI/BOOT/BOOTX64.EFI
    mcopy -i "$RAW@@1M" /usr/lib/syslinux/modules/efi64/ldlinux.e64 "$WORK/syslinux.cfg" \
        ::/EFI/BOOT/
fi
syslinux --offset $(( 2048 * 512 )) --install "$RAW"            # ldlinux.sys + boot sector
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$RAW" bs=440 count=1 conv=notrunc status=none
qemu-img convert -f raw -O qcow2 "$RAW" "$OUT.tmp"
chmod 644 "$OUT.tmp"
mv "$OUT.tmp" "$OUT"

say "built $OUT in $(took "$T0"): $(du -k "$OUT" | cut -f1) KiB on disk, virtual ${MIB} MiB" \
    "(kernel $KVER $((KSIZE / 1024)) KiB, initramfs $((ISIZE / 1024)) KiB, ${#MODULES[@]} modules + deps)"
