"""The real image: built from container/Dockerfile, trained in, served from, pushed.

CI has no Docker engine and reaches no image registry, so the tests make a local Debian base
image (scripts/make_base_image.sh), build with podman (scripts/build_push.sh, as `make build`
does) and run with runc. torch comes from this machine's pip configuration: its local indexes
are passed to the build and mounted into it. podman keeps the base image and the build's
layers, so a second run on the same machine rebuilds only what changed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer
from species_classifier.demo_data import DEMO_TARGETS, make_demo_dataset
from species_classifier.model import PRETRAINED_WEIGHTS

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "container" / "Dockerfile"
IMAGE_NAME = "localhost/species-classifier-test"
PODMAN_RUN = [
    "podman", "run", "--rm", "--runtime", "runc",
    "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
]  # fmt: skip
HYPERPARAMETERS = {
    "target_species": ",".join(DEMO_TARGETS),
    "k_folds": "2",
    "num_epochs": "1",
    "img_size": "64",
    "batch_size": "8",
    "pretrained": "false",
}
BUILD_TIMEOUT = 1800
MANIFEST_TYPES = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
pytestmark = pytest.mark.container


def podman_unusable() -> str | None:
    """Why podman cannot build and run images here, or None when it can."""
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install podman runc debootstrap)"
    if os.geteuid() != 0:
        return "the local base image needs root (debootstrap, chroot)"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"podman info failed: {info.stderr.strip()[-500:]}"
    return None


@pytest.fixture(scope="module")
def podman() -> None:
    """Skip where podman genuinely cannot run; in CI that is a failure, never a skip."""
    problem = podman_unusable()
    if problem and os.environ.get("CI"):
        pytest.fail(f"CI must run the container tests: {problem}")
    if problem:
        pytest.skip(f"container tests need podman: {problem}")


def host_pip_settings() -> dict[str, str]:
    """This machine's pip index and wheel settings, from its environment or pip config."""
    settings = {}
    for key in ("index-url", "extra-index-url", "find-links", "cert"):
        variable = "PIP_" + key.upper().replace("-", "_")
        value = os.environ.get(variable)
        if value is None:
            config = subprocess.run(
                [sys.executable, "-m", "pip", "config", "get", f"global.{key}"],
                capture_output=True,
                text=True,
            )
            value = config.stdout.strip() if config.returncode == 0 else ""
        if value:
            settings[variable] = value
    return settings


@pytest.fixture(scope="module")
def build_env(podman) -> dict[str, str]:
    """The environment for scripts/build_push.sh: podman, the local base, no weights download."""
    made = subprocess.run(
        [str(REPO / "scripts" / "make_base_image.sh")],
        env={**os.environ, "DOCKER": "podman"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert made.returncode == 0, made.stderr
    return {
        **os.environ,
        **host_pip_settings(),
        "DOCKER": "podman",
        "BASE_IMAGE": made.stdout.strip(),
        "PRETRAINED_WEIGHTS": "skip",
        "IMAGE_NAME": IMAGE_NAME,
        "PYTHON": sys.executable,
    }


@pytest.fixture(scope="module")
def image(build_env) -> str:
    built = subprocess.run(
        [str(REPO / "scripts" / "build_push.sh"), "--no-push"],
        env=build_env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert built.returncode == 0, built.stderr[-5000:]
    return built.stdout.strip().splitlines()[-1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(url: str, timeout: float) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = requests.get(url, timeout=5)
            if response.status_code == 200:
                return response
        except (requests.ConnectionError, requests.Timeout):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer 200 within {timeout} s")
        time.sleep(1)


def test_image_follows_the_sagemaker_contract(image):
    config = json.loads(subprocess.check_output(["podman", "image", "inspect", image]))[0]["Config"]
    assert config["Labels"]["com.amazonaws.sagemaker.capabilities.accept-bind-to-port"] == "true"
    assert "PYTHONUNBUFFERED=1" in config["Env"]
    probe = subprocess.run(
        [*PODMAN_RUN, image, "bash", "-c", "command -v train serve; ls /opt/ml 2>&1; true"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.stdout.splitlines() == [
        "/opt/program/train",
        "/opt/program/serve",
        "ls: cannot access '/opt/ml': No such file or directory",
    ]


def test_train_then_serve_in_the_image(image, tmp_path):
    base = tmp_path / "opt_ml"
    make_demo_dataset(base / "input" / "data" / "training", photos_per_species=6, photo_size=160)
    (base / "input" / "config").mkdir(parents=True)
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(HYPERPARAMETERS))

    trained = subprocess.run(
        [*PODMAN_RUN, "--shm-size", "1g", "-v", f"{base}:/opt/ml", image, "train"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert not (base / "output" / "failure").exists()
    assert {p.name for p in (base / "model").iterdir()} >= {"model.json", "fold-1.pt", "fold-2.pt"}
    metrics = json.loads((base / "output" / "data" / "metrics.json").read_text())
    classes = sorted([*DEMO_TARGETS, "other"])
    assert sorted(metrics["classes"]) == classes
    assert [fold["fold"] for fold in metrics["folds"]] == [1, 2]

    port = free_port()
    name = f"species-classifier-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(
        [*PODMAN_RUN, "-d", "--name", name, "-p", f"127.0.0.1:{port}:8080",
         "-v", f"{base / 'model'}:/opt/ml/model:ro", image, "serve"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/ping", timeout=180)
        photo = next((base / "input" / "data" / "training" / "images").glob("*/*.jpg"))
        answer = requests.post(
            f"{url}/invocations",
            data=photo.read_bytes(),
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert sorted(body["class_probabilities"]) == classes
        assert body["predicted_species"] in classes
        assert sum(body["class_probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert body["confidence"] == max(body["class_probabilities"].values())
        assert len(body["individual_fold_predictions"]) == 2

        garbage = requests.post(
            f"{url}/invocations",
            data=b"not a photo",
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        assert garbage.status_code == 400
        assert "error" in garbage.json()
        assert requests.get(f"{url}/ping", timeout=10).status_code == 200
    finally:
        logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)
        print(logs.stdout[-3000:], logs.stderr[-3000:])


def test_weights_stage_rejects_a_wrong_local_file(build_env, tmp_path):
    weights = os.path.basename(PRETRAINED_WEIGHTS.url)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / weights).write_bytes(b"not the ImageNet weights")
    shutil.copy(REPO / "requirements.txt", tmp_path)
    built = subprocess.run(
        ["podman", "build", "--isolation=chroot", "--target", "weights", "-f", str(DOCKERFILE),
         "--build-arg", f"BASE_IMAGE={build_env['BASE_IMAGE']}",
         "--build-arg", "PRETRAINED_WEIGHTS=local", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode != 0
    hash_prefix = weights.rsplit("-", 1)[1].split(".")[0]
    assert f"{weights}: sha256 does not start with {hash_prefix}" in built.stdout + built.stderr


def test_build_push_needs_an_explicit_region(podman, tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")
    }
    env.update(DOCKER="podman", PYTHON=sys.executable, AWS_CONFIG_FILE=str(tmp_path / "none"))
    pushed = subprocess.run(
        [str(REPO / "scripts" / "build_push.sh")], env=env, capture_output=True, text=True
    )
    assert pushed.returncode != 0
    assert "no AWS region: set AWS_REGION" in pushed.stderr
    assert "STEP" not in pushed.stdout + pushed.stderr  # failed before building


@pytest.fixture
def local_registry(tmp_path):
    """Debian's docker-registry on a free port, plain HTTP, and a podman config that allows it."""
    if shutil.which("docker-registry") is None:
        pytest.fail("docker-registry not installed (apt-get install docker-registry)")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    registries_conf = tmp_path / "registries.conf"
    registries_conf.write_text(f'[[registry]]\nlocation = "127.0.0.1:{port}"\ninsecure = true\n')
    log = (tmp_path / "registry.log").open("w")
    server = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    try:
        wait_for(f"http://127.0.0.1:{port}/v2/", timeout=30)
        yield f"127.0.0.1:{port}", registries_conf
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def moto_endpoint():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_build_push_pushes_to_a_local_registry(image, build_env, local_registry, moto_endpoint):
    registry, registries_conf = local_registry
    env = {
        **build_env,
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "ECR_REGISTRY": registry,
        "ECR_REPOSITORY": "species-classifier",
        "CONTAINERS_REGISTRIES_CONF": str(registries_conf),
    }
    env.pop("AWS_PROFILE", None)
    pushed = subprocess.run(
        [str(REPO / "scripts" / "build_push.sh"), "--release", "v0.0.0-test"],
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert pushed.returncode == 0, pushed.stderr[-5000:]
    uri = pushed.stdout.strip().splitlines()[-1]
    tag = image.rsplit(":", 1)[1]
    commit = subprocess.check_output(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, text=True
    )
    assert tag.startswith(commit.strip())
    assert uri == f"{registry}/species-classifier:{tag}"
    assert "account 123456789012, region eu-west-1" in pushed.stderr
    try:
        tags = requests.get(f"http://{registry}/v2/species-classifier/tags/list", timeout=10)
        assert sorted(tags.json()["tags"]) == sorted([tag, "v0.0.0-test"])
        manifest = requests.get(
            f"http://{registry}/v2/species-classifier/manifests/{tag}",
            headers={"Accept": MANIFEST_TYPES},
            timeout=10,
        )
        assert manifest.status_code == 200
        assert len(manifest.json()["layers"]) >= 5

        ecr = boto3.client(
            "ecr", region_name="eu-west-1", endpoint_url=moto_endpoint,
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )  # fmt: skip
        (repository,) = ecr.describe_repositories()["repositories"]
        assert repository["repositoryName"] == "species-classifier"
        assert repository["imageScanningConfiguration"] == {"scanOnPush": True}
        assert repository["imageTagMutability"] == "IMMUTABLE"
    finally:
        for pushed_tag in (tag, "v0.0.0-test"):
            subprocess.run(
                ["podman", "rmi", f"{registry}/species-classifier:{pushed_tag}"],
                capture_output=True,
            )
