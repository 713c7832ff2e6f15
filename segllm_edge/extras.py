"""Which optional extra a feature needs, checked before it is used (one line, no traceback)."""
from __future__ import annotations

import importlib.util

from .errors import BackendError


def require_export_extra(what: str) -> None:
    """BackendError naming the ``[export]`` extra unless torch and transformers are importable."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendError(f"{what} needs {' and '.join(missing)}: pip install 'segllm-edge[export]' "
                           "(running an export needs only [cpu] or [gpu])")
