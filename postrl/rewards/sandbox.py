"""A sandbox for untrusted Python (model-written code), isolated by the operating system.

Every call runs in a fresh set of Linux namespaces, built by a disposable launcher process
(this file, imported by ``python -I -S -c "import sandbox" --launch``), never by the trainer:

    trainer ──(pipe: header, then runs)──► launcher L  (host root, own session / process group)
                                          └─ C: unshare(user, mount, pid, net, ipc, uts)
                                               └─ G: pid 1 of the new pid namespace (init, trusted)
                                                    ├─ U: the untrusted program, one per run
                                                    └─ K: the test checker of a test run (trusted code)

* **user namespace**: L (host side) writes the id maps of C's new user namespace: inside
  uid/gid 0 (G, which sets up the mounts) and 1000 (U, K) map to unprivileged host ids
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
* **seccomp**: U and K run under a seccomp filter built with libseccomp (through ``pyseccomp``,
  on the trainer, exported as BPF and installed with ``prctl(PR_SET_SECCOMP)``) that denies
  what untrusted code never needs: :data:`DENIED_SYSCALLS` (ptrace, mount, unshare/setns, bpf,
  perf_event_open, userfaultfd, keyctl, io_uring, kexec, reboot, modules, SysV shared memory and
  message queues, memfd...), ``clone`` with a namespace flag, ``clone3`` (ENOSYS, so that the C
  library falls back to ``clone``) and sockets other than AF_UNIX / AF_INET / AF_INET6.
* **rlimits** set in U (soft = hard, so the code cannot raise them): CPU seconds, address
  space, processes/threads, open files, file size, no core files; plus a wall-clock deadline
  enforced by G, and stdout+stderr capped at ``max_output_bytes`` (the run is killed past it).
* **memory per call**: ``memory_mb`` bounds the whole call. Where the host delegates a cgroup v2
  with the memory controller, every call gets its own cgroup (``memory.max`` = the budget) and
  each process may use all of it; elsewhere every process gets ``memory_mb / max_processes`` of
  address space, so that the processes of a call (at most ``max_processes``) hold at most the
  budget together.
* **environment**: empty except ``PATH``, ``HOME=/work``, ``TMPDIR=/work``, ``LANG``.

**What a program can see.** The launcher reads the runs of a call only after C is forked, and G
(which every run's process is forked from) never keeps a run's code, input, test or output in
its memory: each item is read into a buffer that is zeroed right after the fork that needs it,
and each run's result is sent to the trainer and zeroed before the next run. So a run cannot
find another test's code, input or expected output, not even in memory it inherited.

**Test runs** (``{"code": program, "test": test code, "setup": code}``): the program runs in U,
the test in K, a fresh process that never holds the program. Every name of the test that is not
a builtin, a standard-library module or defined by the test is asked from U (a standard-library
module there becomes K's own copy; nothing else of U ever runs in K); calls, attribute
reads, indexing and iteration of the program's objects go to U over a pipe, and only plain data
comes back (``None``, bool, int, float, complex, str, bytes, bytearray, list, tuple, dict, set,
frozenset, Fraction, Decimal; an instance of a subclass of one of them crosses as its builtin base
value, so an overridden ``__eq__`` never reaches the test); anything else is an opaque handle that
compares equal only to itself and has no truth value. The test's assertions run in K, on plain
data; K reports its verdict through a pipe only it holds. So a test passes only when K saw it
pass: a program that exits early, installs exit, exception or signal hooks, or monkeypatches
builtins or the harness in its own process changes nothing in K, and never sees the test code or
its expected values (only the arguments of the calls it receives).

The isolation is probed at first use (one trivial run). If the host cannot provide it (no user
namespaces, seccomp-restricted container, no procfs mount, no libseccomp...) :class:`Sandbox`
raises :class:`SandboxUnavailable` naming the reason: untrusted code is refused (fail closed)
unless the caller passes ``allow_unsafe=True``, which falls back to rlimits + a new session + a
temporary directory + a clean environment (+ dropping to ``nobody`` when root, + the seccomp
filter when libseccomp is there), logged as a warning: no network, filesystem or daemon
containment in that mode.

Each run is a ``fork()`` of the launcher's already-started interpreter that ``exec()`` s the
program as ``__main__`` (no second interpreter start-up), so one call of several runs costs one
Python start-up plus a few forks. docs/sandbox.md has the measured executions per second.
"""

from __future__ import annotations

import builtins
import ctypes
import marshal
import math
import mmap
import os
import resource
import select
import sys
import time

import _signal as signal  # the C module: ``signal`` would import enum & co. on every launch

# -------------------------------------------------------------------------------------------------
# constants (Linux ABI)
# -------------------------------------------------------------------------------------------------
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND = 32, 1024, 2048, 4096
MS_REC, MS_PRIVATE, MS_RELATIME = 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 22, 38
SECCOMP_MODE_FILTER = 2
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91, "ppc64le": 184, "s390x": 185, "riscv64": 91}

SANDBOX_UID = 1000  # uid/gid of the untrusted program inside the user namespace
DEFAULT_UID_BASE = 1_879_048_192  # host uid of the sandbox's root (+1: of its user); owns no file
RO_BINDS = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32")
PASS_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "HOME": "/work", "TMPDIR": "/work", "PYTHONDONTWRITEBYTECODE": "1"}
RUN_STATUSES = ("ok", "error", "timeout", "output_limit", "signal", "skipped", "sandbox_error")
VERDICTS = ("pass", "assert", "error")  # a test run's verdict (K): passed, an assertion failed, an error
_LAUNCH_FLAG = "--launch"
MAX_MESSAGE_BYTES = 16 << 20  # one value exchanged between a program (U) and its test (K)
_MAX_DEPTH = 200  # nesting of one value
_VERDICT_BYTES = 4096

# Denied with EPERM inside the sandbox (those this architecture lacks are skipped). The kernel's
# attack surface that untrusted code never needs, ways around the namespaces and the limits, and
# memory that RLIMIT_AS does not count (SysV shared memory and message queues, memfd).
DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "process_madvise",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "reboot", "init_module", "finit_module", "delete_module",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "lookup_dcookie",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init", "iopl", "ioperm", "vhangup", "uselib",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "personality", "mbind", "set_mempolicy", "migrate_pages", "move_pages",
    "memfd_create", "memfd_secret", "shmget", "shmat", "msgget", "semget", "mq_open",
)
ALLOWED_SOCKET_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6 (the network namespace is empty anyway)


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


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _install_seccomp(bpf: bytes) -> None:
    """Install a seccomp filter (classic BPF, 8 bytes per instruction) on this thread; needs no_new_privs."""
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.addressof(buf))
    _check(_c().prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)), "prctl(PR_SET_SECCOMP)")


def _die_with_parent(expected_parent: int) -> None:
    """SIGKILL this process when its parent dies; exit now if it already has (``expected_parent``
    is what getppid() returns while it lives: 0 for a pid namespace's init, whose parent is outside)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:
        os._exit(111)


# ----- byte streams ---------------------------------------------------------------------------------
def _read_exact(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise EOFError(f"stream ended after {len(out)} of {n} bytes")
        out += chunk
    return out


def _read_item(fd: int) -> bytearray:
    """One length-prefixed item, read straight into a new buffer (no other copy of it in memory)."""
    n = int.from_bytes(_read_exact(fd, 8), "big")
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise EOFError("stream ended inside an item")
        got += k
    view.release()
    return buf


def _zero(buf: bytearray, n=None) -> None:
    """Overwrite the first ``n`` bytes of ``buf`` (all of it by default) with zeros, in place."""
    n = len(buf) if n is None else min(n, len(buf))
    if n > 0:
        ctypes.memset((ctypes.c_char * n).from_buffer(buf), 0, n)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


# ----- plain data: the only thing that crosses between a program (U) and its test (K) -----------------
class _Malformed(ValueError):
    """A message between U and K that is not well-formed plain data."""


_BASES = (int, float, complex, str, bytes, bytearray, list, tuple, dict, set, frozenset)


def _base_value(v, t):
    """The builtin base value of an instance of a subclass of a builtin, taken through the base type's
    own C methods (the subclass's overrides, ``__eq__`` included, are never called)."""
    if issubclass(t, bool):
        return bool(int.__int__(v))
    if issubclass(t, int):
        return int.__int__(v)
    if issubclass(t, float):
        return float.__float__(v)
    if issubclass(t, complex):
        return complex.__complex__(v)
    if issubclass(t, str):
        return str.__str__(v)
    if issubclass(t, bytes):
        return bytes.__bytes__(v)
    if issubclass(t, bytearray):
        return bytearray.copy(v)
    if issubclass(t, list):
        return list.copy(v)
    if issubclass(t, tuple):
        return tuple.__getitem__(v, slice(None))
    if issubclass(t, dict):
        return dict.copy(v)
    if issubclass(t, set):
        return set.copy(v)
    if issubclass(t, frozenset):
        return frozenset.copy(v)
    return None


def _encode(value, handle) -> bytes:
    """``value`` as bytes: plain data exactly, anything else through ``handle(obj) -> int``
    (which may raise). Format: a tag byte, then hex numbers / lengths ended by ``;`` or ``:``."""
    out: list = []
    app = out.append

    def enc(v, depth):
        t = type(v)
        if t is int:
            app(b"i%x;" % v)
        elif t is str:
            b = v.encode("utf-8", "surrogatepass")
            app(b"s%d:" % len(b))
            app(b)
        elif v is None:
            app(b"N")
        elif t is bool:
            app(b"T" if v else b"F")
        elif t is float:
            app(b"f" + v.hex().encode() + b";")
        elif t is list or t is tuple or t is set or t is frozenset:
            if depth > _MAX_DEPTH:
                raise ValueError("value nested too deeply")
            app(b"%s%d:" % ({list: b"l", tuple: b"t", set: b"S", frozenset: b"Z"}[t], len(v)))
            for x in v:
                enc(x, depth + 1)
        elif t is dict:
            if depth > _MAX_DEPTH:
                raise ValueError("value nested too deeply")
            app(b"d%d:" % len(v))
            for k, x in v.items():
                enc(k, depth + 1)
                enc(x, depth + 1)
        elif t is bytes or t is bytearray:
            app(b"%s%d:" % (b"b" if t is bytes else b"a", len(v)))
            app(bytes(v))
        elif t is complex:
            app(b"c" + v.real.hex().encode() + b"," + v.imag.hex().encode() + b";")
        elif v is Ellipsis:
            app(b"E")
        elif t.__module__ == "fractions" and t.__name__ == "Fraction":
            app(b"q")
            enc(int.__int__(v.numerator), depth)
            enc(int.__int__(v.denominator), depth)
        elif t.__module__ in ("decimal", "_decimal") and t.__name__ == "Decimal":
            app(b"m")
            enc(str.__str__(t.__str__(v)), depth)
        else:
            base = _base_value(v, t) if issubclass(t, _BASES) else None
            if base is not None:
                enc(base, depth)
            else:
                app(b"h%x;" % handle(v))

    enc(value, 0)
    data = b"".join(out)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"value of {len(data)} bytes is larger than {MAX_MESSAGE_BYTES}")
    return data


def _decode(data: bytes, handle):
    """The value that :func:`_encode` wrote: only builtin types (and Fraction / Decimal, and
    ``handle(int)`` for handles). Raises :class:`_Malformed` on anything else."""
    n = len(data)

    def num(i, end):
        j = data.index(end, i)
        return data[i:j], j + 1

    def dec(i, depth):
        if depth > _MAX_DEPTH or i >= n:
            raise _Malformed("value nested too deeply or truncated")
        tag = data[i]
        i += 1
        if tag == 0x69:  # i
            s, i = num(i, b";")
            return int(s, 16), i
        if tag == 0x73 or tag == 0x62 or tag == 0x61:  # s b a
            s, i = num(i, b":")
            k = int(s)
            if k < 0 or i + k > n:
                raise _Malformed("truncated")
            raw = data[i:i + k]
            v = raw.decode("utf-8", "surrogatepass") if tag == 0x73 else (raw if tag == 0x62 else bytearray(raw))
            return v, i + k
        if tag == 0x4E:
            return None, i
        if tag == 0x54:
            return True, i
        if tag == 0x46:
            return False, i
        if tag == 0x45:
            return Ellipsis, i
        if tag == 0x66:  # f
            s, i = num(i, b";")
            return float.fromhex(s.decode("ascii")), i
        if tag == 0x63:  # c
            s, i = num(i, b";")
            re_, im = s.decode("ascii").split(",")
            return complex(float.fromhex(re_), float.fromhex(im)), i
        if tag in (0x6C, 0x74, 0x53, 0x5A, 0x64):  # l t S Z d
            s, i = num(i, b":")
            k = int(s)
            if k < 0 or k > n - i:
                raise _Malformed("bad length")
            items = []
            for _ in range(k * 2 if tag == 0x64 else k):
                v, i = dec(i, depth + 1)
                items.append(v)
            if tag == 0x6C:
                return items, i
            if tag == 0x74:
                return tuple(items), i
            if tag == 0x53:
                return set(items), i
            if tag == 0x5A:
                return frozenset(items), i
            return dict(zip(items[0::2], items[1::2])), i
        if tag == 0x71:  # q: Fraction
            a, i = dec(i, depth + 1)
            b, i = dec(i, depth + 1)
            if type(a) is not int or type(b) is not int:
                raise _Malformed("bad fraction")
            from fractions import Fraction
            return Fraction(a, b), i
        if tag == 0x6D:  # m: Decimal
            s, i = dec(i, depth + 1)
            if type(s) is not str:
                raise _Malformed("bad decimal")
            from decimal import Decimal
            return Decimal(s), i
        if tag == 0x68:  # h
            s, i = num(i, b";")
            return handle(int(s, 16)), i
        raise _Malformed(f"unknown tag {tag}")

    try:
        value, end = dec(0, 0)
    except _Malformed:
        raise
    except (ValueError, TypeError, IndexError, RecursionError, OverflowError, MemoryError, ZeroDivisionError) as exc:
        raise _Malformed(f"{type(exc).__name__}: {exc}") from None
    if end != n:
        raise _Malformed("trailing bytes")
    return value


def _send(fd: int, data: bytes) -> None:
    _write_all(fd, len(data).to_bytes(4, "big") + data)


def _recv(fd: int):
    """One message, or None at end of stream."""
    head = b""
    while len(head) < 4:
        chunk = os.read(fd, 4 - len(head))
        if not chunk:
            if head:
                raise _Malformed("truncated message")
            return None
        head += chunk
    n = int.from_bytes(head, "big")
    if n > MAX_MESSAGE_BYTES:
        raise _Malformed(f"message of {n} bytes is larger than {MAX_MESSAGE_BYTES}")
    return _read_exact(fd, n)


# ----- U: the program's side of a test run ----------------------------------------------------------
def _std_module(v):
    """The name of ``v`` when it is a standard-library module (the test then uses its own copy), else
    None. Only modules: a callable named by the program would run in the checker with the test's
    arguments, and could build objects there (``unittest.mock._ANY`` is equal to everything)."""
    t = type(v)
    if t.__name__ == "module" and t.__module__ == "builtins":
        name = getattr(v, "__name__", None)
        if isinstance(name, str) and name.split(".")[0] in sys.stdlib_module_names:
            return name
    return None


def _serve(main: dict, rfd: int, wfd: int) -> None:
    """U after the program: answer the test's requests until it closes the pipe (never returns)."""
    objs: list = []
    ids: dict = {}

    def register(v) -> int:
        k = id(v)
        if k not in ids:
            ids[k] = len(objs)
            objs.append(v)
        return ids[k]

    def lookup(h):
        if not 0 <= h < len(objs):
            raise _Malformed("unknown handle")
        return objs[h]

    while True:
        try:
            msg = _recv(rfd)
        except BaseException:  # noqa: BLE001
            msg = None
        if msg is None:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:  # noqa: BLE001
                    pass
            os._exit(0)
        try:
            req = _decode(msg, lookup)
            op = req[0]
            if op == "get":
                if req[1] not in main:
                    raise NameError(f"name {req[1]!r} is not defined")
                v = main[req[1]]
                std = _std_module(v)
                out = ("std", std) if std is not None else ("ok", v)
            elif op == "call":
                fn, args, kwargs = req[1], req[2], req[3]
                result = fn(*args, **kwargs)
                mutable = (list, dict, set, bytearray)
                back = [(i, a) for i, a in enumerate(args) if type(a) in mutable]
                back += [(k, a) for k, a in kwargs.items() if type(a) in mutable]
                out = ("ok", result, back)
            elif op == "attr":
                out = ("ok", getattr(req[1], req[2]))
            elif op == "item":
                out = ("ok", req[1][req[2]])
            elif op == "iter":
                out = ("ok", list(req[1]))
            elif op == "len":
                out = ("ok", len(req[1]))
            elif op == "str":
                out = ("ok", str(req[1]))
            else:
                raise _Malformed(f"unknown request {op!r}")
            data = _encode(out, register)
        except BaseException as exc:  # noqa: BLE001 - the program's exception (SystemExit too) goes to the test
            try:
                text = str(exc)[:1000]
            except BaseException:  # noqa: BLE001
                text = ""
            try:
                data = _encode(("exc", str(type(exc).__name__), str(text)), register)
            except BaseException:  # noqa: BLE001
                data = _encode(("exc", "Exception", ""), register)
        _send(wfd, data)


# ----- K: the test's side of a test run (trusted code; never holds the program) ---------------------
class ProgramError(Exception):
    """In a test: the program raised an exception that is not a builtin one, answered something
    malformed, or its process ended."""


_BUILTIN_NAMES = frozenset(dir(builtins))


def _exception(name: str, message: str) -> BaseException:
    cls = getattr(builtins, name, None) if name in _BUILTIN_NAMES else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        return cls(message)
    return ProgramError(f"{name}: {message}" if message else name)


class Remote:
    """A program's object in a test: not plain data. Calls, attribute reads, indexing, iteration,
    ``len`` and ``str`` go to the program's process and come back as plain data (or handles); it is
    equal only to itself, has no truth value, no order and no arithmetic."""

    __slots__ = ("_h", "_c")

    def __call__(self, *args, **kwargs):
        return self._c.call(self, args, kwargs)

    def __getattr__(self, name):
        return self._c.value(("attr", self, name))

    def __getitem__(self, key):
        return self._c.value(("item", self, key))

    def __iter__(self):
        return iter(self._c.value(("iter", self)))

    def __len__(self):
        return self._c.value(("len", self))

    def __str__(self):
        return self._c.value(("str", self))

    def __repr__(self):
        return f"<program object #{self._h}>"

    def __bool__(self):
        raise TypeError(f"{self!r} is not plain data and has no truth value in a test")

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    __hash__ = object.__hash__


class _Link:
    """K's end of the pipes to U."""

    def __init__(self, rfd: int, wfd: int):
        self.rfd, self.wfd = rfd, wfd
        self.remotes: dict = {}

    def _remote(self, h: int) -> Remote:
        r = self.remotes.get(h)
        if r is None:
            r = Remote.__new__(Remote)
            object.__setattr__(r, "_h", h)
            object.__setattr__(r, "_c", self)
            self.remotes[h] = r
        return r

    @staticmethod
    def _handle_of(v) -> int:
        if type(v) is Remote:
            return v._h
        raise TypeError(f"a {type(v).__name__} cannot be passed to the program (only plain data and the "
                        f"program's own objects)")

    def ask(self, req) -> tuple:
        """Send one request to U; its answer tuple (``ok`` / ``std``), or the program's exception raised."""
        data = _encode(req, self._handle_of)
        try:
            _send(self.wfd, data)
            answer = _recv(self.rfd)
        except OSError:
            answer = None
        if answer is None:
            raise ProgramError("the program's process ended (it exited, was killed, or never defined what "
                               "the test uses)")
        try:
            value = _decode(answer, self._remote)
        except _Malformed as exc:
            raise ProgramError(f"malformed answer from the program: {exc}") from None
        if type(value) is not tuple or not value:
            raise ProgramError("malformed answer from the program")
        if value[0] == "ok" and len(value) >= 2:
            return value
        if value[0] == "exc" and len(value) == 3 and type(value[1]) is str and type(value[2]) is str:
            raise _exception(value[1], value[2])
        if value[0] == "std" and len(value) == 2 and type(value[1]) is str:
            return value
        raise ProgramError("malformed answer from the program")

    def value(self, req):
        return self.ask(req)[1]

    def get(self, name: str):
        value = self.ask(("get", name))
        if value[0] == "std":  # a standard-library module: the test's own copy
            if value[1].split(".")[0] not in sys.stdlib_module_names:
                raise ProgramError(f"not a standard module: {value[1]!r}")
            import importlib

            return importlib.import_module(value[1])
        return value[1]

    def call(self, fn: Remote, args: tuple, kwargs: dict):
        value = self.ask(("call", fn, args, kwargs))
        if len(value) != 3 or type(value[2]) is not list:
            raise ProgramError("malformed answer from the program")
        for key, new in value[2]:  # arguments the program changed in place
            old = args[key] if type(key) is int and 0 <= key < len(args) else kwargs.get(key) \
                if type(key) is str else None
            if type(old) is not type(new):
                continue
            if type(old) in (list, bytearray):
                old[:] = new
            elif type(old) in (dict, set):
                old.clear()
                old.update(new)
        return value[1]


class _TestNamespace(dict):
    """The globals of a test: its own names, then builtins, then standard-library modules (K's own
    copies), then the program's names (asked from U)."""

    def __init__(self, link: _Link, modules=()):
        super().__init__()
        self.link = link
        self.absent: set = set()
        self.modules = frozenset(modules)

    def __missing__(self, name):
        if name in _BUILTIN_NAMES or name in self.absent or not isinstance(name, str):
            raise KeyError(name)
        try:
            if name in self.modules and name in sys.stdlib_module_names:
                raise NameError(name)
            value = self.link.get(name)
        except NameError:
            if name in sys.stdlib_module_names:
                import importlib

                value = importlib.import_module(name)
            else:
                self.absent.add(name)
                raise KeyError(name) from None
        self[name] = value
        return value


def _run_test(test: str, setup: str, modules: list, rfd: int, wfd: int, vfd: int) -> None:
    """K: run the test against the program in U; write the verdict to ``vfd`` (never returns).
    ``modules``: standard-library module names the test uses as modules (``math.isclose``): always
    K's own, whatever the program bound to those names."""
    link = _Link(rfd, wfd)
    g = _TestNamespace(link, modules)
    g["__builtins__"] = builtins
    g["__name__"] = "__test__"
    try:
        if setup:
            exec(compile(setup, "<test setup>", "exec", dont_inherit=True), g)
        exec(compile(test, "<test>", "exec", dont_inherit=True), g)
        verdict = b"P"
    except AssertionError as exc:
        verdict = b"A" + _describe(exc).encode("utf-8", "replace")
    except BaseException as exc:  # noqa: BLE001
        verdict = b"E" + _describe(exc).encode("utf-8", "replace")
    try:
        _write_all(vfd, verdict[:_VERDICT_BYTES])
    finally:
        os._exit(0)


def _describe(exc: BaseException) -> str:
    """``Type: message (test line N)``: the exception and the test line it came from (not the line's text)."""
    try:
        text = str(exc)
    except BaseException:  # noqa: BLE001
        text = ""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename in ("<test>", "<test setup>"):
            line = f"{tb.tb_frame.f_code.co_filename[1:-1]} line {tb.tb_lineno}"
        tb = tb.tb_next
    out = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return (out + (f" ({line})" if line else ""))[:_VERDICT_BYTES - 1]


# ----- the sandbox's file system ----------------------------------------------------------------------
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


def _drop_capabilities_bounding_only() -> None:
    """Empty the capability bounding set (nothing can be gained back by exec)."""
    for cap in range(64):
        try:
            _prctl(PR_CAPBSET_DROP, cap)
        except OSError:
            break


def _set_limits(lim: dict) -> None:
    mb = 1 << 20
    cpu = max(1, int(math.ceil(lim["cpu_s"])))
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    stack = 8 * mb if stack == resource.RLIM_INFINITY else min(stack, 64 * mb)
    for res, soft, hard in (
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at soft, SIGKILL at hard
        (resource.RLIMIT_AS, lim["process_memory_mb"] * mb, lim["process_memory_mb"] * mb),
        (resource.RLIMIT_NPROC, lim["max_processes"], lim["max_processes"]),
        (resource.RLIMIT_NOFILE, lim["max_open_files"], lim["max_open_files"]),
        (resource.RLIMIT_FSIZE, lim["max_file_mb"] * mb, lim["max_file_mb"] * mb),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_MEMLOCK, 0, 0),
        (resource.RLIMIT_MSGQUEUE, 0, 0),
        (resource.RLIMIT_STACK, stack, stack),
    ):
        resource.setrlimit(res, (soft, hard))


def _confine(targets: dict, hdr: dict, workdir: str, mode: str) -> None:
    """U or K right after the fork: join the call's cgroup, keep only ``targets`` (target fd ->
    source fd), new session, working directory, clean environment, limits, unprivileged uid,
    no_new_privs, not dumpable, seccomp filter. Raises when a step fails."""
    if hdr.get("cgroup_fd", -1) >= 0:
        os.write(hdr["cgroup_fd"], b"0")
    for t, s in targets.items():  # two steps: a source may be another target's number
        os.dup2(s, 100 + t)
    for t in targets:
        os.dup2(100 + t, t)
    os.closerange(max(targets) + 1, max(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
    os.setsid()
    os.chdir(workdir)
    os.umask(0o022)
    os.environ.clear()
    os.environ.update(PASS_ENV)
    if mode != "isolated":
        os.environ["HOME"] = os.environ["TMPDIR"] = workdir
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGALRM, signal.SIGUSR1):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    _set_limits(hdr["limits"])
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
    if hdr.get("seccomp"):
        _install_seccomp(hdr["seccomp"])


def _soft_exit(code=0):
    """``os._exit`` while a test program's top level runs: ends the top level like ``sys.exit``."""
    raise SystemExit(code)


_OS_EXIT = os._exit


def _program_child(item: bytearray, fds: dict, hdr: dict, workdir: str, mode: str, test: bool) -> None:
    """U (never returns): confine this forked process, then run the program as ``__main__``; in a
    test run, then answer the test's requests (:func:`_serve`)."""
    import io
    import types

    rc = 1
    try:
        code, stdin = marshal.loads(item)
        if test:
            sfd = os.open(os.devnull, os.O_RDONLY)
        else:
            sfd = os.memfd_create("stdin", 0)
            _write_all(sfd, stdin.encode("utf-8", "surrogateescape"))
            os.lseek(sfd, 0, os.SEEK_SET)
        stdin = None
        targets = {0: sfd, 1: fds["out"], 2: fds["err"]}
        if test:
            targets.update({3: fds["req_r"], 4: fds["ans_w"]})
        _confine(targets, hdr, workdir, mode)
    except BaseException as exc:  # noqa: BLE001 - a confinement step failed: do not run the code
        try:
            os.write(fds["err"], f"sandbox: confinement failed: {exc!r}\n".encode())
        finally:
            _OS_EXIT(125)
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
        if test:
            os._exit = _soft_exit  # an early os._exit(0) ends the top level, not the process
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
        if test and rc == 0:
            _serve(main.__dict__, 3, 4)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
    finally:
        _OS_EXIT(rc)


def _test_child(item: bytearray, fds: dict, hdr: dict, workdir: str, mode: str) -> None:
    """K (never returns): confine this forked process (it runs the test's code, which the dataset
    wrote), tell G it is ready, then run the test against U (:func:`_run_test`)."""
    try:
        _prctl(PR_SET_DUMPABLE, 0)  # before anything of the test is in memory
        test, setup, modules = marshal.loads(item)
        null = os.open(os.devnull, os.O_RDWR)
        _confine({0: null, 1: null, 2: null, 3: fds["ans_r"], 4: fds["req_w"], 5: fds["verdict_w"]},
                 hdr, workdir, mode)
        sys.path[:] = [p for p in sys.path if p and p != "." and not p.startswith(workdir)]  # nothing U wrote
        os.write(5, b"R")
    except BaseException:  # noqa: BLE001
        _OS_EXIT(125)
    _run_test(test, setup, modules, 3, 4, 5)


def _kill_rest(mode: str, pids) -> None:
    """Kill everything the run started: the whole pid namespace (isolated) or the runs' process groups."""
    try:
        if mode.startswith("isolated"):
            os.kill(-1, signal.SIGKILL)  # from init: every process of the namespace but init
            return
    except (ProcessLookupError, PermissionError):
        return
    for pid in pids:
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _cpu_killed(st, ru, lim: dict, flooded: bool) -> bool:
    if st is None:
        return False
    code = os.waitstatus_to_exitcode(st)
    cpu = (ru.ru_utime + ru.ru_stime) if ru is not None else 0.0
    return code == -signal.SIGXCPU or (code == -signal.SIGKILL and cpu >= math.ceil(lim["cpu_s"]) and not flooded)


def _execute_run(kind: str, hdr: dict, workdir: str, mode: str, data_fd: int) -> None:
    """G: one run (``kind`` plain: a program with stdin; test: a program and its test), with the
    wall-clock deadline and the output cap; its result record goes to the trainer at once."""
    lim = hdr["limits"]
    cap = lim["max_output_bytes"]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    fds = {"out": out_w, "err": err_w}
    start = time.monotonic()
    deadline = start + lim["wall_s"]
    kpid = upid = None
    vbuf = bytearray(_VERDICT_BYTES + 1)
    nv = 0
    open_fds = [out_r, err_r]
    setup_error = ""
    if kind == "test":
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        v_r, v_w = os.pipe()
        fds.update(req_r=req_r, req_w=req_w, ans_r=ans_r, ans_w=ans_w, verdict_w=v_w)
        item = _read_item(data_fd)
        kpid = os.fork()
        if kpid == 0:
            _test_child(item, fds, hdr, workdir, mode)
        _zero(item)
        del item
        os.close(v_w)
        ready = False
        while not ready and time.monotonic() < deadline:  # K counts towards the process cap before U runs
            r, _, _ = select.select([v_r], [], [], max(0.0, deadline - time.monotonic()))
            if not r:
                break
            chunk = os.read(v_r, 1)
            if not chunk:
                break
            ready = chunk == b"R"
        open_fds.append(v_r)
        if not ready:
            setup_error = "the test's process did not start"
    item = _read_item(data_fd)
    if not setup_error:
        upid = os.fork()
        if upid == 0:
            _program_child(item, fds, hdr, workdir, mode, kind == "test")
    _zero(item)
    del item
    for name in ("out", "err", "req_r", "req_w", "ans_r", "ans_w"):  # the children's ends
        if name in fds:
            os.close(fds[name])
    primary = kpid if kind == "test" else upid
    if primary is None:
        primary = kpid
    try:
        pidfd = os.pidfd_open(primary)
    except (AttributeError, OSError, TypeError):
        pidfd = None
    # anonymous mappings: only the pages written are touched, and unmapping leaves nothing behind
    out, err = mmap.mmap(-1, cap), mmap.mmap(-1, cap)
    n = {out_r: 0, err_r: 0}
    bufs = {out_r: out, err_r: err}
    scratch = bytearray(65536)
    status = {upid: None, kpid: None}
    rusage = {upid: None, kpid: None}
    timed_out = flooded = killed = False
    while True:
        while True:  # reap (G is init: orphans come here too)
            try:
                p, st, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if p == 0:
                break
            if p in status and p is not None:
                status[p], rusage[p] = st, ru
        done = status.get(primary) is not None
        if done and not killed:
            _kill_rest(mode, (upid, kpid))  # the run is over: nothing it started may outlive it
            killed = True
        if done and not open_fds:
            break
        now = time.monotonic()
        if not killed and now >= deadline:
            timed_out = True
            _kill_rest(mode, (upid, kpid))
            killed = True
        if killed:
            if not open_fds:  # pipes closed, the process not reaped yet: it was SIGKILLed
                try:
                    _, st, ru = os.wait4(primary, 0)
                    status[primary], rusage[primary] = st, ru
                except ChildProcessError:
                    status[primary] = 0
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
            k = os.readv(fd, [scratch])
            if not k:
                open_fds.remove(fd)
                continue
            if fd not in bufs:  # the verdict
                take = min(k, len(vbuf) - nv)
                vbuf[nv:nv + take] = memoryview(scratch)[:take]
                nv += take
                continue
            room = cap - n[out_r] - n[err_r]
            take = min(k, max(0, room))
            bufs[fd][n[fd]:n[fd] + take] = memoryview(scratch)[:take]
            n[fd] += take
            if k > room and not killed:
                flooded = True
                _kill_rest(mode, (upid, kpid))
                killed = True
    wall = time.monotonic() - start
    for fd in (out_r, err_r) + ((v_r,) if kind == "test" else ()) + ((pidfd,) if pidfd is not None else ()):
        os.close(fd)
    for pid in (upid, kpid):
        if pid is not None and status[pid] is None:
            try:
                _, status[pid], rusage[pid] = os.wait4(pid, 0)
            except ChildProcessError:
                status[pid] = 0
    if mode.startswith("isolated"):  # reap everything killed in the namespace
        while True:
            try:
                os.wait4(-1, 0)
            except ChildProcessError:
                break
    cpu = sum(r.ru_utime + r.ru_stime for r in rusage.values() if r is not None)
    verdict, message = None, b""
    if upid is not None:
        code = os.waitstatus_to_exitcode(status[upid])
    else:
        code = None
    if kind == "plain":
        sig = -code if code < 0 else 0
        if timed_out or sig == signal.SIGXCPU or _cpu_killed(status[upid], rusage[upid], lim, flooded):
            kind_ = "timeout"
        elif flooded:
            kind_ = "output_limit"
        elif sig:
            kind_ = "signal"
        else:
            kind_ = "ok" if code == 0 else "error"
        rc = code
    else:
        verdict = {0x50: "pass", 0x41: "assert", 0x45: "error"}.get(vbuf[0]) if nv else None
        message = memoryview(vbuf)[1:max(1, nv)]  # no copy of the test's message outside vbuf
        if flooded:
            kind_ = "output_limit"
        elif verdict == "pass":
            kind_ = "ok"
        elif timed_out or any(_cpu_killed(status[p], rusage[p], lim, flooded) for p in (upid, kpid) if p):
            kind_ = "timeout"
        else:
            kind_ = "error"
            if verdict is None:
                verdict = "error"
                message = (setup_error or "the test's process ended without a verdict").encode()
        rc = 0 if kind_ == "ok" else 1
    rec = {"status": kind_, "returncode": rc, "wall_s": wall, "cpu_s": cpu, "verdict": verdict,
           "program_returncode": code, "n_out": n[out_r], "n_err": n[err_r], "n_msg": len(message)}
    _write_all(1, _frame(marshal.dumps(rec)))
    _write_all(1, memoryview(out)[:n[out_r]])
    _write_all(1, memoryview(err)[:n[err_r]])
    _write_all(1, message)
    if isinstance(message, memoryview):
        message.release()
    out.close()
    err.close()
    for buf, used in ((scratch, len(scratch)), (vbuf, nv)):
        _zero(buf, used)  # nothing of this run stays in G's memory for the next one
    return kind_


def _skipped_record() -> None:
    rec = {"status": "skipped", "returncode": None, "wall_s": 0.0, "cpu_s": 0.0, "verdict": None,
           "program_returncode": None, "n_out": 0, "n_err": 0, "n_msg": 0}
    _write_all(1, _frame(marshal.dumps(rec)))


def _execute_all(hdr: dict, mode: str, fresh_workdir, data_fd: int) -> None:
    stop = False
    for kind in hdr["kinds"]:
        if stop:
            _skipped_record()
            continue
        with fresh_workdir() as workdir:
            status = _execute_run(kind, hdr, workdir, mode, data_fd)
        if (hdr.get("stop_on_failure") and status != "ok") or \
                (hdr.get("stop_after_timeout") and status == "timeout"):
            stop = True


def _setup_failed(message: str) -> None:
    _write_all(1, _frame(marshal.dumps({"setup_error": message})))


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
    """The unsafe fallback's working directory: a host temporary directory, removed afterwards
    (made and removed with ``os`` alone: importing ``tempfile`` and ``shutil`` costs more than a run)."""

    def __call__(self):
        return self

    def __enter__(self) -> str:
        self.path = os.path.join("/tmp", "postrl-sandbox-" + os.urandom(8).hex())
        os.mkdir(self.path, 0o700)
        if os.geteuid() == 0:
            os.chown(self.path, 65534, 65534)
        return self.path

    def __exit__(self, *exc) -> None:
        _remove_tree(self.path)


def _remove_tree(path: str) -> None:
    """``rm -rf path`` without following symbolic links; errors are ignored."""
    try:
        with os.scandir(path) as entries:
            for entry in list(entries):
                try:
                    if entry.is_dir(follow_symlinks=False):
                        _remove_tree(entry.path)
                    else:
                        os.unlink(entry.path)
                except OSError:
                    pass
        os.rmdir(path)
    except OSError:
        pass


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


def _feed(host_fd: int, data_w: int) -> None:
    """L: read the runs (after the sandbox's processes were forked, so none of them holds them) and
    hand them to G one item at a time: the program (and its input), then, for a test run, the test."""
    try:
        runs = marshal.loads(_read_exact(host_fd, int.from_bytes(_read_exact(host_fd, 8), "big")))
        for run in runs:
            if "test" in run:
                _write_all(data_w, _frame(marshal.dumps((run["test"], run.get("setup", ""),
                                                         run.get("modules", [])))))
            _write_all(data_w, _frame(marshal.dumps((run["code"], run.get("stdin", "")))))
    except (BrokenPipeError, EOFError):
        pass  # G stopped early (stop_on_failure, a setup error): it reads no more
    finally:
        os.close(data_w)


def _launcher_main() -> int:
    """L: read the header, fork the sandbox (isolated, or unsafe when asked), feed it the runs."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if p != here]  # the program must not import postrl's files
    hdr = marshal.loads(_read_exact(0, int.from_bytes(_read_exact(0, 8), "big")))
    host_in = os.dup(0)  # the runs follow on this pipe; only L reads them
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    data_r, data_w = os.pipe()
    hdr["cgroup_fd"] = os.open(hdr["cgroup_procs"], os.O_WRONLY) if hdr.get("cgroup_procs") else -1
    me = os.getpid()
    if not hdr.get("isolate", True):
        g = os.fork()
        if g == 0:
            try:
                os.close(host_in)
                os.close(data_w)
                _die_with_parent(me)
                _execute_all(hdr, "unsafe", _HostTmpdir(), data_r)
                _OS_EXIT(0)
            except BaseException as exc:  # noqa: BLE001
                _setup_failed(f"{type(exc).__name__}: {exc}")
                _OS_EXIT(4)
        os.close(data_r)
        _feed(host_in, data_w)
        os.waitpid(g, 0)
        return 0
    host_root = os.geteuid() == 0
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    child = os.fork()
    if child == 0:  # C
        rc = 2
        try:
            os.close(r1)
            os.close(w2)
            os.close(host_in)
            os.close(data_w)
            _die_with_parent(me)
            _check(_c().unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC
                                | CLONE_NEWUTS), "unshare")
            # still the host uid here (file access as before): open what will be bound, in the new
            # mount namespace (a bind's source must be a mount of the caller's namespace)
            binds = _open_binds(hdr.get("binds", []))
            os.write(w1, b"u")
            if os.read(r2, 1) != b"m":
                _OS_EXIT(3)
            if host_root:
                os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
            g = os.fork()
            if g == 0:  # G: init of the new pid namespace
                try:
                    _die_with_parent(0)
                    _prctl(PR_SET_DUMPABLE, 0)
                    _setup_root(binds, single_uid=not host_root)
                    mode = "isolated" if host_root else "isolated_single_uid"
                    uid = SANDBOX_UID if host_root else 0
                    _execute_all(hdr, mode, _TmpfsWorkdir(hdr["limits"], uid), data_r)
                    _OS_EXIT(0)
                except BaseException as exc:  # noqa: BLE001
                    _setup_failed(f"{type(exc).__name__}: {exc}")
                    _OS_EXIT(4)
            os.close(data_r)
            _, st = os.waitpid(g, 0)
            rc = os.waitstatus_to_exitcode(st)
        except BaseException as exc:  # noqa: BLE001
            _setup_failed(f"{type(exc).__name__}: {exc}")
        _OS_EXIT(rc if rc >= 0 else 5)
    os.close(w1)
    os.close(r2)
    os.close(data_r)
    if os.read(r1, 1) != b"u":
        os.close(data_w)
        _, st = os.waitpid(child, 0)
        return 6
    try:
        if host_root:
            base = int(hdr.get("uid_base", DEFAULT_UID_BASE))
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
        os.close(data_w)
        _setup_failed(f"writing the user namespace id maps failed: {exc}")
        return 7
    os.write(w2, b"m")
    _feed(host_in, data_w)
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
import errno  # noqa: E402 - the launcher above must not pay for these imports
import functools  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402,F811
import subprocess  # noqa: E402
import threading  # noqa: E402
import uuid  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Optional, Sequence, Union  # noqa: E402

log = logging.getLogger(__name__)

MIN_PROCESS_MEMORY_MB = 32  # the address space one process gets at least (a forked interpreter uses ~13 MB)


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): launcher crash, setup error, host deadline."""


class SandboxUnavailable(SandboxError):
    """The host cannot provide the isolation layer; untrusted code is refused (fail closed)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandbox call (a call's runs go one after the other, each with these limits).

    timeout_s:        wall-clock limit of one run (seconds).
    cpu_s:            CPU-time limit (RLIMIT_CPU, rounded up to whole seconds); None = ``timeout_s``.
    memory_mb:        memory of the whole call: all its processes together. With a delegated
                      cgroup v2 it is the cgroup's ``memory.max``; elsewhere each process gets
                      ``memory_mb / max_processes`` of address space (RLIMIT_AS), at least 32 MB.
    max_processes:    processes + threads of a run, all together (RLIMIT_NPROC, counted per
                      sandbox; a test run's checker process counts too), at least 2.
    max_open_files:   RLIMIT_NOFILE.
    max_file_mb:      largest file the program may write (RLIMIT_FSIZE).
    disk_mb:          size of the working directory (a tmpfs, in memory) in total.
    max_output_bytes: stdout + stderr kept; a run that writes more is killed (``output_limit``).
    """

    timeout_s: float = 2.0
    cpu_s: Optional[float] = None
    memory_mb: int = 512
    max_processes: int = 4
    max_open_files: int = 64
    max_file_mb: int = 16
    disk_mb: int = 64
    max_output_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        errors = []
        for name, low in (("timeout_s", 0.01), ("memory_mb", 2 * MIN_PROCESS_MEMORY_MB), ("max_processes", 2),
                          ("max_open_files", 8), ("max_file_mb", 1), ("disk_mb", 1), ("max_output_bytes", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
                errors.append(f"{name}={v!r} (must be a number >= {low})")
        if self.cpu_s is not None and (isinstance(self.cpu_s, bool) or not isinstance(self.cpu_s, (int, float))
                                       or not math.isfinite(self.cpu_s) or self.cpu_s <= 0):
            errors.append(f"cpu_s={self.cpu_s!r} (must be a positive number or None)")
        if not errors and self.memory_mb / self.max_processes < MIN_PROCESS_MEMORY_MB:
            errors.append(f"memory_mb={self.memory_mb} for max_processes={self.max_processes} leaves "
                          f"{self.memory_mb / self.max_processes:.0f} MB per process where no cgroup bounds the "
                          f"call (at least {MIN_PROCESS_MEMORY_MB}); raise memory_mb or lower max_processes")
        if errors:
            raise ValueError("sandbox limits: " + "; ".join(errors))

    @property
    def process_memory_mb(self) -> int:
        """Address space of each process when the per-process limits are what bound the call."""
        return int(self.memory_mb // self.max_processes)

    def as_request(self, per_process_mb: Optional[int] = None) -> dict:
        return {"wall_s": float(self.timeout_s), "cpu_s": float(self.cpu_s or self.timeout_s),
                "memory_mb": int(self.memory_mb), "max_processes": int(self.max_processes),
                "process_memory_mb": int(per_process_mb or self.process_memory_mb),
                "max_open_files": int(self.max_open_files), "max_file_mb": int(self.max_file_mb),
                "disk_mb": int(self.disk_mb), "max_output_bytes": int(self.max_output_bytes)}


@dataclass
class RunResult:
    """What one run of a program did.

    status:     one of :data:`RUN_STATUSES`: ``ok`` (exit 0; a test run: the test passed),
                ``error`` (non-zero exit, e.g. an exception; a test run: the test failed),
                ``timeout`` (wall-clock or CPU limit), ``output_limit``, ``signal`` (killed by a
                signal, e.g. SIGXFSZ / SIGSEGV), ``skipped`` (not run: an earlier run failed and the
                call asked to stop), ``sandbox_error`` (the sandbox failed).
    returncode: exit code, or minus the signal number; None when not run. A test run: 0 when the
                test passed, else 1 (the program's own exit code is ``info["program_returncode"]``).
    verdict:    a test run's verdict, from the checker process: ``pass``, ``assert`` (an
                assertion failed), ``error`` (another exception, or the program's process ended);
                its message is ``info["check"]``. None for other runs.
    """

    status: str
    returncode: Optional[int] = None
    stdout: str = ""
    stderr: str = ""
    wall_s: float = 0.0
    cpu_s: float = 0.0
    call_id: str = ""
    verdict: Optional[str] = None
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


# ----- seccomp ---------------------------------------------------------------------------------------
_SECCOMP: list = []  # [(bpf bytes, None)] or [(None, reason)] once built
_SECCOMP_LOCK = threading.Lock()


def seccomp_filter() -> bytes:
    """The sandbox's seccomp filter as classic BPF, built with libseccomp (``pyseccomp``) once per
    process: default allow; :data:`DENIED_SYSCALLS` -> EPERM; ``clone`` with a namespace flag ->
    EPERM; ``clone3`` -> ENOSYS (the C library then uses ``clone``); ``socket`` of a family other
    than :data:`ALLOWED_SOCKET_FAMILIES` -> EAFNOSUPPORT; another architecture's system calls kill
    the process. Raises :class:`SandboxUnavailable` when libseccomp cannot be used."""
    with _SECCOMP_LOCK:
        if not _SECCOMP:
            try:
                _SECCOMP.append((_build_seccomp(), None))
            except Exception as exc:  # noqa: BLE001 - any reason is a reason to fail closed
                _SECCOMP.append((None, f"{type(exc).__name__}: {exc}"))
        bpf, reason = _SECCOMP[0]
    if bpf is None:
        raise SandboxUnavailable(f"the seccomp filter cannot be built (pip install pyseccomp; it needs the "
                                 f"libseccomp2 library): {reason}")
    return bpf


def _build_seccomp() -> bytes:
    import tempfile

    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ALLOW)
    for name in DENIED_SYSCALLS:
        try:
            f.add_rule(sc.ERRNO(errno.EPERM), name)
        except (OSError, ValueError):  # not a system call of this architecture
            continue
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for flag in (CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID,
                 CLONE_NEWNET):
        f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    top = max(ALLOWED_SOCKET_FAMILIES)
    for family in range(top):
        if family not in ALLOWED_SOCKET_FAMILIES:
            f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.EQ, family))
    f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.GT, top))
    with tempfile.TemporaryFile() as t:
        f.export_bpf(t)
        t.seek(0)
        bpf = t.read()
    if not bpf or len(bpf) % 8:
        raise ValueError(f"libseccomp exported {len(bpf)} bytes of BPF")
    return bpf


# ----- memory: a cgroup v2 per call where the host delegates one ----------------------------------------
def find_memory_cgroup() -> Optional[str]:
    """A cgroup v2 directory under which this process may create a child with the memory controller
    (``$POSTRL_SANDBOX_CGROUP``, else this process's own cgroup when its ``cgroup.subtree_control``
    already enables ``memory`` and it is writable), or None."""
    candidates = []
    env = os.environ.get("POSTRL_SANDBOX_CGROUP")
    if env:
        candidates.append(env)
    else:
        try:
            mount = next((line.split()[4] for line in open("/proc/self/mountinfo")
                          if " - cgroup2 " in line), None)
            own = next((line.strip()[3:] for line in open("/proc/self/cgroup") if line.startswith("0::")), None)
        except OSError:
            mount = own = None
        if mount and own is not None:
            candidates.append(os.path.join(mount, own.lstrip("/")))
    for path in candidates:
        try:
            with open(os.path.join(path, "cgroup.subtree_control")) as f:
                enabled = f.read().split()
        except OSError:
            continue
        if "memory" in enabled and os.access(path, os.W_OK):
            return path
    return None


class _CallCgroup:
    """One call's cgroup: ``memory.max`` = the budget, no swap, ``pids.max``; removed afterwards."""

    def __init__(self, parent: str, call_id: str, limits: SandboxLimits):
        self.path = os.path.join(parent, call_id)
        self.limits = limits

    def __enter__(self) -> str:
        os.mkdir(self.path)
        try:
            self._write("memory.max", str(self.limits.memory_mb << 20))
            self._write("memory.swap.max", "0", optional=True)
            self._write("memory.oom.group", "1", optional=True)
            self._write("pids.max", str(self.limits.max_processes), optional=True)
        except BaseException:
            self.__exit__()
            raise
        return os.path.join(self.path, "cgroup.procs")

    def _write(self, name: str, value: str, optional: bool = False) -> None:
        target = os.path.join(self.path, name)
        if optional and not os.path.exists(target):
            return
        with open(target, "w") as f:
            f.write(value)

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # the call's processes may take a moment to be released
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)
        log.warning("sandbox: could not remove the cgroup %s", self.path)


# ----- one call ----------------------------------------------------------------------------------------
def _launch(header: dict, runs: list, python: str, host_timeout_s: float, call_id: str) -> list[dict]:
    """Start a launcher, hand it the header and the runs, return one result dict per run (the
    launcher's records; SandboxError when it failed)."""
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [python, "-I", "-S", "-X", "utf8", "-c", f"import sys; sys.path.insert(0, {here!r}); import sandbox",
           _LAUNCH_FLAG, call_id]
    env = {"PATH": PASS_ENV["PATH"], "LANG": "C.UTF-8"}
    payload = _frame(marshal.dumps(header)) + _frame(marshal.dumps(runs))
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd="/", start_new_session=True, close_fds=True)
    except OSError as exc:
        raise SandboxError(f"could not start the sandbox launcher {cmd[0]!r}: {exc}") from exc
    try:
        out, err = proc.communicate(payload, timeout=host_timeout_s)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid)
        proc.communicate()
        raise SandboxError(f"the sandbox did not answer within {host_timeout_s:.1f} s; killed") from None
    finally:
        _killpg(proc.pid)  # nothing of the call outlives it (PDEATHSIG does the rest)
    results, pos = [], 0
    try:  # records written by the trusted launcher (G), never by the program
        while pos < len(out):
            n = int.from_bytes(out[pos:pos + 8], "big")
            rec = marshal.loads(out[pos + 8:pos + 8 + n])
            pos += 8 + n
            if not isinstance(rec, dict):
                raise ValueError("not a record")
            if "setup_error" in rec:
                raise SandboxError(f"sandbox setup failed: {rec['setup_error']}")
            parts = []
            for key in ("n_out", "n_err", "n_msg"):
                parts.append(out[pos:pos + rec[key]].decode("utf-8", "replace"))
                pos += rec[key]
            rec["stdout"], rec["stderr"], rec["check"] = parts
            results.append(rec)
    except (ValueError, EOFError, TypeError, KeyError) as exc:
        raise SandboxError(f"the sandbox launcher wrote a malformed result ({exc}); exit {proc.returncode}; "
                           f"stderr: {err.decode('utf-8', 'replace')[-1000:]!r}") from None
    if len(results) != len(runs):
        raise SandboxError(f"the sandbox launcher exited with {proc.returncode} without a result for every run "
                           f"({len(results)} of {len(runs)}); stderr: {err.decode('utf-8', 'replace')[-1000:]!r}")
    return results


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_PROBES: dict[str, tuple[bool, str]] = {}
_PROBE_LOCK = threading.Lock()
_PROBE_CODE = ("import os, socket\n"
               "assert os.getpid() == 2, os.getpid()\n"
               "assert not os.path.exists('/root/.bashrc') and not os.path.exists('/home')\n"
               "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=0.5)\n    net = True\n"
               "except OSError:\n    net = False\n"
               "assert not net, 'network reachable'\n"
               "status = open('/proc/self/status').read()\n"
               "assert 'Seccomp:\\t2' in status, 'no seccomp filter'\n"
               "try:\n    os.memfd_create('x')\n    denied = False\n"
               "except PermissionError:\n    denied = True\n"
               "assert denied, 'the seccomp filter does not deny memfd_create'\n"
               "print('sandbox-ok')\n")


def probe_isolation(python: Optional[str] = None) -> tuple[bool, str]:
    """Whether this host can isolate untrusted code: ``(True, "")`` or ``(False, reason)``.

    Builds the seccomp filter and runs one trivial program through the full isolation path (user,
    mount, pid, network namespaces, pivot_root, procfs, rlimits, seccomp) and checks that it ran
    without network and under the filter; cached per interpreter for the life of the process.
    """
    python = python or default_python()
    with _PROBE_LOCK:
        if python in _PROBES:
            return _PROBES[python]
        try:
            bpf = seccomp_filter()
            header = {"limits": SandboxLimits(timeout_s=5).as_request(), "isolate": True, "kinds": ["plain"],
                      "binds": _python_binds(python), "seccomp": bpf}
            run = _launch(header, [{"code": _PROBE_CODE, "stdin": ""}], python, 30.0,
                          "probe-" + uuid.uuid4().hex[:8])[0]
            if run["status"] == "ok" and run["stdout"].strip() == "sandbox-ok":
                result = (True, "")
            else:
                result = (False, f"probe program failed ({run['status']}): {run['stderr'][-500:]}")
        except (SandboxError, OSError, KeyError, IndexError) as exc:
            result = (False, str(exc))
        _PROBES[python] = result
        return result


RunSpec = Union[str, tuple, dict]


@functools.lru_cache(maxsize=4096)
def modules_used(test: str, setup: str = "") -> list:
    """Standard-library module names that a test uses as modules (``X`` in ``X.attr``): the test's
    checker resolves them to its own modules, never to what the program bound to those names."""
    import ast

    try:
        tree = ast.parse(setup + "\n" + test)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    names = {node.value.id for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)}
    return sorted(n for n in names if n in sys.stdlib_module_names)


class Sandbox:
    """Runs untrusted Python code isolated from the host (see the module docstring).

    ``Sandbox(limits, allow_unsafe=False)`` probes the isolation once per process; where the host
    cannot provide it, it raises :class:`SandboxUnavailable` unless ``allow_unsafe=True`` (then it
    runs with rlimits only and logs a warning). ``cgroup``: ``"auto"`` (a delegated cgroup v2 from
    :func:`find_memory_cgroup`, else per-process limits), a cgroup v2 directory, or None (per-process
    limits); :attr:`memory_bound` says which bounds the call. Thread-safe: each call is its own
    launcher process, so a thread pool over :meth:`run_many` runs calls concurrently.
    """

    def __init__(self, limits: Optional[SandboxLimits] = None, *, allow_unsafe: bool = False,
                 python: Optional[str] = None, extra_ro_paths: Sequence[str] = (),
                 uid_base: int = DEFAULT_UID_BASE, cgroup: Optional[str] = "auto"):
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
        if cgroup == "auto":
            self.cgroup = find_memory_cgroup()
        elif cgroup is None or os.path.isdir(cgroup):
            self.cgroup = cgroup
        else:
            raise ValueError(f"cgroup={cgroup!r} is not a directory (give a delegated cgroup v2 directory, "
                             "'auto' or None)")
        self.memory_bound = "cgroup" if self.cgroup else "rlimit"
        ok, reason = probe_isolation(self.python)
        self.isolated = ok
        try:
            self.seccomp: Optional[bytes] = seccomp_filter()
        except SandboxUnavailable:
            self.seccomp = None
        if not ok:
            if not allow_unsafe:
                raise SandboxUnavailable(
                    "this host cannot isolate untrusted code (" + reason + "). The sandbox needs Linux user, "
                    "mount, pid and network namespaces (unprivileged user namespaces enabled, or root) and "
                    "libseccomp (pip install pyseccomp). Refusing to run model-written code. To run it anyway "
                    "WITHOUT isolation (rlimits only: the code can read your files and use the network), set "
                    "allow_unsafe: true.")
            log.warning("sandbox: isolation unavailable (%s); running untrusted code UNSAFELY "
                        "(allow_unsafe=True): rlimits, a new session and a temporary directory only", reason)

    def run(self, code: str, stdin: str = "", *, call_id: Optional[str] = None) -> RunResult:
        """Run one program with ``stdin``; see :class:`RunResult`."""
        return self.run_many([(code, stdin)], call_id=call_id)[0]

    def run_test(self, code: str, test: str, setup: str = "", *, call_id: Optional[str] = None) -> RunResult:
        """Run one program and one test of it (see the module docstring: the test runs in its own
        process, on plain data); ``status`` ``ok`` when the test passed."""
        return self.run_many([{"code": code, "test": test, "setup": setup}], call_id=call_id)[0]

    def run_many(self, runs: Sequence[RunSpec], *, stop_on_failure: bool = False,
                 stop_after_timeout: bool = False, call_id: Optional[str] = None) -> list[RunResult]:
        """Run several programs in one sandbox call, each in a fresh process and working directory.

        ``runs``: code strings, ``(code, stdin)`` pairs, ``{"code", "stdin"}`` dicts, or test runs
        ``{"code", "test", "setup"}`` (the program, then the test code against it in a separate
        process: ``status`` ``ok`` when the test passed).
        ``stop_on_failure`` / ``stop_after_timeout``: skip the remaining runs after the first
        run that was not ``ok`` / that timed out. A failure of the sandbox itself gives every run
        the status ``sandbox_error`` (with the reason in ``stderr``); it never raises.
        """
        specs, kinds = [], []
        for i, r in enumerate(runs):
            if isinstance(r, dict) and "test" in r:
                spec = {"code": r.get("code"), "test": r.get("test"), "setup": r.get("setup") or ""}
                bad = [k for k, v in spec.items() if not isinstance(v, str)]
                if bad:
                    raise TypeError(f"runs[{i}]: {', '.join(bad)} must be str")
                spec["modules"] = modules_used(spec["test"], spec["setup"])
                specs.append(spec)
                kinds.append("test")
                continue
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
            kinds.append("plain")
        if not specs:
            return []
        call_id = call_id or "postrl-sbx-" + uuid.uuid4().hex[:12]
        per_process = self.limits.memory_mb if self.cgroup else self.limits.process_memory_mb
        header = {"limits": self.limits.as_request(per_process), "isolate": self.isolated, "binds": self.binds,
                  "uid_base": self.uid_base, "kinds": kinds, "seccomp": self.seccomp,
                  "stop_on_failure": bool(stop_on_failure), "stop_after_timeout": bool(stop_after_timeout)}
        host_timeout = len(specs) * (self.limits.timeout_s + 1.5) + 10.0
        try:
            if self.cgroup:
                with _CallCgroup(self.cgroup, call_id, self.limits) as procs:
                    header["cgroup_procs"] = procs
                    raw = _launch(header, specs, self.python, host_timeout, call_id)
            else:
                raw = _launch(header, specs, self.python, host_timeout, call_id)
        except (SandboxError, OSError, KeyError, TypeError) as exc:
            return [RunResult(status="sandbox_error", stderr=str(exc), call_id=call_id) for _ in specs]
        out = []
        for r in raw:
            info = {}
            if r.get("verdict") is not None:
                info = {"check": r["check"], "program_returncode": r["program_returncode"]}
            out.append(RunResult(status=r["status"], returncode=r["returncode"], stdout=r["stdout"],
                                 stderr=r["stderr"], wall_s=float(r["wall_s"]), cpu_s=float(r["cpu_s"]),
                                 call_id=call_id, verdict=r.get("verdict"), info=info))
        return out
