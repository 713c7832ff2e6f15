"""numpy 2 (issue 24 item 2): only serving keeps numpy < 2, and only because of the bundled Triton's stub.

`make test` runs this file twice: in the numpy-1 venv with the rest of the suite, and in the numpy-2 venv
(`make test-numpy2`, docs/numpy.md), where the client test talks to a server started from the numpy-1 venv
(``SEGLLM_SERVE_PYTHON``): a numpy-2 export and a numpy-2 client against a numpy-1 server.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMPY2 = int(np.__version__.split(".")[0]) >= 2


def _numpy_specs(requirements: list[str]) -> list[str]:
    return [r for r in requirements if re.match(r"numpy\b", r)]


def test_only_serving_caps_numpy_below_2():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = _numpy_specs(project["dependencies"])
    assert base and not any("<2" in r for r in base), base        # running an export takes numpy 2
    extras = project["optional-dependencies"]
    capped = sorted(name for name, reqs in extras.items() if any("<2" in r for r in _numpy_specs(reqs)))
    assert capped == ["serve"], capped                             # the stub's environment only
    assert not any(r.startswith("ml-dtypes") and "<0.6" in r for r in extras["export"]), extras["export"]
    assert any(r.startswith("tritonclient") for r in extras["client"]), extras["client"]


def test_server_with_numpy2_refused_before_it_starts(tmp_path, monkeypatch):
    from segllm_edge.serving.tritonserver import TritonServer, TritonServerError, check_numpy_for_stub

    with pytest.raises(TritonServerError, match=r"numpy 2\.1\.0.*older than Triton 2\.52.*docs/numpy\.md"):
        check_numpy_for_stub(numpy_version="2.1.0", environ={})
    check_numpy_for_stub(numpy_version="2.1.0", environ={"TRITON_SERVER_VERSION": "2.53.0"})   # a newer Triton
    check_numpy_for_stub(numpy_version="1.26.4", environ={})
    monkeypatch.setattr(np, "__version__", "2.1.0")    # what the stub would import: refused, nothing launched
    repo = tmp_path / "repo"
    repo.mkdir()
    server = TritonServer(repo)
    with pytest.raises(TritonServerError, match="docs/numpy.md"):
        server.start()
    assert not server.is_alive()


def test_client_against_a_server_in_another_environment(golden_export, golden_image, tmp_path):
    """A round over gRPC from this interpreter to `serve` run by ``SEGLLM_SERVE_PYTHON`` (the numpy-1 venv in
    `make test-numpy2`) equals the same round run here on the export."""
    import segllm_edge
    import segllm_edge.client as sc
    from segllm_edge.serving.models import decode_image_bytes
    from segllm_edge.serving.tritonserver import free_port

    serve_python = os.environ.get("SEGLLM_SERVE_PYTHON") or sys.executable
    server_numpy = subprocess.run([serve_python, "-c", "import numpy; print(numpy.__version__)"], capture_output=True,
                                  text=True, check=True).stdout.strip()
    if NUMPY2 and int(server_numpy.split(".")[0]) >= 2:
        pytest.fail(f"numpy 2 here and numpy {server_numpy} for the server ({serve_python}): SEGLLM_SERVE_PYTHON must "
                    "be a numpy-1 interpreter with [serve] (`make test` sets it)")
    ports = [free_port() for _ in range(3)]
    env = {**os.environ, "SEGLLM_TRITON_CACHE": str(tmp_path / "cache")}
    cmd = [serve_python, "-m", "segllm_edge", "serve", "--export", str(golden_export), "--http-port", str(ports[0]),
           "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--log", str(tmp_path / "triton.log")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any(line.startswith("ready in") for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        assert any(line.startswith("ready in") for line in lines), "".join(lines)
        question, png = "Segment the red circle.", golden_image.read_bytes()
        with sc.connect(f"127.0.0.1:{ports[1]}") as client:
            remote = client.session(png).ask(question)
        local = segllm_edge.load(golden_export, backend="onnxruntime").session(decode_image_bytes(png)).ask(question)
        assert remote.mask.dtype == bool and remote.mask.shape == local.mask.shape
        assert np.array_equal(remote.mask, local.mask), (int(remote.mask.sum()), int(local.mask.sum()))
        np.testing.assert_allclose(remote.box, local.box, atol=1e-3)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
