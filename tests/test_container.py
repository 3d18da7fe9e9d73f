"""The real image: built from container/Dockerfile, trained in, served from, pushed.

CI has no Docker engine and reaches no image registry, so the tests make a local Debian base
image (scripts/make_base_image.sh), build with podman (scripts/build_push.sh, as `make build`
does) and run with runc. torch comes from this machine's pip configuration: its local indexes
are passed to the build and mounted into it. podman keeps the base image and the build's
layers, so a second run on the same machine rebuilds only what changed. The pushed manifest is
read back from a local registry: SageMaker accepts only one linux/amd64 Docker v2 schema 2
manifest. Last, the SageMaker Python SDK's local mode trains and serves with the same image,
through podman's Docker-compatible API and Debian's docker-compose.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import pytest
import requests
from local_servers import free_port, moto_server, wait_for_200
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
PLATFORM_LINE = "build_push: building for linux/amd64 (set by PLATFORM)"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
# Every manifest type a registry may hold, so that it answers with what it stored.
MANIFEST_TYPES = ", ".join(
    [
        DOCKER_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)

pytestmark = pytest.mark.container


def podman_unusable() -> str | None:
    """Why podman cannot build and run images here, or None when it can."""
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed: run `make system-deps` as root"
    if os.geteuid() != 0:
        return "the local base image needs root (debootstrap, chroot)"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"podman info failed: {info.stderr.strip()[-500:]}"
    return None


@pytest.fixture(scope="module")
def podman() -> None:
    """Fail, never skip, where podman cannot run: `make test` promises the container tests."""
    problem = podman_unusable()
    if problem:
        pytest.fail(f"container tests need podman: {problem}")


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
    return build_push(build_env, "--no-push").stdout.strip().splitlines()[-1]


def build_push(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """scripts/build_push.sh with `args`, which must succeed and say first what it builds for."""
    built = subprocess.run(
        [str(REPO / "scripts" / "build_push.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )
    assert built.returncode == 0, built.stderr[-5000:]
    assert built.stderr.splitlines()[0] == PLATFORM_LINE
    return built


def test_image_follows_the_sagemaker_contract(image):
    inspected = json.loads(subprocess.check_output(["podman", "image", "inspect", image]))[0]
    assert (inspected["Os"], inspected["Architecture"]) == ("linux", "amd64")
    assert inspected["ManifestType"] == DOCKER_MANIFEST
    config = inspected["Config"]
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
        wait_for_200(f"{url}/ping", timeout=180)
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


def test_gpus_visible_but_cuda_unusable_stop_train_and_serve_in_one_line(image, tmp_path):
    """A GPU device node without a usable CUDA driver behind it, as on a host whose driver is
    too old for the image: both commands stop at once, naming what to change."""
    base = tmp_path / "opt_ml"
    (base / "input" / "config").mkdir(parents=True)
    (base / "input" / "config" / "hyperparameters.json").write_text(json.dumps(HYPERPARAMETERS))
    fake_gpu = ["--device", "/dev/null:/dev/nvidia0"]
    needs = "needs NVIDIA driver 580 or newer (CUDA 13.0)"

    trained = subprocess.run(
        [*PODMAN_RUN, *fake_gpu, "-v", f"{base}:/opt/ml", image, "train"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 1, trained.stdout[-3000:] + trained.stderr[-3000:]
    reason = (base / "output" / "failure").read_text().splitlines()[0]
    assert reason.startswith("train: 1 GPU(s) visible but CUDA is unusable"), reason
    assert needs in reason and "al2023-ami-sagemaker-inference-gpu-4-1" in reason

    served = subprocess.run(
        [*PODMAN_RUN, *fake_gpu, image, "serve"], capture_output=True, text=True, timeout=300
    )
    assert served.returncode == 1, served.stdout[-3000:] + served.stderr[-3000:]
    [line] = [line for line in served.stdout.splitlines() if "cannot start" in line]
    assert "serve: 1 GPU(s) visible but CUDA is unusable" in line and needs in line
    assert "Booting worker" not in served.stdout  # stopped before any worker


# compose cannot pass podman's run flags: the Docker-compatible API takes them from here.
CONTAINERS_CONF = """[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
"""


@pytest.fixture(scope="module")
def sdk_python(podman) -> Path:
    """The SageMaker Python SDK's own venv (make sdk-venv), installed from PyPI the first time."""
    made = subprocess.run(
        ["make", "-s", "sdk-venv"], cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    return REPO / ".venv-sdk" / "bin" / "python"


@pytest.fixture
def docker_api(podman):
    """podman's Docker-compatible API on a private socket, for the SDK's docker-compose."""
    missing = [tool for tool in ("docker", "docker-compose", "curl") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"SDK local mode needs {', '.join(missing)}: run `make system-deps` as root")
    folder = Path(tempfile.mkdtemp(prefix="podman-api-"))  # a socket path has at most 107 bytes
    (folder / "containers.conf").write_text(CONTAINERS_CONF)
    socket_path = folder / "podman.sock"
    log = (folder / "service.log").open("w")
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
        env={**os.environ, "CONTAINERS_CONF": str(folder / "containers.conf")},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    ping = ["curl", "-sf", "--unix-socket", str(socket_path), "http://podman/_ping"]
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(ping, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "podman system service did not answer in 60 s"
            time.sleep(0.5)
        yield f"unix://{socket_path}"
    finally:
        service.terminate()
        service.wait(timeout=30)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_sagemaker_sdk_local_mode_trains_and_serves(
    image, sdk_python, docker_api, moto_endpoint, tmp_path
):
    channel = tmp_path / "training"
    make_demo_dataset(channel, photos_per_species=6, photo_size=160)
    photo = next((channel / "images").glob("*/*.jpg"))
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("AWS_")},
        "DOCKER_HOST": docker_api,
        # Any AWS call the SDK makes goes to moto, never to AWS.
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    compose_containers = [
        "podman", "ps", "--all", "--quiet", "--filter", "label=com.docker.compose.project",
    ]  # fmt: skip
    before = set(subprocess.check_output(compose_containers, text=True).split())
    try:
        ran = subprocess.run(
            [str(sdk_python), str(REPO / "tests" / "sdk_local_mode.py"), image, str(channel),
             str(tmp_path / "output"), str(free_port()), str(photo), json.dumps(HYPERPARAMETERS)],
            env=env, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
    finally:
        # The SDK leaves its stopped training and serving containers behind.
        created = set(subprocess.check_output(compose_containers, text=True).split()) - before
        if created:
            subprocess.run(["podman", "rm", "--force", *created], capture_output=True)
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-4000:]
    result = json.loads(ran.stdout.strip().splitlines()[-1])

    model_data = Path(result["model_data"].removeprefix("file://"))
    assert model_data.name == "model.tar.gz"
    with tarfile.open(model_data) as archive:
        assert {"model.json", "fold-1.pt", "fold-2.pt"} <= set(archive.getnames())
    classes = sorted([*DEMO_TARGETS, "other"])
    answer = result["answer"]
    assert sorted(answer["class_probabilities"]) == classes
    assert answer["predicted_species"] in classes
    assert len(answer["individual_fold_predictions"]) == 2


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
        pytest.fail("docker-registry not installed: run `make system-deps` as root")
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
        wait_for_200(f"http://127.0.0.1:{port}/v2/", 30, server, tmp_path / "registry.log")
        yield f"127.0.0.1:{port}", registries_conf
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture
def moto_endpoint():
    with moto_server() as local:
        yield local["AWS_ENDPOINT_URL"]


def ecr_client(moto_endpoint: str):
    return boto3.client(
        "ecr", region_name="eu-west-1", endpoint_url=moto_endpoint,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip


def assert_sagemaker_can_pull(registry: str, repository: str, tag: str) -> None:
    """The registry holds one linux/amd64 Docker v2 schema 2 manifest under the tag."""
    url = f"http://{registry}/v2/{repository}"
    answer = requests.get(f"{url}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES}, timeout=10)
    assert answer.status_code == 200, answer.text
    manifest = answer.json()
    assert (answer.headers["Content-Type"], manifest["mediaType"]) == (DOCKER_MANIFEST,) * 2
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert len(manifest["layers"]) >= 5
    config = requests.get(f"{url}/blobs/{manifest['config']['digest']}", timeout=10).json()
    assert (config["os"], config["architecture"]) == ("linux", "amd64")


def test_build_push_pushes_to_a_local_registry(
    image, build_env, local_registry, moto_endpoint, tmp_path
):
    registry, registries_conf = local_registry
    ecr = ecr_client(moto_endpoint)
    # Another team's rule, which the script must keep while it adds its own.
    existing_rule = {
        "scanFrequency": "CONTINUOUS_SCAN",
        "repositoryFilters": [{"filter": "prod-*", "filterType": "WILDCARD"}],
    }
    ecr.put_registry_scanning_configuration(scanType="ENHANCED", rules=[existing_rule])
    auth_file = tmp_path / "auth.json"
    auth_file.write_text("{}")
    env = {
        **build_env,
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "ECR_REGISTRY": registry,
        "ECR_REPOSITORY": "species-classifier",
        "CONTAINERS_REGISTRIES_CONF": str(registries_conf),
        "REGISTRY_AUTH_FILE": str(auth_file),
    }
    env.pop("AWS_PROFILE", None)
    pushed = build_push(env, "--release", "v0.0.0-test")
    uri = pushed.stdout.strip().splitlines()[-1]
    tag = image.rsplit(":", 1)[1]
    commit = subprocess.check_output(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, text=True
    )
    assert tag.startswith(commit.strip())
    assert uri == f"{registry}/species-classifier:{tag}"
    assert "account 123456789012, region eu-west-1" in pushed.stderr
    # The ECR token is for ECR only: a registry at another address never sees it.
    assert f"{registry} is not an ECR registry: not sending it ECR credentials" in pushed.stderr
    assert json.loads(auth_file.read_text()) == {}
    try:
        tags = requests.get(f"http://{registry}/v2/species-classifier/tags/list", timeout=10)
        assert sorted(tags.json()["tags"]) == sorted([tag, "v0.0.0-test"])
        for pushed_tag in (tag, "v0.0.0-test"):
            assert_sagemaker_can_pull(registry, "species-classifier", pushed_tag)

        (repository,) = ecr.describe_repositories()["repositories"]
        assert repository["repositoryName"] == "species-classifier"
        assert repository["imageTagMutability"] == "IMMUTABLE"
        scanning = ecr.get_registry_scanning_configuration()["scanningConfiguration"]
        our_rule = {
            "scanFrequency": "SCAN_ON_PUSH",
            "repositoryFilters": [{"filter": "species-classifier", "filterType": "WILDCARD"}],
        }
        assert scanning == {"scanType": "ENHANCED", "rules": [existing_rule, our_rule]}
        (applied,) = ecr.batch_get_repository_scanning_configuration(
            repositoryNames=["species-classifier"]
        )["scanningConfigurations"]
        assert applied["scanFrequency"] == "SCAN_ON_PUSH"
    finally:
        for pushed_tag in (tag, "v0.0.0-test"):
            subprocess.run(
                ["podman", "rmi", f"{registry}/species-classifier:{pushed_tag}"],
                capture_output=True,
            )


FAKE_ENGINE = """#!/usr/bin/env bash
# Records the commands scripts/build_push.sh gives its engine; says the image is FAKE_BUILT.
echo "$*" >> "$FAKE_ENGINE_LOG"
case $1 in
  image) echo "${FAKE_BUILT:-linux/amd64}" ;;
  login) cat >/dev/null ;;
esac
"""


@pytest.fixture
def script_checkout(tmp_path) -> tuple[Path, dict[str, str]]:
    """A git work tree holding scripts/build_push.sh, with a fake podman that records calls."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "build_push.sh", checkout / "scripts")
    (checkout / "notes.txt").write_text("first\n")
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    engine = tmp_path / "bin" / "podman"
    engine.parent.mkdir()
    engine.write_text(FAKE_ENGINE)
    engine.chmod(0o755)
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("AWS_")},
        "DOCKER": str(engine),
        "FAKE_ENGINE_LOG": str(tmp_path / "engine.log"),
        "PYTHON": sys.executable,
    }
    return checkout, env


def run_script(checkout: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(checkout / "scripts" / "build_push.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_each_uncommitted_state_gets_its_own_tag(script_checkout):
    checkout, env = script_checkout
    commit = subprocess.check_output(
        ["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"], text=True
    ).strip()

    def tag() -> str:
        built = run_script(checkout, env, "--no-push")
        assert built.returncode == 0, built.stderr
        return built.stdout.strip().rsplit(":", 1)[1]

    assert tag() == commit
    (checkout / "notes.txt").write_text("second\n")
    edited = tag()
    assert re.fullmatch(rf"{commit}-dirty-[0-9a-f]{{12}}", edited)
    (checkout / "new.txt").write_text("untracked files count too\n")
    with_new_file = tag()
    assert with_new_file.startswith(f"{commit}-dirty-") and with_new_file != edited
    (checkout / "new.txt").unlink()
    assert tag() == edited  # the same state, the same tag
    staged = subprocess.check_output(["git", "-C", str(checkout), "diff", "--cached"], text=True)
    assert staged == ""  # the user's index is left alone


def test_build_asks_for_linux_amd64_and_docker_manifests(script_checkout):
    checkout, env = script_checkout
    built = run_script(checkout, env, "--no-push")
    assert built.returncode == 0, built.stderr
    assert built.stderr.splitlines()[0] == PLATFORM_LINE
    build = Path(env["FAKE_ENGINE_LOG"]).read_text().splitlines()[0].split()
    assert build[:3] == ["build", "--platform", "linux/amd64"]
    assert "--format docker" in " ".join(build)

    wrong = run_script(checkout, {**env, "FAKE_BUILT": "linux/arm64"}, "--no-push")
    assert wrong.returncode != 0
    assert "is linux/arm64, not linux/amd64: is BASE_IMAGE for linux/amd64?" in wrong.stderr

    unknown = run_script(checkout, {**env, "PLATFORM": "linux/386"}, "--no-push")
    assert unknown.returncode != 0
    assert "PLATFORM must be linux/amd64 or linux/arm64, not 'linux/386'" in unknown.stderr


def test_ecr_credentials_go_to_ecr_only(script_checkout, moto_endpoint):
    checkout, env = script_checkout
    aws = {
        "AWS_ENDPOINT_URL": moto_endpoint,
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    log = Path(env["FAKE_ENGINE_LOG"])
    ecr_host = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
    to_ecr = run_script(checkout, {**env, **aws})
    assert to_ecr.returncode == 0, to_ecr.stderr
    calls = log.read_text().splitlines()
    assert f"login --username AWS --password-stdin {ecr_host}" in calls
    assert any(
        call.startswith(f"push --format v2s2 {ecr_host}/species-classifier:") for call in calls
    )

    log.unlink()
    (checkout / "notes.txt").write_text("a second push needs a new tag\n")
    elsewhere = run_script(checkout, {**env, **aws, "ECR_REGISTRY": "registry.example.com"})
    assert elsewhere.returncode == 0, elsewhere.stderr
    calls = log.read_text().splitlines()
    assert not [call for call in calls if call.startswith("login")]
    assert any(call.startswith("push --format v2s2 registry.example.com/") for call in calls)
