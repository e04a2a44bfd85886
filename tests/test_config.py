"""``Config``: validation that names the parameter, ``AMORTUNE_*`` overrides, ``replace``."""

from __future__ import annotations

from typing import Any

import pytest

from amortune import Config
from amortune._config import default_start_method
from amortune._record import FrozenInstanceError


def test_defaults_are_valid_and_frozen() -> None:
    c = Config()
    assert c.max_workers is None
    assert c.start_method is None  # fork the first workers when safe, see amortune._start
    assert default_start_method() in ("forkserver", "spawn")
    assert c.sample_items >= 1 and c.sample_seconds > 0
    assert 0 < c.memory_fraction <= 1
    with pytest.raises(FrozenInstanceError):
        c.max_workers = 2  # type: ignore[misc]
    assert hash(c) == hash(Config())


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_workers", 0),
        ("max_workers", -3),
        ("max_threads", 0),
        ("start_method", "threads"),
        ("start_method", ""),
        ("sample_seconds", 0.0),
        ("sample_seconds", -1.0),
        ("sample_seconds", float("nan")),
        ("sample_items", 0),
        ("target_chunk_seconds", 0.0),
        ("target_chunk_seconds", float("nan")),
        ("memory_fraction", 0.0),
        ("memory_fraction", 1.5),
        ("memory_fraction", float("nan")),
        ("retries", -1),
        ("timeout_seconds", 0.0),
        ("timeout_seconds", -2.0),
    ],
)
def test_invalid_values_name_the_parameter(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field.split("_seconds")[0]) as info:
        Config(**{field: value})
    assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_memory_fraction_error_mentions_max_memory_percent() -> None:
    with pytest.raises(ValueError, match="max_memory_percent"):
        Config(memory_fraction=2.0)


@pytest.mark.parametrize("retry_on", [(ValueError, "x"), (int,), ("ValueError",)])
def test_retry_on_must_be_exception_types(retry_on: tuple[Any, ...]) -> None:
    with pytest.raises(TypeError, match="retry_on"):
        Config(retry_on=retry_on)


def test_valid_edge_values() -> None:
    c = Config(max_workers=1, max_threads=1, memory_fraction=1.0, retries=0,
               timeout_seconds=None, retry_on=(OSError, TimeoutError))
    assert c.max_workers == 1 and c.memory_fraction == 1.0


# -- environment --------------------------------------------------------------------------------
def test_from_env_reads_amortune_variables() -> None:
    env = {
        "AMORTUNE_MAX_WORKERS": "3",
        "AMORTUNE_MAX_THREADS": "7",
        "AMORTUNE_START_METHOD": "spawn",
        "AMORTUNE_TARGET_CHUNK_SECONDS": "0.25",
        "UNRELATED": "1",
    }
    c = Config.from_env(env)
    assert (c.max_workers, c.max_threads, c.start_method, c.target_chunk_seconds) == (
        3, 7, "spawn", 0.25)


def test_from_env_without_variables_is_the_default() -> None:
    assert Config.from_env({}) == Config()
    assert Config.from_env({"AMORTUNE_MAX_WORKERS": ""}) == Config()  # empty means unset


def test_from_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AMORTUNE_MAX_WORKERS", "1")
    assert Config.from_env().max_workers == 1
    monkeypatch.delenv("AMORTUNE_MAX_WORKERS")
    assert Config.from_env().max_workers is None


def test_overrides_beat_env_and_none_is_skipped() -> None:
    env = {"AMORTUNE_MAX_WORKERS": "3"}
    assert Config.from_env(env, max_workers=2).max_workers == 2
    assert Config.from_env(env, max_workers=None).max_workers == 3
    assert Config.from_env(env, sample_items=5).sample_items == 5


@pytest.mark.parametrize(
    "name, raw",
    [
        ("AMORTUNE_MAX_WORKERS", "two"),
        ("AMORTUNE_MAX_WORKERS", "1.5"),
        ("AMORTUNE_MAX_THREADS", "many"),
        ("AMORTUNE_TARGET_CHUNK_SECONDS", "fast"),
    ],
)
def test_bad_env_values_raise_a_clear_error(name: str, raw: str) -> None:
    with pytest.raises(ValueError) as info:
        Config.from_env({name: raw})
    message = str(info.value)
    assert name in message
    assert repr(raw) in message


@pytest.mark.parametrize(
    "name, raw, field",
    [
        ("AMORTUNE_MAX_WORKERS", "0", "max_workers"),
        ("AMORTUNE_START_METHOD", "threads", "start_method"),
        ("AMORTUNE_TARGET_CHUNK_SECONDS", "-1", "target_chunk_seconds"),
    ],
)
def test_out_of_range_env_values_are_rejected(name: str, raw: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Config.from_env({name: raw})


def test_unknown_override_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Config.from_env({}, max_wrokers=2)


# -- replace ------------------------------------------------------------------------------------
def test_replace_ignores_none() -> None:
    c = Config(max_workers=2, sample_items=9)
    assert c.replace(max_workers=None, sample_items=None) == c
    d = c.replace(max_workers=4, memory_fraction=None)
    assert (d.max_workers, d.sample_items, d.memory_fraction) == (4, 9, c.memory_fraction)
    assert c.max_workers == 2  # the original is unchanged


def test_replace_validates() -> None:
    with pytest.raises(ValueError, match="sample_items"):
        Config().replace(sample_items=0)


def test_a_config_is_a_record_not_a_dataclass() -> None:
    """As the guide says: ``cfg.replace`` changes a copy; the dataclasses helpers refuse it."""
    import dataclasses

    assert not dataclasses.is_dataclass(Config())
    with pytest.raises(TypeError):
        dataclasses.replace(Config(), retries=2)
    assert Config().replace(retries=2).retries == 2


def test_retry_backoff_and_sample_in_caller_options() -> None:
    with pytest.raises(ValueError, match="retry_backoff_seconds"):
        Config(retry_backoff_seconds=-1)
    cfg = Config(retry_backoff_seconds=0.0, sample_in_caller=False)
    assert cfg.retry_backoff_seconds == 0.0 and cfg.sample_in_caller is False
