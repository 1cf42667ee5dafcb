"""infra/k8s/: the manifests against the Kubernetes API's own JSON schemas (kubernetes-validate,
strict: unknown fields are errors), the settings that must agree with each other, and the
torchrun command lines run for real: the manifests' exact arguments, with their volumes mapped
to temporary folders, train a tiny model with gloo on the CPU (multi-node as two torchrun
processes on loopback, one per node rank)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate.utils as kv
import pytest
import yaml

from detr.checkpoint import load_file
from detr.config import to_dict
from tests.conftest import tiny_training
from tests.infra.conftest import INFRA, free_port

K8S = INFRA / "k8s"
VERSIONS = ("1.31.0", kv.latest_version())  # oldest we claim (backoffLimitPerIndex GA later)
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|[eE][+-]?\d+)?$")


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _by_kind(name: str, kind: str) -> dict:
    (doc,) = [d for d in documents(name) if d["kind"] == kind]
    return doc


def _container(job: dict) -> dict:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def check_quantities(tree, where: str = "") -> None:
    """Resource sizes as Kubernetes quantities (the schema types them as int-or-string)."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            path = f"{where}.{key}"
            if key in ("limits", "requests") and isinstance(value, dict):
                for resource, amount in value.items():
                    assert QUANTITY.match(str(amount)), f"{path}.{resource}: {amount!r}"
            elif key in ("sizeLimit", "storage"):
                assert QUANTITY.match(str(value)), f"{path}: {value!r}"
            else:
                check_quantities(value, path)
    elif isinstance(tree, list):
        for i, item in enumerate(tree):
            check_quantities(item, f"{where}[{i}]")


@pytest.mark.parametrize("name", ["storage.yaml", "torchrun-job.yaml", "torchrun-multinode.yaml",
                                  "prefect-worker.yaml"])
@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_match_the_kubernetes_schema(name, version):
    docs = documents(name)
    assert docs
    for doc in docs:
        kv.validate(doc, version, strict=True)  # raises on any schema error
        check_quantities(doc)


def test_validation_catches_mistakes():
    """The checks can fail: a misspelt field and a bad quantity are caught."""
    job = _by_kind("torchrun-job.yaml", "Job")
    _container(job)["volumeMount"] = _container(job).pop("volumeMounts")
    with pytest.raises(Exception, match="volumeMount"):
        kv.validate(job, VERSIONS[-1], strict=True)
    job = _by_kind("torchrun-job.yaml", "Job")
    _container(job)["resources"]["limits"]["memory"] = "lots"
    with pytest.raises(AssertionError, match="lots"):
        check_quantities(job)


@pytest.mark.parametrize("name", ["torchrun-job.yaml", "torchrun-multinode.yaml"])
def test_one_process_per_gpu_and_volumes_mounted(name):
    job = _by_kind(name, "Job")
    pod = job["spec"]["template"]["spec"]
    container = _container(job)
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1
    assert int(_env(container)["NPROC_PER_NODE"]) == gpus
    assert "--nproc-per-node=$(NPROC_PER_NODE)" in container["args"]
    assert container["command"] == ["torchrun"]
    assert container["args"][container["args"].index("-m") + 1] == "detr.train"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert set(mounts) == set(volumes)
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {d["metadata"]["name"] for d in documents("storage.yaml")}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["restartPolicy"] == "Never"


def test_worker_runs_the_gpu_pool_with_its_own_account():
    template = json.loads((K8S / "work-pool-gpu.json").read_text())
    deployment = _by_kind("prefect-worker.yaml", "Deployment")
    role = _by_kind("prefect-worker.yaml", "Role")
    binding = _by_kind("prefect-worker.yaml", "RoleBinding")
    account = _by_kind("prefect-worker.yaml", "ServiceAccount")["metadata"]["name"]
    pod = deployment["spec"]["template"]["spec"]
    command = _container(deployment)["command"]
    assert command[command.index("--type") + 1] == "kubernetes"
    assert command[command.index("--pool") + 1] == "detr-ops-gpu"
    assert _container(deployment)["image"] == \
        template["variables"]["properties"]["image"]["default"]
    assert pod["serviceAccountName"] == account == binding["subjects"][0]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    jobs = [r for r in role["rules"] if r["apiGroups"] == ["batch"]]
    assert jobs and {"create", "watch", "delete"} <= set(jobs[0]["verbs"])
    assert "*" not in str(role["rules"])  # least privilege


def test_multinode_rendezvous_is_consistent():
    job = _by_kind("torchrun-multinode.yaml", "Job")
    service = _by_kind("torchrun-multinode.yaml", "Service")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    env = _env(_container(job))
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"]) >= 2
    # The rendezvous host is pod 0 of this job, by its name in the headless Service.
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name":
                                           job["metadata"]["name"]}
    assert pod["subdomain"] == service["metadata"]["name"]
    assert env["MASTER_ADDR"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(env["MASTER_PORT"]) == service["spec"]["ports"][0]["port"]
    (rank,) = [e for e in _container(job)["env"] if e["name"] == "NODE_RANK"]
    assert rank["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"


# ---- the manifests' torchrun commands, run for real on the CPU ------------------------------

def _tiny_params(path: Path) -> Path:
    model, loss, data, train = tiny_training(epochs=1, batch_size=2)
    path.write_text(yaml.safe_dump({"model": to_dict(model), "loss": to_dict(loss),
                                    "data": to_dict(data), "train": to_dict(train)}))
    return path


def _local_command(job: dict, env: dict[str, str], mounts: dict[str, Path]) -> list[str]:
    """The container's command line as Kubernetes would expand it ($(VAR) from ``env``), with
    ``torchrun`` as this interpreter's module and mount paths mapped to local folders."""
    container = _container(job)

    def expand(arg: str) -> str:
        arg = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg)
        option, eq, value = arg.rpartition("=") if arg.startswith("--") else ("", "", arg)
        for mount_path, local in mounts.items():
            if value == mount_path or value.startswith(mount_path + "/"):
                value = str(local) + value[len(mount_path):]
        return option + eq + value

    assert container["command"] == ["torchrun"]
    return [sys.executable, "-m", "torch.distributed.run"] + [expand(a) for a in container["args"]]


def _mounts(job: dict, tmp_path: Path, tiny_dataset: Path) -> dict[str, Path]:
    paths = {m["name"]: m["mountPath"] for m in _container(job)["volumeMounts"]}
    config, data, out = tmp_path / "config", tmp_path / "data", tmp_path / "checkpoints"
    config.mkdir()
    data.mkdir()
    _tiny_params(config / "params.yaml")
    (data / "dataset").symlink_to(tiny_dataset)
    return {paths["params"]: config, paths["data"]: data, paths["checkpoints"]: out}


def _run_env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


@pytest.mark.slow
def test_single_node_job_command_trains(tmp_path, tiny_dataset):
    job = _by_kind("torchrun-job.yaml", "Job")
    env = {**_env(_container(job)), "NPROC_PER_NODE": "1"}  # one gloo process for 8 GPUs
    mounts = _mounts(job, tmp_path, tiny_dataset)
    cmd = _local_command(job, env, mounts)
    done = subprocess.run(cmd, cwd=tmp_path, env=_run_env(env), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = load_file(mounts["/checkpoints"] / "checkpoint.pth")
    assert checkpoint["epoch"] == 0
    assert "Average Precision" in done.stdout  # rank 0 printed the COCO table


@pytest.mark.slow
def test_multinode_job_command_trains_across_two_node_ranks(tmp_path, tiny_dataset):
    """Two torchrun launchers, node ranks 0 and 1 (as two pods of the Indexed Job), meet at
    the rendezvous address and train one model together."""
    job = _by_kind("torchrun-multinode.yaml", "Job")
    base = {**_env(_container(job)), "NNODES": "2", "NPROC_PER_NODE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    mounts = _mounts(job, tmp_path, tiny_dataset)
    procs = []
    for rank in ("0", "1"):
        env = {**base, "NODE_RANK": rank}
        log = (tmp_path / f"node{rank}.log").open("w")
        procs.append((subprocess.Popen(_local_command(job, env, mounts), cwd=tmp_path,
                                       env=_run_env(env), stdout=log, stderr=subprocess.STDOUT),
                      tmp_path / f"node{rank}.log"))
    try:
        for proc, log in procs:
            assert proc.wait(600) == 0, log.read_text()[-3000:]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
    checkpoint = load_file(mounts["/checkpoints"] / "checkpoint.pth")
    assert checkpoint["epoch"] == 0
    assert "Average Precision" in (tmp_path / "node0.log").read_text()
