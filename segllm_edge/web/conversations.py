"""The web demo's conversations: one per browser user, each its own model session, within caps.

An :class:`Engine` opens sessions: :class:`LocalEngine` on a model from ``segllm_edge.load(...)``
(rounds run one at a time: they share the machine's cores), :class:`RemoteEngine` on a Triton
server through ``segllm_edge.connect(...)`` (the server schedules, and caps, its own conversations).
:class:`ConversationStore` holds at most ``max_conversations`` live conversations, ends those idle
for more than ``idle_timeout`` seconds, and refuses one more with a :class:`SessionError` that says so.
No torch here: the demo on an export runs in a torch-free environment.
"""
from __future__ import annotations

import io
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..drawing import Mark, mark_of, round_layer, tag_positions, to_png
from ..errors import ImageError, SessionError
from ..limits import check_image_bytes, check_image_size

log = logging.getLogger("segllm_edge.web")


class CapacityError(SessionError):
    """The demo already holds as many live conversations as it may (HTTP 503)."""


class BusyError(SessionError):
    """A round is already running in this conversation (HTTP 409)."""


def decode_upload(data: bytes, name: str = "upload") -> Image.Image:
    """Uploaded bytes → an RGB PIL image, upright (EXIF orientation applied), or ImageError naming the problem.
    The package's input limits (``segllm_edge.limits``: encoded bytes, pixels, aspect ratio) are checked
    before the pixels are decoded."""
    what = repr(name) if name else "the upload"
    if not data:
        raise ImageError(f"{what} is empty: choose an image file (PNG, JPEG, WebP, ...)")
    check_image_bytes(len(data), what)
    try:
        img = Image.open(io.BytesIO(data))
        check_image_size(img.width, img.height, what)
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return img                      # 16-bit/float: the package's image loader scales these itself
        return img.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{what} is not an image this demo can read ({type(exc).__name__}): "
                         "use PNG, JPEG, WebP, BMP, GIF or TIFF") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{what} could not be decoded as an image (truncated or corrupt?): {exc}") from None


class LocalEngine:
    """Sessions on a model loaded in this process (``segllm_edge.load``)."""

    parallel = False

    def __init__(self, model, max_kv_bytes: int | None = None):
        self.model = model
        self.max_kv_bytes = max_kv_bytes
        self.lock = threading.Lock()          # one round at a time: rounds share the machine's cores

    def describe(self) -> str:
        return repr(self.model)

    def open(self, image: Image.Image):
        session = self.model.session(image, max_kv_bytes=self.max_kv_bytes)
        return session, session.rgb           # the pixels the model saw: the masks are in this frame

    def ask(self, session, question: str):
        with self.lock:
            return session.ask(question)


class RemoteEngine:
    """Sessions on a SegLLM Triton server (``segllm_edge.connect``); the server caps its conversations."""

    parallel = True

    def __init__(self, client):
        self.client = client

    def describe(self) -> str:
        return f"Triton server at {self.client.url} (model {self.client.model!r})"

    def open(self, image: Image.Image):
        rgb = np.asarray(image.convert("RGB"))
        return self.client.session(Image.fromarray(rgb)), rgb   # sent as PNG of exactly these pixels

    def ask(self, session, question: str):
        return session.ask(question)


@dataclass
class Conversation:
    id: str
    session: object
    rgb: np.ndarray
    name: str
    created: float
    last_used: float
    results: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _layers: dict = field(default_factory=dict)
    _display: tuple | None = None

    def display_image(self) -> tuple[bytes, str]:
        """The image as the page shows it: (bytes, media type); PNG, JPEG above 4 megapixels."""
        if self._display is None:
            big = self.rgb.shape[0] * self.rgb.shape[1] > 4_000_000
            buf = io.BytesIO()
            Image.fromarray(self.rgb).save(buf, format="JPEG" if big else "PNG", quality=90)
            self._display = (buf.getvalue(), "image/jpeg" if big else "image/png")
        return self._display

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    def marks(self) -> list[Mark]:
        return [mark_of(r) for r in self.results]

    def result(self, k: int):
        if not 1 <= k <= len(self.results):
            raise SessionError(f"this conversation has no round {k} (it has {len(self.results)})")
        return self.results[k - 1]

    def layer_png(self, k: int) -> bytes:
        """Round k drawn on a transparent layer, as PNG (cached: a round never changes once answered)."""
        if k not in self._layers:
            marks = self.marks()[:k]
            tags = tag_positions(marks, self.rgb.shape[:2])
            self._layers[k] = to_png(round_layer(marks[k - 1], self.rgb.shape[:2], tag_at=tags.get(k)))
        return self._layers[k]


class ConversationStore:
    """Live conversations keyed by an unguessable id, at most ``max_conversations``, idle ones ended."""

    def __init__(self, engine, max_conversations: int = 8, idle_timeout: float = 600.0, clock=time.monotonic):
        if max_conversations < 1:
            raise ValueError("max_conversations must be at least 1")
        self.engine = engine
        self.max_conversations = int(max_conversations)
        self.idle_timeout = float(idle_timeout)
        self.clock = clock
        self._lock = threading.Lock()
        self._live: dict[str, Conversation] = {}

    def __len__(self) -> int:
        return len(self._live)

    def expire(self) -> int:
        """End conversations idle for longer than ``idle_timeout`` (never one whose round is running)."""
        now = self.clock()
        with self._lock:
            old = [c for c in self._live.values()
                   if c is not None and not c.busy and now - c.last_used > self.idle_timeout]
            for c in old:
                del self._live[c.id]
        for c in old:
            _close(c)
        if old:
            log.info("ended %d idle conversation(s); %d live", len(old), len(self._live))
        return len(old)

    def create(self, image: Image.Image, name: str = "") -> Conversation:
        self.expire()
        with self._lock:
            if len(self._live) >= self.max_conversations:
                raise CapacityError(
                    f"this demo is already serving {len(self._live)} conversations, its maximum "
                    f"(--max-conversations {self.max_conversations}); try again in a few minutes: a conversation "
                    f"idle for {self.idle_timeout / 60:.0f} min ends by itself")
            cid = secrets.token_urlsafe(18)
            # reserve the slot before the (possibly slow) session opening, so the cap holds under a burst
            self._live[cid] = None  # type: ignore[assignment]
        try:
            session, rgb = self.engine.open(image)
        except BaseException:
            with self._lock:
                self._live.pop(cid, None)
            raise
        now = self.clock()
        conv = Conversation(cid, session, np.ascontiguousarray(rgb), name, now, now)
        with self._lock:
            self._live[cid] = conv
        return conv

    def get(self, cid: str) -> Conversation:
        self.expire()
        with self._lock:
            conv = self._live.get(cid)
            if conv is not None:
                conv.last_used = self.clock()
        if conv is None:
            raise SessionError("this conversation is over (it was idle for more than "
                               f"{self.idle_timeout / 60:.0f} min, or the demo restarted): start a new conversation")
        return conv

    def ask(self, cid: str, question: str):
        conv = self.get(cid)
        if not conv.lock.acquire(blocking=False):
            raise BusyError("a round is already running in this conversation; wait for its answer")
        try:
            result = self.engine.ask(conv.session, question)
            conv.results.append(result)
            return conv, result
        finally:
            conv.last_used = self.clock()
            conv.lock.release()

    def close(self, cid: str) -> bool:
        with self._lock:
            conv = self._live.pop(cid, None)
        if conv is not None:
            _close(conv)
        return conv is not None

    def close_all(self) -> None:
        with self._lock:
            convs, self._live = [c for c in self._live.values() if c is not None], {}
        for c in convs:
            _close(c)


def _close(conv: Conversation | None) -> None:
    if conv is None:
        return
    try:
        conv.session.close()
    except Exception as exc:  # the server may be gone; the conversation is over either way
        log.warning("closing conversation %s…: %s", conv.id[:6], exc)
