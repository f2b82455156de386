"""What a trial records: its Optuna user attributes, as one typed dataclass.

Everything reftsearch stores on a trial goes through ``TrialRecord``: the objective writes the
fields as it learns them (``store``: the config before training, so that a trial whose worker
dies still shows what it was training), and ``best``, the report, the progress lines, export
and warm starts read them back (``TrialRecord.of``). Values are numbers and short strings,
cheap for the dashboard's trial table (optuna #760); trained weights are an artifact whose id
is recorded here.

Nothing here imports torch: commands that only read a stored study import this module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from reftsearch.processes import died_here, runs_here

Trial = optuna.Trial | optuna.trial.FrozenTrial


@dataclass(frozen=True)
class TrialRecord:
    """A trial's user attributes. ``None`` (or an empty curve) means not recorded."""

    # what was trained: the resolved adapter and training config (``AdapterConfig.to_dict``
    # and ``TrainConfig``'s fields), written before training starts
    config: dict[str, Any] | None = None
    n_params: int | None = None  # trainable parameters of the adapter
    # the model.dtype its numbers came from: a 16-bit search's final pick reruns in float32
    dtype: str | None = None
    threads: int | None = None  # torch CPU threads of the process that ran it
    n_head_params: int | None = None  # and of the classification head, if the task has one
    base_params: int | None = None  # parameters of the whole base model (head included)
    n_interventions: int | None = None  # ReFT only
    positions_capped: float | None = None  # share of train prompts pyreft's n // 2 cap shortens
    worker: str | None = None  # host:pid
    worker_started: float | None = None  # when that process started (its pid may be reused)
    model_loads: int | None = None  # how often that worker had loaded the model so far
    wall_time_s: float | None = None
    epochs_trained: float | None = None  # in epochs over the whole train split
    # what the method cost (reftsearch.search.costs): wall seconds per epoch trained (its dev
    # pass included), the peak memory while it trained, the bytes of the weights it exports
    epoch_s: float | None = None
    peak_memory_mb: float | None = None
    export_bytes: int | None = None
    # per-epoch dev scores where they are not Optuna's intermediate values (two objectives,
    # or one step per dev example for the Wilcoxon pruner)
    dev_curve: tuple[float, ...] = ()
    # which dev examples the trained config got right (share-of-right metrics only), packed
    # by ``pack_hits``: ``best`` tells configs apart by more than the dev split's noise
    dev_hits: str | None = None
    weights_artifact: str | None = None  # Optuna artifact id of the trained weights

    # how it ended, when not COMPLETE with a score of its own
    invalid_reason: str | None = None  # PRUNED before training: the config cannot train
    pruned: str | None = None  # where it was pruned, in words
    pruned_at_epoch: int | None = None
    fail_reason: str | None = None  # FAIL: diverged, out of memory
    copied_from: int | None = None  # the same config finished already: its result copied
    past_budget: str | None = None  # asked once the budget was met, never run, counts nowhere
    # popped as a second copy of this earlier trial's enqueued run (the same warm start, or the
    # same rerun): two processes that start a study, or end its search, at once both enqueue
    # them; never run, counts nowhere
    duplicate_of: int | None = None

    # where its config came from, when not from the sampler
    warm_start: str | None = None  # the recipe's name
    finalize_of: int | None = None  # a seed rerun of this search trial ...
    seed: int | None = None  # ... with this seed

    @classmethod
    def of(cls, trial: Trial) -> TrialRecord:
        return cls.from_user_attrs(trial.user_attrs)

    @classmethod
    def from_user_attrs(cls, attrs: Mapping[str, Any]) -> TrialRecord:
        """The record in ``attrs``; other keys (the config's readable columns) are left out."""
        values = {key: value for key, value in attrs.items() if key in _FIELDS}
        if "dev_curve" in values:
            values["dev_curve"] = tuple(values["dev_curve"])
        return cls(**values)

    def to_user_attrs(self) -> dict[str, Any]:
        """The recorded fields, plus the config's readable columns for the dashboard."""
        attrs: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and value != ():
                attrs[field.name] = list(value) if isinstance(value, tuple) else value
        if self.config is not None:
            attrs.update(readable_columns(self.config))
        return attrs

    @property
    def unrun(self) -> str | None:
        """Why the trial ended without running, if it did (then it counts nowhere)."""
        if self.duplicate_of is not None:
            return f"not run: trial {self.duplicate_of} runs the same enqueued config"
        return self.past_budget

    @property
    def is_search_trial(self) -> bool:
        """Not a seed rerun, nor a trial ended unrun (past the budget, or a duplicate)."""
        return self.finalize_of is None and self.unrun is None


_FIELDS = frozenset(field.name for field in dataclasses.fields(TrialRecord))


def pack_hits(hits: Sequence[bool]) -> str:
    """``hits`` as ``"<count>:<hex>"``, four examples a hex digit, the first in the highest
    bit: 500 dev examples take 129 characters instead of a 500-item list."""
    digits = math.ceil(len(hits) / 4)
    bits = sum(1 << (4 * digits - 1 - i) for i, hit in enumerate(hits) if hit)
    return f"{len(hits)}:{bits:0{digits}x}" if hits else "0:"


def unpack_hits(text: str) -> list[bool]:
    """The hits ``pack_hits`` packed."""
    count, _, digits = text.partition(":")
    bits = int(digits, 16) if digits else 0
    width = 4 * len(digits)
    return [bool(bits >> (width - 1 - i) & 1) for i in range(int(count))]


def store(trial: optuna.Trial, **fields: Any) -> None:
    """Record ``fields`` (names of ``TrialRecord`` fields) on ``trial`` now (and in its view
    of itself: ``TrialRecord.of(trial)`` reads them at once)."""
    for key, value in TrialRecord(**fields).to_user_attrs().items():
        trial.set_user_attr(key, value)


def store_by_id(storage: optuna.storages.BaseStorage, trial_id: int, **fields: Any) -> None:
    """``store`` for a storage's trial ``trial_id``: the storage itself stamps its trials."""
    for key, value in TrialRecord(**fields).to_user_attrs().items():
        storage.set_trial_user_attr(trial_id, key, value)


def owner_runs_here(trial: Trial) -> bool:
    """Whether the process that runs ``trial`` (its ``worker``) is one of this host and still
    runs: then the trial is its, however late its heartbeat."""
    record = TrialRecord.of(trial)
    return runs_here(record.worker, record.worker_started)


def owner_died_here(trial: Trial) -> bool:
    """Whether the process that ran ``trial`` was one of this host's and has ended."""
    record = TrialRecord.of(trial)
    return died_here(record.worker, record.worker_started)


def is_search_trial(trial: Trial) -> bool:
    return TrialRecord.of(trial).is_search_trial


def search_trials(study: optuna.Study, states=None) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=states) if is_search_trial(t)]


def describe_config(config: Mapping[str, Any] | None) -> str:
    """A short human line for a resolved config."""
    if not config:
        return "?"
    training = f"lr={config['lr']:.2g} ep{config['epochs']} bs{config['batch_size']}"
    method = config.get("method", "reft")
    if method in ("lora", "dora"):  # reftsearch.methods.lora
        targets = ";".join(config["target_modules"])
        return f"{method} [{targets}] r{config['rank']} alpha={config['alpha']:g} {training}"
    if method == "full":
        return f"full wd={config['weight_decay']:g} {training}"
    layers = config["layers"]
    layer_text = ";".join(map(str, layers)) if len(layers) <= 6 else f"{len(layers)} layers"
    tied = " tied" if config.get("tied") else ""
    return (
        f"{config['intervention']} L[{layer_text}] {config['positions']}{tied} "
        f"r{config['rank']} {training}"
    )


def readable_columns(config: Mapping[str, Any]) -> dict[str, Any]:
    """Flat, short columns (strings and numbers) for the dashboard's trial table."""
    method = config.get("method", "reft")
    if method == "full":
        return {"type": method}
    if method in ("lora", "dora"):
        return {
            "type": method,
            "target_modules": ";".join(config["target_modules"]),
            "rank": config["rank"],
            "alpha": config["alpha"],
        }
    return {
        "type": config["intervention"],
        "layers": ";".join(map(str, config["layers"])),
        "positions": config["positions"],
        "tied": config["tied"],
        "rank": config["rank"],
    }
