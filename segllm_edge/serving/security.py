"""What ``segllm-edge serve`` exposes, and how it is locked down (Triton's own options, passed through).

* **Admin protocols** (shared-memory registration, model repository control, statistics, trace,
  logging) are always restricted: they need the header ``segllm-admin-key`` with ``admin_key``
  (``serve --admin-key``; by default a random key nobody is told, so they are closed).
* **API key** (``serve --api-key KEY``): inference, metadata and model-config need the header
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

import secrets
from dataclasses import dataclass

API_KEY_HEADER = "segllm-api-key"
ADMIN_KEY_HEADER = "segllm-admin-key"
ADMIN_PROTOCOLS = ("shared-memory", "model-repository", "statistics", "trace", "logging")
API_PROTOCOLS = ("inference", "metadata", "model-config")
#: Triton's gRPC endpoint expects a restricted-protocol header under this prefix (HTTP: the bare name)
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"


def grpc_headers(api_key: str | None) -> dict | None:
    """The gRPC request headers that carry ``api_key`` (None without a key)."""
    return {GRPC_HEADER_PREFIX + API_KEY_HEADER: api_key} if api_key else None


@dataclass(frozen=True)
class Exposure:
    api_key: str | None = None
    admin_key: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def tritonserver_args(self) -> list[str]:
        """The tritonserver flags for this exposure."""
        admin = self.admin_key or secrets.token_urlsafe(24)
        groups = [(ADMIN_PROTOCOLS, ADMIN_KEY_HEADER, admin)]
        if self.api_key:
            groups.append((API_PROTOCOLS, API_KEY_HEADER, self.api_key))
        args = []
        for protocols, header, value in groups:
            spec = f"{','.join(protocols)}:{header}={value}"
            args += [f"--grpc-restricted-protocol={spec}", f"--http-restricted-api={spec}"]
        if self.tls_cert or self.tls_key:
            if not (self.tls_cert and self.tls_key):
                from ..errors import ConfigError

                raise ConfigError("TLS needs both a certificate and its key (--tls-cert and --tls-key)")
            args += ["--grpc-use-ssl=true", f"--grpc-server-cert={self.tls_cert}", f"--grpc-server-key={self.tls_key}"]
        return args
