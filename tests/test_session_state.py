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

from segllm_edge.errors import SessionStateError
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
            states[i] = s.save()
    return s, states


def _same_round(got, want_round):
    want = want_round.result
    assert got.mask.shape == want.mask.shape
    assert mask_iou(got.mask, want.mask) >= 0.999
    assert mask_iou(got.model_mask, want.model_mask) >= 0.999
    np.testing.assert_allclose(got.model_box, want.model_box, atol=0.5)


@pytest.mark.parametrize("after", [1, 2])
def test_restored_session_continues_like_the_uninterrupted_one(model, run, after):
    s, states = run
    r = model.restore(states[after])
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
    assert r.save()[:8] == b"SEGLLMST"


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
    from segllm_edge.serving.state_store import ConflictError, state_key

    a, b = state_key("token-a"), state_key("token-b")
    assert store.get(a) is None and store.rounds(a) is None
    store.put(a, states[1], expect=None)
    assert store.get(a) == states[1] and store.rounds(a) == 1
    store.put(a, states[2], expect=1)
    assert store.rounds(a) == 2
    with pytest.raises(ConflictError, match="another request answered round 2"):
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
    """A real redis-server on a free loopback port (skipped only where the binary is absent)."""
    import shutil
    import time

    from segllm_edge.serving.tritonserver import free_port

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; .ci/run installs it)")
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
