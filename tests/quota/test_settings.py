"""The `quota:` settings: where the counters live (its own Redis, else the cache's, else
in-process), their key prefix and timeout; bad values are refused naming the setting, and a
password in the URL is never shown."""

from __future__ import annotations

import pytest

from policy_engine.config import (
    CacheSettings,
    ConfigError,
    QuotaSettings,
    Settings,
    load_settings,
    settings_dict,
)
from policy_engine.quota import InProcessQuotaStore, quota_store_from_settings
from policy_engine.quota.redis_store import RedisQuotaStore

CACHE_URL, QUOTA_URL = "redis://cache-host:6379/0", "redis://quota-host:6380/1"


def test_defaults() -> None:
    quota = load_settings(environ={}).quota
    assert quota == QuotaSettings(redis_url="", key_prefix="pdp:quota", redis_timeout_ms=100)


@pytest.mark.parametrize(
    ("quota_url", "cache_url", "expected"),
    [("", "", ""), ("", CACHE_URL, CACHE_URL), (QUOTA_URL, CACHE_URL, QUOTA_URL)],
)
def test_the_counters_live_in_the_quota_redis_else_the_cache_redis_else_in_process(
    quota_url: str, cache_url: str, expected: str
) -> None:
    settings = Settings(
        quota=QuotaSettings(redis_url=quota_url), cache=CacheSettings(redis_url=cache_url)
    )
    assert settings.quota.effective_redis_url(settings.cache) == expected
    store = quota_store_from_settings(settings)  # connects nothing
    if expected:
        assert isinstance(store, RedisQuotaStore)
        assert store.redis.client().connection_pool.connection_kwargs["host"] in expected
    else:
        assert isinstance(store, InProcessQuotaStore)
        assert "per process" in store.status().detail


def test_the_timeout_and_prefix_are_the_quota_settings() -> None:
    settings = load_settings(
        environ={
            "PDP_CACHE__REDIS_URL": CACHE_URL,
            "PDP_CACHE__REDIS_SIGNING_KEY": "k" * 64,
            "PDP_QUOTA__REDIS_TIMEOUT_MS": "250",
            "PDP_QUOTA__KEY_PREFIX": "acme:counts",
        }
    )
    store = quota_store_from_settings(settings)
    assert isinstance(store, RedisQuotaStore) and store.prefix == "acme:counts"
    kwargs = store.redis.client().connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == 0.25


BAD = [
    ("PDP_QUOTA__KEY_PREFIX", "pdp:{x}", "setting quota.key_prefix: expected 1 to 128"),
    ("PDP_QUOTA__KEY_PREFIX", "has space", "setting quota.key_prefix"),
    ("PDP_QUOTA__KEY_PREFIX", "", "setting quota.key_prefix"),
    ("PDP_QUOTA__KEY_PREFIX", "p" * 129, "setting quota.key_prefix"),
    ("PDP_QUOTA__REDIS_URL", "http://user:hunter2@h/0", "setting quota.redis_url: expected"),
    ("PDP_QUOTA__REDIS_URL", "redis://h:99999/0", "setting quota.redis_url"),
    ("PDP_QUOTA__REDIS_TIMEOUT_MS", "0", "setting quota.redis_timeout_ms"),
    ("PDP_QUOTA__REDIS_TIMEOUT_MS", "3600001", "setting quota.redis_timeout_ms"),
    ("PDP_QUOTA__REDIS_TIMEOUT_MS", "soon", "setting quota.redis_timeout_ms"),
    ("PDP_QUOTA__COLOUR", "red", "quota.colour"),
]


@pytest.mark.parametrize(("variable", "value", "words"), BAD)
def test_bad_quota_settings_are_refused_by_name(variable: str, value: str, words: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={variable: value})
    message = str(raised.value)
    assert words in message and variable in message
    assert "hunter2" not in message


def test_a_unix_socket_needs_standalone_mode() -> None:
    with pytest.raises(ConfigError, match=r"setting quota\.redis_url: unix:// only with"):
        load_settings(
            environ={
                "PDP_QUOTA__REDIS_URL": "unix:///run/redis.sock",
                "PDP_CACHE__REDIS_MODE": "sentinel",
            }
        )


def test_the_quota_redis_password_is_masked() -> None:
    settings = load_settings(environ={"PDP_QUOTA__REDIS_URL": "redis://u:hunter2@h:6379/0"})
    shown = settings_dict(settings)["quota"]["redis_url"]
    assert "hunter2" not in shown and shown.startswith("redis://u:")
