"""The nightly submitted to a real 2-node Ray cluster with `ray job submit`.

The cluster is infra/local/ray-cluster.sh: a head (`ray start --head --block`) and a worker
node (`ray start --address ... --block`), each its own process group, with token auth on and
ports, temp dir and token of its own, so it never touches another Ray on this machine. The
job is submitted exactly as the README says (`ray job submit --working-dir . -- twotower
nightly ...`), and the published outputs are checked from here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from pipelines import io, runs

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "local" / "ray-cluster.sh"
RUN_DATE = "2026-11-03"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cluster_ports() -> tuple[int, int, int, int]:
    """(head, dashboard, client, agent base): distinct, and no node's agent port
    (base + node index) lands on another one; ports drawn one by one can repeat or follow
    each other, and Ray refuses a dashboard port another component uses."""
    probes = [socket.socket() for _ in range(3)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        taken = [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()
    agent_base = free_port()
    while any(agent_base + node in taken for node in range(8)):
        agent_base = free_port()
    head, dashboard, client = taken
    return head, dashboard, client, agent_base


def processes_with_env(entry: str) -> list[int]:
    """Pids whose environment holds ``entry`` (``NAME=value``): what a test cluster started."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
        except OSError:
            continue
        if entry.encode() in environ:
            found.append(int(name))
    return found


class LocalCluster:
    """infra/local/ray-cluster.sh with free ports, a short private state dir and its own token.

    Every process it starts inherits a unique TWOTOWER_TEST_CLUSTER variable, so ``stop`` can
    make sure none is left without touching any other Ray on the machine.
    """

    def __init__(self, *, head_cpus: int = 1, worker_cpus: int = 2, workers: int = 1):
        # Short: Ray's Unix socket paths live under it (about 100 characters at most).
        self.state = Path(tempfile.mkdtemp(prefix="tt-ray-", dir="/tmp"))
        self.marker = f"TWOTOWER_TEST_CLUSTER={uuid.uuid4().hex}"
        self.head_port, self.dashboard_port, client_port, agent_base = cluster_ports()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(
            {
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "TWOTOWER_CLUSTER_DIR": str(self.state),
                "RAY_HEAD_PORT": str(self.head_port),
                "RAY_DASHBOARD_PORT": str(self.dashboard_port),
                "RAY_CLIENT_PORT": str(client_port),
                "RAY_AGENT_PORT_BASE": str(agent_base),
                "RAY_HEAD_CPUS": str(head_cpus),
                "RAY_WORKER_CPUS": str(worker_cpus),
                "RAY_WORKERS": str(workers),
                "RAY_OBJECT_STORE_BYTES": str(200 * 1024**2),
            }
        )
        name, value = self.marker.split("=", 1)
        env[name] = value
        self.env = env

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.head_port}"

    @property
    def client_env(self) -> dict[str, str]:
        """What `ray job submit` and drivers need: the address and the token."""
        return {
            **self.env,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.state / "auth_token"),
        }

    def script(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SCRIPT), *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *, attempts: int = 3) -> None:
        """Start, retrying: on a loaded machine a raylet can miss Ray's fixed 30 s window to
        register with the GCS, and `ray start` then gives up (the script cleans up)."""
        errors = []
        for _ in range(attempts):
            started = self.script("start", timeout=400)
            if started.returncode == 0:
                return
            errors.append(started.stderr[-2000:])
        self.stop()
        raise RuntimeError("cluster did not start:\n" + "\n---\n".join(errors))

    def node_pid(self, name: str) -> int:
        return int((self.state / f"{name}.pid").read_text())

    def kill_node(self, name: str) -> None:
        """Remove a node abruptly: SIGKILL to its whole process group."""
        os.killpg(self.node_pid(name), signal.SIGKILL)

    def stop(self) -> None:
        self.script("stop", timeout=120)
        deadline = time.monotonic() + 10
        while (left := processes_with_env(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in processes_with_env(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.state, ignore_errors=True)
        assert not left or not processes_with_env(self.marker)


@pytest.fixture(scope="module")
def cluster():
    cluster = LocalCluster(head_cpus=1, worker_cpus=2, workers=1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_token_auth_is_on(cluster):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{cluster.dashboard_url}/api/jobs/", timeout=30)
    assert refused.value.code == 401
    token = (cluster.state / "auth_token").read_text()
    request = urllib.request.Request(
        f"{cluster.dashboard_url}/api/jobs/", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200


def test_nightly_submitted_with_ray_job_submit_publishes(cluster, small_world, tmp_path):
    root = tmp_path / "nightly"
    command = [
        "ray", "job", "submit",
        "--address", cluster.dashboard_url,
        "--working-dir", ".",
        "--", "twotower", "nightly",
        "--logs", small_world.out_dir,
        "--root", str(root),
        "--date", RUN_DATE,
        "--config", "debug",
        "--set", "train.epochs=1",
        "--set", "nightly.window_days=2",
    ]  # fmt: skip
    completed = subprocess.run(
        command, cwd=REPO, env=cluster.client_env, capture_output=True, text=True, timeout=900
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    assert f"nightly {RUN_DATE}: published" in output

    # What the job published, read back from this side.
    assert runs.read_latest(str(root)) == RUN_DATE
    paths = runs.run_paths(str(root), RUN_DATE)
    assert runs.finished_steps(paths) == list(runs.STEPS)
    for output_dir in (paths.dataset, paths.model, paths.embeddings):
        assert io.is_complete(output_dir), output_dir
    manifest = io.read_json(io.join(paths.embeddings, "manifest.json"))
    assert manifest["counts"]["items"] == small_world.rows["items"]
    assert io.count_rows(io.join(paths.embeddings, "items")) == small_world.rows["items"]
    window = runs.read_marker(paths, "build")["window"]
    assert (window["start"], window["end"]) == ("2026-11-02", RUN_DATE)
    assert (Path(paths.report_dir) / "report.md").exists()
    # The run really used the cluster: both nodes were alive for it.
    status = subprocess.run(
        ["ray", "status", f"--address={cluster.gcs_address}"],
        env=cluster.client_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.stdout.count(" node_") == 2, status.stdout
    # ... and both ran the job's work: the State API's finished tasks name both node ids.
    placement = subprocess.run(
        [sys.executable, "-c", _WHERE_TASKS_RAN, cluster.dashboard_url],
        env=cluster.client_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert placement.returncode == 0, placement.stderr[-3000:]
    where = json.loads(placement.stdout.strip().splitlines()[-1])
    assert len(where["nodes"]) == 2, where
    assert set(where["ran_on"]) == set(where["nodes"]), where


_WHERE_TASKS_RAN = """
import collections, json, sys
from ray.util.state import list_nodes, list_tasks
url = sys.argv[1]
nodes = sorted(node.node_id for node in list_nodes(address=url))
tasks = list_tasks(
    address=url, filters=[("state", "=", "FINISHED")], detail=True, limit=10_000,
    raise_on_missing_output=False,
)
ran_on = collections.Counter(task.node_id for task in tasks if task.node_id)
print(json.dumps({"nodes": nodes, "ran_on": dict(ran_on)}))
"""
