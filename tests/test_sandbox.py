"""The sandbox contains hostile programs: each attack fails, nothing of it outlives the call (no
process, no file), and the caller keeps running. Limits are small so the file runs in seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from postrl.data.sources import Sample
from postrl.rewards import sandbox as sbx
from postrl.rewards.base import RewardBatch
from postrl.rewards.code import CodeReward
from postrl.rewards.sandbox import RunResult, Sandbox, SandboxLimits, SandboxUnavailable

LIMITS = SandboxLimits(timeout_s=1.0, memory_mb=256, max_processes=8, max_file_mb=8, disk_mb=32,
                       max_output_bytes=64 * 1024)


@pytest.fixture(scope="module")
def box() -> Sandbox:
    ok, reason = sbx.probe_isolation()
    if not ok:  # the fail-closed behaviour itself is tested below with a simulated probe
        pytest.skip(f"this host cannot isolate code: {reason}")
    return Sandbox(LIMITS)


def _procs_with(marker: str) -> list[int]:
    """Host pids whose command line contains ``marker`` (zombies have an empty one)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(int(d))
        except OSError:
            continue
    return out


def _host_paths_named(name: str) -> list[str]:
    """Files or directories called ``name`` in the usual writable places of the host (3 levels)."""
    found = []
    for root in {tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm", str(Path.home()), os.getcwd()}:
        if not os.path.isdir(root):
            continue
        base = root.rstrip("/").count("/")
        for dirpath, dirnames, filenames in os.walk(root):
            if dirpath.count("/") - base >= 3:
                dirnames[:] = []
            if name in filenames or name in dirnames:
                found.append(os.path.join(dirpath, name))
    return found


def _sandbox_tmpdirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("postrl-sandbox-")}


def run_contained(box: Sandbox, code: str, stdin: str = "", marker: str = "") -> RunResult:
    """Run ``code``; check that no process of the call (or carrying ``marker``) is left."""
    call_id = "postrl-test-" + uuid.uuid4().hex[:10]
    before = _sandbox_tmpdirs()
    start = time.monotonic()
    result = box.run(code, stdin, call_id=call_id)
    assert time.monotonic() - start < LIMITS.timeout_s + 5, "the call must return soon after its time limit"
    assert result.status != "sandbox_error", result.stderr
    assert _procs_with(call_id) == [], "a process of the sandbox call outlived it"
    if marker:
        assert _procs_with(marker) == [], "a process started by the program outlived the call"
    assert _sandbox_tmpdirs() <= before, "a temporary directory was left behind"
    return result


def test_plain_program_runs_isolated(box):
    import ast

    r = run_contained(box, "import os\nprint(input()[::-1], os.getuid(), os.getpid(), os.getcwd())\n"
                           "print(sorted(os.listdir('/')))\nprint(os.listdir('/root'))", "olleh\n")
    assert r.status == "ok" and r.returncode == 0, r.stderr
    first, top, root = r.stdout.splitlines()
    assert first.split() == ["hello", "1000", "2", "/work"]  # uid 1000, pid 2 of its own namespace
    allowed = {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "dev", "proc", "etc", "tmp", "work", "root"}
    assert set(ast.literal_eval(top)) <= allowed  # no /home, /mnt, /var, /opt, ...
    assert set(ast.literal_eval(root)) <= {".pyenv"}  # only the Python installation, if it lives there


def test_infinite_loop_times_out(box):
    r = run_contained(box, "while True:\n    pass\n")
    assert r.status == "timeout" and r.wall_s < LIMITS.timeout_s + 1


def test_sleeping_program_hits_the_wall_clock_limit(box):
    r = run_contained(box, "import time\ntime.sleep(60)\n")
    assert r.status == "timeout" and r.cpu_s < 0.5


def test_fork_bomb_is_capped_and_killed(box):
    code = ("import os\n"
            "n = 0\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        n += 1\n")
    r = run_contained(box, code)
    assert r.status == "timeout"


def test_fork_limit_is_enforced(box):
    code = ("import os, time\n"
            "kids = []\n"
            "try:\n"
            "    for _ in range(1000):\n"
            "        pid = os.fork()\n"
            "        if pid == 0:\n"
            "            time.sleep(30)\n"
            "            os._exit(0)\n"
            "        kids.append(pid)\n"
            "except OSError as exc:\n"
            "    print(len(kids), type(exc).__name__)\n"
            "    raise SystemExit(3)\n")
    r = run_contained(box, code)
    assert r.status == "error" and r.returncode == 3
    count, err = r.stdout.split()
    assert int(count) < LIMITS.max_processes and err == "BlockingIOError"


def test_allocating_50_gb_fails(box):
    r = run_contained(box, "x = bytearray(50 * 2**30)\nprint('allocated')\n")
    assert r.status == "error" and "MemoryError" in r.stderr and "allocated" not in r.stdout


def test_writing_10_gb_to_a_file_is_stopped(box):
    name = "big-" + uuid.uuid4().hex[:8]
    code = (f"chunk = b'x' * (1 << 20)\n"
            f"with open({name!r}, 'wb') as f:\n"
            f"    for _ in range(10 * 1024):\n"
            f"        f.write(chunk)\n"
            f"print('wrote 10 GB')\n")
    r = run_contained(box, code)
    assert r.status in ("signal", "error") and "wrote" not in r.stdout  # SIGXFSZ at max_file_mb
    assert _host_paths_named(name) == []


def test_filling_the_disk_with_many_files_is_stopped(box):
    code = ("chunk = b'x' * (1 << 20)\n"
            "for i in range(10 * 1024):\n"
            "    with open(f'part{i}', 'wb') as f:\n"
            "        for _ in range(4):\n"
            "            f.write(chunk)\n"
            "print('wrote 10 GB')\n")
    r = run_contained(box, code)
    assert r.status == "error" and "No space left" in r.stderr  # the working directory's tmpfs is full


def test_printing_1_gb_is_cut_at_the_output_cap(box):
    code = "import sys\ns = 'y' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(s)\n"
    start = time.monotonic()
    r = run_contained(box, code)
    assert r.status == "output_limit"
    assert len(r.stdout) + len(r.stderr) <= LIMITS.max_output_bytes
    assert time.monotonic() - start < LIMITS.timeout_s + 2


def test_environment_secrets_are_not_inherited(box, monkeypatch):
    monkeypatch.setenv("POSTRL_TEST_SECRET", "hunter2-" + uuid.uuid4().hex)
    secret = os.environ["POSTRL_TEST_SECRET"]
    code = ("import os\n"
            "blobs = [repr(dict(os.environ)).encode()]\n"
            "for d in os.listdir('/proc'):\n"
            "    try:\n"
            "        blobs.append(open(f'/proc/{d}/environ', 'rb').read())\n"
            "    except OSError:\n"
            "        pass\n"
            "print(b'|'.join(blobs))\n"
            "print(os.environ['POSTRL_TEST_SECRET'])\n")
    r = run_contained(box, code)
    assert r.status == "error" and "KeyError" in r.stderr
    assert secret not in r.stdout and secret not in r.stderr
    assert "HOME': '/work'" in r.stdout


def test_files_in_the_users_home_are_invisible(box):
    secret_file = Path.home() / f".postrl-sandbox-secret-{uuid.uuid4().hex[:8]}"
    secret = "s3cret-" + uuid.uuid4().hex
    secret_file.write_text(secret)
    try:
        code = (f"import os\n"
                f"for d in ('/root', '/home', {str(Path.home())!r}):\n"
                f"    try:\n"
                f"        print(d, os.listdir(d))\n"
                f"    except OSError as exc:\n"
                f"        print(d, exc)\n"
                f"print(open({str(secret_file)!r}).read())\n")
        r = run_contained(box, code)
        assert r.status == "error" and "FileNotFoundError" in r.stderr
        assert secret not in r.stdout + r.stderr and secret_file.name not in r.stdout
    finally:
        secret_file.unlink()


@pytest.mark.parametrize("target", ["HOST_TMP", "/tmp/escape.txt", "/usr/escape.txt", "/escape.txt",
                                    "/etc/passwd", "/proc/sys/kernel/hostname"])
def test_writing_outside_the_working_directory_fails(box, tmp_path, target):
    if target == "HOST_TMP":
        target = str(tmp_path / "escape.txt")
    before = Path(target).read_bytes() if Path(target).is_file() and not target.startswith("/proc") else None
    r = run_contained(box, f"with open({target!r}, 'w') as f:\n    f.write('pwned')\nprint('written')\n")
    assert r.status == "error" and "written" not in r.stdout
    if before is None and not target.startswith("/proc"):
        assert not Path(target).exists()
    elif before is not None:
        assert Path(target).read_bytes() == before


def test_socket_to_a_local_server_fails(box):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        code = (f"import socket\n"
                f"s = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n"
                f"s.sendall(b'stolen')\n"
                f"print('connected')\n")
        r = run_contained(box, code)
        assert r.status == "error" and "connected" not in r.stdout
        assert "OSError" in r.stderr or "Error" in r.stderr
        # the server itself is reachable from the host, so the refusal is the sandbox's doing
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        time.sleep(0.3)
        assert len(accepted) == 1
    finally:
        stop.set()
        thread.join(2)
        server.close()
        for c in accepted:
            c.close()


def test_killing_the_parent_leaves_the_caller_running(box):
    code = ("import os, signal\n"
            "print(os.getppid())\n"
            "for target in (os.getppid(), 1, -1):\n"
            "    try:\n"
            "        os.kill(target, signal.SIGKILL)\n"
            "    except OSError as exc:\n"
            "        print(type(exc).__name__)\n"
            "for d in os.listdir('/proc'):\n"
            "    if d.isdigit() and int(d) != os.getpid():\n"
            "        try:\n"
            "            os.kill(int(d), signal.SIGKILL)\n"
            "        except OSError:\n"
            "            pass\n"
            "print('still here')\n"
            "raise SystemExit(9)\n")
    r = run_contained(box, code)
    assert r.stdout.split()[0] == "1"  # its parent is the namespace's init, not the trainer
    assert r.status == "error" and r.returncode == 9 and "still here" in r.stdout
    assert box.run("print(41 + 1)").stdout == "42\n"  # the caller and the sandbox still work


def test_daemon_does_not_outlive_the_call(box):
    marker = "postrl-daemon-" + uuid.uuid4().hex[:10]
    code = (f"import os, sys, time\n"
            f"pid = os.fork()\n"
            f"if pid == 0:\n"
            f"    os.setsid()\n"
            f"    if os.fork() == 0:\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
            f"    os._exit(0)\n"
            f"os.waitpid(pid, 0)\n"
            f"time.sleep(0.2)\n"
            f"print('daemon started')\n")
    r = run_contained(box, code, marker=marker)
    assert r.status == "ok" and "daemon started" in r.stdout


def test_daemon_outliving_a_timeout_is_killed(box):
    marker = "postrl-daemon-" + uuid.uuid4().hex[:10]
    code = (f"import os, sys, time\n"
            f"if os.fork() == 0:\n"
            f"    os.setsid()\n"
            f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])\n"
            f"time.sleep(60)\n")
    r = run_contained(box, code, marker=marker)
    assert r.status == "timeout"


@pytest.mark.parametrize("code", ["import sys; sys.exit(3)", "import sys; sys.exit(-1)", "import sys; sys.exit(256)",
                                  "import sys; sys.exit('bye')", "import sys; sys.exit(None)",
                                  "raise SystemExit(True)", "import os; os._exit(77)", "import os; os._exit(255)",
                                  "import sys; print('x', end=''); sys.stdout.flush(); import os; os._exit(5)"])
def test_exit_codes_match_plain_python(box, code):
    r = run_contained(box, code)
    plain = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == plain.returncode
    assert r.stdout == plain.stdout and r.stderr.strip() == plain.stderr.strip()
    assert r.status == ("ok" if plain.returncode == 0 else "error")


def test_program_cannot_raise_its_own_limits(box):
    code = ("import resource\n"
            "raised = []\n"
            "for name in ('RLIMIT_AS', 'RLIMIT_NPROC', 'RLIMIT_CPU', 'RLIMIT_FSIZE', 'RLIMIT_NOFILE'):\n"
            "    res = getattr(resource, name)\n"
            "    soft, hard = resource.getrlimit(res)\n"
            "    try:\n"
            "        resource.setrlimit(res, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
            "        raised.append(name)\n"
            "    except (ValueError, OSError):\n"
            "        pass\n"
            "print(raised)\n"
            "x = bytearray(1 << 30)\n")
    r = run_contained(box, code)
    assert r.stdout.strip() == "[]"
    assert r.status == "error" and "MemoryError" in r.stderr


def test_raising_the_soft_cpu_limit_does_not_escape_the_timeout(box):
    code = ("import resource\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_CPU)\n"
            "resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))\n"
            "while True:\n"
            "    pass\n")
    assert run_contained(box, code).status == "timeout"


def test_no_capabilities_no_setuid_no_new_namespaces(box):
    code = ("import os, ctypes\n"
            "caps = [l for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapBnd', 'NoNewPrivs'))]\n"
            "print(''.join(caps))\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "print('unshare', libc.unshare(0x10000000))\n"  # CLONE_NEWUSER
            "try:\n"
            "    os.setuid(0)\n"
            "    print('setuid ok')\n"
            "except OSError as exc:\n"
            "    print('setuid', type(exc).__name__)\n")
    r = run_contained(box, code)
    assert r.status == "ok", r.stderr
    assert "CapEff:\t0000000000000000" in r.stdout and "CapBnd:\t0000000000000000" in r.stdout
    assert "NoNewPrivs:\t1" in r.stdout
    assert "unshare -1" in r.stdout and "setuid PermissionError" in r.stdout


def test_many_runs_in_one_call_get_fresh_working_directories(box):
    results = box.run_many(["open('f', 'w').write('1')\nimport os; print(os.listdir('.'))",
                            "import os; print(os.listdir('.'))"])
    assert [r.stdout.strip() for r in results] == ["['f']", "[]"]


def test_stop_options_skip_the_remaining_runs(box):
    rs = box.run_many(["1/0", "print(1)"], stop_on_failure=True)
    assert [r.status for r in rs] == ["error", "skipped"]
    rs = box.run_many(["while True: pass", "print(1)", "print(2)"], stop_after_timeout=True)
    assert [r.status for r in rs] == ["timeout", "skipped", "skipped"]


def test_concurrent_calls_do_not_interfere(box):
    from concurrent.futures import ThreadPoolExecutor

    codes = [f"import time; time.sleep(0.1); print({i} * {i})" for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(box.run, codes))
    assert [r.stdout.strip() for r in results] == [str(i * i) for i in range(8)]


ATTACKS = {
    "infinite_loop": "while True: pass",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "alloc_50gb": "x = bytearray(50 * 2**30)",
    "print_1gb": "import sys\nfor _ in range(1024):\n    sys.stdout.write('7' * (1 << 20))",
    "read_env": "import os\nprint(os.environ['POSTRL_TEST_SECRET'])",
    "kill_parent": "import os\nos.kill(os.getppid(), 9)\nprint(8)",
    "exit_odd": "import os\nos._exit(13)",
}


def test_attacks_score_zero_through_the_code_reward_and_training_goes_on(box):
    """Every attack, as a completion of a task whose answer is ``7``, scores 0 with a failure status."""
    reward = CodeReward(timeout_s=1.0, memory_mb=256, max_output_bytes=64 * 1024, workers=2)
    sample = Sample(question="print 7", answer="7", metadata={"tests": [{"input": "", "output": "7"}]})
    names = list(ATTACKS) + ["correct"]
    completions = [f"```python\n{ATTACKS[n]}\n```" for n in ATTACKS] + ["```python\nprint(7)\n```"]
    batch = RewardBatch(prompts=[""] * len(names), completions=completions,
                        completion_ids=[[] for _ in names], samples=[sample] * len(names))
    out = reward(batch)
    reward.close()
    by_name = dict(zip(names, out))
    assert by_name["correct"].score == 1.0 and by_name["correct"].info["status"] == "ok"
    for name in ATTACKS:
        assert by_name[name].score == 0.0, name
        assert by_name[name].info["status"] in ("timeout", "runtime_error", "wrong_answer"), name


# ------------------------------------------------------------------------------------------------
# fail closed
# ------------------------------------------------------------------------------------------------
def test_fail_closed_when_the_host_cannot_isolate(monkeypatch):
    monkeypatch.setattr(sbx, "probe_isolation", lambda python=None: (False, "simulated: no user namespaces"))
    with pytest.raises(SandboxUnavailable, match="allow_unsafe") as err:
        Sandbox(LIMITS)
    assert "simulated: no user namespaces" in str(err.value)
    with pytest.raises(SandboxUnavailable):
        CodeReward(timeout_s=1.0)


def test_unsafe_opt_out_runs_with_rlimits_only(monkeypatch, caplog):
    monkeypatch.setattr(sbx, "probe_isolation", lambda python=None: (False, "simulated"))
    with caplog.at_level("WARNING"):
        box = Sandbox(LIMITS, allow_unsafe=True)
    assert not box.isolated and "UNSAFELY" in caplog.text
    before = _sandbox_tmpdirs()
    r = box.run("import os\nopen('f', 'w').write('x')\nprint(input(), os.listdir('.'))", "hi\n")
    assert r.status == "ok" and r.stdout.strip() == "hi ['f']"
    assert box.run("while True: pass").status == "timeout"
    assert box.run("x = bytearray(50 * 2**30)").status == "error"
    assert _sandbox_tmpdirs() <= before  # its temporary directories are removed


def test_the_real_probe_reports_a_broken_launcher(monkeypatch):
    monkeypatch.setattr(sbx, "_PROBES", {})
    ok, reason = sbx.probe_isolation("/bin/false")
    assert not ok and "without a result" in reason


def test_bad_limits_are_named():
    with pytest.raises(ValueError, match="timeout_s=-1"):
        SandboxLimits(timeout_s=-1)
    with pytest.raises(ValueError, match="memory_mb"):
        SandboxLimits(memory_mb=1)
    with pytest.raises(ValueError, match="max_processes=1 "):
        SandboxLimits(max_processes=1)
    with pytest.raises(ValueError, match="leaves 16 MB per process"):
        SandboxLimits(memory_mb=256, max_processes=16)
    assert SandboxLimits(memory_mb=512, max_processes=4).process_memory_mb == 128
    with pytest.raises(TypeError, match="runs\\[0\\]"):
        Sandbox.run_many(object.__new__(Sandbox), [123])


# ------------------------------------------------------------------------------------------------
# seccomp: every denied system call fails inside the sandbox; the filter itself, instruction by instruction
# ------------------------------------------------------------------------------------------------
def _syscall_numbers() -> dict:
    sc = pytest.importorskip("pyseccomp")
    arch = sc.system_arch()
    out = {}
    for name in sbx.DENIED_SYSCALLS + ("clone", "clone3", "socket", "getpid", "read", "write", "openat", "mmap",
                                       "exit_group", "futex", "rt_sigaction", "close", "wait4", "kill"):
        try:
            out[name] = sc.resolve_syscall(arch, name)
        except (OSError, ValueError):
            pass
    return out


CLONE_THREAD_FLAGS = 0x3D0F00  # what pthread_create passes (VM, FS, FILES, SIGHAND, THREAD, SYSVSEM, TLS, TIDs)
CLONE_FORK_FLAGS = 0x1200011  # what fork() passes (SIGCHLD, CHILD_SETTID, CHILD_CLEARTID)
NS_FLAGS = {"CLONE_NEWNS": 0x20000, "CLONE_NEWCGROUP": 0x2000000, "CLONE_NEWUTS": 0x4000000,
            "CLONE_NEWIPC": 0x8000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
            "CLONE_NEWNET": 0x40000000}


def test_each_denied_syscall_fails_inside_the_sandbox(box):
    import errno
    import json

    nrs = _syscall_numbers()
    calls = [(name, nrs[name], [0] * 6, errno.EPERM) for name in sbx.DENIED_SYSCALLS if name in nrs]
    calls = [(n, nr, [0x10000000 if n in ("unshare", "setns") else 0] + a[1:], e) for n, nr, a, e in calls]
    calls += [(f"clone {flag}", nrs["clone"], [bit | 17, 0, 0, 0, 0, 0], errno.EPERM) for flag, bit in NS_FLAGS.items()]
    calls += [("clone3", nrs["clone3"], [0] * 6, errno.ENOSYS)]
    calls += [(f"socket family {f}", nrs["socket"], [f, 3, 0, 0, 0, 0], errno.EAFNOSUPPORT) for f in (16, 17, 0, 4, 38, 40)]
    code = (f"import ctypes, json, os, socket, threading\n"
            f"libc = ctypes.CDLL(None, use_errno=True)\n"
            f"libc.syscall.restype = ctypes.c_long\n"
            f"out = {{}}\n"
            f"for name, nr, args, _ in {calls!r}:\n"
            f"    ctypes.set_errno(0)\n"
            f"    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])\n"
            f"    if r == 0 and name.startswith('clone'):\n"
            f"        os._exit(0)  # a child: only if clone were allowed\n"
            f"    out[name] = [r, ctypes.get_errno()]\n"
            f"s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"  # allowed: the controls
            f"u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            f"t = threading.Thread(target=lambda: out.__setitem__('thread', [0, 0]))\n"
            f"t.start(); t.join()\n"
            f"pid = os.fork()\n"
            f"if pid == 0:\n    os._exit(7)\n"
            f"out['fork'] = [os.waitpid(pid, 0)[1] >> 8, 0]\n"
            f"out['seccomp'] = [l.split()[1] for l in open('/proc/self/status') if l.startswith('Seccomp:')]\n"
            f"print(json.dumps(out))\n")
    r = run_contained(box, code)
    assert r.status == "ok", r.stderr
    got = json.loads(r.stdout)
    assert got.pop("seccomp") == ["2"] and got.pop("thread") == [0, 0] and got.pop("fork") == [7, 0]
    assert len(calls) >= 70
    wrong = {name: (got[name], expected) for name, _, _, expected in calls if got[name] != [-1, expected]}
    assert wrong == {}, wrong


def _run_bpf(prog: bytes, nr: int, arch: int, args=(0,) * 6) -> int:
    """A classic-BPF interpreter for seccomp filters: the action the filter returns for one call."""
    import struct

    data = struct.pack("<iIQ6Q", nr, arch, 0, *[a & (2**64 - 1) for a in args])
    insns = [struct.unpack("<HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    a = x = pc = 0
    mem = [0] * 16
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:  # LD
            mode = code & 0xE0
            a = struct.unpack_from("<I", data, k)[0] if mode == 0x20 else mem[k] if mode == 0x60 else k
        elif cls == 0x01:  # LDX
            x = mem[k] if code & 0xE0 == 0x60 else k
        elif cls == 0x02:
            mem[k] = a
        elif cls == 0x03:
            mem[k] = x
        elif cls == 0x04:  # ALU
            src = x if code & 0x08 else k
            a = {0x00: a + src, 0x10: a - src, 0x20: a * src, 0x40: a | src, 0x50: a & src, 0x60: a << src,
                 0x70: a >> src, 0xA0: a ^ src, 0x80: -a}[code & 0xF0] & 0xFFFFFFFF
        elif cls == 0x05:  # JMP
            src = x if code & 0x08 else k
            if code & 0xF0 == 0x00:
                pc += k
            else:
                cond = {0x10: a == src, 0x20: a > src, 0x30: a >= src, 0x40: (a & src) != 0}[code & 0xF0]
                pc += jt if cond else jf
        elif cls == 0x06:  # RET
            return a if code & 0x18 == 0x10 else k
        else:  # TAX / TXA
            if code & 0xF8 == 0:
                x = a
            else:
                a = x


def test_the_filter_denies_exactly_what_it_should():
    import errno

    sc = pytest.importorskip("pyseccomp")
    try:
        bpf = sbx.seccomp_filter()
    except SandboxUnavailable as exc:
        pytest.skip(str(exc))
    arch, nrs = sc.system_arch(), _syscall_numbers()
    allow, kill = 0x7FFF0000, {0x00000000, 0x80000000}

    def action(name, *args):
        return _run_bpf(bpf, nrs[name], arch, args or (0,) * 6)

    def err(e):
        return 0x00050000 | e

    for name in sbx.DENIED_SYSCALLS:
        if name in nrs:
            assert action(name) == err(errno.EPERM), name
    assert action("clone3") == err(errno.ENOSYS)
    for flag, bit in NS_FLAGS.items():
        assert action("clone", bit | 17, 0, 0, 0, 0, 0) == err(errno.EPERM), flag
    assert action("clone", CLONE_THREAD_FLAGS, 0, 0, 0, 0, 0) == allow
    assert action("clone", CLONE_FORK_FLAGS, 0, 0, 0, 0, 0) == allow
    for family in range(64):
        expected = allow if family in sbx.ALLOWED_SOCKET_FAMILIES else err(errno.EAFNOSUPPORT)
        assert action("socket", family, 1, 0, 0, 0, 0) == expected, family
    for name in ("getpid", "read", "write", "openat", "mmap", "exit_group", "futex", "rt_sigaction", "close",
                 "wait4", "kill"):
        assert action(name) == allow, name
    assert _run_bpf(bpf, 20, 0x40000003) in kill  # another architecture's calls (i386 int 0x80): killed


def test_without_libseccomp_the_sandbox_fails_closed(monkeypatch):
    monkeypatch.setattr(sbx, "_SECCOMP", [(None, "simulated: no libseccomp")])
    monkeypatch.setattr(sbx, "_PROBES", {})
    ok, reason = sbx.probe_isolation()
    assert not ok and "seccomp" in reason and "simulated" in reason
    with pytest.raises(SandboxUnavailable, match="seccomp"):
        Sandbox(LIMITS)


# ------------------------------------------------------------------------------------------------
# memory: one call stays within its budget, all its processes together (measured from outside)
# ------------------------------------------------------------------------------------------------
HOG = """
import os, sys, time

def hog():
    chunks = []
    try:
        while True:
            chunks.append(b'x' * (1 << 20))  # written, so resident
    except MemoryError:
        pass
    return chunks

r, w = os.pipe()
kids = []
for _ in range(64):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        held = hog()
        os.write(w, len(held).to_bytes(4, 'big'))
        time.sleep(5)
        os._exit(0)
    kids.append(pid)
held = hog()
total = len(held)
for _ in kids:
    total += int.from_bytes(os.read(r, 4), 'big')
print(len(kids) + 1, total)
sys.stdout.flush()
time.sleep(1.0)
"""


def _sandbox_rss_kb(host_uid: int) -> tuple[int, int]:
    """(sum of VmRSS in kB, number) of the host processes whose real uid is ``host_uid``."""
    total = count = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                status = f.read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 ").split()[0]) != host_uid:
            continue
        count += 1
        total += int(fields.get("VmRSS", "0 kB").split()[0])
    return total, count


def test_one_call_of_memory_hogs_stays_within_its_budget():
    """The program starts the most processes it may, each allocating all it can; the sum of their
    resident memory, read from the host every 10 ms, never exceeds the call's memory_mb."""
    import random

    ok, reason = sbx.probe_isolation()
    if not ok:
        pytest.skip(f"this host cannot isolate code: {reason}")
    if os.geteuid() != 0:
        pytest.skip("needs root: the sandbox's processes are told apart by their host uid")
    limits = SandboxLimits(timeout_s=10.0, memory_mb=256, max_processes=4, max_output_bytes=4096)
    uid_base = sbx.DEFAULT_UID_BASE + 2 * random.randrange(1, 10**6)
    box = Sandbox(limits, uid_base=uid_base, cgroup=None)
    assert box.memory_bound == "rlimit"
    peak = [0, 0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            kb, n = _sandbox_rss_kb(uid_base + 1)
            peak[0], peak[1] = max(peak[0], kb), max(peak[1], n)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        r = box.run(HOG)
    finally:
        stop.set()
        watcher.join(5)
    assert r.status == "ok", r.stderr
    procs, held_mb = map(int, r.stdout.split())
    assert procs == limits.max_processes == peak[1]  # the most processes it may have, all seen
    assert held_mb >= 0.6 * limits.memory_mb  # it did take nearly all it could...
    assert peak[0] <= limits.memory_mb * 1024, peak  # ...and all of it together stayed within the budget
    print(f"\nmemory budget {limits.memory_mb} MB, {procs} processes: program held {held_mb} MB, "
          f"peak resident sum measured from the host {peak[0] / 1024:.1f} MB")


def test_a_delegated_cgroup_gets_the_budget_and_every_process(tmp_path, monkeypatch):
    """With a cgroup v2 (here a directory standing in for one: this host delegates none), each call
    gets its own child with memory.max = the budget, every process of the call writes itself into its
    cgroup.procs, each process may use the whole budget, and the child is removed afterwards."""
    ok, reason = sbx.probe_isolation()
    if not ok:
        pytest.skip(f"this host cannot isolate code: {reason}")
    parent = tmp_path / "cg"
    parent.mkdir()
    (parent / "cgroup.subtree_control").write_text("cpu memory pids\n")
    monkeypatch.setenv("POSTRL_SANDBOX_CGROUP", str(parent))
    assert sbx.find_memory_cgroup() == str(parent)
    seen = {}
    real_enter, real_exit = sbx._CallCgroup.__enter__, sbx._CallCgroup.__exit__

    def enter(self):
        procs = real_enter(self)
        open(procs, "w").close()  # cgroupfs has it; a plain directory does not
        return procs

    def leave(self, *exc):
        seen["memory.max"] = (Path(self.path) / "memory.max").read_text()
        seen["procs"] = (Path(self.path) / "cgroup.procs").read_text()
        for f in Path(self.path).iterdir():  # cgroupfs removes its files with the directory
            f.unlink()
        real_exit(self, *exc)
        seen["removed"] = not Path(self.path).exists()

    monkeypatch.setattr(sbx._CallCgroup, "__enter__", enter)
    monkeypatch.setattr(sbx._CallCgroup, "__exit__", leave)
    box = Sandbox(SandboxLimits(timeout_s=2.0, memory_mb=256, max_processes=4))
    assert box.cgroup == str(parent) and box.memory_bound == "cgroup"
    r = box.run_many(["import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20)",
                      {"code": "def f():\n    return 1\n", "test": "assert f() == 1"}])
    assert [x.status for x in r] == ["ok", "ok"], r
    assert r[0].stdout.strip() == "256"  # each process may use the whole budget: the cgroup bounds the sum
    assert seen["memory.max"] == str(256 << 20)
    assert seen["procs"] == "0" * 3  # the plain run's program, then the test run's checker and program
    assert seen["removed"]


# ------------------------------------------------------------------------------------------------
# what a run can see: not the other runs' code, input, test or output
# ------------------------------------------------------------------------------------------------
FINDER = r"""
import ctypes, gc, os, re, sys
PAT = re.compile(rb'SECRET-[0-9a-f]{32}')
found = set()
try:
    found.update(PAT.findall(sys.stdin.buffer.read()))
except Exception:
    pass
with open('/proc/self/maps') as maps:
    for line in maps:
        f = line.split()
        lo, hi = (int(x, 16) for x in f[0].split('-'))
        if 'r' in f[1] and hi - lo < (256 << 20) and not line.rstrip().endswith(('[vvar]', '[vsyscall]', '[vvar_vclock]')):
            found.update(PAT.findall(ctypes.string_at(lo, hi - lo)))
for o in gc.get_objects():
    try:
        found.update(PAT.findall(repr(o).encode('utf-8', 'replace')))
    except Exception:
        pass
for pid in os.listdir('/proc'):
    if pid.isdigit():
        for part in ('cmdline', 'environ', 'mem'):
            try:
                found.update(PAT.findall(open(f'/proc/{pid}/{part}', 'rb').read(1 << 20)))
            except OSError:
                pass
print(' '.join(sorted(x.decode() for x in found)))
"""


def test_a_run_cannot_read_the_other_runs_of_its_call():
    ok, reason = sbx.probe_isolation()
    if not ok:
        pytest.skip(f"this host cannot isolate code: {reason}")
    box = Sandbox(SandboxLimits(timeout_s=10.0, memory_mb=256, max_processes=8))  # each run scans its memory
    s = ["SECRET-" + uuid.uuid4().hex for _ in range(5)]
    pad = "." * 20_000  # items of this size live on the C heap: without zeroing, a freed one stays readable
    runs = [{"code": FINDER, "stdin": pad + s[0] + pad},                       # its input
            {"code": FINDER + f"\n# {pad}{s[1]}{pad}\n", "stdin": ""},         # its code
            {"code": FINDER, "test": f"assert {pad + s[2] + pad!r} != ''"},     # its test (never in the program)
            {"code": FINDER, "stdin": pad + s[3] + pad},
            {"code": FINDER, "stdin": s[4]}]  # each run prints what it found: the outputs hold secrets too
    results = box.run_many(runs)
    assert [r.status for r in results] == ["ok"] * 5, [r.stderr for r in results]
    found = [set(r.stdout.split("\n")[0].split()) for r in results]
    assert found[0] == {s[0]} and found[1] == {s[1]} and found[2] == set()
    assert found[3] == {s[3]} and found[4] == {s[4]}


# ------------------------------------------------------------------------------------------------
# the plain-data channel between a program and its test
# ------------------------------------------------------------------------------------------------
def test_plain_data_round_trips_exactly():
    from decimal import Decimal
    from fractions import Fraction

    values = [None, True, False, 0, -1, 2**200, -(3**90), 1.5, -0.0, float("inf"), 1e-310, 2 + 3j, "", "héllo \ud800",
              b"\x00\xff", bytearray(b"ab"), [1, [2, (3,)]], (), {1: "a", (2, 3): [4]}, {1, 2}, frozenset({"x"}),
              Ellipsis, Fraction(-7, 3), Decimal("1.10")]
    for v in values:
        got = sbx._decode(sbx._encode(v, None), None)
        assert type(got) is type(v) and (got == v or v != v), v
    nan = sbx._decode(sbx._encode(float("nan"), None), None)
    assert nan != nan


def test_subclasses_cross_as_their_builtin_base_value():
    class Eq(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__

    class S(str):
        def __eq__(self, other):
            return True

    class L(list):
        def __iter__(self):
            return iter([99])

    class D(dict):
        def items(self):
            return [("forged", 1)]

    got = sbx._decode(sbx._encode([Eq(5), S("a"), L([1, 2]), D(k=1), (Eq(7),)], None), None)
    assert got == [5, "a", [1, 2], {"k": 1}, (7,)]
    assert [type(x) for x in got] == [int, str, list, dict, tuple] and type(got[4][0]) is int
    assert got[0] != 6  # the builtin comparison: the override is gone


def test_other_objects_are_opaque_handles_and_malformed_data_is_refused():
    seen = []
    data = sbx._encode([object(), len], lambda v: seen.append(v) or len(seen) - 1)
    assert data == b"l2:h0;h1;" and len(seen) == 2
    link = sbx._Link(-1, -1)
    a, b = sbx._decode(data, link._remote)
    assert type(a) is sbx.Remote and a == a and a != b and a != 0 and not (a == 1)
    with pytest.raises(TypeError, match="no truth value"):
        bool(a)
    with pytest.raises(TypeError):
        a < 1  # noqa: B015
    for bad in (b"", b"x", b"i12", b"s5:ab", b"l2:i1;", b"d1:l0:i1;", b"S1:l0:", b"i1;i2;", b"l9999999999:", b"[" * 500,
                b"l1:" * 300 + b"N", b"q" + b"s1:a" + b"i1;", b"f0x1p+;"):
        with pytest.raises(sbx._Malformed):
            sbx._decode(bad, lambda h: h)
    with pytest.raises(TypeError, match="cannot be passed to the program"):
        sbx._encode(object(), sbx._Link._handle_of)


def test_test_runs_work_like_the_tests_people_write(box):
    cases = {
        ("import math\ndef area(r):\n    return math.pi * r * r", "assert math.isclose(area(2), 12.566, rel_tol=1e-3)"): "pass",
        ("from math import isclose\ndef f():\n    return 0.5", "assert isclose(f(), 0.5)"): "pass",
        ("class Solution:\n    def two(self, a):\n        return sorted(a)", "assert Solution().two([3, 1]) == [1, 3]"): "pass",
        ("def push(a):\n    a.append(1)", "x = []\npush(x)\nassert x == [1]"): "pass",  # changed in place
        ("def gen(n):\n    yield from range(n)", "assert list(gen(3)) == [0, 1, 2]\nassert len(list(gen(2))) == 2"): "pass",
        ("def f(x):\n    raise ValueError('negative')", "try:\n    f(-1)\n    assert False\nexcept ValueError:\n    pass"): "pass",
        ("def f(x):\n    return x", "def check(candidate):\n    assert candidate(1) == 1\n    assert candidate(2) == 3\ncheck(f)"): "assert",
        ("from fractions import Fraction\ndef f():\n    return Fraction(1, 3)", "from fractions import Fraction\nassert f() == Fraction(1, 3)"): "pass",
        ("LIMIT = 5", "assert LIMIT == 5"): "pass",
        ("def f():\n    return 1", "assert g() == 1"): "error",  # NameError
        ("def f():\n    return 1 / 0", "assert f() == 1"): "error",
        ("def f():\n    return object()", "assert f() == 1"): "assert",
        ("def f(g):\n    return g(2)", "assert f(lambda x: x) == 2"): "error",  # a test's function cannot be passed
        # a standard-library callable named by the program runs in the program's process, not in the test's:
        # unittest.mock._ANY() is equal to everything there, and is an opaque handle here
        ("from unittest.mock import _ANY as f", "assert f() == 3"): "assert",
        ("import math as m\ndef f():\n    return m.pi", "assert m.floor(f()) == 3"): "pass",  # a module: the test's copy
    }
    runs = [{"code": code, "test": test} for code, test in cases]
    results = box.run_many(runs)
    got = {key: r.verdict for key, r in zip(cases, results)}
    assert got == cases, [(k[1], r.verdict, r.info, r.stderr) for k, r in zip(cases, results) if got[k] != cases[k]]
    assert results[9].info["check"].startswith("NameError") and "test line 1" in results[9].info["check"]
    assert results[10].info["check"].startswith("ZeroDivisionError")


def test_the_unsafe_workdir_is_removed_without_following_links(monkeypatch, tmp_path):
    monkeypatch.setattr(sbx, "probe_isolation", lambda python=None: (False, "simulated"))
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file").write_text("mine")
    os.chmod(tmp_path, 0o755)
    before = _sandbox_tmpdirs()
    box = Sandbox(LIMITS, allow_unsafe=True)
    r = box.run(f"import os\nos.symlink({str(keep)!r}, 'link')\nos.makedirs('a/b')\nopen('a/b/c', 'w').write('x')\n"
                f"print(sorted(os.listdir('.')))")
    assert r.status == "ok" and r.stdout.strip() == "['a', 'link']", r.stderr
    assert _sandbox_tmpdirs() <= before and (keep / "file").read_text() == "mine"
