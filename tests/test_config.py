"""Config: defaults, validation, and reading the environment."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest

from jobpool_async import Config, RetryPolicy
from jobpool_async._config import parse_duration


def test_defaults() -> None:
    config = Config()
    assert config.ttl == timedelta(days=30)
    assert config.cleanup_interval == timedelta(days=1)
    assert config.concurrency == 10


def test_keywords_only_and_frozen() -> None:
    config = Config(ttl=timedelta(hours=2), cleanup_interval=timedelta(minutes=5), concurrency=3)
    assert (config.ttl, config.cleanup_interval, config.concurrency) == (
        timedelta(hours=2),
        timedelta(minutes=5),
        3,
    )
    with pytest.raises(TypeError):
        Config(timedelta(days=1))  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.concurrency = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ttl": timedelta(0)}, ValueError, "ttl must be positive"),
        ({"ttl": timedelta(seconds=-1)}, ValueError, "ttl must be positive"),
        ({"ttl": 30}, TypeError, "ttl must be a timedelta"),
        ({"cleanup_interval": timedelta(0)}, ValueError, "cleanup_interval must be positive"),
        ({"cleanup_interval": "1d"}, TypeError, "cleanup_interval must be a timedelta"),
        ({"concurrency": 0}, ValueError, "concurrency must be at least 1"),
        ({"concurrency": True}, TypeError, "concurrency must be int"),
        ({"concurrency": 2.0}, TypeError, "concurrency must be int"),
    ],
)
def test_bad_values_are_rejected(kwargs: dict[str, object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Config(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30", timedelta(days=30)),
        ("1", timedelta(days=1)),
        ("24h", timedelta(hours=24)),
        ("90m", timedelta(minutes=90)),
        ("7d", timedelta(days=7)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("45s", timedelta(seconds=45)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("2d3h4m5s", timedelta(days=2, hours=3, minutes=4, seconds=5)),
        (" 7D ", timedelta(days=7)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", " ", "x", "1.5", "1.5h", "-3", "0", "0h", "30m1h", "1h 30m", "h", "3w", "²", "9" * 30],
)
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_batch_size_is_the_deprecated_name_of_concurrency() -> None:
    with pytest.warns(DeprecationWarning, match=r"Config\(batch_size=\.\.\.\) is deprecated"):
        config = Config(batch_size=4)
    assert config.concurrency == 4 and config == Config(concurrency=4)
    with pytest.warns(DeprecationWarning, match="Config.batch_size is deprecated"):
        assert config.batch_size == 4
    with pytest.warns(DeprecationWarning):  # the old way to change one field still works
        assert dataclasses.replace(Config(concurrency=8), batch_size=2).concurrency == 2  # type: ignore[call-arg]
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="concurrency must be"):
        Config(batch_size=0)
    assert "batch_size" not in repr(Config()) and "concurrency=10" in repr(Config())
    assert [f.name for f in dataclasses.fields(Config)].count("concurrency") == 1


def test_the_old_environment_variable_still_works_with_a_warning() -> None:
    with pytest.warns(DeprecationWarning, match="JOBPOOL_BATCH_SIZE is deprecated"):
        assert Config.from_env({"JOBPOOL_BATCH_SIZE": "6"}).concurrency == 6
    with pytest.warns(DeprecationWarning):
        same = {"JOBPOOL_BATCH_SIZE": "6", "JOBPOOL_CONCURRENCY": "6"}
        assert Config.from_env(same).concurrency == 6
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="disagree"):
        Config.from_env({"JOBPOOL_BATCH_SIZE": "6", "JOBPOOL_CONCURRENCY": "7"})
    with pytest.raises(ValueError, match="JOBPOOL_BATCH_SIZE='ten'"):
        Config.from_env({"JOBPOOL_BATCH_SIZE": "ten"})


def test_from_env_defaults_when_unset_or_empty() -> None:
    assert Config.from_env({}) == Config()
    assert Config.from_env({"JOBPOOL_TTL": "", "JOBPOOL_CONCURRENCY": " "}) == Config()


def test_from_env_reads_every_variable() -> None:
    config = Config.from_env(
        {"JOBPOOL_TTL": "7d", "JOBPOOL_CLEANUP_INTERVAL": "1h30m", "JOBPOOL_CONCURRENCY": "25"}
    )
    assert config == Config(
        ttl=timedelta(days=7), cleanup_interval=timedelta(minutes=90), concurrency=25
    )
    assert Config.from_env({"JOBPOOL_TTL": "30"}).ttl == timedelta(days=30)


def test_from_env_uses_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBPOOL_TTL", "24h")
    monkeypatch.setenv("JOBPOOL_CONCURRENCY", "4")
    monkeypatch.delenv("JOBPOOL_CLEANUP_INTERVAL", raising=False)
    monkeypatch.delenv("JOBPOOL_BATCH_SIZE", raising=False)
    assert Config.from_env() == Config(ttl=timedelta(hours=24), concurrency=4)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("JOBPOOL_TTL", "soon"),
        ("JOBPOOL_TTL", "0"),
        ("JOBPOOL_CLEANUP_INTERVAL", "1.5h"),
        ("JOBPOOL_CLEANUP_INTERVAL", "-1"),
        ("JOBPOOL_CONCURRENCY", "ten"),
        ("JOBPOOL_CONCURRENCY", "0"),
        ("JOBPOOL_CONCURRENCY", "-4"),
        ("JOBPOOL_CONCURRENCY", "2.5"),
    ],
)
def test_from_env_names_the_variable_and_the_value(var: str, value: str) -> None:
    with pytest.raises(ValueError) as info:
        Config.from_env({var: value})
    assert var in str(info.value)
    assert repr(value) in str(info.value)


def test_retry_and_timeout_defaults() -> None:
    config = Config()
    assert config.retry == RetryPolicy(
        base=timedelta(seconds=1),
        factor=2.0,
        max_delay=timedelta(hours=1),
        jitter=0.1,
        max_attempts=None,
    )
    assert config.job_timeout is None
    with pytest.raises(ValueError, match="job_timeout"):
        Config(job_timeout=timedelta(0))
    with pytest.raises(TypeError, match="retry"):
        Config(retry=None)  # type: ignore[arg-type]


def test_from_env_reads_the_retry_variables() -> None:
    config = Config.from_env(
        {
            "JOBPOOL_RETRY_BASE": "5s",
            "JOBPOOL_RETRY_MAX": "10m",
            "JOBPOOL_MAX_ATTEMPTS": "7",
            "JOBPOOL_JOB_TIMEOUT": "90s",
        }
    )
    assert config.retry.base == timedelta(seconds=5)
    assert config.retry.max_delay == timedelta(minutes=10)
    assert config.retry.max_attempts == 7
    assert (config.retry.factor, config.retry.jitter) == (2.0, 0.1)
    assert config.job_timeout == timedelta(seconds=90)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("JOBPOOL_RETRY_BASE", "soon"),
        ("JOBPOOL_RETRY_MAX", "-1h"),
        ("JOBPOOL_MAX_ATTEMPTS", "0"),
        ("JOBPOOL_MAX_ATTEMPTS", "three"),
        ("JOBPOOL_JOB_TIMEOUT", "1.5s"),
    ],
)
def test_bad_retry_variables_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(ValueError, match=var):
        Config.from_env({var: value})


def test_retry_policy_delays_and_validation() -> None:
    policy = RetryPolicy(
        base=timedelta(seconds=1), factor=2, max_delay=timedelta(seconds=5), jitter=0
    )
    assert [policy.delay(n).total_seconds() for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 5, 5]
    assert policy.delay(10_000) == timedelta(seconds=5), "no overflow for huge attempts"
    jittered = RetryPolicy(jitter=0.1)
    assert all(0.9 <= jittered.delay(1).total_seconds() <= 1.1 for _ in range(200))
    for kwargs, match in (
        ({"base": timedelta(seconds=-1)}, "base"),
        ({"factor": 0.5}, "factor"),
        ({"jitter": 2}, "jitter"),
        ({"max_attempts": 0}, "max_attempts"),
    ):
        with pytest.raises(ValueError, match=match):
            RetryPolicy(**kwargs)
