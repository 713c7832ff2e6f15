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
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def max_rss() -> int | None:
    """This process's peak resident set size so far, in bytes (None where resource is unavailable)."""
    try:
        import resource
    except ImportError:
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def current_rss() -> int | None:
    """This process's resident set size now, in bytes (VmRSS; None where /proc is unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
