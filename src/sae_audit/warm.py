"""Warm start: the `sae-audit` console script, and the pre-imported server it forks jobs from.

Why: every rule runs `sae-audit <stage>` in a fresh process, and a model job of the
default run spent 7-9 s (measured on 2 CPU cores) importing torch, transformers and
sae-lens for well under a second of work (a plot job, 2 s for seaborn). With ~200 jobs that start-up was most of
the demo's wall time. So the first command starts one server per environment that
imports those libraries once; every command then connects to it over a Unix socket and
hands over its stdin/stdout/stderr, argv, working directory and environment, and the
server forks a child that runs the command exactly as a cold process would
(`sae_audit.cli.main`). The command waits for the child's exit status, forwards
SIGINT/SIGTERM/SIGHUP to it, and the server kills the child if the command dies
(kill -9 of the run), so a killed job never outlives its caller.

The server is keyed by the interpreter, the package's source files (path, size, mtime)
and the environment minus the per-job thread counts Snakemake sets, so an edited source
file or a changed environment gets a fresh server, never stale code. It exits after
`SAE_AUDIT_WARM_IDLE` seconds (default 60) with no job. Warm start is off, and every
command runs in its own process as before, when `SAE_AUDIT_WARM=0`, inside a SLURM job
(each job runs on its own node: nothing to share), off Linux, or when the server cannot
start; a command the server never acknowledged runs cold, so nothing runs twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Snakemake sets the thread counts per job from `threads:`; the child applies them (torch
# reads them only when it starts its thread pool, which the server never does). These and
# the shell's and pytest's bookkeeping, which no library reads at import, must not split
# the server.
PER_JOB_ENV = frozenset(
    {
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "GOTO_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
        "PYTEST_CURRENT_TEST",
    }
)
# What the server imports before it forks anything: the libraries whose import is the
# start-up cost, and the package's own modules. Optional ones may be missing.
PRELOAD = (
    "torch",
    "transformers",
    "sae_lens",
    "safetensors.torch",
    "tokenizers",
    "pyarrow.parquet",
    "polars",
    "scipy.stats",
    "sklearn.linear_model",
    "sklearn.metrics",
    "sklearn.model_selection",
    "matplotlib.pyplot",
    "seaborn",
    "gguf",
    "compressed_tensors",
    "llmcompressor",
)
CONNECT_TIMEOUT_S = 30.0
_HEADER = struct.Struct("!I")
_STATUS = struct.Struct("!ci")


def main(argv: Sequence[str] | None = None) -> int:
    """The `sae-audit` console script: the command in a warm child, or cold in-process."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--serve"]:
        return serve(Path(args[1]))
    # Help and the version run no job: a server's start (importing torch) is all they'd wait on.
    only_help = not args or {"-h", "--help", "--version"} & set(args)
    if enabled() and not only_help:
        try:
            return run_warm(args)
        except WarmUnavailable as e:
            if os.environ.get("SAE_AUDIT_WARM_DEBUG"):
                print(f"sae-audit: warm start unavailable ({e}); running cold", file=sys.stderr)
    from .cli import main as cold_main

    return cold_main(args)


def enabled() -> bool:
    return (
        os.environ.get("SAE_AUDIT_WARM", "1") != "0"
        and "SLURM_JOB_ID" not in os.environ
        and sys.platform == "linux"
        and hasattr(socket, "send_fds")
    )


class WarmUnavailable(Exception):
    """The server could not take the command; nothing of it has run."""


# ---------------------------------------------------------------- client
def server_key(env: dict[str, str] | None = None) -> str:
    """What a server's imports depend on: interpreter, package sources, environment."""
    env = dict(os.environ if env is None else env)
    package = Path(__file__).resolve().parent
    sources = sorted(
        (str(p.relative_to(package)), st.st_size, st.st_mtime_ns)
        for p in package.rglob("*.py")
        for st in [p.stat()]
    )
    stable_env = sorted((k, v) for k, v in env.items() if k not in PER_JOB_ENV)
    blob = json.dumps([sys.executable, sys.version, str(package), sources, stable_env])
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def socket_path(key: str) -> Path:
    # A short, node-local path (AF_UNIX paths are limited to ~107 bytes).
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"sae-audit-warm-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    return base / f"{key}.sock"


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock


def _spawn_server(path: Path) -> None:
    log = path.with_suffix(".log").open("ab")
    subprocess.Popen(
        [sys.executable, "-m", "sae_audit.warm", "--serve", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        cwd="/",
        start_new_session=True,  # not in the job's process group: a job's kill must not end it
        close_fds=True,
    )
    log.close()


def connect_or_spawn(path: Path, timeout_s: float = CONNECT_TIMEOUT_S) -> socket.socket:
    try:
        return _connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    _spawn_server(path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            return _connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.05)
    raise WarmUnavailable(f"no server at {path} after {timeout_s:.0f} s")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def run_warm(args: list[str]) -> int:
    try:
        sock = connect_or_spawn(socket_path(server_key()))
    except OSError as e:
        raise WarmUnavailable(str(e)) from e
    fds = [fd for fd in (0, 1, 2) if _is_open(fd)]
    request = json.dumps(
        {"argv": args, "cwd": os.getcwd(), "env": dict(os.environ), "fds": fds}
    ).encode()
    try:
        socket.send_fds(sock, [b"R"], fds)
        sock.sendall(_HEADER.pack(len(request)) + request)
        kind, pid = _STATUS.unpack(_recv_exact(sock, _STATUS.size))
    except (OSError, EOFError) as e:
        raise WarmUnavailable(f"the server did not take the command ({e})") from e
    assert kind == b"P"
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda s, _f: _kill(pid, s)) for sig in forwarded}
    try:
        kind, code = _STATUS.unpack(_recv_exact(sock, _STATUS.size))
    except (OSError, EOFError):
        print("sae-audit: the warm server ended without the job's exit status", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    # A child killed by signal N reports -N; a shell would say 128 + N.
    return code if code >= 0 else 128 - code


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# ---------------------------------------------------------------- server
def serve(path: Path) -> int:
    """Bind `path` (a lock file makes one server per key), preload, then fork per command."""
    import fcntl
    import selectors

    lock = path.with_suffix(".lock").open("w")
    # A command spawns a server only when it found none listening; if another still holds
    # the key, it is on its way out (idle): wait for it rather than leave the command
    # waiting for a socket nobody will bind.
    deadline = time.monotonic() + CONNECT_TIMEOUT_S / 2
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                return 0
            time.sleep(0.05)
    # libgomp reads its settings when torch loads it, i.e. in this process: spinning
    # threads of one job would otherwise starve the job beside it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(128)
    _log(f"listening on {path}")
    preload()

    idle_s = float(os.environ.get("SAE_AUDIT_WARM_IDLE", "60"))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    children: dict[int, tuple[socket.socket, int]] = {}  # pid -> (connection, pidfd)
    last_active = time.monotonic()
    try:
        while children or time.monotonic() - last_active < idle_s:
            for key, _ in selector.select(timeout=1.0):
                if key.data is None:
                    conn, _ = listener.accept()
                    pid = _start(conn, listener, children)
                    if pid is not None:
                        pidfd = os.pidfd_open(pid)
                        children[pid] = (conn, pidfd)
                        selector.register(pidfd, selectors.EVENT_READ, ("exit", pid))
                        selector.register(conn, selectors.EVENT_READ, ("conn", pid))
                    continue
                what, pid = key.data
                if pid not in children:
                    continue
                conn, pidfd = children[pid]
                if what == "conn":
                    # The command went away (kill -9 of the run): its job goes with it.
                    if not conn.recv(1):
                        _kill(pid, signal.SIGKILL)
                        selector.unregister(conn)
                    continue
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):
                    conn.sendall(_STATUS.pack(b"X", os.waitstatus_to_exitcode(status)))
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(conn)
                selector.unregister(pidfd)
                os.close(pidfd)
                conn.close()
                del children[pid]
                last_active = time.monotonic()
    finally:
        path.unlink(missing_ok=True)
        listener.close()
    _log("idle: exiting")
    return 0


def preload() -> None:
    import importlib
    import pkgutil

    started = time.monotonic()
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as e:  # a missing optional library: its jobs import it themselves
            _log(f"preload {name}: {type(e).__name__}: {e}")
    package = importlib.import_module("sae_audit")
    for info in pkgutil.walk_packages(package.__path__, "sae_audit."):
        if info.name.endswith("__main__"):  # importing it would run the CLI
            continue
        with contextlib.suppress(Exception):
            importlib.import_module(info.name)
    sys.stdout.flush()
    sys.stderr.flush()
    _log(f"preloaded in {time.monotonic() - started:.1f} s")


def _start(
    conn: socket.socket, listener: socket.socket, children: dict[int, tuple[socket.socket, int]]
) -> int | None:
    """Read one command and fork its child; the child never returns."""
    conn.settimeout(10)
    try:
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        (size,) = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
        request = json.loads(_recv_exact(conn, size))
    except (OSError, EOFError, ValueError) as e:
        _log(f"bad request: {e}")
        conn.close()
        return None
    conn.settimeout(None)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(OSError):
            conn.sendall(_STATUS.pack(b"P", pid))
        return pid
    code = 1
    try:
        listener.close()
        for other, pidfd in children.values():
            other.close()
            os.close(pidfd)
        conn.close()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        for target, fd in zip(request["fds"], fds, strict=True):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        code = _run_child(request["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _run_child(argv: list[str]) -> int:
    # cold_main gives the preloaded torch this job's threads (sae_audit.threads), as it
    # does a torch that a cold command loads.
    sys.argv = ["sae-audit", *argv]
    from .cli import main as cold_main

    return cold_main(argv)


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [{os.getpid()}] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
