"""``reftsearch dashboard``: a real optuna-dashboard process answering HTTP on localhost."""

import json
import signal
import subprocess
import sys
import time
import urllib.request

import optuna
from conftest import sigint_as_in_a_terminal, tiny_study

from reftsearch.cli import main
from reftsearch.search.study import open_study
from reftsearch.spec.study_file import load_spec

START_TIMEOUT_S = 60


def start_dashboard(study, *extra):
    """The CLI in a subprocess on a free port (0); returns (process, its URL, what it printed)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "reftsearch.cli", "dashboard", str(study), "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break  # the process ended
        lines.append(line)
        if line.startswith("open "):
            return process, line.split()[1], "".join(lines)
    process.kill()
    raise AssertionError(f"dashboard did not print its URL: {''.join(lines)}")


def get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def test_dashboard_serves_the_study_on_localhost(write_study, easy_task_files):
    study = write_study(tiny_study(easy_task_files))
    spec = load_spec(study)
    created = open_study(spec, spec.storage)
    created.add_trial(
        optuna.trial.create_trial(
            value=0.75,
            params={"rank": 2},
            distributions={"rank": optuna.distributions.CategoricalDistribution([1, 2])},
            user_attrs={"type": "loreft", "layers": "0;2", "positions": "f1+l1", "n_params": 516},
        )
    )
    process, url, _ = start_dashboard(study)
    try:
        root, _, path = url.partition("/dashboard")
        assert root.startswith("http://127.0.0.1:")
        assert path == f"/studies/{created._study_id}"
        status, page = get(url)
        assert status == 200 and "<html" in page.lower()
        studies = json.loads(get(f"{root}/api/studies")[1])["study_summaries"]
        assert [s["study_name"] for s in studies] == [spec.name]
        detail = json.loads(get(f"{root}/api/studies/{created._study_id}?after=0")[1])
        (trial,) = detail["trials"]
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert attrs["layers"] == "0;2" and attrs["positions"] == "f1+l1"
    finally:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0 and "dashboard stopped" in out


def test_dashboard_warns_when_listening_beyond_localhost(write_study, easy_task_files):
    study = write_study(tiny_study(easy_task_files))
    spec = load_spec(study)
    open_study(spec, spec.storage)
    process, url, printed = start_dashboard(study, "--host", "0.0.0.0")
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=30)
    assert url.startswith("http://0.0.0.0:")
    assert "warning: listening on 0.0.0.0: the dashboard has no login" in printed


def test_dashboard_of_a_missing_study_file_is_bad_input(write_study, easy_task_files, capsys):
    study = write_study(tiny_study(easy_task_files, storage="sqlite:///nowhere/t.db"))
    assert main(["dashboard", str(study)]) == 2
    assert "storage: directory" in capsys.readouterr().err


def test_dashboard_never_prints_the_storage_password(write_study, easy_task_files, capsys):
    study = write_study(tiny_study(easy_task_files))
    url = "postgresql+psycopg://user:s3cret@127.0.0.1:1/nowhere"
    assert main(["dashboard", str(study), "--storage", url]) == 2
    captured = capsys.readouterr()
    assert "s3cret" not in captured.out + captured.err and "***" in captured.err
