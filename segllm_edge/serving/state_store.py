"""Where a server keeps its conversations' durable state: a directory, or Redis for several replicas.

A store maps a *key* to a saved state (:mod:`segllm_edge.runtime.session_state` bytes). The key is
:func:`state_key` of the conversation token, a one-way hash: the store never holds the token, so
whoever reads the store cannot speak for a conversation, and a client can only reach the state its
own token hashes to.

Both stores:

* write a state whole and atomically -- a reader sees the previous state or the new one, never a part;
* compare and set: ``put(key, state, expect=n)`` fails with a SessionStateError when the stored
  state's round count is neither ``n`` nor absent (another replica answered a round meanwhile);
* expire a state ``ttl_s`` after its last write or read (the server's idle timeout);
* cap the bytes of one state (``max_state_bytes``) and of all of them (``max_total_bytes``): a put over
  either is refused with :class:`~segllm_edge.errors.SessionStateError` and changes nothing.

:class:`DirectoryStore` (``serve --state-dir``): one file per conversation, written to a temporary
file, fsynced, renamed over the old one, and the directory fsynced; a flock serialises writers on one
host. :class:`RedisStore` (``serve --redis-url``, the ``redis`` client): one hash per conversation
(``state``, ``rounds``) with a native expiry, and an index of sizes so that one Lua script checks both
caps and the round count and writes, atomically for every replica.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .. import limits
from ..errors import ConfigError, SessionStateError
from ..runtime.session_state import HEADER_BYTES, peek_rounds

#: one conversation's state: the largest image a request may carry plus room for its rounds
DEFAULT_MAX_STATE_BYTES = limits.MAX_IMAGE_BYTES + 32 * 2**20
#: every conversation's together: a directory is disk, Redis is memory
DEFAULT_MAX_TOTAL_BYTES = {"directory": 16 * 2**30, "redis": 2 * 2**30}
SUFFIX = ".state"


def state_key(token: str) -> str:
    """The store key of a conversation token (sha256; the token itself is never stored)."""
    return hashlib.sha256(b"segllm-edge conversation state v1\0" + token.encode()).hexdigest()


class StateStore:
    """The interface; see the module's docstring. ``kind`` names the implementation."""

    kind = "?"

    def __init__(self, ttl_s: float | None, max_state_bytes: int | None, max_total_bytes: int | None):
        self.ttl_s = float(ttl_s) if ttl_s else None
        self.max_state_bytes = int(max_state_bytes or DEFAULT_MAX_STATE_BYTES)
        self.max_total_bytes = int(max_total_bytes or DEFAULT_MAX_TOTAL_BYTES[self.kind])

    def _check_size(self, state: bytes) -> None:
        if len(state) > self.max_state_bytes:
            raise SessionStateError(f"this conversation's state is {len(state)} bytes, over the store's cap of "
                                    f"{self.max_state_bytes} bytes per conversation; start a new session")

    def _over_total(self, others: int, state: bytes):
        return SessionStateError(f"the conversation store is full: {others} bytes stored, and this state's "
                                 f"{len(state)} would pass its cap of {self.max_total_bytes} bytes; retry later")

    def put(self, key: str, state: bytes, expect: int | None = None) -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def rounds(self, key: str) -> int | None: ...
    def delete(self, key: str) -> None: ...
    def total_bytes(self) -> int: ...

    def close(self) -> None:
        pass

    def describe(self) -> str:
        ttl = f"{self.ttl_s:g} s" if self.ttl_s else "never"
        return (f"{self.kind} store: at most {self.max_state_bytes} bytes per conversation, {self.max_total_bytes} "
                f"in total; states expire {ttl} after their last use")


def _conflict(key: str, have: int | None, expect: int) -> SessionStateError:
    """The stored state moved on (another replica answered a round of this conversation meanwhile), or is gone
    (closed through another replica, or expired)."""
    if have is None:
        return SessionStateError("this conversation was closed or expired meanwhile (through another replica?); "
                                 "the round was not applied: start a new session")
    return SessionStateError(f"another request answered round {have} of this conversation while this one answered "
                         f"round {expect + 1} (two replicas at once?); the round was not applied, retry")


# --------------------------------------------------------------------------------------------
# a directory
# --------------------------------------------------------------------------------------------
#: test seam: called with a stage name ("temp_written", "renamed") during a write (crash injection)
_fault_hook = None


def _fault(stage: str) -> None:
    if _fault_hook is not None:
        _fault_hook(stage)


class DirectoryStore(StateStore):
    """One ``<key>.state`` file per conversation in ``root`` (created if missing; may be shared by the
    replicas of one host). Writes: temp file, fsync, rename, fsync of the directory."""

    kind = "directory"

    def __init__(self, root: str | os.PathLike, ttl_s: float | None = 600.0, max_state_bytes: int | None = None,
                 max_total_bytes: int | None = None):
        super().__init__(ttl_s, max_state_bytes, max_total_bytes)
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"the state directory {self.root} is not a writable folder: {exc}") from None
        self._lock_path = self.root / ".lock"

    def _path(self, key: str) -> Path:
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            raise SessionStateError("internal: a state key is a sha256 hex digest")
        return self.root / (key + SUFFIX)

    def _expired(self, st: os.stat_result) -> bool:
        return self.ttl_s is not None and st.st_mtime < time.time() - self.ttl_s

    def _locked(self):
        import fcntl

        class _Lock:
            def __enter__(s):
                s.fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                fcntl.flock(s.fd, fcntl.LOCK_EX)

            def __exit__(s, *exc):
                fcntl.flock(s.fd, fcntl.LOCK_UN)
                os.close(s.fd)

        return _Lock()

    def _sweep(self) -> int:
        """Remove expired states and stale temp files; the bytes of the states that remain."""
        total = 0
        for e in os.scandir(self.root):
            try:
                st = e.stat()
                if e.name.endswith(SUFFIX):
                    if self._expired(st):
                        os.unlink(e.path)
                    else:
                        total += st.st_size
                elif e.name.endswith(".tmp") and st.st_mtime < time.time() - 600:
                    os.unlink(e.path)             # left by a writer that died between write and rename
            except FileNotFoundError:
                pass
        return total

    def put(self, key: str, state: bytes, expect: int | None = None) -> None:
        try:
            self._put(key, state, expect)
        except OSError as exc:           # full disk, I/O error, permissions: the store's error, without its path
            raise SessionStateError(f"the conversation store (a folder) could not be written: "
                                    f"{exc.strerror or type(exc).__name__}; the round was not applied") from None

    def _put(self, key: str, state: bytes, expect: int | None) -> None:
        self._check_size(state)
        path = self._path(key)
        with self._locked():
            have = self._rounds_unlocked(path)
            if expect is not None and have != expect:     # a missing state is a conflict too: closed elsewhere
                raise _conflict(key, have, expect)
            old = path.stat().st_size if have is not None else 0
            others = self._sweep() - old
            if others + len(state) > self.max_total_bytes:
                raise self._over_total(others, state)
            tmp = self.root / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    view = memoryview(state)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                _fault("temp_written")
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fault("renamed")
            dfd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def _rounds_unlocked(self, path: Path) -> int | None:
        try:
            with path.open("rb") as f:
                if self._expired(os.fstat(f.fileno())):
                    return None
                return peek_rounds(f.read(HEADER_BYTES))
        except FileNotFoundError:
            return None

    def rounds(self, key: str) -> int | None:
        return self._rounds_unlocked(self._path(key))

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            with path.open("rb") as f:
                if self._expired(os.fstat(f.fileno())):
                    return None
                data = f.read()
            os.utime(path)                       # read = used: the idle clock restarts
            return data
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        with self._locked():
            self._path(key).unlink(missing_ok=True)

    def total_bytes(self) -> int:
        with self._locked():
            return self._sweep()


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------
#: KEYS: the conversation's hash, the expiry index, the sizes hash, the running total. Every write costs
#: O(1) + the conversations expired since the last write (their sizes leave the total), never a scan of all —
#: except once when the total's key is gone (evicted, deleted by hand): it is rebuilt from the sizes hash.
_PUT = """
if redis.call('EXISTS', KEYS[4]) == 0 then
  local sum = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[3])) do sum = sum + tonumber(v) end
  redis.call('SET', KEYS[4], sum)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, m in ipairs(gone) do
  local s = redis.call('HGET', KEYS[3], m)
  if s then
    redis.call('HDEL', KEYS[3], m)
    redis.call('DECRBY', KEYS[4], s)
  end
end
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
local cur = redis.call('HGET', KEYS[1], 'rounds')
if ARGV[4] ~= '' and cur ~= ARGV[4] then return {-1, cur or ''} end
local mine = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
local total = tonumber(redis.call('GET', KEYS[4]) or '0')
local size = string.len(ARGV[2])
if total - mine + size > tonumber(ARGV[6]) then return {-2, tostring(total - mine)} end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'rounds', ARGV[3])
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
else
  redis.call('PERSIST', KEYS[1])
  redis.call('ZADD', KEYS[2], '+inf', ARGV[1])
end
redis.call('HSET', KEYS[3], ARGV[1], size)
redis.call('INCRBY', KEYS[4], size - mine)
return {0, ''}
"""

_DELETE = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local s = redis.call('HGET', KEYS[3], ARGV[1])
if s then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('DECRBY', KEYS[4], s)
end
return 1
"""

_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
end
return 1
"""


class RedisStore(StateStore):
    """States in Redis at ``url`` (``redis://host:port/db``), under ``prefix``: shared by every replica.
    Expiry is Redis's own (``PEXPIRE``); the caps are checked by one Lua script per write.

    Every key is under the hash tag ``{prefix}`` (``{segllm:}c:<key>``, ``{segllm:}index``, ...), so a script's
    keys lie in one slot (the total cap needs the conversations and the running total in one place: one slot
    holds this store, which its total cap sizes for one node). The client is a plain ``redis.Redis``: on Redis
    Cluster the URL must name the node owning that slot (others answer ``MOVED``)."""

    kind = "redis"

    def __init__(self, url: str, ttl_s: float | None = 600.0, max_state_bytes: int | None = None,
                 max_total_bytes: int | None = None, prefix: str = "segllm:", timeout_s: float = 10.0):
        super().__init__(ttl_s, max_state_bytes, max_total_bytes)
        try:
            import redis
        except ImportError:
            raise ConfigError("--redis-url needs the redis client: pip install 'segllm-edge[serve]'") from None
        self._redis = redis
        self.url = url
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        except ValueError as exc:
            raise ConfigError(f"unusable --redis-url {redact_url(url)!r}: {exc}") from None
        self.prefix = "{" + prefix + "}"          # the hash tag: every key of this store in one Cluster slot
        self._index, self._sizes, self._total = (self.prefix + n for n in ("index", "sizes", "total"))
        self._put = self.client.register_script(_PUT)
        self._delete = self.client.register_script(_DELETE)
        self._touch = self.client.register_script(_TOUCH)
        self._call(self.client.ping)

    def _call(self, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except self._redis.RedisError as exc:
            raise SessionStateError(f"the conversation store (Redis at {redact_url(self.url)}) failed: "
                                    f"{exc}") from None

    def _k(self, key: str) -> str:
        return self.prefix + "c:" + key

    def _ttl_ms(self) -> int:
        return int(self.ttl_s * 1000) if self.ttl_s else 0

    def put(self, key: str, state: bytes, expect: int | None = None) -> None:
        self._check_size(state)
        n = peek_rounds(state[:HEADER_BYTES])
        code, detail = self._call(self._put, keys=[self._k(key), self._index, self._sizes, self._total],
                                  args=[key, bytes(state), n, "" if expect is None else int(expect), self._ttl_ms(),
                                        self.max_total_bytes])
        if code == -1:
            raise _conflict(key, int(detail) if detail not in (b"", "", None) else None, int(expect))
        if code == -2:
            raise self._over_total(int(detail), state)

    def get(self, key: str) -> bytes | None:
        data = self._call(self.client.hget, self._k(key), "state")
        if data is not None:
            self._call(self._touch, keys=[self._k(key), self._index], args=[key, self._ttl_ms()])
        return data

    def rounds(self, key: str) -> int | None:
        v = self._call(self.client.hget, self._k(key), "rounds")
        return None if v is None else int(v)

    def delete(self, key: str) -> None:
        self._call(self._delete, keys=[self._k(key), self._index, self._sizes, self._total], args=[key])

    def total_bytes(self) -> int:
        now_ms = int(time.time() * 1000)
        live = set(self._call(self.client.zrangebyscore, self._index, now_ms, "+inf"))
        sizes = self._call(self.client.hgetall, self._sizes)
        return sum(int(v) for k, v in sizes.items() if k in live)

    def close(self) -> None:
        self.client.close()


def store_parameters(state_dir=None, redis_url: str | None = None, max_state_bytes: int | None = None,
                     max_total_bytes: int | None = None) -> dict[str, str]:
    """The ``segllm`` model's config parameters for a store (what :class:`~.bls.SegLLMBlsModel` reads back)."""
    from ..contracts.serving import PARAM_REDIS_URL, PARAM_STATE_DIR, PARAM_STATE_MAX_BYTES, PARAM_STATE_MAX_TOTAL_BYTES

    if state_dir and redis_url:
        raise ConfigError("give a state directory or a Redis URL, not both")
    out = {}
    if state_dir:
        out[PARAM_STATE_DIR] = str(Path(state_dir).resolve())
    if redis_url:
        # never the password: a config is readable by clients (/v2/models/segllm/config) and sits on disk; the
        # BLS takes the full URL from $SEGLLM_REDIS_URL in the server's environment (serve sets it)
        out[PARAM_REDIS_URL] = redact_url(str(redis_url))
    if out and max_state_bytes:
        out[PARAM_STATE_MAX_BYTES] = str(int(max_state_bytes))
    if out and max_total_bytes:
        out[PARAM_STATE_MAX_TOTAL_BYTES] = str(int(max_total_bytes))
    return out


#: the server's environment variable that carries the full Redis URL (with its password) to the BLS
ENV_REDIS_URL = "SEGLLM_REDIS_URL"


def redact_url(url: str) -> str:
    """``url`` without its password (``redis://user:secret@h:6379/0`` -> ``redis://user@h:6379/0``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = (f"{parts.username}@" if parts.username else "") + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redis_url_for_server(configured: str) -> str:
    """The URL the BLS connects to: ``$SEGLLM_REDIS_URL`` when it is the configured URL with its password, else
    the configured one."""
    full = os.environ.get(ENV_REDIS_URL)
    if full and redact_url(full) == configured:
        return full
    return configured


def open_store(state_dir=None, redis_url: str | None = None, ttl_s: float | None = 600.0,
               max_state_bytes: int | None = None, max_total_bytes: int | None = None) -> StateStore | None:
    """The store a server was configured with (None: conversations live in memory only)."""
    if state_dir and redis_url:
        raise ConfigError("give a state directory or a Redis URL, not both")
    if redis_url:
        return RedisStore(redis_url, ttl_s, max_state_bytes, max_total_bytes)
    if state_dir:
        return DirectoryStore(state_dir, ttl_s, max_state_bytes, max_total_bytes)
    return None


__all__ = ["StateStore", "DirectoryStore", "RedisStore", "open_store", "store_parameters", "state_key",
           "redact_url", "redis_url_for_server", "ENV_REDIS_URL",
           "DEFAULT_MAX_STATE_BYTES", "DEFAULT_MAX_TOTAL_BYTES"]
