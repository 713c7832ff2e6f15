"""Secrets for programs that only take them as flags, kept off their command line.

tritonserver takes its restricted-protocol keys only as ``--grpc-restricted-protocol=...:header=KEY``
and ``--http-restricted-api=...``; on a command line they are readable by every local user
(``ps``, ``/proc/<pid>/cmdline``). Here the command gets a placeholder (:func:`placeholder`) and the key
travels in the environment, which only the server's own user can read (``/proc/<pid>/environ`` is mode
0400). A small preload library (``argv_secrets.c``, compiled once per machine into the cache folder with
the system C compiler) replaces the placeholders in the argv that ``main()`` receives, then removes the
secret variables and itself from the environment so the python-backend stubs inherit neither.

If the library were not applied the server would see the literal placeholder as its key, which no
client can send: a mistake closes the server, it never opens it.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping

from ..errors import ConfigError

SOURCE = Path(__file__).with_name("argv_secrets.c")
#: environment names of the secrets (one per secret, numbered)
ENV_PREFIX = "SEGLLM_ARGV_SECRET_"


def placeholder(name: str) -> str:
    """The text standing in a command-line argument for the secret in ``$name``."""
    return f"@@SEGLLM_SECRET:{name}@@"


def compiler() -> str | None:
    """The C compiler used to build the preload library (``$CC``, else cc or gcc)."""
    for cc in filter(None, (os.environ.get("CC"), "cc", "gcc")):
        if shutil.which(cc):
            return cc
    return None


def shim_library(cache_dir: Path) -> Path:
    """The compiled preload library (built on first use; cached by the source's hash)."""
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + platform.machine().encode()).hexdigest()[:16]
    lib = Path(cache_dir) / "argv_secrets" / f"argv_secrets-{tag}.so"
    if lib.is_file():
        return lib
    cc = compiler()
    if cc is None:
        raise ConfigError("keeping the server's keys off its command line needs a C compiler to build a small "
                          "preload library once (install gcc: apt-get install gcc libc6-dev, or set $CC)")
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=lib.parent, suffix=".so")
    os.close(fd)
    try:
        run = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", tmp, str(SOURCE), "-ldl"],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise ConfigError(f"building the argv_secrets preload library with {cc} failed:\n{run.stderr[-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def launch_environment(env: Mapping[str, str], secrets: Mapping[str, str], cache_dir: Path) -> dict[str, str]:
    """``env`` plus ``secrets`` and the preload library that expands their placeholders (``env`` itself when
    there are no secrets)."""
    out = dict(env)
    if not secrets:
        return out
    bad = [k for k in secrets if not k.startswith(ENV_PREFIX)]
    if bad:
        raise ConfigError(f"secret names must start with {ENV_PREFIX}: {bad}")
    out.update(secrets)
    lib = str(shim_library(cache_dir))
    out["LD_PRELOAD"] = ":".join(filter(None, [lib, env.get("LD_PRELOAD")]))
    return out
