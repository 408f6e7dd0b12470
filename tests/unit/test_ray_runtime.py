"""jobs.ray_runtime without a real Ray: what a local Ray is started with."""

import sys
import types

import pytest

from jobs import ray_runtime


def fake_ray(monkeypatch) -> dict:
    """A ``ray`` module that records ray.init's keyword arguments."""
    calls: dict = {}
    ray = types.ModuleType("ray")
    ray.is_initialized = lambda: False
    ray.init = lambda **kwargs: calls.update(kwargs)
    data = types.ModuleType("ray.data")

    class Context:
        enable_operator_progress_bars = True

    data.DataContext = types.SimpleNamespace(get_current=lambda: Context)
    ray.data = data
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.data", data)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


@pytest.mark.parametrize("env, expected", [(None, 0), ("7", 7), ("", 0)])
def test_a_local_ray_runs_workers_at_the_configured_niceness(monkeypatch, env, expected):
    calls = fake_ray(monkeypatch)
    if env is None:
        monkeypatch.delenv(ray_runtime.WORKER_NICENESS_ENV, raising=False)
    else:
        monkeypatch.setenv(ray_runtime.WORKER_NICENESS_ENV, env)
    ray_runtime.ensure_ray(num_cpus=2)
    assert calls["address"] == "local" and calls["num_cpus"] == 2
    assert calls["_system_config"] == {"worker_niceness": expected}


def test_joining_a_cluster_leaves_its_settings_alone(monkeypatch):
    calls = fake_ray(monkeypatch)
    ray_runtime.ensure_ray("ray://head:10001")
    assert calls["address"] == "ray://head:10001" and "_system_config" not in calls


@pytest.mark.parametrize("value, message", [("high", "must be an integer"), ("40", r"\[-20, 19\]")])
def test_a_bad_niceness_is_named(monkeypatch, value, message):
    monkeypatch.setenv(ray_runtime.WORKER_NICENESS_ENV, value)
    with pytest.raises(ValueError, match=f"RAY_worker_niceness {message}|{message}"):
        ray_runtime.worker_niceness()
