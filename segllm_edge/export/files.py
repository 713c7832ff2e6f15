"""The files of an export folder on disk: graph sizes, writing a graph (with its external data) in place."""
from __future__ import annotations

import os
from pathlib import Path


def data_file(path: Path) -> Path:
    """The external-data file of a graph (``<graph>.onnx.data``), whether it exists or not."""
    return path.with_name(path.name + ".data")


def has_external_data(path: Path) -> bool:
    return data_file(path).exists()


def graph_sizes(folder: Path, manifest) -> dict[str, int]:
    """Bytes on disk per manifest graph, external data included."""
    sizes = {}
    for name, g in manifest.graphs.items():
        p = Path(folder) / g.file
        data = data_file(p)
        sizes[name] = p.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return sizes


def match_mode(path: Path) -> None:
    """Give the external-data file the graph file's permission bits (onnx writes it 0600; the exporter 0644)."""
    data = data_file(path)
    if data.exists():
        os.chmod(data, path.stat().st_mode & 0o777)


def save_graph(model, path: Path, external: bool) -> None:
    """Write an ONNX model to ``path``, its weights to ``<path>.data`` when ``external``."""
    import onnx

    data = data_file(path)
    if data.exists():
        data.unlink()
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data.name if external else None)
    match_mode(path)


def replace_graph(tmp: Path, path: Path) -> None:
    """Move a graph written under another name (``tmp``) onto ``path``, external data included."""
    data, tmp_data = data_file(path), data_file(tmp)
    tmp.replace(path)
    if data.exists():
        data.unlink()
    if tmp_data.exists():  # the external data file name is recorded inside the model: rewrite it under the new name
        import onnx

        save_graph(onnx.load(str(path)), path, True)
        tmp_data.unlink()
    match_mode(path)
