"""Run untrusted model-written Python in a separate, limited process.

Layers, each independent of the others:
- a fresh interpreter (`python -I`) in its own session, started from a fresh temporary directory, with an empty
  environment: nothing of the trainer's memory, credentials or working directory is reachable;
- a wall-clock timeout that kills the whole process group, and rlimits on memory, CPU time, file size and open files;
- where the machine allows it (root, or a kernel that permits it), a network namespace with no interfaces
  (`unshare --net`), so the kernel itself refuses every connection;
- an in-process guard installed before the program runs: no sockets, no subprocesses, signals or `os.system`, and no
  writes or deletions outside the temporary directory.
The process, the limits and the namespace are kernel-enforced. The file-write and subprocess rules are the guard's
alone (the child keeps the trainer's user, since an unprivileged user usually cannot run the trainer's interpreter);
the guard also makes `import ctypes` fail so that it cannot simply be undone. It is meant for model-written test
solutions, not for adversarial code.
"""

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass


# Installed in the child before the program is executed. Written as source so that it runs in the child only.
_GUARD = r"""
import builtins, os, socket, subprocess, shutil, sys
_root = os.path.realpath(os.getcwd())

def _blocked(*args, **kwargs):
    raise PermissionError("blocked by the score_trl sandbox")

def _inside(path):
    try:
        path = os.fspath(path)
    except TypeError:  # a file descriptor
        return True
    full = os.path.realpath(path if os.path.isabs(path) else os.path.join(_root, path))
    return full == _root or full.startswith(_root + os.sep)

_open = builtins.open
def _guarded_open(file, mode="r", *args, **kwargs):
    if any(flag in mode for flag in "wax+") and not _inside(file):
        raise PermissionError(f"writing outside the sandbox directory is blocked: {file}")
    return _open(file, mode, *args, **kwargs)
builtins.open = _guarded_open

def _path_guard(func):
    def guarded(*args, **kwargs):
        if not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
            raise PermissionError("changing files outside the sandbox directory is blocked")
        return func(*args, **kwargs)
    return guarded

for _name in ("remove", "unlink", "rmdir", "mkdir", "makedirs", "rename", "renames", "replace", "truncate"):
    if hasattr(os, _name):
        setattr(os, _name, _path_guard(getattr(os, _name)))
for _name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execvp", "execvpe",
              "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "posix_spawn",
              "posix_spawnp", "chmod", "chown", "lchown", "link", "symlink", "setuid", "putenv", "chdir", "chroot"):
    if hasattr(os, _name):
        setattr(os, _name, _blocked)
shutil.rmtree = _path_guard(shutil.rmtree)
shutil.move = _path_guard(shutil.move)
subprocess.Popen = _blocked
subprocess.run = subprocess.call = subprocess.check_call = subprocess.check_output = _blocked
socket.socket = _blocked
socket.create_connection = socket.getaddrinfo = socket.socketpair = _blocked
sys.modules["ctypes"] = None  # `import ctypes` fails
del builtins, socket, subprocess, shutil

_program = _open(sys.argv[1]).read()
exec(compile(_program, "program.py", "exec"), {"__name__": "__main__"})
"""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    output: str


@functools.lru_cache(maxsize=1)
def network_isolation() -> tuple[str, ...]:
    """The `unshare --net` prefix where this machine lets us create a network namespace, else ()."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    probe = subprocess.run([unshare, "--net", "true"], capture_output=True, timeout=10)
    return (unshare, "--net") if probe.returncode == 0 else ()


def _limit(memory_bytes: int, cpu_seconds: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_python(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run `program` in the sandbox; passed means exit status 0 within `timeout` seconds."""
    workdir = tempfile.mkdtemp(prefix="score_sandbox_")
    try:
        program_path = os.path.join(workdir, "program.py")
        with open(program_path, "w") as f:
            f.write(program)
        command = [*network_isolation(), sys.executable, "-I", "-c", _GUARD, program_path]
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONHASHSEED": "0"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_limit(memory_mb << 20, int(timeout) + 1),
        )
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            return SandboxResult(False, "timeout", output.decode(errors="replace")[-2000:])
        finally:
            try:  # anything the program left behind in its session goes too
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        status = "passed" if process.returncode == 0 else "failed"
        return SandboxResult(process.returncode == 0, status, output.decode(errors="replace")[-2000:])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
