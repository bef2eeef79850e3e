"""The code sandbox against each class of escape. Every program below tries the escape without any Python guard in
its way; what stops it is bubblewrap's namespaces and mounts and the kernel's rlimits."""

import os
import socket
import subprocess
import time
import uuid

import pytest

from score_trl import sandbox
from score_trl.sandbox import SandboxUnavailable, kernel_isolation, require_isolation, run_python


pytestmark = pytest.mark.skipif(
    kernel_isolation() is not None, reason=f"no kernel sandbox on this machine: {kernel_isolation()}"
)


def passes(program: str, **kwargs) -> str:
    result = run_python(program, **kwargs)
    assert result.passed, result.output
    return result.output


def test_reads_nothing_of_the_trainer(tmp_path):
    secret = f"secret-{uuid.uuid4().hex}"
    os.environ["SCORE_TRL_TEST_TOKEN"] = secret
    (tmp_path / "credentials").write_text(secret)
    try:
        output = passes(
            "import os, glob\n"
            "assert 'SCORE_TRL_TEST_TOKEN' not in os.environ\n"
            f"for path in ('/etc/passwd', '/etc/shadow', {os.path.expanduser('~')!r}, {str(tmp_path)!r}, '/tmp',\n"
            f"             {os.getcwd()!r}):\n"
            "    assert not os.path.exists(path), path\n"
            # only the sandbox's own processes exist in its /proc, and none of their environments holds the secret
            "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
            "print(len(pids))\n"
            "for pid in pids:\n"
            f"    assert {secret!r}.encode() not in open(f'/proc/{{pid}}/environ', 'rb').read()\n"
            f"assert not any({secret!r} in open(p, errors='ignore').read() for p in glob.glob('/proc/*/cmdline'))\n"
        )
    finally:
        del os.environ["SCORE_TRL_TEST_TOKEN"]
    assert int(output.split()[-1]) <= 3  # bubblewrap's init and the program (and nothing of the host)


@pytest.mark.parametrize(
    "attempt",
    [
        "open(TARGET, 'w').write('x')",
        "import os; os.close(os.open(TARGET, os.O_CREAT | os.O_WRONLY))",
        "import io; io.open(TARGET, 'w').write('x')",
        "import pathlib; pathlib.Path(TARGET).write_text('x')",
        "import posix; posix.unlink(KEEP)",
        "import shutil; shutil.rmtree(os.path.dirname(KEEP))",
        "import posix; posix.system(f'touch {TARGET}; rm -f {KEEP}')",
        "import ctypes; ctypes.CDLL(None).unlink(KEEP.encode())",
    ],
    ids=["open", "os.open", "io.open", "pathlib", "posix.unlink", "rmtree", "posix.system", "ctypes"],
)
def test_cannot_write_or_delete_outside(tmp_path, attempt):
    # Host paths the program knows: it sees none of them, and the system it sees is read-only
    target, keep = tmp_path / "written", tmp_path / "keep.txt"
    keep.write_text("keep")
    program = (
        f"import os\nTARGET, KEEP = {str(target)!r}, {str(keep)!r}\n"
        f"for TARGET in (TARGET, '/usr/written', '/written'):\n"
        f"    try:\n        {attempt}\n    except OSError:\n        pass\n"
        "    assert not os.path.exists(TARGET)\n"
        "open('/sandbox/inside.txt', 'w').write('fine')\n"
        "assert open('inside.txt').read() == 'fine'\n"
    )
    passes(program)
    assert not target.exists() and keep.read_text() == "keep"


def _leftover(marker: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return found.stdout.split()


def test_no_process_outlives_the_timeout():
    marker = f"{time.time_ns() % 10_000_000}.5"
    program = (
        "import os, time\n"
        "for _ in range(3):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"  # a new session, away from the program's process group
        f"        os.execv('/usr/bin/sleep', ['sleep', '{marker}'])\n"
        "time.sleep(3600)\n"
    )
    start = time.monotonic()
    result = run_python(program, timeout=2)
    elapsed = time.monotonic() - start
    assert result.status == "timeout"
    assert elapsed < 2 + 1, elapsed
    time.sleep(0.2)
    assert _leftover(marker) == []


def test_children_die_with_a_program_that_exits():
    marker = f"{time.time_ns() % 10_000_000}.25"
    program = (
        f"import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/usr/bin/sleep', ['sleep', '{marker}'])\n"
    )
    start = time.monotonic()
    passes(program, timeout=10)
    assert time.monotonic() - start < 3
    time.sleep(0.2)
    assert _leftover(marker) == []


def test_fork_flood_is_capped():
    program = (
        "import os, time\n"
        "children = 0\n"
        "try:\n"
        "    for _ in range(500):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        children += 1\n"
        "except BlockingIOError:\n"
        "    pass\n"
        "print(children)\n"
    )
    output = passes(program, timeout=10, max_processes=20)
    assert 10 <= int(output.split()[-1]) < 20


def test_huge_output_is_capped_while_it_streams():
    start = time.monotonic()
    result = run_python("import sys\nfor _ in range(200):\n    sys.stdout.write('x' * (1 << 20))\nprint('END')\n")
    assert result.passed and len(result.output) <= 2000 and result.output.endswith("END\n")
    assert time.monotonic() - start < 10


def test_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    program = (
        "import socket, _socket\n"
        "for connect in (lambda: socket.create_connection(('127.0.0.1', PORT), timeout=2),\n"
        "                lambda: _socket.socket().connect(('127.0.0.1', PORT)),\n"
        "                lambda: socket.create_connection(('1.1.1.1', 53), timeout=2)):\n"
        "    try:\n        connect()\n        raise SystemExit('connected')\n    except OSError:\n        pass\n"
        "try:\n    _socket.socket(_socket.AF_INET, _socket.SOCK_RAW, 1)\n    raise SystemExit('raw socket')\n"
        "except PermissionError:\n    pass\n"
    ).replace("PORT", str(port))
    try:
        passes(program, timeout=10)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_memory_cpu_and_file_size_limits():
    result = run_python("block = bytearray(8 << 30)\n", memory_mb=512)
    assert result.status == "failed" and "MemoryError" in result.output
    result = run_python("open('big', 'wb').write(b'0' * (100 << 20))\n")
    assert result.status == "failed" and "File too large" in result.output
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout=2)
    assert result.status == "timeout" and time.monotonic() - start < 3
    passes("x = 1\n")  # and the machine is fine afterwards


def test_refuses_to_run_unsandboxed_unless_allowed(monkeypatch):
    monkeypatch.setattr(sandbox, "kernel_isolation", lambda: "bubblewrap is not installed")
    monkeypatch.delenv(sandbox.ALLOW_UNSANDBOXED, raising=False)
    with pytest.raises(SandboxUnavailable, match="SCORE_TRL_ALLOW_UNSANDBOXED=1"):
        run_python("x = 1\n")
    monkeypatch.setenv(sandbox.ALLOW_UNSANDBOXED, "1")
    assert require_isolation() is False
    assert run_python("x = 1\n").passed
