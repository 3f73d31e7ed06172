"""The Argo CD example (examples/argocd/): the LoRATrainingJob health check, run the way Argo CD runs
it, on job statuses recorded from the e2e tests; the argocd-cm snippet that installs it; the
example Application for the chart.

The health script runs in examples/argocd/healthcheck, a small Go program on gopher-lua (the Lua VM
Argo CD embeds, at the version Argo CD pins) that sets up the same environment as Argo CD: no
string or math library, the object as `obj`, the returned table read as {status, message}. It is
built once per change of its sources and cached under $LORAKUBE_CACHE, like localcluster's
binaries.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster import build as go_build

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "examples" / "argocd"
HEALTH_LUA = EXAMPLE / "health.lua"
HARNESS = EXAMPLE / "healthcheck"
CAPTURED = REPO_ROOT / "tests" / "fixtures" / "job-statuses"
CM_KEY = "resource.customizations.health.lorakube.io_LoRATrainingJob"

# What Argo CD must show for each phase the operator writes.
HEALTH_BY_PHASE = {
    "Pending": "Progressing",
    "Created": "Progressing",
    "Staging": "Progressing",
    "Running": "Progressing",
    "Restarting": "Progressing",
    "Succeeded": "Healthy",
    "Failed": "Degraded",
    "Suspended": "Suspended",
}


def harness_key() -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"go": go_build.go_version(), "env": go_build.FIXED_GO_ENV}, sort_keys=True).encode())
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update(name.encode())
        digest.update((HARNESS / name).read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def healthcheck() -> Path:
    """The built harness: <cache>/argocd-healthcheck/<key>/healthcheck, built on a cache miss."""
    final = go_build.cache_root() / "argocd-healthcheck" / harness_key()
    binary = final / "healthcheck"
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions starting at once build it once
        if not binary.is_file():
            staging = Path(tempfile.mkdtemp(prefix=f"{final.name}.partial-", dir=final.parent))
            try:
                result = subprocess.run(["go", "build", "-o", str(staging / "healthcheck"), "."], cwd=HARNESS,
                                        env=go_build.go_env(), capture_output=True, text=True, timeout=600)
                assert result.returncode == 0, f"building examples/argocd/healthcheck failed:\n{result.stderr}"
                staging.chmod(0o755)
                if final.exists():
                    shutil.rmtree(final)
                staging.rename(final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return binary


def run_health(healthcheck: Path, job: dict[str, Any], script: Path = HEALTH_LUA) -> dict[str, str]:
    result = subprocess.run([str(healthcheck), str(script)], input=json.dumps(job), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, f"Argo CD would report an error for this job: {result.stderr}"
    return json.loads(result.stdout)


def captured() -> list[Path]:
    return sorted(CAPTURED.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def true_condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind and c["status"] == "True")


# --- the harness behaves as Argo CD does -------------------------------------------------------

def test_the_harness_runs_scripts_without_the_string_library_as_argo_cd_does(healthcheck, tmp_path):
    uses_string = tmp_path / "uses-string.lua"
    uses_string.write_text('return {status = "Healthy", message = string.format("%d", 1)}\n')
    result = subprocess.run([str(healthcheck), str(uses_string)], input="{}", capture_output=True, text=True)
    assert result.returncode == 1 and "format" in result.stderr

    no_return = tmp_path / "no-return.lua"
    no_return.write_text('hs = {status = "Healthy"}\n')
    result = subprocess.run([str(healthcheck), str(no_return)], input="{}", capture_output=True, text=True)
    assert result.returncode == 1 and "returned nothing" in result.stderr

    not_a_table = tmp_path / "not-a-table.lua"
    not_a_table.write_text('return "Healthy"\n')
    result = subprocess.run([str(healthcheck), str(not_a_table)], input="{}", capture_output=True, text=True)
    assert result.returncode == 1 and "expect table output from Lua script, not string" in result.stderr

    bad_status = tmp_path / "bad-status.lua"
    bad_status.write_text('return {status = "Fine", message = obj.metadata.name}\n')
    assert run_health(healthcheck, {"metadata": {"name": "x"}}, bad_status) == {
        "status": "Unknown", "message": "Lua returned an invalid health status"}


# --- recorded statuses ---------------------------------------------------------------------------

def phase_of(job: dict[str, Any]) -> str | None:
    return (job.get("status") or {}).get("phase")


def test_the_recorded_statuses_cover_what_a_job_goes_through():
    jobs = [load(path) for path in captured()]
    phases = {phase_of(job) for job in jobs}
    assert {None, "Created", "Staging", "Running", "Restarting", "Succeeded", "Failed", "Suspended"} <= phases, phases
    # one was recorded between a spec change (resume) and the operator's next pass
    assert any(phase_of(job) and job["status"]["observedGeneration"] < job["metadata"]["generation"]
               for job in jobs)
    # recorded with the machine's data folder replaced (localcluster.recorder's scrub)
    assert {volume["hostPath"]["path"] for job in jobs for volume in job["spec"]["resources"]["volumes"]
            if "hostPath" in volume} == {"/srv/lorakube-data"}


@pytest.mark.parametrize("path", captured(), ids=lambda p: p.stem)
def test_health_of_a_recorded_job(healthcheck, path):
    job = load(path)
    health = run_health(healthcheck, job)
    message = health["message"]
    phase = phase_of(job)
    if phase is None:
        # recorded before the operator's first pass
        assert health["status"] == "Progressing" and "no status yet" in message, health
        return
    status = job["status"]
    if status["observedGeneration"] < job["metadata"]["generation"]:
        # recorded between a spec change and the operator's next pass
        assert health["status"] == "Progressing", health
        assert f"generation {job['metadata']['generation']} of the spec" in message
        assert f"phase {phase}" in message
        return
    assert health["status"] == HEALTH_BY_PHASE[phase], health
    assert message.startswith(f"{phase}: "), message
    if phase == "Staging":
        assert f"{status['progress']['text']}" in message and "s3://models/tiny-flux" in message
    if phase in ("Succeeded", "Failed", "Suspended", "Restarting", "Created", "Staging"):
        condition = true_condition(status, phase)
        reason = "" if condition["reason"] == phase else f"{condition['reason']}: "
        assert f"{phase}: {reason}{condition['message']}" in message
    if phase in ("Running", "Restarting", "Succeeded") and status.get("progress"):
        assert f"step {status['progress']['text']}, loss {status['progress']['loss']}" in message
    if phase == "Running" and not status.get("progress"):
        assert "waiting for the first progress report" in message
    if phase in ("Running", "Created") and status["restarts"]:
        assert f"attempt {status['attempt']} ({status['restarts']} restart" in message
    if phase == "Created":
        assert f"({status['readyNodes']} running)" in message


def test_a_job_that_failed_with_a_user_error_names_the_reason_and_the_failed_pod(healthcheck):
    job = load(CAPTURED / "10-failed-user-error.json")
    health = run_health(healthcheck, job)
    assert health["status"] == "Degraded"
    assert "UserError" in health["message"] and job["status"]["lastFailure"]["pod"] in health["message"]
    assert "status.lastFailure.logTail" in health["message"]


# --- crafted edge cases (no e2e test stops in these states) --------------------------------------

def crafted_from(name: str) -> dict[str, Any]:
    return copy.deepcopy(load(CAPTURED / name))


def test_crafted_an_empty_status_is_progressing_waiting_for_the_operator(healthcheck):
    job = crafted_from("06-running.json")
    job["status"] = {}
    health = run_health(healthcheck, job)
    assert health["status"] == "Progressing" and "no status yet" in health["message"]


def test_crafted_a_spec_change_the_operator_has_not_seen_is_progressing_even_when_succeeded(healthcheck):
    job = crafted_from("09-succeeded-after-restart.json")
    job["metadata"]["generation"] = job["status"]["observedGeneration"] + 1
    health = run_health(healthcheck, job)
    assert health["status"] == "Progressing"
    assert (f"generation {job['metadata']['generation']}" in health["message"]
            and "phase Succeeded" in health["message"])


def test_crafted_a_pending_job_being_resumed_says_so(healthcheck):
    # The operator writes Pending and the pods of the resumed attempt in the same pass, so the
    # e2e test only ever sees Created; this is 04 with the phase that pass started from.
    job = crafted_from("04-created-after-resume.json")
    job["status"]["phase"] = "Pending"
    job["status"]["conditions"] = [c for c in job["status"]["conditions"] if c["type"] == "Suspended"]
    health = run_health(healthcheck, job)
    assert health == {"status": "Progressing", "message": (
        "Pending: resuming after suspension (spec.runPolicy.suspend is false); "
        "waiting for the operator to create the pods of attempt 2")}


def test_crafted_a_phase_this_check_does_not_know_is_unknown(healthcheck):
    job = crafted_from("06-running.json")
    job["status"]["phase"] = "Hibernating"
    assert run_health(healthcheck, job) == {
        "status": "Unknown",
        "message": "Hibernating: unrecognised phase; this health check may be older than the operator"}


# --- the files a user applies ----------------------------------------------------------------------

def test_the_argocd_cm_patch_embeds_health_lua_verbatim():
    patch = yaml.safe_load((EXAMPLE / "argocd-cm-patch.yaml").read_text())
    assert patch["kind"] == "ConfigMap" and patch["metadata"]["name"] == "argocd-cm"
    assert patch["data"][CM_KEY] == HEALTH_LUA.read_text(), (
        "argocd-cm-patch.yaml is out of date: run python examples/argocd/render_cm_patch.py")


def test_the_documented_patch_command_installs_the_check_into_argocd_cm(local_cluster, new_namespace):
    """The README's `kubectl patch ... --patch-file argocd-cm-patch.yaml`, on an argocd-cm that
    already holds other settings (as every Argo CD install has), keeps them and adds the check."""
    local_cluster.apply({"apiVersion": "v1", "kind": "ConfigMap",
                         "metadata": {"name": "argocd-cm", "namespace": new_namespace},
                         "data": {"url": "https://argocd.example.com"}})
    local_cluster.kubectl("patch", "configmap", "argocd-cm", "-n", new_namespace, "--type", "merge",
                          "--patch-file", str(EXAMPLE / "argocd-cm-patch.yaml"), check=True)
    data = local_cluster.get_json("configmap", "argocd-cm", namespace=new_namespace)["data"]
    assert data == {"url": "https://argocd.example.com", CM_KEY: HEALTH_LUA.read_text()}


def test_the_example_application_installs_the_chart_with_server_side_apply():
    app = yaml.safe_load((EXAMPLE / "application.yaml").read_text())
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    source = app["spec"]["source"]
    assert source["path"] == "charts/lorakube"
    values = source["helm"]["valuesObject"]
    assert set(values) == {"image", "watch"}
    assert set(values["image"]) == {"repository", "tag"} and isinstance(values["watch"]["namespaces"], list)
    assert {"ServerSideApply=true", "CreateNamespace=true"} <= set(app["spec"]["syncPolicy"]["syncOptions"])


def test_the_example_application_values_render_with_the_chart(tmp_path):
    """The chart's values.schema.json rejects unknown keys, so a rendering proves the Application's
    values are keys the chart has; the operator Deployment runs the image they name."""
    chart = REPO_ROOT / "charts" / "lorakube"
    if not (chart / "Chart.yaml").is_file():
        pytest.skip("charts/lorakube is not in this checkout yet")
    values = yaml.safe_load((EXAMPLE / "application.yaml").read_text())["spec"]["source"]["helm"]["valuesObject"]
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm = go_build.build(log=lambda _: None).helm
    result = subprocess.run([str(helm), "template", "lorakube", str(chart), "-n", "lorakube-system",
                             "-f", str(values_file)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    images = {container["image"] for doc in yaml.safe_load_all(result.stdout)
              if doc and doc.get("kind") == "Deployment"
              for container in doc["spec"]["template"]["spec"]["containers"]}
    assert f"{values['image']['repository']}:{values['image']['tag']}" in images, images
