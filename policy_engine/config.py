"""All configuration in one typed place.

Precedence, lowest first: the defaults below, a YAML config file, `PDP_*` environment
variables, then command-line flags. Every field is documented in README's configuration table.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

ENV_PREFIX = "PDP_"


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the setting."""


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds on every request, so no input can exhaust the server."""

    max_id_length: int = 256
    max_scope_length: int = 256
    max_attributes: int = 64  # entries per attribute map, at every level
    max_attribute_depth: int = 8
    max_attribute_bytes: int = 16 * 1024  # serialized size of one attribute map
    max_string_length: int = 4096  # any string value inside attributes
    max_batch_size: int = 1000
    max_message_bytes: int = 8 * 1024 * 1024  # gRPC receive limit


@dataclass(frozen=True, slots=True)
class PolicyLimits:
    """Bounds on the policy files themselves, checked before any byte is parsed."""

    max_file_bytes: int = 1024 * 1024  # one policy, JWKS or bundle file
    max_set_bytes: int = 8 * 1024 * 1024  # every file a policy set reads, together


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The two-level decision cache: in-process LRU in front of Redis shared by all replicas."""

    enabled: bool = True
    local_max_entries: int = 100_000  # 0 turns the in-process level off
    local_ttl_seconds: float = 10.0
    # Empty: in-process only. redis://, rediss:// (TLS), with user:password@ for auth.
    redis_url: str = ""
    redis_mode: str = "standalone"  # standalone | sentinel | cluster
    redis_sentinel_master: str = "mymaster"  # with redis_mode=sentinel
    redis_ttl_seconds: float = 300.0
    redis_timeout_ms: int = 50  # connect and socket timeout: a slow Redis is a missing Redis
    redis_pool_size: int = 32
    breaker_failure_threshold: int = 3  # consecutive failures that open the breaker
    breaker_reset_seconds: float = 2.0  # then one probe is let through after this long
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
class ReloadSettings:
    """Hot reload of the policy directory."""

    watch: bool = True  # watch the directory; SIGHUP always reloads
    debounce_ms: int = 150  # changes closer together than this are applied once


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """The decision audit log: a bounded queue, a background writer, tamper-evident sinks."""

    enabled: bool = False
    sinks: str = "file"  # comma-separated: file, redis, stdout
    file_path: Path = Path("audit/audit.jsonl")  # "{worker}" becomes the worker's index
    file_max_bytes: int = 100 * 1024 * 1024  # rotate once the live file reaches this size
    file_keep: int = 10  # rotated files kept
    file_fsync: bool = False  # fsync every batch (survives power loss, costs throughput)
    redis_url: str = ""  # required with the redis sink
    redis_stream: str = "pdp:audit"
    redis_maxlen: int = 1_000_000  # XADD MAXLEN ~ (0: never trimmed)
    redis_timeout_ms: int = 1000
    queue_size: int = 10_000  # records waiting for the writer
    when_full: str = "block"  # block (wait up to block_timeout_ms, then drop) | drop
    block_timeout_ms: int = 10
    sink_buffer: int = 100_000  # records a failing sink holds before dropping (and saying so)
    retry_max_ms: int = 5000  # a failing sink is retried with backoff up to this interval
    checkpoint_every: int = 1000  # records between signed checkpoints (0: only by time)
    checkpoint_seconds: float = 10.0  # at most this long between checkpoints (0: only by count)
    signing_key_file: str = ""  # PEM Ed25519 private key (pdp audit keygen); empty: unsigned


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
    audience: str = ""
    issuer: str = ""


@dataclass(frozen=True, slots=True)
class BundleSettings:
    """Signed policies: with a public key set, only a directory signed by its private key loads."""

    public_key_file: str = ""  # PEM (Ed25519, P-256 or RSA); empty = signatures not required
    # ISO 8601 time with a zone: bundles signed earlier are refused, also at startup (a
    # running server already refuses any bundle signed before the one it serves).
    not_before: str = ""


@dataclass(frozen=True, slots=True)
class Settings:
    address: str = "127.0.0.1:50051"
    policy_dir: Path = Path("policies")
    workers: int = 1  # processes sharing the port (one Python process uses one core)
    threads: int = 16  # gRPC handler threads per process
    docs_base_url: str = "https://docs.kontext.dev"
    log_level: str = "INFO"
    limits: RequestLimits = field(default_factory=RequestLimits)
    policy_limits: PolicyLimits = field(default_factory=PolicyLimits)
    cache: CacheSettings = field(default_factory=CacheSettings)
    reload: ReloadSettings = field(default_factory=ReloadSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    caller_auth: CallerAuthSettings = field(default_factory=CallerAuthSettings)
    bundle: BundleSettings = field(default_factory=BundleSettings)
    # Prometheus metrics over HTTP; empty turns the endpoint off.
    metrics_address: str = "127.0.0.1:9464"
    # A second, plaintext gRPC port serving only grpc.health.v1, for probes and load balancers
    # that cannot present the callers' credentials (under mutual TLS the main port refuses
    # them at the handshake). Empty: health is served on `address` only.
    health_address: str = ""

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _coerce(name: str, kind: Any, raw: Any) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {raw!r}")
        if kind is int:
            if isinstance(raw, bool):
                raise ValueError("not an integer")
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError("not a number")
            return float(raw)
        if kind is Path:
            return Path(str(raw))
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: {exc}") from exc


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(prefix + u for u in sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name, raw in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(raw, Mapping):
                raise ConfigError(f"setting {prefix}{name}: expected a mapping")
            kwargs[name] = _build(kind, raw, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, kind, raw)
    return cls(**kwargs)


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """PDP_ADDRESS sets `address`; PDP_LIMITS__MAX_BATCH_SIZE sets `limits.max_batch_size`."""
    values: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = raw
    return values


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _read_config_file(path: Path) -> Mapping[str, Any]:
    """The file's one mapping, read as strictly as policy files (policy_engine.policy.yamlpos):
    a duplicate key, anchor, alias, merge key or tag is refused with its line, so no setting
    (a bundle key, a signing key) can be silently overridden or dropped. Plain scalars stay
    text as written and are typed by the setting they belong to, as environment values are."""
    # Imported here: the policy package imports this module (PolicyLimits).
    from policy_engine.policy.yamlpos import error_line, load_documents

    try:
        parsed = load_documents(path.read_text(encoding="utf-8"), what="config files")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc}") from exc
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


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from defaults, `config_file`, `environ` (PDP_*) and `overrides`, in that order.

    Raises ConfigError naming the setting (or the config file's line) that cannot be used.
    """
    values: dict[str, Any] = {}
    if config_file is not None:
        values = _merge(values, _read_config_file(config_file))
    values = _merge(values, _env_values(os.environ if environ is None else environ))
    values = _merge(values, {k: v for k, v in (overrides or {}).items() if v is not None})
    return _build(Settings, values, "")
