"""The web demo's HTTP side (Starlette): the page, and a small JSON API over :class:`ConversationStore`.

Every answer to bad input or bad state is JSON ``{"error": message, "kind": ErrorClass}`` with a
4xx/5xx status, which the page shows; a traceback never reaches the browser (it goes to the log).

    GET    /                                        the page
    GET    /api/info                                model, caps, stage names, demo questions
    POST   /api/conversations[?bundled=1]           body: the image file's bytes → {id, width, height, ...}
    GET    /api/conversations/{id}                  the conversation so far
    DELETE /api/conversations/{id}                  end it
    POST   /api/conversations/{id}/rounds           {"question": "... [REF:k]"} → the round
    GET    /api/conversations/{id}/image            the image the masks are drawn in
    GET    /api/conversations/{id}/rounds/{k}/layer.png   round k drawn on a transparent layer
    GET    /api/conversations/{id}/rounds/{k}/mask.png    round k's binary mask (download)
    GET    /api/conversations/{id}/hit?x=&y=        rounds whose mask covers pixel (x, y)
    GET    /api/conversations/{id}/masks.zip        every round's mask PNG
    GET    /api/conversations/{id}/overlay.png      every round drawn, with a legend
    GET    /api/conversations/{id}/conversation.json
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import json
import logging
import time
import zipfile
from importlib import resources
from pathlib import Path
from urllib.parse import unquote

import numpy as np
from anyio import to_thread
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..contracts.demo import DEMO_QUESTIONS, demo_image
from ..drawing import legend_image, round_color, to_png
from ..errors import (BackendError, ContextOverflowError, ImageError, QuestionError, RoundReferenceError, SegLLMError,
                      SessionError)
from ..runtime.profiler import STAGES
from ..limits import MAX_IMAGE_BYTES, check_image_bytes
from .conversations import BusyError, CapacityError, ConversationStore, decode_upload

log = logging.getLogger("segllm_edge.web")

STATIC = Path(str(resources.files("segllm_edge.web").joinpath("static")))
MAX_QUESTION_CHARS = 2000
#: stages drawn in the latency chart, in pipeline order (a remote round adds its network time)
CHART_STAGES = (*STAGES, "transport")

# most specific first
_STATUS = ((CapacityError, 503), (BusyError, 409), (ImageError, 400), (QuestionError, 400),
           (RoundReferenceError, 400), (ContextOverflowError, 400), (SessionError, 404), (BackendError, 502),
           (SegLLMError, 400))


def _error(exc: Exception) -> JSONResponse:
    status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 500)
    kind = type(exc).__name__
    if kind == "ReferenceError_":
        kind = "RoundReferenceError"
    return JSONResponse({"error": str(exc), "kind": kind}, status_code=status)


def _api(fn):
    """Package errors → their JSON answer; anything else → a 500 that names no internals (logged here)."""
    @functools.wraps(fn)
    async def wrapper(request: Request):
        try:
            return await fn(request)
        except SegLLMError as exc:
            return _error(exc)
        except Exception:
            log.exception("internal error in %s %s", request.method, request.url.path)
            return JSONResponse({"error": "internal error in the demo server (its log has the details); "
                                          "try again or start a new conversation", "kind": "InternalError"},
                                status_code=500)
    return wrapper


async def _read_image_body(request: Request, name: str) -> bytes:
    """The uploaded image, refused with ImageError (``segllm_edge.limits``' byte limit) on its declared size before
    any of the body is read, else as soon as the bytes read exceed the limit (never held whole)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        check_image_bytes(int(declared), repr(name))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        check_image_bytes(size, repr(name))
        chunks.append(chunk)
    return b"".join(chunks)


def _hex(c) -> str:
    return "#%02x%02x%02x" % tuple(c)


def _round_json(cid: str, r) -> dict:
    k = int(r.round)
    mask = np.asarray(r.mask, dtype=bool)
    # numbers only: a remote round's serving times (client_round_trip, bls_total, ...) too, not nested details
    both = {**r.timings, **(getattr(r, "serving", None) or {})}
    timings = {s: round(float(v), 2) for s, v in both.items() if isinstance(v, (int, float))}
    staged = {s: timings[s] for s in CHART_STAGES if s in timings}
    base = f"/api/conversations/{cid}/rounds/{k}"
    return {
        "round": k, "question": r.question, "refs": [int(x) for x in r.refs],
        "box": [round(float(v), 1) for v in r.box], "mask_area": int(mask.sum()), "empty": not bool(mask.any()),
        "score": round(float(r.score), 4), "timings": timings, "stages": staged,
        "total_ms": round(float(timings.get("client_round_trip", sum(staged.values()))), 1),
        "context_tokens": getattr(r, "context_tokens", None), "color": _hex(round_color(k)),
        "layer": f"{base}/layer.png", "mask": f"{base}/mask.png",
    }


def _conversation_json(conv, info: str) -> dict:
    return {
        "id": conv.id, "name": conv.name, "width": int(conv.rgb.shape[1]), "height": int(conv.rgb.shape[0]),
        "image": f"/api/conversations/{conv.id}/image", "model": info,
        "rounds": [_round_json(conv.id, r) for r in conv.results],
    }


def create_app(store: ConversationStore, expire_every: float | None = None) -> Starlette:
    """The demo's ASGI app over ``store``; idle conversations are also swept every ``expire_every`` s."""
    info = store.engine.describe()
    sweep = expire_every if expire_every is not None else max(1.0, min(30.0, store.idle_timeout / 4))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        async def sweeper():
            while True:
                await asyncio.sleep(sweep)
                await to_thread.run_sync(store.expire)

        task = asyncio.create_task(sweeper())
        try:
            yield
        finally:
            task.cancel()
            await to_thread.run_sync(store.close_all)

    async def index(request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @_api
    async def api_info(request):
        return JSONResponse({"model": info, "max_conversations": store.max_conversations,
                             "idle_timeout_s": store.idle_timeout, "live_conversations": len(store),
                             "stages": list(CHART_STAGES), "demo_questions": list(DEMO_QUESTIONS),
                             "max_question_chars": MAX_QUESTION_CHARS, "max_upload_bytes": MAX_IMAGE_BYTES})

    @_api
    async def new_conversation(request):
        if request.query_params.get("bundled"):
            path = demo_image()
            data, name = path.read_bytes(), path.name
        else:
            name = unquote(request.headers.get("x-filename", "upload"))[:200]
            data = await _read_image_body(request, name)
        image = await to_thread.run_sync(decode_upload, data, name)
        conv = await to_thread.run_sync(store.create, image, name)
        log.info("conversation %s… opened (%s, %dx%d); %d live", conv.id[:6], name, conv.rgb.shape[1],
                 conv.rgb.shape[0], len(store))
        return JSONResponse(_conversation_json(conv, info), status_code=201)

    @_api
    async def get_conversation(request):
        return JSONResponse(_conversation_json(store.get(request.path_params["cid"]), info))

    @_api
    async def end_conversation(request):
        closed = await to_thread.run_sync(store.close, request.path_params["cid"])
        return JSONResponse({"closed": closed})

    @_api
    async def ask(request):
        cid = request.path_params["cid"]
        store.get(cid)  # an unknown or ended conversation answers before the body is read
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise QuestionError("the request body must be JSON: {\"question\": \"...\"}") from None
        q = body.get("question") if isinstance(body, dict) else None
        if not isinstance(q, str) or not q.strip():
            raise QuestionError("type a question first, e.g. “Segment the red circle.”")
        if len(q) > MAX_QUESTION_CHARS:
            raise QuestionError(f"the question is {len(q)} characters long, over this demo's limit of "
                                f"{MAX_QUESTION_CHARS}")
        t0 = time.perf_counter()
        conv, r = await to_thread.run_sync(store.ask, cid, q.strip())
        log.info("conversation %s… round %d in %.0f ms", cid[:6], r.round, (time.perf_counter() - t0) * 1e3)
        return JSONResponse(_round_json(cid, r))

    @_api
    async def image(request):
        conv = store.get(request.path_params["cid"])
        data, media = await to_thread.run_sync(conv.display_image)
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    def _round(request):
        conv = store.get(request.path_params["cid"])
        k = request.path_params["k"]
        return conv, conv.result(k), k

    @_api
    async def layer(request):
        conv, _, k = _round(request)
        data = await to_thread.run_sync(conv.layer_png, k)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @_api
    async def mask(request):
        conv, r, k = _round(request)
        data = await to_thread.run_sync(lambda: to_png(np.asarray(r.mask, dtype=np.uint8) * 255))
        return Response(data, media_type="image/png",
                        headers={"Content-Disposition": f'attachment; filename="round{k}_mask.png"'})

    @_api
    async def hit(request):
        conv = store.get(request.path_params["cid"])
        try:
            x, y = int(float(request.query_params["x"])), int(float(request.query_params["y"]))
        except (KeyError, ValueError):
            raise QuestionError("hit needs pixel coordinates x and y") from None
        h, w = conv.rgb.shape[:2]
        inside = 0 <= x < w and 0 <= y < h
        rounds = [int(r.round) for r in conv.results if inside and bool(np.asarray(r.mask)[y, x])]
        return JSONResponse({"rounds": rounds})

    @_api
    async def masks_zip(request):
        conv = store.get(request.path_params["cid"])

        def build():
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for r in conv.results:
                    z.writestr(f"round{r.round}_mask.png", to_png(np.asarray(r.mask, dtype=np.uint8) * 255))
            return buf.getvalue()

        return Response(await to_thread.run_sync(build), media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="segllm_masks.zip"'})

    @_api
    async def overlay(request):
        conv = store.get(request.path_params["cid"])
        if not conv.results:
            raise SessionError("no round has been answered yet: ask a question first")
        data = await to_thread.run_sync(lambda: to_png(legend_image(conv.rgb, conv.marks())))
        return Response(data, media_type="image/png",
                        headers={"Content-Disposition": 'attachment; filename="segllm_overlay.png"'})

    @_api
    async def conversation_json(request):
        conv = store.get(request.path_params["cid"])

        def build():
            rounds = []
            for r in conv.results:
                rj = _round_json(conv.id, r)
                del rj["layer"], rj["mask"]
                rj["mask_png_base64"] = base64.b64encode(to_png(np.asarray(r.mask, dtype=np.uint8) * 255)).decode()
                rounds.append(rj)
            doc = {"model": info, "image": {"name": conv.name, "width": int(conv.rgb.shape[1]),
                                            "height": int(conv.rgb.shape[0])}, "rounds": rounds}
            return json.dumps(doc, indent=1).encode()

        return Response(await to_thread.run_sync(build), media_type="application/json",
                        headers={"Content-Disposition": 'attachment; filename="segllm_conversation.json"'})

    cid = "/api/conversations/{cid:str}"
    routes = [
        Route("/", index),
        Route("/api/info", api_info),
        Route("/api/conversations", new_conversation, methods=["POST"]),
        Route(cid, get_conversation, methods=["GET"]),
        Route(cid, end_conversation, methods=["DELETE"]),
        Route(cid + "/rounds", ask, methods=["POST"]),
        Route(cid + "/image", image),
        Route(cid + "/rounds/{k:int}/layer.png", layer),
        Route(cid + "/rounds/{k:int}/mask.png", mask),
        Route(cid + "/hit", hit),
        Route(cid + "/masks.zip", masks_zip),
        Route(cid + "/overlay.png", overlay),
        Route(cid + "/conversation.json", conversation_json),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.store = store
    return app
