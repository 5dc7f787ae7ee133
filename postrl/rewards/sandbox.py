"""A sandbox for untrusted Python (model-written code), isolated by the operating system.

Every call runs in a fresh set of Linux namespaces, built by a disposable launcher process
(this file, imported by ``python -I -S -c "import sandbox" --launch``), never by the trainer:

    trainer ──(pipe: request, marshal)──► launcher L  (host root, own session / process group)
                                        └─ C: unshare(user, mount, pid, net, ipc, uts)
                                             └─ G: pid 1 of the new pid namespace (init, trusted)
                                                  └─ U: the untrusted program, one per run

* **user namespace**: L (host side) writes the id maps of C's new user namespace: inside
  uid/gid 0 (G, which sets up the mounts) and 1000 (U) map to unprivileged host ids
  (``uid_base`` and ``uid_base + 1``, ids that own no host file), so host file permissions apply
  to the sandbox as to a stranger, and U holds no capability at all (it setuid()s to 1000, its
  bounding set is emptied, ``no_new_privs`` is set). When the trainer is not root, the only
  id that can be mapped is its own; U then stays uid 0 inside with every capability dropped.
  RLIMIT_NPROC is counted per user namespace, so the process cap is per call.
* **mount namespace**: a new root on a 1 MB tmpfs, pivot_root'ed into, made read-only; it holds
  read-only binds of ``/usr``, ``/lib*``, ``/bin``, ``/sbin`` and the Python installation (nothing
  else of the host: no ``/home``, ``/root``, ``/etc``, ``/tmp``, ``/work``...), a ``/dev`` with
  only null/zero/full/random/urandom, a fresh ``/proc`` of the sandbox's pid namespace, a
  minimal generated ``/etc`` (passwd, group, hosts), and ``/work``: the working directory, an
  empty tmpfs of ``disk_mb`` MB, mounted fresh for every run. Nothing is written on the host;
  everything vanishes with the namespace.
* **pid namespace**: G is its init. When a run ends (or times out, or floods its output) G sends
  SIGKILL to every other process of the namespace, so daemons (double fork + setsid) die
  too; and when G dies the kernel kills the whole namespace. The untrusted code cannot signal
  anything outside (``os.kill(os.getppid(), 9)`` targets G, which as init ignores it).
  PR_SET_PDEATHSIG chains L -> C -> G, and the trainer kills L's process group past a deadline.
* **network namespace**: only a loopback interface, down: no network at all.
* **rlimits** set in U (soft = hard, so the code cannot raise them): CPU seconds, address
  space, processes/threads, open files, file size, no core files; plus a wall-clock deadline
  enforced by G, and stdout+stderr capped at ``max_output_bytes`` (the run is killed past it).
* **environment**: empty except ``PATH``, ``HOME=/work``, ``TMPDIR=/work``, ``LANG``.

The isolation is probed at first use (one trivial run). If the host cannot provide it (no user
namespaces, seccomp-restricted container, no procfs mount...) :class:`Sandbox` raises
:class:`SandboxUnavailable` naming the reason: untrusted code is refused (fail closed) unless the
caller passes ``allow_unsafe=True``, which falls back to rlimits + a new session + a temporary
directory + a clean environment (+ dropping to ``nobody`` when root), logged as a warning:
no network, filesystem or daemon containment in that mode.

Each run is a ``fork()`` of the launcher's already-started interpreter that ``exec()`` s the
program as ``__main__`` (no second interpreter start-up), so one call of several runs costs one
Python start-up plus a few forks. docs/sandbox.md has the measured executions per second.
"""

from __future__ import annotations

import ctypes
import marshal
import math
import os
import resource
import select
import sys
import time

import _signal as signal  # the C module: ``signal`` would import enum & co. on every launch

# -------------------------------------------------------------------------------------------------
# constants (Linux ABI)
# -------------------------------------------------------------------------------------------------
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91, "ppc64le": 184, "s390x": 185, "riscv64": 91}

SANDBOX_UID = 1000  # uid/gid of the untrusted program inside the user namespace
DEFAULT_UID_BASE = 1_879_048_192  # host uid of the sandbox's root (+1: of its user); owns no file
RO_BINDS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
PASS_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": "/work", "TMPDIR": "/work", "PYTHONDONTWRITEBYTECODE": "1"}
RUN_STATUSES = ("ok", "error", "timeout", "output_limit", "signal", "skipped", "sandbox_error")
_LAUNCH_FLAG = "--launch"


# =================================================================================================
# launcher side (imported as ``sandbox`` by ``python -I -S -c ... --launch TAG``; standard library only)
# =================================================================================================
_libc = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> int:
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _b(s):
    return None if s is None else os.fsencode(s)


def _mount(src, target, fstype, flags, data=None) -> None:
    _check(_c().mount(_b(src), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)),
           f"mount({src!r}, {target!r}, {fstype!r}, {flags:#x})")


def _prctl(option: int, arg: int) -> None:
    _check(_c().prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
           f"prctl({option})")


def _die_with_parent(expected_parent: int) -> None:
    """SIGKILL this process when its parent dies; exit now if it already has (``expected_parent``
    is what getppid() returns while it lives: 0 for a pid namespace's init, whose parent is outside)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:
        os._exit(111)


def _mount_flags_of(path: str) -> int:
    """The flags a read-only remount of ``path`` must keep (the kernel refuses to clear locked ones)."""
    f = os.statvfs(path).f_flag
    out = 0
    for st, ms in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                   (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME)):
        if f & st:
            out |= ms
    return out


def _bind_ro(fd: int, target: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    src = f"/proc/self/fd/{fd}"  # an O_PATH fd opened by the host-root launcher: no lookup through /root
    try:
        _mount(src, target, None, MS_BIND)
    except OSError:  # a subtree with mounts below it must be bound recursively
        _mount(src, target, None, MS_BIND | MS_REC)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | _mount_flags_of(target))


def _setup_root(binds: list, single_uid: bool, newroot: str = "/tmp") -> None:
    """G: build the sandbox's file system and pivot_root into it (see the module docstring)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", newroot, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for path, fd, kind, link in binds:
        target = newroot + path
        if kind == "link":
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(link, target)
        else:
            _bind_ro(fd, target, kind == "dir")
        if fd is not None:
            os.close(fd)
    dev = newroot + "/dev"
    os.makedirs(dev)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=0755")
    for name in ("null", "zero", "full", "random", "urandom"):
        if os.path.exists("/dev/" + name):
            open(f"{dev}/{name}", "a").close()
            _mount("/dev/" + name, f"{dev}/{name}", None, MS_BIND)
    for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                       ("stderr", "/proc/self/fd/2")):
        os.symlink(link, f"{dev}/{name}")
    os.makedirs(newroot + "/proc")
    _mount("proc", newroot + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(newroot + "/etc", exist_ok=True)
    uid = 0 if single_uid else SANDBOX_UID
    files = {"passwd": f"root:x:0:0:root:/work:/bin/sh\nsandbox:x:{uid}:{uid}:sandbox:/work:/bin/sh\n",
             "group": f"root:x:0:\nsandbox:x:{uid}:\n", "hosts": "127.0.0.1 localhost\n", "hostname": "sandbox\n"}
    for name, text in files.items():
        with open(f"{newroot}/etc/{name}", "w") as f:
            f.write(text)
    for d in ("/work", "/tmp"):
        os.makedirs(newroot + d, exist_ok=True)
    os.chdir(newroot)
    _check(_c().syscall(_SYS_PIVOT_ROOT[os.uname().machine], b".", b"."), "pivot_root")
    _check(_c().umount2(b".", MNT_DETACH), "umount2(old root)")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _mount(None, "/dev", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    for name in ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup", "time"):  # no nested namespaces
        try:
            with open(f"/proc/sys/user/max_{name}_namespaces", "w") as f:
                f.write("0")
        except OSError:
            pass


def _drop_capabilities() -> None:
    """Empty the bounding set and the effective/permitted/inheritable sets of this process."""
    _drop_capabilities_bounding_only()
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2: all zero
    nr = _SYS_CAPSET.get(os.uname().machine)
    if nr is not None:
        _check(_c().syscall(nr, header, data), "capset")


def _set_limits(lim: dict) -> None:
    mb = 1 << 20
    cpu = max(1, int(math.ceil(lim["cpu_s"])))
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    stack = 8 * mb if stack == resource.RLIM_INFINITY else min(stack, 64 * mb)
    for res, soft, hard in (
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at soft, SIGKILL at hard
        (resource.RLIMIT_AS, lim["memory_mb"] * mb, lim["memory_mb"] * mb),
        (resource.RLIMIT_NPROC, lim["max_processes"], lim["max_processes"]),
        (resource.RLIMIT_NOFILE, lim["max_open_files"], lim["max_open_files"]),
        (resource.RLIMIT_FSIZE, lim["max_file_mb"] * mb, lim["max_file_mb"] * mb),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_MEMLOCK, 0, 0),
        (resource.RLIMIT_MSGQUEUE, 0, 0),
        (resource.RLIMIT_STACK, stack, stack),
    ):
        resource.setrlimit(res, (soft, hard))


def _untrusted_child(code: str, stdin_fd: int, out_w: int, err_w: int, lim: dict, workdir: str,
                     mode: str) -> None:
    """U (never returns): confine this forked process, then run ``code`` as ``__main__``."""
    import builtins
    import io
    import types

    rc = 1
    try:
        os.dup2(stdin_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, max(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
        os.setsid()
        os.chdir(workdir)
        os.umask(0o022)
        os.environ.clear()
        os.environ.update(PASS_ENV)
        if mode != "isolated":
            os.environ["HOME"] = os.environ["TMPDIR"] = workdir
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGALRM, signal.SIGUSR1):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        _set_limits(lim)
        if mode == "isolated":  # uid 1000 inside: all capabilities go with the setuid
            _drop_capabilities_bounding_only()
            os.setgroups([])
            os.setresgid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
            os.setresuid(SANDBOX_UID, SANDBOX_UID, SANDBOX_UID)
        elif mode == "isolated_single_uid":
            _drop_capabilities()
        elif os.geteuid() == 0:  # unsafe fallback as root: become nobody
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _prctl(PR_SET_DUMPABLE, 0)
    except BaseException as exc:  # noqa: BLE001 - a confinement step failed: do not run the code
        os.write(2, f"sandbox: confinement failed: {exc!r}\n".encode())
        os._exit(125)
    try:
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                                     encoding="utf-8", errors="surrogateescape")
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)),
                                                       encoding="utf-8", errors="surrogateescape")
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)),
                                                       encoding="utf-8", errors="backslashreplace",
                                                       line_buffering=True)
        sys.argv = ["main.py"]
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins
        main.__dict__["__file__"] = os.path.join(workdir, "main.py")
        sys.modules["__main__"] = main
        try:
            exec(compile(code, "main.py", "exec"), main.__dict__)
            rc = 0
        except SystemExit as exc:  # the interpreter's own rules for sys.exit(arg)
            if exc.code is None:
                rc = 0
            elif isinstance(exc.code, int):
                rc = exc.code & 0xFF
            else:
                try:
                    print(exc.code, file=sys.stderr)
                except BaseException:  # noqa: BLE001
                    pass
                rc = 1
        except BaseException as exc:  # noqa: BLE001
            import traceback

            try:  # without this function's frame, as ``python main.py`` would print it
                traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
            except BaseException:  # noqa: BLE001
                pass
            rc = 1
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
    finally:
        os._exit(rc)


def _drop_capabilities_bounding_only() -> None:
    """Empty the capability bounding set (nothing can be gained back by exec)."""
    for cap in range(64):
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError:
            break


def _kill_rest(mode: str, pid: int) -> None:
    """Kill everything the run started: the whole pid namespace (isolated) or U's process group."""
    try:
        if mode.startswith("isolated"):
            os.kill(-1, signal.SIGKILL)  # from init: every process of the namespace but init
        else:
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _execute_run(run: dict, lim: dict, workdir: str, mode: str) -> dict:
    """G: one run of untrusted code, with the wall-clock deadline and the output cap."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    stdin_fd = os.memfd_create("stdin", 0)
    data = run.get("stdin", "").encode("utf-8", "surrogateescape")
    view = memoryview(data)
    while view:
        view = view[os.write(stdin_fd, view):]
    os.lseek(stdin_fd, 0, os.SEEK_SET)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _untrusted_child(run["code"], stdin_fd, out_w, err_w, lim, workdir, mode)
    for fd in (out_w, err_w, stdin_fd):
        os.close(fd)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    bufs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = [out_r, err_r]
    cap = lim["max_output_bytes"]
    deadline = start + lim["wall_s"]
    status = rusage = None
    timed_out = flooded = False
    killed = False
    while True:
        while status is None:  # reap (G is init: orphans come here too)
            try:
                p, st, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if p == 0:
                break
            if p == pid:
                status, rusage = st, ru
        if status is not None and not killed:
            _kill_rest(mode, pid)  # the program is done: nothing it started may outlive it
            killed = True
        if status is not None and not open_fds:
            break
        now = time.monotonic()
        if not killed and now >= deadline:
            timed_out = True
            _kill_rest(mode, pid)
            killed = True
        if killed:
            if not open_fds:  # pipes closed, the program not reaped yet: it was SIGKILLed
                try:
                    _, status, rusage = os.wait4(pid, 0)
                except ChildProcessError:
                    status = 0
                continue
            ready, _, _ = select.select(open_fds, [], [], 1.0)
            if not ready:  # a killed process cannot hold a pipe open for a second: give up on it
                break
        else:
            wait_fds = open_fds + ([pidfd] if pidfd is not None else [])
            timeout = deadline - now if pidfd is not None else min(0.005, deadline - now)
            ready, _, _ = select.select(wait_fds, [], [], max(0.0, timeout))
        for fd in ready:
            if fd == pidfd:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
                continue
            room = cap - len(bufs[out_r]) - len(bufs[err_r])
            bufs[fd] += chunk[:max(0, room)]
            if len(chunk) > room and not killed:
                flooded = True
                _kill_rest(mode, pid)
                killed = True
    wall = time.monotonic() - start
    for fd in [out_r, err_r] + ([pidfd] if pidfd is not None else []):
        os.close(fd)
    if status is None:
        try:
            _, status, rusage = os.wait4(pid, 0)
        except ChildProcessError:
            status = 0
    if mode.startswith("isolated"):  # reap everything killed in the namespace
        while True:
            try:
                os.wait4(-1, 0)
            except ChildProcessError:
                break
    cpu = (rusage.ru_utime + rusage.ru_stime) if rusage is not None else 0.0
    code = os.waitstatus_to_exitcode(status)
    sig = -code if code < 0 else 0
    cpu_killed = sig == signal.SIGKILL and cpu >= math.ceil(lim["cpu_s"]) and not flooded  # hard RLIMIT_CPU
    if timed_out or sig == signal.SIGXCPU or cpu_killed:
        kind = "timeout"
    elif flooded:
        kind = "output_limit"
    elif sig:
        kind = "signal"
    else:
        kind = "ok" if code == 0 else "error"
    return {"status": kind, "returncode": code, "wall_s": wall, "cpu_s": cpu,
            "stdout": bytes(bufs[out_r]).decode("utf-8", "replace"),
            "stderr": bytes(bufs[err_r]).decode("utf-8", "replace")}


def _execute_all(req: dict, mode: str, fresh_workdir) -> list:
    results = []
    stop = False
    for run in req["runs"]:
        if stop:
            results.append({"status": "skipped", "returncode": None, "wall_s": 0.0, "cpu_s": 0.0,
                            "stdout": "", "stderr": ""})
            continue
        with fresh_workdir() as workdir:
            res = _execute_run(run, req["limits"], workdir, mode)
        results.append(res)
        if (req.get("stop_on_failure") and res["status"] != "ok") or \
                (req.get("stop_after_timeout") and res["status"] == "timeout"):
            stop = True
    return results


def _write_result(obj: dict) -> None:
    data = memoryview(marshal.dumps(obj))
    while data:
        data = data[os.write(1, data):]


class _TmpfsWorkdir:
    """A fresh tmpfs at /work for one run (inside the mount namespace), unmounted afterwards."""

    def __init__(self, lim: dict, uid: int):
        self.opts = (f"size={lim['disk_mb']}m,nr_inodes={max(64, lim['disk_mb'] * 64)},mode=0700,"
                     f"uid={uid},gid={uid}")

    def __call__(self):
        return self

    def __enter__(self) -> str:
        _mount("tmpfs", "/work", "tmpfs", MS_NOSUID | MS_NODEV, self.opts)
        return "/work"

    def __exit__(self, *exc) -> None:
        _c().umount2(b"/work", MNT_DETACH)


class _HostTmpdir:
    """The unsafe fallback's working directory: a host temporary directory, removed afterwards."""

    def __call__(self):
        return self

    def __enter__(self) -> str:
        import tempfile

        self.path = tempfile.mkdtemp(prefix="postrl-sandbox-")
        if os.geteuid() == 0:
            os.chown(self.path, 65534, 65534)
        return self.path

    def __exit__(self, *exc) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


def _open_binds(extra: list) -> list:
    """C (host uid, new mount namespace): ``(path, O_PATH fd, kind, link target)`` for every
    read-only bind of the sandbox."""
    wanted, seen = [], set()
    for p in list(RO_BINDS) + list(extra):
        p = os.path.abspath(p)
        if p in seen or not os.path.lexists(p):
            continue
        seen.add(p)
        wanted.append(p)
    out = []
    covered: list = []
    for p in wanted:
        if os.path.islink(p) and p in RO_BINDS:
            out.append((p, None, "link", os.readlink(p)))
            continue
        real = os.path.realpath(p)
        if any(real == c or real.startswith(c + "/") for c in covered):
            continue
        kind = "dir" if os.path.isdir(real) else "file"
        out.append((real, os.open(real, os.O_PATH | os.O_CLOEXEC), kind, None))
        if kind == "dir":
            covered.append(real)
    return out


def _launcher_main() -> int:
    """L: read the request from stdin, run it isolated (or unsafe when asked), print the result."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if p != here]  # the program must not import postrl's files
    chunks = []
    while True:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    req = marshal.loads(b"".join(chunks))
    chunks = None
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    if not req.get("isolate", True):
        _write_result({"runs": _execute_all(req, "unsafe", _HostTmpdir())})
        return 0
    host_root = os.geteuid() == 0
    me = os.getpid()
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    child = os.fork()
    if child == 0:  # C
        rc = 2
        try:
            os.close(r1)
            os.close(w2)
            _die_with_parent(me)
            _check(_c().unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
                                | CLONE_NEWUTS), "unshare")
            # still the host uid here (file access as before): open what will be bound, in the new
            # mount namespace (a bind's source must be a mount of the caller's namespace)
            binds = _open_binds(req.get("binds", []))
            os.write(w1, b"u")
            if os.read(r2, 1) != b"m":
                os._exit(3)
            if host_root:
                os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            g = os.fork()
            if g == 0:  # G: init of the new pid namespace
                try:
                    _die_with_parent(0)
                    _setup_root(binds, single_uid=not host_root)
                    mode = "isolated" if host_root else "isolated_single_uid"
                    uid = SANDBOX_UID if host_root else 0
                    results = _execute_all(req, mode, _TmpfsWorkdir(req["limits"], uid))
                    _write_result({"runs": results})
                    os._exit(0)
                except BaseException as exc:  # noqa: BLE001
                    _write_result({"setup_error": f"{type(exc).__name__}: {exc}"})
                    os._exit(4)
            _, st = os.waitpid(g, 0)
            rc = os.waitstatus_to_exitcode(st)
        except BaseException as exc:  # noqa: BLE001
            _write_result({"setup_error": f"{type(exc).__name__}: {exc}"})
        os._exit(rc if rc >= 0 else 5)
    os.close(w1)
    os.close(r2)
    if os.read(r1, 1) != b"u":
        _, st = os.waitpid(child, 0)
        return 6
    try:
        if host_root:
            base = int(req.get("uid_base", DEFAULT_UID_BASE))
            idmap = f"0 {base} 1\n{SANDBOX_UID} {base + 1} 1\n"
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{child}/{name}", "w") as f:
                    f.write(idmap)
        else:
            with open(f"/proc/{child}/setgroups", "w") as f:
                f.write("deny")
            with open(f"/proc/{child}/uid_map", "w") as f:
                f.write(f"0 {os.geteuid()} 1\n")
            with open(f"/proc/{child}/gid_map", "w") as f:
                f.write(f"0 {os.getegid()} 1\n")
    except OSError as exc:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        _write_result({"setup_error": f"writing the user namespace id maps failed: {exc}"})
        return 7
    os.write(w2, b"m")
    _, st = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(st) & 0xFF


# The launcher imports this file as the top-level module ``sandbox`` (so that its compiled
# ``__pycache__`` file is used: a script run as ``__main__`` is compiled on every start) and
# stops here, before the host-side imports below.
if __name__ in ("__main__", "sandbox") and sys.argv[1:2] == [_LAUNCH_FLAG]:
    sys.exit(_launcher_main())


# =================================================================================================
# host side (the trainer)
# =================================================================================================
import logging  # noqa: E402 - the launcher above must not pay for these imports
import signal  # noqa: E402,F811
import subprocess  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Optional, Sequence, Union  # noqa: E402

log = logging.getLogger(__name__)


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): launcher crash, setup error, host deadline."""


class SandboxUnavailable(SandboxError):
    """The host cannot provide the isolation layer; untrusted code is refused (fail closed)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits of the sandbox.

    timeout_s:        wall-clock limit of one run (seconds).
    cpu_s:            CPU-time limit (RLIMIT_CPU, rounded up to whole seconds); None = ``timeout_s``.
    memory_mb:        address-space limit (RLIMIT_AS).
    max_processes:    processes + threads of the program (RLIMIT_NPROC, counted per sandbox).
    max_open_files:   RLIMIT_NOFILE.
    max_file_mb:      largest file the program may write (RLIMIT_FSIZE).
    disk_mb:          size of the working directory (a tmpfs) in total.
    max_output_bytes: stdout + stderr kept; a run that writes more is killed (``output_limit``).
    """

    timeout_s: float = 2.0
    cpu_s: Optional[float] = None
    memory_mb: int = 512
    max_processes: int = 16
    max_open_files: int = 64
    max_file_mb: int = 16
    disk_mb: int = 64
    max_output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        errors = []
        for name, low in (("timeout_s", 0.01), ("memory_mb", 32), ("max_processes", 1), ("max_open_files", 8),
                          ("max_file_mb", 1), ("disk_mb", 1), ("max_output_bytes", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
                errors.append(f"{name}={v!r} (must be a number >= {low})")
        if self.cpu_s is not None and (isinstance(self.cpu_s, bool) or not isinstance(self.cpu_s, (int, float))
                                       or not math.isfinite(self.cpu_s) or self.cpu_s <= 0):
            errors.append(f"cpu_s={self.cpu_s!r} (must be a positive number or None)")
        if errors:
            raise ValueError("sandbox limits: " + "; ".join(errors))

    def as_request(self) -> dict:
        return {"wall_s": float(self.timeout_s), "cpu_s": float(self.cpu_s or self.timeout_s),
                "memory_mb": int(self.memory_mb), "max_processes": int(self.max_processes),
                "max_open_files": int(self.max_open_files), "max_file_mb": int(self.max_file_mb),
                "disk_mb": int(self.disk_mb), "max_output_bytes": int(self.max_output_bytes)}


@dataclass
class RunResult:
    """What one run of a program did.

    status:     one of :data:`RUN_STATUSES`: ``ok`` (exit 0), ``error`` (non-zero exit, e.g. an
                exception), ``timeout`` (wall-clock or CPU limit), ``output_limit``, ``signal``
                (killed by a signal, e.g. SIGXFSZ / SIGSEGV), ``skipped`` (not run: an earlier
                run failed and the call asked to stop), ``sandbox_error`` (the sandbox failed).
    returncode: exit code, or minus the signal number; None when not run.
    """

    status: str
    returncode: Optional[int] = None
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    call_id: str = ""
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


def default_python() -> str:
    """The base interpreter (not a virtual environment's launcher symlink) that runs the sandbox."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    return os.path.realpath(exe)


def _python_binds(python: str) -> list[str]:
    """The read-only paths the interpreter needs besides :data:`RO_BINDS`: its prefix."""
    real = os.path.realpath(python)
    prefix = os.path.dirname(os.path.dirname(real))
    out = [prefix]
    for p in (sys.base_prefix, sys.base_exec_prefix):
        rp = os.path.realpath(p)
        if python == default_python() and rp not in out:
            out.append(rp)
    if os.path.exists("/etc/ld.so.cache"):
        out.append("/etc/ld.so.cache")
    return out


def _launch(request: dict, python: str, host_timeout_s: float, call_id: str) -> dict:
    """Start a launcher, hand it the request, return its parsed answer (SandboxError otherwise)."""
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [python, "-I", "-S", "-X", "utf8", "-c", f"import sys; sys.path.insert(0, {here!r}); import sandbox",
           _LAUNCH_FLAG, call_id]
    env = {"PATH": PASS_ENV["PATH"], "LANG": "C.UTF-8"}
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd="/", start_new_session=True, close_fds=True)
    except OSError as exc:
        raise SandboxError(f"could not start the sandbox launcher {cmd[0]!r}: {exc}") from exc
    try:
        out, err = proc.communicate(marshal.dumps(request), timeout=host_timeout_s)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid)
        proc.communicate()
        raise SandboxError(f"the sandbox did not answer within {host_timeout_s:.1f} s; killed") from None
    finally:
        _killpg(proc.pid)  # nothing of the call outlives it (PDEATHSIG does the rest)
    try:
        answer = marshal.loads(out) if out else None  # written by the trusted launcher, never by the program
    except (ValueError, EOFError, TypeError):
        answer = None
    if not isinstance(answer, dict):
        raise SandboxError(f"the sandbox launcher exited with {proc.returncode} without a result; "
                           f"stderr: {err.decode('utf-8', 'replace')[-1000:]!r}")
    if "setup_error" in answer:
        raise SandboxError(f"sandbox setup failed: {answer['setup_error']}")
    return answer


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_PROBES: dict[str, tuple[bool, str]] = {}
_PROBE_LOCK = threading.Lock()


def probe_isolation(python: Optional[str] = None) -> tuple[bool, str]:
    """Whether this host can isolate untrusted code: ``(True, "")`` or ``(False, reason)``.

    Runs one trivial program through the full isolation path (user, mount, pid, network
    namespaces, pivot_root, procfs, rlimits) and checks that it ran without network; cached
    per interpreter for the life of the process.
    """
    python = python or default_python()
    with _PROBE_LOCK:
        if python in _PROBES:
            return _PROBES[python]
        code = ("import os, socket\n"
                "assert os.getpid() == 2, os.getpid()\n"
                "assert not os.path.exists('/root/.bashrc') and not os.path.exists('/home')\n"
                "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=0.5)\n    net = True\n"
                "except OSError:\n    net = False\n"
                "assert not net, 'network reachable'\n"
                "print('sandbox-ok')\n")
        request = {"runs": [{"code": code, "stdin": ""}], "limits": SandboxLimits(timeout_s=5).as_request(),
                   "isolate": True, "binds": _python_binds(python)}
        try:
            answer = _launch(request, python, 30.0, "probe-" + uuid.uuid4().hex[:8])
            run = answer["runs"][0]
            if run["status"] == "ok" and run["stdout"].strip() == "sandbox-ok":
                result = (True, "")
            else:
                result = (False, f"probe program failed ({run['status']}): {run['stderr'][-500:]}")
        except (SandboxError, OSError, KeyError, IndexError) as exc:
            result = (False, str(exc))
        _PROBES[python] = result
        return result


RunSpec = Union[str, tuple, dict]


class Sandbox:
    """Runs untrusted Python code isolated from the host (see the module docstring).

    ``Sandbox(limits, allow_unsafe=False)`` probes the isolation once per process; where the host
    cannot provide it, it raises :class:`SandboxUnavailable` unless ``allow_unsafe=True`` (then it
    runs with rlimits only and logs a warning). Thread-safe: each call is its own launcher
    process, so a thread pool over :meth:`run_many` runs calls concurrently.
    """

    def __init__(self, limits: Optional[SandboxLimits] = None, *, allow_unsafe: bool = False,
                 python: Optional[str] = None, extra_ro_paths: Sequence[str] = (),
                 uid_base: int = DEFAULT_UID_BASE):
        if limits is not None and not isinstance(limits, SandboxLimits):
            raise TypeError(f"limits must be a SandboxLimits, got {type(limits).__name__}")
        self.limits = limits or SandboxLimits()
        self.python = python or default_python()
        if not os.path.exists(self.python):
            raise ValueError(f"sandbox python {self.python!r} does not exist")
        if not isinstance(uid_base, int) or not 1 <= uid_base < 2**32 - 2:
            raise ValueError(f"uid_base={uid_base!r} must be an int in [1, 2**32 - 2)")
        self.uid_base = uid_base
        self.binds = _python_binds(self.python) + [os.path.abspath(p) for p in extra_ro_paths]
        ok, reason = probe_isolation(self.python)
        self.isolated = ok
        if not ok:
            if not allow_unsafe:
                raise SandboxUnavailable(
                    "this host cannot isolate untrusted code (" + reason + "). The sandbox needs Linux user, "
                    "mount, pid and network namespaces (unprivileged user namespaces enabled, or root). "
                    "Refusing to run model-written code. To run it anyway WITHOUT isolation (rlimits "
                    "only: the code can read your files and use the network), set allow_unsafe: true.")
            log.warning("sandbox: isolation unavailable (%s); running untrusted code UNSAFELY "
                        "(allow_unsafe=True): rlimits, a new session and a temporary directory only", reason)

    def run(self, code: str, stdin: str = "", *, call_id: Optional[str] = None) -> RunResult:
        """Run one program with ``stdin``; see :class:`RunResult`."""
        return self.run_many([(code, stdin)], call_id=call_id)[0]

    def run_many(self, runs: Sequence[RunSpec], *, stop_on_failure: bool = False,
                 stop_after_timeout: bool = False, call_id: Optional[str] = None) -> list[RunResult]:
        """Run several programs in one sandbox call, each in a fresh process and working directory.

        ``runs``: code strings, ``(code, stdin)`` pairs or ``{"code", "stdin"}`` dicts.
        ``stop_on_failure`` / ``stop_after_timeout``: skip the remaining runs after the first
        run that was not ``ok`` / that timed out. A failure of the sandbox itself gives every run
        the status ``sandbox_error`` (with the reason in ``stderr``); it never raises.
        """
        specs = []
        for i, r in enumerate(runs):
            if isinstance(r, str):
                code, stdin = r, ""
            elif isinstance(r, dict):
                code, stdin = r.get("code"), r.get("stdin", "")
            elif isinstance(r, (tuple, list)) and len(r) == 2:
                code, stdin = r
            else:
                raise TypeError(f"runs[{i}]: expected a code string, a (code, stdin) pair or a dict, got {r!r:.80}")
            if not isinstance(code, str) or not isinstance(stdin, str):
                raise TypeError(f"runs[{i}]: code and stdin must be str, got {type(code).__name__}, "
                                f"{type(stdin).__name__}")
            specs.append({"code": code, "stdin": stdin})
        if not specs:
            return []
        call_id = call_id or "postrl-sbx-" + uuid.uuid4().hex[:12]
        request = {"runs": specs, "limits": self.limits.as_request(), "isolate": self.isolated,
                   "binds": self.binds, "uid_base": self.uid_base,
                   "stop_on_failure": bool(stop_on_failure), "stop_after_timeout": bool(stop_after_timeout)}
        host_timeout = len(specs) * (self.limits.timeout_s + 1.5) + 10.0
        try:
            answer = _launch(request, self.python, host_timeout, call_id)
            raw = answer["runs"]
            if len(raw) != len(specs):
                raise SandboxError(f"the sandbox returned {len(raw)} results for {len(specs)} runs")
        except (SandboxError, KeyError, TypeError) as exc:
            return [RunResult(status="sandbox_error", stderr=str(exc), call_id=call_id) for _ in specs]
        return [RunResult(status=r["status"], returncode=r["returncode"], stdout=r["stdout"], stderr=r["stderr"],
                          wall_s=float(r["wall_s"]), cpu_s=float(r["cpu_s"]), call_id=call_id) for r in raw]
