"""What a benchmark records about the machine it ran on (shared by the benchmark scripts of this folder)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys


def uptime() -> str:
    """``uptime``'s line (load averages): a ratio from a quiet and a busy machine are different figures."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def host() -> dict:
    from segllm_edge.runtime.cpu_paths import cpu_name

    return {"machine": platform.machine(), "cpu": cpu_name(), "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]}
