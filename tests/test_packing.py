"""Trial packing: k trials trained side by side equal the same k trials trained alone."""

import datetime
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import optuna
import pytest
import torch
from conftest import DEVICES, tiny_study
from test_cache import make_reft, setup

from reftsearch.cli import main
from reftsearch.engine.activation_cache import PrefixCache
from reftsearch.engine.packing import Pack, PackedTrainer, TrialRun, own_head
from reftsearch.engine.train import TrainConfig, build_scheduler, train_trial
from reftsearch.errors import SpecError
from reftsearch.methods.adapter import GLOBAL_RNG_LOCK, build_adapter
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.run.lines import ProgressPrinter
from reftsearch.run.packed_search import AUTO_MAX_PACK, optimize, pack_size, trials_that_fit
from reftsearch.search.study import prepare
from reftsearch.spec.study_file import load_spec

# trials that differ in everything packing must keep apart: layers, positions, rank, batch
# size, learning rate, schedule, epochs (so one leaves the pack before the others)
TRIALS = [
    (dict(layers=(0, 2), prefix=1, suffix=2, tied=False), dict(lr=5e-3, batch_size=8)),
    (dict(layers=(3,), prefix=0, suffix=1, tied=True, rank=1), dict(lr=2e-2, batch_size=5)),
    (
        dict(layers=(1, 3), prefix=2, suffix=2, tied=True),
        dict(lr=1e-3, batch_size=12, epochs=1, warmup_ratio=0.3),
    ),
]


def config(seed, **changes):
    return TrainConfig(**{"lr": 1e-3, "epochs": 2, "batch_size": 8, "seed": seed, **changes})


@pytest.mark.parametrize(
    ("model", "kind", "cached"),
    [
        ("tiny:llama", "classification", False),
        ("tiny:llama", "generation", True),
        ("tiny:bert", "classification", True),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_packed_trials_equal_trials_alone(model, kind, cached, device):
    base, data = setup(model, kind, device)
    data = type(data)(data.train, data.dev, kind, "loss")  # a smooth metric to compare
    alone = []
    for i, (reft_options, train_options) in enumerate(TRIALS):
        reft = make_reft(base, seed=i, **reft_options)
        curve = []
        train_trial(
            base, reft, data, config(i, **train_options), lambda e, d, c=curve: c.append(d.score)
        )
        alone.append((curve, reft))

    cache = PrefixCache(64) if cached else None
    packed, runs = [], []
    with Pack(base, cache) as pack:
        for i, (reft_options, train_options) in enumerate(TRIALS):
            reft = make_reft(base, seed=i, **reft_options)
            curve = []
            run = TrialRun(
                reft,
                data,
                config(i, **train_options),
                own_head(base, i),
                lambda e, d, c=curve: c.append(d.score),
            )
            pack.add(run)
            runs.append(run)
            packed.append((curve, reft))
        ended = []
        while pack.runs:
            ended += pack.step()
    assert [run for run, _ in ended] == [runs[2], runs[0], runs[1]]  # fewest steps first (2, 6, 10)
    assert all(error is None for _, error in ended)
    for (curve, reft), (want_curve, want_reft) in zip(packed, alone, strict=True):
        assert len(curve) == len(want_curve)
        torch.testing.assert_close(curve, want_curve, rtol=1e-4, atol=1e-5)
        for got, want in zip(reft.parameters(), want_reft.parameters(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    if base.head is not None:  # each packed trial trained its own copy of the head
        head_params = [list(run.head.parameters()) for run in runs]
        assert not torch.equal(head_params[0][-1], head_params[1][-1])


def test_a_diverging_trial_leaves_the_pack_alone():
    base, data = setup("tiny:llama")
    good, bad = make_reft(base, seed=0), make_reft(base, seed=1)
    with Pack(base) as pack:
        pack.add(TrialRun(good, data, config(0), own_head(base, 0)))
        pack.add(bad_run := TrialRun(bad, data, config(1, lr=1e30), own_head(base, 1)))
        ended = []
        while pack.runs:
            ended += pack.step()
    outcomes = {id(run): error for run, error in ended}
    assert "became nan" in str(outcomes[id(bad_run)])
    assert [error for run, error in ended if run is not bad_run] == [None]


def test_packed_run_fills_slots_from_the_study(write_study, easy_task_files):
    """Through the CLI: 2 trials at a time, pruned and finished slots refilled until the
    budget; every trial is a normal Optuna trial with its own curve and pruning decision."""
    raw = tiny_study(
        easy_task_files,
        metric="loss",
        budget={"n_trials": 5, "max_epochs": 3},
        pruner={"type": "median", "n_startup_trials": 1},
        resources={"heartbeat_s": 5, "trials_per_worker": 2},
    )
    raw["space"].update(lr=[1e-2, 1e-7], rank=1, suffix=1, epochs=3)
    study = write_study(raw)
    assert main(["run", str(study)]) == 0
    spec = load_spec(study)
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).get_trials()
    assert len(trials) == 5
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert all(t.intermediate_values for t in trials)
    # two trials really were in training at the same time
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))


def test_trials_ending_together_print_their_own_places():
    """Packed trials end together: each one's callback counted the others as finished too,
    and two lines said [2/2]."""
    study = optuna.create_study(direction="maximize")
    start = datetime.datetime(2026, 12, 4, 12, 0)
    for seconds in (1, 2):
        trial = optuna.trial.create_trial(value=0.5)
        trial.datetime_start = start
        trial.datetime_complete = start + datetime.timedelta(seconds=seconds)
        study.add_trial(trial)
    lines = []
    printer = ProgressPrinter(2, lines.append)
    for trial in study.trials:  # both finished before the first callback ran
        printer(study, trial)
    assert [line.split()[0] for line in lines] == ["[1/2]", "[2/2]"]


def test_threads_take_each_enqueued_trial_once(tmp_path):
    """Packed trials on the default SQLite storage, every one enqueued (warm starts): each
    runs once, with its own config (Optuna alone on 4 threads ran some twice and crashed)."""
    storage = f"sqlite:///{tmp_path / 'race.db'}"
    for attempt in range(4):
        ran = []

        def objective(trial: optuna.Trial, ran: list = ran) -> float:
            ran.append((trial.number, trial.suggest_float("x", 0, 1)))
            time.sleep(0.2)  # trials overlap, as packed ones do
            return 0.0

        study = optuna.create_study(study_name=f"race{attempt}", storage=storage)
        for i in range(4):
            study.enqueue_trial({"x": i / 10})
        optimize(study, objective, k=4, missing=4)
        assert sorted(ran) == [(i, i / 10) for i in range(4)]


def test_packed_trainer_is_train_trial_for_each_thread():
    base, data = setup("tiny:llama")
    trainer = PackedTrainer(base)
    reft = make_reft(base, seed=0)
    score = trainer(base, reft, data, config(0)).score
    want = train_trial(base, make_reft(base, seed=0), data, config(0)).score
    assert score == pytest.approx(want, abs=1e-6)
    assert trainer.pack.runs == []


def test_seeded_init_is_the_same_while_other_threads_draw_numbers():
    """A packed trial's init must not depend on what the stepping thread draws from the global
    RNG meanwhile (dropout): build_adapter seeds and initialises under GLOBAL_RNG_LOCK, which
    the packed step holds too."""
    base, _ = setup("tiny:llama")
    reft_config = ReftConfig("loreft", (0, 2, 3), prefix=1, suffix=1, tied=False, rank=2)
    want = build_adapter(reft_config, base, seed=7).state_dict()
    stop = threading.Event()

    def step_with_dropout():
        while not stop.is_set():
            with GLOBAL_RNG_LOCK:
                torch.rand(256)

    drawer = threading.Thread(target=step_with_dropout)
    drawer.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            built = list(pool.map(lambda _: build_adapter(reft_config, base, 7), range(16)))
    finally:
        stop.set()
        drawer.join()
    for adapter in built:
        for name, tensor in adapter.state_dict().items():
            assert torch.equal(tensor, want[name]), name


def test_trials_that_fit_the_free_memory():
    gib = 2**30
    assert trials_that_fit(10 * gib, gib) == 7  # 70% of it: the rest for fragmentation, dev
    assert trials_that_fit(gib, 2 * gib) == 1  # always one: a trial alone is the plain run
    assert trials_that_fit(1000 * gib, gib) == AUTO_MAX_PACK  # past it the GPU is busy anyway


def test_auto_packs_one_trial_on_a_cpu(write_study, easy_task_files):
    """auto chooses by GPU memory; on a CPU a step costs as its rows, so trials run alone."""
    raw = tiny_study(easy_task_files, resources={"heartbeat_s": 5, "trials_per_worker": "auto"})
    logged = []
    assert pack_size(prepare(load_spec(write_study(raw))), logged.append) == 1
    assert logged == [
        "resources.trials_per_worker auto: 1 on cpu (a CPU step's cost grows with its rows)"
    ]


def test_lora_trials_do_not_pack(write_study, easy_task_files):
    raw = tiny_study(easy_task_files, method="lora", resources={"trials_per_worker": 2})
    raw["space"] = {"lr": 1e-3}
    with pytest.raises(SpecError, match="resources.trials_per_worker: packing trains ReFT"):
        pack_size(prepare(load_spec(write_study(raw))), print)
    raw["resources"]["trials_per_worker"] = "auto"
    logged = []
    assert pack_size(prepare(load_spec(write_study(raw))), logged.append) == 1
    assert "ReFT trials only" in logged[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto measures CUDA memory")
def test_auto_packs_what_fits_a_gpu(write_study, easy_task_files):
    raw = tiny_study(
        easy_task_files,
        model={"path": "tiny:llama", "device": "cuda"},
        resources={"heartbeat_s": 5, "trials_per_worker": "auto"},
    )
    logged = []
    k = pack_size(prepare(load_spec(write_study(raw))), logged.append)
    assert 1 <= k <= AUTO_MAX_PACK
    assert logged[0].startswith(f"resources.trials_per_worker auto: {k} on cuda")


@pytest.mark.parametrize("warmup_ratio", [0.0, 0.06, 0.5])
def test_the_schedule_is_transformers_linear_warmup_and_decay(warmup_ratio):
    """``build_scheduler`` spares every process transformers.optimization's imports (peft):
    the same learning rates, step after step."""
    from transformers import get_linear_schedule_with_warmup

    config = TrainConfig(lr=1e-3, epochs=3, batch_size=8, seed=0, warmup_ratio=warmup_ratio)
    total = math.ceil(100 / 8) * 3
    optimizers = [torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3) for _ in "ab"]
    ours = build_scheduler(optimizers[0], config, 100)
    theirs = get_linear_schedule_with_warmup(optimizers[1], round(warmup_ratio * total), total)
    rates = [], []
    for _ in range(total + 2):
        for optimizer, scheduler, seen in zip(optimizers, (ours, theirs), rates, strict=True):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
    assert rates[0] == rates[1] and max(rates[0]) == 1e-3 and rates[0][-2] == 0.0
