"""``Config``: the worker's settings, built directly or read from the environment."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Self

from ._retry import RetryPolicy

__all__ = ["Config", "parse_duration"]

_ENV_TTL = "JOBPOOL_TTL"
_ENV_CLEANUP = "JOBPOOL_CLEANUP_INTERVAL"
_ENV_CONCURRENCY = "JOBPOOL_CONCURRENCY"
_ENV_BATCH = "JOBPOOL_BATCH_SIZE"  # the old name of JOBPOOL_CONCURRENCY (deprecated)
_ENV_RETRY_BASE = "JOBPOOL_RETRY_BASE"
_ENV_RETRY_MAX = "JOBPOOL_RETRY_MAX"
_ENV_MAX_ATTEMPTS = "JOBPOOL_MAX_ATTEMPTS"
_ENV_JOB_TIMEOUT = "JOBPOOL_JOB_TIMEOUT"

_UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
_DURATION = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_WHOLE = re.compile(r"[0-9]+")


def parse_duration(text: str) -> timedelta:
    """``"30"`` (whole days), or units in the order d, h, m, s: ``"7d"``, ``"1h30m"``, ``"90s"``.

    Raises ``ValueError`` for anything else (empty, negative, fractional, unknown
    unit, units out of order) and for a zero duration.
    """
    value = text.strip().lower()
    if _WHOLE.fullmatch(value):
        try:
            delta = timedelta(days=int(value))
        except OverflowError:
            raise ValueError(f"duration {text!r} is too long") from None
    else:
        match = _DURATION.fullmatch(value)
        if not value or match is None:
            raise ValueError(
                f'cannot read duration {text!r}: use whole days ("30") or '
                'units d/h/m/s in that order, e.g. "7d", "24h", "1h30m"'
            )
        parts = dict(zip(_UNITS.values(), match.groups(), strict=True))
        try:
            delta = timedelta(**{k: int(v) for k, v in parts.items() if v is not None})
        except OverflowError:
            raise ValueError(f"duration {text!r} is too long") from None
    if delta <= timedelta(0):
        raise ValueError(f"duration {text!r} must be longer than zero")
    return delta


def _positive_timedelta(name: str, value: object) -> None:
    if not isinstance(value, timedelta):
        raise TypeError(f"Config.{name} must be a timedelta, got {type(value).__name__}")
    if value <= timedelta(0):
        raise ValueError(f"Config.{name} must be positive, got {value!r}")


_DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True, slots=True, init=False)
class Config:
    """How a :class:`~jobpool_async.Worker` runs (keyword arguments only).

    * ``ttl`` — how long COMPLETED jobs are kept before the periodic cleanup deletes them
      (default 30 days);
    * ``cleanup_interval`` — how often the worker runs that cleanup (default 1 day);
    * ``concurrency`` — how many jobs the worker runs at once, its stream's slots
      (default 10); ``batch_size``, its old name, is still taken and read with a
      ``DeprecationWarning`` (given, it sets ``concurrency``);
    * ``retry`` — when a failed job runs again (exponential back-off: 1 s, doubling,
      at most 1 h, 10% jitter) and how many runs it gets (``max_attempts``; ``None``:
      unlimited), for jobs without their own ``max_attempts``;
    * ``job_timeout`` — a processor running longer is cancelled and its job failed
      (``None``, the default: no limit).
    """

    ttl: timedelta
    cleanup_interval: timedelta
    concurrency: int
    retry: RetryPolicy
    job_timeout: timedelta | None

    def __init__(
        self,
        *,
        ttl: timedelta = timedelta(days=30),
        cleanup_interval: timedelta = timedelta(days=1),
        concurrency: int = 10,
        retry: RetryPolicy = _DEFAULT_RETRY,
        job_timeout: timedelta | None = None,
        batch_size: int | None = None,
    ) -> None:
        # Written by hand (not the dataclass's) for the deprecated ``batch_size``:
        # ``dataclasses.replace(config, batch_size=n)`` still works, as it did.
        if batch_size is not None:
            warnings.warn(
                "Config(batch_size=...) is deprecated: use Config(concurrency=...)",
                DeprecationWarning,
                stacklevel=2,
            )
            concurrency = batch_size
        for name, value in (
            ("ttl", ttl),
            ("cleanup_interval", cleanup_interval),
            ("concurrency", concurrency),
            ("retry", retry),
            ("job_timeout", job_timeout),
        ):
            object.__setattr__(self, name, value)
        self._check()

    @property
    def batch_size(self) -> int:
        """Deprecated: the old name of :attr:`concurrency`."""
        warnings.warn(
            "Config.batch_size is deprecated: use Config.concurrency",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.concurrency

    def _check(self) -> None:
        if not isinstance(self.retry, RetryPolicy):
            raise TypeError(f"Config.retry must be a RetryPolicy, got {type(self.retry).__name__}")
        if self.job_timeout is not None:
            _positive_timedelta("job_timeout", self.job_timeout)
        _positive_timedelta("ttl", self.ttl)
        _positive_timedelta("cleanup_interval", self.cleanup_interval)
        slots = self.concurrency
        if isinstance(slots, bool) or not isinstance(slots, int):
            raise TypeError(f"Config.concurrency must be int, got {type(slots).__name__}")
        if slots < 1:
            raise ValueError(f"Config.concurrency must be at least 1, got {slots}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Read ``JOBPOOL_TTL``, ``JOBPOOL_CLEANUP_INTERVAL``, ``JOBPOOL_CONCURRENCY``,
        ``JOBPOOL_RETRY_BASE``, ``JOBPOOL_RETRY_MAX`` (durations), ``JOBPOOL_MAX_ATTEMPTS``
        (a whole number) and ``JOBPOOL_JOB_TIMEOUT`` (a duration). ``JOBPOOL_BATCH_SIZE``,
        the old name of ``JOBPOOL_CONCURRENCY``, is read with a ``DeprecationWarning``
        (both set to different values is a ``ValueError``).

        Unset or empty variables keep their defaults. A value that cannot be read
        raises ``ValueError`` naming the variable and the value. ``environ``
        defaults to ``os.environ``.
        """
        env = os.environ if environ is None else environ
        defaults = cls()
        ttl = _env_duration(env, _ENV_TTL, defaults.ttl)
        cleanup_interval = _env_duration(env, _ENV_CLEANUP, defaults.cleanup_interval)
        concurrency = _env_concurrency(env) or defaults.concurrency
        retry = defaults.retry
        base = _env_duration(env, _ENV_RETRY_BASE, retry.base)
        max_delay = _env_duration(env, _ENV_RETRY_MAX, retry.max_delay)
        max_attempts = _env_count(env, _ENV_MAX_ATTEMPTS) or retry.max_attempts
        try:
            policy = RetryPolicy(
                base=base,
                factor=retry.factor,
                max_delay=max_delay,
                jitter=retry.jitter,
                max_attempts=max_attempts,
            )
        except ValueError as exc:
            raise ValueError(
                f"{_ENV_RETRY_BASE}/{_ENV_RETRY_MAX}/{_ENV_MAX_ATTEMPTS}: {exc}"
            ) from None
        timeout = env.get(_ENV_JOB_TIMEOUT, "")
        return cls(
            ttl=ttl,
            cleanup_interval=cleanup_interval,
            concurrency=concurrency,
            retry=policy,
            job_timeout=_env_duration(env, _ENV_JOB_TIMEOUT, timedelta(1))
            if timeout.strip()
            else None,
        )


def _env_concurrency(env: Mapping[str, str]) -> int | None:
    new, old = _env_count(env, _ENV_CONCURRENCY), _env_count(env, _ENV_BATCH)
    if old is not None:
        warnings.warn(
            f"{_ENV_BATCH} is deprecated: set {_ENV_CONCURRENCY}", DeprecationWarning, stacklevel=3
        )
        if new is not None and new != old:
            raise ValueError(
                f"{_ENV_CONCURRENCY}={new} and {_ENV_BATCH}={old} disagree; "
                f"set only {_ENV_CONCURRENCY} ({_ENV_BATCH} is its deprecated old name)"
            )
    return new if new is not None else old


def _env_count(env: Mapping[str, str], var: str) -> int | None:
    """A whole number of at least 1 from ``var``, or ``None`` when unset or empty."""
    raw = env.get(var, "")
    if not raw.strip():
        return None
    text = raw.strip()
    if not _WHOLE.fullmatch(text) or int(text) < 1:
        raise ValueError(f"{var}={raw!r}: must be a whole number of at least 1")
    return int(text)


def _env_duration(env: Mapping[str, str], var: str, default: timedelta) -> timedelta:
    raw = env.get(var, "")
    if not raw.strip():
        return default
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise ValueError(f"{var}={raw!r}: {exc}") from None
