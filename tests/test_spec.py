from pathlib import Path

import pytest
import yaml

from reftsearch.errors import BadInputError, SpecError
from reftsearch.spec.space import Choice, Fixed, FloatRange, IntRange, parse_layers
from reftsearch.spec.study_file import load_spec, parse_spec

STUDIES_DIR = Path(__file__).parents[1] / "studies"
STUDIES = sorted(STUDIES_DIR.rglob("*.yaml"))  # studies/compare/ too


def minimal(**changes):
    raw = {
        "name": "t",
        "model": "tiny:llama",
        "task": {"kind": "classification", "data": "builtin:sentiment"},
    }
    raw.update(changes)
    return raw


def parse(raw, tmp_path=Path("/tmp")):
    return parse_spec(raw, base_dir=tmp_path)


def error_of(raw) -> str:
    with pytest.raises(SpecError) as info:
        parse(raw)
    return str(info.value)


@pytest.mark.parametrize("path", STUDIES, ids=[str(p.relative_to(STUDIES_DIR)) for p in STUDIES])
def test_every_shipped_study_validates(path):
    spec = load_spec(path)
    assert spec.name == yaml.safe_load(path.read_text())["name"]


def test_defaults_and_fixed_versus_searched(tmp_path):
    spec = parse(
        minimal(
            space={"rank": [1, 4], "lr": {"low": 1e-4, "high": 1e-2, "log": True}, "prefix": 2}
        ),
        tmp_path,
    )
    assert spec.metric == "accuracy" and spec.direction == "maximize"
    assert spec.storage == f"sqlite:///{tmp_path / 't.db'}"
    assert spec.space["rank"] == Choice((1, 4))
    assert spec.space["lr"] == FloatRange(1e-4, 1e-2, True)
    assert spec.space["prefix"] == Fixed(2)
    assert spec.space["epochs"] == Fixed(spec.budget.max_epochs)


def test_int_range_and_choices_mapping(tmp_path):
    spec = parse(
        minimal(
            space={
                "suffix": {"low": 0, "high": 6, "step": 2},
                "layers": {"choices": ["all", "1;3"]},
            }
        ),
        tmp_path,
    )
    assert spec.space["suffix"] == IntRange(0, 6, False, 2)
    assert spec.space["layers"] == Choice(("all", "1;3"))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"space": {"rank": [1, 4, -1]}}, "space.rank[2]: must be a positive integer, got -1"),
        (
            {"pruner": {"type": "x"}},
            "pruner.type: must be one of ['hyperband', 'median', 'none', 'successive_halving', "
            "'wilcoxon'], got 'x'",
        ),
        ({"sampler": "annealing"}, "sampler.type: must be one of"),
        ({"space": {"rnk": 4}}, "space.rnk: unknown key"),
        ({"bogus": 1}, "bogus: unknown key"),
        ({"space": {"lr": {"low": 1e-2, "high": 1e-4}}}, "space.lr.high: must be >= low"),
        (
            {"space": {"lr": {"low": 0.0, "high": 1e-2, "log": True}}},
            "space.lr.low: must be a number > 0",
        ),
        ({"space": {"dropout": 1.5}}, "space.dropout: must be a number >= 0 and < 1, got 1.5"),
        ({"space": {"layers": "2;x"}}, "space.layers: must be 'all' or layer indices"),
        ({"space": {"layers": {"low": 1, "high": 3}}}, "space.layers: must be a value or a list"),
        ({"space": {"tied": "yes"}}, "space.tied: must be true or false, got 'yes'"),
        ({"space": {"epochs": [1, 5]}}, "space.epochs: must be <= budget.max_epochs (3), got 5"),
        ({"space": {"prefix": 0, "suffix": 0}}, "space.prefix: prefix and suffix are both 0"),
        (
            {"metric": "exact_match"},
            "metric: must be one of ['accuracy', 'f1', 'matthews', 'loss']",
        ),
        ({"metric": "loss", "direction": "maximize"}, "direction: metric 'loss' is to minimize"),
        ({"budget": {"n_trials": 0}}, "budget.n_trials: must be a positive integer, got 0"),
        ({"budget": {"timeout": "soon"}}, "budget.timeout: must be a positive duration"),
        ({"model": {"path": "tiny:llama", "dtype": "int8"}}, "model.dtype: must be one of"),
        (
            {"model": {"path": "tiny:llama", "device": "gpu"}},
            "model.device: must be auto, cpu, cuda or cuda:<index>, got 'gpu'",
        ),
        ({"task": {"kind": "regression", "data": "x.csv"}}, "task.kind: must be one of"),
        ({"task": {"kind": "classification"}}, "task.data: is required"),
        (
            {"task": {"kind": "classification", "data": {"dev": "d.csv"}}},
            "task.data.train: is required",
        ),
        ({"storage": "not a url"}, "storage: must be a SQLAlchemy URL"),
        ({"resources": {"spill_mb": -1}}, "resources.spill_mb: must be a number >= 0, got -1"),
        ({"resources": {"spill_dir": 3}}, "resources.spill_dir: must be a non-empty string"),
        ({"resources": {"store_mb": -1}}, "resources.store_mb: must be a number >= 0, got -1"),
        ({"resources": {"store_dir": ""}}, "resources.store_dir: must be a non-empty string"),
        (
            {"resources": {"trials_per_worker": "max"}},
            "resources.trials_per_worker: must be a positive integer or 'auto', got 'max'",
        ),
        (
            {"resources": {"trials_per_worker": 0}},
            "resources.trials_per_worker: must be a positive integer or 'auto', got 0",
        ),
        ({"name": "bad name!"}, "name: must be letters, digits"),
        ({"name": "n" * 101}, "name: must be at most 100 characters: it names the study's files"),
    ],
)
def test_errors_name_the_key_path(changes, expected):
    assert expected in error_of(minimal(**changes))


def test_trials_per_worker_is_a_count_or_auto(tmp_path):
    assert parse(minimal(), tmp_path).resources.trials_per_worker == 1
    auto = minimal(resources={"trials_per_worker": "auto"})
    assert parse(auto, tmp_path).resources.trials_per_worker == "auto"
    four = minimal(resources={"trials_per_worker": 4})
    assert parse(four, tmp_path).resources.trials_per_worker == 4


def test_budget_timeout_units(tmp_path):
    assert parse(minimal(budget={"timeout": "2h"}), tmp_path).budget.timeout == 7200
    assert parse(minimal(budget={"timeout": "30m"}), tmp_path).budget.timeout == 1800
    assert parse(minimal(budget={"timeout": 90}), tmp_path).budget.timeout == 90


def test_relative_paths_are_relative_to_the_study_file(tmp_path):
    spec = parse(
        minimal(
            storage="sqlite:///s.db",
            task={"kind": "classification", "data": {"train": "d/train.csv"}},
        ),
        tmp_path,
    )
    assert spec.storage == f"sqlite:///{tmp_path / 's.db'}"
    assert spec.task.data.train == str(tmp_path / "d" / "train.csv")


@pytest.mark.parametrize("folder", ["exp?1", "pct%41", "at@host:1", "hash#1", "sp ace"])
def test_a_storage_in_the_study_folder_stays_there_whatever_its_name(tmp_path, folder):
    """The default storage's URL held the folder's path as written: ``?`` began a query (the
    database went to the folder above, shared by ``exp?1`` and ``exp?2``), ``%41`` read as
    ``A`` (a folder that does not exist)."""
    from reftsearch.search.storage import sqlite_path

    base = tmp_path / folder
    assert sqlite_path(parse(minimal(), base).storage) == base / "t.db"
    relative = parse(minimal(storage="sqlite:///sub/s.db"), base).storage
    assert sqlite_path(relative) == base / "sub" / "s.db"


def _read_options(**options):
    return {"task": {"kind": "classification", "data": {"train": "d.csv", "read_options": options}}}


QUOTING = "must be one of 0 (QUOTE_MINIMAL), 1 (QUOTE_ALL), 2 (QUOTE_NONNUMERIC), 3 (QUOTE_NONE)"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"quoting": "QUOTE_NONE"}, f"task.data.read_options.quoting: {QUOTING}, got 'QUOTE_NONE'"),
        ({"quoting": "3"}, f"task.data.read_options.quoting: {QUOTING}, got '3'"),
        ({"quoting": 7}, f"task.data.read_options.quoting: {QUOTING}, got 7"),
        ({"quoting": True}, f"task.data.read_options.quoting: {QUOTING}, got True"),
        ({"sep": 1}, "task.data.read_options.sep: must be a non-empty string, got 1"),
        ({"delimiter": ""}, "task.data.read_options.delimiter: must be a non-empty string"),
        ({"sep": ";", "delimiter": ";"}, "task.data.read_options: give sep or delimiter"),
        ({"encoding": 5}, "task.data.read_options.encoding: must be a non-empty string, got 5"),
        ({"encoding": "utf-9"}, "task.data.read_options.encoding: must be a text encoding"),
        ({"encoding": "rot13"}, "task.data.read_options.encoding: must be a text encoding"),
        ({"encoding": "base64"}, "task.data.read_options.encoding: must be a text encoding"),
    ],
)
def test_read_options_are_checked(options, expected):
    """Each of these was a traceback from pandas or the csv module when the data was read."""
    assert expected in error_of(minimal(**_read_options(**options)))


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (
            {"text": "review", "label": "review"},
            "task.label: names column 'review', which task.text",
        ),
        ({"text": "a", "text_pair": "a"}, "task.text_pair: names column 'a', which task.text"),
        ({"text_pair": 1, "label": 1}, "task.label: names column '1', which task.text_pair"),
        ({"text": "label"}, "task.label: names column 'label', which task.text names too"),
        ({"kind": "generation", "prompt": "q", "response": "q"}, "task.response: names column"),
    ],
)
def test_a_column_read_as_two_parts_is_refused(columns, expected):
    """Text and label from one column trained a model to copy its input: no error, a
    perfect dev score."""
    task = {"kind": "classification", "data": {"train": "d.csv"}, **columns}
    assert expected in error_of(minimal(task=task))


def test_read_options_that_pandas_takes_pass(tmp_path):
    options = {"quoting": 2, "sep": ";", "encoding": "latin-1"}
    assert parse(minimal(**_read_options(**options)), tmp_path).task.data.read_options == options


def test_a_path_the_system_cannot_look_up_is_refused_naming_its_key(tmp_path):
    """Each was a traceback (exit 1): RuntimeError, ValueError or OSError."""
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    for raw, expected in [
        ("loop1", "cannot be looked up as a path: Symlink loop"),
        ("~nouserxyz/d.csv", "~nouserxyz: no such user"),
        ("a\0b.csv", "cannot be looked up as a path: embedded null byte"),
        ("a" * 300 + ".csv", "cannot be looked up as a path: File name too long"),
    ]:
        for changes, key in [
            ({"task": {"kind": "classification", "data": {"train": raw}}}, "task.data.train"),
            ({"model": raw if raw.startswith("~") else f"./{raw}"}, "model.path"),
            ({"export": {"dir": raw}}, "export.dir"),
            ({"resources": {"spill_dir": raw}}, "resources.spill_dir"),
        ]:
            with pytest.raises(SpecError) as info:
                parse(minimal(**changes), tmp_path)
            assert str(info.value).startswith(f"{key}: {expected}"), info.value


def test_overrides_are_validated_like_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    spec = load_spec(path, ["budget.n_trials=5", "space.rank=[1, 2]"])
    assert spec.budget.n_trials == 5 and spec.space["rank"] == Choice((1, 2))
    with pytest.raises(SpecError, match=r"space.rank: must be a positive integer, got 0"):
        load_spec(path, ["space.rank=0"])
    with pytest.raises(BadInputError, match="must look like key.path=value"):
        load_spec(path, ["budget.n_trials"])


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(BadInputError, match="cannot read study file"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(BadInputError, match="not valid YAML") as raised:
        load_spec(bad)
    assert f'in "{bad}", line 1' in str(raised.value)  # the file, not "<unicode string>"
    assert "\n" not in str(raised.value)  # one line, as every error


def test_parse_layers():
    assert parse_layers("all", 4) == (0, 1, 2, 3)
    assert parse_layers("0;3-5", 6) == (0, 3, 4, 5)
    with pytest.raises(ValueError, match="layer 6 does not exist in a model with 6 layers"):
        parse_layers("2;6", 6)


def test_every_sampler_a_spec_accepts_is_built():
    """``sampler.type`` is checked in the spec (no torch), built in search/study.py: a name
    in one and not the other would be refused, or silently built as another sampler."""
    from reftsearch.search.study import SAMPLERS as BUILDERS
    from reftsearch.spec.study_file import SAMPLERS

    assert sorted(SAMPLERS) == sorted(BUILDERS)


def test_a_warm_start_from_the_study_itself_is_refused():
    """`validate` said ok; `run` then failed "no study named ... (run the study first)" for a
    new study, and an existing one enqueued its own best configs, copied, not trained."""
    own = {"study": "t"}
    message = "names this study itself ('t')"
    assert error_of(minimal(warm_start=own)).startswith(f"warm_start.study: {message}")
    listed = [{"recipes": "paper"}, {**own, "storage": "sqlite:////tmp/t.db"}]
    assert error_of(minimal(warm_start=listed)).startswith(f"warm_start[1].study: {message}")
    other = {**own, "storage": "sqlite:////tmp/elsewhere.db"}  # another storage's study "t"
    assert parse(minimal(warm_start=other)).warm_start[0].study == "t"
