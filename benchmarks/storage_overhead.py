"""Per-trial cost of the search machinery on each storage, with 1, 4 and 16 worker processes.

A trial here trains nothing: ask (the sampler and pruner of ``studies/tiny.yaml`` on its
space), report a score and consult the pruner once per epoch, tell. On SQLite and PostgreSQL
the storage is reftsearch's own (``storage.open_storage``: WAL, busy timeout, small pools,
heartbeats), so every trial also starts a heartbeat thread and checks for stale trials, as a
reftsearch worker does; Optuna's journal storage (``JournalFileBackend``) has no heartbeat.
Workers are separate processes forked from one that imported everything, released together by
a barrier; each runs its share of the trials through ``study.optimize`` on its own storage
connection. One real tiny-model trial (``studies/tiny.yaml``, one torch thread) is timed in the
same run to put the cost in proportion.

PostgreSQL: a throw-away database on 127.0.0.1:5432 (trust auth, user postgres or root);
skipped with a note when no server answers.

Usage::

    .venv/bin/python benchmarks/storage_overhead.py [--quick]

Columns: ms per trial as one worker sees it (its wall time / its trials; with more workers
than CPU cores this includes waiting for a core), trials per second over all workers, the
machine's time per trial (1 / that rate), and the per-worker cost as a fraction of the
tiny-model trial.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
import warnings
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]
TINY_STUDY = REPO / "studies" / "tiny.yaml"
CONCURRENCY = (1, 4, 16)


def trivial_objective(space, epochs: int):
    from reftsearch.spec.space import sample

    def objective(trial: optuna.Trial) -> float:
        values = sample(trial, space)
        score = 0.0
        for epoch in range(1, epochs + 1):
            score = values["lr"] * epoch  # any number: the storage round trips are the cost
            trial.report(score, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return score

    return objective


def make_storage(kind: str, location: str):
    if kind == "journal":
        backend = optuna.storages.journal.JournalFileBackend(location)
        return optuna.storages.JournalStorage(backend)
    from reftsearch.search.storage import open_storage

    return open_storage(location, heartbeat_s=60)


def work(kind: str, location: str, name: str, n_trials: int, barrier, results) -> None:
    """One worker process: its own storage connection, then ``n_trials`` trivial trials."""
    from reftsearch.search.study import make_pruner, make_sampler
    from reftsearch.spec.study_file import load_spec

    # quiet: heartbeat "experimental" warnings and journal lock-wait notices in every process
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    spec = load_spec(TINY_STUDY)
    study = optuna.load_study(
        study_name=name,
        storage=make_storage(kind, location),
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
    )
    study.sampler.reseed_rng()
    objective = trivial_objective(spec.space, spec.budget.max_epochs)
    barrier.wait()
    start = time.perf_counter()
    study.optimize(objective, n_trials=n_trials)
    results.put(time.perf_counter() - start)


def measure(
    kind: str, location: str, name: str, workers: int, trials_per_worker: int
) -> tuple[float, float]:
    """(ms per trial as one worker sees it, trials per second over all workers)."""
    optuna.create_study(study_name=name, storage=make_storage(kind, location))
    context = multiprocessing.get_context("forkserver")
    barrier, results = context.Barrier(workers), context.Queue()
    processes = [
        context.Process(
            target=work, args=(kind, location, name, trials_per_worker, barrier, results)
        )
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    elapsed = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a {kind} worker failed (exit code {process.exitcode})")
    per_trial_ms = 1000 * sum(elapsed) / (workers * trials_per_worker)
    return per_trial_ms, workers * trials_per_worker / max(elapsed)


def tiny_trial_seconds() -> float:
    """Wall time of one real trial of ``studies/tiny.yaml`` with the model already loaded."""
    import torch

    from reftsearch.search.objective import Objective
    from reftsearch.search.study import prepare
    from reftsearch.spec.study_file import load_spec

    torch.set_num_threads(1)  # as each of several workers on a small machine would run
    spec = load_spec(TINY_STUDY)
    prepared = prepare(spec)
    study = optuna.create_study(direction=spec.direction)
    study.enqueue_trial(
        {
            "intervention": "loreft",
            "layers": "all",
            "prefix": 1,
            "suffix": 2,
            "tied": False,
            "rank": 2,
            "lr": 3e-3,
        }
    )
    study.optimize(Objective(prepared, log=lambda _: None), n_trials=1)
    trial = study.trials[0]
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials per configuration")
    args = parser.parse_args()
    total = 48 if args.quick else 160  # trials per configuration, split over the workers
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # forked workers start with everything imported: 16 fresh imports would dominate
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["optuna", "reftsearch.search.study", "reftsearch.search.storage"]
    )
    tiny_s = tiny_trial_seconds()
    print(f"tiny-model trial (studies/tiny.yaml, 1 torch thread): {tiny_s:.2f} s")
    print(
        f"{'storage':<12}{'workers':>8}{'ms/trial':>10}{'trials/s':>10}{'machine ms':>12}"
        f"{'of tiny trial':>15}"
    )
    from reftsearch.testing import scratch_postgres_database

    scratch = scratch_postgres_database("reftsearch_bench")
    with tempfile.TemporaryDirectory() as tmp, scratch as postgres_url:
        for kind in ("sqlite", "postgresql", "journal"):
            for workers in CONCURRENCY:
                if kind == "postgresql" and postgres_url is None:
                    print(f"{kind:<12}{workers:>8}  skipped: no PostgreSQL on 127.0.0.1:5432")
                    continue
                name = f"{kind}-{workers}"
                location = {
                    "sqlite": f"sqlite:///{tmp}/{name}.db",
                    "journal": f"{tmp}/{name}.log",
                    "postgresql": postgres_url,
                }[kind]
                ms, rate = measure(kind, location, name, workers, max(1, total // workers))
                print(
                    f"{kind:<12}{workers:>8}{ms:>10.1f}{rate:>10.1f}{1000 / rate:>12.1f}"
                    f"{ms / 1000 / tiny_s:>15.1%}"
                )


if __name__ == "__main__":
    main()
