#!/usr/bin/python3
"""Run minivan inside the sandbox that minivan.service describes, on a host whose PID 1
is not systemd (a container, a CI machine): the same restrictions by other means.

    tools/sandbox.py --unit minivan.service --state-dir DIR --minivan PATH [-- CMD...]

Every directive of the unit's [Service] section is either applied here or known to have
nothing to do with the sandbox; an unknown directive is an error, so the unit and what
the tests exercise cannot drift apart.  Applied, as systemd applies them:

- a mount namespace of its own, with the host's mounts as slaves (PrivateMounts=): a
  share mounted on the host later (libvirt mounting NFS) appears inside too;
- ProtectSystem=strict: every mount read-only except /dev, /proc, /sys, the state
  directory and ReadWritePaths=; PrivateTmp= (an empty /tmp and /var/tmp);
  ProtectHome= (/home, /root, /run/user inaccessible); PrivateDevices= (a /dev of its
  own with only the pseudo devices); ProtectKernelTunables=, ProtectControlGroups=,
  ProtectKernelModules=, ProtectKernelLogs=, ProtectProc=invisible, ProtectHostname=
  (a UTS namespace of its own), UMask=, StateDirectory= and StateDirectoryMode=;
- CapabilityBoundingSet= and NoNewPrivileges= (prctl, before exec);
- a seccomp filter (python3-seccomp) with SystemCallFilter= (groups expanded by
  `systemd-analyze syscall-filter`), SystemCallErrorNumber=, SystemCallArchitectures=,
  RestrictAddressFamilies=, MemoryDenyWriteExecute=, RestrictNamespaces=,
  LockPersonality=, RestrictRealtime=, RestrictSUIDSGID=, ProtectClock=.

It must run as root, with /usr/bin/python3 (python3-seccomp; Debian: apt install
python3-seccomp).  The command runs in this process (exec): its PID is this one's.
"""
import argparse
import ctypes
import errno
import os
import re
import shlex
import subprocess
import sys

NOT_SANDBOX = {"Type", "NotifyAccess", "ExecStart", "EnvironmentFile", "Restart",
               "RestartSec", "TimeoutStopSec", "KillSignal", "WatchdogSec", "Environment"}
APPLIED = {"StateDirectory", "StateDirectoryMode", "UMask", "NoNewPrivileges",
           "CapabilityBoundingSet", "ProtectSystem", "ReadWritePaths", "PrivateTmp",
           "ProtectHome", "PrivateDevices", "PrivateMounts", "ProtectKernelTunables",
           "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock",
           "ProtectHostname", "ProtectProc", "RestrictRealtime", "RestrictSUIDSGID",
           "RestrictNamespaces", "LockPersonality", "MemoryDenyWriteExecute",
           "RestrictAddressFamilies", "SystemCallArchitectures", "SystemCallFilter",
           "SystemCallErrorNumber"}

CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
        "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
        "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
        "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
        "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"]

CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
NAMESPACE_FLAGS = 0x00020000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | \
    0x40000000 | 0x02000000 | 0x00000080           # mnt uts ipc user pid net cgroup time
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_SLAVE = 32, 4096, 8192, 16384, 1 << 19
MNT_DETACH = 2
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
AF = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16, "AF_PACKET": 17}
PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000
S_ISUID, S_ISGID, O_CREAT = 0o4000, 0o2000, 0o100

LIBC = ctypes.CDLL(None, use_errno=True)


class SandboxError(Exception):
    pass


def check(result, what):
    if result != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(e)}")


def mount(source, target, fstype, flags, data=None):
    check(LIBC.mount(source and source.encode(), target.encode(), fstype and fstype.encode(),
                     ctypes.c_ulong(flags), data and data.encode()),
          f"mount {source or ''} {target} ({fstype or 'bind/remount'})")


def read_unit(path):
    """[(directive, value)] of the [Service] section, in order."""
    out, section = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            if section == "Service":
                key, _, value = line.partition("=")
                out.append((key.strip(), value.strip()))
    unknown = sorted({k for k, _ in out} - NOT_SANDBOX - APPLIED)
    if unknown:
        raise SandboxError("cannot apply " + ", ".join(k + "=" for k in unknown) +
                           " (teach tools/sandbox.py, or the unit's sandbox is not tested)")
    return out


def settings(directives):
    """{directive: value} with systemd's merging: lists add up, an empty value resets,
    a ~ list is a deny list."""
    merged = {}
    for key, value in directives:
        if key in ("SystemCallFilter", "ReadWritePaths", "CapabilityBoundingSet",
                   "RestrictAddressFamilies"):
            merged.setdefault(key, [])
            if value == "":
                merged[key] = []
            else:
                merged[key].append(value)
        else:
            merged[key] = value
    return merged


def yes(conf, key):
    return conf.get(key, "no").lower() in ("yes", "true", "1", "on", "strict", "invisible")


def mounts():
    """[(mount point, per-mount options)] of this namespace, in mount order."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            out.append((point, fields[5].split(",")))
    return out


def under(path, roots):
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def remount_ro(point, options):
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    flags |= (MS_NOSUID if "nosuid" in options else 0) | (MS_NODEV if "nodev" in options
                                                          else 0)
    flags |= MS_NOEXEC if "noexec" in options else 0
    try:
        mount(None, point, None, flags)
    except SandboxError:
        if point == "/":
            raise                    # (a mount hidden under another one cannot be reached)


def inaccessible(path, staging):
    """Cover path with a mode-000 directory or file, as systemd's InaccessiblePaths=."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path):
        mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=000")
    else:
        mount(os.path.join(staging, "inaccessible"), path, None, MS_BIND)
    remount_ro(path, ["nosuid", "nodev", "noexec"])


def private_dev(staging):
    """A /dev of the sandbox's own: the pseudo devices, a pty instance, shm."""
    dev = os.path.join(staging, "dev")
    os.mkdir(dev)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755")
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        open(os.path.join(dev, name), "w").close()
        mount("/dev/" + name, os.path.join(dev, name), None, MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("ptmx", "pts/ptmx")):
        os.symlink(target, os.path.join(dev, name))
    for name in ("pts", "shm"):
        os.mkdir(os.path.join(dev, name))
    mount("devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC,
          "newinstance,ptmxmode=0666,mode=620")
    mount("tmpfs", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount(dev, "/dev", None, MS_MOVE)


def set_up_mounts(conf, state_dir):
    check(LIBC.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    mount(None, "/", None, MS_REC | MS_SLAVE)               # PrivateMounts=
    if yes(conf, "ProtectHostname"):
        check(LIBC.unshare(CLONE_NEWUTS), "unshare(CLONE_NEWUTS)")
    # a scratch tmpfs over /tmp, in this namespace only, for what is built before it
    # moves into place; detached (and replaced by PrivateTmp's) once the rest is done
    staging = "/tmp"
    mount("tmpfs", staging, "tmpfs", MS_NOSUID | MS_NODEV, "mode=700")
    open(os.path.join(staging, "inaccessible"), "w").close()
    os.chmod(os.path.join(staging, "inaccessible"), 0)
    if conf.get("ProtectProc") == "invisible":
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")
    if yes(conf, "PrivateDevices"):
        private_dev(staging)
    api = ["/dev", "/proc", "/sys"]
    if yes(conf, "ProtectHome"):
        for path in ("/home", "/root", "/run/user"):
            inaccessible(path, staging)
    if yes(conf, "ProtectKernelModules"):
        for path in ("/usr/lib/modules", "/lib/modules"):
            if os.path.isdir(path) and not os.path.islink(path):
                inaccessible(path, staging)
    if yes(conf, "ProtectKernelLogs"):
        for path in ("/proc/kmsg", "/dev/kmsg"):
            inaccessible(path, staging)
    check(LIBC.umount2(staging.encode(), MNT_DETACH), "detaching the scratch tmpfs")
    writable = [state_dir] + [p.lstrip("-") for v in conf.get("ReadWritePaths", [])
                              for p in v.split() if os.path.exists(p.lstrip("-"))]
    if yes(conf, "PrivateTmp"):
        for path in ("/tmp", "/var/tmp"):
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
        writable += ["/tmp", "/var/tmp"]
    for path in writable:
        if path not in ("/tmp", "/var/tmp"):
            mount(path, path, None, MS_BIND | MS_REC)
    if yes(conf, "ProtectKernelTunables"):
        for path in ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/proc/fs",
                     "/proc/acpi", "/proc/latency_stats", "/proc/timer_list", "/proc/kcore",
                     "/proc/kallsyms"):
            if os.path.exists(path):
                mount(path, path, None, MS_BIND | MS_REC)
                remount_ro(path, ["nosuid", "nodev", "noexec"])
        api.remove("/sys")                                  # /sys read-only below
    if yes(conf, "ProtectControlGroups") and "/sys" in api:
        mount("/sys/fs/cgroup", "/sys/fs/cgroup", None, MS_BIND | MS_REC)
        remount_ro("/sys/fs/cgroup", [])
    if conf.get("ProtectSystem") == "strict":
        for point, options in mounts():
            if under(point, writable) or under(point, api) or "ro" in options:
                continue
            remount_ro(point, options)
    elif conf.get("ProtectSystem"):
        raise SandboxError("ProtectSystem=" + conf["ProtectSystem"] + " is not applied here "
                           "(strict is)")
    elif "/sys" not in api:
        for point, options in mounts():
            if under(point, ["/sys"]):
                remount_ro(point, options)


def expand(groups, seen=None):
    """Syscall names of systemd's groups (@system-service ...) and single names."""
    seen = set() if seen is None else seen
    names = set()
    for item in groups:
        if not item.startswith("@"):
            names.add(item)
            continue
        if item in seen:
            continue
        seen.add(item)
        done = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager", item],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SandboxError(f"systemd-analyze syscall-filter {item}: {done.stderr.strip()}")
        for line in done.stdout.splitlines()[1:]:
            line = line.strip()
            if line and not line.startswith("#"):
                names |= expand([line], seen)
    return names


def seccomp_filter(conf):
    """The unit's seccomp filter, ready to load (python3-seccomp)."""
    try:
        import seccomp
    except ImportError:
        raise SandboxError("python3-seccomp is missing (Debian: apt install "
                           "python3-seccomp)") from None
    allow, deny = set(), set()
    for value in conf.get("SystemCallFilter", []):
        if value.startswith("~"):
            deny |= expand(value[1:].split())
        else:
            allow |= expand(value.split())
    if not allow:
        raise SandboxError("SystemCallFilter= has no allow list (a deny list only is not "
                           "applied here)")
    allow -= deny
    if yes(conf, "ProtectClock"):
        allow -= expand(["@clock"])
    if yes(conf, "RestrictRealtime"):
        allow -= {"sched_setscheduler", "sched_setattr"}  # (their realtime use: all here)
    error = getattr(errno, conf.get("SystemCallErrorNumber", ""), None)
    f = seccomp.SyscallFilter(seccomp.ERRNO(error) if error else seccomp.KILL_PROCESS)
    Arg, EQ, MASKED_EQ = seccomp.Arg, seccomp.EQ, seccomp.MASKED_EQ
    conditional = {}                                        # syscall -> [allowing args]
    families = [AF[name] for v in conf.get("RestrictAddressFamilies", []) for name in v.split()]
    if families:
        conditional["socket"] = [[Arg(0, EQ, family)] for family in families]
    if yes(conf, "MemoryDenyWriteExecute"):
        both = PROT_WRITE | PROT_EXEC
        conditional["mmap"] = [[Arg(2, MASKED_EQ, both, v)] for v in (0, PROT_WRITE,
                                                                        PROT_EXEC)]
        conditional["mprotect"] = [[Arg(2, MASKED_EQ, PROT_EXEC, 0)]]
        conditional["pkey_mprotect"] = [[Arg(2, MASKED_EQ, PROT_EXEC, 0)]]
        conditional["shmat"] = [[Arg(2, MASKED_EQ, SHM_EXEC, 0)]]
    if yes(conf, "RestrictNamespaces"):
        conditional["clone"] = [[Arg(0, MASKED_EQ, NAMESPACE_FLAGS, 0)]]
        conditional["unshare"] = [[Arg(0, MASKED_EQ, NAMESPACE_FLAGS, 0)]]
        conditional["setns"] = []
    if yes(conf, "LockPersonality"):
        conditional["personality"] = [[Arg(0, EQ, 0)], [Arg(0, EQ, 0xffffffff)]]
    if yes(conf, "RestrictSUIDSGID"):
        mode = S_ISUID | S_ISGID
        conditional["chmod"] = [[Arg(1, MASKED_EQ, mode, 0)]]
        conditional["fchmod"] = [[Arg(1, MASKED_EQ, mode, 0)]]
        conditional["fchmodat"] = [[Arg(2, MASKED_EQ, mode, 0)]]
        conditional["fchmodat2"] = [[Arg(2, MASKED_EQ, mode, 0)]]
        conditional["creat"] = [[Arg(1, MASKED_EQ, mode, 0)]]
        conditional["open"] = [[Arg(1, MASKED_EQ, O_CREAT, 0)], [Arg(2, MASKED_EQ, mode, 0)]]
        conditional["openat"] = [[Arg(2, MASKED_EQ, O_CREAT, 0)], [Arg(3, MASKED_EQ, mode, 0)]]
    for name in sorted(allow):
        if name in conditional:
            for args in conditional[name]:
                add_rule(f, seccomp.ALLOW, name, *args)
        else:
            add_rule(f, seccomp.ALLOW, name)
    # libc falls back to clone() and openat() only when these say ENOSYS
    for name in ("clone3", "openat2"):
        if name in allow and (name == "clone3" and "clone" in conditional or
                              name == "openat2" and "openat" in conditional):
            add_rule(f, seccomp.ERRNO(errno.ENOSYS), name)
    return f


def add_rule(f, action, name, *args):
    try:
        f.add_rule(action, name, *args)
    except (RuntimeError, ValueError, OSError):
        pass                             # a name this architecture does not have


def drop_capabilities(conf):
    keep = {c for v in conf.get("CapabilityBoundingSet", []) for c in v.split()}
    if "CapabilityBoundingSet" not in conf:
        return
    unknown = keep - set(CAPS)
    if unknown:
        raise SandboxError("unknown capabilities: " + " ".join(sorted(unknown)))
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for number in range(last + 1):
        if number >= len(CAPS) or CAPS[number] not in keep:
            check(LIBC.prctl(PR_CAPBSET_DROP, number, 0, 0, 0), f"dropping capability {number}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--unit", required=True)
    p.add_argument("--state-dir", required=True, help="stands for /var/lib/STATE_DIRECTORY")
    p.add_argument("--minivan", help="minivan.py to run in place of the unit's path")
    p.add_argument("command", nargs="*", help="default: the unit's ExecStart")
    a = p.parse_args()
    try:
        directives = read_unit(a.unit)
        if os.geteuid() != 0:
            raise SandboxError("must run as root")
        conf = settings(directives)
        command = a.command or shlex.split(conf["ExecStart"])
        if a.minivan:
            command = [a.minivan if word.endswith("/minivan.py") else word for word in command]
        state = os.path.abspath(a.state_dir)
        os.makedirs(state, exist_ok=True)
        os.chmod(state, int(conf.get("StateDirectoryMode", "0755"), 8))
        os.environ["STATE_DIRECTORY"] = state
        syscall_filter = seccomp_filter(conf)       # (systemd-analyze runs before the rest)
        set_up_mounts(conf, state)
        if "UMask" in conf:
            os.umask(int(conf["UMask"], 8))
        drop_capabilities(conf)
        if yes(conf, "NoNewPrivileges"):
            check(LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        syscall_filter.load()
        os.execv(command[0], command)
    except (SandboxError, OSError, KeyError) as e:
        print(f"sandbox.py: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
