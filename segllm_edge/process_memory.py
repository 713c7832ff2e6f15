"""This process's memory: give freed heap back, the memory available, the running peak (plain Python; Linux
figures, None elsewhere). Used by the exporter's drift report and the runtime's one-graph-at-a-time loading."""
from __future__ import annotations

import functools
from pathlib import Path


@functools.lru_cache(maxsize=1)
def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc keeps freed blocks below its mmap threshold in its
    heaps until ``malloc_trim``, and they count as resident; a no-op elsewhere)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc keeps it otherwise, and it counts as resident)."""
    import gc

    gc.collect()
    trim_heap()


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    return kib_field("/proc/meminfo", "MemAvailable")


def max_rss() -> int | None:
    """This process's peak resident set size so far, in bytes (None where resource is unavailable)."""
    try:
        import resource
    except ImportError:
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def kib_field(path: str, key: str) -> int | None:
    """A ``key: N kB`` line of a /proc file, in bytes."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
