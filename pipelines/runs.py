"""The nightly run registry: where runs live, which steps finished, the lock, the gate,
``LATEST`` and retention.

Layout under a root (local path or URI)::

    <root>/LATEST                  the run id (a date, YYYY-MM-DD) of the last published run
    <root>/.publish.lock           serialises LATEST updates and retention across dates
    <root>/runs/<date>/
        dataset/ model/ embeddings/    Contracts 2-4
        run.json                       the resolved config and the inputs, fixed at the first attempt
        steps/<step>.json              one marker per finished step, written atomically
        report/                        report.md and its plots
        .lock                          held while a nightly works on this date

A step counts as done only when its marker exists, and a marker is written only after the
step's output was published (``_SUCCESS``), so a crash anywhere leaves either no marker (the
step reruns, resuming from its own state where it keeps one) or a marker whose output is
complete. Everything here is plain logic over ``pipelines.io``; no Ray.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

import pyarrow.fs as pafs

from pipelines import io
from twotower_core.config import NightlyConfig

# The nightly steps, in order. A rerun skips every step with a marker.
STEPS: tuple[str, ...] = ("build", "train", "evaluate", "gate", "embed", "publish")

LATEST_FILE = "LATEST"
RUNS_DIR = "runs"
RUN_FILE = "run.json"
STEPS_DIR = "steps"
REPORT_DIR = "report"
LOCK_FILE = ".lock"
PUBLISH_LOCK_FILE = ".publish.lock"

# Leases on object stores (no flock there): the holder rewrites its lease every
# LEASE_HEARTBEAT_SECONDS; one not rewritten for LEASE_STALE_SECONDS belongs to a dead process.
LEASE_HEARTBEAT_SECONDS = 30.0
LEASE_STALE_SECONDS = 300.0
# A lease is read back after this pause, so that of two writers racing for it only one wins.
LEASE_SETTLE_SECONDS = 1.0

# Left behind by a killed writer: io.staged_output's staging and swap directories.
_LEFTOVER_MARKERS = ("._staging-", "._replaced-")


class RunLockedError(RuntimeError):
    """Another process holds the lock of this run (or of the root's publish step)."""


# ---------------------------------------------------------------------------------------------
# paths


def validate_run_id(text: str, *, key: str = "--date") -> str:
    """A run id is a calendar date, YYYY-MM-DD (ISO order sorts runs by time)."""
    try:
        parsed = date.fromisoformat(text)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{key}: expected a date YYYY-MM-DD, got {text!r}") from error
    if parsed.isoformat() != text:
        raise ValueError(f"{key}: expected a date YYYY-MM-DD, got {text!r}")
    return text


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run."""

    root: str
    run_id: str

    @property
    def run_dir(self) -> str:
        return io.join(self.root, RUNS_DIR, self.run_id)

    @property
    def dataset(self) -> str:
        return io.join(self.run_dir, "dataset")

    @property
    def model(self) -> str:
        return io.join(self.run_dir, "model")

    @property
    def embeddings(self) -> str:
        return io.join(self.run_dir, "embeddings")

    @property
    def report_dir(self) -> str:
        return io.join(self.run_dir, REPORT_DIR)

    @property
    def run_file(self) -> str:
        return io.join(self.run_dir, RUN_FILE)

    @property
    def lock(self) -> str:
        return io.join(self.run_dir, LOCK_FILE)

    def marker(self, step: str) -> str:
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}; valid: {', '.join(STEPS)}")
        return io.join(self.run_dir, STEPS_DIR, f"{step}.json")


def run_paths(root: str, run_id: str) -> RunPaths:
    return RunPaths(root=str(root).rstrip("/") or "/", run_id=validate_run_id(run_id))


def _entries(path: str) -> list[pafs.FileInfo]:
    """Direct children of a directory, hidden ones included ([] when it does not exist)."""
    fs, inner = io.resolve(path)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return []
    return fs.get_file_info(pafs.FileSelector(inner, recursive=False))


def list_runs(root: str) -> list[str]:
    """Run ids under ``<root>/runs``, oldest first."""
    found = []
    for entry in _entries(io.join(root, RUNS_DIR)):
        if entry.type != pafs.FileType.Directory:
            continue
        with contextlib.suppress(ValueError):
            found.append(validate_run_id(entry.base_name))
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# step markers and the run record


def read_marker(paths: RunPaths, step: str) -> dict[str, Any] | None:
    path = paths.marker(step)
    return io.read_json(path) if io.exists(path) else None


def write_marker(paths: RunPaths, step: str, record: dict[str, Any]) -> dict[str, Any]:
    """Record that ``step`` finished; readers see the whole marker or none."""
    marker = {"step": step, "run_id": paths.run_id, "finished_at": io.utc_now(), **record}
    io.makedirs(io.join(paths.run_dir, STEPS_DIR))
    io.replace_file_atomically(
        paths.marker(step), json.dumps(marker, indent=2, sort_keys=True, default=str) + "\n"
    )
    return marker


def finished_steps(paths: RunPaths) -> list[str]:
    return [step for step in STEPS if io.exists(paths.marker(step))]


def read_run_record(paths: RunPaths) -> dict[str, Any] | None:
    return io.read_json(paths.run_file) if io.exists(paths.run_file) else None


def write_run_record(paths: RunPaths, record: dict[str, Any]) -> None:
    io.makedirs(paths.run_dir)
    io.replace_file_atomically(
        paths.run_file, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
    )


def config_differences(
    before: dict[str, Any], after: dict[str, Any], *, ignore: frozenset[str] = frozenset()
) -> list[str]:
    """Dotted keys whose values differ between two nested dicts (``ignore``: dotted keys)."""
    differences = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            inner = config_differences(old, new)
            differences += [f"{key}.{k}" for k in inner]
        elif old != new:
            differences.append(key)
    return [key for key in differences if key not in ignore]


def remove_leftovers(paths: RunPaths) -> list[str]:
    """Remove staging/swap dirs a killed writer left in the run dir (call under the lock)."""
    removed = []
    for entry in _entries(paths.run_dir):
        if any(marker in entry.base_name for marker in _LEFTOVER_MARKERS):
            io.remove(io.join(paths.run_dir, entry.base_name))
            removed.append(entry.base_name)
    return removed


def clear_run(paths: RunPaths) -> None:
    """Remove everything of a run but its lock file (``--force``; call under the lock)."""
    for entry in _entries(paths.run_dir):
        if entry.base_name != LOCK_FILE:
            io.remove(io.join(paths.run_dir, entry.base_name))


# ---------------------------------------------------------------------------------------------
# LATEST and the published runs


def read_latest(root: str) -> str | None:
    """The run id ``LATEST`` names, or None before the first publish."""
    path = io.join(root, LATEST_FILE)
    if not io.exists(path):
        return None
    text = io.read_text(path).strip()
    return validate_run_id(text, key=f"{path}") if text else None


def write_latest(root: str, run_id: str) -> None:
    """Point ``LATEST`` at a run; readers see the old or the new id, never a partial file."""
    validate_run_id(run_id)
    io.makedirs(str(root))
    io.replace_file_atomically(io.join(root, LATEST_FILE), run_id + "\n")


def published_runs(root: str) -> list[str]:
    """Runs whose publish step finished, oldest first."""
    return [
        run_id for run_id in list_runs(root) if io.exists(run_paths(root, run_id).marker("publish"))
    ]


def previous_published(root: str, *, before: str) -> str | None:
    """The newest published run strictly older than ``before`` (what a run warm-starts from
    and is gated against: a backfill never sees a later model)."""
    older = [run_id for run_id in published_runs(root) if run_id < before]
    return older[-1] if older else None


# ---------------------------------------------------------------------------------------------
# the quality gate


def gate_metric_names(ks: tuple[int, ...] | list[int]) -> list[str]:
    """The metrics evaluation produces for these cut-offs (valid ``nightly.gate_metric``s)."""
    from twotower_core.metrics import metric_names

    return metric_names(ks)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    metric: str
    value: float
    floor: float
    max_relative_drop: float
    previous_run: str | None
    previous_value: float | None
    reasons: tuple[str, ...]  # why the run was refused; empty when it passed

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reasons": list(self.reasons)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateDecision:
        names = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in names}
        values["reasons"] = tuple(values.get("reasons", ()))
        return cls(**values)

    def summary(self) -> str:
        """One line for logs and the report."""
        head = f"{self.metric} {self.value:.4f} (floor {self.floor:.4f}"
        if self.previous_run is not None and self.previous_value is not None:
            head += (
                f"; run {self.previous_run} had {self.previous_value:.4f}, "
                f"allowed drop {self.max_relative_drop:.0%}"
            )
        head += ")"
        return f"passed: {head}" if self.passed else f"refused: {'; '.join(self.reasons)}"


def decide_gate(
    metrics: dict[str, float],
    *,
    config: NightlyConfig,
    previous_run: str | None = None,
    previous_metrics: dict[str, float] | None = None,
) -> GateDecision:
    """Publish only if the metric reaches the floor and did not drop by more than
    ``max_relative_drop`` of the previous published run's value (a fraction of it)."""
    metric = config.gate_metric
    if metric not in metrics:
        raise ValueError(
            f"nightly.gate_metric: {metric!r} is not among the evaluation metrics "
            f"({', '.join(sorted(metrics))})"
        )
    value = float(metrics[metric])
    previous_value = None
    if previous_metrics is not None and metric in previous_metrics:
        previous_value = float(previous_metrics[metric])
    reasons = []
    if metrics.get("eval_users", 1.0) == 0:
        reasons.append("the eval split has no users with a held-out positive")
    if not math.isfinite(value):
        reasons.append(f"{metric} is {value}")
    elif value < config.gate_floor:
        reasons.append(
            f"{metric} {value:.4f} is below the floor {config.gate_floor:.4f} (nightly.gate_floor)"
        )
    if previous_value is not None and math.isfinite(value):
        lowest = previous_value * (1.0 - config.max_relative_drop)
        # A drop of exactly the allowed fraction passes (0.40 * 0.9 is 0.36000000000000004).
        if value < lowest and not math.isclose(value, lowest, rel_tol=1e-9):
            reasons.append(
                f"{metric} {value:.4f} dropped more than {config.max_relative_drop:.0%} from "
                f"{previous_value:.4f} in run {previous_run} (lowest allowed {lowest:.4f}, "
                "nightly.max_relative_drop)"
            )
    return GateDecision(
        passed=not reasons,
        metric=metric,
        value=value,
        floor=config.gate_floor,
        max_relative_drop=config.max_relative_drop,
        previous_run=previous_run if previous_value is not None else None,
        previous_value=previous_value,
        reasons=tuple(reasons),
    )


# ---------------------------------------------------------------------------------------------
# retention


def runs_to_delete(run_ids: list[str], *, keep: int, protected: set[str]) -> list[str]:
    """The runs outside the newest ``keep``, except protected ones (LATEST, the current run)."""
    if keep < 1:
        raise ValueError(f"nightly.retention: must be >= 1, got {keep}")
    ordered = sorted(run_ids)
    newest = set(ordered[-keep:])
    return [run_id for run_id in ordered if run_id not in newest and run_id not in protected]


def apply_retention(root: str, *, keep: int, protected: set[str]) -> list[str]:
    """Delete old runs; a run another process holds the lock of is left alone."""
    removed = []
    for run_id in runs_to_delete(list_runs(root), keep=keep, protected=protected):
        paths = run_paths(root, run_id)
        try:
            # Removed while locked (unlinking a locked file is fine): nobody starts on it midway.
            with RunLock(paths.lock, what=f"run {run_id}"):
                io.remove(paths.run_dir)
        except RunLockedError:
            continue
        removed.append(run_id)
    return removed


# ---------------------------------------------------------------------------------------------
# the lock


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": io.utc_now()}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive, non-blocking lock (or blocking up to ``timeout`` seconds).

    Local paths use ``flock``: the kernel drops the lock when its process dies, so a rerun
    after a crash never waits. Object stores have no locks; there the lock is a lease file
    that the holder rewrites every ``LEASE_HEARTBEAT_SECONDS`` and that others treat as
    abandoned after ``LEASE_STALE_SECONDS`` without a heartbeat (or at once when its pid on
    this host is gone). The lease is best effort: two processes starting within
    ``LEASE_SETTLE_SECONDS`` of each other are told apart by reading it back.
    """

    def __init__(self, path: str, *, what: str = "run", timeout: float = 0.0):
        self.path = str(path)
        self.what = what
        self.timeout = timeout
        self._fd: int | None = None
        self._token: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def is_local(self) -> bool:
        return "://" not in self.path

    def __enter__(self) -> RunLock:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._acquire()
                return self
            except RunLockedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _acquire(self) -> None:
        parent = os.path.dirname(self.path) if self.is_local else self.path.rsplit("/", 1)[0]
        io.makedirs(parent)
        if self.is_local:
            self._acquire_flock()
        else:
            self._acquire_lease()

    def _acquire_flock(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder_fd(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.what} is locked by {_describe(holder)} ({self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        self._fd = fd

    def _acquire_lease(self) -> None:
        if io.exists(self.path):
            holder = _read_holder(self.path)
            if holder and not _lease_is_stale(holder):
                raise RunLockedError(f"{self.what} is locked by {_describe(holder)} ({self.path})")
        token = uuid.uuid4().hex
        self._write_lease(token)
        time.sleep(LEASE_SETTLE_SECONDS)
        holder = _read_holder(self.path)
        if holder.get("token") != token:
            raise RunLockedError(f"{self.what} is locked by {_describe(holder)} ({self.path})")
        self._token = token
        self._stop.clear()
        self._heartbeat = threading.Thread(
            target=self._beat, name="run-lock-heartbeat", daemon=True
        )
        self._heartbeat.start()

    def _write_lease(self, token: str) -> None:
        io.replace_file_atomically(
            self.path, json.dumps({**_owner(), "token": token, "heartbeat": time.time()})
        )

    def _beat(self) -> None:
        while not self._stop.wait(LEASE_HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):
                if _read_holder(self.path).get("token") == self._token:
                    self._write_lease(self._token)

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._token is not None:
            self._stop.set()
            if self._heartbeat is not None:
                self._heartbeat.join()
            with contextlib.suppress(Exception):
                if _read_holder(self.path).get("token") == self._token:
                    io.remove(self.path)
            self._token = None


def _read_holder_fd(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _read_holder(path: str) -> dict[str, Any]:
    try:
        return json.loads(io.read_text(path) or "{}")
    except (OSError, ValueError):
        return {}


def _lease_is_stale(holder: dict[str, Any], *, now: float | None = None) -> bool:
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not _pid_alive(holder["pid"]):
            return True
    return now - float(holder.get("heartbeat", 0.0)) > LEASE_STALE_SECONDS
