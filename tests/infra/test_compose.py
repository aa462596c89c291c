"""``infra/compose.yaml``, as users run it: read by the oldest Compose this repository supports
(docker-compose 1.29, Debian 12's; Compose v2 reads a superset), and brought up with
podman-compose (1.0.3, Debian 12's) on podman: the image built from ``infra/Dockerfile``, a
PostgreSQL, a call through the published port, the call on the record, then ``down``, which
drains the bridge.

No registry is reachable here, so the PostgreSQL is a stand-in built from the test base
(``tests/infra/postgres/``: Debian's PostgreSQL, honouring the official image's variables),
chosen with the file's own ``POSTGRES_IMAGE``. Podman runs with runc and explicit ulimits (this
machine's cgroups refuse crun's defaults), through a ``containers.conf`` of the test's own.
Without root, podman, podman-compose, buildah or debootstrap the test skips and says why (with
``BRIDGE_REQUIRE_SERVICES=1``, CI, it fails)."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from bridge.dev.simulator import simulate_call

from .test_image import AUTH_TOKEN, API_KEY, BASE, ROOT, _unavailable, image, run  # noqa: F401 - image is a fixture

COMPOSE = ROOT / "infra" / "compose.yaml"
POSTGRES_IMAGE = "localhost/bridge-test-postgres:15"


def test_the_compose_file_needs_no_newer_compose():
    """(any machine) What Compose v2.24+ alone reads is kept out: a top-level name, env_file as
    {path, required}; the images can be pointed elsewhere (a registry, a mirror)."""
    compose = yaml.safe_load(COMPOSE.read_text())
    assert "name" not in compose and "version" not in compose
    for service in compose["services"].values():
        assert all(isinstance(entry, str) for entry in service.get("env_file", [])), service["env_file"]
    assert compose["services"]["bridge"]["image"].startswith("${BRIDGE_IMAGE:-")
    assert compose["services"]["postgres"]["image"].startswith("${POSTGRES_IMAGE:-postgres:")


def test_docker_compose_1_29_reads_the_file(tmp_path):
    if shutil.which("docker-compose") is None:
        _unavailable("docker-compose is not installed (apt-get install -y docker-compose): the oldest Compose supported")
    folder = _project(tmp_path, {})
    done = subprocess.run(["docker-compose", "-f", "compose.yaml", "config"], cwd=folder, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    bridge = config["services"]["bridge"]
    assert bridge["environment"]["BRIDGE_API_KEYS"] == API_KEY and bridge["environment"]["BRIDGE_DATABASE_URL"].startswith("postgresql://")
    # without the secrets, it says which one is missing
    (folder / ".env").write_text("")
    refused = subprocess.run(["docker-compose", "-f", "compose.yaml", "config"], cwd=folder, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "BRIDGE_" in refused.stderr, refused.stderr


def _project(tmp_path: Path, extra: dict[str, str]) -> Path:
    """A copy of infra/compose.yaml with the .env a user writes (the repository's infra/ stays untouched)."""
    folder = tmp_path / "infra"
    folder.mkdir()
    shutil.copy(COMPOSE, folder / "compose.yaml")
    env = {"BRIDGE_TWILIO_AUTH_TOKEN": AUTH_TOKEN, "BRIDGE_API_KEYS": API_KEY, **extra}
    (folder / ".env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return folder


@pytest.fixture(scope="module")
def postgres_image(image) -> str:  # noqa: F811 - (the base image comes with the bridge's)
    if not run("buildah", "images", "--quiet", "--filter", f"reference={POSTGRES_IMAGE}"):
        run("buildah", "bud", "--isolation=chroot", "--format", "docker", "--build-arg", f"BASE_IMAGE={BASE}", "-t", POSTGRES_IMAGE,
            "-f", str(ROOT / "tests" / "infra" / "postgres" / "Containerfile"), str(ROOT / "tests" / "infra" / "postgres"), timeout=900)  # fmt: skip
    return POSTGRES_IMAGE


async def test_podman_compose_up_carries_a_call_on_postgres_and_down_drains(image, postgres_image, tmp_path):  # noqa: F811
    from tests.bridge.conftest import caller_audio, free_port, until

    for tool in ("podman", "podman-compose"):
        if shutil.which(tool) is None:
            _unavailable(f"{tool} is not installed (apt-get install -y podman podman-compose)")
    port = free_port()
    folder = _project(tmp_path, {
        "BRIDGE_IMAGE": image, "POSTGRES_IMAGE": postgres_image, "BRIDGE_PUBLISH_PORT": f"127.0.0.1:{port}",
        "BRIDGE_REQUEST_HOST_SIGNATURES": "1", "BRIDGE_WORKERS": "2", "BRIDGE_LOG_FORMAT": "json",
    })  # fmt: skip
    conf = tmp_path / "containers.conf"  # (a container may not raise a limit above this process's own)
    files = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
    conf.write_text(f'[engine]\nruntime = "runc"\n[containers]\ndefault_ulimits = ["nofile={files}:{files}", "nproc=4096:4096"]\n')
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    project = f"bridge-compose-test-{os.getpid()}"

    def compose(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["podman-compose", "-p", project, "-f", "compose.yaml", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)

    def logs(service: str) -> str:
        return subprocess.run(["podman", "logs", f"{project}_{service}_1"], env=env, capture_output=True, text=True, timeout=30).stdout[-4000:]

    base_url = f"http://127.0.0.1:{port}"
    try:
        up = compose("up", "-d")  # (podman-compose 1.0.3 exits 0 when a container did not start: its output says)
        assert up.returncode == 0 and "exit code: 12" not in up.stdout, up.stdout[-3000:] + up.stderr[-3000:]

        async def ready() -> bool:
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"{base_url}/readyz", timeout=2)).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            await until(ready, timeout=120)
        except TimeoutError:
            states = subprocess.run(["podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={project}"], env=env, capture_output=True, text=True)
            pytest.fail(f"not ready in 120 s:\n{up.stdout[-2000:]}\n{states.stdout}\n{logs('bridge')}\n{logs('postgres')}")
        result = await simulate_call(base_url, AUTH_TOKEN, caller_audio(), api_key=API_KEY, speed=4.0, tail_ms=3000)
        assert result.protocol_errors == [] and result.record is not None, result.summary() + logs("bridge")
        assert result.record["call_status"] == "ended" and result.record["disconnection_reason"] == "user_hangup"
        # the call is in the compose file's PostgreSQL
        rows = subprocess.run(
            ["podman", "exec", f"{project}_postgres_1", "psql", "-U", "bridge", "-d", "bridge", "-tAc", f"select call_status from calls where call_id = '{result.call_id}'"],
            env=env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert rows.stdout.strip() == "ended", rows.stdout + rows.stderr
        # down: SIGTERM, the bridge drains (no live call: at once) and exits
        down = compose("down", timeout=300)
        assert down.returncode == 0, down.stderr[-3000:]
        assert subprocess.run(["podman", "container", "exists", f"{project}_bridge_1"], env=env).returncode != 0
    finally:
        compose("down", "-v", timeout=300)
        for volume in ("bridge-data", "postgres-data"):
            subprocess.run(["podman", "volume", "rm", "-f", f"{project}_{volume}"], env=env, capture_output=True, timeout=60)
        subprocess.run(["podman", "network", "rm", "-f", f"{project}_default"], env=env, capture_output=True, timeout=60)  # (1.0.3's down leaves it)
