"""The client's reconnect (client.py) never closes a channel another thread's call may still be on."""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reconnect_leaves_the_shared_channel_open_for_other_threads():
    from tritonclient.utils import InferenceServerException

    from segllm_edge.client import connect
    from segllm_edge.errors import SessionError
    from segllm_edge.retry import RetryPolicy

    client = connect(f"127.0.0.1:{_free_port()}", timeout_s=5,
                     retry=RetryPolicy(total_s=0.3, first_delay_s=0.05, max_delay_s=0.05))
    shared = client._client          # what another thread's call in flight holds
    with pytest.raises(SessionError):   # nobody listens: retried, then given up
        client._infer({"question": np.array([b"x"], dtype=np.object_)})
    assert client._client is not shared          # this thread moved to a fresh channel ...
    with pytest.raises(InferenceServerException) as err:
        shared.is_server_live()                   # ... the other's still works (here: still nobody listens)
    assert "closed channel" not in str(err.value).lower()


def test_threads_that_saw_one_failure_open_one_channel():
    from segllm_edge.client import connect

    client = connect(f"127.0.0.1:{_free_port()}", timeout_s=5, retry=False)
    failed = client._client
    threads = [threading.Thread(target=client._reconnect, args=(failed,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fresh = client._client
    assert fresh is not failed
    client._reconnect(failed)        # a late thread that saw the old one fail: no new channel
    assert client._client is fresh
