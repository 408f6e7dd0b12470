"""infra/: every manifest parses, and the fields that must agree do.

Images cannot be built here (no network), so the checks are cross-references: one image
everywhere; the Ray version of the Dockerfile's base, of every cluster spec and of the
installed/pinned package; entry points that the CLI really parses (options included); the
cleanup fields on every RayJob; token auth; and a comment on every field.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from jobs import cli
from jobs.config_io import load_config

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
MANIFESTS = sorted(INFRA.glob("**/*.yaml"))
RAY_VERSION = version("ray")


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_documents() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in MANIFESTS for doc in documents(path)]


def cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) of every RayCluster, RayJob and RayCronJob."""
    found = []
    for path, doc in all_documents():
        where = f"{path.relative_to(REPO)} ({doc['kind']})"
        if doc["kind"] == "RayCluster":
            found.append((where, doc["spec"]))
        elif doc["kind"] == "RayJob":
            found.append((where, doc["spec"]["rayClusterSpec"]))
        elif doc["kind"] == "RayCronJob":
            found.append((where, doc["spec"]["jobTemplate"]["rayClusterSpec"]))
    return found


def job_specs() -> list[tuple[str, dict]]:
    """(where, RayJobSpec) of every RayJob and RayCronJob template."""
    found = []
    for path, doc in all_documents():
        where = f"{path.relative_to(REPO)} ({doc['kind']})"
        if doc["kind"] == "RayJob":
            found.append((where, doc["spec"]))
        elif doc["kind"] == "RayCronJob":
            found.append((where, doc["spec"]["jobTemplate"]))
    return found


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_the_expected_manifests_exist():
    kinds = sorted(doc["kind"] for _, doc in all_documents())
    assert kinds == sorted(
        ["RayCluster", "RayCronJob", "CronJob", "Role", "RoleBinding", "ServiceAccount"]
        + ["ServiceAccount"]
        + ["RayJob"] * 6
    )
    components = {
        doc["metadata"]["labels"]["app.kubernetes.io/component"]
        for _, doc in all_documents()
        if doc["kind"] == "RayJob"
    }
    # One RayJob per job of the CLI that runs on a cluster.
    assert components == {"build-dataset", "train", "embed", "evaluate", "nightly", "study"}
    assert components <= set(cli.SUBCOMMANDS)


def test_ray_versions_agree_everywhere():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    assert base == f"rayproject/ray:{RAY_VERSION}-py311-cpu"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f"ray[default,train,data]=={RAY_VERSION}" in pyproject
    assert 'requires-python = ">=3.11"' in pyproject
    for where, spec in cluster_specs():
        assert spec["rayVersion"] == RAY_VERSION, where


def test_torch_in_the_image_matches_the_local_install():
    dockerfile = (INFRA / "docker" / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    (pinned,) = re.findall(r"torch==(\S+)", makefile)
    assert f"pip install --no-cache-dir torch=={pinned} --index-url" in dockerfile
    assert "/whl/cpu" in dockerfile
    # The image copies every package pyproject installs.
    for package in ("twotower_core", "pipelines", "jobs"):
        assert f"COPY --chown=ray:users {package} ./{package}" in dockerfile


def test_one_image_in_every_ray_pod_and_tagged_with_the_ray_version():
    images = set()
    for where, spec in cluster_specs():
        for template in pod_templates(spec):
            for container in template["spec"]["containers"]:
                images.add(container["image"])
            assert template["spec"]["serviceAccountName"] == "twotower", where
    (image,) = images
    assert image.endswith(f"-ray{RAY_VERSION}")
    assert image in (INFRA / "docker" / "Dockerfile").read_text()


def test_token_auth_is_on_for_every_cluster():
    for where, spec in cluster_specs():
        assert spec["authOptions"] == {"mode": "token"}, where


def test_every_ray_job_cleans_up_its_cluster():
    specs = job_specs()
    assert len(specs) == 7  # six RayJobs and the RayCronJob's job template
    for where, spec in specs:
        assert spec["shutdownAfterJobFinishes"] is True, where
        ttl = spec["ttlSecondsAfterFinished"]
        assert isinstance(ttl, int) and 0 < ttl <= 86400, where
        assert isinstance(spec["activeDeadlineSeconds"], int), where
        assert spec["submissionMode"] == "K8sJobMode", where


@pytest.mark.parametrize("where,spec", job_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_entrypoints_parse_with_the_real_cli(where, spec, capsys):
    tokens = shlex.split(spec["entrypoint"])
    assert tokens[0] == "twotower", where
    command = tokens[1]
    assert command in cli.available_subcommands(), f"{where}: no subcommand {command!r}"
    try:
        args = cli.build_parser(command).parse_args(tokens[1:])
    except SystemExit:
        pytest.fail(f"{where}: `{spec['entrypoint']}` is refused: {capsys.readouterr().err}")
    assert args.command == command
    if getattr(args, "config", None) is not None:
        load_config(args.config, args.overrides)  # a shipped preset that validates
    for option, value in vars(args).items():
        if isinstance(value, str) and option in {"logs", "root", "out", "dataset", "model"}:
            assert value.startswith("s3://"), f"{where}: --{option} must be shared storage"


def test_the_schedules_run_the_same_nightly():
    nightly = documents(INFRA / "kuberay" / "rayjob-nightly.yaml")[0]
    cron = documents(INFRA / "kuberay" / "raycronjob-nightly.yaml")[0]
    assert cron["spec"]["jobTemplate"] == nightly["spec"]
    assert cron["spec"]["schedule"] == "0 3 * * *"
    # The RayJob is created afresh every night: a generated name, never a fixed one.
    assert "name" not in nightly["metadata"]
    assert nightly["metadata"]["generateName"] == "twotower-nightly-"
    (cronjob,) = [doc for _, doc in all_documents() if doc["kind"] == "CronJob"]
    assert cronjob["spec"]["schedule"] == cron["spec"]["schedule"]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"][:3] == ["kubectl", "create", "-f"]
    mount = container["volumeMounts"][0]["mountPath"]
    file_name = container["command"][3].removeprefix(mount + "/")
    assert (INFRA / "kuberay" / file_name).exists()
    assert pod["volumes"][0]["configMap"]["name"] == "twotower-nightly-rayjob"
    assert cronjob["spec"]["jobTemplate"]["spec"]["ttlSecondsAfterFinished"] > 0
    # The scheduler may create RayJobs and nothing else.
    (role,) = [doc for _, doc in all_documents() if doc["kind"] == "Role"]
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list"]}
    ]


def test_the_cron_job_fallback_documents_how_to_ship_the_ray_job():
    text = (INFRA / "k8s" / "cronjob-nightly.yaml").read_text()
    assert "--from-file=rayjob-nightly.yaml=infra/kuberay/rayjob-nightly.yaml" in text
    assert "kubectl create configmap twotower-nightly-rayjob" in text


_KEY_LINE = re.compile(r"^(\s*)(?:-\s+)?[A-Za-z_][\w./-]*:(?:\s|$)")


def uncommented_fields(text: str) -> list[str]:
    """Key lines with no comment on them or on the line before (block scalars skipped)."""
    missing = []
    lines = text.splitlines()
    block_indent = None
    previous = ""
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:
            if not stripped or indent > block_indent:
                continue
            block_indent = None
        if not stripped or stripped == "---":
            continue
        if stripped.startswith("#"):
            previous = stripped
            continue
        if _KEY_LINE.match(line) and "#" not in line and not previous.startswith("#"):
            missing.append(f"{number}: {stripped}")
        if re.search(r":\s*[|>][-+]?\s*$", line):
            block_indent = indent
        previous = stripped
    return missing


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_field_is_commented(path):
    assert uncommented_fields(path.read_text()) == []


def test_the_comment_check_can_fail():
    assert uncommented_fields("# kind: ok\nkind: RayJob\nspec:\n  name: x  # ok\n") == ["3: spec:"]


def test_local_cluster_script_is_valid_bash_and_uses_token_auth():
    script = INFRA / "local" / "ray-cluster.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "export RAY_AUTH_MODE=token" in text
    assert "ray job submit" in text.replace('"$RAY_BIN"', "ray")
    # Never a machine-wide `ray stop`: it would end other people's Ray processes.
    assert "ray stop" not in text.replace('"$RAY_BIN"', "ray")


def _fake_ray(tmp_path: Path, refusals: int, final: str = "exit 0") -> Path:
    """A `ray` stand-in: refuses the first ``refusals`` submits as a not-ready head does."""
    counter = tmp_path / "calls"
    fake = tmp_path / "ray"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'n=$(( $(cat {counter} 2>/dev/null || echo 0) + 1 )); echo "$n" > {counter}\n'
        f"if [ \"$n\" -le {refusals} ]; then\n"
        '  echo "RuntimeError: Request failed with status code 500: No available agent to '
        'submit job, please try again later.." >&2; exit 1\n'
        f"fi\necho submitted; {final}\n"
    )
    fake.chmod(0o755)
    return counter


@pytest.mark.parametrize(
    "refusals, final, code, calls",
    [(1, "exit 0", 0, 2), (0, "exit 3", 3, 1), (1, "exit 3", 3, 2)],
)
def test_local_cluster_submit_retries_only_a_not_ready_job_agent(
    tmp_path, refusals, final, code, calls
):
    counter = _fake_ray(tmp_path, refusals, final)
    script = INFRA / "local" / "ray-cluster.sh"
    env = {"PATH": "/usr/bin:/bin", "RAY_BIN": str(tmp_path / "ray"),
           "TWOTOWER_CLUSTER_DIR": str(tmp_path / "state")}  # fmt: skip
    done = subprocess.run(
        ["bash", str(script), "submit", "--", "twotower", "demo"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == code, done.stderr
    # A refused submit is retried; a job's own failure (exit 3) is returned, not retried.
    assert int(counter.read_text()) == calls
    assert "submitted" in done.stdout
