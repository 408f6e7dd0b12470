"""Shared fixtures of the integration tests: one local Ray for the whole session, small worlds."""

from __future__ import annotations

import pytest

RAY_NUM_CPUS = 4
RAY_OBJECT_STORE_BYTES = 300 * 1024**2


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray started once per test session (4 logical CPUs, 300 MB object store).

    Tests that need Ray take this fixture; job code then finds Ray initialised and joins it.
    """
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            num_cpus=RAY_NUM_CPUS,
            object_store_memory=RAY_OBJECT_STORE_BYTES,
            include_dashboard=False,
            log_to_driver=False,
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
