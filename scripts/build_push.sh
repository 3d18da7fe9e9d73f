#!/usr/bin/env bash
# Build the image from container/Dockerfile for linux/amd64, tag it with the git commit and
# push it to Amazon ECR (repository created if missing with immutable tags, scanned on push by
# a registry-level rule) as one Docker v2 schema 2 manifest, the only form SageMaker accepts.
# Prints the image URI last. See docs/container.md.
#
#   scripts/build_push.sh [--release TAG] [--no-push]
#
# Environment:
#   AWS_REGION / AWS_DEFAULT_REGION   or `region` in the AWS config; never guessed
#   AWS_ACCOUNT_ID                    default: the account of the current credentials (STS)
#   ECR_REPOSITORY                    default: species-classifier
#   ECR_REGISTRY                      push to this registry host[:port] instead of the
#                                     account's ECR registry (private registries, tests);
#                                     log in to a registry that is not ECR yourself first
#   AWS_ENDPOINT_URL                  AWS API endpoint (boto3 reads it; tests use moto)
#   IMAGE_NAME                        local image name, default species-classifier
#   IMAGE_TAG                         default: the git commit (12 hex); with uncommitted
#                                     changes <commit>-dirty-<hash of the work tree>
#   PLATFORM                          default linux/amd64 (SageMaker's training and GPU
#                                     instances); linux/arm64 for Graviton endpoints only
#   DOCKER                            docker or podman; default docker when its engine
#                                     answers, else podman
#   PYTHON                            a Python with boto3, default python3
#   BASE_IMAGE, PRETRAINED_WEIGHTS    build arguments of container/Dockerfile
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_CERT
#                                     passed to the build; with podman, the local paths they
#                                     name are mounted read-only into the build
set -euo pipefail

die() { echo "build_push: $*" >&2; exit 1; }
say() { echo "build_push: $*" >&2; }

push=true
release_tag=""
while (($#)); do
  case "$1" in
    --no-push) push=false ;;
    --release) (($# >= 2)) || die "--release needs a tag"; release_tag=$2; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
  esac
  shift
done

PLATFORM=${PLATFORM:-linux/amd64}
[[ $PLATFORM =~ ^linux/(amd64|arm64)$ ]] || die "PLATFORM must be linux/amd64 or linux/arm64, not '$PLATFORM'"
say "building for $PLATFORM (set by PLATFORM)"

cd "$(dirname "$0")/.."
command -v git >/dev/null || die "git not found"

if [[ -z ${DOCKER:-} ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    DOCKER=docker
  elif command -v podman >/dev/null; then
    DOCKER=podman
    say "no Docker engine answers: using podman"
  else
    die "neither a Docker engine nor podman found: install Docker, or podman (apt-get install podman runc)"
  fi
fi
command -v "$DOCKER" >/dev/null || die "DOCKER=$DOCKER not found on PATH"
podman=false
[[ $(basename "$DOCKER") == podman ]] && podman=true
if ! $podman && ! "$DOCKER" info >/dev/null 2>&1; then
  die "$DOCKER cannot reach a Docker engine (is the daemon running?); without one use DOCKER=podman"
fi

IMAGE_NAME=${IMAGE_NAME:-species-classifier}
ECR_REPOSITORY=${ECR_REPOSITORY:-species-classifier}
PYTHON=${PYTHON:-python3}
if [[ -z ${IMAGE_TAG:-} ]]; then
  IMAGE_TAG=$(git rev-parse --short=12 HEAD)
  if [[ -n $(git status --porcelain) ]]; then
    # Tags are immutable: each uncommitted state gets its own, from the tree git would
    # commit (untracked files included) written through a scratch copy of the index.
    index=$(mktemp)
    cp "$(git rev-parse --git-path index)" "$index"
    tree=$(GIT_INDEX_FILE=$index git add --all && GIT_INDEX_FILE=$index git write-tree)
    rm -f "$index"
    IMAGE_TAG+=-dirty-${tree:0:12}
    say "uncommitted changes: tagging $IMAGE_TAG"
  fi
fi

# The ECR calls, with boto3 (already a dependency of the launcher; the AWS CLI is not needed).
ecr() {
  "$PYTHON" - "$@" <<'PY'
import base64
import fnmatch
import os
import sys

try:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
except ImportError:
    sys.exit(f"build_push: boto3 missing for {sys.executable}: run make venv, or PYTHON=.venv/bin/python")


def fail(message):
    sys.exit(f"build_push: {message}")


def say(message):
    print(f"build_push: {message}", file=sys.stderr)


def ensure_scan_on_push(ecr, name):
    """Add the repository to the registry's scan-on-push rule, keeping every other rule."""
    config = ecr.get_registry_scanning_configuration()["scanningConfiguration"]
    rules = config.get("rules", [])
    for rule in rules:
        if rule["scanFrequency"] in ("SCAN_ON_PUSH", "CONTINUOUS_SCAN") and any(
            fnmatch.fnmatchcase(name, item["filter"]) for item in rule["repositoryFilters"]
        ):
            return
    new_filter = {"filter": name, "filterType": "WILDCARD"}
    on_push = next((rule for rule in rules if rule["scanFrequency"] == "SCAN_ON_PUSH"), None)
    if on_push:
        on_push["repositoryFilters"].append(new_filter)
    else:
        rules.append({"scanFrequency": "SCAN_ON_PUSH", "repositoryFilters": [new_filter]})
    scan_type = config.get("scanType") or "BASIC"
    ecr.put_registry_scanning_configuration(scanType=scan_type, rules=rules)
    say(f"added {name} to the registry's scan-on-push rule ({scan_type} scanning)")


session = boto3.session.Session(region_name=os.environ.get("AWS_REGION") or None)
if not session.region_name:
    fail("no AWS region: set AWS_REGION, or region in the AWS config (aws configure)")
command, *args = sys.argv[1:]
try:
    if command == "registry":
        account = os.environ.get("AWS_ACCOUNT_ID") or (
            session.client("sts").get_caller_identity()["Account"]
        )
        say(f"account {account}, region {session.region_name}")
        print(f"{account}.dkr.ecr.{session.region_name}.amazonaws.com")
    elif command == "ensure-repository":
        (name,) = args
        ecr = session.client("ecr")
        try:
            ecr.describe_repositories(repositoryNames=[name])
        except ecr.exceptions.RepositoryNotFoundException:
            ecr.create_repository(repositoryName=name, imageTagMutability="IMMUTABLE")
            say(f"created ECR repository {name} (immutable tags)")
        try:
            ensure_scan_on_push(ecr, name)
        except ClientError as error:
            if error.response["Error"]["Code"] != "AccessDeniedException":
                raise
            say(
                f"warning: not allowed to read or change the registry's scanning rules ({error}): "
                f"{name} is scanned on push only if a registry rule already covers it"
            )
    elif command == "login-password":
        token = session.client("ecr").get_authorization_token()["authorizationData"][0]
        print(base64.b64decode(token["authorizationToken"]).decode().split(":", 1)[1])
    else:
        fail(f"unknown ecr command {command}")
except NoCredentialsError:
    fail("no AWS credentials: set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
except (BotoCoreError, ClientError) as error:
    fail(f"AWS call failed: {error}")
PY
}

# Fail on missing AWS settings before spending minutes on the build.
if $push; then
  ecr_registry=$(ecr registry)
  registry=${ECR_REGISTRY:-$ecr_registry}
fi

build=(build --platform "$PLATFORM" -f container/Dockerfile -t "$IMAGE_NAME:$IMAGE_TAG" -t "$IMAGE_NAME:latest")
[[ -n ${BASE_IMAGE:-} ]] && build+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[[ -n ${PRETRAINED_WEIGHTS:-} ]] && build+=(--build-arg "PRETRAINED_WEIGHTS=$PRETRAINED_WEIGHTS")
# SageMaker refuses OCI manifests and indexes ("Unsupported manifest media type").
if $podman; then
  # The default OCI isolation fails where podman itself runs in a container.
  build+=(--format docker --isolation=chroot)
  push_flags=(--format v2s2)
else
  # BuildKit attaches provenance and SBOM attestations in an OCI index unless told not to;
  # the containerd image store pushes an index unless one platform is named.
  "$DOCKER" buildx version >/dev/null 2>&1 && build+=(--provenance=false --sbom=false)
  push_flags=()
  "$DOCKER" push --help 2>/dev/null | grep -q -- --platform && push_flags+=(--platform "$PLATFORM")
fi
for setting in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CERT; do
  value=${!setting:-}
  [[ -n $value ]] || continue
  build+=(--build-arg "$setting=$value")
  for item in $value; do
    path=${item#file://}
    [[ $path == /* ]] || continue
    # A local index's pages link to files beside the "simple" folder: mount its parent.
    [[ $setting == *INDEX_URL ]] && path=$(dirname "$path")
    if ! $podman; then
      say "warning: $setting names $path, which docker build cannot mount: serve it over http"
    elif [[ -e $path ]]; then
      build+=(-v "$path:$path:ro")
    fi
  done
done

say "$DOCKER ${build[*]} ."
"$DOCKER" "${build[@]}" . >&2
local_image="$IMAGE_NAME:$IMAGE_TAG"
built_platform=$("$DOCKER" image inspect --format '{{.Os}}/{{.Architecture}}' "$local_image")
[[ $built_platform == "$PLATFORM" ]] \
  || die "$local_image is $built_platform, not $PLATFORM: is BASE_IMAGE for $PLATFORM? (make base-image PLATFORM=$PLATFORM)"
if ! $push; then
  say "built $local_image (also tagged $IMAGE_NAME:latest)"
  echo "$local_image"
  exit 0
fi

ecr ensure-repository "$ECR_REPOSITORY"
if [[ $registry =~ ^[0-9]{12}\.dkr\.ecr(-fips)?\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$ ]]; then
  ecr login-password | "$DOCKER" login --username AWS --password-stdin "$registry" >&2
else
  say "$registry is not an ECR registry: not sending it ECR credentials (log in to it yourself)"
fi
uri="$registry/$ECR_REPOSITORY:$IMAGE_TAG"
for tag in "$IMAGE_TAG" ${release_tag:+"$release_tag"}; do
  "$DOCKER" tag "$local_image" "$registry/$ECR_REPOSITORY:$tag"
  say "pushing $registry/$ECR_REPOSITORY:$tag"
  "$DOCKER" push ${push_flags[@]+"${push_flags[@]}"} "$registry/$ECR_REPOSITORY:$tag" >&2
done
echo "$uri"
