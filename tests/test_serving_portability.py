"""Portable repositories and the ngc target's stub-side checks, without a server (the served repository of
tests/test_triton_serving.py is a moved one; see its ``repo`` fixture)."""
from __future__ import annotations

import numpy as np
import pytest

from segllm_edge.errors import BackendError


def test_numpy2_guard_is_keyed_to_the_stub_release():
    from segllm_edge.serving.pystub import StubEnvironmentError, check_stub_environment, stub_supports_numpy2

    assert not stub_supports_numpy2({})                                          # the pytriton wheel: unknown
    assert not stub_supports_numpy2({"TRITON_SERVER_VERSION": "2.51.0"})
    assert stub_supports_numpy2({"TRITON_SERVER_VERSION": "2.52.0"})
    assert stub_supports_numpy2({"NVIDIA_TRITON_SERVER_VERSION": "25.01"})
    assert not stub_supports_numpy2({"NVIDIA_TRITON_SERVER_VERSION": "24.10"})
    with pytest.raises(StubEnvironmentError, match="older than Triton 2.52.*numpy<2"):
        check_stub_environment(environ={}, numpy_version="2.1.3")
    with pytest.raises(StubEnvironmentError, match="TRITON_SERVER_VERSION=2.51.0"):
        check_stub_environment(environ={"TRITON_SERVER_VERSION": "2.51.0"}, numpy_version="2.0.0")
    check_stub_environment(environ={"NVIDIA_TRITON_SERVER_VERSION": "24.11"}, numpy_version="2.1.3")
    check_stub_environment(environ={}, numpy_version="1.26.4")


class _Tensor:
    """What the BLS gets back from ``pb_utils.get_output_tensor_by_name`` (the real one exists only in a stub;
    the CPU case runs for real in the serving tests)."""

    def __init__(self, cpu: bool):
        self.cpu = cpu

    def is_cpu(self):
        return self.cpu

    def as_numpy(self):
        return np.ones(3, np.float32)


def test_bls_reads_only_cpu_outputs_and_says_so_otherwise():
    from segllm_edge.serving.bls import host_array

    assert host_array(_Tensor(cpu=True), "llm", "hidden_states").sum() == 3
    with pytest.raises(BackendError, match="'hidden_states' in GPU memory"):
        host_array(_Tensor(cpu=False), "llm", "hidden_states")
    with pytest.raises(BackendError, match="returned no output 'x'"):
        host_array(None, "llm", "x")


def test_portability_problems_finds_host_paths_and_symlinks(tmp_path):
    from segllm_edge.serving.model_config import portability_problems, read_config
    from segllm_edge.serving.pystub import default_sys_path, write_python_model

    write_python_model(tmp_path, "ok", "pkg.mod:Cls", [("A", "float32", [1])], [("B", "float32", [1])])
    assert portability_problems(tmp_path) == []
    write_python_model(tmp_path, "pinned", "pkg.mod:Cls", [("A", "float32", [1])], [("B", "float32", [1])],
                       sys_path=default_sys_path())
    (tmp_path / "ok" / "1" / "graph.onnx").symlink_to(tmp_path / "pinned" / "1" / "model.py")
    problems = portability_problems(tmp_path)
    assert any("pinned: parameter segllm_sys_path" in p for p in problems)
    assert any("graph.onnx is a symlink" in p for p in problems)
    assert read_config(tmp_path / "pinned").parameters["segllm_python"].string_value   # pinned paths: version too


def test_configs_are_checked_by_tritons_schema(tmp_path):
    from google.protobuf import text_format

    from segllm_edge.serving.pystub import write_python_model

    with pytest.raises(text_format.ParseError, match="no_such_field"):
        write_python_model(tmp_path, "m", "pkg.mod:Cls", [("A", "float32", [1])], [("B", "float32", [1])],
                           extra_config="no_such_field: 1")
