"""Run untrusted model-written Python under bubblewrap (`bwrap`, the sandbox Flatpak uses), enforced by the kernel.

Every rule is a kernel mechanism, none a Python guard:
- namespaces (`--unshare-all`): its own PID namespace, so every descendant dies with the program (a `setsid` child
  or a fork that outlives it included); no network (an empty network namespace: loopback servers of the trainer are
  unreachable, and there is no capability for raw sockets); its own IPC, UTS and cgroup namespaces;
- a filesystem view of read-only `/usr` (the interpreter and its standard library), a fresh `/proc` that shows only
  the sandbox's processes (not the trainer's environment), no `/etc` but the loader cache, no home directory, and one
  writable directory: a size-limited tmpfs that holds the program;
- an empty environment; an unprivileged user id of its own (where the trainer runs as root), so that the process
  limit counts this program's processes only;
- rlimits on address space, CPU time, file size, open files and processes; a wall-clock timeout after which the
  process tree is killed, so `run_python` returns within `timeout` plus about a second whatever the program does;
- output read while it streams, keeping only its last `output_bytes`.

Where bubblewrap is missing or cannot create namespaces, code rewards refuse to run with a message that names the
fix, unless `SCORE_TRL_ALLOW_UNSANDBOXED=1` opts in to running programs with the limits and the timeout only.
"""

import functools
import itertools
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass


ALLOW_UNSANDBOXED = "SCORE_TRL_ALLOW_UNSANDBOXED"
_TMPFS_BYTES = 64 << 20
_FILE_BYTES = 16 << 20
# Sandboxed programs of a root trainer each get their own otherwise unused user id, so that RLIMIT_NPROC (which the
# kernel counts per user, and does not enforce for root) bounds each program's processes separately.
_UIDS = itertools.cycle(range(3_000_000, 3_065_536))
_UID_LOCK = threading.Lock()


class SandboxUnavailable(RuntimeError):
    """No kernel isolation is available on this machine and unsandboxed execution was not allowed."""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    output: str


def _interpreter() -> tuple[str, list[str]]:
    """The Python the sandbox runs, and the extra read-only binds it needs. The system's `/usr/bin/python3` lies
    inside the read-only `/usr` view; otherwise this interpreter's installation is bound read-only (it must then be
    readable by other users: a root trainer's programs run under an unprivileged user id)."""
    if os.path.exists("/usr/bin/python3"):
        return "/usr/bin/python3", []
    prefix = os.path.realpath(sys.base_prefix)
    executable = os.path.join(prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}")
    return executable, ["--ro-bind", prefix, prefix]


def bwrap_command(program_dir: str) -> list[str]:
    """The bubblewrap command line that runs `program_dir/program.py`."""
    python, binds = _interpreter()
    links = []
    for name in ("bin", "lib", "lib64", "sbin"):  # merged-/usr systems: /lib -> usr/lib
        path = f"/{name}"
        if os.path.islink(path):
            links += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            links += ["--ro-bind", path, path]
    cache = ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"] if os.path.exists("/etc/ld.so.cache") else []
    return [
        shutil.which("bwrap") or "bwrap",
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", "/sandbox",
        "--setenv", "TMPDIR", "/sandbox",
        "--setenv", "PYTHONHASHSEED", "0",
        "--ro-bind", "/usr", "/usr",
        *links,
        *cache,
        *binds,
        "--proc", "/proc",
        "--dev", "/dev",
        "--size", str(_TMPFS_BYTES), "--tmpfs", "/sandbox",
        "--ro-bind", os.path.join(program_dir, "program.py"), "/sandbox/program.py",
        "--remount-ro", "/",
        "--chdir", "/sandbox",
        "--", python, "-I", "program.py",
    ]  # fmt: skip


@functools.lru_cache(maxsize=1)
def kernel_isolation() -> str | None:
    """None when bubblewrap runs a sandboxed program on this machine, else the reason it cannot."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (Debian/Ubuntu: `apt-get install bubblewrap`)"
    result = run_python("print('ok')", timeout=30, isolated=True)
    if result.output.strip() != "ok":
        return f"bubblewrap could not create its namespaces here: {result.output.strip()[-500:]}"
    return None


def require_isolation():
    """Raise SandboxUnavailable, naming the fix, when programs would run without kernel isolation."""
    reason = kernel_isolation()
    if reason is not None and os.environ.get(ALLOW_UNSANDBOXED) != "1":
        raise SandboxUnavailable(
            f"Code rewards run model-written programs, and this machine offers no kernel sandbox: {reason}. Install "
            f"bubblewrap (and allow unprivileged user namespaces), or set {ALLOW_UNSANDBOXED}=1 to run the programs "
            "unsandboxed, with resource limits and a timeout only, at your own risk."
        )
    return reason is None


def _preexec(memory_bytes: int, cpu_seconds: int, max_processes: int, uid: int | None):
    def apply():
        limits = {
            resource.RLIMIT_AS: memory_bytes,
            resource.RLIMIT_CPU: cpu_seconds,
            resource.RLIMIT_FSIZE: _FILE_BYTES,
            resource.RLIMIT_NOFILE: 64,
            resource.RLIMIT_CORE: 0,
            resource.RLIMIT_NPROC: max_processes,
        }
        for kind, value in limits.items():
            resource.setrlimit(kind, (value, value))
        if uid is not None:  # set last: an unprivileged user cannot raise its limits again
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

    return apply


def _read_capped(stream, deadline: float, keep: int) -> tuple[bytes, bool]:
    """Read `stream` until EOF or `deadline`, keeping only the last `keep` bytes. Returns (tail, timed_out)."""
    fd = stream.fileno()
    tail = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return bytes(tail), True
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        data = os.read(fd, 1 << 16)
        if not data:
            return bytes(tail), False
        tail += data
        if len(tail) > keep:
            del tail[:-keep]


def run_python(program: str, timeout: float = 10.0, memory_mb: int = 1024, max_processes: int = 32,
               output_bytes: int = 2000, isolated: bool | None = None) -> SandboxResult:  # fmt: skip
    """Run `program` in the sandbox; passed means exit status 0 within `timeout` seconds. `output` is the last
    `output_bytes` of its stdout and stderr.

    `isolated=None` decides with `require_isolation`: under bubblewrap where the machine allows it, unsandboxed where
    the user opted in, else SandboxUnavailable.
    """
    if isolated is None:
        isolated = require_isolation()
    workdir = tempfile.mkdtemp(prefix="score_sandbox_")
    try:
        program_path = os.path.join(workdir, "program.py")
        with open(program_path, "w") as f:
            f.write(program)
        os.chmod(workdir, 0o755)  # readable by the sandbox's own user id
        os.chmod(program_path, 0o644)
        command, cwd, env, uid, processes = _launch_settings(workdir, program_path, isolated, max_processes)
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_preexec(memory_mb << 20, int(timeout) + 1, processes, uid),
        )
        try:
            deadline = time.monotonic() + timeout
            output, timed_out = _read_capped(process.stdout, deadline, output_bytes)
            if not timed_out:
                try:
                    process.wait(timeout=max(deadline - time.monotonic(), 0))
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            _kill_tree(process)
        text = output.decode(errors="replace")
        if timed_out:
            return SandboxResult(False, "timeout", text)
        status = "passed" if process.returncode == 0 else "failed"
        return SandboxResult(process.returncode == 0, status, text)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _launch_settings(workdir: str, program_path: str, isolated: bool, max_processes: int):
    """(command, cwd, environment, user id or None, process limit) of one program run: under bubblewrap with its own
    user id when running as root, or (opted in to no sandbox) the system interpreter with limits only."""
    uid, processes = None, max_processes
    if isolated:
        # bubblewrap itself adds two processes (its monitor and the namespace's init)
        command, cwd, env = bwrap_command(workdir), "/", {}
        processes += 2
        if os.geteuid() == 0:
            with _UID_LOCK:
                uid = next(_UIDS)
        else:  # the limit counts every process of this user: leave room for the ones that already run
            processes += _processes_of(os.getuid())
    else:  # opted in to no sandbox: limits and timeout only, as the trainer's user
        processes += _processes_of(os.getuid())
        command, cwd = [sys.executable, "-I", program_path], workdir
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0"}
    return command, cwd, env, uid, processes


def _kill_tree(process: subprocess.Popen):
    """Kill the program's session. Under bubblewrap, the namespace's init dies with bwrap (`--die-with-parent`), and
    the kernel kills every process of a PID namespace whose init exits."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.stdout.close()
    process.wait()


def _processes_of(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return count
