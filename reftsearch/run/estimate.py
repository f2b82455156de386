"""What a study will cost here, measured before spending it.

A few configs are drawn from the space at random (those already enqueued in the study first:
warm starts and ``enqueue_trial`` configs are the ones its next trials run); for each, two
training steps and one dev batch are timed on this machine (after a warm-up step), through
the path trials take (the worker's frozen-activation cache included, whose one-off build is
left out). Scaled by the data sizes and epochs, that gives seconds per epoch and per trial for
the cheapest, median and most expensive of them, and the study's expected wall time for its
budget and workers, finalize's seed reruns included.

``reftsearch estimate`` and the line ``reftsearch run`` prints before its trials are this one
computation on the same inputs: the configs the study's next trials run (its warm starts),
then random ones, ``EstimateRequest.samples`` of them.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import optuna
import torch

from reftsearch.engine.activation_cache import PrefixCache
from reftsearch.engine.packing import Pack, TrialRun
from reftsearch.engine.scoring import EVAL_BATCH_SIZE, evaluate_examples
from reftsearch.engine.train import TrainConfig, reset_head
from reftsearch.methods.adapter import Adapter, AdapterConfig, build_adapter
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.progress import format_duration
from reftsearch.search.objective import invalid_reason, resolve
from reftsearch.search.record import describe_config
from reftsearch.search.study import PreparedStudy
from reftsearch.spec.space import sample

TIMED_STEPS = 2
# dev examples timed per config: one whole scoring batch, as trials score them. A batch of
# 16 made a SmolLM2 dev pass look 3x dearer per example than the trials' batches of 64 (each
# decoding step reads every weight, whatever the rows), and the estimate 1.5-2x too high
EVAL_SAMPLE = EVAL_BATCH_SIZE


@dataclass(frozen=True)
class ConfigCost:
    config: str
    step_s: float
    epoch_s: float
    trial_s: float


@dataclass(frozen=True)
class EstimateRequest:
    """What to predict: ``n_trials`` still to search on ``workers``, then ``finalize_runs``
    seed reruns (which the driver runs one after another), timing ``samples`` configs."""

    n_trials: int
    workers: int
    finalize_runs: int = 0
    samples: int | None = None  # default: no more configs timed than trials, at most 3

    @property
    def configs_to_time(self) -> int:
        # the estimate is overhead on a short run: not more configs than it has trials
        return self.samples or min(3, self.n_trials)


@dataclass(frozen=True)
class Estimate:
    cheapest: ConfigCost
    median: ConfigCost
    most_expensive: ConfigCost
    n_trials: int
    workers: int
    study_s: float  # expected search wall time: median trial x trials / workers (before pruning)
    finalize_runs: int
    finalize_s: float  # the seed reruns, median trials each, never pruned, one after another

    @property
    def total_s(self) -> float:
        return self.study_s + self.finalize_s

    def to_dict(self) -> dict:
        return {**asdict(self), "total_s": self.total_s}

    def line(self) -> str:
        costs = (self.median, self.cheapest, self.most_expensive)
        median, low, high = (format_duration(cost.trial_s) for cost in costs)
        line = (
            f"estimate: {median} per trial (median; {low}-{high}), "
            f"{format_duration(self.study_s)} for {self.n_trials} trials on {self.workers} "
            "worker(s) before pruning"
        )
        if self.finalize_runs:
            line += (
                f", then finalize {format_duration(self.finalize_s)} for {self.finalize_runs} "
                f"seed reruns: {format_duration(self.total_s)} in all"
            )
        return line


def estimate_study(
    prepared: PreparedStudy,
    request: EstimateRequest,
    enqueued: Sequence[dict] = (),
    seed: int = 0,
) -> Estimate:
    """Time ``request.configs_to_time`` configs of the space and extrapolate: the
    ``enqueued`` ones (fixed params, as ``study.enqueue_trial`` takes them; what they leave out
    is drawn) first, then random ones."""
    configs = _configs(prepared, request.configs_to_time, seed, enqueued)
    # lowest intervened layer first: each cache build starts from the one below it
    configs.sort(key=lambda pair: _lowest_layer(pair[0]))
    costs = sorted((_cost(prepared, *pair) for pair in configs), key=lambda c: c.trial_s)
    if not costs:
        raise ValueError("no valid config could be drawn from the space")
    median = costs[len(costs) // 2]
    return Estimate(
        cheapest=costs[0],
        median=median,
        most_expensive=costs[-1],
        n_trials=request.n_trials,
        workers=request.workers,
        study_s=median.trial_s * math.ceil(request.n_trials / request.workers),
        finalize_runs=request.finalize_runs,
        finalize_s=median.trial_s * request.finalize_runs,
    )


def _configs(
    prepared: PreparedStudy, samples: int, seed: int, enqueued: Sequence[dict] = ()
) -> list[tuple[AdapterConfig, TrainConfig]]:
    """Valid configs, resolved: the enqueued ones first, then random ones (an in-memory study
    only to drive the same sampling code as trials, which asks its own enqueued ones first)."""
    drafts = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    for params in enqueued[:samples]:
        drafts.enqueue_trial(params, skip_if_exists=True)
    configs = []
    for _ in range(samples * 5):
        values = sample(drafts.ask(), prepared.spec.space)
        resolved = resolve(values, prepared.base, prepared.spec.seed, prepared.spec.method)
        if invalid_reason(resolved[0], prepared.limits) is None:
            configs.append(resolved)
        if len(configs) == samples:
            break
    return configs


def _lowest_layer(config: AdapterConfig) -> int:
    return min(config.layers) if isinstance(config, ReftConfig) else 0


def _cost(
    prepared: PreparedStudy, adapter_config: AdapterConfig, train_config: TrainConfig
) -> ConfigCost:
    base, split = prepared.base, prepared.split
    adapter = build_adapter(adapter_config, base, train_config.seed)
    cache = prepared.cache_for(adapter_config)
    step_s = _step_seconds(prepared, adapter, train_config, cache)
    per_dev_example = _dev_seconds(prepared, adapter, cache) / min(EVAL_SAMPLE, len(split.dev))
    steps = math.ceil(len(split.train) / train_config.batch_size)
    epoch_s = steps * step_s + len(split.dev) * per_dev_example
    described = describe_config({**adapter_config.to_dict(), **vars(train_config)})
    return ConfigCost(described, step_s, epoch_s, epoch_s * train_config.epochs)


def _step_seconds(
    prepared: PreparedStudy, adapter: Adapter, config: TrainConfig, cache: PrefixCache | None
) -> float:
    """A training step (a ``Pack`` of one: ``train_trial``'s forward, backward and optimizer
    step, and those of a packed trial), over a whole epoch: batches
    bucketed by length cost as their tokens (a full-row step of SmolLM2 took 0.6 s on short
    rows, 3.0 s on long ones), so the timed steps' seconds per token are scaled by the
    epoch's mean tokens per batch."""
    run = _step_run(prepared, adapter, config, cache)
    tokens = _batch_tokens(prepared, run, cache)
    timings = _steps(prepared, run, cache)
    # the first step pays one-off costs (allocations, lazy init): leave it out when possible
    timed = slice(1, len(timings)) if len(timings) > 1 else slice(0, 1)
    return sum(timings[timed]) / sum(tokens[timed]) * statistics.fmean(tokens)


def _batch_tokens(prepared: PreparedStudy, run: TrialRun, cache: PrefixCache | None) -> list[int]:
    """The tokens each batch of ``run``'s epoch computes: its rows x its longest row, from
    each row's first computed token (in a decoder with a cache, the first edited one)."""
    train = run.data.train
    frozen = None
    if cache is not None:
        frozen = cache.frozen(prepared.base, min(run.adapter.config.layers), "train", [train])
    counts = []
    for rows in run.batches_left:
        examples = [train[i] for i in rows]
        starts = None
        if frozen is not None:
            config = run.adapter.config
            starts = frozen.starts([(examples, config.prefix, config.suffix)])
        starts = starts or [0] * len(examples)
        longest = max(len(e.input_ids) - start for e, start in zip(examples, starts, strict=True))
        counts.append(len(rows) * longest)
    return counts


def step_bytes(prepared: PreparedStudy, samples: int = 3, seed: int = 0) -> int:
    """The most CUDA memory a trial's training steps took on top of what the worker holds
    (model, frozen-activation cache): its activations, gradients and optimizer state, the
    largest of ``samples`` drawn configs. What each trial packed beside others adds."""
    device = prepared.base.device
    peaks = []
    for adapter_config, train_config in _configs(prepared, samples, seed):
        adapter = build_adapter(adapter_config, prepared.base, train_config.seed)
        cache = prepared.cache_for(adapter_config)
        run = _step_run(prepared, adapter, train_config, cache)  # builds the shared cache first
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
        _steps(prepared, run, cache)
        peaks.append(torch.cuda.max_memory_allocated(device) - held)
    if not peaks:
        raise ValueError("no valid config could be drawn from the space")
    return max(peaks)


def _step_run(
    prepared: PreparedStudy, adapter: Adapter, config: TrainConfig, cache: PrefixCache | None
) -> TrialRun:
    """A trial's run over the train split, which must hold one batch more than stepped so
    that no epoch ends (and no dev pass runs) while timing: a small one is repeated. The
    frozen activations it caches are the ones trials use (built once per worker, so not
    counted as a step's cost)."""
    base, split = prepared.base, prepared.split
    rows = split.train
    # a batch holds at most the whole split, as in training: a larger batch_size is timed at
    # that size (repeating the split to a batch of 1e18 rows filled the memory)
    config = replace(config, batch_size=min(config.batch_size, len(rows)))
    if len(rows) < config.batch_size * (TIMED_STEPS + 2):
        rows = list(itertools.islice(itertools.cycle(rows), config.batch_size * (TIMED_STEPS + 2)))
    if cache is not None:
        cache.frozen(base, min(adapter.config.layers), "train", [rows])
    return TrialRun(adapter, replace(split, train=rows), config, reset_head(base, config.seed))


def _steps(prepared: PreparedStudy, run: TrialRun, cache: PrefixCache | None) -> list[float]:
    """Seconds of each of a warm-up step and ``TIMED_STEPS`` more of ``run`` alone."""
    timings = []
    with Pack(prepared.base, cache) as pack:
        pack.add(run)
        for _ in range(TIMED_STEPS + 1):
            start = time.perf_counter()
            ended = pack.step()
            timings.append(time.perf_counter() - start)
            if ended:  # e.g. its loss diverged at once: the steps so far still tell the cost
                break
    return timings


def _dev_seconds(prepared: PreparedStudy, adapter: Adapter, cache: PrefixCache | None) -> float:
    """A dev pass over the first ``EVAL_SAMPLE`` dev examples, from the cache as trials
    score (its one-off build left out)."""
    base, split = prepared.base, prepared.split
    if cache is not None:
        cache.frozen(base, min(adapter.config.layers), "dev", [split.dev])
    with adapter.attached(base.blocks):
        start = time.perf_counter()
        evaluate_examples(base, adapter, split, cache=cache, limit=EVAL_SAMPLE)
        return time.perf_counter() - start
