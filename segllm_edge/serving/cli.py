"""``segllm-edge triton-repo`` and ``segllm-edge serve`` (registered in :mod:`segllm_edge.cli`)."""
from __future__ import annotations

import hashlib
import os
import signal
import threading
from pathlib import Path

import click

from ..contracts.serving import GRAPH_ENGINE_ORT, GRAPH_ENGINES
from ..errors import SegLLMError


def _fail(exc: Exception):
    raise click.ClickException(str(exc))


def _state_options(fn):
    """--state-dir / --redis-url and the store's caps (segllm_edge.serving.state_store)."""
    opts = [
        click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="keep every conversation's durable state in this folder (written atomically after every "
                          "round): a restart continues the conversations"),
        click.option("--redis-url", default=None,
                     help="keep the durable state in Redis (redis://[user:password@]host:port/db): replicas on one "
                          "Redis share the conversations; the repository's config holds the URL without its "
                          "password, which the server's stub takes from $SEGLLM_REDIS_URL (serve sets it)"),
        click.option("--state-max-bytes", type=click.IntRange(min=1), default=None,
                     help="stored bytes per conversation (default: the image limit + 32 MiB)"),
        click.option("--state-max-total-bytes", type=click.IntRange(min=1), default=None,
                     help="stored bytes of all conversations (default: 16 GiB in a folder, 2 GiB in Redis)"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _round_options(fn):
    """--max-concurrent-rounds / --max-queued-rounds / --max-pending-per-conversation (serving.round_scheduler)."""
    opts = [
        click.option("--max-concurrent-rounds", type=click.IntRange(min=1), default=None,
                     help="rounds of different conversations the segllm model runs at once (default 4; a "
                          "conversation's own rounds always run one after another, in order)"),
        click.option("--max-queued-rounds", type=click.IntRange(min=1), default=None,
                     help="rounds that may wait for a free slot, all conversations together (default 2 x "
                          "--max-conversations); one more is answered 'server busy, retry' at once"),
        click.option("--max-pending-per-conversation", type=click.IntRange(min=1), default=None,
                     help="rounds of one conversation running or waiting (default 2: it may send its next round "
                          "while one runs); one more is answered 'server busy' at once"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _round_parameters(repo, max_concurrent_rounds, max_queued_rounds, max_pending_per_conversation) -> dict:
    from ..errors import ConfigError
    from .round_scheduler import scheduler_parameters

    params = scheduler_parameters(max_concurrent_rounds, max_queued_rounds, max_pending_per_conversation)
    if params and repo is not None:
        raise ConfigError("--max-concurrent-rounds/--max-queued-rounds/--max-pending-per-conversation configure a "
                          "generated repository; for --repo write it with `segllm-edge triton-repo` and those options")
    return params


#: ``--graph-engine`` of triton-repo and serve (repository.generate_repository's ``graph_engine``)
_graph_engine_option = click.option(
    "--graph-engine", default=GRAPH_ENGINE_ORT, show_default=True, type=click.Choice(list(GRAPH_ENGINES)),
    help="what the stateless graph models (mask_backbone, mask_decoder, seg_head) run on, --target python: "
         "onnxruntime gives load(export, backend='onnxruntime')'s answers bit for bit; openvino (the [openvino] "
         "extra) runs the HIPIE mask decoder ~1.4x faster on a CPU, masks equal up to a few boundary pixels")


@click.command("triton-repo")
@click.option("--export", "export_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="export folder (from `segllm-edge export`)")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="repository to write")
@click.option("--target", default="python", show_default=True, type=click.Choice(["python", "ngc"]),
              help="python: every graph in a python-backend model (onnxruntime CPU; the nvidia-pytriton server); "
                   "ngc: onnxruntime_onnx / tensorrt_plan models for NVIDIA's Triton container")
@click.option("--max-conversations", default=8, show_default=True, type=click.IntRange(min=1),
              help="live conversations the segllm model holds; a start over it is told 'server full' at once")
@click.option("--idle-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds a conversation may idle before the server drops it")
@click.option("--instances", default=1, show_default=True, help="instances per stateless graph model (mask_backbone, mask_decoder, seg_head, preprocess); "
                   "the segllm BLS, which runs the llm and CLIP itself, has one")
@click.option("--force", is_flag=True, help="overwrite a non-empty repository folder")
@_graph_engine_option
@_state_options
@_round_options
def triton_repo_command(export_dir, out, target, max_conversations, idle_timeout, instances, force, graph_engine,
                        state_dir, redis_url, state_max_bytes, state_max_total_bytes, max_concurrent_rounds,
                        max_queued_rounds, max_pending_per_conversation):
    """Write a Triton model repository for EXPORT (models, encode_image ensemble, segllm BLS)."""
    from .repository import describe_repository, generate_repository
    from .state_store import store_parameters

    try:
        bls = {**store_parameters(state_dir, redis_url, state_max_bytes, state_max_total_bytes),
               **_round_parameters(None, max_concurrent_rounds, max_queued_rounds, max_pending_per_conversation)}
        repo = generate_repository(export_dir, out, target=target, max_conversations=max_conversations,
                                   idle_timeout_s=idle_timeout, instance_count=instances, force=force,
                                   bls_parameters=bls, graph_engine=graph_engine)
    except (SegLLMError, FileExistsError, ValueError) as exc:
        _fail(exc)
    for name, kind in describe_repository(repo).items():
        click.echo(f"{name:15s} {kind}")
    from .model_config import portability_problems

    if redis_url:
        from .state_store import ENV_REDIS_URL, redact_url

        if redact_url(redis_url) != redis_url:
            click.echo(f"the config names Redis without its password: start the server with {ENV_REDIS_URL} set "
                       "to the full URL", err=True)
    problems = portability_problems(repo)
    click.echo(f"repository written to {repo} (target {target}; "
               + ("portable: no path of this machine in it)" if not problems else
                  "NOT portable: " + "; ".join(problems) + ")"))


def _cached_repo(export_dir: Path, max_conversations: int, idle_timeout: float, bls: dict | None = None,
                 server_key: str = "", graph_engine: str = GRAPH_ENGINE_ORT) -> Path:
    """The generated repository ``serve`` runs (regenerated at every start). ``server_key`` (address and gRPC
    port) keeps two replicas on one host from rewriting each other's repository while one starts."""
    if not (export_dir / "manifest.json").is_file():
        from ..errors import CheckpointError

        raise CheckpointError(f"{export_dir} is not a segllm-edge export: manifest.json is missing")
    from .repository import generate_repository
    from .tritonserver import default_cache_dir

    export = export_dir.resolve()
    manifest = (export / "manifest.json").read_bytes() if (export / "manifest.json").is_file() else b""
    key = hashlib.sha256(str(export).encode() + manifest + f"{max_conversations}:{idle_timeout}".encode()
                         + repr(sorted((bls or {}).items())).encode() + server_key.encode()
                         + graph_engine.encode()).hexdigest()[:16]
    repo = default_cache_dir() / "repos" / key
    return generate_repository(export, repo, max_conversations=max_conversations, idle_timeout_s=idle_timeout,
                               force=True, bls_parameters=bls, graph_engine=graph_engine)


def _check_store(repo, state_dir, redis_url, idle_timeout, max_bytes, max_total) -> dict:
    """The BLS parameters of the state store, after opening it once here (a folder that cannot be written or a
    Redis that does not answer fails now, not at the first round)."""
    from ..errors import ConfigError
    from .state_store import open_store, store_parameters

    params = store_parameters(state_dir, redis_url, max_bytes, max_total)
    if params and repo is not None:
        raise ConfigError("--state-dir/--redis-url configure a generated repository; for --repo write it with "
                          "`segllm-edge triton-repo --state-dir/--redis-url`")
    store = open_store(state_dir, redis_url, idle_timeout, max_bytes, max_total)
    if store is not None:
        click.echo(store.describe(), err=True)
        store.close()
    return params


@click.command("serve")
@click.option("--export", "export_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="export folder (from `segllm-edge export`)")
@click.option("--repo", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="a repository from `segllm-edge triton-repo` (default: generate one in the cache folder)")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True, help="address to listen on (0.0.0.0: all)")
@click.option("--max-conversations", default=8, show_default=True, type=click.IntRange(min=1),
              help="live conversations; a start over it is told 'server full' at once")
@click.option("--idle-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds an abandoned conversation is kept before it expires")
@click.option("--api-key", default=None, envvar="SEGLLM_API_KEY",
              help="require this key (header segllm-api-key) for inference/metadata; better as $SEGLLM_API_KEY or "
                   "--api-key-file (a flag is visible to other users in ps)")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="read the API key from this file (mode 600)")
@click.option("--admin-key", default=None, envvar="SEGLLM_ADMIN_KEY",
              help="key (header segllm-admin-key) for shared memory, repository control, statistics, trace, "
                   "logging (default: none, i.e. closed); better as $SEGLLM_ADMIN_KEY or --admin-key-file")
@click.option("--admin-key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="read the admin key from this file (mode 600)")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None,
              help="PEM certificate: the gRPC endpoint speaks TLS (needs --tls-key)")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None, help="PEM private key")
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="tritonserver log file (default: a temp file)")
@_graph_engine_option
@_state_options
@_round_options
def serve_command(export_dir, repo, http_port, grpc_port, metrics_port, address, max_conversations, idle_timeout,
                  api_key, api_key_file, admin_key, admin_key_file, tls_cert, tls_key, log_path, graph_engine,
                  state_dir, redis_url, state_max_bytes, state_max_total_bytes, max_concurrent_rounds,
                  max_queued_rounds, max_pending_per_conversation):
    """Serve EXPORT with Triton Inference Server until Ctrl-C / SIGTERM (tritonserver and its stubs die with it).

    The keys never reach tritonserver's command line (segllm_edge.serving.argv_secrets)."""
    from .argv_secrets import shim_library
    from .security import Exposure, choose_key
    from .tritonserver import TritonServer, TritonServerError, default_cache_dir, port_in_use

    ctx = click.get_current_context()
    typed = {n: ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE for n in ("api_key", "admin_key")}
    try:
        api_key = choose_key(api_key, typed["api_key"], api_key_file, "API key", "--api-key", "SEGLLM_API_KEY")
        admin_key = choose_key(admin_key, typed["admin_key"], admin_key_file, "admin key", "--admin-key",
                               "SEGLLM_ADMIN_KEY")
        busy = [p for p in (http_port, grpc_port, metrics_port) if port_in_use(p, address)]
        if busy:
            raise TritonServerError(f"port {', '.join(map(str, busy))} on {address} is already in use (another "
                                    "server running?); stop it or pass other --http-port/--grpc-port/--metrics-port")
        exposure = Exposure(api_key=api_key, admin_key=admin_key, tls_cert=tls_cert, tls_key=tls_key)
        extra, secrets = exposure.tritonserver_args(), exposure.secrets()
        if secrets:
            shim_library(default_cache_dir())   # no compiler: fail now, before the repository is written
        store = _check_store(repo, state_dir, redis_url, idle_timeout, state_max_bytes, state_max_total_bytes)
        rounds = _round_parameters(repo, max_concurrent_rounds, max_queued_rounds, max_pending_per_conversation)
        from ..errors import ConfigError

        if repo is not None and ctx.get_parameter_source("graph_engine") == click.core.ParameterSource.COMMANDLINE:
            raise ConfigError("--graph-engine configures a generated repository; for --repo write it with "
                              "`segllm-edge triton-repo --graph-engine`")
        from .models import check_graph_engine

        check_graph_engine(graph_engine)     # openvino not installed: said now, not as a model that fails to load
        repo = repo or _cached_repo(export_dir, max_conversations, idle_timeout, {**store, **rounds},
                                    f"{address}:{grpc_port}", graph_engine)
        if redis_url:
            from .state_store import ENV_REDIS_URL

            os.environ[ENV_REDIS_URL] = redis_url   # the password reaches the stub this way, never through a config
    except (SegLLMError, FileExistsError, ValueError) as exc:
        _fail(exc)
    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          address=address, log_path=log_path, ready_timeout=300, extra_args=extra,
                          secrets=secrets)
    stop = threading.Event()

    def _on_signal(signum, frame):
        stop.set()

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        click.echo(f"starting tritonserver on {repo} …", err=True)
        ready = server.wait_ready()
        click.echo(f"ready in {ready:.1f} s\n  gRPC    {server.grpc_url}   (segllm_edge.connect(\"{server.grpc_url}\""
                   f"{', api_key=...' if api_key else ''}{', ssl=True' if tls_cert else ''}))\n"
                   f"  HTTP    http://{server.http_url}\n  metrics {server.metrics_url}\n  log     {server.log_path}\n"
                   "Ctrl-C to stop.")
        while not stop.wait(1.0):
            if not server.is_alive():
                raise TritonServerError(f"tritonserver exited; log {server.log_path}:\n{server.log_tail()}")
    except SegLLMError as exc:
        _fail(exc)
    finally:
        click.echo("stopping tritonserver …", err=True)
        server.stop()
        for s, h in old.items():
            signal.signal(s, h)
    click.echo("stopped.", err=True)
