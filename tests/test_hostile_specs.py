"""Malformed and hostile study files: every one exits 2 at ``validate`` (and at ``run``) with
a message naming its key, and leaves the storage exactly as it was.

The corpus is generated from the shipped studies: every key gets a wrong type, values out of
range (negative, NaN, infinite, past 64 bits), an unknown name, a duplicate; every mapping an
unknown key; every required key is removed. It runs in-process (``cli.main``); a few real
subprocesses check the command line itself and that ``validate`` never imports torch, so it
cannot have loaded a model's weights. Times are printed, never asserted (a shared machine).
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from reftsearch.cli import main
from reftsearch.models.builtin import BUILTIN_MODELS
from reftsearch.models.sources import BUILTIN_CONFIGS, read_shape
from reftsearch.spec.readers import join
from reftsearch.spec.yaml_file import MAX_BYTES, MAX_DEPTH, MAX_NODES, load_yaml

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "studies").rglob("*.yaml"))  # studies/compare/ too
REFTSEARCH = [sys.executable, "-m", "reftsearch.cli"]

# keys whose values are floats (an integer there is a float too): no upper bound to pass
FLOAT_KEYS = {
    "lr", "dropout", "warmup_ratio", "weight_decay", "alpha", "dev_fraction", "timeout",
    "min_fraction", "p_threshold", "cpus_per_trial", "gpus_per_trial", "cache_mb", "spill_mb",
    "store_mb", "memory_mb",
}  # fmt: skip
# keys whose values are names from a fixed list
CHOICE_KEYS = {
    "kind", "metric", "direction", "type", "intervention", "recipes", "dtype", "resource",
    "method", "objectives",
}  # fmt: skip
REQUIRED = {("name",), ("model",), ("task",), ("task", "kind"), ("task", "data")}


class Pairs(list):
    """A mapping written as its (key, value) pairs, so that a key can appear twice."""


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):
    pass


_Dumper.add_representer(Pairs, lambda d, pairs: d.represent_mapping("tag:yaml.org,2002:map", pairs))


def walk(node, keys=()):
    yield keys, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, (*keys, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, (*keys, i))


def key_path(keys) -> str:
    path = ""
    for key in keys:
        path = join(path, key)
    return path


def replaced(raw, keys, value):
    if not keys:
        return value
    raw = copy.deepcopy(raw)
    node = raw
    for key in keys[:-1]:
        node = node[key]
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return raw


DELETE = object()


def variants(raw: dict):
    """(label, changed study, key path the error must name, text it must hold)."""
    for keys, value in walk(raw):
        path = key_path(keys)
        name = next((k for k in reversed(keys) if isinstance(k, str)), "")
        if keys:
            yield "wrong type", replaced(raw, keys, [[]]), path, ""
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if numeric:
            for bad in (-1, math.nan, math.inf, -math.inf):
                yield f"value {bad}", replaced(raw, keys, bad), path, ""
            if isinstance(value, int) and name not in FLOAT_KEYS:
                yield "past 64 bits", replaced(raw, keys, 2**63), path, "<= 2147483647"
        if isinstance(value, str) and name in CHOICE_KEYS:
            yield "unknown name", replaced(raw, keys, "no_such_name"), path, "must be one of"
        if isinstance(value, dict):
            unknown = {**value, "no_such_key": 1}
            yield "unknown key", replaced(raw, keys, unknown), join(path, "no_such_key"), ""
            for key in value:
                twice = Pairs([*value.items(), (key, value[key])])
                yield "duplicated", replaced(raw, keys, twice), join(path, key), "given twice"
            for end in ("low", "high"):
                if keys[:1] == ("space",) and end in value:
                    yield f"no {end}", replaced(raw, (*keys, end), DELETE), join(path, end), ""
        if isinstance(value, list) and value:
            yield "listed twice", replaced(raw, keys, [*value, value[0]]), path, ""
        if keys in REQUIRED:
            yield "removed", replaced(raw, keys, DELETE), path, "is required"


@pytest.fixture
def stored(tmp_path):
    """A real SQLite study file: its bytes must never change, and no other file appear."""
    store = tmp_path / "store"
    store.mkdir()
    db = store / "kept.db"
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="kept")
    study.enqueue_trial({"x": 1})
    return db, db.read_bytes()


def run_cli(argv, capsys) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    seconds = time.perf_counter() - start
    return code, capsys.readouterr().err, seconds


def test_generated_corpus_exits_2_naming_the_key_and_keeps_storage(tmp_path, stored, capsys):
    db, before = stored
    folder = tmp_path / "variants"
    folder.mkdir()
    results = []  # (study, label, key path, code, stderr, seconds)
    for study in STUDIES:
        raw = yaml.safe_load(study.read_text())
        raw["storage"] = f"sqlite:///{db}"
        for i, (label, changed, path, needle) in enumerate(variants(raw)):
            file = folder / f"{study.stem}-{i}.yaml"
            file.write_text(yaml.dump(changed, Dumper=_Dumper, sort_keys=False))
            commands = [["validate", str(file)]]
            if study.stem == "tiny":  # run too (a spec that passed would load a model)
                commands.append(["run", str(file)])
            for argv in commands:
                code, err, seconds = run_cli(argv, capsys)
                results.append((study.stem, label, path, needle, argv[0], code, err, seconds))

    wrong = [r for r in results if r[5] != 2 or r[2] not in r[6] or r[3] not in r[6]]
    assert not wrong, "\n".join(f"{r[:5]} -> exit {r[5]}: {r[6].strip()}" for r in wrong[:20])
    assert len({(r[0], r[1], r[2]) for r in results}) >= 200
    assert db.read_bytes() == before
    assert sorted(p.name for p in db.parent.iterdir()) == ["kept.db"]
    assert not list(folder.glob("*.db")), "a study file's default storage was created"
    slowest = max(results, key=lambda r: r[-1])
    median = sorted(r[-1] for r in results)[len(results) // 2]
    print(
        f"\n{len(results)} commands on {len({r[:3] for r in results})} variants: median "
        f"{median * 1000:.1f} ms, slowest {slowest[-1] * 1000:.1f} ms ({slowest[4]} "
        f"{slowest[0]}: {slowest[1]} at {slowest[2]})"
    )


def hostile_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files no YAML-reading code should choke on: name -> (file, what the error says)."""
    tiny = (REPO / "studies" / "tiny.yaml").read_text()
    laughs = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for new, old in zip("bcdefghi", "abcdefgh", strict=True):
        laughs += f"{new}: &{new} [{','.join([f'*{old}'] * 9)}]\n"
    texts = {
        "billion laughs": (laughs.encode(), f"expands to over {MAX_NODES} values"),
        "recursive alias": (b"name: &x [*x]\n", "name[0]: alias *x refers to a value"),
        "recursive mapping": (b"task: &t {data: *t}\n", "task.data: alias *t"),
        "deep flow": (b"name: " + b"[" * 5000 + b"]" * 5000, "deep-flow.yaml"),
        "deep": (b"name: " + b"[" * 40 + b"]" * 40, f"nested over {MAX_DEPTH} levels"),
        "deep block": (
            "\n".join(" " * i + "k:" for i in range(MAX_DEPTH + 5)).encode() + b" 1\n",
            f"nested over {MAX_DEPTH} levels",
        ),
        "UTF-16": (tiny.encode("utf-16"), "is not UTF-8 text"),
        "binary": (bytes(range(256)) * 8, "is not UTF-8 text"),
        "latin-1": (tiny.replace("sentiment", "sentiment\xe9").encode("latin-1"), "not UTF-8"),
        "oversized": (b"# padding\n" * (MAX_BYTES // 10 + 1), f"over {MAX_BYTES // 1024} KiB"),
        "duplicate key": (
            tiny.replace("seed: 7", "seed: 7\nseed: 8").encode(),
            "seed: given twice (lines 14 and 15)",
        ),
        "duplicate in flow": (
            tiny.replace("{n_trials: 6,", "{n_trials: 6, n_trials: 600,").encode(),
            "budget.n_trials: given twice (line 15)",
        ),
        "two documents": (tiny.encode() + b"---\nname: other\n", "not valid YAML"),
        "control character": (tiny.replace("tiny:llama", "tiny:\x07llama").encode(), "YAML"),
        "not a mapping": (b"- just\n- a list\n", "must be a mapping at the top level"),
        "empty": (b"", "name: is required"),
        "python tag": (
            tiny.replace("seed: 7", "seed: !!python/object:os.system x").encode(),
            "YAML",
        ),
        "binary tag": (tiny.replace("name: tiny", "name: !!binary aGk=").encode(), "name: must"),
        "set tag": (tiny.replace("rank: [1, 2, 4]", "rank: !!set {1, 2}").encode(), "space.rank"),
        "a long name": (
            tiny.replace("name: tiny", "name: " + "n!" * 50_000).encode(),
            "characters)",
        ),
        "a long integer": (tiny.replace("seed: 7", "seed: " + "9" * 4000).encode(), "4000 digits"),
        "a huge integer": (tiny.replace("seed: 7", "seed: " + "9" * 5000).encode(), "4300 digits"),
    }
    files = {}
    for name, (data, needle) in texts.items():
        path = folder / (name.replace(" ", "-") + ".yaml")
        path.write_bytes(data)
        files[name] = (path, needle)
    return files


def test_hostile_files_exit_2_and_keep_storage(tmp_path, stored, capsys):
    db, before = stored
    slowest = 0.0
    for name, (path, needle) in hostile_files(tmp_path).items():
        for argv in (["validate", str(path)], ["run", str(path), "--storage", f"sqlite:///{db}"]):
            code, err, seconds = run_cli(argv, capsys)
            assert code == 2 and needle in err, (name, argv[0], err)
            slowest = max(slowest, seconds)
    assert db.read_bytes() == before and sorted(os.listdir(db.parent)) == ["kept.db"]
    print(f"\nslowest hostile file: {slowest * 1000:.1f} ms")


TINY = str(REPO / "studies" / "tiny.yaml")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--set", "space.dropout=.nan"], "space.dropout: must be a number >= 0 and < 1 (finite)"),
        (["--set", "space.lr=.inf"], "space.lr: must be a number > 0 (finite), got inf"),
        (["--set", "space.weight_decay=.inf"], "space.weight_decay: must be a number >= 0"),
        (["--set", "space.lr={low: .nan, high: 1}"], "space.lr.low: must be a number > 0"),
        (["--set", "budget.timeout=.inf"], "budget.timeout: must be a positive duration"),
        (["--set", "seed=4294967296"], "seed: must be a non-negative integer <= 2147483647"),
        (["--set", "sampler.seed=4294967296"], "sampler.seed: must be a non-negative integer <="),
        (["--set", "space.batch_size=1e18"], "space.batch_size: must be a positive integer"),
        (
            ["--set", "space.batch_size=1000000000000000000"],
            "space.batch_size: must be a positive integer <= 2147483647",
        ),
        (["--set", "task.max_length=1e30"], "task.max_length: must be a positive integer"),
        (["--set", "task.max_length=600"], "task.max_length: must be <= 512, the positions"),
        (["--set", "sampler.type=grid"], "space.prefix: sampler.type 'grid' needs a list"),
        (["--set", "space.layers=2;4"], "space.layers: layer 4 does not exist in a model with 4"),
        (["--set", "space.rank=64"], "space.rank: must be below the hidden size 64"),
        (["--set", "model=tiny:gpt"], "model.path: tiny:gpt: unknown built-in model"),
        (["--set", "model=./no-such-model"], "no-such-model: no such model directory"),
        (["--set", "space.lr=&a [*a]"], "alias *a refers to a value that contains it"),
        (["--storage", ""], "argument --storage: must be a storage URL, got an empty string"),
        (
            ["--set", "warm_start={study: other, storage: ''}"],
            "warm_start.storage: must be a non-empty string, got ''",
        ),
    ],
)
def test_hostile_values_exit_2_at_validate_and_run(argv, needle, tmp_path, stored, capsys):
    db, before = stored
    commands = [["run", TINY, *argv]]
    if argv[0] != "--storage":  # validate takes no storage
        commands = [["validate", TINY, *argv], ["run", TINY, "--storage", f"sqlite:///{db}", *argv]]
    for command in commands:
        code, err, _ = run_cli(command, capsys)
        assert code == 2 and needle in err, (command, err)
    assert db.read_bytes() == before and sorted(os.listdir(db.parent)) == ["kept.db"]
    assert not (REPO / "studies" / "tiny.db").exists()


def test_exponent_without_a_dot_is_a_number(capsys):
    code, err, _ = run_cli(["validate", TINY, "--set", "space.lr=1e-3"], capsys)
    assert code == 0, err
    code, err, _ = run_cli(["validate", TINY, "--set", "space.lr=[1e-3, 2E-2, +5e-4]"], capsys)
    assert code == 0, err


def test_numbers_are_read_as_yaml_1_2_reads_them(capsys):
    """PyYAML (YAML 1.1) read ``010`` as octal 8 and ``1:30`` as 90 (base 60), silently."""
    text = "a: 010\nb: 0o10\nc: 1_000\nd: -007\ne: 0x1F\nf: .5\ng: 1:30\nh: 1e-3\ni: 2.5e+1"
    assert load_yaml(text, "t") == dict(
        a=10, b=8, c=1000, d=-7, e=31, f=0.5, g="1:30", h=1e-3, i=25.0
    )
    code, err, _ = run_cli(["validate", TINY, "--set", "budget.timeout=1:30"], capsys)
    assert code == 2 and "budget.timeout: must be a positive duration" in err, err
    assert "got '1:30'" in err
    code, err, _ = run_cli(["validate", TINY, "--set", "seed=010"], capsys)
    assert code == 0, err


def test_compare_and_worker_refuse_a_zero_budget_and_a_bad_timeout(tmp_path, capsys):
    """0 trials once fell back to the default budget (``args.n_trials or default``)."""
    zero = "--n-trials: must be a positive integer, got 0"
    for argv, needle in (
        (["compare", TINY, TINY, "--n-trials=0"], zero),
        (["compare", TINY, TINY, "--timeout=nan"], "--timeout: must be a positive number"),
        (["compare", TINY, TINY, "--timeout=-5"], "--timeout: must be a positive number"),
        (["worker", "--storage", f"sqlite:///{tmp_path}/w.db", "--study=x", "--n-trials=0"], zero),
    ):
        code, err, _ = run_cli(argv, capsys)
        assert code == 2 and needle in err, err
    assert list(tmp_path.iterdir()) == []


def test_validate_reads_configs_not_weights(tmp_path):
    """In a fresh process, validating every shipped study (tiny, MiniLM, SmolLM2) imports
    neither torch nor transformers: no weights can have been read. A missing model is exit 2,
    and hostile files are refused by the real command line."""
    script = (
        "import sys; from reftsearch.cli import main; "
        f"code = main(['validate', *{[str(s) for s in STUDIES]!r}]); "
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules)); "
        "sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(), check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert done.stdout.count(": ok (") == len(STUDIES)

    files = hostile_files(tmp_path)
    for name in ("billion laughs", "deep block", "UTF-16", "oversized"):
        path, needle = files[name]
        start = time.perf_counter()
        done = subprocess.run(
            [*REFTSEARCH, "validate", str(path)], capture_output=True, text=True, env=_env()
        )
        print(f"\n{name}: exit {done.returncode} in {time.perf_counter() - start:.2f} s")
        assert done.returncode == 2 and needle in done.stderr


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_every_builtin_model_has_a_config():
    """``read_shape`` knows the built-in names the loader knows (builtin.py imports torch)."""
    assert sorted(BUILTIN_CONFIGS) == sorted(BUILTIN_MODELS)


def test_tiny_shapes_match_the_built_models():
    from reftsearch.models.base import load_base_model

    for name in ("tiny:llama", "tiny:bert"):
        base = load_base_model(name, "classification")
        shape = read_shape(name)
        assert (shape.num_layers, shape.hidden_size) == (base.num_layers, base.hidden_size)
        assert shape.max_positions == base.model.config.max_position_embeddings


@pytest.mark.slow
def test_minilm_shape_matches_the_loaded_model():
    from reftsearch.models.base import load_base_model

    base = load_base_model("embedded:minilm", "classification")
    shape = read_shape("embedded:minilm")
    assert (shape.num_layers, shape.hidden_size) == (base.num_layers, base.hidden_size) == (6, 384)
    assert shape.max_positions == base.model.config.max_position_embeddings


@pytest.mark.slow
def test_smollm2_shape_comes_from_the_gguf_without_converting_it(tmp_path, monkeypatch):
    """With an empty cache, SmolLM2's shape is read from its GGUF file's metadata, and the
    cache stays empty: validating converts no weights. It equals the converted model's."""
    from reftsearch.models.base import load_base_model

    monkeypatch.setenv("REFTSEARCH_CACHE", str(tmp_path))
    shape = read_shape("embedded:smollm2")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delenv("REFTSEARCH_CACHE")
    base = load_base_model("embedded:smollm2", "causal_lm")
    assert (shape.num_layers, shape.hidden_size) == (base.num_layers, base.hidden_size) == (30, 576)
    assert shape.max_positions == base.model.config.max_position_embeddings == 8192
    assert read_shape("embedded:smollm2") == shape  # from the converted copy's config.json
