"""The real image (infra/Dockerfile), built with buildah and run: ``bridge serve`` from it, as its
non-root user, carries a simulated Twilio call whose record is checked.

No container engine runs on these machines and no registry is reachable: the base image is made
with debootstrap (Debian bookworm, minbase, python3, python3-venv, ca-certificates; cached in
``BRIDGE_TEST_CACHE``, default ``~/.cache/twilio-audio-bridge``) and the build passes the
machine's CA bundle to pip as a build secret. ``buildah run --isolation=chroot`` shares the
host's loopback. Needs root, buildah and debootstrap: without them the test skips and says why;
with ``BRIDGE_REQUIRE_SERVICES=1`` (CI) it fails instead.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from bridge.dev.simulator import FakeTwilioApi, simulate_call

ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/bridge-test-python-base"
IMAGE = "localhost/twilio-audio-bridge:test"
AUTH_TOKEN, API_KEY = "image-test-auth-token", "key_image_test"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def _unavailable(problem: str):
    if os.environ.get("BRIDGE_REQUIRE_SERVICES") == "1":
        pytest.fail(problem)
    pytest.skip(problem)


def run(*cmd: str, timeout: float = 600) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr[-3000:]}"
    return done.stdout.strip()


@pytest.fixture(scope="module")
def image() -> str:
    """The image built from the working tree, once a test run: the modules that need it (this
    one, test_compose) may run on two xdist workers at once, so the build holds a lock, and a
    worker finding it built in this run (``PYTEST_XDIST_TESTRUNUID``) uses it."""
    if os.geteuid() != 0 or not shutil.which("buildah") or not shutil.which("debootstrap"):
        _unavailable("the image test needs root, buildah and debootstrap (apt-get install -y buildah debootstrap)")
    cache = Path(os.environ.get("BRIDGE_TEST_CACHE") or Path.home() / ".cache" / "twilio-audio-bridge")
    cache.mkdir(parents=True, exist_ok=True)
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    with open(cache / "image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes)
        built = cache / f"image-built-{run_id}"
        if run_id and built.exists():
            return IMAGE
        _build(cache)
        if run_id:
            for old in cache.glob("image-built-*"):
                old.unlink()
            built.write_text(IMAGE)
    return IMAGE


def _build(cache: Path) -> None:
    if not run("buildah", "images", "--quiet", "--filter", f"reference={BASE}"):
        rootfs = cache / "rootfs-bookworm"
        if not (rootfs / "usr" / "bin" / "python3").exists():
            shutil.rmtree(rootfs, ignore_errors=True)
            partial = cache / "rootfs-partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
            run("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm", str(partial),
                "http://deb.debian.org/debian", timeout=900)  # fmt: skip
            partial.rename(rootfs)
        container = run("buildah", "from", "scratch")
        try:
            mount = run("buildah", "mount", container)
            run("cp", "-a", f"{rootfs}/.", f"{mount}/")
            run("buildah", "umount", container)
            run("buildah", "commit", "--quiet", container, BASE)
        finally:
            subprocess.run(["buildah", "rm", container], capture_output=True)
    secret = ["--secret", f"id=ca,src={CA_BUNDLE}"] if CA_BUNDLE.exists() else []
    run("buildah", "bud", "--isolation=chroot", "--format", "docker", "--build-arg", f"BASE_IMAGE={BASE}", *secret, "-t", IMAGE,
        "-f", str(ROOT / "infra" / "Dockerfile"), str(ROOT), timeout=1200)  # fmt: skip


def test_the_image_is_small_non_root_and_health_checked(image):
    config = run("buildah", "inspect", "--format", "{{.Docker.Config.User}}|{{.Docker.Config.Healthcheck.Test}}|{{.Docker.Config.ExposedPorts}}", image)
    user, health, ports = config.split("|")
    assert user == "10001:10001" and "/livez" in health and "8080" in ports
    size = run("buildah", "images", "--format", "{{.Size}}", image)
    base = run("buildah", "images", "--format", "{{.Size}}", BASE)
    print(f"\nimage {image}: {size} (base {base})")


async def test_bridge_serve_from_the_image_carries_a_call(image, tmp_path):
    from tests.bridge.conftest import best_correlation, caller_audio, free_port, until

    fake = FakeTwilioApi(AUTH_TOKEN)
    fake_url = await fake.start()
    port = free_port()
    container = run("buildah", "from", image)
    env = {
        "BRIDGE_PORT": str(port), "BRIDGE_HOST": "127.0.0.1", "BRIDGE_TWILIO_AUTH_TOKEN": AUTH_TOKEN, "BRIDGE_API_KEYS": API_KEY,
        "BRIDGE_REQUEST_HOST_SIGNATURES": "1", "BRIDGE_TWILIO_API_BASE_URL": fake_url, "BRIDGE_LOG_FORMAT": "json",
    }  # fmt: skip
    serve = subprocess.Popen(
        ["buildah", "run", "--isolation=chroot", "--user", "10001:10001", *[a for k, v in env.items() for a in ("--env", f"{k}={v}")],
         container, "--", "bridge", "serve"],
        stdout=open(tmp_path / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:

        async def up() -> bool:
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"{base_url}/readyz")).status_code == 200
            except httpx.HTTPError:
                return serve.poll() is not None  # (it died: stop waiting, the asserts say why)

        await until(up, timeout=60)
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        said = caller_audio()
        result = await simulate_call(base_url, AUTH_TOKEN, said, api_key=API_KEY, speed=4.0, tail_ms=6000, fake_api=fake)
        assert result.protocol_errors == [] and result.record is not None, result.summary()
        assert result.record["call_status"] == "ended" and result.record["disconnection_reason"] == "user_hangup"
        corr, _ = best_correlation(result.heard, said[: len(said) // 2])
        assert corr >= 0.5, corr  # (the caller heard the echo; the phrase check is in test_end_to_end)
        # the non-root user wrote the call's recording on the data volume
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            wav = await http.get(result.record["recording_url"])
        assert wav.status_code == 200 and wav.content[:4] == b"RIFF" and len(wav.content) > 16000
        assert run("buildah", "run", "--isolation=chroot", "--user", "10001:10001", container, "--", "id", "-u") == "10001"
    finally:
        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait()
        subprocess.run(["buildah", "rm", container], capture_output=True)
        await fake.stop()
    await asyncio.sleep(0)
