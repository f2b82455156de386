"""A study file (YAML) -> a validated, typed ``StudySpec``.

Everything a study needs is checked here before anything is created; every error names its
key path (``space.rank[2]: must be a positive integer, got -1``). Checks that need the model
or the data (do the layers exist?) run in ``study.prepare`` right after, still before any
storage is touched.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import URL

from reftsearch.errors import BadInputError, SpecError
from reftsearch.metrics import PER_EXAMPLE
from reftsearch.spec import readers as v
from reftsearch.spec.space import Dimension, grid, parse_space
from reftsearch.spec.yaml_file import load_yaml, read_study_file

TASK_KINDS = ("classification", "generation")
METRICS = {  # name -> direction
    "accuracy": "maximize",
    "f1": "maximize",
    "matthews": "maximize",
    "exact_match": "maximize",
    "final_number": "maximize",  # exact match of the final number (GSM8K's "#### 42")
    "loss": "minimize",
}
METRICS_FOR_KIND = {
    "classification": ("accuracy", "f1", "matthews", "loss"),
    "generation": ("exact_match", "final_number", "loss"),
}
SAMPLERS = ("tpe", "random", "grid", "cmaes", "nsga2")
METHODS = ("reft", "lora", "dora", "full")
# what a study optimises: the dev score (the metric's direction), optionally also the trainable
# parameter count (minimised): then the study searches a Pareto front
OBJECTIVES = {"score": None, "n_params": "minimize"}
PRUNERS = ("none", "median", "successive_halving", "hyperband", "wilcoxon")
# what rung pruners (successive halving, hyperband) climb: epochs, or the share of the
# training data (each rung trains on reduction_factor times more examples)
PRUNER_RESOURCES = ("epochs", "data_fraction")
# auto: bfloat16-mixed where matmuls have bfloat16 math (Ampere+ GPUs, AVX512-BF16 or AMX
# CPUs), else float32 (``models.base.default_dtype``)
DTYPES = ("auto", "float32", "bfloat16", "float16", "bfloat16-mixed")
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class ModelSpec:
    path: str
    dtype: str = "auto"
    device: str = "auto"  # auto: the first CUDA device torch sees, else the CPU


@dataclass(frozen=True)
class DataSpec:
    """Where each split comes from: files/dirs, splits of a hub dataset, or a builtin task."""

    train: str | None = None
    dev: str | None = None
    test: str | None = None
    builtin: str | None = None
    hub: str | None = None
    hub_config: str | None = None
    read_options: Mapping[str, Any] = field(default_factory=dict)
    # .csv/.tsv only: header false = the first line is a row; its columns are named by
    # ``columns`` or, without it, by their index ("0", "1", ...; task.text: 2 names one)
    header: bool = True
    columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TaskSpec:
    kind: str
    data: DataSpec
    text: str = "sentence"
    text_pair: str | None = None
    label: str = "label"
    prompt: str = "prompt"
    response: str = "response"
    dev_fraction: float = 0.1
    max_length: int = 256
    max_train_examples: int | None = None
    max_dev_examples: int | None = None
    max_new_tokens: int = 32


@dataclass(frozen=True)
class BudgetSpec:
    n_trials: int = 20
    timeout: float | None = None
    max_epochs: int = 3


@dataclass(frozen=True)
class SamplerSpec:
    type: str = "tpe"
    seed: int | None = None
    n_startup_trials: int = 5


@dataclass(frozen=True)
class PrunerSpec:
    type: str = "hyperband"
    min_resource: int = 1
    reduction_factor: int = 3
    n_startup_trials: int = 3
    resource: str = "epochs"
    min_fraction: float = 0.1  # data_fraction: the smallest rung's share of the train split
    p_threshold: float = 0.1  # wilcoxon: prune when worse than the best at this p-value


@dataclass(frozen=True)
class ResourcesSpec:
    workers: int = 1
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    heartbeat_s: int = 60
    # frozen activations, keys and values per worker (reftsearch.engine.activation_cache)
    cache_mb: float = 2048.0
    # trials trained side by side in one batch, or "auto": as many as fit the GPU's memory
    trials_per_worker: int | Literal["auto"] = 1  # (reftsearch.run.packed_search)
    spill_mb: float = 0.0  # what does not fit cache_mb, in memory-mapped files (0: not cached)
    spill_dir: str | None = None  # where those files go (default: $REFTSEARCH_CACHE/spill)
    # what a method: full trial may use (default: what is free on the device when it starts)
    memory_mb: float | None = None
    # frozen passes kept on disk for other workers and later runs (0: none), and where
    # (reftsearch.engine.frozen_store; default: $REFTSEARCH_FROZEN_STORE, else
    # $REFTSEARCH_CACHE/frozen)
    store_mb: float = 10240.0
    store_dir: str | None = None
    # torch CPU threads per worker; None ("auto"): $OMP_NUM_THREADS, else cores // workers
    threads: int | None = None  # (reftsearch.engine.threads)


@dataclass(frozen=True)
class WarmStartSpec:
    """``{recipes: paper}`` or ``{study: NAME, storage: URL, top_k: K}``."""

    recipes: str | None = None
    study: str | None = None
    storage: str | None = None  # None: the study's own storage
    top_k: int = 3


@dataclass(frozen=True)
class FinalizeSpec:
    """Retrain the top ``top_k`` configs with ``seeds`` and pick by the mean over seeds."""

    top_k: int
    seeds: tuple[int, ...]


WARM_START_RECIPES = ("paper",)
FINALIZE_DEFAULT_MIN_TRIALS = 20  # below this a study has too few trials to be worth it


@dataclass(frozen=True)
class StudySpec:
    name: str
    storage: str
    model: ModelSpec
    task: TaskSpec
    metric: str
    direction: str
    budget: BudgetSpec
    sampler: SamplerSpec
    pruner: PrunerSpec
    space: Mapping[str, Dimension]
    seed: int
    resources: ResourcesSpec
    export_dir: str
    warm_start: tuple[WarmStartSpec, ...] = ()
    finalize: FinalizeSpec | None = None
    source: Path | None = None
    # the mapping it was parsed from and the directory relative paths resolve against:
    # workers on other machines rebuild the spec from these (reftsearch.run.worker)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    base_dir: Path | None = None
    method: str = "reft"
    objectives: tuple[str, ...] = ("score",)

    @property
    def directions(self) -> tuple[str, ...]:
        return tuple(OBJECTIVES[o] or self.direction for o in self.objectives)


def load_spec(path: str | Path, overrides: list[str] = ()) -> StudySpec:
    """Read, override (``key.path=value``) and validate a study file."""
    path = Path(path)
    raw = read_study_file(path)
    raw = apply_overrides(raw if raw is not None else {}, overrides)
    return parse_spec(raw, base_dir=path.resolve().parent, source=path)


def apply_overrides(raw: Any, overrides: list[str]) -> dict:
    """``--set budget.n_trials=5`` style overrides; values are read as YAML."""
    if not isinstance(raw, Mapping):
        raise SpecError(
            "", f"a study file must be a mapping at the top level, got {type(raw).__name__}"
        )
    raw = _deep_copy(raw)
    for item in overrides:
        key_path, sep, text = item.partition("=")
        if not sep or not key_path:
            raise BadInputError(f"--set {item!r}: must look like key.path=value")
        value = load_yaml(text, f"--set {item!r}")
        node = raw
        keys = key_path.split(".")
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise SpecError(
                    ".".join(keys[: depth + 1]), "is not a mapping, cannot --set inside it"
                )
            node = child
        node[keys[-1]] = value
    return raw


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, Mapping):
        return {key: _deep_copy(value) for key, value in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(item) for item in raw]
    return raw


TOP_LEVEL = (
    "name",
    "storage",
    "model",
    "task",
    "metric",
    "direction",
    "budget",
    "sampler",
    "pruner",
    "space",
    "seed",
    "resources",
    "export",
    "warm_start",
    "finalize",
    "method",
    "objectives",
)


MAX_NAME = 100  # characters of a study's name; two fit one compare table's file name


def parse_spec(raw: Any, base_dir: Path, source: Path | None = None) -> StudySpec:
    entries = v.mapping(raw, "", TOP_LEVEL, required=["name", "model", "task"])
    name = v.string(
        entries["name"], "name", r"[A-Za-z0-9][A-Za-z0-9_.-]*", "letters, digits, '_', '.' or '-'"
    )
    if len(name) > MAX_NAME:  # the file system's limit is 255 bytes a name
        raise SpecError(
            "name",
            f"must be at most {MAX_NAME} characters: it names the study's files "
            f"({name[:12]}....db, .artifacts/, reports/), got {len(name)}",
        )
    task = _task(entries["task"], "task", base_dir)
    metric = v.choice(entries.get("metric", METRICS_FOR_KIND[task.kind][0]), "metric", METRICS)
    if metric not in METRICS_FOR_KIND[task.kind]:
        raise SpecError(
            "metric",
            f"must be one of {list(METRICS_FOR_KIND[task.kind])} for a "
            f"{task.kind} task, got {metric!r}",
        )
    direction = v.choice(
        entries.get("direction", METRICS[metric]), "direction", ["maximize", "minimize"]
    )
    if direction != METRICS[metric]:
        raise SpecError(
            "direction", f"metric {metric!r} is to {METRICS[metric]}, got {direction!r}"
        )
    budget = _budget(entries.get("budget"), "budget")
    seed = v.integer(entries.get("seed", 42), "seed", minimum=0)
    method = v.choice(entries.get("method", "reft"), "method", METHODS)
    objectives = _objectives(entries.get("objectives", ["score"]), "objectives")
    pareto = len(objectives) > 1
    if pareto and entries.get("finalize") not in (None, False):
        raise SpecError("finalize", "picks one best config: a study with two objectives has none")
    spec = StudySpec(
        name=name,
        storage=_storage(entries.get("storage"), "storage", base_dir, name),
        model=_model(entries["model"], "model", base_dir),
        task=task,
        metric=metric,
        direction=direction,
        budget=budget,
        sampler=_sampler(entries.get("sampler"), "sampler", pareto),
        pruner=_pruner(entries.get("pruner", "none" if pareto else None), "pruner", pareto, metric),
        space=parse_space(entries.get("space"), "space", budget.max_epochs, method),
        seed=seed,
        resources=_resources(entries.get("resources"), "resources", base_dir),
        export_dir=_export(entries.get("export"), "export", base_dir, name),
        warm_start=_warm_start(entries.get("warm_start"), "warm_start", base_dir, method),
        finalize=_finalize(
            entries.get("finalize", None if pareto else "default"), "finalize", budget, seed
        ),
        source=source,
        raw=entries,
        base_dir=base_dir,
        method=method,
        objectives=objectives,
    )
    if spec.sampler.type == "grid":
        grid(spec.space, "space")  # GridSampler takes lists only: a range is refused here
    _refuse_own_warm_start(spec, entries.get("warm_start"))
    return spec


def _refuse_own_warm_start(spec: StudySpec, raw: Any) -> None:
    """A study cannot warm-start from itself: a new one is not there to read when its run
    starts, and an existing one's best configs, enqueued again, would only be copied."""
    paths = _warm_start_paths(raw, "warm_start")
    for source, path in zip(spec.warm_start, paths, strict=True):
        if source.study == spec.name and source.storage in (None, spec.storage):
            raise SpecError(
                v.join(path, "study"),
                f"names this study itself ({spec.name!r}); a warm start takes another study's "
                "best configs (this one resumes where it stopped when run again)",
            )


def _objectives(raw: Any, path: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise SpecError(path, f"must be a list like [score] or [score, n_params], got {raw!r}")
    names = tuple(v.choice(o, v.join(path, i), OBJECTIVES) for i, o in enumerate(raw))
    if names[0] != "score" or len(set(names)) != len(names):
        raise SpecError(
            path, f"must start with score and name each objective once, got {list(names)}"
        )
    return names


def _storage(raw: Any, path: str, base_dir: Path, name: str) -> str:
    if raw is None:
        return _sqlite_url(base_dir, name + ".db")  # a name needs no escaping (see "name")
    url = v.string(raw, path)
    if "://" not in url:
        raise SpecError(
            path,
            f"must be a SQLAlchemy URL like sqlite:///study.db or "
            f"postgresql+psycopg://user@host/db, got {url!r}",
        )
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        # a relative SQLite path is relative to the study file, not to the shell's cwd
        return _sqlite_url(base_dir, url[len("sqlite:///") :])
    return url


def _sqlite_url(folder: Path, relative: str) -> str:
    """The URL of SQLite file ``relative`` (URL text, as written) in ``folder``, whose path is
    escaped where a URL reads it otherwise: in ``/runs/exp?1/``, ``?`` began a query (the
    database went to ``/runs/exp``, shared by every ``exp?N``), and ``pct%41`` read as
    ``pctA``."""
    return f"{URL.create('sqlite', database=str(folder)).render_as_string()}/{relative}"


def _model(raw: Any, path: str, base_dir: Path) -> ModelSpec:
    if isinstance(raw, str):
        raw = {"path": raw}
    entries = v.mapping(raw, path, ["path", "dtype", "device"], required=["path"])
    model_path = v.string(entries["path"], v.join(path, "path"))
    if model_path.startswith((".", "/", "~")):
        model_path = _local_path(model_path, v.join(path, "path"), base_dir)
    dtype = v.choice(entries.get("dtype", "auto"), v.join(path, "dtype"), DTYPES)
    device = v.string(
        entries.get("device", "auto"),
        v.join(path, "device"),
        pattern=r"auto|cpu|cuda(:[0-9]+)?",
        hint="auto, cpu, cuda or cuda:<index>",
    )
    return ModelSpec(model_path, dtype, device)


TASK_KEYS = (
    "kind",
    "data",
    "text",
    "text_pair",
    "label",
    "prompt",
    "response",
    "dev_fraction",
    "max_length",
    "max_train_examples",
    "max_dev_examples",
    "max_new_tokens",
)


def _task(raw: Any, path: str, base_dir: Path) -> TaskSpec:
    entries = v.mapping(raw, path, TASK_KEYS, required=["kind", "data"])
    kind = v.choice(entries["kind"], v.join(path, "kind"), TASK_KINDS)
    columns = {
        key: _column(entries[key], v.join(path, key))
        for key in ("text", "text_pair", "label", "prompt", "response")
        if entries.get(key) is not None
    }
    limits = {
        key: v.integer(entries[key], v.join(path, key), minimum=1)
        for key in ("max_train_examples", "max_dev_examples", "max_length", "max_new_tokens")
        if key in entries
    }
    task = TaskSpec(
        kind=kind,
        data=_data(entries["data"], v.join(path, "data"), base_dir),
        dev_fraction=v.number(
            entries.get("dev_fraction", 0.1),
            v.join(path, "dev_fraction"),
            0,
            1,
            exclusive_min=True,
            exclusive_max=True,
        ),
        **columns,
        **limits,
    )
    _check_one_part_each(task, path)
    return task


def _check_one_part_each(task: TaskSpec, path: str) -> None:
    """A column read as two parts (text and label, prompt and response; defaults count)
    trains a model to copy its input, or scores it on it: refused, naming both keys."""
    parts = (
        ("text", "text_pair", "label") if task.kind == "classification" else ("prompt", "response")
    )
    seen: dict[str, str] = {}
    for key in parts:
        column = getattr(task, key)
        if column is None:
            continue
        if column in seen:
            raise SpecError(
                v.join(path, key),
                f"names column {column!r}, which {v.join(path, seen[column])} names too "
                "(given or by default): each column is read as one part only",
            )
        seen[column] = key


def _column(raw: Any, path: str) -> str:
    """A column name, or a column's 0-based index in a file without a header."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(v.integer(raw, path, minimum=0))
    return v.string(raw, path)


# what read_options passes on to the CSV reader (pandas.read_csv), and nothing else
READ_OPTIONS = ("sep", "delimiter", "quoting", "encoding")
QUOTING = {  # read_options.quoting: the csv module's constants
    csv.QUOTE_MINIMAL: "QUOTE_MINIMAL",
    csv.QUOTE_ALL: "QUOTE_ALL",
    csv.QUOTE_NONNUMERIC: "QUOTE_NONNUMERIC",
    csv.QUOTE_NONE: "QUOTE_NONE",
}


def _local_path(raw: str, path: str, base_dir: Path) -> str:
    """``raw`` as an absolute path, relative to the study file. One the system cannot look
    up (an unknown ~user, a symlink loop, a NUL byte, a name too long) is refused here: the
    readers would fail on it with a traceback."""
    try:
        named = Path(raw).expanduser()
    except RuntimeError:  # Python's "Could not determine home directory" names no one
        raise SpecError(path, f"{raw.partition('/')[0]}: no such user") from None
    try:
        resolved = (base_dir / named).resolve()
        resolved.exists()  # raises for a name too long, which resolve() lets through
    except (OSError, RuntimeError, ValueError) as err:  # ValueError: a NUL byte
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise SpecError(path, f"cannot be looked up as a path: {reason}") from None
    return str(resolved)


def _data(raw: Any, path: str, base_dir: Path) -> DataSpec:
    if isinstance(raw, str):
        raw = (
            {"builtin": raw.removeprefix("builtin:")}
            if raw.startswith("builtin:")
            else {"train": raw}
        )
    entries = v.mapping(
        raw,
        path,
        [*SPLITS, "builtin", "hub", "hub_config", "read_options", "header", "columns"],
    )
    splits = {
        s: v.string(entries[s], v.join(path, s)) for s in SPLITS if entries.get(s) is not None
    }
    if "builtin" in entries:
        if set(entries) != {"builtin"}:
            raise SpecError(path, "builtin data comes with its own splits: give builtin alone")
        return DataSpec(builtin=v.string(entries["builtin"], v.join(path, "builtin")))
    hub = entries.get("hub")
    if hub is None:
        if "train" not in splits:
            raise SpecError(
                v.join(path, "train"), "is required (a file, a directory, or a split of data.hub)"
            )
        # local files are relative to the study file
        splits = {s: _local_path(p, v.join(path, s), base_dir) for s, p in splits.items()}
    else:
        splits.setdefault("train", "train")
    read_options = _read_options(entries.get("read_options"), v.join(path, "read_options"))
    header, columns = _header(entries, path, hub is not None)
    return DataSpec(
        **splits,
        hub=v.string(hub, v.join(path, "hub")) if hub is not None else None,
        hub_config=(
            v.string(entries["hub_config"], v.join(path, "hub_config"))
            if entries.get("hub_config") is not None
            else None
        ),
        read_options=read_options,
        header=header,
        columns=columns,
    )


def _read_options(raw: Any, path: str) -> dict[str, Any]:
    """Checked here, as pandas and the csv module would fail on a wrong type with a
    traceback, and on ``quoting: QUOTE_NONE`` (a name, not the number) too."""
    entries = v.mapping(raw, path, READ_OPTIONS)
    if "sep" in entries and "delimiter" in entries:
        raise SpecError(path, "give sep or delimiter (the same option), not both")
    for key in ("sep", "delimiter", "encoding"):
        if key in entries:
            v.string(entries[key], v.join(path, key))
    quoting = entries.get("quoting", csv.QUOTE_MINIMAL)
    if isinstance(quoting, bool) or not isinstance(quoting, int) or quoting not in QUOTING:
        choices = ", ".join(f"{number} ({name})" for number, name in QUOTING.items())
        raise SpecError(v.join(path, "quoting"), f"must be one of {choices}, got {quoting!r}")
    if "encoding" in entries and not _text_encoding(entries["encoding"]):
        raise SpecError(
            v.join(path, "encoding"),
            f"must be a text encoding Python knows, like utf-8 or latin-1, "
            f"got {entries['encoding']!r}",
        )
    return entries


def _text_encoding(name: str) -> bool:
    """Whether ``name`` is a codec that turns bytes into text: Python's codecs also hold
    str-to-str and bytes-to-bytes ones (rot13, base64, zlib), which a CSV reader fails on."""
    try:
        return codecs.lookup(name)._is_text_encoding
    except LookupError:
        return False


def _header(entries: dict, path: str, hub: bool) -> tuple[bool, tuple[str, ...] | None]:
    header = v.boolean(entries.get("header", True), v.join(path, "header"))
    raw = entries.get("columns")
    if (not header or raw is not None) and hub:
        raise SpecError(v.join(path, "header" if not header else "columns"), "only for files")
    if raw is None:
        return header, None
    if header:
        raise SpecError(
            v.join(path, "columns"), "names the columns of a file without one: set header: false"
        )
    if not isinstance(raw, list) or not raw:
        raise SpecError(v.join(path, "columns"), f"must be a list of column names, got {raw!r}")
    names = tuple(v.string(name, v.join(v.join(path, "columns"), i)) for i, name in enumerate(raw))
    if len(set(names)) != len(names):
        raise SpecError(v.join(path, "columns"), f"names a column twice: {list(names)}")
    return header, names


def _budget(raw: Any, path: str) -> BudgetSpec:
    entries = v.mapping(raw, path, ["n_trials", "timeout", "max_epochs"])
    timeout = entries.get("timeout")
    return BudgetSpec(
        n_trials=v.integer(entries.get("n_trials", 20), v.join(path, "n_trials"), minimum=1),
        timeout=v.duration(timeout, v.join(path, "timeout")) if timeout is not None else None,
        max_epochs=v.integer(entries.get("max_epochs", 3), v.join(path, "max_epochs"), minimum=1),
    )


def _sampler(raw: Any, path: str, pareto: bool) -> SamplerSpec:
    if isinstance(raw, str):
        raw = {"type": raw}
    entries = v.mapping(raw, path, ["type", "seed", "n_startup_trials"])
    seed = entries.get("seed")
    kind = v.choice(entries.get("type", "tpe"), v.join(path, "type"), SAMPLERS)
    if pareto and kind == "cmaes":
        raise SpecError(
            v.join(path, "type"), "cmaes cannot search two objectives: use nsga2 or tpe"
        )
    return SamplerSpec(
        type=kind,
        seed=v.integer(seed, v.join(path, "seed"), minimum=0) if seed is not None else None,
        n_startup_trials=v.integer(
            entries.get("n_startup_trials", 5), v.join(path, "n_startup_trials"), minimum=0
        ),
    )


def _pruner(raw: Any, path: str, pareto: bool, metric: str) -> PrunerSpec:
    if isinstance(raw, str):
        raw = {"type": raw}
    entries = v.mapping(
        raw,
        path,
        [
            "type",
            "min_resource",
            "reduction_factor",
            "n_startup_trials",
            "resource",
            "min_fraction",
            "p_threshold",
        ],
    )
    kind = v.choice(entries.get("type", "hyperband"), v.join(path, "type"), PRUNERS)
    if pareto and kind != "none":
        # Trial.report raises in multi-objective studies (optuna RFC #3450)
        raise SpecError(
            v.join(path, "type"),
            f"Optuna cannot prune a study with two objectives: must be none, got {kind!r}",
        )
    reduction_factor = v.integer(
        entries.get("reduction_factor", 3), v.join(path, "reduction_factor"), minimum=2
    )
    resource = v.choice(
        entries.get("resource", "epochs"), v.join(path, "resource"), PRUNER_RESOURCES
    )
    _only_with(entries, path, "resource", kind in ("successive_halving", "hyperband"), kind)
    _only_with(entries, path, "p_threshold", kind == "wilcoxon", kind)
    if kind == "wilcoxon" and metric not in PER_EXAMPLE:
        raise SpecError(
            v.join(path, "type"),
            "wilcoxon compares trials example by example: it needs a metric that is the share "
            f"of dev examples right, one of {sorted(PER_EXAMPLE)}, got {metric!r}",
        )
    if "min_fraction" in entries and resource != "data_fraction":
        raise SpecError(v.join(path, "min_fraction"), "only with resource: data_fraction")
    if "min_resource" in entries and resource == "data_fraction":
        raise SpecError(
            v.join(path, "min_resource"),
            "counts epochs; with resource: data_fraction give min_fraction instead",
        )
    return PrunerSpec(
        type=kind,
        min_resource=v.integer(entries.get("min_resource", 1), v.join(path, "min_resource"), 1),
        reduction_factor=reduction_factor,
        n_startup_trials=v.integer(
            entries.get("n_startup_trials", 3), v.join(path, "n_startup_trials"), minimum=0
        ),
        resource=resource,
        min_fraction=v.number(
            entries.get("min_fraction", 0.1),
            v.join(path, "min_fraction"),
            0,
            1 / reduction_factor,  # at least one rung below the whole train split
            exclusive_min=True,
        ),
        p_threshold=v.number(
            entries.get("p_threshold", 0.1), v.join(path, "p_threshold"), 0, 1, exclusive_min=True
        ),
    )


def _only_with(entries: dict, path: str, key: str, allowed: bool, kind: str) -> None:
    if key in entries and not allowed:
        raise SpecError(v.join(path, key), f"does not apply to pruner type {kind!r}")


def _resources(raw: Any, path: str, base_dir: Path) -> ResourcesSpec:
    keys = ["workers", "cpus_per_trial", "gpus_per_trial", "heartbeat_s", "cache_mb"]
    disk = ["spill_mb", "spill_dir", "store_mb", "store_dir"]
    others = ["trials_per_worker", "memory_mb", "threads"]
    entries = v.mapping(raw, path, [*keys, *others, *disk])
    memory_mb = entries.get("memory_mb")
    return ResourcesSpec(
        workers=v.integer(entries.get("workers", 1), v.join(path, "workers"), minimum=1),
        cpus_per_trial=v.number(
            entries.get("cpus_per_trial", 1), v.join(path, "cpus_per_trial"), 0, exclusive_min=True
        ),
        gpus_per_trial=v.number(
            entries.get("gpus_per_trial", 0), v.join(path, "gpus_per_trial"), 0
        ),
        heartbeat_s=v.integer(entries.get("heartbeat_s", 60), v.join(path, "heartbeat_s"), 1),
        cache_mb=v.number(entries.get("cache_mb", 2048), v.join(path, "cache_mb"), 0),
        trials_per_worker=_trials_per_worker(
            entries.get("trials_per_worker", 1), v.join(path, "trials_per_worker")
        ),
        spill_mb=v.number(entries.get("spill_mb", 0), v.join(path, "spill_mb"), 0),
        spill_dir=_folder(entries, path, "spill_dir", base_dir),
        store_mb=v.number(entries.get("store_mb", 10240), v.join(path, "store_mb"), 0),
        store_dir=_folder(entries, path, "store_dir", base_dir),
        memory_mb=None
        if memory_mb is None
        else v.number(memory_mb, v.join(path, "memory_mb"), 0, exclusive_min=True),
        threads=_threads(entries.get("threads", "auto"), v.join(path, "threads")),
    )


def _folder(entries: dict, path: str, key: str, base_dir: Path) -> str | None:
    """A folder named by ``key``, relative to the study file (as data paths are)."""
    if entries.get(key) is None:
        return None
    return _local_path(v.string(entries[key], v.join(path, key)), v.join(path, key), base_dir)


def _threads(raw: Any, path: str) -> int | None:
    if raw == "auto":
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise SpecError(path, f"must be a positive integer or 'auto', got {raw!r}")
    return raw


def _trials_per_worker(raw: Any, path: str) -> int | Literal["auto"]:
    if raw == "auto":
        return raw
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise SpecError(path, f"must be a positive integer or 'auto', got {raw!r}")
    return raw


def _export(raw: Any, path: str, base_dir: Path, name: str) -> str:
    entries = v.mapping(raw, path, ["dir"])
    directory = entries.get("dir")
    if directory is None:
        return str(base_dir / "exports" / name)
    return _local_path(v.string(directory, v.join(path, "dir")), v.join(path, "dir"), base_dir)


def _warm_start(raw: Any, path: str, base_dir: Path, method: str) -> tuple[WarmStartSpec, ...]:
    if raw is None:
        return ()
    items = raw if isinstance(raw, list) else [raw]
    paths = _warm_start_paths(raw, path)
    return tuple(
        _one_warm_start(item, p, base_dir, method) for item, p in zip(items, paths, strict=True)
    )


def _warm_start_paths(raw: Any, path: str) -> list[str]:
    """Each warm start's key path: ``warm_start[i]`` in a list, ``warm_start`` for one alone."""
    if raw is None:
        return []
    return [v.join(path, i) for i in range(len(raw))] if isinstance(raw, list) else [path]


def _one_warm_start(raw: Any, path: str, base_dir: Path, method: str) -> WarmStartSpec:
    entries = v.mapping(raw, path, ["recipes", "study", "storage", "top_k"])
    if ("recipes" in entries) == ("study" in entries):
        raise SpecError(
            path,
            "must name either recipes (e.g. {recipes: paper}) or a study "
            "({study: NAME, storage: URL, top_k: K})",
        )
    if "recipes" in entries:
        if set(entries) != {"recipes"}:
            raise SpecError(path, "recipes takes no other keys")
        if method != "reft":
            raise SpecError(
                v.join(path, "recipes"),
                f"the paper's recipes are ReFT configs; this study's method is {method!r}",
            )
        return WarmStartSpec(
            recipes=v.choice(entries["recipes"], v.join(path, "recipes"), WARM_START_RECIPES)
        )
    storage = entries.get("storage")
    return WarmStartSpec(
        study=v.string(entries["study"], v.join(path, "study")),
        storage=(
            _storage(storage, v.join(path, "storage"), base_dir, "")
            if storage is not None
            else None
        ),
        top_k=v.integer(entries.get("top_k", 3), v.join(path, "top_k"), minimum=1),
    )


def _finalize(raw: Any, path: str, budget: BudgetSpec, seed: int) -> FinalizeSpec | None:
    """Default: on for studies of >= 20 trials (top 3 configs, each on 2 more seeds)."""
    default = FinalizeSpec(top_k=3, seeds=(seed + 1, seed + 2))
    if raw == "default":
        return default if budget.n_trials >= FINALIZE_DEFAULT_MIN_TRIALS else None
    if raw is False or raw is None:
        return None
    entries = v.mapping(raw, path, ["top_k", "seeds"])
    seeds = entries.get("seeds", list(default.seeds))
    if not isinstance(seeds, list) or not seeds:
        raise SpecError(v.join(path, "seeds"), f"must be a non-empty list of seeds, got {seeds!r}")
    checked = tuple(
        v.integer(s, v.join(v.join(path, "seeds"), i), minimum=0) for i, s in enumerate(seeds)
    )
    if seed in checked or len(set(checked)) != len(checked):
        raise SpecError(
            v.join(path, "seeds"),
            f"must be distinct extra seeds, other than the study seed {seed}, got {list(checked)}",
        )
    top_k = v.integer(entries.get("top_k", default.top_k), v.join(path, "top_k"), minimum=1)
    return FinalizeSpec(top_k=top_k, seeds=checked)
