"""Shared fixtures. The golden checkpoint is rebuilt from its key list once per test run."""
from __future__ import annotations

import os

# The kernel tests run the Triton kernels on the CPU interpreter. triton reads this when it is first
# imported, and other test modules (the ONNX exporter pulls in triton via torch) may import it first,
# so set it before anything is collected. CPU tensors still take the PyTorch references everywhere
# else (segllm_edge.kernels dispatches to Triton only for CUDA tensors).
os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def golden_ckpt(tmp_path_factory) -> Path:
    """The reference-run fixture's tiny checkpoint (tiny LLM + CLIP, full HIPIE-R50), bit-exact."""
    from segllm_edge.tiny import make_tiny_checkpoint

    out = tmp_path_factory.mktemp("golden_ckpt")
    entries = json.loads((GOLDEN / "state_dict_keys.json").read_text())["keys"]
    make_tiny_checkpoint(out, entries=entries, force=True)
    (out / "config.json").write_text((GOLDEN / "golden_config.json").read_text())
    return out


@pytest.fixture(scope="session")
def golden_state_dict(golden_ckpt):
    from safetensors.torch import load_file

    return load_file(str(golden_ckpt / "model.safetensors"))


@pytest.fixture(scope="session")
def golden_rounds():
    """Trimmed outputs of the research code, per round: ``g[r][key]`` for r in 1..3."""
    data = np.load(GOLDEN / "rounds.npz")
    out = {1: {}, 2: {}, 3: {}}
    for k in data.files:
        r, name = k.split("/", 1)
        v = data[k]
        if name.endswith("_packed"):
            name, v = name[: -len("_packed")], np.unpackbits(v).astype(bool).reshape(1024, 1024)
        out[int(r[1:])][name] = v
    return out


@pytest.fixture(scope="session")
def golden_image() -> Path:
    return GOLDEN / "shapes_a.png"


GOLDEN_QUESTIONS = ("Segment the red circle.", "Segment the blue square next to it.[REF:1]",
                    "Segment the object above instance 2.[REF:2]")


@pytest.fixture(scope="session")
def golden_model(golden_ckpt):
    import segllm_edge

    return segllm_edge.load(golden_ckpt)


@pytest.fixture(scope="session")
def golden_export(golden_ckpt, tmp_path_factory) -> Path:
    """fp32 ONNX export of the golden checkpoint, shared read-only by the export, serving and TensorRT tests.
    SEGLLM_TEST_EXPORT_DIR reuses an existing export (development only; CI always exports)."""
    given = os.environ.get("SEGLLM_TEST_EXPORT_DIR")
    if given and (Path(given) / "manifest.json").is_file():
        return Path(given)
    from segllm_edge.export.onnx_export import export_model

    out = tmp_path_factory.mktemp("export") / "fp32"
    export_model(golden_ckpt, out, progress=False)
    return out


DRIFT_TEST_QUESTIONS = ("Segment the red circle.", "Segment it.[REF:4]")  # round 2 refers to no round: not compared


@pytest.fixture(scope="session")
def golden_export_fp16(golden_export, golden_image, tmp_path_factory) -> Path:
    """The golden export converted to fp16 (fp16 KV cache), shared read-only. Its drift report ran a two-round
    probe (DRIFT_TEST_QUESTIONS) on the golden image: round 1 compared, round 2 unanswerable in both."""
    import shutil

    import segllm_edge
    from segllm_edge.export.quantize import quantize_export

    out = tmp_path_factory.mktemp("export") / "fp16"
    shutil.copytree(golden_export, out)
    quantize_export(out, "fp16", drift_probe=segllm_edge.drift_probe(golden_image, DRIFT_TEST_QUESTIONS),
                    progress=False)
    return out


def pytest_collection_finish(session):
    """Start building the torch-free venv in the background as soon as a test that needs it is selected."""
    if any(item.nodeid.startswith("tests/test_torch_free.py") or "test_torch_free.py" in item.nodeid
           for item in session.items):
        from torch_free import lean_venv

        lean_venv.start()


def pytest_sessionfinish(session, exitstatus):
    import sys

    mod = sys.modules.get("torch_free.lean_venv")
    if mod is not None:
        mod.cleanup()
