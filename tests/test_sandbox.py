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
    with pytest.raises(TypeError, match="runs\\[0\\]"):
        Sandbox.run_many(object.__new__(Sandbox), [123])
