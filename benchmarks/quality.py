"""Does the search beat the ReFT paper's hand-picked recipe, at equal training compute?

Tasks: GLUE SST-2, RTE and MRPC and SuperGLUE BoolQ, from the local files in
``../shared/data`` (PROVENANCE.md), with the MiniLM encoder (``embedded:minilm``); ``--quick``
runs SST-2 and MRPC. Protocol as the ReFT paper's for GLUE: the labelled validation split
(the held-out data) is cut in two halves with a fixed seed; every config is selected on one
half (the studies' dev split) and the picked ones are reported on the other (their test
split), which nothing reads while selecting. BoolQ ships its validation split only: its rows
are first split with a fixed seed into 400 held out (then halved as above) and the rest as its
train rows. Each task trains on a fixed subset of its train rows (seeded), the same for every
arm, sized so that the whole run fits ~90 minutes on 2 CPU cores.

Arms, each a reftsearch study run through ``run_study`` on the same files:

(a) paper: the paper's GLUE recipe (``warm_start.PAPER_GLUE``: LoReFT, rank 1, first
    token, all layers; batch 32, no dropout or warmup) with its own learning-rate sweep (a
    grid over the searched space's lr range in half-decade steps; ``--quick``: its middle
    three), the lr picked on the selection half;
(b) searched: the shipped ``studies/sst2-minilm.yaml`` (its space, sampler, pruner and warm
    starts) given the paper arm's compute;
(c) with ``--with-lora``: a ``method: lora`` search on the same compute.

Compute is counted in epochs over the task's train subset, summed over every trial of an arm
(``reftsearch.run.epoch_budget``): a pruned trial counts the epochs it trained, a rung of the
data ladder its share, and the seed reruns count too. Each arm's pick is retrained with seeds
43 and 44 by the study's own finalize (the top ``--searched-top-k`` configs for the searched
arm, picked by their mean over the three seeds; the paper arm's best lr), and the three runs
(seeds 42-44) are scored on the report half from their kept weights. The paper arm's total
is the budget: a searched arm stops before a trial that could take it past that total with
its finalize reruns, so it never trains more than the paper arm, and less by under one trial.
Never wall time: the same budgets on any machine.

Output: a table per task (report-half accuracy mean +- std over the seeds, trainable
parameters of the interventions, epochs spent, trials, wall time, the picked config), then a
paired bootstrap 95% interval of (searched - paper) over tasks, seeds and report rows
(``paired_bootstrap.py`` says what is resampled). Last line, in accuracy points:
``mean_searched_minus_paper=+X.X ci95=[lo,hi]``. Usage, from the repository root:

    .venv/bin/python benchmarks/quality.py [--quick] [--with-lora] [--threads 1] [--workdir DIR]

The full run takes 80-100 minutes on 2 cores: with ``--workdir DIR`` its task files and
studies stay in DIR, and the same command again resumes where a failed or stopped run ended.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
import torch
from paired_bootstrap import TaskPairs, paired_bootstrap, standard_error_of_mean

from reftsearch.cli import quiet_libraries
from reftsearch.data.batches import encode
from reftsearch.data.splits import carve_dev, load_split, load_test_rows
from reftsearch.engine.scoring import evaluate_examples
from reftsearch.progress import Log
from reftsearch.run.driver import run_study
from reftsearch.run.epoch_budget import EpochBudget, epochs_spent
from reftsearch.search.majority_baseline import most_frequent
from reftsearch.search.ranking import best_trials
from reftsearch.search.record import TrialRecord, describe_config, search_trials
from reftsearch.search.study import FINISHED_STATES, prepare
from reftsearch.search.test_split import trained_adapter
from reftsearch.search.warm_start import PAPER_GLUE
from reftsearch.spec.study_file import DataSpec, StudySpec, TaskSpec, load_spec

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "studies" / "sst2-minilm.yaml"  # the searched arm's space, sampler and pruner
DATA = REPO.parent / "shared" / "data"
SPLIT_SEED = 0  # which held-out rows select and which report, BoolQ's split, train subsets
BOOLQ_HELD_OUT = 400  # of BoolQ's 3,270 validation rows; the rest are its train rows
SEEDS = (42, 43, 44)  # the study seed, then finalize's two reruns (the paper used 42-46)
MODEL = "embedded:minilm"
# the searched arms stop on their epoch budget; this only bounds the trial count
SEARCH_TRIALS_CAP = 1000
LORA_SPACE = {
    "target_modules": ["query;value", "query;key;value"],
    "rank": [1, 2, 4, 8],
    "alpha": [8.0, 16.0, 32.0],
    "dropout": [0.0, 0.05],
    "lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
    "batch_size": [16, 32],
    "warmup_ratio": [0.0, 0.1],
}


@dataclass(frozen=True)
class Task:
    """A labelled held-out file and a train file under DATA, read as PROVENANCE.md says."""

    name: str
    title: str
    held_out: str
    train: str | None  # None: carved from the held-out file (BoolQ)
    text: str
    text_pair: str | None
    label: str
    max_length: int  # tokens: above the longest SST-2/MRPC row, RTE's and BoolQ's p90+
    read_options: Mapping[str, object] = field(default_factory=dict)


TASKS = {
    task.name: task
    for task in (
        Task("sst2", "SST-2", "sst2/validation.tsv", "sst2/train.tsv", "sentence", None,
             "label", 64, {"quoting": 3}),
        Task("rte", "RTE", "rte/validation.tsv", "rte/train.tsv", "sentence1", "sentence2",
             "label", 256),
        Task("mrpc", "MRPC", "mrpc/validation.tsv", "mrpc/train.tsv", "#1 String",
             "#2 String", "Quality", 128, {"quoting": 3, "encoding": "utf-8-sig"}),
        Task("boolq", "BoolQ", "boolq/validation.jsonl", None, "question", "passage", "label",
             256),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Size:
    """What every arm trains: the train subset per task, epochs per trial, and the paper
    arm's learning rates (whose trials and reruns make every arm's budget)."""

    tasks: tuple[str, ...]
    train_examples: Mapping[str, int]
    epochs: int
    paper_lrs: tuple[float, ...]


# Sized from one epoch of the paper recipe and of an upper-layers config per task, single
# thread (CPU ms per train row / per selection-half row scored after each epoch): SST-2
# 17-22 / 11, RTE 53-68 / 27, MRPC 43-46 / 19, BoolQ 165-171 / 56. Each arm trains
# 7 x 3 epochs (5 lrs, then 2 reruns), each epoch followed by a selection-half pass: ~41 min
# on 2 threads with --with-lora at MRPC's first size, 400 rows (2026-12-04), where MRPC
# never left its majority class. On its whole train split (3,668 rows) it learns (the
# recipe: 79.7 on the selection half against the majority's 72.1), at ~13 min per arm on 2
# threads (2026-12-06, benchmarks/README.md): ~80-100 min in all with --with-lora.
FULL = Size(
    ("sst2", "rte", "mrpc", "boolq"),
    {"sst2": 1000, "rte": 300, "mrpc": 3668, "boolq": 200},
    3,
    (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),  # sst2-minilm's lr range, in half-decade steps
)
QUICK = Size(("sst2", "mrpc"), {"sst2": 500, "mrpc": 200}, 3, (1e-3, 3e-3, 1e-2))


@dataclass(frozen=True)
class TaskFiles:
    """The task's rows as JSONL files with reftsearch's column names."""

    train: Path
    select: Path
    report: Path
    counts: str  # where the rows came from, in words


@dataclass(frozen=True)
class Arm:
    name: str
    config: str
    select_scores: list[float]  # dev (selection-half) score per seed
    report_hits: dict[int, list[bool]]  # seed -> report-half row right?
    n_params: int
    epochs: float
    trials: int  # search trials finished (complete, pruned or failed)
    reruns: int
    wall_s: float

    def report_scores(self) -> list[float]:
        return [100 * statistics.fmean(hits) for hits in self.report_hits.values()]

    def mean(self) -> float:
        return statistics.fmean(self.report_scores())

    def row(self) -> str:
        scores = self.report_scores()
        select = 100 * statistics.fmean(self.select_scores)
        return (
            f"{self.name:<9} {self.mean():5.1f} +- {statistics.stdev(scores):3.1f}  "
            f"{select:6.1f}  {self.n_params:>8,}  {self.epochs:6.1f}  "
            f"{self.trials:>3}+{self.reruns:<2} {self.wall_s:6.0f}  {self.config}"
        )


HEADER = (
    f"{'arm':<9} {'report acc':>13}  {'select':>6}  {'params':>8}  {'epochs':>6}  "
    f"{'trials':<6} {'wall s':>6}  config"
)


def read_rows(task: Task, file: str) -> list[dict]:
    """A file's rows as reftsearch reads them (``text``, ``text_pair``, ``label``)."""
    data = DataSpec(train=str(DATA / file), read_options=task.read_options)
    spec = TaskSpec("classification", data, task.text, task.text_pair, task.label)
    return load_split(spec, "train")


def majority_share(rows: list[dict]) -> float:
    """What always answering the most frequent label of ``rows`` scores on them."""
    return most_frequent([row["label"] for row in rows])[1]


class OtherRowsError(Exception):
    """A kept --workdir holds a task file with other rows than this run writes."""


def write_task_files(task: Task, n_train: int, directory: Path) -> TaskFiles:
    held_out = read_rows(task, task.held_out)
    if task.train is None:
        pool, held_out = carve_dev(held_out, BOOLQ_HELD_OUT / len(held_out), SPLIT_SEED)
        origin = (
            f"{task.title} ships validation only: its {len(pool) + len(held_out):,} rows split "
            f"(seed {SPLIT_SEED}) into {len(held_out):,} held out and {len(pool):,} train rows"
        )
    else:
        pool = read_rows(task, task.train)
        origin = f"{len(held_out):,} validation rows held out"
    select, report = carve_dev(held_out, 0.5, SPLIT_SEED)
    train = random.Random(SPLIT_SEED).sample(pool, min(n_train, len(pool)))
    files = TaskFiles(
        *(directory / f"{task.name}-{split}.jsonl" for split in ("train", "select", "report")),
        f"{origin}, halved (seed {SPLIT_SEED}): select on {len(select)}, report on "
        f"{len(report)}; train on {len(train):,} of {len(pool):,} train rows (seed {SPLIT_SEED}); "
        f"always answering the most frequent label scores {majority_share(select):.1%} on the "
        f"selection half, {majority_share(report):.1%} on the report half",
    )
    keys = ("text", "text_pair", "label") if task.text_pair else ("text", "label")
    splits = (files.train, files.select, files.report), (train, select, report)
    for path, rows in zip(*splits, strict=True):
        text = "".join(json.dumps({k: row[k] for k in keys}) + "\n" for row in rows)
        # a kept --workdir: its studies were trained on these rows, so other rows are refused
        if path.exists() and path.read_text() != text:
            raise OtherRowsError(
                f"{path} holds other rows than this run's (another --train-examples, or not "
                "this benchmark's file); name another --workdir"
            )
        path.write_text(text)
    return files


@contextmanager
def work_folder(kept: Path | None) -> Iterator[Path]:
    """``kept`` (never removed), or a temporary folder removed at the end."""
    if kept is not None:
        yield kept
        return
    with tempfile.TemporaryDirectory(prefix="reftsearch-quality-") as workdir:
        yield Path(workdir)


def task_overrides(task: Task, files: TaskFiles, name: str, n_trials: int, epochs: int) -> list:
    """The shipped study, on ``files``, named ``name``, with this benchmark's budget."""
    data = {"train": str(files.train), "dev": str(files.select), "test": str(files.report)}
    task_raw = {"kind": "classification", "data": data, "text": "text", "label": "label"}
    if task.text_pair:
        task_raw["text_pair"] = "text_pair"
    task_raw["max_length"] = task.max_length
    return [
        f"name={name}",
        f"task={json.dumps(task_raw)}",  # JSON is YAML: paths need no quoting of their own
        f"seed={SEEDS[0]}",
        # float32 on every CPU: the same figures anywhere, and no 16-bit search whose float32
        # own-seed reruns (finalize) would train past the arm's budget
        f"model={json.dumps({'path': MODEL, 'dtype': 'float32'})}",
        f"budget={json.dumps({'n_trials': n_trials, 'max_epochs': epochs})}",
        "resources.workers=1",
    ]


def finalize(top_k: int) -> str:
    return f"finalize={json.dumps({'top_k': top_k, 'seeds': list(SEEDS[1:])})}"


def paper_spec(task: Task, files: TaskFiles, size: Size) -> StudySpec:
    recipe = dict(PAPER_GLUE)
    recipe.update(lr=list(size.paper_lrs), dropout=0.0, batch_size=32, warmup_ratio=0.0)
    n_trials = len(size.paper_lrs)
    return load_spec(
        STUDY,
        [
            *task_overrides(task, files, f"{task.name}-paper", n_trials, size.epochs),
            f"space={json.dumps(recipe)}",
            "sampler=grid",
            "pruner=none",
            "warm_start=null",
            finalize(1),
        ],
    )


def searched_spec(task: Task, files: TaskFiles, epochs: int, top_k: int) -> StudySpec:
    overrides = task_overrides(task, files, f"{task.name}-searched", SEARCH_TRIALS_CAP, epochs)
    return load_spec(STUDY, [*overrides, finalize(top_k)])


def lora_spec(task: Task, files: TaskFiles, epochs: int, top_k: int) -> StudySpec:
    overrides = task_overrides(task, files, f"{task.name}-lora", SEARCH_TRIALS_CAP, epochs)
    lora = ["method=lora", f"space={json.dumps(LORA_SPACE)}", "warm_start=null"]
    return load_spec(STUDY, [*overrides, *lora, finalize(top_k)])


def seed_runs(
    study: optuna.Study, picked: optuna.trial.FrozenTrial
) -> dict[int, optuna.trial.FrozenTrial]:
    """The picked trial and its finalize reruns, by seed; every one of SEEDS must be there."""
    runs = {TrialRecord.of(picked).config["seed"]: picked}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        record = TrialRecord.of(trial)
        if record.finalize_of == picked.number:
            runs[record.seed] = trial
    if sorted(runs) != sorted(SEEDS):
        raise RuntimeError(
            f"study {study.study_name}: trial {picked.number} completed with seeds "
            f"{sorted(runs)}, not {list(SEEDS)} (a rerun failed: see its fail_reason)"
        )
    return {seed: runs[seed] for seed in SEEDS}


def report_hits(
    spec: StudySpec, study: optuna.Study, runs: Mapping[int, optuna.trial.FrozenTrial], log: Log
) -> dict[int, list[bool]]:
    """Each seed run's kept weights scored on the report half (the test split), row by row."""
    prepared = prepare(spec)
    rows = load_test_rows(spec.task, prepared.data.label_names)
    examples = encode(rows, prepared.base.tokenizer, spec.task)
    hits = {}
    for seed, trial in runs.items():
        adapter, source = trained_adapter(prepared, study, trial, log)
        with adapter.attached(prepared.base.blocks):
            scores = evaluate_examples(prepared.base, adapter, prepared.split, examples)
        log(f"{spec.name}: trial {trial.number} (seed {seed}, {source}): {scores.score:.4f}")
        hits[seed] = scores.per_example
    return hits


def run_arm(
    name: str,
    spec: StudySpec,
    storage: str,
    log: Log,
    stop: Callable[[optuna.Study], bool] | None = None,
) -> Arm:
    start = time.perf_counter()
    study = run_study(spec, storage, log=log, stop=stop)
    picked = best_trials(study, 1)
    if not picked:
        raise RuntimeError(f"{spec.name}: no trial completed within the budget")
    runs = seed_runs(study, picked[0])
    hits = report_hits(spec, study, runs, log)
    record = TrialRecord.of(picked[0])
    return Arm(
        name=name,
        config=describe_config(record.config)
        + f" dropout={record.config['dropout']:g} warmup={record.config['warmup_ratio']:g}"
        + (f" (warm start {record.warm_start})" if record.warm_start else ""),
        select_scores=[trial.value for trial in runs.values()],
        report_hits=hits,
        n_params=record.n_params,
        epochs=epochs_spent(study.get_trials(deepcopy=False)),
        trials=len(search_trials(study, FINISHED_STATES)),
        reruns=sum(TrialRecord.of(t).finalize_of is not None for t in study.trials),
        wall_s=time.perf_counter() - start,
    )


def run_task(
    task: Task, size: Size, top_k: int, with_lora: bool, workdir: Path, log: Log
) -> tuple[str, list[Arm]]:
    files = write_task_files(task, size.train_examples[task.name], workdir)
    storage = f"sqlite:///{workdir / task.name}.db"
    log(f"== {task.title}: paper arm, lr grid {list(size.paper_lrs)}")
    paper = run_arm("paper", paper_spec(task, files, size), storage, log)
    arms = [paper]
    others = [("searched", searched_spec(task, files, size.epochs, top_k))]
    if with_lora:
        others.append(("lora", lora_spec(task, files, size.epochs, top_k)))
    for name, spec in others:
        budget = EpochBudget.of(paper.epochs, spec)
        log(f"== {task.title}: {name} arm, up to {budget.epochs:g} epochs (the paper arm's)")
        arms.append(run_arm(name, spec, storage, log, stop=budget))
    return files.counts, arms


def lora_verdict(task: Task, arms: list[Arm]) -> str:
    """Is the searched ReFT config within 0.5 point of the searched LoRA's at >= 10x fewer
    trainable parameters?"""
    by_name = {arm.name: arm for arm in arms}
    reft, lora = by_name["searched"], by_name["lora"]
    gap, ratio = reft.mean() - lora.mean(), lora.n_params / reft.n_params
    verdict = "yes" if gap >= -0.5 and ratio >= 10 else "no"
    return f"{task.title}: {verdict} (ReFT - LoRA {gap:+.1f} points, LoRA/ReFT params {ratio:.1f}x)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 tasks, smaller subsets")
    parser.add_argument("--with-lora", action="store_true", help="add a LoRA search arm")
    parser.add_argument(
        "--searched-top-k",
        type=int,
        default=1,
        help="configs the searched arms retrain with the extra seeds (default 1)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the task files and studies here: the same command again resumes where it "
        "stopped (default: a temporary folder, removed at the end)",
    )
    # for a cheap end-to-end check: not the benchmark's sizes
    parser.add_argument("--tasks", help=argparse.SUPPRESS)
    parser.add_argument("--train-examples", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    tasks = tuple(args.tasks.split(",")) if args.tasks else size.tasks
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        print(f"error: --tasks: {unknown} must be among {sorted(TASKS)}", file=sys.stderr)
        return 2
    if not DATA.is_dir():
        print(f"error: {DATA} is missing (see ../shared/data/PROVENANCE.md)", file=sys.stderr)
        return 2
    if args.workdir is not None:
        try:
            args.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file of that name, no permission, a full disk
            print(f"error: --workdir: cannot use {args.workdir} ({err.strerror})", file=sys.stderr)
            return 2
    if args.train_examples is not None:
        size = replace(size, train_examples={t: args.train_examples for t in TASKS})
    if args.epochs is not None:
        size = replace(size, epochs=args.epochs)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet_libraries()  # Optuna at WARNING, no datasets progress bars: its own lines only

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    start = time.perf_counter()
    results = []
    with work_folder(args.workdir) as workdir:
        for name in tasks:
            try:
                counts, arms = run_task(
                    TASKS[name], size, args.searched_top_k, args.with_lora, workdir, log
                )
            except OtherRowsError as err:
                print(f"error: --workdir: {err}", file=sys.stderr)
                return 2
            results.append((TASKS[name], counts, arms))
    print(
        f"embedded:minilm, up to {size.epochs} epochs per trial; paper lr grid "
        f"{list(size.paper_lrs)}; seeds {list(SEEDS)}; {torch.get_num_threads()} threads; total "
        f"{time.perf_counter() - start:.0f} s. Report-half accuracy (%), mean +- std over the "
        "seeds; select = the selection half's; params = the interventions' (or LoRA's), "
        "without the classification head both train; epochs over the train subset, every "
        "trial and rerun; trials = search trials + seed reruns"
    )
    pairs = []
    for task, counts, arms in results:
        print(f"\n{task.title}: {counts}\n{HEADER}")
        for arm in arms:
            print(arm.row())
        paper, searched = arms[0], arms[1]
        pair = TaskPairs(
            task.title, {s: (paper.report_hits[s], searched.report_hits[s]) for s in SEEDS}
        )
        print(
            f"searched - paper: {searched.mean() - paper.mean():+.1f} points (standard error "
            f"over the report rows {pair.standard_error():.1f})"
        )
        pairs.append(pair)
    if args.with_lora:
        print("\nsearched ReFT within 0.5 point of searched LoRA at >= 10x fewer parameters:")
        for task, _, arms in results:
            print(lora_verdict(task, arms))
    interval = paired_bootstrap(pairs)
    print(
        f"\nsearched - paper over {len(pairs)} tasks x {len(SEEDS)} seeds: "
        f"{interval.mean:+.1f} points, 95% paired bootstrap interval "
        f"[{interval.low:+.1f}, {interval.high:+.1f}] (report-half rows resampled within "
        "each task, the same draw for both arms and every seed)"
    )
    print(
        f"standard error of that mean over the report rows: {standard_error_of_mean(pairs):.1f} "
        "points (an interval clears 0 where the mean is about twice it)"
    )
    print(interval.line("mean_searched_minus_paper"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
