"""Connecting to Ray: a cluster when an address is given (or RAY_ADDRESS is set), else a local one."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

DEFAULT_OBJECT_STORE_BYTES = 512 << 20


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process.

    ``address`` (or RAY_ADDRESS): join that cluster (``auto`` = the one `ray start` ran here).

    A local Ray gets at least 4 logical CPUs: on a 2-core laptop Train workers and Ray Data
    tasks otherwise starve each other (Train workers take fractional CPUs as well).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("connecting to Ray at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    cpus = num_cpus or max(4, os.cpu_count() or 1)
    logger.info("starting a local Ray with %d logical CPUs", cpus)
    import ray.data

    # One overall progress bar per Ray Data job; per-operator bars flood non-TTY logs.
    ray.data.DataContext.get_current().enable_operator_progress_bars = False
    # address="local" always starts a fresh Ray; without it ray.init() silently joins any
    # cluster started with `ray start` on this machine (pass --address auto for that).
    ray.init(
        address="local",
        num_cpus=cpus,
        object_store_memory=DEFAULT_OBJECT_STORE_BYTES,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"worker_process_setup_hook": "jobs.ray_runtime.quiet_without_state_api"},
    )


# Ray Train's PlacementGroupCleaner (a detached actor per run) asks the State API every second
# whether the run's controller is alive; the State API is served by the dashboard, which a local
# Ray here runs without, so each ask fails and logs a warning: about one line a second for the
# whole run, in every training log. The cleaner only matters when a controller dies while the
# cluster lives on; a local Ray ends with its driver.
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_without_state_api() -> None:
    """``worker_process_setup_hook`` of the local Ray: mute the cleaner's failed-query warnings."""
    logging.getLogger(_CLEANER_LOGGER).setLevel(logging.ERROR)
