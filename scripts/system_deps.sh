#!/usr/bin/env bash
# The system packages `make test` needs beyond the venv, in one list: the container tests build
# and run the real image with podman (no Docker engine needed), push it to a local registry, and
# run it through the SageMaker Python SDK's local mode. Installs only what is missing, as root or
# through sudo; where it cannot, says in one line what to install and why, and leaves the rest
# of the suite to run (the container tests then fail with the same advice).
set -euo pipefail

# command -> Debian/Ubuntu package that provides it
declare -A PACKAGE_OF=(
  [podman]=podman                  # builds and runs the image
  [runc]=runc                      # the OCI runtime podman runs it with here
  [debootstrap]=debootstrap        # the local Debian base image (no registry is reachable)
  [docker-registry]=docker-registry  # the local push target for scripts/build_push.sh
  [docker-compose]=docker-compose  # the SageMaker SDK's local mode
  [docker]=podman-docker           # the SDK calls `docker`; podman's shim serves where none is
  [curl]=curl                      # readiness checks against podman's API socket
)

missing=()
for command in "${!PACKAGE_OF[@]}"; do
  command -v "$command" >/dev/null || missing+=("${PACKAGE_OF[$command]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
why="the container tests build, run and push the real image with them"

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root=(sudo)
else
  echo "system-deps: missing ${missing[*]} ($why): run 'sudo apt-get install ${missing[*]}' or 'make system-deps' as root" >&2
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "system-deps: missing ${missing[*]} ($why): install them with this machine's package manager (no apt-get here)" >&2
  exit 0
fi

echo "system-deps: installing ${missing[*]} ($why)"
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
