"""Offline tests for k8s/: manifests, kustomize overlays, the CronJob runner
script, the vendored KubeRay schemas and the Dockerfile.

Everything runs without a cluster or network in a few seconds. The
kustomize tests use `kubectl kustomize` when kubectl is on PATH and are
skipped otherwise.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


checks = _load("dcam_k8s_checks", HERE / "k8s_checks.py")

REPO = checks.REPO
K8S = checks.K8S_DIR
FIXTURES = HERE / "fixtures"
DATA = HERE / "data"


@functools.lru_cache(maxsize=None)
def _docs_cached(name: str) -> tuple:
    return tuple(checks.load_documents(K8S / name))


def docs_of(name: str) -> list[dict]:
    """Parsed documents of k8s/<name> (a fresh copy: tests may modify it)."""
    return copy.deepcopy(list(_docs_cached(name)))


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def all_cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) for the cluster and the clusters RayJobs create."""
    out = [("raycluster.yaml", by_kind(docs_of("raycluster.yaml"), "RayCluster")["spec"]),
           ("rayjob-audit.yaml", by_kind(docs_of("rayjob-audit.yaml"), "RayJob")["spec"]["rayClusterSpec"]),
           ("raycronjob-audit.yaml",
            by_kind(docs_of("raycronjob-audit.yaml"), "RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"]),
           ("cronjob-audit.yaml template", rendered_template()["spec"]["rayClusterSpec"])]
    return out


def params() -> dict[str, str]:
    return by_kind(docs_of("cronjob-audit.yaml"), "ConfigMap", "dcam-audit-params")["data"]


def template_text() -> str:
    return by_kind(docs_of("cronjob-audit.yaml"), "ConfigMap", "dcam-audit-rayjob-template")["data"]["rayjob"]


def runner_script() -> str:
    cron = by_kind(docs_of("cronjob-audit.yaml"), "CronJob")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["/bin/sh", "-c"]
    return container["args"][0]


def template_values(audit_id: str, values: dict[str, str]) -> dict[str, str]:
    """What the runner substitutes: the params plus the id and the derived actor count."""
    out = {"AUDIT_ID": audit_id, **values}
    out["DCAM_GPU_ACTORS"] = str(int(out["DCAM_MAX_GPU_WORKERS"]) * int(out["DCAM_GPUS_PER_WORKER"]))
    return out


def rendered_template(audit_id: str = "audit-20260115-0200", **overrides: str) -> dict:
    values = template_values(audit_id, {**params(), **overrides})
    return checks.yaml_load(checks.render_template(template_text(), values))


def dcam_args(entrypoint: str) -> dict[str, str]:
    """`dcam run k=v ...` -> {k: v} (a `$(...)` shell substitution counts as one word)."""
    words = re.sub(r"\$\([^)]*\)", "SUBST", entrypoint).split()
    assert words[:2] == ["dcam", "run"], entrypoint
    return dict(w.split("=", 1) for w in words[2:])


# ---------------------------------------------------------------------------
# every manifest validates (schemas in strict mode + operator rules)
# ---------------------------------------------------------------------------

EXPECTED_FILES = ["Dockerfile", "Dockerfile.dockerignore", "README.md", "raycluster.yaml",
                  "rayjob-audit.yaml", "raycronjob-audit.yaml", "cronjob-audit.yaml",
                  "kustomization.yaml", "components/params/kustomization.yaml",
                  "overlays/example/kustomization.yaml", "schemas/README.md",
                  "schemas/build_schemas.py", "schemas/raycluster.ray.io.v1.json",
                  "schemas/rayjob.ray.io.v1.json", "schemas/raycronjob.ray.io.v1.json"]


@pytest.mark.parametrize("name", EXPECTED_FILES)
def test_expected_file_exists(name):
    assert (K8S / name).is_file()


MANIFESTS = checks.manifest_files()


def test_manifest_inventory():
    names = {p.relative_to(K8S).as_posix() for p in MANIFESTS}
    assert names == {"raycluster.yaml", "rayjob-audit.yaml", "raycronjob-audit.yaml", "cronjob-audit.yaml"}
    kinds = {d["kind"] for p in MANIFESTS for d in checks.load_documents(p)}
    assert kinds == {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ServiceAccount", "Role",
                     "RoleBinding", "ConfigMap"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid(path):
    assert checks.load_documents(path), "no documents"
    assert checks.check_file(path) == []


def test_strict_mode_is_really_strict():
    """The committed manifests pass strict mode, and a typo anywhere fails it."""
    (cluster,) = docs_of("raycluster.yaml")
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    errors = checks.check_document(cluster)
    assert any("'imagePullPolicyy' was unexpected" in e for e in errors), errors
    # Non-strict validation (the CRD as served) would let it through.
    assert checks.crd_schema_errors(cluster, strict=False) == []


def test_strictify_respects_preserve_unknown_fields():
    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"x": {"type": "string"}}},
        "b": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
              "properties": {"x": {"type": "string"}}},
        "c": {"type": "object", "additionalProperties": {"type": "string"}}}}
    strict = checks.strictify(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in strict["properties"]["b"]
    assert strict["properties"]["c"]["additionalProperties"] == {"type": "string"}
    v = jsonschema.Draft7Validator(strict)
    assert not list(v.iter_errors({"b": {"x": "1", "anything": 2}, "c": {"k": "v"}}))
    assert list(v.iter_errors({"a": {"y": "typo"}}))


# ---------------------------------------------------------------------------
# negative fixtures: each fails, and only for its stated reason(s)
# ---------------------------------------------------------------------------

NEGATIVE = sorted(FIXTURES.glob("*.yaml"))


def test_there_are_negative_fixtures():
    assert len(NEGATIVE) >= 25


@pytest.mark.parametrize("path", NEGATIVE, ids=lambda p: p.stem)
def test_negative_fixture_fails_for_its_reason(path):
    expects = re.findall(r"^# expect: (.+)$", path.read_text(), flags=re.M)
    assert expects, f"{path.name} has no '# expect:' line"
    errors = checks.check_file(path)
    assert errors, f"{path.name} unexpectedly validated"
    for expect in expects:
        assert any(expect in e for e in errors), f"reason {expect!r} not reported; got {errors}"
    unrelated = [e for e in errors if not any(x in e for x in expects)]
    assert not unrelated, f"{path.name} also fails for other reasons: {unrelated}"


# ---------------------------------------------------------------------------
# operator rules as unit tests
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("expr", ["0 2 * * *", "*/15 * * * *", "30 3 * * 1-5", "0 0 1,15 * ?",
                                  "0 6 * JAN-MAR MON-FRI", "5-55/10 0-23/2 1-31 1-12 0-6", "@daily"])
def test_cron_valid(expr):
    assert checks.cron_errors(expr) == []


@pytest.mark.parametrize("expr, reason", [
    ("0 2 * *", "has 4 fields"), ("0 2 * * * *", "has 6 fields"), ("60 * * * *", "out of range 0-59"),
    ("0 24 * * *", "out of range 0-23"), ("0 0 0 * *", "out of range 1-31"), ("0 0 * 13 *", "out of range 1-12"),
    ("0 0 * * 7", "out of range 0-6"), ("*/0 * * * *", "must be a positive integer"),
    ("0 5-1 * * *", "is reversed"), ("0 x * * *", "is not a number"), ("? * * * *", "only allowed"),
    ("@every 5m", "unknown macro"), ("TZ=UTC 0 2 * * *", "spec.timeZone"), ("", "non-empty")])
def test_cron_invalid(expr, reason):
    errors = checks.cron_errors(expr)
    assert errors and any(reason in e for e in errors), errors


@pytest.mark.parametrize("image, ok", [
    ("registry.example.com/dcam:0.1.0", True), ("rayproject/ray:2.60.0-py311-gpu", True),
    ("registry.example.com:5000/ml/dcam@sha256:" + "a" * 64, True), ("dcam", False),
    ("registry.example.com:5000/dcam", False), ("dcam:latest", False)])
def test_image_pinning(image, ok):
    assert (checks.image_errors(image, "x") == []) is ok


def test_quantities():
    assert checks.parse_quantity("500m") == 0.5
    assert checks.parse_quantity("8Gi") == 8 * 2**30
    assert checks.parse_quantity("1e3") == 1000
    with pytest.raises(ValueError):
        checks.parse_quantity("8 cores")


# ---------------------------------------------------------------------------
# the design decisions the issue asks for
# ---------------------------------------------------------------------------

def test_clusters_topology():
    for where, spec in all_cluster_specs():
        assert spec["rayVersion"] == "2.60.0", where
        assert spec["enableInTreeAutoscaling"] is True, where
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", where
        assert spec["authOptions"]["mode"] == "token", where
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"]["limits"], where
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        gpu = groups["gpu"]
        assert gpu["minReplicas"] == 0 and gpu["replicas"] == 0, where
        limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, where
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
            gpu["template"]["spec"]["tolerations"], where
        if "cpu" in groups:
            cpu_limits = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert "nvidia.com/gpu" not in cpu_limits, where
        for pod_path, pod in checks.iter_pod_specs(spec):
            assert pod["securityContext"]["runAsNonRoot"] is True, (where, pod_path)
            for c in pod["containers"]:
                names = {e["name"]: e for e in c.get("env", [])}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                    assert names[key]["valueFrom"]["secretKeyRef"]["name"] == "dcam-s3", (where, key)


def test_rayjob_audit_is_retry_safe():
    job = by_kind(docs_of("rayjob-audit.yaml"), "RayJob")
    spec, meta = job["spec"], job["metadata"]
    audit_id = meta["labels"]["dcam.io/audit-id"]
    assert meta["name"] == f"dcam-{audit_id}"
    assert re.search(rf"\boutput=s3://[^ ]+/{re.escape(audit_id)}/(\s|$)", spec["entrypoint"])
    assert "$(" not in spec["entrypoint"] and "`" not in spec["entrypoint"], "id must not depend on the clock"
    assert spec["entrypoint"].startswith("dcam run ")
    assert "report.fail_under=" in spec["entrypoint"]
    assert spec["backoffLimit"] >= 1
    assert spec["activeDeadlineSeconds"] > 0 and spec["preRunningDeadlineSeconds"] > 0
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert "deletionStrategy" not in spec
    assert isinstance(checks.yaml_load(spec["runtimeEnvYAML"]), dict)
    text = (K8S / "rayjob-audit.yaml").read_text()
    assert "resume" in text and "backoffLimit" in text  # the comment explaining why retries are safe


def _rayjob_specs() -> list[tuple[str, dict]]:
    return [("rayjob-audit.yaml", by_kind(docs_of("rayjob-audit.yaml"), "RayJob")["spec"]),
            ("raycronjob-audit.yaml", by_kind(docs_of("raycronjob-audit.yaml"), "RayCronJob")["spec"]["jobTemplate"]),
            ("cronjob-audit.yaml template", rendered_template()["spec"])]


@pytest.mark.parametrize("where, spec", _rayjob_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_entrypoint_uses_the_gpus_it_asks_for(where, spec):
    """One ProbeActor per GPU, and as many actors as the GPU group can hold:
    the actors' GPU demand is what makes the autoscaler add GPU pods."""
    args = dcam_args(spec["entrypoint"])
    gpu = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"] if g["groupName"] == "gpu"][0]
    per_pod = int(gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert args["actors.num_gpus"] == "1"
    assert int(args["actors.pool_max"]) == gpu["maxReplicas"] * per_pod
    assert 1 <= int(args["actors.pool_min"]) <= int(args["actors.pool_max"])
    assert args["report.fail_under"] and args["output"].startswith("s3://")
    assert args["output"].endswith("/")


def test_raycronjob_documents_alpha_gate():
    text = (K8S / "raycronjob-audit.yaml").read_text()
    for needle in ("alpha", "RayCronJob", "feature gate", "OFF by default", "KubeRay >= 1.6"):
        assert needle.lower() in text.lower(), needle
    cron = by_kind(docs_of("raycronjob-audit.yaml"), "RayCronJob")
    assert len(cron["metadata"]["name"]) <= 36
    assert "report.fail_under=" in cron["spec"]["jobTemplate"]["entrypoint"]


def test_cronjob_policy_and_rbac():
    docs = docs_of("cronjob-audit.yaml")
    cron = by_kind(docs, "CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    sa = by_kind(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == sa
    binding = by_kind(docs, "RoleBinding")
    role = by_kind(docs, "Role")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa}]
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): r for r in role["rules"]}
    assert set(rules) == {(("ray.io",), ("rayjobs",)), (("",), ("configmaps",))}
    assert sorted(rules[(("ray.io",), ("rayjobs",))]["verbs"]) == ["create", "delete", "get", "list", "watch"]
    cm_rule = rules[(("",), ("configmaps",))]
    assert cm_rule["verbs"] == ["get"] and cm_rule["resourceNames"] == ["dcam-audit-rayjob-template"]
    assert not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for d in docs)


def test_rayjob_template_renders_to_a_valid_rayjob():
    text = template_text()
    placeholders = set(re.findall(r"__([A-Z][A-Z0-9_]*)__", text))
    script_vars = set(re.search(r'render_vars="([^"]+)"', runner_script()).group(1).split())
    assert placeholders == script_vars, "template placeholders and the runner's list differ"
    derived = {"AUDIT_ID", "DCAM_GPU_ACTORS"}  # computed by the runner
    assert placeholders - derived <= set(params()), "every placeholder needs a default in dcam-audit-params"
    # The longest id the runner can produce: audit- + 30 characters of a Job name.
    for audit_id in ("audit-20260115-0200", "audit-" + "j" * 30):
        job = rendered_template(audit_id)
        assert checks.check_document(job) == [], audit_id
        assert job["metadata"]["name"] == f"dcam-{audit_id}"
        assert f"/{audit_id}/" in job["spec"]["entrypoint"]
        assert job["metadata"]["labels"]["dcam.io/scheduled-by"] == "dcam-audit"
    overlay = rendered_template(DCAM_GPUS_PER_WORKER="2", DCAM_MAX_GPU_WORKERS="3")
    gpu = overlay["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert gpu["maxReplicas"] == 3
    assert dcam_args(overlay["spec"]["entrypoint"])["actors.pool_max"] == "6"
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_base_values_agree_with_params():
    """Without an overlay the literal values must already match the params."""
    p = params()
    cluster = by_kind(docs_of("raycluster.yaml"), "RayCluster")
    images = {c["image"] for _, pod in checks.iter_pod_specs(cluster["spec"]) for c in pod["containers"]}
    job = by_kind(docs_of("rayjob-audit.yaml"), "RayJob")
    images |= {c["image"] for _, pod in checks.iter_pod_specs(job["spec"]) for c in pod["containers"]}
    assert images == {p["DCAM_IMAGE"]}
    gpu = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"][0]
    assert str(gpu["maxReplicas"]) == p["DCAM_MAX_GPU_WORKERS"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == p["DCAM_GPUS_PER_WORKER"]
    assert by_kind(docs_of("cronjob-audit.yaml"), "CronJob")["spec"]["schedule"] == p["DCAM_SCHEDULE"]
    assert int(p["DCAM_WAIT_TIMEOUT_SECONDS"]) < \
        by_kind(docs_of("cronjob-audit.yaml"), "CronJob")["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]


# ---------------------------------------------------------------------------
# the CronJob runner script, against a fake kubectl
# ---------------------------------------------------------------------------

# A fake kubectl in POSIX sh (a Python fake costs an interpreter start per
# call). State lives in files under $FAKE_KUBE_DIR.
FAKE_KUBECTL = r"""#!/bin/sh
d="$FAKE_KUBE_DIR"
if [ "$1" = "-n" ]; then shift 2; fi
echo "$*" >> "$d/calls"
case "$1 $2" in
  "get configmap") cat "$d/template" ;;
  "create -f")
    if [ -e "$d/create_fails" ]; then exit 1; fi
    cat > "$d/created"; touch "$d/exists"; echo "rayjob.ray.io/created" ;;
  "get rayjobs") cat "$d/rayjobs" ;;
  "get rayjob")
    case "$*" in
      *jobDeploymentStatus*)
        head -n 1 "$d/states" | tr -d '\n'
        if [ "$(wc -l < "$d/states")" -gt 1 ]; then sed -i 1d "$d/states"; fi ;;
      *message*) cat "$d/message" ;;
      *) if [ ! -e "$d/exists" ]; then echo "NotFound" >&2; exit 1; fi ;;
    esac ;;
  "delete "*) echo "$2" >> "$d/deleted" ;;
  *) echo "fake kubectl: unexpected $*" >&2; exit 99 ;;
esac
"""


@pytest.fixture
def run_runner(tmp_path):
    if shutil.which("sh") is None:
        pytest.skip("no POSIX sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    state = tmp_path / "state"

    def run(*, job_name="dcam-audit-29400000", states=("Complete/SUCCEEDED",), exists=False,
            message="", rayjobs=(), create_fails=False, **param_overrides):
        if state.exists():
            shutil.rmtree(state)
        state.mkdir()
        (state / "template").write_text(template_text())
        (state / "states").write_text("".join(f"{s}\n" for s in states))
        (state / "message").write_text(message)
        (state / "rayjobs").write_text("".join(f"rayjob.ray.io/{n}\n" for n in rayjobs))
        for flag, on in (("exists", exists), ("create_fails", create_fails)):
            if on:
                (state / flag).touch()
        env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
               "FAKE_KUBE_DIR": str(state), "JOB_NAME": job_name, "POD_NAMESPACE": "dcam",
               "TEMPLATE_CONFIGMAP": "dcam-audit-rayjob-template",
               **params(), "DCAM_POLL_SECONDS": "0", **param_overrides}
        proc = subprocess.run(["sh", "-c", runner_script()], env=env, capture_output=True,
                              text=True, timeout=60)
        created = state / "created"
        deleted = state / "deleted"
        result = {"created": created.read_text() if created.exists() else None,
                  "deleted": deleted.read_text().split() if deleted.exists() else [],
                  "calls": (state / "calls").read_text().splitlines() if (state / "calls").exists() else []}
        return proc, result

    return run


def test_runner_creates_dated_rayjob_and_passes(run_runner):
    # 29400000 minutes after the epoch = 2025-11-24 16:00 UTC.
    proc, state = run_runner(states=["", "Initializing/", "Running/RUNNING", "Complete/SUCCEEDED"])
    assert proc.returncode == 0, proc.stderr
    created = checks.yaml_load(state["created"])
    assert created["metadata"]["name"] == "dcam-audit-20251124-1600"
    assert "output=s3://dcam-audits/audits/audit-20251124-1600/" in created["spec"]["entrypoint"]
    assert checks.check_document(created) == []
    assert "passed" in proc.stderr


def test_runner_reattaches_on_retry(run_runner):
    proc, state = run_runner(exists=True, states=["Running/RUNNING", "Complete/SUCCEEDED"])
    assert proc.returncode == 0, proc.stderr
    assert state["created"] is None
    assert not any(c.startswith("create") for c in state["calls"])


def test_runner_exit_2_when_fail_under_gate_missed(run_runner):
    proc, _ = run_runner(states=["Running/RUNNING", "Failed/FAILED"],
                         message="AppFailed: Job entrypoint command failed with exit code 2")
    assert proc.returncode == 2, proc.stderr
    assert "fail-under gate" in proc.stderr


def test_runner_exit_1_on_other_failures(run_runner):
    proc, _ = run_runner(states=["Failed/"], message="DeadlineExceeded: RayJob exceeded activeDeadlineSeconds")
    assert proc.returncode == 1, proc.stderr
    proc, _ = run_runner(states=["Complete/STOPPED"], message=": stopped")
    assert proc.returncode == 1, proc.stderr


def test_runner_manual_run_uses_job_name(run_runner):
    proc, state = run_runner(job_name="dcam-audit-rerun-jan")
    assert proc.returncode == 0, proc.stderr
    assert checks.yaml_load(state["created"])["metadata"]["name"] == "dcam-audit-dcam-audit-rerun-jan"


def test_runner_prunes_old_rayjobs(run_runner):
    old = [f"dcam-audit-2025010{i}-0200" for i in range(1, 6)]
    proc, state = run_runner(rayjobs=old, DCAM_KEEP_RAYJOBS="2")
    assert proc.returncode == 0, proc.stderr
    assert state["deleted"] == [f"rayjob.ray.io/{n}" for n in old[:3]]


@pytest.mark.parametrize("bad", ["s3://b/x y/", "a|b", "$(id)", "x\ny: 1", ""])
def test_runner_refuses_unsafe_values(run_runner, bad):
    proc, state = run_runner(DCAM_INPUT=bad)
    assert proc.returncode == 1
    assert state["created"] is None and "DCAM_INPUT" in proc.stderr


@pytest.mark.parametrize("key, value, reason", [
    ("DCAM_GPUS_PER_WORKER", "two", "positive integer"), ("DCAM_MAX_GPU_WORKERS", "0", "positive integer"),
    ("DCAM_KEEP_RAYJOBS", "", "positive integer"), ("DCAM_WAIT_TIMEOUT_SECONDS", "1h", "non-negative integer")])
def test_runner_checks_numeric_params(run_runner, key, value, reason):
    proc, state = run_runner(**{key: value})
    assert proc.returncode == 1 and f"{key} must be a {reason}" in proc.stderr
    assert state["created"] is None


def test_runner_needs_job_name(run_runner):
    proc, state = run_runner(job_name="")
    assert proc.returncode != 0 and "JOB_NAME" in proc.stderr
    assert state["created"] is None


def test_runner_times_out(run_runner):
    proc, _ = run_runner(states=["Running/RUNNING"], DCAM_WAIT_TIMEOUT_SECONDS="0")
    assert proc.returncode == 1 and "not finished" in proc.stderr


# ---------------------------------------------------------------------------
# kustomize: base and the example overlay render to valid manifests
# ---------------------------------------------------------------------------

def kustomize(path: Path, *extra: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with built-in kustomize) not on PATH")
    proc = subprocess.run([kubectl, "kustomize", *extra, str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.load_all(proc.stdout, Loader=checks._Loader) if d]


def test_kustomize_base_renders_valid():
    docs = kustomize(K8S)
    assert checks.check_documents(docs) == []
    assert {d["kind"] for d in docs} == {"RayCluster", "CronJob", "ServiceAccount", "Role",
                                         "RoleBinding", "ConfigMap"}
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dcam" for d in docs)


def test_kustomize_overlay_sets_environment_values():
    docs = kustomize(K8S / "overlays" / "example", "--load-restrictor", "LoadRestrictionsNone")
    assert checks.check_documents(docs) == []
    overlay = checks.yaml_load((K8S / "overlays" / "example" / "kustomization.yaml").read_text())
    literals = dict(x.split("=", 1) for x in overlay["configMapGenerator"][0]["literals"])
    cm = by_kind(docs, "ConfigMap", "dcam-audit-params")["data"]
    for key, value in literals.items():
        assert cm[key] == value, key
    assert all(d["metadata"]["namespace"] == overlay["namespace"] for d in docs)
    cluster = by_kind(docs, "RayCluster")
    images = {c["image"] for _, pod in checks.iter_pod_specs(cluster["spec"]) for c in pod["containers"]}
    assert images == {literals["DCAM_IMAGE"]}
    gpu = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"][0]
    assert gpu["maxReplicas"] == int(literals["DCAM_MAX_GPU_WORKERS"])
    res = gpu["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == literals["DCAM_GPUS_PER_WORKER"]
    cron = by_kind(docs, "CronJob")
    assert cron["spec"]["schedule"] == literals["DCAM_SCHEDULE"]
    binding = by_kind(docs, "RoleBinding")
    assert binding["subjects"][0]["namespace"] == overlay["namespace"]
    # the template a scheduled run renders from the overlay's values is valid too
    template = by_kind(docs, "ConfigMap", "dcam-audit-rayjob-template")["data"]["rayjob"]
    job = checks.yaml_load(checks.render_template(template, template_values("audit-20260115-0330", cm)))
    assert checks.check_document(job) == []


# ---------------------------------------------------------------------------
# vendored schemas and their converter
# ---------------------------------------------------------------------------

SCHEMA_FILES = sorted((K8S / "schemas").glob("*.json"))


def test_vendored_schemas_are_small_and_attributed():
    assert [p.name for p in SCHEMA_FILES] == ["raycluster.ray.io.v1.json", "raycronjob.ray.io.v1.json",
                                              "rayjob.ray.io.v1.json"]
    assert sum(p.stat().st_size for p in SCHEMA_FILES) < 2 * 1024 * 1024
    readme = (K8S / "schemas" / "README.md").read_text()
    assert "v1.7.0" in readme and "Apache-2.0" in readme and "build_schemas.py" in readme


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: p.name)
def test_vendored_schema_is_draft07(path):
    schema = json.loads(path.read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    src = schema["x-dcam-source"]
    assert src["kuberay_version"] == "v1.7.0" and src["license"] == "Apache-2.0"
    assert "status" not in schema["properties"]
    text = path.read_text()
    assert "x-kubernetes-validations" not in text and '"nullable"' not in text


def test_build_schemas_converts_openapi_to_draft07(tmp_path):
    build = _load("dcam_build_schemas", K8S / "schemas" / "build_schemas.py")
    assert build.main([str(DATA / "mini-crd.yaml"), "--out-dir", str(tmp_path),
                       "--kuberay-version", "v0.0.0-test"]) == 0
    (out,) = tmp_path.glob("*.json")
    assert out.name == "widget.example.com.v1.json"
    schema = json.loads(out.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    props = schema["properties"]
    assert "status" not in props
    assert props["apiVersion"]["enum"] == ["example.com/v1"] and props["kind"]["enum"] == ["Widget"]
    spec = props["spec"]["properties"]
    assert spec["size"]["exclusiveMinimum"] == 0 and "minimum" not in spec["size"]
    assert spec["size"]["maximum"] == 2**31 - 1 and "format" not in spec["size"]
    assert spec["ratio"]["exclusiveMaximum"] == 1
    assert spec["note"]["type"] == ["string", "null"]
    assert spec["tags"]["uniqueItems"] is True
    assert spec["big"]["minimum"] == -(2**63)
    assert spec["free"]["x-kubernetes-preserve-unknown-fields"] is True
    assert "x-kubernetes-validations" not in props["spec"]
    assert "x-kubernetes-int-or-string" not in spec["quantity"]
    # the repeated pod template is hoisted once and referenced twice
    assert set(schema["definitions"]) == {"PodTemplateSpec"}
    assert spec["head"]["properties"]["template"] == {"$ref": "#/definitions/PodTemplateSpec"}
    assert spec["workers"]["items"]["properties"]["template"] == {"$ref": "#/definitions/PodTemplateSpec"}
    v = jsonschema.Draft7Validator(checks.strictify(schema))
    good = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
            "spec": {"size": 1, "note": None, "quantity": "1Gi", "free": {"anything": True},
                     "head": {"template": {"spec": {"containers": [{"name": "c"}]}}}}}
    assert not list(v.iter_errors(good))
    bad = json.loads(json.dumps(good))
    bad["spec"]["size"] = 0
    bad["spec"]["head"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    messages = sorted(e.message for e in v.iter_errors(bad))
    assert any("less than or equal to the minimum of 0" in m for m in messages), messages
    assert any("'imagee' was unexpected" in m for m in messages), messages


# ---------------------------------------------------------------------------
# Dockerfile and build context
# ---------------------------------------------------------------------------

def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement(name: str) -> str:
    from packaging.requirements import Requirement

    for dep in _pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        if req.name == name:
            return str(req.specifier)
    raise AssertionError(f"{name} not in pyproject dependencies")


def _dockerfile() -> list[tuple[str, str]]:
    text = (K8S / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def _arg_default(instrs, name: str) -> str:
    for instr, rest in instrs:
        if instr == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1].strip('"')
    raise AssertionError(f"ARG {name} missing")


def test_dockerfile_base_image_matches_ray_pin():
    from packaging.specifiers import SpecifierSet

    instrs = _dockerfile()
    base = _arg_default(instrs, "RAY_IMAGE")
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-(gpu|cu\d+)", base)
    assert m, base
    assert m.group(1) in SpecifierSet(_requirement("ray"))
    assert ("FROM", "${RAY_IMAGE}") in instrs
    for where, spec in all_cluster_specs():
        assert spec["rayVersion"] == m.group(1), where


def test_dockerfile_torch_matches_pyproject_and_is_cuda():
    from packaging.requirements import Requirement

    instrs = _dockerfile()
    spec = Requirement(_arg_default(instrs, "TORCH_SPEC"))
    assert spec.name == "torch" and str(spec.specifier) == _requirement("torch")
    assert re.search(r"/cu\d+$", _arg_default(instrs, "TORCH_INDEX_URL"))
    run = " ".join(rest for instr, rest in instrs if instr == "RUN")
    assert "torch.version.cuda" in run  # the build fails on a CPU-only torch


def test_dockerfile_non_root_and_no_credentials():
    instrs = _dockerfile()
    users = [rest for instr, rest in instrs if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0].isdigit(), "numeric uid so runAsNonRoot can check it"
    secretish = re.compile(r"AWS_|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)
    for instr, rest in instrs:
        if instr in ("ENV", "ARG", "LABEL"):
            assert not secretish.search(rest), rest
    copies = [rest for instr, rest in instrs if instr in ("COPY", "ADD")]
    assert all(c.startswith("--chown=1000:100 ") for c in copies)
    assert all(instr != "ADD" for instr, _ in instrs)


def test_dockerignore_allow_lists_the_copied_sources():
    lines = [x.strip() for x in (K8S / "Dockerfile.dockerignore").read_text().splitlines()
             if x.strip() and not x.startswith("#")]
    assert lines[0] == "*", "allow-list: exclude everything first"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    sources = set()
    for instr, rest in _dockerfile():
        if instr == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            sources |= set(parts[:-1])
    packages = {"dcam", "pipeline", "actors", "conf", "evals", "benchmarks", "training"}  # pyproject's package-dir
    assert sources == {"pyproject.toml", "README.md"} | packages
    assert sources <= allowed
    assert not any(a.startswith((".git", ".env", "runs")) for a in allowed)
    for pkg in packages:
        assert (REPO / pkg).is_dir(), pkg


def test_readme_covers_the_workflow():
    text = (K8S / "README.md").read_text()
    for needle in ("docker build -f k8s/Dockerfile", "RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN",
                   "ray job submit --address http://", "--working-dir .", "dcam report",
                   "--fail-under", "Parquet", "kubectl kustomize", "dcam-s3", "dcam-ray-auth",
                   "LoadRestrictionsNone", "RayCronJob"):
        assert needle in text, needle


def test_checker_cli(capsys):
    assert checks.main([str(p) for p in MANIFESTS]) == 0
    assert checks.main([str(FIXTURES / "rayjob-ttl-without-shutdown.yaml")]) == 1
    assert "ttlSecondsAfterFinished" in capsys.readouterr().out
