"""Session save/restore (segllm_edge.runtime.session_state) and the state stores (serving.state_store).

In-process on the golden export (onnxruntime): a restored session's next round equals the uninterrupted one,
at round 1 and at round 2; another export, a truncated, corrupt or other-version state are refused with
SessionStateError. The stores: atomic writes (a writer killed between its temp file and the rename leaves the
previous round loadable), compare-and-set, caps, expiry -- the Redis store against a real redis-server.
"""
from __future__ import annotations

import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import GOLDEN_QUESTIONS

from segllm_edge.errors import SessionError, SessionStateError
from segllm_edge.pipeline.masks import mask_iou


@pytest.fixture(scope="module")
def model(golden_export):
    import segllm_edge

    return segllm_edge.load(golden_export, backend="onnxruntime")


@pytest.fixture(scope="module")
def run(model, golden_image):
    """An uninterrupted three-round session, with its state saved after rounds 1 and 2."""
    s = model.session(golden_image)
    states = {}
    for i, q in enumerate(GOLDEN_QUESTIONS, 1):
        s.ask(q)
        if i < 3:
            states[i] = model.save(s)
    return s, states


def _same_round(got, want_round):
    want = want_round.result
    assert got.mask.shape == want.mask.shape
    assert mask_iou(got.mask, want.mask) >= 0.999
    assert mask_iou(got.model_mask, want.model_mask) >= 0.999
    np.testing.assert_allclose(got.model_box, want.model_box, atol=0.5)


@pytest.mark.parametrize("after", [1, 2])
def test_restored_session_continues_like_the_uninterrupted_one(model, run, after, monkeypatch):
    s, states = run
    calls = {"llm": 0, "mask_decode": 0, "encode_masks": 0}
    for name in calls:
        real = getattr(model.backend, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(model.backend, name, counted)
    r = model.restore(states[after])
    assert calls == {"llm": 1, "mask_decode": 0, "encode_masks": 0}   # ONE prefill, no old round decoded again
    monkeypatch.undo()
    assert len(r.rounds) == after and r.context_length == sum(len(x.ids) for x in s.rounds[:after])
    assert r.kv_cache_bytes() > 0 and set(r.restore_timings) >= {"llm_prefill", "restore_parse"}
    assert "mask_decoder" not in r.restore_timings            # old rounds are never decoded again
    for old, want in zip(r.rounds, s.rounds):                  # the durable part came back as it was
        assert old.ids == want.ids and old.refs == want.refs and old.question == want.question
        assert np.array_equal(old.result.mask, want.result.mask)
        assert np.array_equal(old.crop_pixels, want.crop_pixels)
        assert np.array_equal(old.bbox_vec, want.bbox_vec)
    got = r.ask(GOLDEN_QUESTIONS[after])
    assert r.rounds[-1].ids == s.rounds[after].ids               # same token ids
    _same_round(got, s.rounds[after])
    assert model.save(r)[:8] == b"SEGLLMST"


def test_state_from_another_export_is_refused(run, golden_export_fp16):
    import segllm_edge

    _, states = run
    other = segllm_edge.load(golden_export_fp16, backend="onnxruntime")
    with pytest.raises(SessionStateError, match="another (model|export)"):
        other.restore(states[1])


def test_truncated_corrupt_and_foreign_states_are_clear_errors(model, run):
    _, states = run
    blob = states[2]
    with pytest.raises(SessionStateError, match="truncated"):
        model.restore(blob[:-100])
    with pytest.raises(SessionStateError, match="truncated"):
        model.restore(blob[:20])
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(SessionStateError, match="corrupt"):
        model.restore(bytes(bad))
    newer = bytearray(blob)
    struct.pack_into("<H", newer, 8, 99)
    with pytest.raises(SessionStateError, match="format version 99"):
        model.restore(bytes(newer))
    with pytest.raises(SessionStateError, match="not a segllm-edge"):
        model.restore(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(SessionStateError, match="bytes, not str"):
        model.restore("a state")


# -- the stores -------------------------------------------------------------------------------------
CRASH_WRITER = textwrap.dedent("""
    import os, signal, sys
    from segllm_edge.serving import state_store
    root, key, first, second = sys.argv[1:5]
    store = state_store.DirectoryStore(root, ttl_s=600)
    store.put(key, open(first, "rb").read(), expect=None)
    print("round 1 written", flush=True)
    # die like a kill -9 between the temp file and the rename of the next round's write
    state_store._fault_hook = lambda stage: os.kill(os.getpid(), signal.SIGKILL) if stage == "temp_written" else None
    store.put(key, open(second, "rb").read(), expect=1)
    print("not reached", flush=True)
""")


def test_a_writer_killed_mid_write_leaves_the_previous_round_loadable(model, run, tmp_path):
    from segllm_edge.serving.state_store import DirectoryStore, state_key

    _, states = run
    key = state_key("some-conversation-token")
    (tmp_path / "s1").write_bytes(states[1])
    (tmp_path / "s2").write_bytes(states[2])
    root = tmp_path / "states"
    p = subprocess.run([sys.executable, "-c", CRASH_WRITER, str(root), key, str(tmp_path / "s1"),
                        str(tmp_path / "s2")], capture_output=True, text=True, timeout=120)
    assert p.returncode == -9 and "round 1 written" in p.stdout and "not reached" not in p.stdout, p.stderr
    assert list(root.glob(".*.tmp")), "the killed writer's temp file should be there"
    store = DirectoryStore(root, ttl_s=600)
    assert store.get(key) == states[1] and store.rounds(key) == 1
    assert len(model.restore(store.get(key)).rounds) == 1
    assert "some-conversation-token" not in "".join(p.name for p in root.iterdir())


def _exercise_store(store, states):
    from segllm_edge.serving.state_store import state_key

    a, b = state_key("token-a"), state_key("token-b")
    assert store.get(a) is None and store.rounds(a) is None
    store.put(a, states[1], expect=None)
    assert store.get(a) == states[1] and store.rounds(a) == 1
    store.put(a, states[2], expect=1)
    assert store.rounds(a) == 2
    with pytest.raises(SessionStateError, match="another request answered round 2"):
        store.put(a, states[2], expect=1)                          # a replica still at round 1
    assert store.get(a) == states[2]
    assert store.total_bytes() == len(states[2])
    with pytest.raises(SessionStateError, match="per conversation"):
        _capped(store, max_state_bytes=len(states[1]) - 1).put(b, states[1])
    capped = _capped(store, max_total_bytes=len(states[2]) + len(states[1]) - 1)
    with pytest.raises(SessionStateError, match="store is full"):
        capped.put(b, states[1])
    assert store.get(b) is None                                    # a refused put changed nothing
    store.delete(a)
    assert store.get(a) is None and store.total_bytes() == 0
    with pytest.raises(SessionStateError, match="closed or expired"):
        store.put(a, states[2], expect=1)        # closed through another replica: a later round must not revive it
    assert store.get(a) is None


def test_redis_url_password_stays_out_of_configs(monkeypatch):
    from segllm_edge.contracts.serving import PARAM_REDIS_URL
    from segllm_edge.serving.state_store import ENV_REDIS_URL, redact_url, redis_url_for_server, store_parameters

    full = "redis://app:s3cret@db.local:6380/2"
    assert redact_url(full) == "redis://app@db.local:6380/2" and redact_url("redis://h:1/0") == "redis://h:1/0"
    params = store_parameters(redis_url=full)
    assert "s3cret" not in repr(params) and params[PARAM_REDIS_URL] == "redis://app@db.local:6380/2"
    monkeypatch.setenv(ENV_REDIS_URL, full)
    assert redis_url_for_server(params[PARAM_REDIS_URL]) == full        # the stub gets it from its environment
    monkeypatch.setenv(ENV_REDIS_URL, "redis://other:pw@elsewhere:1/0")
    assert redis_url_for_server(params[PARAM_REDIS_URL]) == params[PARAM_REDIS_URL]


def _capped(store, **caps):
    import copy

    c = copy.copy(store)
    for k, v in caps.items():
        setattr(c, k, v)
    return c


def test_directory_store(run, tmp_path):
    import os
    import time

    from segllm_edge.serving.state_store import DirectoryStore, state_key

    _, states = run
    store = DirectoryStore(tmp_path / "d", ttl_s=60)
    _exercise_store(store, states)
    k = state_key("idle")
    store.put(k, states[1])
    old = time.time() - 120
    os.utime(store._path(k), (old, old))                           # idle past the timeout
    assert store.get(k) is None and store.rounds(k) is None
    assert store.total_bytes() == 0 and not store._path(k).exists()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port (`make test` installs it: missing, these tests fail)."""
    import shutil
    import time

    from segllm_edge.serving.tritonserver import free_port

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: run `make system-deps` (Debian package redis-server)")
    import redis

    port = free_port()
    d = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_store(run, redis_url):
    import time

    from segllm_edge.serving.state_store import RedisStore, state_key

    _, states = run
    store = RedisStore(redis_url, ttl_s=60, prefix="t1:")
    _exercise_store(store, states)
    short = RedisStore(redis_url, ttl_s=0.5, prefix="t2:")
    k = state_key("idle")
    short.put(k, states[1])
    assert short.client.pttl(short._k(k)) > 0                      # Redis's own expiry = the idle timeout
    time.sleep(0.8)
    assert short.get(k) is None and short.total_bytes() == 0
    assert not any(b"idle" in x for x in store.client.keys("*"))  # keys are hashes, never tokens


def test_redis_store_is_cluster_safe_and_keeps_a_running_total(run, redis_url):
    """One hash tag for all of a store's keys (a script's keys in one Redis Cluster slot); the total cap is read
    from a running total that puts, deletes and expiry keep equal to the sum of the live states."""
    import time

    from redis.crc import key_slot

    from segllm_edge.serving.state_store import RedisStore, state_key

    _, states = run
    store = RedisStore(redis_url, ttl_s=60, prefix="t3:")
    total = lambda: int(store.client.get(store._total) or 0)  # noqa: E731
    a, b = state_key("a"), state_key("b")
    store.put(a, states[1])
    store.put(b, states[1])
    store.put(a, states[2], expect=1)
    assert total() == len(states[1]) + len(states[2]) == store.total_bytes()
    keys = store.client.keys("{t3:}*")
    assert len(keys) >= 4 and len({key_slot(k) for k in keys}) == 1
    store.delete(b)
    assert total() == len(states[2]) == store.total_bytes()
    short = RedisStore(redis_url, ttl_s=0.3, prefix="t3:")      # the same store, a short idle timeout
    short.put(b, states[1])
    time.sleep(0.5)                                            # b expires; the next write takes it off the total
    store.put(a, states[2], expect=2)
    assert total() == len(states[2]) == store.total_bytes()
    store.client.delete(store._total)                          # the counter lost (eviction, a manual DEL)
    store.put(b, states[1])
    assert total() == len(states[1]) + len(states[2]) == store.total_bytes()   # rebuilt, not restarted at 0


# -- over real servers -----------------------------------------------------------------------------
class Serve:
    """`segllm-edge serve` in a subprocess (its output in a file), on fresh ports unless given."""

    def __init__(self, export_dir, tmp_path, name, store_args, ports=None):
        import os

        from segllm_edge.serving.tritonserver import free_port

        self.ports = ports or [free_port() for _ in range(3)]
        self.out = tmp_path / f"{name}.out"
        env = {**os.environ, "SEGLLM_TRITON_CACHE": str(tmp_path / f"cache-{name}")}
        cmd = [sys.executable, "-m", "segllm_edge", "serve", "--export", str(export_dir), *store_args,
               "--http-port", str(self.ports[0]), "--grpc-port", str(self.ports[1]),
               "--metrics-port", str(self.ports[2]), "--log", str(tmp_path / f"{name}.triton.log")]
        with self.out.open("w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.ports[1]}"

    def wait_ready(self, timeout=300):
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.out.read_text()
            if "\nready in" in "\n" + text:
                return
            assert self.proc.poll() is None, text
            time.sleep(0.5)
        raise AssertionError(self.out.read_text())

    def kill_9_all(self):
        """SIGKILL to serve and every process it started (tritonserver, its stubs, the watchdog) at once."""
        import os
        import signal
        import time

        from segllm_edge.serving.tritonserver import _descendants

        pids = [self.proc.pid, *_descendants(self.proc.pid)]
        assert len(pids) >= 3, pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids[1:]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids[1:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill_9_all()


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _same_remote(remote, local):
    assert remote.round == local.round
    assert mask_iou(remote.mask, local.mask) >= 0.999
    np.testing.assert_allclose(remote.box, local.box, atol=0.5)


def test_kill_9_between_rounds_then_restart_on_the_same_state_dir(golden_export, golden_image, run, tmp_path):
    """Rounds 1-2, kill -9 of the server and all it started, a restart on the same --state-dir: the SAME client
    object's round 3 (sent while the server is still down: it retries) equals the uninterrupted run."""
    import segllm_edge

    s_local, _ = run
    state_dir = tmp_path / "states"
    srv = Serve(golden_export, tmp_path, "first", ["--state-dir", str(state_dir)])
    again = None
    try:
        srv.wait_ready()
        client = segllm_edge.connect(srv.url, retry=300)
        conv = client.session(golden_image.read_bytes())
        for i in (0, 1):
            _same_remote(conv.ask(GOLDEN_QUESTIONS[i]), s_local.results[i])
        files = [p.name for p in state_dir.iterdir() if p.name.endswith(".state")]
        assert len(files) == 1 and conv.conversation not in files[0]        # keyed by a hash of the token
        assert conv.results[-1].serving["state_bytes"] > 0 and "state_bytes" not in conv.results[-1].timings
        srv.kill_9_all()
        again = Serve(golden_export, tmp_path, "again", ["--state-dir", str(state_dir)], ports=srv.ports)
        r3 = conv.ask(GOLDEN_QUESTIONS[2])                                   # rides out the restart
        _same_remote(r3, s_local.results[2])
        conv.close()
        assert not [p for p in state_dir.iterdir() if p.name.endswith(".state")]   # end deletes the state
    finally:
        srv.stop()
        if again is not None:
            again.stop()


def test_two_replicas_on_one_redis_share_a_conversation(golden_export, golden_image, run, redis_url, tmp_path):
    """Rounds 1-2 on one server, round 3 on another (no affinity: one Redis); the first server then notices that
    its copy is old, reloads round 3, and answers a repeated round-3 request from it."""
    import segllm_edge

    s_local, _ = run
    a = Serve(golden_export, tmp_path, "a", ["--redis-url", redis_url])
    b = Serve(golden_export, tmp_path, "b", ["--redis-url", redis_url])
    try:
        a.wait_ready()
        b.wait_ready()
        ca, cb = segllm_edge.connect(a.url), segllm_edge.connect(b.url)
        conv = ca.session(golden_image.read_bytes())
        for i in (0, 1):
            _same_remote(conv.ask(GOLDEN_QUESTIONS[i]), s_local.results[i])
        conv.client = cb                                   # what a load balancer without affinity does
        r3 = conv.ask(GOLDEN_QUESTIONS[2])
        _same_remote(r3, s_local.results[2])
        # back on the first, whose copy is at round 2: it reloads round 3 from Redis, and a repeated round-3
        # request (a client whose answer was lost) is answered from the stored state, not run again
        from segllm_edge.client import _bytes1
        from segllm_edge.serving.wire import decode_mask_png

        again = ca._infer({"conversation": _bytes1(conv.conversation.encode()), "round": np.array([3], np.int32),
                           "question": _bytes1(GOLDEN_QUESTIONS[2].encode())})
        assert int(again.as_numpy("round")[0]) == 3
        assert np.array_equal(decode_mask_png(again.as_numpy("mask").reshape(-1)[0]), r3.mask)
        with pytest.raises(SessionError, match="asks for round 2, but this conversation has 3"):
            ca._infer({"conversation": _bytes1(conv.conversation.encode()), "round": np.array([2], np.int32),
                       "question": _bytes1(GOLDEN_QUESTIONS[1].encode())})
    finally:
        a.stop()
        b.stop()


# -- no model needed ---------------------------------------------------------------------------------
def test_retry_policy_and_what_it_retries():
    import itertools

    from tritonclient.utils import InferenceServerException

    import segllm_edge
    from segllm_edge.retry import RetryPolicy, policy, retryable
    from segllm_edge.errors import ConfigError

    now = [0.0]
    delays = []
    for d in RetryPolicy(total_s=10, first_delay_s=0.25, max_delay_s=2).delays(clock=lambda: now[0]):
        delays.append(d)
        now[0] += d
    assert sum(delays) <= 10 + 1e-9 and max(delays) <= 2 * 1.2 and delays[0] <= 0.25 * 1.2
    assert delays[1] > delays[0] and len(delays) < 15                    # doubling, bounded
    assert policy(None).total_s == 60 and policy(False).total_s == 0 and policy(5).total_s == 5
    assert list(itertools.islice(RetryPolicy(total_s=0).delays(), 3)) == []
    with pytest.raises(ConfigError, match="total_s"):
        RetryPolicy(total_s=-1)
    down = InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")
    assert retryable(down)
    for answered in ("[RoundReferenceError] round 3 refers to round 5", "[SessionError] unknown conversation",
                     "Deadline Exceeded", "[SessionError] server full"):
        assert not retryable(InferenceServerException(answered)), answered
    # a server-side error that merely quotes transport words was answered: never retried
    assert not retryable(InferenceServerException("[SessionStateError] Redis failed: Connection refused",
                                                  status="StatusCode.UNAVAILABLE"))
    # a start is resent only when it never left (a reset connection may already have opened a conversation)
    reset = InferenceServerException("Connection reset by peer", status="StatusCode.UNAVAILABLE")
    assert retryable(reset) and not retryable(reset, unsent_only=True) and retryable(down, unsent_only=True)
    from segllm_edge.serving.tritonserver import free_port

    c = segllm_edge.connect(f"127.0.0.1:{free_port()}", retry=0.5)      # nobody there: gives up, says so
    with pytest.raises(SessionError, match="unreachable"):
        c.session(b"not even an image").ask("Segment it.")


def test_state_options_of_serve_and_triton_repo(golden_export, tmp_path):
    from click.testing import CliRunner

    from segllm_edge.cli import main
    from segllm_edge.contracts.serving import PARAM_REDIS_URL, PARAM_STATE_DIR
    from segllm_edge.serving.tritonserver import free_port

    ports = [a for flag in ("--http-port", "--grpc-port", "--metrics-port") for a in (flag, str(free_port()))]

    def serve(*args):
        return CliRunner().invoke(main, ["serve", "--export", str(golden_export), *ports, *args])

    r = serve("--state-dir", str(tmp_path / "s"), "--redis-url", "redis://127.0.0.1:1/0")
    assert r.exit_code != 0 and "not both" in r.output and "Traceback" not in r.output
    blocked = tmp_path / "file"
    blocked.write_text("")
    r = serve("--state-dir", str(blocked / "x"))
    assert r.exit_code != 0 and "not a writable folder" in r.output and "Traceback" not in r.output
    r = serve("--redis-url", "redis://127.0.0.1:1/0")
    assert r.exit_code != 0 and "Redis at redis://127.0.0.1:1/0" in r.output and "Traceback" not in r.output
    out = tmp_path / "repo"
    r = CliRunner().invoke(main, ["triton-repo", "--export", str(golden_export), "--out", str(out),
                                  "--state-dir", str(tmp_path / "states"), "--state-max-bytes", "5000000"])
    assert r.exit_code == 0, r.output
    cfg = (out / "segllm" / "config.pbtxt").read_text()
    assert PARAM_STATE_DIR in cfg and str((tmp_path / "states").resolve()) in cfg and PARAM_REDIS_URL not in cfg
    assert 'name: "round"' in cfg


def test_replayed_last_round_after_a_restore_is_the_original_answer(model, run):
    """A retried round answered from a restored state: the original answer in full (mask logits and memory
    included), and only for the same question and the same references."""
    from segllm_edge.serving.durable import replay

    s, states = run
    r = model.restore(states[2])
    want = s.rounds[1].result
    text = GOLDEN_QUESTIONS[1].split("[REF:")[0]
    for question, refs in ((GOLDEN_QUESTIONS[1], None), (text, [1])):      # inline or given: the same refs
        got = replay(r, 2, question, refs)
        assert got.mask_logits.shape == want.mask_logits.shape
        np.testing.assert_array_equal(got.mask_logits, want.mask_logits)
        assert got.memory == want.memory and got.memory["kv_cache"] > 0
        assert np.array_equal(got.mask, want.mask) and got.refs == want.refs
    with pytest.raises(SessionError, match="another question or other references"):
        replay(r, 2, text, None)                                          # same words, no reference
    with pytest.raises(SessionError, match="another question or other references"):
        replay(r, 2, "Segment the green triangle.[REF:1]", None)
    assert replay(r, 3, GOLDEN_QUESTIONS[2]) is None                      # the next round: run it
