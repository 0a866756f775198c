"""All configuration in one typed place.

Precedence, lowest first: the defaults below, a YAML config file, `PDP_*` environment
variables, then command-line flags. Every field is documented in README's configuration table.

The settings are plain frozen, slotted dataclasses: reading `limits.max_id_length` on the
decision path is a slot read, `Settings(...)` with keyword arguments builds one without any
check (tests), and a spawned worker unpickles them without importing pydantic. Their
annotations carry the rules (`Literal` choices, `annotated_types` bounds, the `_Before` /
`_After` hooks below), which `load_settings` enforces through pydantic-settings, imported
only there: it costs the server ~8 MB of RSS and ~0.25 s of import time otherwise.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import os
import pickle
import re
import stat
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_type_hints
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import annotated_types as at
import yaml

from policy_engine.errors import PolicyEngineError

if TYPE_CHECKING:
    from pydantic import ValidationError
    from pydantic_settings import BaseSettings

ENV_PREFIX = "PDP_"
ENV_NESTED_DELIMITER = "__"


class ConfigError(PolicyEngineError, ValueError):
    """A setting that cannot be used; the message names the setting (one per line)."""


# --- validation rules carried by the annotations ---------------------------------------------


class _Before:
    """`Annotated` marker: pydantic runs `fn(raw)` before the type's own validation (the
    schema hook is only called by pydantic, so this module never imports it)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_before_validator_function(self.fn, handler(source))


class _After(_Before):
    """`Annotated` marker: pydantic runs `fn(value)` on the value its type validated."""

    __slots__ = ()

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self.fn, handler(source))


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _flag(raw: Any) -> bool:
    """The booleans accepted since the first loader (pydantic alone would also take t/f/y/n).

    Raises ValueError for anything else, e.g. "maybe" or 2."""
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(sorted(_TRUE | _FALSE))}")


def _lower(raw: Any) -> Any:
    return raw.strip().lower() if isinstance(raw, str) else raw


def _upper(raw: Any) -> Any:
    return raw.strip().upper() if isinstance(raw, str) else raw


MIN_INTERVAL_SECONDS = 1.0  # the shortest periodic walk of the policy tree (reload.resync)
MAX_CONFIG_BYTES = 1024 * 1024  # a config file larger than this is refused unread


def _finite(value: float) -> float:
    """Raises ValueError for NaN and the infinities (they pass pydantic's bounds)."""
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    # Checked here, not by an `at.Le` (which pydantic would test before `at.Gt`, so NaN
    # would be reported as too large).
    if value > MAX_SECONDS:
        raise ValueError(f"Input should be less than or equal to {MAX_SECONDS} (30 days)")
    return value


AUDIT_SINKS = ("file", "redis", "stdout")


def _sink_list(value: str) -> str:
    """`audit.sinks`: comma-separated names, each one of AUDIT_SINKS, at least one."""
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = sorted(set(names) - set(AUDIT_SINKS))
    if unknown:
        raise ValueError(
            f"unknown sink(s) {', '.join(unknown)}; choose from {', '.join(AUDIT_SINKS)}"
        )
    if not names:
        raise ValueError(f"name at least one of {', '.join(AUDIT_SINKS)}")
    return value


_PORT = re.compile(r"[0-9]{1,5}")
_HOST = re.compile(r"\[[0-9A-Fa-f:.%a-zA-Z]+\]|[^\s:\[\]/@,]*")


def _host_port_problem(text: str) -> str | None:
    """Why `text` is not `host:port`, `[v6]:port` or `:port` with a port 0-65535; None if it is.

    The reason never quotes `text` (the caller decides whether the value may be shown)."""
    host, sep, port = text.rpartition(":")
    if not sep or not _PORT.fullmatch(port) or int(port) > 65535:
        return "expected host:port with a port from 0 to 65535"
    if not _HOST.fullmatch(host):
        return "expected host:port (an IPv6 host in brackets: [::1]:port)"
    return None


_UNIX_PREFIXES = ("unix:", "unix-abstract:")


def _grpc_address(value: str) -> str:
    """A gRPC listen address: host:port (port 0 picks a free one) or unix:PATH.

    Raises ValueError for anything else, e.g. '127.0.0.1:99999' or 'nonsense'."""
    if value.startswith(_UNIX_PREFIXES) and value.partition(":")[2]:
        return value
    problem = _host_port_problem(value)
    if problem:
        raise ValueError(f"{problem} (or unix:PATH)")
    return value


def _optional_grpc_address(value: str) -> str:
    """Empty (off) or a gRPC listen address (see `_grpc_address`)."""
    return _grpc_address(value) if value else value


def _http_address(value: str) -> str:
    """Empty (off) or host:port for the metrics endpoint. Raises ValueError otherwise."""
    problem = _host_port_problem(value) if value else None
    if problem:
        raise ValueError(problem)
    return value


REDIS_SCHEMES = ("redis", "rediss", "unix")
_REDIS_HOST = re.compile(r"(\[[0-9A-Fa-f:.%a-zA-Z]+\]|[^\s:\[\]/@,]+)(?::([0-9]{1,5}))?")


def _redis_url(value: str) -> str:
    """Empty (off) or a URL redis-py opens: redis:// or rediss:// naming at least one
    host[:port] (several, comma-separated, for Sentinel), or unix://PATH.

    Raises ValueError without quoting the URL (it may carry a password)."""
    text = value.strip()
    if not text:
        return value
    try:
        parts = urlsplit(text)
    except ValueError:
        raise ValueError("not a URL") from None
    if parts.scheme not in REDIS_SCHEMES:
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("expected unix://PATH")
        return value
    for host in parts.netloc.rpartition("@")[2].split(","):
        found = _REDIS_HOST.fullmatch(host.strip())
        if not found or not 0 < int(found.group(2) or 6379) <= 65535:
            raise ValueError("expected redis[s]://[user:password@]host[:port][/db]")
    return value


_KEY_PREFIX = re.compile(r"[\x21-\x7A\x7C\x7E]{1,128}")


def _key_prefix(value: str) -> str:
    """`quota.key_prefix`: 1-128 printable ASCII characters without spaces or braces (a brace
    would move the keys' Cluster hash tag off the organization). Raises ValueError."""
    if not _KEY_PREFIX.fullmatch(value):
        raise ValueError("expected 1 to 128 printable ASCII characters, no spaces, no { or }")
    return value


ZONED_TIME_FORM = "an ISO 8601 time with a zone (e.g. 2026-11-30T12:00:00+00:00)"


def parse_zoned_time(text: str) -> datetime | None:
    """`text` as an instant (ISO 8601 with a zone), None when empty; raises ValueError."""
    text = text.strip()
    if not text:
        return None
    try:
        instant = datetime.fromisoformat(text)
    except ValueError:
        instant = None
    if instant is None or instant.tzinfo is None:
        raise ValueError(f"expected {ZONED_TIME_FORM}")
    return instant


def _zoned_time(value: str) -> str:
    """Empty or an ISO 8601 time with a zone (`bundle.not_before`). Raises ValueError."""
    parse_zoned_time(value)
    return value


# Upper bounds: past these a value is a typo, not a deployment (README's configuration table).
MAX_COUNT = 2**31 - 1  # C int: gRPC's message limit, queue and cache sizes
MAX_WORKERS = 256  # processes sharing one port
MAX_THREADS = 1024  # the retired `threads` setting (ignored, still bounded)
MAX_MILLIS = 3_600_000  # 1 hour: any timeout, wait, debounce or backoff in milliseconds
MAX_SECONDS = 30 * 86_400  # 30 days: any TTL or interval in seconds

Flag = Annotated[bool, _Before(_flag)]
# sizes, lengths, counts that must allow something
Count = Annotated[int, at.Ge(1), at.Le(MAX_COUNT)]
NonNegative = Annotated[int, at.Ge(0), at.Le(MAX_COUNT)]  # 0 has a meaning (off, none kept)
Millis = Annotated[int, at.Gt(0), at.Le(MAX_MILLIS)]  # timeouts
MillisOrOff = Annotated[int, at.Ge(0), at.Le(MAX_MILLIS)]  # 0: no wait
Seconds = Annotated[float, at.Gt(0), _After(_finite)]
SecondsOrOff = Annotated[float, at.Ge(0), _After(_finite)]


MAX_HOST_LENGTH = 253  # a DNS name's text form at most (RFC 1035 section 2.3.4, RFC 1123)


def _otlp_endpoint(value: str) -> str:
    """`tracing.otlp_endpoint`: empty (the exporter's own default, `OTEL_EXPORTER_OTLP_ENDPOINT`
    or `localhost:4317`) or `http://host:port` (plaintext) / `https://host:port` (TLS), as
    the OTLP/gRPC exporter takes it; no path, query or credentials."""
    text = value.strip()
    if not text:
        return value
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https") or "@" in parts.netloc:
        raise ValueError("expected http://host:port or https://host:port")
    problem = _host_port_problem(parts.netloc)
    if problem is not None:
        raise ValueError(f"expected http://host:port or https://host:port ({problem})")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("expected http://host:port or https://host:port, without a path")
    if len(parts.netloc.rpartition(":")[0]) > MAX_HOST_LENGTH:
        # Never resolvable, and the exporter would write all of it in every error line.
        raise ValueError(f"expected a host of at most {MAX_HOST_LENGTH} characters")
    return value


def _ratio(value: float) -> float:
    """A share from 0 to 1 (NaN is named as such, not as out of bounds)."""
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    if not 0 <= value <= 1:
        raise ValueError("expected a number from 0 to 1")
    return value


_SERVICE_NAME = re.compile(r"[!-~]{1,128}")


def _service_name(value: str) -> str:
    """`tracing.service_name`: 1 to 128 printable ASCII characters without spaces (the
    `service.name` resource attribute every span carries)."""
    if not _SERVICE_NAME.fullmatch(value):
        raise ValueError("expected 1 to 128 printable ASCII characters without spaces")
    return value


def _interval_or_off(value: float) -> float:
    """0 (off) or at least MIN_INTERVAL_SECONDS: a walk of the whole tree back to back would
    hold a core (1e-300, or milliseconds typed as seconds)."""
    if 0 < value < MIN_INTERVAL_SECONDS:
        raise ValueError(f"expected 0 (off) or at least {MIN_INTERVAL_SECONDS:g} seconds")
    return value


IntervalOrOff = Annotated[float, at.Ge(0), _After(_finite), _After(_interval_or_off)]
Workers = Annotated[int, at.Ge(1), at.Le(MAX_WORKERS)]
Threads = Annotated[int, at.Ge(1), at.Le(MAX_THREADS)]
GrpcAddress = Annotated[str, _After(_grpc_address)]
OptionalGrpcAddress = Annotated[str, _After(_optional_grpc_address)]
HttpAddress = Annotated[str, _After(_http_address)]
RedisUrl = Annotated[str, _After(_redis_url)]
ZonedTime = Annotated[str, _After(_zoned_time)]
RedisMode = Annotated[Literal["standalone", "sentinel", "cluster"], _Before(_lower)]
WhenFull = Annotated[Literal["block", "drop"], _Before(_lower)]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], _Before(_upper)]
LogFormat = Annotated[Literal["text", "json"], _Before(_lower)]
SinkList = Annotated[str, _After(_sink_list)]
KeyPrefix = Annotated[str, _After(_key_prefix)]
TraceExporter = Annotated[Literal["otlp", "console"], _Before(_lower)]
Ratio = Annotated[float, _After(_ratio)]
OtlpEndpoint = Annotated[str, _After(_otlp_endpoint)]
ServiceName = Annotated[str, _After(_service_name)]


# --- the settings ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds on every request, so no input can exhaust the server."""

    max_id_length: Count = 256
    max_scope_length: Count = 256
    max_attributes: NonNegative = 64  # entries per attribute map, at every level
    max_attribute_depth: Count = 8
    max_attribute_bytes: Count = 16 * 1024  # serialized size of one attribute map
    max_string_length: Count = 4096  # any string value inside attributes
    max_batch_size: Count = 1000
    max_message_bytes: Count = 8 * 1024 * 1024  # gRPC receive limit


@dataclass(frozen=True, slots=True)
class PolicyLimits:
    """Bounds on the policy files themselves, checked before any byte is parsed."""

    max_file_bytes: Count = 1024 * 1024  # one policy, JWKS or bundle file
    max_set_bytes: Count = 8 * 1024 * 1024  # every file a policy set reads, together


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The two-level decision cache: in-process LRU in front of Redis shared by all replicas."""

    enabled: Flag = True
    local_max_entries: NonNegative = 100_000  # 0 turns the in-process level off
    local_ttl_seconds: Seconds = 10.0
    # Empty: in-process only. redis://, rediss:// (TLS), with user:password@ for auth.
    redis_url: RedisUrl = ""
    redis_mode: RedisMode = "standalone"
    redis_sentinel_master: str = "mymaster"  # with redis_mode=sentinel
    redis_ttl_seconds: Seconds = 300.0
    redis_timeout_ms: Millis = 50  # connect and socket timeout: a slow Redis is a missing Redis
    redis_pool_size: Count = 32
    breaker_failure_threshold: Count = 3  # consecutive failures that open the breaker
    breaker_reset_seconds: SecondsOrOff = 2.0  # then one probe is let through after this long
    key_prefix: str = "pdp:v1"
    # The secret that signs every Redis value (keyed BLAKE2b over the cache key and the value),
    # so whoever can write to Redis cannot plant or move a decision. Required with redis_url,
    # at least 32 bytes (`openssl rand -hex 32`), the same on every replica; inline or, better,
    # in a file (one line). See policy_engine/cache/signing.py.
    redis_signing_key: str = ""
    redis_signing_key_file: str = ""
    # Keys whose entries are still accepted but never written (rotation: the previous key, or
    # the next one staged before it signs): comma-separated, and/or a file with one per line.
    redis_verify_keys: str = ""
    redis_verify_keys_file: str = ""


@dataclass(frozen=True, slots=True)
class QuotaSettings:
    """Where the quotas policies declare are counted (policy_engine/quota/)."""

    # Empty: the cache's `cache.redis_url` when that is set (whether or not the cache is
    # enabled), else an in-process counter per process (N replicas or workers then allow up
    # to N times a quota). Opened in `cache.redis_mode` with the cache's pool size, Sentinel
    # master and breaker settings.
    redis_url: RedisUrl = ""
    key_prefix: KeyPrefix = "pdp:quota"
    # Connect, read and pool wait. A counting call runs a script: a little above a GET's.
    redis_timeout_ms: Millis = 100

    def effective_redis_url(self, cache: CacheSettings) -> str:
        """The Redis the counters live in ("" for the in-process counters)."""
        return self.redis_url.strip() or cache.redis_url.strip()


@dataclass(frozen=True, slots=True)
class ReloadSettings:
    """Hot reload of the policy directory."""

    watch: Flag = True  # watch the directory; SIGHUP always reloads
    debounce_ms: MillisOrOff = 150  # changes closer together than this are applied once
    # While watching, compare the tree with what the last load read this often and reload on
    # a difference inotify did not report (a hard link made outside the tree, NFS); 0: off.
    resync_seconds: IntervalOrOff = 30.0


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """The decision audit log: a bounded queue, a background writer, tamper-evident sinks."""

    enabled: Flag = False
    sinks: SinkList = "file"  # comma-separated: file, redis, stdout
    file_path: Path = Path("audit/audit.jsonl")  # "{worker}" becomes the worker's index
    file_max_bytes: Count = 100 * 1024 * 1024  # rotate once the live file reaches this size
    file_keep: NonNegative = 10  # rotated files kept
    file_fsync: Flag = False  # fsync every batch (survives power loss, costs throughput)
    redis_url: RedisUrl = ""  # required with the redis sink
    redis_stream: str = "pdp:audit"
    redis_maxlen: NonNegative = 1_000_000  # XADD MAXLEN ~ (0: never trimmed)
    redis_timeout_ms: Millis = 1000
    queue_size: Count = 10_000  # records waiting for the writer
    when_full: WhenFull = "block"  # block (wait up to block_timeout_ms, then drop) | drop
    block_timeout_ms: MillisOrOff = 10
    sink_buffer: Count = 100_000  # records a failing sink holds before dropping (and saying so)
    retry_max_ms: MillisOrOff = 5000  # a failing sink is retried with backoff up to this interval
    checkpoint_every: NonNegative = 1000  # records between signed checkpoints (0: only by time)
    checkpoint_seconds: SecondsOrOff = 10.0  # at most this long between checkpoints (0: by count)
    signing_key_file: str = ""  # PEM Ed25519 private key (pdp audit keygen); empty: unsigned
    required: Flag = False  # health NOT_SERVING while a sink cannot write


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS on the gRPC port; with `client_ca_file`, decision calls need a client certificate."""

    cert_file: str = ""  # PEM server certificate (chain); empty = plaintext
    key_file: str = ""
    client_ca_file: str = ""  # PEM CA bundle for client certificates (mutual TLS)


@dataclass(frozen=True, slots=True)
class CallerAuthSettings:
    """Bearer JWTs the broker sends in call metadata (`authorization: Bearer ...`)."""

    jwks_file: str = ""  # keys that sign callers' tokens; empty = no bearer check
    # Both required with jwks_file (cross_checks): the `aud` and `iss` the broker's tokens
    # carry, so that a token the same keys signed for another service is refused.
    audience: str = ""
    issuer: str = ""


@dataclass(frozen=True, slots=True)
class BundleSettings:
    """Signed policies: with a public key set, only a directory signed by its private key loads."""

    public_key_file: str = ""  # PEM (Ed25519, P-256 or RSA); empty = signatures not required
    # ISO 8601 time with a zone: bundles signed earlier are refused, also at startup (a
    # running server already refuses any bundle signed before the one it serves).
    not_before: ZonedTime = ""


@dataclass(frozen=True, slots=True)
class TransportSettings:
    """HTTP/2 connection limits of the gRPC port(s): idle, silent and half-open connections are
    closed instead of held forever (gRPC core's channel arguments of the same names)."""

    # A connection that has not finished its handshake (TLS and the HTTP/2 preface) in this
    # time is closed: a TCP connection that sends nothing.
    handshake_timeout_ms: Millis = 20_000
    # The server pings a connection idle this long, and closes it when the ping is not
    # answered within `keepalive_timeout_ms` (a peer that vanished: half-open).
    keepalive_time_ms: Millis = 60_000
    keepalive_timeout_ms: Millis = 20_000
    # A connection with no RPC in flight for this long is closed (0: never).
    max_connection_idle_ms: MillisOrOff = 300_000
    # Any connection is closed after this long (0: never), after up to `..._grace_ms` for the
    # RPCs in flight; spreads long-lived clients over `--workers` processes and replicas.
    # Unset (None): 30 s with several workers (their kernel-hashed shares are redrawn, see
    # server/balance.py), never with one.
    max_connection_age_ms: MillisOrOff | None = None
    max_connection_age_grace_ms: MillisOrOff = 10_000
    # After a stop signal, health reads NOT_SERVING at once but calls are still taken for this
    # long before the server stops taking new ones (OPA's --shutdown-wait-period): load
    # balancers and health-watching clients move away first, so a rolling restart drops none.
    shutdown_wait_ms: MillisOrOff = 0
    # Clients' keepalive pings: no more often than this (a flood gets GOAWAY ENHANCE_YOUR_CALM).
    min_ping_interval_ms: Millis = 10_000
    permit_keepalive_without_calls: Flag = False


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """OpenTelemetry traces of the decision calls (policy_engine/tracing/; the `tracing` extra).

    Off: nothing of OpenTelemetry is imported and no call pays for it."""

    enabled: Flag = False
    exporter: TraceExporter = "otlp"  # otlp (OTLP/gRPC to a collector) | console (stdout)
    # Empty: the exporter's default (OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4317).
    otlp_endpoint: OtlpEndpoint = ""
    service_name: ServiceName = "policy-engine"
    # Share of new traces recorded (0..1); a call the broker's trace context marks sampled
    # (or not) follows that parent's choice.
    sample_ratio: Ratio = 1.0


@dataclass(frozen=True, slots=True)
class Settings:
    address: GrpcAddress = "127.0.0.1:50051"
    policy_dir: Path = Path("policies")
    workers: Workers = 1  # processes sharing the port (one Python process uses one core)
    # Ignored: calls and Redis lookups run on the event loop. Accepted so that existing
    # configurations load; any other value than the default logs one warning (build_decider).
    threads: Threads = 16
    docs_base_url: str = "https://docs.kontext.dev"
    log_level: LogLevel = "INFO"
    log_format: LogFormat = "text"  # json: one object per line (policy_engine/logs.py)
    limits: RequestLimits = field(default_factory=RequestLimits)
    policy_limits: PolicyLimits = field(default_factory=PolicyLimits)
    cache: CacheSettings = field(default_factory=CacheSettings)
    quota: QuotaSettings = field(default_factory=QuotaSettings)
    reload: ReloadSettings = field(default_factory=ReloadSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    caller_auth: CallerAuthSettings = field(default_factory=CallerAuthSettings)
    bundle: BundleSettings = field(default_factory=BundleSettings)
    # Prometheus metrics over HTTP; empty turns the endpoint off.
    metrics_address: HttpAddress = "127.0.0.1:9464"
    # A second, plaintext gRPC port serving only grpc.health.v1, for probes and load balancers
    # that cannot present the callers' credentials (under mutual TLS the main port refuses
    # them at the handshake). Empty: health is served on `address` only.
    health_address: OptionalGrpcAddress = ""
    # HTTP/2 connection limits: keepalive, idle and age (TransportSettings).
    transport: TransportSettings = field(default_factory=TransportSettings)
    # OpenTelemetry traces (TracingSettings): off by default.
    tracing: TracingSettings = field(default_factory=TracingSettings)

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes` (not validated: `load_settings` is where checks happen)."""
        return dataclasses.replace(self, **changes)


# --- showing settings ------------------------------------------------------------------------

# Secrets never printed: by `pdp config check` or in an error message.
SECRET_SETTINGS = frozenset({"cache.redis_signing_key", "cache.redis_verify_keys"})
URL_SETTINGS = frozenset(
    {"cache.redis_url", "audit.redis_url", "quota.redis_url", "tracing.otlp_endpoint"}
)
MASK = "***"


def mask_url(url: str) -> str:
    """`url` with any password (in `user:password@` or a `password=` query value) masked."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL at all: it may be anything, show nothing of it
        return MASK if url else url
    netloc = parts.netloc
    userinfo, at_sign, hosts = netloc.rpartition("@")
    if at_sign and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hosts}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if k.lower() == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _masked(name: str, value: Any) -> Any:
    if name in SECRET_SETTINGS and value:
        return MASK
    if name in URL_SETTINGS and isinstance(value, str):
        return mask_url(value)
    return value


def settings_dict(settings: Any, *, prefix: str = "") -> dict[str, Any]:
    """`settings` (any of the classes above) as nested plain data, secrets masked.

    Shape: {field: str | int | float | bool | {...}}; paths become strings."""
    shown: dict[str, Any] = {}
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if dataclasses.is_dataclass(value):
            shown[item.name] = settings_dict(value, prefix=f"{prefix}{item.name}.")
        else:
            shown[item.name] = _masked(
                prefix + item.name, str(value) if isinstance(value, Path) else value
            )
    return shown


# --- loading ---------------------------------------------------------------------------------


def read_config_text(path: Path) -> str:
    """The config file's text: a regular file of at most MAX_CONFIG_BYTES, UTF-8. Raises
    ConfigError (a FIFO, device or directory is refused unread: it could block or never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"config file {path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not UTF-8 (byte {exc.start})") from None


def _read_config_file(path: Path, text: str | None = None) -> Mapping[str, Any]:
    """The file's one mapping, read as strictly as policy files (policy_engine.policy.yamlpos):
    a duplicate key, anchor, alias, merge key or tag is refused with its line, so no setting
    (a bundle key, a signing key) can be silently overridden or dropped. Plain scalars stay
    text as written and are typed by the setting they belong to, as environment values are."""
    # Imported here: the policy package imports this module (PolicyLimits).
    from policy_engine.policy.yamlpos import error_line, load_documents

    if text is None:
        text = read_config_text(path)
    try:
        parsed = load_documents(text, what="config files")
    except yaml.YAMLError as exc:
        problem = str(getattr(exc, "problem", None) or exc).strip()
        raise ConfigError(f"config file {path}:{error_line(exc)}: {problem}") from exc
    fatal = [p for p in parsed.problems if not p.ambiguous]
    if fatal:
        raise ConfigError("\n".join(f"config file {path}:{p.line}: {p.message}" for p in fatal))
    if not parsed.documents:
        return {}
    if len(parsed.documents) > 1:
        raise ConfigError(f"config file {path}: expected one YAML document")
    loaded = parsed.documents[0].value
    if loaded is None:
        return {}
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return loaded


@dataclass(frozen=True, slots=True)
class _Sources:
    """What one `load_settings` call reads, handed to the pydantic-settings sources, and
    what names each source's values in errors."""

    file_values: Mapping[str, Any]
    environ: Mapping[str, str]
    overrides: Mapping[str, Any]
    config_file: Path | None = None
    flag_names: Mapping[str, str] = field(default_factory=dict)


# The sources of the call in progress: pydantic-settings builds its sources from the class,
# so per-call inputs travel through a context variable (safe across threads and tasks).
_SOURCES: contextvars.ContextVar[_Sources] = contextvars.ContextVar("pdp_config_sources")


@functools.cache
def _loader() -> type[BaseSettings]:
    """The pydantic-settings class mirroring `Settings` (fields, annotations and defaults taken
    from the dataclass, so the two cannot drift). Built on first use: importing pydantic costs."""
    from pydantic import Field, create_model
    from pydantic_settings import (
        BaseSettings,
        EnvSettingsSource,
        InitSettingsSource,
        PydanticBaseSettingsSource,
        SettingsConfigDict,
    )

    class MappingEnvSource(EnvSettingsSource):
        """`PDP_*` variables of the call's mapping (not always os.environ). As the first
        loader: the prefix is matched as written, the rest of the name in any case."""

        def _load_env_vars(self) -> Mapping[str, str | None]:
            environ = _SOURCES.get().environ
            return {k.lower(): v for k, v in environ.items() if k.startswith(ENV_PREFIX)}

    class Base(BaseSettings):
        model_config = SettingsConfigDict(
            env_prefix=ENV_PREFIX,
            env_nested_delimiter=ENV_NESTED_DELIMITER,
            case_sensitive=False,
            enable_decoding=False,  # PDP_LIMITS='{...}' is not a way in, as before
            extra="forbid",
            frozen=True,
        )

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            # Highest first: flags (init arguments), environment, config file.
            file_values = dict(_SOURCES.get().file_values)
            return (
                init_settings,
                MappingEnvSource(settings_cls),
                InitSettingsSource(settings_cls, file_values),
            )

    hints = get_type_hints(Settings, include_extras=True)
    fields: dict[str, Any] = {}
    for item in dataclasses.fields(Settings):
        if item.default is not dataclasses.MISSING:
            fields[item.name] = (hints[item.name], item.default)
        elif item.default_factory is not dataclasses.MISSING:
            fields[item.name] = (hints[item.name], Field(default_factory=item.default_factory))
        else:  # every setting has a default: a missing one is a bug here, not a user's error
            raise TypeError(f"Settings.{item.name} has no default")
    return create_model("Settings", __base__=Base, **fields)


def _lookup(values: Mapping[str, Any], path: list[str]) -> bool:
    """Whether nested `values` holds `path`."""
    target: Any = values
    for part in path:
        if not isinstance(target, Mapping) or part not in target:
            return False
        target = target[part]
    return True


def _origin(path: list[str], sources: _Sources) -> str:
    """Where the value at `path` came from, highest precedence first: ' (from X)' or ''."""
    if _lookup(sources.overrides, path):
        return f" (from {sources.flag_names.get('.'.join(path), 'the command line')})"
    wanted = ENV_NESTED_DELIMITER.join(path).lower()
    for key in sources.environ:
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() == wanted:
            return f" (from {key})"
    if _lookup(sources.file_values, path):
        return f" (from {sources.config_file})"
    return ""


def _unknown_env(environ: Mapping[str, str]) -> list[tuple[list[str], str]]:
    """`PDP_*` names that are no setting, which pydantic-settings skips silently at the top
    level (it reads fields, not variables) and below a plain setting: (path, variable)."""
    unknown: list[tuple[list[str], str]] = []
    for key in environ:
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX) :].lower().split(ENV_NESTED_DELIMITER)
        kind: Any = Settings
        for depth, part in enumerate(path):
            names = (
                {f.name for f in dataclasses.fields(kind)}
                if dataclasses.is_dataclass(kind)
                else set()
            )
            if part not in names:
                # Unknown names inside a group are reported by the validation itself.
                if depth == 0 or not names:
                    unknown.append((path, key))
                break
            kind = get_type_hints(kind)[part]
    return unknown


# What an error may quote of a bad value: only a short scalar of a setting that is known not
# to hold a secret. Anything else (a group given as text, a key, a password, a URL, a path
# named like a key file where the key itself may have been pasted) is described instead.
_MAY_HOLD_SECRETS = re.compile(r"key|password|passwd|secret|token|credential|url|auth", re.I)
_QUOTED_MAX = 40  # characters of repr()


def _leaf_settings(kind: Any = Settings, prefix: str = "") -> frozenset[str]:
    """Every plain setting's dotted name, e.g. 'cache.redis_mode' (not the groups)."""
    names: set[str] = set()
    for item in dataclasses.fields(kind):
        inner = get_type_hints(kind)[item.name]
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            names |= _leaf_settings(inner, f"{prefix}{item.name}.")
        else:
            names.add(prefix + item.name)
    return frozenset(names)


@functools.cache
def _quotable() -> frozenset[str]:
    """The settings whose bad values an error may quote (see `_shown`)."""
    return (
        frozenset(name for name in _leaf_settings() if not _MAY_HOLD_SECRETS.search(name))
        - SECRET_SETTINGS
        - URL_SETTINGS
    )


def _described(value: Any) -> str:
    """What `value` is, without any of its content: its kind and size."""
    if isinstance(value, str):
        return f"a text of {len(value)} characters"
    if isinstance(value, Mapping):
        return f"a mapping of {len(value)} entries"
    if isinstance(value, (list, tuple, set, frozenset)):
        return f"a list of {len(value)} items"
    return f"a value of type {type(value).__name__}"


def _shown(name: str, value: Any) -> str:
    """`value` as an error about setting `name` may show it: quoted (repr) when `name` is known
    not to hold a secret and the value is a scalar of at most `_QUOTED_MAX` characters
    quoted, otherwise only described ("a text of 64 characters")."""
    if name in _quotable() and isinstance(value, (str, int, float, bool)):
        text = repr(value)
        if len(text) <= _QUOTED_MAX:
            return text
    return _described(value)


def _config_error(exc: ValidationError, sources: _Sources) -> list[str]:
    """One line per problem: 'setting a.b: what is wrong, got X (from where)'."""
    lines = []
    for error in exc.errors(include_url=False):
        path = [str(part) for part in error["loc"]]
        name = ".".join(path)
        where = _origin(path, sources)
        if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            lines.append(f"setting {name}: unknown setting{where}")
            continue
        message = re.sub(r"^(Value error|Assertion failed), ", "", error["msg"])
        lines.append(f"setting {name}: {message}, got {_shown(name, error['input'])}{where}")
    return lines


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    flag_names: Mapping[str, str] | None = None,
    config_text: str | None = None,
) -> Settings:
    """Settings from defaults, `config_file`, `environ` (PDP_*) and `overrides`, in that order,
    every value validated by its annotation (pydantic-settings). `config_text`: the config
    file's text when already read (read_config_text); `config_file` then names it in errors.

    `overrides` are the flags' values, nested like the settings; None means "not given".
    `flag_names` ({"cache.redis_url": "--redis-url"}) names them in errors; otherwise they
    are "the command line".
    Raises ConfigError naming every setting that cannot be used, one per line, with where its
    value came from; or naming the config file's line when the file cannot be read as one
    unambiguous mapping.
    """
    from pydantic import ValidationError

    sources = _Sources(
        file_values=(
            _read_config_file(config_file, config_text) if config_file is not None else {}
        ),
        environ=os.environ if environ is None else environ,
        overrides={k: v for k, v in (overrides or {}).items() if v is not None},
        config_file=config_file,
        flag_names=flag_names or {},
    )
    problems = [
        f"setting {'.'.join(path)}: unknown setting (from {key})"
        for path, key in _unknown_env(sources.environ)
    ]
    token = _SOURCES.set(sources)
    try:
        loaded = _loader()(**sources.overrides)
    except ValidationError as exc:
        problems += _config_error(exc, sources)
        loaded = None
    finally:
        _SOURCES.reset(token)
    if problems:
        raise ConfigError("\n".join(problems))
    settings = Settings(
        **{item.name: getattr(loaded, item.name) for item in dataclasses.fields(Settings)}
    )
    problems = [
        f"setting {name}: {message}{_origin(name.split('.'), sources)}"
        for name, message in cross_checks(settings)
    ]
    if problems:
        raise ConfigError("\n".join(problems))
    return settings


def _explicit_port(address: str) -> bool:
    """Whether `address` names a port other than 0 (workers can share only such a port)."""
    _, sep, port = address.rpartition(":")
    return bool(sep) and _PORT.fullmatch(port) is not None and int(port) > 0


def shared_port_problems(settings: Settings) -> list[str]:
    """`workers` > 1 share `address` (and `health_address`), so each needs a port other than
    0; one 'setting NAME: ...' line per address without one, the server's own message.

    Not part of `load_settings` (no I/O needed, though): `pdp serve` has always reported a
    missing signing key alone when both are wrong, so this runs where the server runs it,
    after the settings load, and `pdp config check` runs it too."""
    if settings.workers <= 1:
        return []
    return [
        f"setting {name}: workers > 1 need an explicit port to share, got {address!r}"
        for name in ("address", "health_address")
        if (address := getattr(settings, name)) and not _explicit_port(address)
    ]


def cross_checks(settings: Settings) -> list[tuple[str, str]]:
    """The rules that tie settings together, none needing I/O: [(dotted setting, what is
    wrong)], empty when the combination is usable. `load_settings` runs them, so `pdp config
    check` refuses what `pdp serve` would (the server still checks what needs files: reading
    key files, certificates, and the shared port, `shared_port_problems`; `pdp config
    check` runs those too, see cli/main.py)."""
    found: list[tuple[str, str]] = []
    tls = settings.tls
    if tls.client_ca_file and not (tls.cert_file and tls.key_file):
        found.append(("tls.client_ca_file", "needs tls.cert_file and tls.key_file"))
    elif bool(tls.cert_file) != bool(tls.key_file):
        missing = "tls.key_file" if tls.cert_file else "tls.cert_file"
        found.append((missing, "TLS needs both tls.cert_file and tls.key_file"))
    cache = settings.cache
    if cache.enabled and cache.redis_url.strip():
        if cache.redis_mode != "standalone" and urlsplit(cache.redis_url.strip()).scheme == "unix":
            found.append(("cache.redis_url", "unix:// only with redis_mode standalone"))
        found += _signing_key_problems(cache)
    quota_url = settings.quota.redis_url.strip()
    if quota_url and cache.redis_mode != "standalone" and urlsplit(quota_url).scheme == "unix":
        found.append(("quota.redis_url", "unix:// only with cache.redis_mode standalone"))
    found += caller_auth_problems(settings.caller_auth)
    audit = settings.audit
    names = {n.strip().lower() for n in audit.sinks.split(",")}
    if audit.enabled and "redis" in names and not audit.redis_url.strip():
        found.append(("audit.redis_url", "required by the redis sink"))
    return found


def caller_auth_problems(caller_auth: CallerAuthSettings) -> list[tuple[str, str]]:
    """With `caller_auth.jwks_file` (bearer tokens checked), `audience` and `issuer` are
    required: a key set usually signs tokens for many services (an IdP's), and a token
    minted for any of them must not authenticate as the broker (RFC 8725 section 3.9,
    RFC 9068 section 4). Without it, neither may be set, and it may not be blank: those
    say bearer tokens were meant to be checked, and none would be (an empty variable in a
    template would leave the PDP open to every caller). [(dotted setting, what is wrong)];
    empty when usable or off. Values are never quoted (they may be secrets)."""
    if not caller_auth.jwks_file.strip():
        if caller_auth.jwks_file:
            return [
                (
                    "caller_auth.jwks_file",
                    "is blank: name the JWKS file of the keys that sign the broker's tokens, "
                    "or leave it empty (no bearer token checked)",
                )
            ]
        return [
            (
                f"caller_auth.{name}",
                "applies only with caller_auth.jwks_file, which is empty: no bearer token "
                "would be checked at all (set jwks_file, or leave audience and issuer empty)",
            )
            for name in ("audience", "issuer")
            if getattr(caller_auth, name).strip()
        ]
    return [
        (
            f"caller_auth.{name}",
            f"required with caller_auth.jwks_file: the {claim!r} value the broker's tokens "
            f"carry; without it, any token these keys signed for {whom} would be accepted",
        )
        for name, claim, whom in (
            ("audience", "aud", "another service"),
            ("issuer", "iss", "another issuer sharing them"),
        )
        if not getattr(caller_auth, name).strip()
    ]


def _signing_key_problems(cache: CacheSettings) -> list[tuple[str, str]]:
    """What `load_signing_keys` (cache/signing.py) refuses without reading a file: no key,
    both forms, an inline key too short. Keys in files are read at startup (and by `pdp
    config check`)."""
    # Imported here: signing.py imports this module.
    from policy_engine.cache.signing import MIN_KEY_BYTES

    make = "make one with `openssl rand -hex 32`"
    inline, path = cache.redis_signing_key.strip(), cache.redis_signing_key_file.strip()
    if inline and path:
        return [("cache.redis_signing_key", "set this or cache.redis_signing_key_file, not both")]
    if not inline and not path:
        return [
            (
                "cache.redis_signing_key",
                "required with cache.redis_url (or cache.redis_signing_key_file), so that "
                f"whoever can write to Redis cannot plant decisions; {make} and give every "
                "replica the same key",
            )
        ]
    found = []
    for name, keys in (
        ("cache.redis_signing_key", [inline]),
        ("cache.redis_verify_keys", cache.redis_verify_keys.split(",")),
    ):
        for key in keys:
            size = len(key.strip().encode())
            if 0 < size < MIN_KEY_BYTES:
                found.append(
                    (
                        name,
                        f"a key of {size} bytes is too short to be secret (at least "
                        f"{MIN_KEY_BYTES} bytes); {make}",
                    )
                )
    return found


def load_settings_apart(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    flag_names: Mapping[str, str] | None = None,
) -> Settings:
    """`load_settings` (same arguments, same result, same ConfigError) run in a forked child,
    so that this process never imports pydantic: a server keeps its ~9 MB of RSS for nothing
    once the settings are read. The child inherits the environment, validates, and sends the
    plain `Settings` (or the error's text) back through a pipe, pickled.

    Done in this process instead where fork is unsafe or pointless: no `os.fork` (Windows),
    other threads running (a child of a threaded process may inherit a held lock), or
    pydantic already imported. The config file is read here, once, before the fork (a pipe
    or FIFO could not be read twice). A child that ends any other way (killed, out of
    memory) is a ConfigError: the settings were not checked, so nothing starts with them.
    """
    text = read_config_text(config_file) if config_file is not None else None
    if not hasattr(os, "fork") or threading.active_count() > 1 or "pydantic" in sys.modules:
        return load_settings(
            config_file, overrides=overrides, flag_names=flag_names, config_text=text
        )
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: validate, answer, and leave without running any exit handler
        code = 1
        try:
            os.close(read_end)
            outcome: tuple[str, Any]
            try:
                outcome = ("settings", load_settings(config_file, overrides=overrides,
                                                     flag_names=flag_names,
                                                     config_text=text))  # fmt: skip
            except ConfigError as exc:
                outcome = ("error", str(exc))
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(pickle.dumps(outcome))
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not data:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise ConfigError(f"settings could not be checked: the checking process {how}")
    kind, value = pickle.loads(data)  # from our own child
    if kind == "error":
        raise ConfigError(value)
    settings: Settings = value
    return settings
