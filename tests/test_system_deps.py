"""scripts/system_deps.sh, which `make test` runs first: installs exactly the missing system
packages as root, and says in one line what to install where it cannot. Run against a PATH of
stand-ins, so the test changes nothing on this machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "system_deps.sh"
ALL_PACKAGES = {
    "podman", "runc", "debootstrap", "docker-registry", "docker-compose", "podman-docker", "curl",
}  # fmt: skip


def stand_ins(folder: Path, uid: int, present: tuple[str, ...] = ()) -> Path:
    """A bin folder with `id` answering `uid`, an apt-get that records its arguments, and
    `present` as commands that exist; nothing else of the machine's is on that PATH."""
    folder.mkdir()
    scripts = {
        "id": f"echo {uid}",
        "apt-get": f'echo "$*" >> {folder / "apt-get.log"}',
        **{command: "true" for command in present},
    }
    for name, body in scripts.items():
        (folder / name).write_text(f"#!{shutil.which('bash')}\n{body}\n")
        (folder / name).chmod(0o755)
    (folder / "sort").symlink_to(shutil.which("sort"))
    return folder


def run(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [shutil.which("bash"), str(SCRIPT)],
        env={"PATH": str(folder)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_root_installs_exactly_what_is_missing(tmp_path):
    folder = stand_ins(tmp_path / "bin", uid=0, present=("podman", "runc", "curl"))
    result = run(folder)
    assert result.returncode == 0, result.stderr
    update, install = (folder / "apt-get.log").read_text().splitlines()
    assert update == "update -qq"
    words = install.split()
    assert words[:4] == ["install", "-y", "-qq", "--no-install-recommends"]
    assert set(words[4:]) == ALL_PACKAGES - {"podman", "runc", "curl"}
    assert "system-deps: installing" in result.stdout


def test_nothing_missing_changes_nothing(tmp_path):
    commands = ("podman", "runc", "debootstrap", "docker-registry", "docker-compose", "docker")
    folder = stand_ins(tmp_path / "bin", uid=0, present=(*commands, "curl"))
    result = run(folder)
    assert result.returncode == 0
    assert not (folder / "apt-get.log").exists()
    assert result.stdout == result.stderr == ""


def test_without_root_or_sudo_it_says_what_to_install_in_one_line(tmp_path):
    folder = stand_ins(tmp_path / "bin", uid=1000, present=("podman", "runc", "debootstrap"))
    result = run(folder)
    assert result.returncode == 0  # the rest of the suite still runs
    assert not (folder / "apt-get.log").exists()
    (line,) = result.stderr.splitlines()
    assert "sudo apt-get install curl docker-compose docker-registry podman-docker" in line
    assert "container tests" in line


def test_make_test_runs_it_and_ci_relies_on_make_test():
    makefile = (SCRIPT.parents[1] / "Makefile").read_text()
    assert "\ntest: venv system-deps " in makefile
    assert "scripts/system_deps.sh" in makefile
    ci = (SCRIPT.parents[1] / ".ci" / "run").read_text()
    assert "apt-get" not in ci and "make test" in ci
    assert os.access(SCRIPT, os.X_OK)
