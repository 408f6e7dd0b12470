"""Benchmark: build-dataset on Ray Data against a single-process polars build of the same
contract, on the same generated logs.

    .venv/bin/python benchmarks/build_dataset.py --impressions 5000000

1. generate a synthetic world with at least --impressions impressions (kept in --work-dir and
   reused by later runs of the same size);
2. build the dataset with the local engine (``build_dataset(..., engine="local")``: one
   process, polars, every event in memory as one partition) in a child process;
3. start a local Ray and run the ``build-dataset`` job (Ray Data: read units, one hash shuffle
   by user, one task per partition);
4. check both wrote the same train and eval rows, then print input rows/s of each, their ratio,
   and peak memory (summed PSS and RSS of the whole process tree: driver, raylet, workers,
   object store pages), and write benchmarks/results/build_dataset.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import polars as pl  # noqa: E402

from pipelines import io  # noqa: E402

GIB = 1024**3
LOG_TABLES = ("clicks", "impressions", "retrievals")


# ---------------------------------------------------------------------------------------------
# memory of a process tree


RESULTS = Path(__file__).parent / "results"


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # "pid (comm) state ppid ...": comm may hold spaces, so split after ")".
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def _tree(root: int) -> list[int]:
    children = _children_by_parent()
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            parts = cmdline.read().split(b"\0")
    except OSError:
        return "?"
    first = parts[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split("(")[0].split(".")[0]
    script = next((p.decode() for p in parts[1:] if p.endswith(b".py")), "")
    return os.path.basename(script or first)


def _memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB; (0, 0) when it is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


class TreeMemorySampler:
    """Samples the summed PSS and RSS of a process and all its descendants in a thread."""

    def __init__(self, root: int, interval_s: float = 0.25) -> None:
        self.root, self.interval_s = root, interval_s
        self.peak_pss_kib = self.peak_rss_kib = self.peak_processes = 0
        self.at_peak: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree(self.root)
            totals = [_memory_kib(pid) for pid in pids]
            pss = sum(t[0] for t in totals)
            if pss > self.peak_pss_kib:
                self.peak_pss_kib = pss
                self.at_peak = sorted(
                    ((t[0], _name(pid)) for pid, t in zip(pids, totals)), reverse=True
                )
            self.peak_rss_kib = max(self.peak_rss_kib, sum(t[1] for t in totals))
            self.peak_processes = max(self.peak_processes, len(pids))
            self._stop.wait(self.interval_s)

    def peak_breakdown(self, top: int = 8) -> str:
        """The processes' PSS at the peak, largest first, grouped by process name."""
        grouped: dict[str, list[int]] = {}
        for pss, name in self.at_peak:
            grouped.setdefault(name, []).append(pss)
        rows = sorted(grouped.items(), key=lambda kv: -sum(kv[1]))[:top]
        return ", ".join(f"{name} x{len(v)}: {sum(v) / 1024**2:.2f}" for name, v in rows)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------
# the runs


@dataclass
class RunResult:
    engine: str
    seconds: float  # the build itself
    startup_seconds: float  # starting Ray (0 for polars)
    input_rows: int
    impressions: int
    train_rows: int
    peak_pss_gib: float
    peak_rss_gib: float
    peak_processes: int
    peak_breakdown: str = ""

    @property
    def rows_per_second(self) -> float:
        return self.input_rows / self.seconds

    @property
    def impressions_per_second(self) -> float:
        return self.impressions / self.seconds


def world_spec(impressions: int, *, days: int, items: int, seed: int):
    """A spec whose expected impressions reach the target: users × days × 2 requests × 10 shown."""
    from pipelines.synthetic import WorldSpec

    per_user = days * 2.0 * 10
    users = int(impressions / per_user * 1.04) + 1
    return WorldSpec(
        users=users,
        items=items,
        days=days,
        seed=seed,
        requests_per_user_per_day=2.0,
        candidates_per_request=20,
        shown_per_request=10,
        popular_candidates_per_request=5,
    )


def ensure_world(spec, work_dir: Path) -> tuple[str, dict[str, int]]:
    """Generate the logs once per spec; later runs reuse them."""
    from pipelines.synthetic import generate_world

    logs = work_dir / f"logs-{spec.users}u-{spec.items}i-{spec.days}d-s{spec.seed}"
    marker = logs / "_GENERATED.json"
    if marker.exists():
        return str(logs), json.loads(marker.read_text())
    shutil.rmtree(logs, ignore_errors=True)
    started = time.perf_counter()
    world = generate_world(spec, str(logs), progress=True)
    print(f"generated {world.rows} in {time.perf_counter() - started:.1f}s", flush=True)
    marker.write_text(json.dumps(world.rows))
    return str(logs), world.rows


def _polars_child(logs: str, out: str, overrides: list[str], queue) -> None:
    from jobs.config_io import load_config
    from pipelines.build import build_dataset

    config = load_config(None, overrides)
    started = time.perf_counter()
    result = build_dataset(logs, out, config.dataset, overwrite=True, engine="local")
    queue.put((time.perf_counter() - started, result.manifest["counts"]["train_positives"]))


def run_polars(logs: str, out: str, overrides: list[str], rows: dict[str, int]) -> RunResult:
    """The single-process polars build, in a child process so its memory is measured alone."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_polars_child, args=(logs, out, overrides, queue))
    child.start()
    with TreeMemorySampler(child.pid) as memory:
        seconds, train_rows = queue.get()
        child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the polars build failed (exit code {child.exitcode})")
    return RunResult(
        engine="polars (1 process)",
        seconds=seconds,
        startup_seconds=0.0,
        input_rows=sum(rows[t] for t in LOG_TABLES),
        impressions=rows["impressions"],
        train_rows=train_rows,
        peak_pss_gib=memory.peak_pss_kib / 1024**2,
        peak_rss_gib=memory.peak_rss_kib / 1024**2,
        peak_processes=memory.peak_processes,
        peak_breakdown=memory.peak_breakdown(),
    )


def run_ray(
    logs: str,
    out: str,
    overrides: list[str],
    rows: dict[str, int],
    *,
    num_cpus: int,
    object_store_bytes: int,
) -> RunResult:
    """Start a local Ray and run the build-dataset job, measuring the whole process tree."""
    import ray

    from jobs import build_dataset as job
    from jobs.config_io import load_config

    config = load_config(None, overrides)
    with TreeMemorySampler(os.getpid()) as memory:
        started = time.perf_counter()
        if not ray.is_initialized():
            # A loaded 2-core machine can take longer than the default 10 s to start a raylet.
            os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
            # As jobs.ray_runtime.ensure_ray starts it, except that idle workers are kept:
            # Ray Data runs reads, shuffle maps and shuffle reduces in three worker pools, and
            # by default workers beyond num_cpus are killed after 1 s idle, so every run
            # would start (and import into) a dozen fresh processes.
            ray.init(
                num_cpus=num_cpus,
                object_store_memory=object_store_bytes,
                include_dashboard=False,
                _system_config={
                    "idle_worker_killing_time_threshold_ms": 600_000,
                    "num_workers_soft_limit": 4 * num_cpus,
                },
            )
        startup = time.perf_counter() - started
        started = time.perf_counter()
        result = job.run(logs=logs, out=out, config=config, overwrite=True)
        seconds = time.perf_counter() - started
    return RunResult(
        engine=f"ray data ({num_cpus} logical CPUs)",
        seconds=seconds,
        startup_seconds=startup,
        input_rows=sum(rows[t] for t in LOG_TABLES),
        impressions=rows["impressions"],
        train_rows=result.manifest["counts"]["train_positives"],
        peak_pss_gib=memory.peak_pss_kib / 1024**2,
        peak_rss_gib=memory.peak_rss_kib / 1024**2,
        peak_processes=memory.peak_processes,
        peak_breakdown=memory.peak_breakdown(),
    )


def same_rows(first: str, second: str) -> bool:
    for folder in ("train", "eval"):
        a = pl.from_arrow(io.read_table(io.join(first, folder)))
        b = pl.from_arrow(io.read_table(io.join(second, folder)))
        keys = [c for c in ("user_id", "ts", "request_id", "item_id") if c in a.columns]
        if not a.sort(keys).equals(b.sort(keys)):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# report


def print_table(results: list[RunResult], *, identical: bool) -> None:
    header = (
        f"{'engine':<28} {'build s':>8} {'startup s':>9} {'input rows/s':>13} "
        f"{'impr./s':>10} {'train rows':>10} {'peak PSS GiB':>12} {'peak RSS GiB':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.engine:<28} {r.seconds:>8.1f} {r.startup_seconds:>9.1f} "
            f"{r.rows_per_second:>13,.0f} {r.impressions_per_second:>10,.0f} {r.train_rows:>10,} "
            f"{r.peak_pss_gib:>12.2f} {r.peak_rss_gib:>12.2f}"
        )
    polars, rays = results[0], results[1:]
    print()
    for ray in rays:
        print(
            f"throughput ratio {ray.engine} / polars: "
            f"{ray.rows_per_second / polars.rows_per_second:.2f} (target >= 0.5)"
        )
    cold = rays[0]
    print(
        "  cold, including Ray start-up: "
        f"{polars.seconds / (cold.seconds + cold.startup_seconds):.2f}"
    )
    peak = max(r.peak_pss_gib for r in rays)
    print(f"ray peak memory (PSS, whole process tree): {peak:.2f} GiB (target < 4 GiB)")
    for r in results:
        print(f"peak PSS by process, GiB ({r.engine}): {r.peak_breakdown}")
    print(f"same train and eval rows: {'yes' if identical else 'NO'}")


def plot(results: list[RunResult], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = [r.engine for r in results]
    colors = ["#888"] + ["#1f77b4"] * (len(results) - 1)
    left.bar(names, [r.rows_per_second for r in results], color=colors)
    left.set_ylabel("input log rows / s")
    right.bar(names, [r.peak_pss_gib for r in results], color=colors)
    right.axhline(4.0, color="red", linestyle="--", linewidth=1)
    right.set_ylabel("peak memory, PSS (GiB)")
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=10)
    figure.suptitle(f"build-dataset, {results[0].impressions:,} impressions")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--impressions", type=int, default=5_000_000, help="target impressions (default 5M)"
    )
    parser.add_argument("--days", type=int, default=7, help="days of logs (default 7)")
    parser.add_argument("--items", type=int, default=20_000, help="catalog size (default 20000)")
    parser.add_argument("--seed", type=int, default=0, help="world and sampling seed")
    parser.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="dataset.num_partitions (default: the job's, one per 250k input log rows, at least 8)",
    )
    parser.add_argument(
        "--ray-runs",
        type=int,
        default=2,
        help="Ray builds in one Ray session: the first pays worker start-up, later ones run "
        "on warm workers (default 2)",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=os.cpu_count() or 1,
        help="logical CPUs of the local Ray (default: the machine's cores)",
    )
    parser.add_argument(
        "--object-store-mb",
        type=int,
        default=512,
        help="object store of the local Ray in MiB (default 512, as jobs.ray_runtime)",
    )
    parser.add_argument(
        "--work-dir", default="/tmp/twotower-bench/build_dataset", help="logs and outputs go here"
    )
    parser.add_argument("--skip-polars", action="store_true", help="only run the Ray build")
    args = parser.parse_args(argv)

    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    spec = world_spec(args.impressions, days=args.days, items=args.items, seed=args.seed)
    logs, rows = ensure_world(spec, work_dir)
    print(f"logs: {logs} {rows}", flush=True)
    overrides = [f"dataset.seed={args.seed}"]
    if args.partitions:
        overrides.append(f"dataset.num_partitions={args.partitions}")
    print(f"partitions: {args.partitions or 'the job default (one per 250k log rows)'}", flush=True)

    results = []
    if not args.skip_polars:
        print("polars build ...", flush=True)
        results.append(run_polars(logs, str(work_dir / "out-polars"), overrides, rows))
        print(json.dumps(asdict(results[-1])), flush=True)
    for run in range(args.ray_runs):
        print(f"ray build {run + 1}/{args.ray_runs} ...", flush=True)
        result = run_ray(
            logs,
            str(work_dir / "out-ray"),
            overrides,
            rows,
            num_cpus=args.num_cpus,
            object_store_bytes=args.object_store_mb * 1024**2,
        )
        result.engine += " cold" if run == 0 else " warm"
        results.append(result)
        print(json.dumps(asdict(result)), flush=True)
    if args.skip_polars:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return 0
    identical = same_rows(str(work_dir / "out-polars"), str(work_dir / "out-ray"))
    print()
    print_table(results, identical=identical)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "build_dataset.json").write_text(
        json.dumps(
            {"rows": rows, "results": [asdict(r) for r in results], "identical": identical},
            indent=2,
        )
    )
    plot(results, RESULTS / "build_dataset.png")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
