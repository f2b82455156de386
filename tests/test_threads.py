"""torch threads per worker (resources.threads) and OpenMP's wait policy."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reftsearch.engine.threads import (
    WAIT_POLICY,
    cluster_worker_threads,
    prefer_short_waits,
    worker_env,
    worker_threads,
)
from reftsearch.errors import SpecError
from reftsearch.search.study import prepare
from reftsearch.spec.study_file import ResourcesSpec, parse_spec


@pytest.mark.parametrize(
    ("cores", "workers", "expected"), [(2, 1, 2), (2, 2, 1), (2, 4, 1), (16, 3, 5), (1, 1, 1)]
)
def test_default_is_an_equal_share_of_the_cores(cores, workers, expected):
    assert worker_threads(ResourcesSpec(), workers, cores=cores, env={}) == expected


def test_the_setting_wins_over_the_environment_which_wins_over_the_share():
    env = {"OMP_NUM_THREADS": "3"}
    assert worker_threads(ResourcesSpec(threads=5), 2, cores=8, env=env) == 5
    assert worker_threads(ResourcesSpec(), 2, cores=8, env=env) == 3
    # a value OpenMP would not take either is not a choice
    for junk in ("0", "", "two", "-1"):
        assert worker_threads(ResourcesSpec(), 2, cores=8, env={"OMP_NUM_THREADS": junk}) == 4


def test_actors_on_a_joined_cluster_get_the_cpus_ray_reserves_for_them():
    assert cluster_worker_threads(ResourcesSpec(cpus_per_trial=4), env={}) == 4
    assert cluster_worker_threads(ResourcesSpec(cpus_per_trial=0.5), env={}) == 1
    assert cluster_worker_threads(ResourcesSpec(cpus_per_trial=4, threads=2), env={}) == 2


def test_short_waits_never_replace_or_amend_the_users_policy():
    env = {}
    prefer_short_waits(env)
    assert env == WAIT_POLICY == {"GOMP_SPINCOUNT": "2000", "KMP_BLOCKTIME": "0"}
    # GOMP_SPINCOUNT outranks OMP_WAIT_POLICY in libgomp: adding ours would undo the user's
    for users in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "0"}, {"KMP_BLOCKTIME": "200"}):
        env = dict(users)
        prefer_short_waits(env)
        assert env == users


def test_ray_workers_start_with_the_drivers_wait_policy():
    assert worker_env(3, env={}) == {"OMP_NUM_THREADS": "3", **WAIT_POLICY}
    users = {"OMP_WAIT_POLICY": "PASSIVE", "PATH": "/bin"}
    assert worker_env(3, env=users) == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"}


def test_the_command_line_sets_the_policy_before_torch_loads():
    """libgomp reads its wait settings once, when torch loads it: the ``reftsearch`` module
    must not import torch before ``main`` sets them."""
    study = Path(__file__).parents[1] / "studies" / "tiny.yaml"
    code = (
        "import os, sys\n"
        "for key in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'KMP_BLOCKTIME'):\n"
        "    os.environ.pop(key, None)\n"
        "import reftsearch.cli\n"
        "assert 'torch' not in sys.modules\n"
        f"assert reftsearch.cli.main(['validate', {str(study)!r}]) == 0\n"
        "print(os.environ['GOMP_SPINCOUNT'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == WAIT_POLICY["GOMP_SPINCOUNT"]


def test_spec_reads_threads(tmp_path):
    base = {
        "name": "t",
        "model": "tiny:llama",
        "task": {"kind": "classification", "data": "builtin:sentiment"},
    }
    assert parse_spec(base, tmp_path).resources.threads is None
    assert (
        parse_spec({**base, "resources": {"threads": "auto"}}, tmp_path).resources.threads is None
    )
    assert parse_spec({**base, "resources": {"threads": 3}}, tmp_path).resources.threads == 3
    for bad in (0, -1, 1.5, True, "many"):
        with pytest.raises(SpecError, match=r"resources.threads: must be a positive integer"):
            parse_spec({**base, "resources": {"threads": bad}}, tmp_path)


def test_prepare_runs_torch_on_the_workers_threads(tmp_path):
    raw = {
        "name": "t",
        "model": "tiny:llama",
        "task": {"kind": "classification", "data": "builtin:sentiment", "max_train_examples": 8},
        "resources": {"threads": 1},
    }
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prepare(parse_spec(raw, tmp_path))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
