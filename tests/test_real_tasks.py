"""The shipped real-task studies (SST-2, RTE, GSM8K) on the local GLUE/GSM8K files, and the
embedded SmolLM2 decoder they use. Skipped where ../shared/data is absent."""

import csv
import os

import optuna
import pytest
import torch
import transformers
from conftest import REPO, SHARED_DATA

from reftsearch.cli import main
from reftsearch.data.batches import encode
from reftsearch.data.splits import load_split, load_task_data
from reftsearch.engine.scoring import generate
from reftsearch.errors import SpecError
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.methods.reft.module import ReftModule
from reftsearch.models.base import load_base_model
from reftsearch.models.sources import CACHE_ENV, cache_dir
from reftsearch.search.record import unpack_hits
from reftsearch.spec.study_file import DataSpec, TaskSpec, load_spec, parse_spec

needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")

# The offline overrides studies/README.md documents: local files instead of the hub ids.
OFFLINE = {
    "sst2-minilm": "task.data={train: D/sst2/train.tsv, test: D/sst2/validation.tsv, "
    "read_options: {quoting: 3}}",
    "rte-minilm": "task.data={train: D/rte/train.tsv, test: D/rte/validation.tsv}",
    "gsm8k-smollm2": "task.data={train: D/gsm8k/train.jsonl, test: D/gsm8k/test.jsonl}",
}
# One tiny trial: a handful of examples, one epoch.
TINY = {
    "sst2-minilm": ["task.max_train_examples=32", "task.max_dev_examples=16"],
    "rte-minilm": ["task.max_train_examples=32", "task.max_dev_examples=16"],
    "gsm8k-smollm2": [  # and one cheap config: a 30-layer decoder on 2 shared CPU cores
        "task.max_train_examples=4",
        "task.max_dev_examples=2",
        "task.max_length=128",
        "task.max_new_tokens=8",
        "space.layers=15",
        "space.rank=4",
        "warm_start=null",
    ],
}


def offline(name: str) -> list[str]:
    return [OFFLINE[name].replace("D/", f"{SHARED_DATA}/")]


def study_file(name: str):
    return REPO / "studies" / f"{name}.yaml"


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """A fresh conversion cache for this module's SmolLM2 loads (converted once, here)."""
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("reftsearch-cache"))
    load_base_model("embedded:smollm2", "causal_lm")
    yield
    if previous is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = previous


# ------------------------------------------------------------------------ specs and data


def test_each_real_study_names_its_hub_dataset():
    # GLUE hides its test labels: validation is the held-out split there
    hubs = {
        "sst2-minilm": ("nyu-mll/glue", "sst2", "validation"),
        "rte-minilm": ("nyu-mll/glue", "rte", "validation"),
        "gsm8k-smollm2": ("openai/gsm8k", "main", "test"),
    }
    for name, (hub, config, test) in hubs.items():
        data = load_spec(study_file(name)).task.data
        assert (data.hub, data.hub_config, data.train, data.test) == (hub, config, "train", test)
        assert data.dev is None  # carved from train


def test_final_number_is_a_generation_metric_only(tmp_path):
    raw = {
        "name": "t",
        "model": "tiny:llama",
        "task": {"kind": "classification", "data": "builtin:sentiment"},
        "metric": "final_number",
    }
    with pytest.raises(SpecError, match=r"^metric: must be one of .* for a classification task"):
        parse_spec(raw, tmp_path)


def test_classification_texts_lose_outer_whitespace(tmp_path):
    (tmp_path / "train.tsv").write_text('sentence\tlabel\nit \'s "fine" . \t1\n dull \t0\n')
    spec = load_spec(_write(tmp_path, {"train": "train.tsv", "read_options": {"quoting": 3}}), [])
    assert load_split(spec.task, "train") == [
        {"text": 'it \'s "fine" .', "label": 1, "row": 0},
        {"text": "dull", "label": 0, "row": 1},
    ]


def _write(tmp_path, data):
    import yaml

    path = tmp_path / "study.yaml"
    raw = {"name": "t", "model": "tiny:bert", "task": {"kind": "classification", "data": data}}
    path.write_text(yaml.safe_dump(raw))
    return path


@needs_data
def test_glue_files_read_as_provenance_says():
    sst2 = load_spec(study_file("sst2-minilm"), offline("sst2-minilm")).task
    train, test = load_split(sst2, "train"), load_split(sst2, "test")
    assert (len(train), len(test)) == (67_349, 872)
    assert sum(row["label"] for row in test) == 444
    assert train[0] == {"text": "hide new secretions from the parental units", "label": 0, "row": 0}
    assert all(row["text"] == row["text"].strip() for row in test)  # GLUE's trailing space

    rte = load_spec(study_file("rte-minilm"), offline("rte-minilm")).task
    train, test = load_split(rte, "train"), load_split(rte, "test")
    assert (len(train), len(test)) == (2_490, 277)
    assert sum(row["label"] for row in test) == 131
    assert set(train[0]) == {"text", "text_pair", "label", "row"}
    # the files were written with CSV quoting: read as Python's csv reads them by default
    with (SHARED_DATA / "rte" / "validation.tsv").open(newline="") as file:
        expected = [(r["sentence1"], r["sentence2"]) for r in csv.DictReader(file, delimiter="\t")]
    assert [(row["text"], row["text_pair"]) for row in test] == expected
    assert sum(text.startswith('"') for text, _ in expected) < 10  # quoting: 3 would give 48


@needs_data
def test_gsm8k_dev_is_carved_from_train_and_sized_for_a_cpu():
    spec = load_spec(study_file("gsm8k-smollm2"), offline("gsm8k-smollm2"))
    data = load_task_data(spec.task, spec.seed)
    assert len(data.train) == spec.task.max_train_examples
    assert len(data.dev) == spec.task.max_dev_examples
    questions = {row["prompt"] for row in data.train}
    assert not questions & {row["prompt"] for row in data.dev}
    assert all("\n#### " in row["response"] for row in data.train + data.dev)
    assert len(load_split(spec.task, "test")) == 1_319


# ------------------------------------------------------------------ real models, real data


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("name", ["sst2-minilm", "rte-minilm", "gsm8k-smollm2"])
def test_real_study_runs_one_tiny_trial_offline(name, tmp_path, capsys, request):
    if name.endswith("smollm2"):
        request.getfixturevalue("smollm2_cache")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    overrides = [*offline(name), *TINY[name], "budget.max_epochs=1"]
    argv = ["run", str(study_file(name)), "--storage", storage, "--n-trials", "1"]
    assert main([*argv, *[f"--set={item}" for item in overrides]]) == 0
    assert "[1/1] trial 0" in capsys.readouterr().out
    study = optuna.load_study(study_name=name, storage=storage)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert 0.0 <= trial.value <= 1.0
    assert trial.user_attrs["n_params"] > 0
    hits = unpack_hits(trial.user_attrs["dev_hits"])  # best's noise margin reads them
    assert len(hits) == (2 if name.endswith("smollm2") else 16)
    assert sum(hits) / len(hits) == pytest.approx(trial.value)


@pytest.mark.slow
def test_smollm2_second_load_comes_from_the_cache(smollm2_cache, monkeypatch):
    # counted, not timed: the second load reads no GGUF file (de-quantizing it took 14-25 s
    # here, loading the converted copy 0.2-0.3 s; a busy machine's seconds prove neither)
    gguf_reads = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        load = auto.from_pretrained

        def spy(*args, load=load, **kwargs):
            gguf_reads.extend([kwargs["gguf_file"]] if "gguf_file" in kwargs else [])
            return load(*args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", spy)
    converted = sorted(cache_dir().glob("smollm2-*/config.json"))
    base = load_base_model("embedded:smollm2", "causal_lm")
    assert converted and sorted(cache_dir().glob("smollm2-*/config.json")) == converted
    assert gguf_reads == []
    assert (base.num_layers, base.hidden_size, base.is_decoder) == (30, 576, True)
    tokenizer = base.tokenizer
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert tokenizer.pad_token_id == 2 and tokenizer.model_max_length == 2048
    # The output layer is the (tied) embedding, not a random init: the model answers.
    model = base.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


@pytest.mark.slow
def test_smollm2_batched_generation_follows_left_padding(smollm2_cache):
    """Rows of different lengths, decoded in one left-padded batch, get the same interventions
    (at their own first/last tokens) and so the same output as decoded alone."""
    base = load_base_model("embedded:smollm2", "causal_lm")
    task = TaskSpec(kind="generation", data=DataSpec(builtin="arithmetic"))
    rows = [
        {"prompt": "Question: what is 12 plus 30? Answer:", "response": "42"},
        {"prompt": "2+2=", "response": "4"},
    ]
    examples = encode(rows, base.tokenizer, task)
    assert len({e.prompt_length for e in examples}) == 2
    reft = ReftModule(ReftConfig("loreft", (10, 20), 2, 2, False, 4), base.hidden_size)
    with torch.no_grad():
        for param in reft.parameters():  # a visible edit, not the near-identity init
            param.add_(0.5 * torch.randn_like(param))
    with reft.attached(base.blocks):
        batched = generate(base, reft, examples, max_new_tokens=6)
        alone = [generate(base, reft, [e], max_new_tokens=6)[0] for e in examples]
    assert batched == alone


@pytest.mark.slow
def test_smollm2_takes_a_classification_head(smollm2_cache):
    base = load_base_model("embedded:smollm2", "classification", num_labels=3)
    base.reset_head(0)
    assert [p.shape for p in base.head_parameters()] == [torch.Size([3, 576])]
    batch = base.tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = base.model(**batch).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("model", ["embedded:minilm", "embedded:smollm2"])
def test_the_classification_warm_starts_train_on_the_real_models(model, tmp_path, capsys, request):
    """`warm_start: {recipes: paper}`'s three GLUE configs (the recipe at lr 3e-3 and 1e-2,
    and at rank 4) are the first trials of a classification study, on the 6-layer encoder
    and the 30-layer decoder alike."""
    if model.endswith("smollm2"):
        request.getfixturevalue("smollm2_cache")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    overrides = [
        *offline("sst2-minilm"),
        f"model={model}",
        "task.max_train_examples=8",
        "task.max_dev_examples=4",
        "task.max_length=32",
        "budget.max_epochs=1",
        "finalize=null",
    ]
    argv = ["run", str(study_file("sst2-minilm")), "--storage", storage, "--n-trials", "3"]
    assert main([*argv, *[f"--set={item}" for item in overrides]]) == 0
    out = capsys.readouterr().out
    trials = optuna.load_study(study_name="sst2-minilm", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3, out
    assert [t.user_attrs["warm_start"] for t in trials] == [
        "paper-glue-lr0.003",
        "paper-glue-lr0.01",
        "paper-glue-rank4-lr0.01",
    ]
    assert [(t.params["rank"], t.params["lr"]) for t in trials] == [
        (1, pytest.approx(3e-3)),
        (1, pytest.approx(1e-2)),
        (4, pytest.approx(1e-2)),
    ]
    assert {(t.params["layers"], t.params["prefix"], t.params["suffix"]) for t in trials} == {
        ("all", 1, 0)
    }
    params = [t.user_attrs["n_params"] for t in trials]
    assert params[0] == params[1] and params[2] == 4 * params[0]  # rank 4: 4x the recipe's
