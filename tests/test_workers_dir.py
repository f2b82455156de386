"""workers/: the deployment files parse and every command they run exists with its options."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from reftsearch.cli import _parser

WORKERS = REPO / "workers"
VENV_BIN = Path(sys.executable).parent


def ray_start_options() -> set[str]:
    help_text = subprocess.run(
        [VENV_BIN / "ray", "start", "--help"], capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r"^\s+(--[a-z-]+)", help_text, re.MULTILINE))


def check_command(command: str, ray_options: set[str]) -> None:
    words = shlex.split(command)
    assert (VENV_BIN / words[0]).exists(), f"{words[0]} (from {command!r}) is not installed"
    if words[:2] == ["ray", "start"]:
        for word in words[2:]:
            assert word.split("=")[0] in ray_options, f"ray start has no option {word}"


def test_ray_cluster_launcher_commands_exist():
    config = yaml.safe_load((WORKERS / "ray-cluster.yaml").read_text())
    commands = (
        config["setup_commands"]
        + config["head_start_ray_commands"]
        + config["worker_start_ray_commands"]
    )
    assert any(c.startswith("ray start --head") for c in commands)
    options = ray_start_options()
    for command in commands:
        check_command(command, options)


def test_kuberay_cluster_start_params_are_ray_start_options():
    cluster = yaml.safe_load((WORKERS / "kuberay-raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and cluster["apiVersion"] == "ray.io/v1"
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    options = ray_start_options()
    for group in groups:
        for key in group["rayStartParams"]:
            assert f"--{key}" in options, f"ray start has no option --{key}"
        for container in group["template"]["spec"]["containers"]:
            assert all("value" in e or "valueFrom" in e for e in container.get("env", []))


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "kuberay-raycluster.yaml", "README.md"])
def test_documented_reftsearch_commands_parse(name):
    text = (WORKERS / name).read_text()
    runs = re.findall(r"reftsearch (run \S+\.yaml[^'`\n]*)", text)
    assert runs
    for run in runs:
        args = _parser().parse_args(shlex.split(run.split("#")[0].replace("&", "")))
        assert args.command == "run"


def test_start_worker_script_runs_the_worker_entry_point():
    env = {**os.environ, "PYTHON": sys.executable, "REFTSEARCH_STORAGE": "sqlite:///unused.db"}
    done = subprocess.run(
        [WORKERS / "start-worker.sh", "some-study", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--study" in done.stdout and "REFTSEARCH_STORAGE" in done.stdout
    missing = subprocess.run([WORKERS / "start-worker.sh"], env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "usage" in missing.stderr
