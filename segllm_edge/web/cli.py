"""``segllm-edge web``: the browser chat demo (Starlette app served by uvicorn)."""
from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from pathlib import Path

import click

from ..contracts.backends import BACKENDS
from ..errors import SegLLMError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a ClickException saying why not (before any model is loaded)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise click.ClickException(f"cannot listen on {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise click.ClickException(f"port {port} on {host} is already in use: stop what holds it or pick "
                                       "another with --port") from None
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def make_engine(checkpoint: Path | None, export: Path | None, connect: str | None, backend: str | None,
                dtype: str, workdir: Path, max_kv_bytes: int | None):
    """The engine the page talks to: a Triton server, an export, a checkpoint, or the tiny demo checkpoint."""
    from .conversations import LocalEngine, RemoteEngine

    if connect:
        import segllm_edge

        client = segllm_edge.connect(connect)
        if not client.is_ready():
            click.echo(f"warning: no SegLLM model is ready at {connect} yet; the page will report it until it is",
                       err=True)
        return RemoteEngine(client)
    import segllm_edge

    path = export if export is not None else checkpoint
    if path is None:
        from ..extras import require_export_extra

        require_export_extra("the web demo without --checkpoint/--export/--connect (it runs a tiny checkpoint)")
        from ..tiny import make_tiny_checkpoint

        path = workdir / "tiny-checkpoint"
        if not (path / "config.json").exists():
            with _step(f"building a tiny checkpoint in {path}"):
                make_tiny_checkpoint(path, force=True)
    with _step(f"loading {path} ({backend or 'backend from the folder'}, {dtype})"):
        model = segllm_edge.load(path, backend=backend, dtype=dtype)   # an export: onnxruntime, a checkpoint: torch
    return LocalEngine(model, max_kv_bytes=max_kv_bytes)


@contextlib.contextmanager
def _step(what: str):
    click.echo(f"{what} …", nl=False, err=True)
    t0 = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        click.echo(f" {'done' if ok else 'failed'} in {time.perf_counter() - t0:.1f}s", err=True)


@click.command("web")
@click.option("--checkpoint", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="a SegLLM checkpoint folder (default: the tiny demo checkpoint under --workdir, built once)")
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="an export folder (segllm-edge export; onnxruntime, no torch needed)")
@click.option("--connect", default=None, metavar="HOST:PORT", help="a SegLLM Triton server's gRPC endpoint")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0: every interface; the demo has no login)")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535))
@click.option("--backend", default=None, type=click.Choice(BACKENDS),
              help="default: from the folder (torch for a checkpoint, onnxruntime for an export)")
@click.option("--dtype", default="auto", show_default=True, help="torch backend dtype (an export runs as exported)")
@click.option("--max-conversations", default=8, show_default=True, type=click.IntRange(1),
              help="live conversations (browser users) at once; one more is refused with a message")
@click.option("--idle-timeout", default=600.0, show_default=True, type=click.FloatRange(1),
              help="seconds after which an untouched conversation ends and frees its memory")
@click.option("--max-kv-bytes", default=None, type=click.IntRange(1),
              help="cap on each conversation's KV cache (local model); a round over it is refused")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("segllm-demo"),
              show_default=True, help="where the tiny demo checkpoint goes")
def web_command(checkpoint, export_dir, connect, host, port, backend, dtype, max_conversations, idle_timeout,
                max_kv_bytes, workdir):
    """Browser chat demo: upload an image, ask rounds, see and reuse the masks (http://127.0.0.1:7860)."""
    if sum(x is not None for x in (checkpoint, export_dir, connect)) > 1:
        raise click.UsageError("give one of --checkpoint, --export or --connect")
    try:
        import uvicorn

        from .app import create_app
        from .conversations import ConversationStore
    except ImportError as exc:
        raise click.ClickException(f"the web demo needs its extra: pip install 'segllm-edge[web]' ({exc})") from None
    sock = bind(host, port)
    try:
        engine = make_engine(checkpoint, export_dir, connect, backend, dtype, workdir, max_kv_bytes)
    except SegLLMError as exc:
        sock.close()
        raise click.ClickException(str(exc)) from None
    store = ConversationStore(engine, max_conversations=max_conversations, idle_timeout=idle_timeout)
    app = create_app(store)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"SegLLM web demo: http://{shown}:{sock.getsockname()[1]}/  ({engine.describe()}; up to "
               f"{max_conversations} conversations, idle ones end after {idle_timeout:.0f} s). Ctrl-C stops it.")
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"note: listening on {host}: anyone who can reach this machine there can use the demo "
                   "(it has no login)", err=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:   # uvicorn shuts down cleanly, then re-raises the Ctrl-C it caught
        pass
    click.echo("web demo stopped")
