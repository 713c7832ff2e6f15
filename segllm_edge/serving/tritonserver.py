"""Run a real Triton Inference Server from the ``nvidia-pytriton`` wheel.

The wheel (``pip install nvidia-pytriton``) ships ``tritonserver`` (2.51, CPU-capable), the
python backend and one python-backend stub per CPython minor version.  Three things have to be
set up deliberately before a python-backend model loads:

1. **The stub.**  ``backends/python/`` in the wheel has no ``triton_python_backend_stub``; the
   stubs live in ``python_backend_stubs/3.X/``.  :func:`prepare_backends` copies the wheel's
   backends plus the stub for the running Python into a writable cache directory (the wheel's
   own folder is left untouched, so a read-only site-packages works too).
2. **Which libpython the stub loads.**  The stub links ``libpython3.X.so.1.0`` by soname, so
   without help it loads whatever the dynamic loader finds first (on Debian: the system's
   3.11.2).  We put a private directory holding one symlink, ``libpython3.X.so.1.0`` -> the
   running interpreter's own shared libpython, first on ``LD_LIBRARY_PATH``.
3. **Which stdlib / site-packages it uses.**  The stub's embedded interpreter runs isolated
   (it ignores ``PYTHONPATH``/``PYTHONHOME``) and computes its prefix from the ``python3`` it
   finds on ``PATH``.  We put the running interpreter's ``bin/`` first on ``PATH``; for a
   virtualenv that makes the stub read ``pyvenv.cfg`` and come up exactly like the venv's
   Python (same stdlib, venv site-packages and editable installs on ``sys.path``).

Getting 2 and 3 out of step is what produced ``'_thread.RLock' object has no attribute
'_recursion_count'`` (Debian's 3.11.2 libpython running pyenv's 3.11.7 stdlib) or
``No module named '_struct'`` (the other way round).

Usage::

    with TritonServer("model_repository") as server:       # starts and waits until ready
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
"""
from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..errors import BackendError
from ..process_memory import kib_field
from .argv_secrets import launch_environment

INSTALL_HINT = ("install it with `pip install nvidia-pytriton` (the wheel ships the tritonserver binary "
                "and the python backend; numpy must stay < 2), or point SEGLLM_TRITON_HOME at a "
                "Triton install (a folder with bin/tritonserver and backends/)")

#: environment variables this module reads
ENV_TRITON_HOME = "SEGLLM_TRITON_HOME"     # a Triton install: bin/tritonserver, backends/ (e.g. /opt/tritonserver)
ENV_CACHE_DIR = "SEGLLM_TRITON_CACHE"      # where prepared backend folders go


class TritonUnavailableError(BackendError):
    """The Triton server binary, its backends or the stub for this Python are not installed."""


class TritonServerError(BackendError):
    """The server failed to start, died, or did not become ready in time."""


# --------------------------------------------------------------------------------------------
# locating the install
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of a Triton install are."""

    root: Path                 # folder holding bin/ and backends/
    binary: Path               # bin/tritonserver
    backends_dir: Path         # backends/ (python/libtriton_python.so, ...)
    stubs_dir: Path | None     # python_backend_stubs/ with 3.X/triton_python_backend_stub (pytriton wheel)
    libs_dir: Path | None      # shared libraries to put on LD_LIBRARY_PATH (nvidia_pytriton.libs)

    def stub_for(self, version: tuple[int, int] | None = None) -> Path:
        """The ``triton_python_backend_stub`` built for CPython ``version`` (default: this one)."""
        major, minor = version or sys.version_info[:2]
        tag = f"{major}.{minor}"
        candidates = []
        if self.stubs_dir is not None:
            candidates.append(self.stubs_dir / tag / "triton_python_backend_stub")
        candidates.append(self.backends_dir / "python" / "triton_python_backend_stub")
        for c in candidates:
            if c.is_file():
                return c
        have = sorted(p.name for p in self.stubs_dir.iterdir()) if self.stubs_dir and self.stubs_dir.is_dir() else []
        raise TritonUnavailableError(
            f"no Triton python-backend stub for Python {tag} in {self.root}"
            + (f" (stubs exist for {', '.join(have)})" if have else "")
            + "; run the server from an interpreter of a supported version, or " + INSTALL_HINT)


def _pytriton_root() -> Path | None:
    """The installed ``pytriton`` package folder, found without importing it."""
    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_triton(home: str | os.PathLike | None = None) -> TritonInstall:
    """Locate ``tritonserver``: ``home`` (or ``$SEGLLM_TRITON_HOME``), else the ``nvidia-pytriton`` wheel.

    Raises :class:`TritonUnavailableError` naming what is missing and how to install it.
    """
    home = home or os.environ.get(ENV_TRITON_HOME)
    if home:
        root = Path(home)
        binary = root / "bin" / "tritonserver"
        if not binary.is_file():
            raise TritonUnavailableError(f"{binary} does not exist ({ENV_TRITON_HOME}={home}); " + INSTALL_HINT)
        stubs = root / "python_backend_stubs"
        return TritonInstall(root=root, binary=binary, backends_dir=root / "backends",
                             stubs_dir=stubs if stubs.is_dir() else None,
                             libs_dir=root / "lib" if (root / "lib").is_dir() else None)

    pkg = _pytriton_root()
    if pkg is None:
        raise TritonUnavailableError("the Triton Inference Server binary is not installed (no `pytriton` "
                                     "package in this environment); " + INSTALL_HINT)
    root = pkg / "tritonserver"
    binary = root / "bin" / "tritonserver"
    backends = root / "backends"
    missing = [p for p in (binary, backends / "python" / "libtriton_python.so") if not p.is_file()]
    if missing:
        raise TritonUnavailableError(f"the pytriton install at {pkg} is incomplete (missing "
                                     f"{', '.join(map(str, missing))}); reinstall: " + INSTALL_HINT)
    libs = pkg.parent / "nvidia_pytriton.libs"
    return TritonInstall(root=root, binary=binary, backends_dir=backends,
                         stubs_dir=root / "python_backend_stubs",
                         libs_dir=libs if libs.is_dir() else None)


# --------------------------------------------------------------------------------------------
# preparing the backends folder and the stub's interpreter
# --------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "segllm_edge" / "triton"


def interpreter_libpython() -> Path | None:
    """The running interpreter's shared ``libpython3.X.so.1.0``, or None for a static build."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    name = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    for d in (sysconfig.get_config_var("LIBDIR"), os.path.join(sys.base_prefix, "lib")):
        if d and name and os.path.isfile(os.path.join(d, name)):
            return Path(os.path.realpath(os.path.join(d, name)))
    return None


@dataclass(frozen=True)
class BackendSetup:
    """A prepared ``--backend-directory`` and the environment the stub needs."""

    backend_dir: Path                  # pass as --backend-directory
    ld_library_path: tuple[str, ...]   # prepend to LD_LIBRARY_PATH
    path: tuple[str, ...]              # prepend to PATH (the `python3` the stub takes its prefix from)
    python: str                        # "3.11"
    libpython: Path | None             # the libpython the stub will load (None: the system's)


def _file_key(p: Path) -> str:
    st = p.stat()
    return f"{p}:{st.st_size}:{int(st.st_mtime)}"


def prepare_backends(install: TritonInstall | None = None, cache_dir: str | os.PathLike | None = None,
                     python_executable: str | None = None) -> BackendSetup:
    """Build (once, cached) a backends folder whose python backend has this Python's stub.

    The folder is keyed by the install, the stub and the interpreter, and created atomically,
    so parallel test processes can share the cache.
    """
    install = install or find_triton()
    exe = python_executable or sys.executable
    stub = install.stub_for()
    libpython = interpreter_libpython()
    tag = f"{sys.version_info[0]}.{sys.version_info[1]}"

    key_src = "|".join([_file_key(install.binary), _file_key(stub), sys.version, exe, str(libpython)])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    target = Path(cache_dir or default_cache_dir()) / f"py{tag}-{key}"

    if not (target / "backends" / "python" / "triton_python_backend_stub").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            shutil.copytree(install.backends_dir, tmp / "backends", symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
            dst = tmp / "backends" / "python" / "triton_python_backend_stub"
            if not dst.exists():
                shutil.copy2(stub, dst)
            dst.chmod(0o755)
            (tmp / "lib").mkdir()
            if libpython is not None:
                soname = sysconfig.get_config_var("INSTSONAME") or libpython.name
                (tmp / "lib" / soname).symlink_to(libpython)
            (tmp / "SOURCE").write_text(key_src + "\n")
            try:
                os.rename(tmp, target)
            except OSError:          # another process won the race: use its folder
                if not (target / "backends" / "python" / "triton_python_backend_stub").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    ld = [str(target / "lib")] if libpython is not None else []
    if install.libs_dir is not None:
        ld.append(str(install.libs_dir))
    return BackendSetup(backend_dir=target / "backends", ld_library_path=tuple(ld),
                        path=(str(Path(exe).parent),), python=tag, libpython=libpython)


def server_environment(setup: BackendSetup, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the server (and so every stub it launches) runs with."""
    env = dict(os.environ if base is None else base)
    for var in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP"):   # the stub ignores them; keep logs honest
        env.pop(var, None)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*setup.ld_library_path, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    rest = (env.get("PATH") or "/usr/local/bin:/usr/bin:/bin").split(os.pathsep)
    env["PATH"] = os.pathsep.join([*setup.path, *(p for p in rest if p not in setup.path)])
    return env


# --------------------------------------------------------------------------------------------
# the server
# --------------------------------------------------------------------------------------------
def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something already listens on (or holds) ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # TIME_WAIT leftovers are not "in use"
        try:
            s.bind((host if host not in ("", "0.0.0.0") else "0.0.0.0", port))
        except OSError:
            return True
    return False


#: the process-group watchdog: when the process that started tritonserver dies (even by SIGKILL),
#: it kills tritonserver's whole process group (the server and its python-backend stubs), itself included
WATCHDOG = """
import os, signal, sys, time
parent, pgid = int(sys.argv[1]), int(sys.argv[2])
while True:
    try:
        os.kill(parent, 0)
        os.killpg(pgid, 0)
    except ProcessLookupError:
        break
    if os.getppid() != parent:
        break
    time.sleep(0.5)
try:
    os.killpg(pgid, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def _die_with_parent() -> None:
    """In the child before exec: own process group (same session, so the watchdog can join it), and SIGKILL
    when the parent -- the thread that started it -- dies (Linux prctl; start servers from a long-lived thread)."""
    os.setpgid(0, 0)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_GPU_NOISE = ("CudaDriverHelper", "NVML", "DCGM", "CUDA")

_LIVE: "weakref.WeakSet[TritonServer]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:  # a crashed test must not leave a server (and its stubs) behind
    for server in list(_LIVE):
        try:
            server.stop(timeout=5)
        except Exception:
            pass


def check_numpy_for_stub(numpy_version: str | None = None, environ=None) -> None:
    """The stubs run this interpreter's numpy: numpy 2 with a stub older than Triton 2.52 fails here, before
    anything starts, with the fix, instead of at every model's load (docs/numpy.md)."""
    from .pystub import StubEnvironmentError, check_stub_environment

    try:
        check_stub_environment(environ=environ, numpy_version=numpy_version)
    except StubEnvironmentError as exc:
        raise TritonServerError(f"{exc} (serving needs a numpy-1 environment: pip install 'segllm-edge[serve]' "
                                "pins numpy<2; see docs/numpy.md)") from None


class TritonServer:
    """One ``tritonserver`` process.

    ``TritonServer(repo)`` then ``start()`` + ``wait_ready()``, or use it as a context manager
    (``__enter__`` starts it if needed and waits until ready, ``__exit__`` stops it).
    Ports left as None are chosen free.  The server's stdout/stderr (including the stubs'
    output) go to ``log_path``.  ``secrets`` (name -> value) fill the placeholders
    (:func:`segllm_edge.serving.argv_secrets.placeholder`) in ``extra_args`` inside the server, so that no
    key is on its command line.
    """

    def __init__(self, model_repository: str | os.PathLike | None = None, *, http_port: int | None = None,
                 grpc_port: int | None = None, metrics_port: int | None = None, extra_args: Sequence[str] = (),
                 address: str = "127.0.0.1", log_path: str | os.PathLike | None = None, log_verbose: int = 0,
                 install: TritonInstall | None = None, cache_dir: str | os.PathLike | None = None,
                 ready_timeout: float = 60.0, abort_retries: int = 1, secrets: Mapping[str, str] | None = None):
        self.model_repository = model_repository
        # tritonserver (its gRPC poller) now and then aborts at start-up (SIGABRT, "epoll_wait error: Bad file
        # descriptor") before it serves anything: wait_ready() starts it again this many times.  A server that
        # exits with a code (a broken model, a busy port) is never retried.
        self.abort_retries = abort_retries
        self._start_args: tuple = ()
        self._aborts_left = 0
        self._ports = (http_port, grpc_port, metrics_port)
        self.extra_args = tuple(extra_args)
        # values of the placeholders in the arguments (argv_secrets): they go to the server's environment only
        self._secrets = dict(secrets or {})
        self.address = address
        self.log_verbose = log_verbose
        self.ready_timeout = ready_timeout
        self._install = install
        self._cache_dir = cache_dir
        self._log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self.http_port = self.grpc_port = self.metrics_port = None
        self.command: list[str] = []
        self.env: dict[str, str] = {}
        self.started_at: float | None = None
        self.ready_after_s: float | None = None   # start() -> ready, measured by wait_ready()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, model_repository: str | os.PathLike | None = None, http_port: int | None = None,
              grpc_port: int | None = None, metrics_port: int | None = None,
              extra_args: Iterable[str] = ()) -> "TritonServer":
        """Launch the server (does not wait; call :meth:`wait_ready`). Returns self."""
        self._start_args = (model_repository, http_port, grpc_port, metrics_port, tuple(extra_args))
        self._aborts_left = self.abort_retries
        return self._launch(*self._start_args)

    def _launch(self, model_repository, http_port, grpc_port, metrics_port, extra_args) -> "TritonServer":
        if self.is_alive():
            raise TritonServerError(f"server already running (pid {self.pid})")
        repo = model_repository or self.model_repository
        if repo is None:
            raise ValueError("no model_repository given")
        repo = Path(repo).resolve()
        if not repo.is_dir():
            raise TritonServerError(f"model repository {repo} is not a folder")
        self.model_repository = repo
        check_numpy_for_stub()
        install = self._install or find_triton()
        setup = prepare_backends(install, self._cache_dir)

        wanted = (http_port or self._ports[0], grpc_port or self._ports[1], metrics_port or self._ports[2])
        busy = [f"{p}" for p in wanted if p is not None and port_in_use(p, self.address)]
        if busy:
            raise TritonServerError(f"port {', '.join(busy)} on {self.address} is already in use (another server "
                                    "running?); stop it or choose other ports")
        ports: list[int] = []
        for p in wanted:
            while p is None or p in ports:
                p = free_port(self.address if self.address != "0.0.0.0" else "127.0.0.1")
            ports.append(p)
        self.http_port, self.grpc_port, self.metrics_port = ports

        if self._log_path is None:
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self._log_path = Path(name)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)

        self.command = [
            str(install.binary),
            f"--model-repository={repo}",
            f"--backend-directory={setup.backend_dir}",
            f"--http-address={self.address}", f"--http-port={self.http_port}",
            f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args, *extra_args,
        ]
        self.env = server_environment(setup)
        self._log_file = open(self._log_path, "ab")
        self.started_at = time.monotonic()
        self.ready_after_s = None
        # own session/process group: stop() can take the stub processes down with the server; the server gets
        # SIGKILL if this process dies, and a watchdog in its group kills the stubs then too (kill -9 included)
        env = launch_environment(self.env, self._secrets, Path(self._cache_dir or default_cache_dir()))
        self._proc = subprocess.Popen(self.command, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        pgid = self._proc.pid
        self._watchdog = subprocess.Popen([sys.executable, "-I", "-S", "-c", WATCHDOG, str(os.getpid()), str(pgid)],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          preexec_fn=lambda: os.setpgid(0, pgid))
        _LIVE.add(self)
        return self

    def wait_ready(self, timeout: float | None = None) -> float:
        """Poll ``/v2/health/ready`` until it answers 200; return seconds since :meth:`start`.

        Raises :class:`TritonServerError` with the log's tail if the process exits or the timeout passes.
        """
        if self._proc is None:
            raise TritonServerError("server not started")
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            url = f"http://{self._client_host}:{self.http_port}/v2/health/ready"   # a restart may change the port
            code = self._proc.poll()
            if code is not None and code < 0 and self._aborts_left > 0 and self._proc is not None:
                self._aborts_left -= 1
                self._note_restart(code)
                deadline = time.monotonic() + timeout
                continue
            if code is not None:
                raise TritonServerError(f"tritonserver exited with code {code} before becoming ready"
                                        f"{self._errors_summary()}; log {self._log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1.0) as r:
                    if r.status == 200:
                        self.ready_after_s = time.monotonic() - (self.started_at or 0.0)
                        return self.ready_after_s
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise TritonServerError(f"tritonserver not ready after {timeout:.0f} s{self._errors_summary()}; "
                                        f"log {self._log_path}:\n{tail}")
            time.sleep(0.1)

    def _note_restart(self, code: int) -> None:
        """The server died from a signal before it was ready: clean up and launch it again (same arguments)."""
        self.stop()
        with open(self._log_path, "ab") as log:
            log.write(f"\n[segllm-edge] tritonserver killed by signal {-code} before ready; starting it again\n"
                      .encode())
        self._launch(*self._start_args)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL (to the whole process group) after ``timeout`` s. Returns the exit code."""
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    code = proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._killpg(proc.pid)
                    code = proc.wait(timeout=10)
            else:
                code = proc.returncode
            self._killpg(proc.pid)   # stubs left behind by a crashed server (and the watchdog)
            watchdog = getattr(self, "_watchdog", None)
            if watchdog is not None:
                watchdog.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _LIVE.discard(self)
        return code

    @staticmethod
    def _killpg(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> "TritonServer":
        if not self.is_alive():
            self.start()
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):  # pragma: no cover - best effort
        try:
            if self.is_alive():
                self.stop(timeout=5)
        except Exception:
            pass

    # -- information ---------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def http_url(self) -> str:
        """``host:port`` as tritonclient.http expects it."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def log_tail(self, lines: int = 60) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        data = self._log_path.read_bytes()[-64 * 1024:].decode("utf-8", "replace")
        return "\n".join(data.splitlines()[-lines:])

    def errors(self) -> list[str]:
        """The log's error lines, minus the GPU noise a CPU-only machine always produces."""
        if self._log_path is None or not self._log_path.exists():
            return []
        out = []
        for line in self._log_path.read_text("utf-8", "replace").splitlines():
            if line.startswith("E") and not any(n in line for n in _GPU_NOISE):
                out.append(line.split("] ", 1)[-1].split("\\n", 1)[0].strip('"'))
        return out

    def _errors_summary(self) -> str:
        errs = self.errors()
        return (": " + " | ".join(errs[:5])) if errs else ""

    def memory(self) -> dict[str, int]:
        """Memory in bytes: ``server`` / ``stubs`` resident (RSS: tritonserver, its python-backend stub
        processes), ``server_pss`` / ``stubs_pss`` / ``pss`` proportional (PSS, ``/proc/PID/smaps_rollup``:
        shared pages divided among the processes sharing them, so the sum over processes is what they hold)."""
        if not self.is_alive():
            raise TritonServerError("server not running")
        pid = self.pid
        kids = _descendants(pid)
        server_pss, stubs_pss = _pss(pid), sum(_pss(k) for k in kids)
        return {"server": _rss(pid), "stubs": sum(_rss(k) for k in kids), "stub_count": len(kids),
                "server_pss": server_pss, "stubs_pss": stubs_pss, "pss": server_pss + stubs_pss}

    def process_memory(self) -> list[dict]:
        """Per process (tritonserver, then each stub named by its model folder): ``pid``, ``model``, ``rss``, ``pss``."""
        if not self.is_alive():
            raise TritonServerError("server not running")
        out = []
        for p in [self.pid, *_descendants(self.pid)]:
            out.append({"pid": p, "model": "tritonserver" if p == self.pid else _stub_model(p),
                        "rss": _rss(p), "pss": _pss(p)})
        return out


def _rss(pid: int) -> int:
    """0 when the process is gone."""
    return kib_field(f"/proc/{pid}/status", "VmRSS") or 0


def _pss(pid: int) -> int:
    return kib_field(f"/proc/{pid}/smaps_rollup", "Pss") or 0


def _stub_model(pid: int) -> str:
    """The model folder a python-backend stub serves (its first argument is ``<repo>/<model>/<version>/model.py``)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    path = next((a.decode(errors="replace") for a in args[1:] if a.endswith(b".py")), "")
    parts = Path(path).parts
    return parts[-3] if len(parts) >= 3 else (Path(args[0].decode(errors="replace")).name if args else "?")


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in parents.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m segllm_edge.serving REPO``: run the server in the foreground, set up
    exactly as :class:`TritonServer` does (``--print-env`` shows the command and environment instead)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m segllm_edge.serving", description=main.__doc__)
    ap.add_argument("model_repository")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--address", default="127.0.0.1", help="default 127.0.0.1 (as `segllm-edge serve`); 0.0.0.0: all")
    ap.add_argument("--print-env", action="store_true", help="print the command line and environment, do not run")
    ap.add_argument("extra", nargs="*", help="more tritonserver arguments (after --)")
    a = ap.parse_args(argv)
    install = find_triton()
    setup = prepare_backends(install)
    env = server_environment(setup)
    cmd = [str(install.binary), f"--model-repository={Path(a.model_repository).resolve()}",
           f"--backend-directory={setup.backend_dir}", f"--http-address={a.address}", f"--http-port={a.http_port}",
           f"--grpc-address={a.address}", f"--grpc-port={a.grpc_port}", f"--metrics-address={a.address}",
           f"--metrics-port={a.metrics_port}", "--allow-gpu-metrics=false", *a.extra]
    if a.print_env:
        import shlex
        print(f"PATH={shlex.quote(env['PATH'])} LD_LIBRARY_PATH={shlex.quote(env['LD_LIBRARY_PATH'])} \\\n  "
              + " ".join(shlex.quote(c) for c in cmd))
        return 0
    os.execve(cmd[0], cmd, env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
