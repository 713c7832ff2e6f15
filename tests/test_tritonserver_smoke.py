"""A real Triton Inference Server (from the nvidia-pytriton wheel) serving python-backend models.

Nothing here is skipped: if the tritonserver binary or tritonclient is missing, the tests FAIL
(the project's install step provides both).
"""
from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from segllm_edge.serving import pystub
from segllm_edge.serving.pystub import RequestContext, SequenceError, SequenceStore, write_python_model
from segllm_edge.serving.tritonserver import (TritonServer, TritonServerError, TritonUnavailableError,
                                              find_triton, prepare_backends)

IDLE_US = 5_000_000  # deliberate: Triton's default of 1 s would drop a chat while its user types
# The sequence batcher has max_batch_size x instances slots; with max_batch_size 0 only ONE
# sequence is live at a time and a second START waits in the backlog until the first ends/idles out.
MAX_SEQUENCES = 8

ENSEMBLE = """\
name: "add_then_probe"
platform: "ensemble"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [
  { name: "Z" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "INFO" data_type: TYPE_STRING dims: [ 1 ] }
]
ensemble_scheduling {
  step [
    {
      model_name: "add_one"
      model_version: -1
      input_map { key: "X" value: "X" }
      output_map { key: "Y" value: "y_plus_one" }
    },
    {
      model_name: "package_probe"
      model_version: -1
      input_map { key: "Y" value: "y_plus_one" }
      output_map { key: "Z" value: "Z" }
      output_map { key: "INFO" value: "INFO" }
    }
  ]
}
"""


def make_repository(root):
    m = "segllm_edge.serving.smoke_models"
    write_python_model(root, "add_one", f"{m}:AddOne", [("X", "float32", [-1])], [("Y", "float32", [-1])])
    write_python_model(root, "package_probe", f"{m}:PackageProbe", [("Y", "float32", [-1])],
                       [("Z", "float32", [-1]), ("INFO", "TYPE_STRING", [1])])
    write_python_model(root, "counter", f"{m}:SequenceCounter", [("INCREMENT", "int32", [1])],
                       [("TOTAL", "int64", [1]), ("STEP", "int32", [1])],
                       max_sequence_idle_microseconds=IDLE_US, max_batch_size=MAX_SEQUENCES)
    (root / "add_then_probe" / "1").mkdir(parents=True)
    (root / "add_then_probe" / "config.pbtxt").write_text(ENSEMBLE)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("triton_repo"))
    log = tmp_path_factory.mktemp("triton_log") / "tritonserver.log"
    srv = TritonServer(repo, log_path=log, ready_timeout=60)
    srv.start()
    try:
        ready_s = srv.wait_ready()
        time.sleep(0.5)  # let RSS settle after loading
        mem = srv.memory()
        print(f"\ntritonserver ready after {ready_s:.2f} s; idle RSS server {mem['server'] / 2**20:.0f} MiB, "
              f"{mem['stub_count']} stubs {mem['stubs'] / 2**20:.0f} MiB")
        yield srv
    finally:
        srv.stop()
    assert not srv.is_alive()


@pytest.fixture(scope="module")
def client(server):
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def _infer(client, model, arrays, **kw):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, a in arrays.items():
        t = grpcclient.InferInput(name, list(a.shape), np_to_triton_dtype(a.dtype))
        t.set_data_from_numpy(a)
        inputs.append(t)
    return client.infer(model, inputs, **kw)


def test_server_ready_and_models_loaded(server, client):
    assert server.is_alive()
    assert client.is_server_ready()
    for m in ("add_one", "package_probe", "counter", "add_then_probe"):
        assert client.is_model_ready(m), m


def test_add_one(client):
    x = np.array([0.5, 1.5, -3.0], dtype=np.float32)
    r = _infer(client, "add_one", {"X": x})
    np.testing.assert_array_equal(r.as_numpy("Y"), x + 1)


def test_ensemble_runs_package_inside_stub(client):
    x = np.arange(5, dtype=np.float32)
    r = _infer(client, "add_then_probe", {"X": x})
    np.testing.assert_allclose(r.as_numpy("Z"), (x + 1) * 2)
    info = r.as_numpy("INFO")[0].decode()
    assert info.startswith("segllm_edge ") and "onnxruntime" in info
    assert "numpy 1." in info, info   # numpy 2 breaks the stub's tensor transfer
    # the stub is pinned to this interpreter: same CPython build, same (virtual) environment
    assert f"python {sys.version.split()[0]} prefix {sys.prefix};" in info, info


def test_sequence_state_per_correlation_id(client):
    def step(cid, inc, start=False, end=False):
        r = _infer(client, "counter", {"INCREMENT": np.array([[inc]], dtype=np.int32)},
                   sequence_id=cid, sequence_start=start, sequence_end=end)
        return int(r.as_numpy("TOTAL").item()), int(r.as_numpy("STEP").item())

    t0 = time.monotonic()
    assert step(101, 5, start=True) == (5, 1)
    assert step(202, 100, start=True) == (100, 1)        # a second, interleaved conversation
    assert step(101, 2) == (7, 2)
    assert step(202, 1) == (101, 2)
    assert step(101, 3, end=True) == (10, 3)
    assert step(101, 1, start=True) == (1, 1)            # the id can start over after END
    assert step(101, 0, end=True) == (1, 2)
    assert step(202, 0, end=True) == (101, 3)
    assert time.monotonic() - t0 < IDLE_US / 1e6 / 2   # no request waited for a free sequence slot


def test_unknown_correlation_id_without_start_is_an_error(client):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="(?i)start"):
        _infer(client, "counter", {"INCREMENT": np.array([[1]], dtype=np.int32)}, sequence_id=987654)
    # ... and after END, the same id is unknown again
    _infer(client, "counter", {"INCREMENT": np.array([[1]], dtype=np.int32)}, sequence_id=555,
           sequence_start=True, sequence_end=True)
    with pytest.raises(InferenceServerException, match="(?i)start"):
        _infer(client, "counter", {"INCREMENT": np.array([[1]], dtype=np.int32)}, sequence_id=555)


def test_sequence_idle_timeout_is_the_configured_one(client):
    def step(cid, start=False):
        r = _infer(client, "counter", {"INCREMENT": np.array([[1]], dtype=np.int32)}, sequence_id=cid,
                   sequence_start=start)
        return int(r.as_numpy("STEP").item())

    from tritonclient.utils import InferenceServerException

    assert step(777, start=True) == 1
    time.sleep(1.5)                       # longer than Triton's 1 s default: still alive
    assert step(777) == 2
    time.sleep(IDLE_US / 1e6 + 1.0)       # past the configured idle time: dropped
    with pytest.raises(InferenceServerException, match="(?i)start"):
        step(777)


def test_broken_model_fails_start_with_log_tail(tmp_path):
    repo = tmp_path / "repo"
    write_python_model(repo, "broken", "segllm_edge.serving.no_such_module:Model",
                       [("X", "float32", [-1])], [("Y", "float32", [-1])])
    srv = TritonServer(repo, log_path=tmp_path / "log.txt")
    srv.start()
    with pytest.raises(TritonServerError, match="no_such_module"):
        srv.wait_ready(timeout=30)
    srv.stop()
    assert not srv.is_alive()


def test_stop_terminates_server_and_stubs(tmp_path):
    repo = tmp_path / "repo"
    write_python_model(repo, "add_one", "segllm_edge.serving.smoke_models:AddOne",
                       [("X", "float32", [-1])], [("Y", "float32", [-1])])
    srv = TritonServer(repo, log_path=tmp_path / "log.txt")
    with srv:
        pid = srv.pid
        assert srv.is_alive() and srv.memory()["stub_count"] == 1
    assert not srv.is_alive()
    import os
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- no server needed ----------------------------------------------------------------------
def test_start_that_aborts_before_ready_is_retried_once(tmp_path):
    """tritonserver's gRPC poller now and then aborts at start-up (SIGABRT before ready): started again, once."""
    import dataclasses
    import stat
    from segllm_edge.serving.tritonserver import find_triton
    repo = tmp_path / "repo"
    write_python_model(repo, "add_one", "segllm_edge.serving.smoke_models:AddOne",
                       [("X", "float32", [-1])], [("Y", "float32", [-1])])
    real = find_triton()
    aborts = tmp_path / "aborts"
    aborts.write_text("1")

    def wrapper(n_aborts):
        aborts.write_text(str(n_aborts))
        script = tmp_path / "bin" / "tritonserver"
        script.parent.mkdir(exist_ok=True)
        script.write_text(f"""#!/bin/sh
n=$(cat {aborts}); if [ "$n" -gt 0 ]; then echo $((n-1)) > {aborts}; kill -ABRT $$; fi
exec {real.binary} "$@"
""")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
        return dataclasses.replace(real, binary=script)

    with TritonServer(repo, log_path=tmp_path / "log.txt", install=wrapper(1)) as srv:
        assert srv.is_alive() and srv.memory()["stub_count"] == 1
    assert "killed by signal 6 before ready; starting it again" in (tmp_path / "log.txt").read_text()
    srv = TritonServer(repo, log_path=tmp_path / "log2.txt", install=wrapper(2))   # a second abort is an error
    srv.start()
    with pytest.raises(TritonServerError, match="exited with code -6"):
        srv.wait_ready(timeout=30)
    srv.stop()


def test_binary_found_and_stub_prepared(tmp_path):
    install = find_triton()
    assert install.binary.is_file()
    setup = prepare_backends(install, cache_dir=tmp_path)
    stub = setup.backend_dir / "python" / "triton_python_backend_stub"
    assert stub.is_file() and (setup.backend_dir / "python" / "libtriton_python.so").is_file()
    assert prepare_backends(install, cache_dir=tmp_path) == setup          # cached


def test_missing_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGLLM_TRITON_HOME", str(tmp_path))
    with pytest.raises(TritonUnavailableError, match="pip install nvidia-pytriton"):
        find_triton()


def test_generated_model_config(tmp_path):
    folder = write_python_model(tmp_path, "m", "pkg.mod:Cls", [("A", "float32", [-1, 3])], [("B", "int64", [1])],
                                max_sequence_idle_microseconds=IDLE_US, sys_path=["/x/site-packages"])
    from segllm_edge.serving.model_config import read_config

    cfg = read_config(folder)                      # Triton's own schema
    assert cfg.sequence_batching.max_sequence_idle_microseconds == IDLE_US
    assert cfg.parameters["segllm_sys_path"].string_value == "/x/site-packages"     # opt-in
    assert cfg.parameters["segllm_entrypoint"].string_value == "pkg.mod:Cls"
    plain = read_config(write_python_model(tmp_path, "p", "pkg.mod:Cls", [("A", "float32", [1])], [("B", "int64", [1])]))
    assert set(plain.parameters) == {"segllm_entrypoint"}        # by default: no path of this machine
    assert (folder / "1" / "model.py").read_text() == pystub.MODEL_PY
    compile(pystub.MODEL_PY, "model.py", "exec")


def test_sequence_store_logic_without_triton():
    now = [0.0]
    store = SequenceStore(dict, idle_timeout_s=5.0, clock=lambda: now[0])
    with pytest.raises(SequenceError):
        store.enter(RequestContext(correlation_id=1))
    s = store.enter(RequestContext(correlation_id=1, sequence_start=True))
    s["n"] = 1
    assert store.enter(RequestContext(correlation_id=1)) == {"n": 1}
    now[0] = 10.0                                                   # idled out
    with pytest.raises(SequenceError):
        store.enter(RequestContext(correlation_id=1))
    store.enter(RequestContext(correlation_id=2, sequence_start=True))
    store.leave(RequestContext(correlation_id=2, sequence_end=True))
    assert 2 not in store


def test_models_run_without_triton():
    from segllm_edge.serving.smoke_models import AddOne, SequenceCounter

    m = AddOne()
    m.setup({"name": "add_one", "output": [{"name": "Y", "data_type": "TYPE_FP32"}]})
    np.testing.assert_array_equal(m.infer({"X": np.zeros(2, np.float32)}, RequestContext())["Y"], [1, 1])
    c = SequenceCounter()
    c.setup({"sequence_batching": {"max_sequence_idle_microseconds": str(IDLE_US)}})
    out = c.infer({"INCREMENT": np.array([3])}, RequestContext(correlation_id=7, sequence_start=True))
    assert int(out["TOTAL"][0]) == 3


# -- `segllm-edge serve`: busy port, API key, TLS, admin protocols, kill -9 (issue 11) -----------
def _cert(tmp_path):
    import subprocess

    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


def _serve(args, tmp_path, env=None):
    import os
    import subprocess

    env = {**os.environ, "SEGLLM_TRITON_CACHE": str(tmp_path / "cache"), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "segllm_edge", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _wait_line(proc, prefix, timeout=120):
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError("".join(lines))


def test_serve_api_key_tls_admin_busy_port_and_kill_9(tmp_path):
    import os
    import signal

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from segllm_edge.serving.tritonserver import _descendants, free_port

    repo = tmp_path / "repo"
    write_python_model(repo, "add_one", "segllm_edge.serving.smoke_models:AddOne",
                       [("X", "float32", [-1])], [("Y", "float32", [-1])])
    cert, key = _cert(tmp_path)
    ports = [str(free_port()) for _ in range(3)]
    port_args = ["--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
    api_key, admin_key = "s3cret-api-7f3a", "s3cret-admin-c41d"
    admin_file = tmp_path / "admin.key"
    admin_file.write_text(admin_key + "\n")
    admin_file.chmod(0o644)
    args = ["--export", str(tmp_path), "--repo", str(repo), *port_args, "--admin-key-file", str(admin_file),
            "--tls-cert", str(cert), "--tls-key", str(key), "--log", str(tmp_path / "triton.log")]
    refused = _serve(args, tmp_path, env={"SEGLLM_API_KEY": api_key})   # a key file others can read: refused
    out, _ = refused.communicate(timeout=60)
    assert refused.returncode != 0 and "readable by other users" in out and "chmod 600" in out, out
    admin_file.chmod(0o600)
    proc = _serve(args, tmp_path, env={"SEGLLM_API_KEY": api_key})
    try:
        _wait_line(proc, "ready in")
        kids = _descendants(proc.pid)
        assert len(kids) >= 2, kids                       # tritonserver (+ watchdog) and the stub
        # no key on any process's command line (ps); the stubs do not inherit the keys either
        for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
            try:
                cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            except OSError:
                continue
            assert api_key.encode() not in cmdline and admin_key.encode() not in cmdline, (pid, cmdline)
        stubs = [k for k in kids if b"python_backend_stub" in open(f"/proc/{k}/cmdline", "rb").read()]
        assert stubs, kids
        for k in stubs:
            environ = open(f"/proc/{k}/environ", "rb").read()
            assert b"SEGLLM_ARGV_SECRET" not in environ and admin_key.encode() not in environ
        url = f"127.0.0.1:{ports[1]}"
        c = grpcclient.InferenceServerClient(url, ssl=True, root_certificates=str(cert))
        x = np.ones(3, np.float32)
        with pytest.raises(InferenceServerException, match="(?i)segllm-api-key|unauthenticated|restricted"):
            _infer(c, "add_one", {"X": x})                # no key: refused
        from segllm_edge.serving.security import grpc_headers

        key_h = grpc_headers(api_key)
        r = _infer(c, "add_one", {"X": x}, headers=key_h)   # the key from the environment opens inference
        np.testing.assert_array_equal(r.as_numpy("Y"), x + 1)
        with pytest.raises(InferenceServerException):     # shared memory registration: admin only
            c.register_system_shared_memory("r", "/segllm-test", 64, headers=key_h)
        with pytest.raises(InferenceServerException, match="(?i)restricted|segllm-admin-key"):
            c.get_inference_statistics("add_one", headers=key_h)
        from segllm_edge.serving.security import ADMIN_KEY_HEADER, GRPC_HEADER_PREFIX

        stats = c.get_inference_statistics("add_one", headers={GRPC_HEADER_PREFIX + ADMIN_KEY_HEADER: admin_key},
                                           as_json=True)   # the key from the file opens the admin protocols
        assert stats["model_stats"][0]["name"] == "add_one"
        with pytest.raises(InferenceServerException):     # plaintext gRPC on the TLS port: no answer
            grpcclient.InferenceServerClient(url).is_server_live(client_timeout=5)
        c.close()

        # a second serve on the same ports: refused at once, never "ready"
        second = _serve(args, tmp_path, env={"SEGLLM_API_KEY": api_key})
        out, _ = second.communicate(timeout=60)
        assert second.returncode != 0 and "already in use" in out and "\nready in" not in "\n" + out, out
        assert [ln for ln in out.splitlines() if ln.strip()][-1].startswith("Error: ")

        # kill -9 of serve: tritonserver and its stubs die with it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        alive = kids
        while alive and time.monotonic() < deadline:
            time.sleep(0.5)
            alive = [k for k in kids if _alive(k)]
        assert not alive, f"left behind after kill -9: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:   # a zombie (not yet reaped by init) counts as dead
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_one_default_address_everywhere(tmp_path, capsys):
    """`python -m segllm_edge.serving` and `segllm-edge serve` both default to loopback (finding 9)."""
    from segllm_edge.serving.cli import serve_command
    from segllm_edge.serving.tritonserver import TritonServer, main

    assert main([str(tmp_path), "--print-env"]) == 0
    cmd = capsys.readouterr().out
    assert "--grpc-address=127.0.0.1" in cmd and "--http-address=127.0.0.1" in cmd and "0.0.0.0" not in cmd
    assert next(p for p in serve_command.params if p.name == "address").default == "127.0.0.1"
    assert TritonServer(tmp_path).address == "127.0.0.1"
