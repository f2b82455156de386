"""A study on the user's own files: headerless TSV, string labels, bad cells, the rows of each
split (``reftsearch data``), ``validate`` on the data, label names in the study and export."""

import collections
import csv
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from test_real_tasks import smollm2_cache  # noqa: F401

from reftsearch.cli import main
from reftsearch.data.splits import load_task_data
from reftsearch.errors import BadInputError, SpecError
from reftsearch.spec.space import parse_space, sample
from reftsearch.spec.study_file import load_spec, parse_spec

TOPICS = ["Sports", "Business", "World", "Sci/Tech"]  # not in sorted order on purpose


def topic_rows(n: int, start: int = 0) -> list[tuple[str, str]]:
    """(label, text): the topic's first word leads, a quote inside most texts."""
    return [
        (TOPICS[i % 4], f'{TOPICS[i % 4].lower()} news "item" {i}') for i in range(start, start + n)
    ]


def write_tsv(path, rows, header=None):
    lines = ([header] if header else []) + ["\t".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def study(tmp_path, data, name="own.yaml", model="tiny:bert", **task):
    raw = {
        "name": "own",
        "model": model,
        "task": {"kind": "classification", "data": data, "max_length": 24, **task},
        "seed": 1,
        "budget": {"n_trials": 1, "max_epochs": 1},
        "sampler": "random",
        "pruner": "none",
        "space": {"prefix": 1, "suffix": 1, "rank": 1, "lr": 5e-3, "batch_size": 8},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ------------------------------------------------------------------------ reading the files


@pytest.mark.parametrize(
    "columns",
    [{"columns": ["label", "text"]}, {}],
    ids=["named", "by-index"],
)
def test_headerless_tsv_by_column_names_or_indices(tmp_path, columns):
    write_tsv(tmp_path / "train.tsv", [(label, text) for label, text in topic_rows(20)])
    names = {"text": "text", "label": "label"} if columns else {"text": 1, "label": 0}
    spec = load_spec(study(tmp_path, {"train": "train.tsv", "header": False, **columns}, **names))
    data = load_task_data(spec.task, spec.seed)
    assert len(data.train) + len(data.dev) == 20  # the first line is a row, not a header
    assert data.label_names == sorted(TOPICS)
    first = min(data.train + data.dev, key=lambda row: row["row"])
    assert first == {"text": 'sports news "item" 0', "label": 2, "row": 0}


def test_a_separator_of_several_characters_reads_without_a_warning(tmp_path):
    """pandas' ParserWarning ("Falling back to the 'python' engine") was printed at every
    read of a file whose sep is a regular expression, for nothing the user could change."""
    lines = ["sentence::label", *(f"{text}::{label}" for label, text in topic_rows(8))]
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    spec = load_spec(study(tmp_path, {"train": "train.csv", "read_options": {"sep": "::"}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_task_data(spec.task, spec.seed)
    assert sorted(data.label_names) == sorted(TOPICS)
    assert len(data.train) + len(data.dev) == 8


def test_string_labels_get_sorted_ids_whatever_the_row_order(tmp_path):
    rows = topic_rows(12)
    forward = write_tsv(tmp_path / "a.tsv", rows, "label\ttext")
    backward = write_tsv(tmp_path / "b.tsv", rows[::-1], "label\ttext")
    for path, order in ((forward, rows), (backward, rows[::-1])):
        spec = load_spec(study(tmp_path, {"train": path.name, "dev": path.name}, text="text"))
        data = load_task_data(spec.task, spec.seed)
        assert data.label_names == ["Business", "Sci/Tech", "Sports", "World"]
        assert [data.label_names[row["label"]] for row in data.train] == [r[0] for r in order]
    # numbers sort as numbers; 0..K-1 keep their ids, 1..4 or 2..10 become 0..K-1
    numbers = [("10", "a"), ("2", "b"), ("3", "c"), ("2", "d")]
    write_tsv(tmp_path / "n.tsv", numbers, "label\ttext")
    spec = load_spec(study(tmp_path, {"train": "n.tsv", "dev": "n.tsv"}, text="text"))
    data = load_task_data(spec.task, spec.seed)
    assert data.label_names == ["2", "3", "10"]
    assert [row["label"] for row in data.train] == [2, 0, 1, 0]


def test_quotes_pandas_would_drop_are_refused_with_the_fix(tmp_path, capsys):
    write_tsv(tmp_path / "t.tsv", [("Sports", '"Tigers" win'), ("World", "talks")] * 3)
    data = {"train": "t.tsv", "header": False, "columns": ["label", "text"]}
    path = study(tmp_path, data, text="text")
    assert main(["validate", str(path)]) == 2  # pandas read it as: Tigers win
    err = capsys.readouterr().err
    assert "task.data.train (t.tsv): line 1: " in err
    assert "read_options: {quoting: 3}" in err
    assert main(["validate", str(path), "--set", "task.data.read_options.quoting=3"]) == 0
    spec = load_spec(path, ["task.data.read_options.quoting=3"])
    texts = {row["text"] for row in load_task_data(spec.task, spec.seed).train}
    assert '"Tigers" win' in texts


# ------------------------------------------------------------------- bad input, exit 2


def _empty_text(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nfine,a\n,b\nalso fine,a\nok,b\n")
    return {"train": "train.csv"}, "task.data.train (train.csv): row 1: column 'text' (task.text)"


def _label_dev_lacks(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nx,a\ny,b\nz,a\n")
    (tmp_path / "dev.csv").write_text("text,label\nx,a\ny,c\n")
    return (
        {"train": "train.csv", "dev": "dev.csv"},
        "task.data.dev (dev.csv): row 1: label 'c' (column 'label') does not occur in train",
    )


def _one_class(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nx,a\ny,a\nz,a\nw,a\n")
    return {"train": "train.csv"}, "task.data.train (train.csv): column 'label' (task.label) "


def _missing_file(tmp_path):
    return {"train": "nowhere.csv"}, "task.data.train: file not found: "


def _missing_column(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,label\nx,a\ny,b\n")
    return {"train": "train.csv"}, "task.data.train (train.csv) lacks task.text: column 'text'"


def _wrong_column_count(tmp_path):
    write_tsv(tmp_path / "t.tsv", [("a", "x", "y"), ("b", "z", "w")])
    data = {"train": "t.tsv", "header": False, "columns": ["label", "text"]}
    return data, "names 2 columns, task.data.train (t.tsv) has 3 in its first row"


def _list_label(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": [1]}, {"text": "y", "label": [2]}])
    return (
        {"train": "t.jsonl"},
        "task.data.train (t.jsonl): row 0: column 'label' (task.label): must be text or a "
        "number, got a list",
    )


def _mapping_text(tmp_path):
    rows = [{"text": "x", "label": 1}, {"text": {"a": 1}, "label": 0}]
    write_jsonl(tmp_path / "t.jsonl", rows)
    return (
        {"train": "t.jsonl"},
        "task.data.train (t.jsonl): row 1: column 'text' (task.text): must be text or a "
        "number, got a mapping",
    )


@pytest.mark.parametrize(
    "case",
    [
        _empty_text,
        _label_dev_lacks,
        _one_class,
        _missing_file,
        _missing_column,
        _wrong_column_count,
        _list_label,
        _mapping_text,
    ],
)
def test_validate_opens_the_data_and_names_file_column_and_row(tmp_path, capsys, case):
    """These passed validate and failed at run: a tokenizer traceback (empty cell), exit 2
    without the key (dev label), or were accepted silently (one class, a list as text);
    a list label was a traceback (unhashable type)."""
    data, message = case(tmp_path)
    path = study(tmp_path, data, text="text")
    assert main(["validate", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert main(["run", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "own.db").exists()  # refused before the storage


def test_validate_says_what_run_will_read_and_loads_no_model(tmp_path):
    write_tsv(tmp_path / "train.tsv", topic_rows(40), "label\ttext")
    path = study(tmp_path, {"train": "train.tsv"}, text="text")
    code = (
        "import sys; from reftsearch.cli import main; "
        f"code = main(['validate', {str(path)!r}]); print(code, 'torch' in sys.modules)"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert ran.stdout.splitlines() == [
        f"{path}: ok (study 'own', classification, metric accuracy; tiny:bert: 4 layers, "
        "hidden size 64, 512 positions; data: train 36 rows, dev 4 rows; 4 classes: Business, "
        "Sci/Tech, Sports, World)",
        "0 False",
    ], ran.stderr


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.csv", "text,label\nx,a\nan, unquoted, comma,b\n", "Expected 2 fields in line 3, saw 4"),
        ("d.jsonl", '{"text": "x", "label": 1}\n{"text": x}\n', "JSON parse error"),
        ("d.csv", "", "(d.csv): has no rows"),
        ("d.csv", "text,label\n", "(d.csv): has no rows"),
        ("d.jsonl", "", "(d.jsonl): has no rows"),
        ("d.json", "[]", "(d.json): has no rows"),
        ("d.parquet", "", "(d.parquet): has no rows"),
    ],
    ids=["unquoted-comma", "bad-json-line", "empty", "header-only", "empty-jsonl", "[]", "parquet"],
)
def test_a_file_that_cannot_be_read_says_why_in_one_line(tmp_path, capfd, name, content, message):
    """The cause was a separate log line of datasets' (or nowhere: "Instruction "train"
    corresponds to no data!"), the error itself "An error occurred while generating the
    dataset"."""
    (tmp_path / name).write_text(content)
    path = study(tmp_path, {"train": name}, text="text")
    assert main(["validate", str(path)]) == 2
    err = capfd.readouterr().err
    assert err.startswith(f"{path}: error: task.data.train") and err.count("\n") == 1, err
    assert message in err


def test_a_file_that_may_not_be_opened_is_named(tmp_path, capsys, monkeypatch):
    """A CSV without read permission was a PermissionError traceback."""
    data = tmp_path / "d.csv"
    data.write_text("text,label\nx,a\ny,b\n")
    data.chmod(0)
    if os.access(data, os.R_OK):  # root reads it anyway: refuse it as the system would
        opened = Path.open

        def refuse(self, *args, **kwargs):
            if self == data:
                raise PermissionError(13, "Permission denied", str(self))
            return opened(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refuse)
    assert main(["validate", str(study(tmp_path, {"train": "d.csv"}, text="text"))]) == 2
    assert f"task.data.train: cannot read {data}: Permission denied" in capsys.readouterr().err


def test_only_an_empty_cell_is_empty(tmp_path):
    """pandas took None, NA, N/A, null and nan for missing: such a text, label or response
    was refused as empty, and nothing in read_options could say otherwise."""
    words = ["None", "NA", "N/A", "null", "nan"]
    rows = [("NA" if i % 2 else "None", word) for i, word in enumerate(words * 2)]
    write_tsv(tmp_path / "t.tsv", rows, "label\ttext")
    spec = load_spec(study(tmp_path, {"train": "t.tsv", "dev": "t.tsv"}, text="text"))
    data = load_task_data(spec.task, spec.seed)
    assert data.label_names == ["NA", "None"]
    assert [(data.label_names[r["label"]], r["text"]) for r in data.train] == rows

    write_tsv(tmp_path / "g.tsv", [(f"say {word}", word) for word in words], "prompt\tresponse")
    raw = yaml.safe_load(study(tmp_path, {"train": "g.tsv", "dev": "g.tsv"}).read_text())
    raw["task"]["kind"] = "generation"
    spec = parse_spec(raw, tmp_path)
    assert [r["response"] for r in load_task_data(spec.task, spec.seed).train] == words


def test_integral_float_labels_match_their_ints(tmp_path):
    """train 1.0/0.0, dev 1/0 was "label 1 does not occur in train; train's labels are
    ['0.0', '1.0']"; quoting 2 (pandas reads unquoted cells as floats) a traceback."""
    (tmp_path / "train.csv").write_text("text,label\nx,1.0\ny,0.0\nz,1.0\nw,0.0\n")
    (tmp_path / "dev.csv").write_text("text,label\nx,1\ny,0\n")
    spec = load_spec(study(tmp_path, {"train": "train.csv", "dev": "dev.csv"}, text="text"))
    data = load_task_data(spec.task, spec.seed)
    assert data.label_names == ["0", "1"]
    assert [r["label"] for r in data.dev] == [1, 0]

    quoted = '"text","label"\n"x",1\n"y",0\n"z",2.5\n'
    (tmp_path / "q.csv").write_text(quoted)
    data = {"train": "q.csv", "dev": "q.csv", "read_options": {"quoting": 2}}
    spec = load_spec(study(tmp_path, data, text="text"))
    assert load_task_data(spec.task, spec.seed).label_names == ["0", "1", "2.5"]

    # one JSON file can hold both; ints and strings keep their names (a resume compares them)
    labels = [{"text": "a", "label": 1}, {"text": "b", "label": 0.0}, {"text": "c", "label": 1.0}]
    write_jsonl(tmp_path / "m.jsonl", labels)
    spec = load_spec(study(tmp_path, {"train": "m.jsonl", "dev": "m.jsonl"}, text="text"))
    data = load_task_data(spec.task, spec.seed)
    assert data.label_names == ["0", "1"] and [r["label"] for r in data.train] == [1, 0, 1]


def test_json_false_and_0_are_two_classes(tmp_path, capsys):
    """In a set ``False == 0``: train labels false/0 read as one class ('False'), refused
    as "holds one value", while the dev row labelled 0 "does not occur in train"."""
    labels = [False, 0, True, 1] * 3
    write_jsonl(tmp_path / "b.jsonl", [{"text": str(i), "label": x} for i, x in enumerate(labels)])
    spec = load_spec(study(tmp_path, {"train": "b.jsonl", "dev": "b.jsonl"}, text="text"))
    data = load_task_data(spec.task, spec.seed)
    assert data.label_names == ["0", "1", "False", "True"]
    assert [r["label"] for r in data.dev] == [2, 0, 3, 1] * 3


def test_data_piped_into_a_reader_that_stops_ends_without_a_traceback(tmp_path):
    """`reftsearch data study.yaml | head -1` printed a BrokenPipeError traceback."""
    write_tsv(tmp_path / "t.tsv", topic_rows(4000), "label\ttext")  # past a pipe's 64 KB
    path = study(tmp_path, {"train": "t.tsv"}, text="text")
    command = [sys.executable, "-m", "reftsearch.cli", "data", str(path)]
    reader = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout.readline().startswith(b"split\t")
    reader.stdout.close()  # as `head -1` exits
    assert reader.wait(timeout=120) == 1
    err = reader.stderr.read().decode()
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_the_header_hint_is_for_a_csv_file_whose_first_line_is_a_row(tmp_path):
    """It said "set task.data.header: false" for a JSON file (where that is refused) and for
    a CSV whose header lacks only one of the named columns."""
    (tmp_path / "row.csv").write_text("x,a\ny,b\n")
    (tmp_path / "pair.csv").write_text("text,label\nx,a\ny,b\n")
    write_jsonl(tmp_path / "j.jsonl", [{"sentence": "x", "y": 1}, {"sentence": "y", "y": 2}])
    hint = "set task.data.header: false"
    for name, task, hinted in [
        ("row.csv", {"text": "text"}, True),
        ("pair.csv", {"text": "text", "text_pair": "other"}, False),
        ("j.jsonl", {"text": "text"}, False),
    ]:
        spec = load_spec(study(tmp_path, {"train": name}, **task))
        with pytest.raises(BadInputError, match="lacks task") as info:
            load_task_data(spec.task, spec.seed)
        assert (hint in str(info.value)) == hinted, info.value


def test_header_options_are_checked(tmp_path):
    base = {"name": "t", "model": "tiny:bert"}
    for data, message in [
        ({"train": "a.csv", "columns": ["x"]}, "task.data.columns: names the columns of a file"),
        ({"hub": "glue", "header": False}, "task.data.header: only for files"),
        ({"train": "a.csv", "header": False, "columns": ["x", "x"]}, "names a column twice"),
    ]:
        raw = {**base, "task": {"kind": "classification", "data": data}}
        with pytest.raises(SpecError, match=message):
            parse_spec(raw, tmp_path)
    (tmp_path / "a.jsonl").write_text('{"text": "x", "label": 1}\n')
    path = study(tmp_path, {"train": "a.jsonl", "header": False}, text="text")
    spec = load_spec(path)
    with pytest.raises(BadInputError, match=r"task.data.header: only for .csv and .tsv files"):
        load_task_data(spec.task, spec.seed)


# ------------------------------------------------------------------------- reftsearch data


def test_data_lists_the_rows_of_each_split_by_source_row(tmp_path, capsys):
    rows = topic_rows(30)
    write_tsv(tmp_path / "train.tsv", rows, "label\ttext")
    write_tsv(tmp_path / "test.tsv", topic_rows(8, start=100), "label\ttext")
    path = study(tmp_path, {"train": "train.tsv", "test": "test.tsv"}, text="text")
    assert main(["data", str(path)]) == 0
    captured = capsys.readouterr()
    said = [line for line in captured.err.splitlines() if line.startswith(("train", "dev", "test"))]
    assert said == [
        "train: 27 rows from task.data.train (train.tsv)",
        "dev: 3 rows carved from task.data.train (train.tsv) (task.dev_fraction 0.1, seed 1)",
        "test: 8 rows from task.data.test (test.tsv)",
    ]
    table = [line.split("\t") for line in captured.out.splitlines()]
    assert table[0] == ["split", "row", "label", "text"]
    by_split = collections.defaultdict(list)
    for split, row, label, text in table[1:]:
        by_split[split].append(int(row))
        source = rows if split != "test" else topic_rows(8, start=100)
        assert (label, text) == source[int(row)]  # the row's number names its line
    assert sorted(by_split["train"] + by_split["dev"]) == list(range(30))  # a partition
    spec = load_spec(path)
    carved = {row["row"] for row in load_task_data(spec.task, spec.seed).dev}
    assert set(by_split["dev"]) == carved  # the very rows dev scores come from

    out = tmp_path / "dev.csv"
    assert main(["data", str(path), "--split", "dev", "--out", str(out)]) == 0
    with out.open(newline="") as file:
        written = list(csv.DictReader(file))
    assert [int(r["row"]) for r in written] == by_split["dev"]
    assert all((r["label"], r["text"]) == rows[int(r["row"])] for r in written)
    assert main(["data", str(path), "--split", "dev", "--out", str(out)]) == 0  # its own file
    mine = tmp_path / "mine.csv"
    mine.write_text("my,notes\n")
    assert main(["data", str(path), "--out", str(mine)]) == 2
    assert "is not a file `reftsearch data` wrote" in capsys.readouterr().err
    assert mine.read_text() == "my,notes\n"
    # a folder that is not there, a file where a folder is wanted, no file name: tracebacks
    for out, message in [
        (tmp_path / "nodir" / "x.csv", f"directory {tmp_path / 'nodir'} does not exist"),
        (mine / "x.csv", f"directory {mine} does not exist"),
        (Path("."), "is a directory; give a file name"),
    ]:
        assert main(["data", str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: --out {out}: {message}\n", err  # before any row was read


# ------------------------------------------------------------------------ the search space


def test_the_space_never_draws_a_config_without_positions():
    """Ranges copied from a shipped study drew prefix = suffix = 0 twice in 20 trials."""
    space = parse_space({"prefix": {"low": 0, "high": 3}, "suffix": {"low": 0, "high": 3}}, "s", 3)
    for sampler in (
        optuna.samplers.RandomSampler(seed=0),
        optuna.samplers.TPESampler(seed=0, n_startup_trials=5),
    ):
        study = optuna.create_study(sampler=sampler)
        drawn = collections.Counter()
        for _ in range(60):
            trial = study.ask()
            values = sample(trial, space)
            study.tell(trial, values["suffix"] - values["prefix"])  # TPE: pull toward (0, 3)
            drawn[values["prefix"], values["suffix"]] += 1
        assert (0, 0) not in drawn
        assert any(p == 0 for p, _ in drawn) and any(s == 0 for _, s in drawn)
    for raw, message in [
        ({"prefix": {"low": 0, "high": 3}}, "space.prefix: can be 0, and suffix is 0"),
        ({"prefix": [0, 1], "suffix": [0, 2]}, "space.suffix: can be 0, as can prefix"),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_space(raw, "space", 3)


# -------------------------------------------------------- label names: study, model, export


@pytest.mark.parametrize(
    "model", ["tiny:bert", pytest.param("embedded:minilm", marks=pytest.mark.slow)]
)
def test_label_names_are_kept_in_the_study_and_the_export(tmp_path, capsys, model):
    write_tsv(tmp_path / "train.tsv", topic_rows(48))
    data = {"train": "train.tsv", "header": False, "columns": ["label", "text"]}
    path = study(tmp_path, data, model=model, text="text")
    assert main(["run", str(path)]) == 0
    spec = load_spec(path)
    stored = optuna.load_study(study_name="own", storage=spec.storage)
    names = ["Business", "Sci/Tech", "Sports", "World"]
    assert stored.user_attrs["label_names"] == names

    out = tmp_path / "export"
    assert main(["export", str(path), str(out)]) == 0
    sidecar = json.loads((out / "reftsearch.json").read_text())
    assert sidecar["id2label"] == {"0": "Business", "1": "Sci/Tech", "2": "Sports", "3": "World"}
    assert sidecar["label2id"] == {name: i for i, name in enumerate(names)}
    # the base model's config in the export (copied for tiny:*, beside the reference to
    # MiniLM's shipped directory) has them too: HF pipelines read the names there
    copied = sidecar["base_model"]["copied"]
    config_file = out / "base_model" / "config.json" if copied else out / "base_model_config.json"
    config = json.loads(config_file.read_text())
    assert config["id2label"] == sidecar["id2label"]

    # the same study resumed on data whose classes changed would relabel its trials' heads
    write_tsv(tmp_path / "train.tsv", [r for r in topic_rows(48) if r[0] != "World"])
    capsys.readouterr()
    assert main(["run", str(path), "--n-trials", "2"]) == 2
    assert "was run with the classes" in capsys.readouterr().err
    assert len(optuna.load_study(study_name="own", storage=spec.storage).trials) == 1


# ------------------------------------------------------------------- the README's example


def test_the_readmes_worked_example_reads_as_it_says(tmp_path, capsys):
    """The "Bring your own data" study file and sample lines, as a new user copies them."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## Bring your own data", 1)[1]
    sample_lines, study_file = re.findall(r"```(?:yaml)?\n(.*?)```", section, re.S)[:2]
    (tmp_path / "news.tsv").write_text(sample_lines * 8)  # 24 rows, 3 classes
    raw = yaml.safe_load(study_file)
    assert raw["task"]["data"]["header"] is False
    path = tmp_path / "news.yaml"
    path.write_text(yaml.safe_dump({**raw, "model": "tiny:bert"}))
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out == (
        f"{path}: ok (study 'news-minilm', classification, metric accuracy; tiny:bert: 4 layers, "
        "hidden size 64, 512 positions; data: train 22 rows, dev 2 rows; 3 classes: Business, "
        "Sports, World)\n"
    )
    del raw["task"]["data"]["read_options"]
    path.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(path)]) == 2
    assert "read_options: {quoting: 3}" in capsys.readouterr().err


def test_a_headerless_generation_file_runs_and_lists_prompts(tmp_path, capsys):
    lines = [(f"{a} plus {b} is", f" {a + b}") for a in range(6) for b in range(4)]
    write_tsv(tmp_path / "sums.tsv", lines)
    raw = {
        "name": "sums",
        "model": "tiny:llama",
        "task": {
            "kind": "generation",
            "data": {"train": "sums.tsv", "header": False},
            "prompt": 0,
            "response": 1,
            "max_train_examples": 16,
            "max_new_tokens": 4,
        },
        "budget": {"n_trials": 1, "max_epochs": 1},
        "sampler": "random",
        "pruner": "none",
        "space": {"prefix": 0, "suffix": 1, "rank": 1},
    }
    path = tmp_path / "sums.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["data", str(path), "--split", "train"]) == 0
    captured = capsys.readouterr()
    assert "train: 16 rows from task.data.train (sums.tsv), at most " in captured.err
    table = [line.split("\t") for line in captured.out.splitlines()]
    assert table[0] == ["split", "row", "prompt", "response"]
    assert all((prompt, response) == lines[int(row)] for _, row, prompt, response in table[1:])
    assert main(["run", str(path)]) == 0
    stored = optuna.load_study(study_name="sums", storage=load_spec(path).storage)
    assert "label_names" not in stored.user_attrs  # no classes in a generation study


# ------------------------------------------------------------------------ prompts too long


def long_prompt_rows(n_long: int, n_short: int = 60) -> list[dict]:
    short = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(n_short)]
    return [{"prompt": "long question " * 40, "response": "7"}] * n_long + short


def generation_study(tmp_path, rows: list[dict], model: str = "tiny:llama", **task) -> Path:
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "dev.jsonl", long_prompt_rows(0, 8))
    path = study(tmp_path, {"train": "train.jsonl", "dev": "dev.jsonl"}, model=model)
    raw = yaml.safe_load(path.read_text())
    raw["task"] = {"kind": "generation", "data": raw["task"]["data"], "max_length": 32,
                   "max_new_tokens": 4, **task}  # fmt: skip
    raw["metric"] = "exact_match"
    raw["space"]["batch_size"] = 4  # the long prompts batch together (rows sorted by length)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_train_prompts_that_fill_max_length_are_left_out_not_diverged(tmp_path, capsys):
    """A prompt cut to max_length keeps no response token; a batch of only such rows took
    its loss over no tokens (NaN), and every trial failed as diverged, at any lr."""
    path = generation_study(tmp_path, long_prompt_rows(6))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "and 60 train / 8 dev examples" in out
    assert "left out of training: 6 train prompts that fill task.max_length (32 tokens)" in out
    (trial,) = optuna.load_study(study_name="own", storage=f"sqlite:///{tmp_path}/own.db").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE

    every_one = generation_study(tmp_path, long_prompt_rows(8, n_short=0))
    assert main(["run", str(every_one)]) == 2
    assert "task.max_length: every train prompt fills its 32 tokens" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("smollm2_cache")
def test_smollm2_trains_on_the_prompts_that_leave_room_for_a_response(tmp_path, capsys):
    path = generation_study(tmp_path, long_prompt_rows(4, n_short=8), model="embedded:smollm2")
    overrides = ["--set", "space.layers=15", "--set", "space.rank=1"]
    assert main(["run", str(path), *overrides]) == 0
    out = capsys.readouterr().out
    assert "and 8 train / 8 dev examples" in out and "left out of training: 4 train" in out
    (trial,) = optuna.load_study(study_name="own", storage=f"sqlite:///{tmp_path}/own.db").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE


def test_data_split_test_without_a_test_split_is_refused(tmp_path, capsys):
    """It printed the header and no rows, exit 0: as if the test split were empty."""
    write_tsv(tmp_path / "train.tsv", topic_rows(20), header="label\ttext")
    path = study(tmp_path, {"train": "train.tsv"}, text="text")
    assert main(["data", str(path), "--split", "test"]) == 2
    assert "--split test: the study has no test split" in capsys.readouterr().err
    assert main(["data", str(path)]) == 0  # all the splits it has


def test_one_class_left_by_the_carve_says_so(tmp_path, capsys):
    """Two classes in the file, one row left to train once dev is carved: the message said
    the file held one value in all its rows."""
    rows = "".join(f"t{i},{i % 2}\n" for i in range(20))
    (tmp_path / "train.csv").write_text("text,label\n" + rows)
    path = study(tmp_path, {"train": "train.csv"}, text="text", dev_fraction=0.99)
    assert main(["validate", str(path)]) == 2
    said = "in all 1 rows (the rows kept once task.dev_fraction 0.99 is carved out as dev)"
    assert said in capsys.readouterr().err
