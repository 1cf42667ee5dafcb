"""infra/k8s/work-pool-gpu.json, the base job template of the Kubernetes work pool, checked
with Prefect's and prefect-kubernetes' own code. The end-to-end part (the pool created with
`prefect work-pool create` on a Prefect server, a deployment's flow run rendered into the Job
the worker would submit, that Job against the Kubernetes schema) is in test_team_servers.py.
"""

from __future__ import annotations

import copy
import json

import pytest
from prefect.server.schemas.actions import WorkPoolCreate, validate_base_job_template
from prefect.utilities.templating import apply_values, find_placeholders
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from tests.infra.conftest import INFRA

TEMPLATE = INFRA / "k8s" / "work-pool-gpu.json"
GPU_VARIABLES = {"gpu_count", "node_selector", "tolerations", "shm_size", "env_from"}
# Our deliberate changes to the worker's defaults (the rest must stay as prefect-kubernetes has it).
CHANGED = {"image": {"default", "description", "examples"}, "finished_job_ttl": {"default"}}


@pytest.fixture(scope="module")
def template() -> dict:
    return json.loads(TEMPLATE.read_text())


def test_the_server_accepts_it(template):
    assert validate_base_job_template(template) == template
    pool = WorkPoolCreate(name="detr-ops-gpu", type="kubernetes", base_job_template=template)
    assert pool.base_job_template == template


def test_every_placeholder_is_a_declared_variable(template):
    used = {p.name for p in find_placeholders(json.dumps(template["job_configuration"]))}
    declared = set(template["variables"]["properties"])
    assert used == declared, f"unused: {declared - used}, undeclared: {used - declared}"


def test_it_extends_the_kubernetes_workers_default(template):
    """Everything the worker's own default template offers still works (deployments may set
    any of those job variables), so upgrading prefect-kubernetes is checked here too."""
    default = KubernetesWorker.get_default_base_job_template()
    assert set(template["job_configuration"]) == set(default["job_configuration"])
    ours, theirs = template["variables"]["properties"], default["variables"]["properties"]
    assert set(ours) == set(theirs) | GPU_VARIABLES
    for name, schema in theirs.items():
        differing = {k for k in set(schema) | set(ours[name]) if schema.get(k) != ours[name].get(k)}
        assert differing <= CHANGED.get(name, set()), f"{name}: {differing} changed"
    assert template["variables"].get("definitions") == default["variables"].get("definitions")


def test_gpu_settings_reach_the_job_manifest(template):
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert pod["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory",
                                                            "sizeLimit": "{{ shm_size }}"}}]
    assert pod["nodeSelector"] == "{{ node_selector }}"
    assert pod["tolerations"] == "{{ tolerations }}"
    assert container["envFrom"] == "{{ env_from }}"


def _render(template: dict, values: dict) -> dict:
    """What ``from_template_and_values`` does before it needs an API (block and variable
    references, which this template has none of): defaults, then the values, applied."""
    variables = KubernetesWorkerJobConfiguration._get_base_config_defaults(
        template["variables"]["properties"])
    return apply_values(copy.deepcopy(template["job_configuration"]), {**variables, **values})


def test_the_worker_accepts_the_rendered_configuration(template):
    """prefect-kubernetes builds its job configuration from the rendering and checks the
    manifest's shape (a container named prefect-job, restartPolicy Never...)."""
    config = KubernetesWorkerJobConfiguration(**_render(template, {"gpu_count": 2}))
    container = config.job_manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert config.job_manifest["spec"]["template"]["spec"]["volumes"][0]["emptyDir"] == \
        {"medium": "Memory", "sizeLimit": "8Gi"}
    broken = _render(template, {})
    broken["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    with pytest.raises(ValueError, match="prefect-job"):
        KubernetesWorkerJobConfiguration(**broken)
