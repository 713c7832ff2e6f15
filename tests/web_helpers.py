"""The web demo's app on a real uvicorn server in a thread, and plain HTTP calls to it (tests only)."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

ROUND_TIMEOUT_S = 300   # one round of the golden model takes seconds on 2 idle cores; a loaded machine is slower


@contextmanager
def live_server(store, expire_every=None):
    import uvicorn

    from segllm_edge.web.app import create_app
    from segllm_edge.web.cli import bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(store, expire_every=expire_every), log_level="warning"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and t.is_alive(), "the web server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        t.join(20)
        sock.close()


def call(url, method="GET", data=None, headers=None):
    """(status, parsed JSON or bytes) of one request; error statuses are answers too."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=ROUND_TIMEOUT_S) as res:
            status, body, ctype = res.status, res.read(), res.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        status, body, ctype = exc.code, exc.read(), exc.headers.get("content-type", "")
    return status, (json.loads(body) if "json" in ctype else body)


def ask(base, cid, question):
    return call(f"{base}/api/conversations/{cid}/rounds", "POST", json.dumps({"question": question}).encode(),
                {"Content-Type": "application/json"})
