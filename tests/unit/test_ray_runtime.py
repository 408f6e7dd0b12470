"""How the jobs start a local Ray (no Ray is started here: ``ray.init`` is replaced)."""

from __future__ import annotations

import importlib
import importlib.util
import logging

import pytest

from jobs import ray_runtime


@pytest.fixture
def captured_init(monkeypatch):
    ray = pytest.importorskip("ray")
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_local_ray_mutes_the_placement_group_cleaner_in_every_worker(captured_init):
    """A local Ray runs without the dashboard, so Ray Train's placement-group cleaner fails its
    State API query every second and logs a warning each time (45 lines in a 1-epoch run on
    this machine): every worker process of the local Ray runs a hook that mutes that logger."""
    ray_runtime.ensure_ray()
    (kwargs,) = captured_init
    assert kwargs["address"] == "local" and kwargs["include_dashboard"] is False
    hook = kwargs["runtime_env"]["worker_process_setup_hook"]
    module, _, name = hook.rpartition(".")
    getattr(importlib.import_module(module), name)()  # what each worker runs at start
    # The muted logger is that module's own: a Ray upgrade that moves it fails here.
    assert importlib.util.find_spec(ray_runtime._CLEANER_LOGGER) is not None
    cleaner = logging.getLogger(ray_runtime._CLEANER_LOGGER)
    try:
        assert not cleaner.isEnabledFor(logging.WARNING)
        assert cleaner.isEnabledFor(logging.ERROR)
    finally:
        cleaner.setLevel(logging.NOTSET)


def test_a_cluster_address_joins_it_untouched(captured_init, monkeypatch):
    """On a user's cluster (with its dashboard) nothing is muted."""
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    ray_runtime.ensure_ray()
    assert captured_init == [{"address": "ray://head:10001", "log_to_driver": True}]
