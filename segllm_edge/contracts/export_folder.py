"""Opening an export folder: the one place that reads and validates its manifest, files and token-embedding
table. The onnxruntime and TensorRT backends, the Triton models and the TensorRT builder all open exports here."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .manifest import MANIFEST_NAME, Manifest
from .model_info import ModelInfo


def is_export(path: str | Path) -> bool:
    """True when ``path`` is an export folder (it has a manifest)."""
    return (Path(path) / MANIFEST_NAME).is_file()


@dataclass(frozen=True)
class ExportFolder:
    folder: Path
    manifest: Manifest
    info: ModelInfo

    def graph_path(self, name: str) -> Path:
        return self.folder / self.manifest.graphs[name].file

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / self.manifest.tokenizer_dir

    def embed_table(self) -> np.ndarray:
        """The (vocab, H) token-embedding table, memory-mapped."""
        name = self.manifest.arrays["embed_tokens"]
        try:
            return np.load(self.folder / name, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise CheckpointError(f"cannot read {name} in {self.folder}: {exc}") from None


def open_export(path: str | Path) -> ExportFolder:
    """Read and check an export folder: a manifest of this format version naming files that all exist."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"no such export folder: {folder}")
    manifest = Manifest.load(folder)
    manifest.check_files(folder)
    try:
        info = ModelInfo(**manifest.model)
    except TypeError as exc:
        raise CheckpointError(f"{folder / MANIFEST_NAME} has model fields this segllm-edge does not read ({exc}); "
                              "re-export") from None
    return ExportFolder(folder, manifest, info)
