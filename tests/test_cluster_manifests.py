"""The cluster manifests parse and say what we mean: GPU limits agree with what Ray is told, autoscaling
bounds are sane, jobs run our CLI, packages leave weights and outputs behind, no credentials are written
down, the cron schedule is valid, and the autoscaler YAML passes Ray's own schema."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import ray
import yaml

from jobs.submit import DEFAULT_EXCLUDES

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob-generate.yaml"
CRONJOB = CLUSTER / "kuberay" / "cronjob-calibrate.yaml"
AUTOSCALER = CLUSTER / "autoscaler" / "gpu-cluster.yaml"
LOCAL_SCRIPT = CLUSTER / "local-multinode.sh"
PROJECT_IMAGE = "registry.example.com/invardiff:0.1.0"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_one(path: Path) -> dict:
    (document,) = load_all(path)
    return document


def by_kind(documents: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in documents}


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def calibrate_rayjob() -> dict:
    configmap = by_kind(load_all(CRONJOB))["ConfigMap"]
    return yaml.safe_load(configmap["data"]["rayjob.yaml"])


def all_cluster_specs() -> dict[str, dict]:
    return {
        "raycluster": load_one(RAYCLUSTER)["spec"],
        "rayjob-generate": load_one(RAYJOB)["spec"]["rayClusterSpec"],
        "cronjob-calibrate": calibrate_rayjob()["spec"]["rayClusterSpec"],
    }


# ----------------------------------------------------------------------------------------------------
# KubeRay


def test_raycluster_kind_and_autoscaling():
    cluster = load_one(RAYCLUSTER)
    assert cluster["apiVersion"] == "ray.io/v1"
    assert cluster["kind"] == "RayCluster"
    assert cluster["spec"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("name", ["raycluster", "rayjob-generate", "cronjob-calibrate"])
def test_cluster_spec_head_runs_no_work_and_gpu_limits_match_ray(name):
    spec = all_cluster_specs()[name]
    assert spec["rayVersion"] == ray.__version__, "image Ray must match the submitting client's Ray"

    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    (head_container,) = containers(head["template"])
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    assert head_container["image"] == PROJECT_IMAGE
    if name == "raycluster":
        assert {"containerPort": 8265, "name": "dashboard"} in head_container["ports"]

    gpu_groups = [g for g in spec["workerGroupSpecs"] if "num-gpus" in g["rayStartParams"]]
    assert gpu_groups, "a GPU worker group is required"
    for group in spec["workerGroupSpecs"]:
        # KubeRay passes rayStartParams to `ray start` verbatim; it requires strings.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
    for group in gpu_groups:
        (container,) = containers(group["template"])
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) == int(group["rayStartParams"]["num-gpus"]) >= 1
        assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        assert str(limits["cpu"]) == group["rayStartParams"]["num-cpus"]
        assert container["image"] == PROJECT_IMAGE


@pytest.mark.parametrize("name", ["raycluster", "rayjob-generate", "cronjob-calibrate"])
def test_s3_credentials_come_from_a_secret(name):
    spec = all_cluster_specs()[name]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        (container,) = containers(group["template"])
        env = {item["name"]: item for item in container["env"]}
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[variable]
            assert env[variable]["valueFrom"]["secretKeyRef"]["name"] == "invardiff-s3"


def test_generate_rayjob_runs_our_cli_and_cleans_up():
    job = load_one(RAYJOB)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("invardiff generate ")
    for flag in ("--manifest s3://", "--plan latest", "--store s3://", "--out s3://"):
        assert flag in entrypoint
    assert spec["submissionMode"] == "K8sJobMode"  # the local working_dir is only valid in the submitter pod
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0


def test_generate_rayjob_package_excludes_weights_and_outputs():
    runtime_env = yaml.safe_load(load_one(RAYJOB)["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"].startswith("/")
    # The same list `invardiff submit` uses, whose effect tests/test_submit.py checks with Ray's packager.
    assert runtime_env["excludes"] == list(DEFAULT_EXCLUDES)
    for pattern in ("/models/", "/weights/", "*.ckpt", "/out/", "/runs/", ".git/", ".venv/"):
        assert pattern in runtime_env["excludes"]
    assert not any(is_secret_name(name) for name in runtime_env.get("env_vars", {}))


# ----------------------------------------------------------------------------------------------------
# Nightly calibration


CRON_FIELD_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def is_valid_cron(expression: str) -> bool:
    """Standard 5-field cron: *, n, a-b, */s, a-b/s and comma lists, within each field's range."""
    fields = expression.split()
    if len(fields) != 5:
        return False
    for field, (low, high) in zip(fields, CRON_FIELD_RANGES, strict=True):
        for item in field.split(","):
            match = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", item)
            if not match:
                return False
            start, end, step = match.group(2), match.group(3), match.group(4)
            if step is not None and int(step) == 0:
                return False
            if start is not None:
                first, last = int(start), int(end) if end is not None else int(start)
                if not (low <= first <= last <= high):
                    return False
    return True


def test_cron_validator_rejects_what_it_should():
    assert is_valid_cron("0 2 * * *") and is_valid_cron("*/15 0-6,22 1 1-12/2 0,7")
    for bad in ("0 2 * *", "61 2 * * *", "0 24 * * *", "0 2 0 * *", "0 2 * 13 *", "*/0 * * * *", "0 2 * * MON-"):
        assert not is_valid_cron(bad), bad


def test_cronjob_schedules_a_calibration_rayjob_nightly():
    documents = load_all(CRONJOB)
    kinds = by_kind(documents)
    assert set(kinds) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}

    cron = kinds["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    assert is_valid_cron(cron["spec"]["schedule"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"

    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    (container,) = pod["containers"]
    command = container["command"]
    assert command[:3] == ["kubectl", "create", "-f"]  # create, not apply: the template uses generateName
    (mount,) = container["volumeMounts"]
    assert command[3] == f"{mount['mountPath']}/rayjob.yaml"
    (volume,) = pod["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]


def test_cron_rbac_allows_exactly_creating_rayjobs():
    kinds = by_kind(load_all(CRONJOB))
    (rule,) = kinds["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"]
    assert "create" in rule["verbs"] and not {"delete", "*", "update", "patch"} & set(rule["verbs"])
    binding = kinds["RoleBinding"]
    assert binding["roleRef"]["name"] == kinds["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == kinds["ServiceAccount"]["metadata"]["name"]


def test_calibration_rayjob_template():
    job = calibrate_rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["generateName"].endswith("-")
    spec = job["spec"]
    entrypoint = spec["entrypoint"]
    assert entrypoint.startswith("invardiff calibrate ")
    assert "--refresh" in entrypoint.split() and "--store s3://" in entrypoint
    workers = int(re.search(r"--workers (\d+)", entrypoint).group(1))
    (gpu_group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers <= gpu_group["maxReplicas"], "calibration workers must fit the GPU group"
    assert spec["shutdownAfterJobFinishes"] is True
    # Bounded below the schedule's period, so nights never overlap.
    assert 0 < spec["activeDeadlineSeconds"] < 24 * 3600


# ----------------------------------------------------------------------------------------------------
# Ray autoscaler (VMs)


def test_autoscaler_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load_one(AUTOSCALER)))


def test_autoscaler_node_types_and_start_commands_agree():
    config = load_one(AUTOSCALER)
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    assert config["upscaling_speed"] > 0 and config["idle_timeout_minutes"] > 0

    head = node_types[config["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--head" in head_start and "--num-cpus=0" in head_start

    workers = {name: t for name, t in node_types.items() if name != config["head_node_type"]}
    gpu_workers = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "a GPU worker node type is required"
    for node_type in workers.values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
        assert node_type["resources"]["CPU"] >= 1
    worker_start = " ".join(config["worker_start_ray_commands"])
    (gpus,) = {t["resources"]["GPU"] for t in gpu_workers.values()}
    assert f"--num-gpus={gpus}" in worker_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")


def test_autoscaler_installs_like_the_readme_and_syncs_no_weights():
    config = load_one(AUTOSCALER)
    commands = config["setup_commands"]
    torch_step = next(i for i, c in enumerate(commands) if "pip install torch==2.13.0" in c)
    project_step = next(i for i, c in enumerate(commands) if re.search(r"pip install (-e )?~/invardiff", c))
    assert torch_step < project_step, "torch must be pinned before the project resolves its dependencies"
    assert config["file_mounts"]["~/invardiff"] == "."
    assert config["rsync_exclude"] == list(DEFAULT_EXCLUDES)


# ----------------------------------------------------------------------------------------------------
# No credentials written down, anywhere


SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
CREDENTIAL_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{30,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._-]{20,}"),
]


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def is_file_reference(value) -> bool:
    # A secret kept in a file and referenced by path (file_mounts) is not written down here.
    return isinstance(value, str) and value.startswith(("/", "~/", "./"))


def literal_secret_values(node, path="") -> list[str]:
    """Paths of env entries / mappings that give a secret-looking name a literal value."""
    found = []
    if isinstance(node, dict):
        if isinstance(node.get("name"), str) and is_secret_name(node["name"]) and "value" in node:
            found.append(f"{path}/{node['name']}")
        for key, value in node.items():
            literal = isinstance(value, (str, int)) and not is_file_reference(value)
            if isinstance(key, str) and key != "name" and is_secret_name(key) and literal:
                found.append(f"{path}/{key}")
            found.extend(literal_secret_values(value, f"{path}/{key}"))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            found.extend(literal_secret_values(item, f"{path}[{index}]"))
    return found


def test_secret_detector_finds_literal_credentials():
    assert literal_secret_values({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]})
    assert literal_secret_values({"provider": {"aws_access_key_id": "x"}})
    assert not literal_secret_values({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {}}]})
    assert not literal_secret_values({"file_mounts": {"~/.ray/auth_token": "~/.ray/auth_token"}})
    assert any(p.search("key: AKIAIOSFODNN7EXAMPLE") for p in CREDENTIAL_PATTERNS)


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*")), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_literal_credentials_in_cluster_files(path):
    if path.is_dir():
        return
    text = path.read_text()
    for pattern in CREDENTIAL_PATTERNS:
        assert not pattern.search(text), f"{path.name} matches {pattern.pattern}"
    if path.suffix in (".yaml", ".yml"):
        documents = load_all(path)
        if path == CRONJOB:
            documents.append(calibrate_rayjob())
        for document in documents:
            assert literal_secret_values(document) == [], path.name


# ----------------------------------------------------------------------------------------------------
# Local multi-node script (no cluster is started here)


def run_script(*arguments: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(LOCAL_SCRIPT), *arguments], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )


def test_local_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(LOCAL_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck is not installed (apt-get install shellcheck)"
)
def test_local_script_passes_shellcheck():
    result = subprocess.run(["shellcheck", str(LOCAL_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_local_script_usage_and_argument_errors(tmp_path):
    help_text = run_script("--help", tmp_path=tmp_path)
    assert help_text.returncode == 0
    assert "start [--workers N]" in help_text.stdout and "stop [--state-dir DIR]" in help_text.stdout

    unknown = run_script("restart", tmp_path=tmp_path)
    assert unknown.returncode == 2 and "unknown command: restart" in unknown.stderr
    assert run_script("start", "--workers", "two", tmp_path=tmp_path).returncode == 1
    assert "needs a value" in run_script("start", "--workers", tmp_path=tmp_path).stderr
    assert "--auth must be" in run_script("start", "--auth", "none", tmp_path=tmp_path).stderr


def test_local_script_status_and_stop_touch_only_their_state_dir(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    assert "no cluster recorded" in run_script("status", "--state-dir", str(state), tmp_path=tmp_path).stdout
    # A recorded node whose process is gone: status says so, stop forgets it without signalling anyone.
    (state / "worker-1.pid").write_text("999999999\n")
    assert "worker-1: exited" in run_script("status", "--state-dir", str(state), tmp_path=tmp_path).stdout
    stopped = run_script("stop", "--state-dir", str(state), tmp_path=tmp_path)
    assert stopped.returncode == 0 and not (state / "worker-1.pid").exists()


def test_local_script_starts_workers_with_own_resources_on_loopback():
    # The start path needs a Ray cluster, which tests do not start; check the command lines it builds.
    text = LOCAL_SCRIPT.read_text()
    assert "--node-ip-address=127.0.0.1" in text
    assert "--dashboard-host=127.0.0.1" in text
    assert "--num-cpus=0 --num-gpus=0" in text  # the head, like production
    assert '--resources="{\\"local_worker_$i\\": 1}"' in text
    assert '--num-cpus="$cpus_per_worker"' in text and '--temp-dir="$state_dir/$name"' in text
    assert 'RAY_AUTH_MODE="$auth_mode"' in text and "auth_mode=token" in text  # token auth unless told otherwise
    assert "ray stop" not in re.sub(r"#.*", "", text), "must never stop other Ray instances on the machine"
