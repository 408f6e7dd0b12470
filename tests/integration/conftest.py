"""Shared fixtures of the integration tests: one local Ray for the whole session, small worlds."""

from __future__ import annotations

import os

import pytest

RAY_NUM_CPUS = 4
RAY_OBJECT_STORE_BYTES = 300 * 1024**2

# Ray Train V2's controller takes a worker's reported result every health-check interval
# (2 s by default) and a worker's result queue holds one, so back-to-back reports each wait up
# to 2 s: in tests with a checkpoint every few steps that was most of the training time.
# Set before any Ray starts, so the in-process Ray, `ray start` clusters and job subprocesses
# all inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray started once per test session (4 logical CPUs, 300 MB object store).

    Tests that need Ray take this fixture; job code then finds Ray initialised and joins it.
    Idle workers are kept for a while: Ray Data runs reads, shuffle maps and shuffle reduces
    in separate worker pools, and with the default (kill idle workers beyond num_cpus after
    1 s) every test would start and import into a dozen fresh processes.
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        # A loaded machine can take longer than the default 10 s to register the raylet.
        os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
        # address="local": never join a `ray start` cluster that happens to run on this machine.
        ray.init(
            address="local",
            num_cpus=RAY_NUM_CPUS,
            object_store_memory=RAY_OBJECT_STORE_BYTES,
            include_dashboard=False,
            log_to_driver=False,
            _system_config={
                "idle_worker_killing_time_threshold_ms": 300_000,
                "num_workers_soft_limit": 3 * RAY_NUM_CPUS,
            },
        )
    yield ray
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A generated Contract 1 world (300 users, 400 items, 4 days; ~25k impressions)."""
    from pipelines.synthetic import WorldSpec, generate_world

    out = tmp_path_factory.mktemp("small_world") / "logs"
    return generate_world(WorldSpec(users=300, items=400, days=4, seed=1), str(out))
