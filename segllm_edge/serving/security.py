"""What ``segllm-edge serve`` exposes, and how it is locked down (Triton's own options, passed through).

* **Admin protocols** (shared-memory registration, model repository control, statistics, trace,
  logging) are always restricted: they need the header ``segllm-admin-key`` with ``admin_key``
  (``serve --admin-key-file`` / ``$SEGLLM_ADMIN_KEY``; without one the key is a value no client can send,
  so they are closed).
* **API key** (``serve --api-key-file`` / ``$SEGLLM_API_KEY``): inference, metadata and model-config need the header
  ``segllm-api-key: KEY`` over HTTP, ``triton-grpc-protocol-segllm-api-key: KEY`` over gRPC
  (``segllm_edge.connect(url, api_key=KEY)`` sends it); health stays open (readiness).
* **TLS** (``serve --tls-cert cert.pem --tls-key key.pem``): the gRPC endpoint speaks TLS
  (``connect(url, ssl=True, root_certificates=cert.pem)``). Triton's HTTP endpoint has no TLS: keep
  it on a loopback ``--address`` or put a TLS proxy in front.

The per-graph models (``seg_head``, ``mask_decoder``, ...) are reachable by whoever may call
inference, as Triton has no per-model access control; their python models check every request
against the manifest's shapes with bounded axes (:func:`segllm_edge.limits.graph_axis_limits`), so a
caller can make them do no more work than one round does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from .argv_secrets import ENV_PREFIX, placeholder

API_KEY_HEADER = "segllm-api-key"
ADMIN_KEY_HEADER = "segllm-admin-key"
ADMIN_PROTOCOLS = ("shared-memory", "model-repository", "statistics", "trace", "logging")
API_PROTOCOLS = ("inference", "metadata", "model-config")
#: Triton's gRPC endpoint expects a restricted-protocol header under this prefix (HTTP: the bare name)
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
#: the admin key when none is given: a CR LF can be in no HTTP/1.1, HTTP/2 or gRPC header value, so no
#: client can send it and the admin protocols stay closed (and nothing secret is on the command line)
CLOSED_KEY = "\r\nclosed"
MAX_KEY_CHARS = 4096


def check_key(key: str, what: str) -> str:
    """``key`` if a client can send it as a header value (printable ASCII, no spaces), else ConfigError."""
    if not isinstance(key, str) or not key:
        raise ConfigError(f"the {what} is empty")
    if len(key) > MAX_KEY_CHARS:
        raise ConfigError(f"the {what} has {len(key)} characters; at most {MAX_KEY_CHARS}")
    if not all("!" <= c <= "~" for c in key):
        raise ConfigError(f"the {what} must be printable ASCII without spaces (it is sent as a header value)")
    return key


def grpc_headers(api_key: str | None) -> dict | None:
    """The gRPC request headers that carry ``api_key`` (None without a key)."""
    return {GRPC_HEADER_PREFIX + API_KEY_HEADER: api_key} if api_key else None


def read_key_file(path, what: str) -> str:
    """The key in the file ``path`` (surrounding whitespace stripped), refused when other users may read it."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
        text = open(path, encoding="ascii").read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"the {what} file {path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
                          f"chmod 600 {path}")
    return check_key(text, f"{what} in {path}")


def choose_key(value: str | None, from_commandline: bool, file, what: str, flag: str, env: str) -> str | None:
    """The key given as ``flag`` (value; ``from_commandline`` when typed there, not from ``env``) or as
    ``flag-file``; a warning on stderr for a key typed on the command line (``ps`` shows it)."""
    if value is not None and file is not None:
        raise ConfigError(f"give the {what} once: {flag} (or ${env}) or {flag}-file")
    if file is not None:
        return read_key_file(file, what)
    if value is not None and from_commandline:
        import sys

        print(f"warning: {flag} on the command line is visible to every local user (ps); use ${env} or {flag}-file",
              file=sys.stderr)
    return None if value is None else check_key(value, what)


@dataclass(frozen=True)
class Exposure:
    api_key: str | None = field(default=None, repr=False)
    admin_key: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None

    def secrets(self) -> dict[str, str]:
        """The keys, by the environment names their placeholders in :meth:`tritonserver_args` refer to."""
        out = {}
        if self.admin_key is not None:
            out[ENV_PREFIX + "ADMIN"] = check_key(self.admin_key, "admin key")
        if self.api_key is not None:
            out[ENV_PREFIX + "API"] = check_key(self.api_key, "API key")
        return out

    def tritonserver_args(self) -> list[str]:
        """The tritonserver flags for this exposure: keys as placeholders (their values: :meth:`secrets`)."""
        keys = self.secrets()
        admin = placeholder(ENV_PREFIX + "ADMIN") if ENV_PREFIX + "ADMIN" in keys else CLOSED_KEY
        groups = [(ADMIN_PROTOCOLS, ADMIN_KEY_HEADER, admin)]
        if ENV_PREFIX + "API" in keys:
            groups.append((API_PROTOCOLS, API_KEY_HEADER, placeholder(ENV_PREFIX + "API")))
        args = []
        for protocols, header, value in groups:
            spec = f"{','.join(protocols)}:{header}={value}"
            args += [f"--grpc-restricted-protocol={spec}", f"--http-restricted-api={spec}"]
        if self.tls_cert or self.tls_key:
            if not (self.tls_cert and self.tls_key):
                raise ConfigError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
            args += ["--grpc-use-ssl=true", f"--grpc-server-cert={self.tls_cert}", f"--grpc-server-key={self.tls_key}"]
        return args
