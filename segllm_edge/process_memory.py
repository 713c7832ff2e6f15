"""This process's memory: give freed heap back, the memory available, the running peak (plain Python; Linux
figures, None elsewhere). Used by the exporter's drift report and the runtime's one-graph-at-a-time loading."""
from __future__ import annotations

from pathlib import Path


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise, and it counts as resident)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    return _kib_field("/proc/meminfo", "MemAvailable")


def max_rss() -> int | None:
    """This process's peak resident set size so far, in bytes (None where resource is unavailable)."""
    try:
        import resource
    except ImportError:
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _kib_field(path: str, key: str) -> int | None:
    """A ``key: N kB`` line of a /proc file, in bytes."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
