"""reftsearch export: a trained trial -> a pyreft 0.1.0 ReftModel directory.

Unit tests read the files back into reftsearch; the integration tests load them in the real
pyreft (an isolated venv built by ../shared/tools/pyreft_ref/INSTALL.sh, never a dependency).
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import PYREFT_TOOLS, REPO

from reftsearch.cli import main
from reftsearch.errors import BadInputError
from reftsearch.export.base_model import transformers4_config
from reftsearch.export.pyreft import pyvene_keys
from reftsearch.export.reader import open_export
from reftsearch.methods.reft.module import ReftModule
from reftsearch.models.builtin import BUILTIN_MODELS
from reftsearch.models.packed_linear import torch_linears
from reftsearch.search.study import open_study
from reftsearch.spec.study_file import load_spec

ATOL = 1e-4


def write_study(
    directory: Path, name: str, model: str, space: dict, data=None, n_trials: int = 1
) -> Path:
    """A one-trial study with every searched value fixed, so the exported config is known."""
    if data is None:  # generation: the builtin arithmetic task
        task = {"kind": "generation", "data": "builtin:arithmetic", "prompt": "prompt",
                "response": "response", "max_train_examples": 48, "max_dev_examples": 8,
                "max_length": 32, "max_new_tokens": 3}  # fmt: skip
        metric = "exact_match"
    else:
        task = {"kind": "classification", "data": data, "text": "text", "max_length": 32}
        metric = "accuracy"
    raw = {
        "name": name,
        "model": model,
        "task": task,
        "metric": metric,
        "seed": 5,
        "budget": {"n_trials": n_trials, "max_epochs": 2},
        "sampler": {"type": "random"},
        "pruner": "none",
        "space": {"rank": 2, "lr": 2e-2, "batch_size": 16, "epochs": 2, **space},
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_and_export(study: Path, out: Path, *extra: str) -> int:
    assert main(["run", str(study)]) == 0
    return main(["export", str(study), str(out), *extra])


def reload_into_reftsearch(out: Path) -> tuple[object, ReftModule]:
    """The export read back by reftsearch (its reader, as ``predict EXPORT_DIR`` reads it) on
    the CPU, in the dtype it was trained in, once its files are checked to hold pyreft's
    tensor names."""
    for path in out.glob("intkey_*.bin"):
        state = torch.load(path, weights_only=True)
        assert list(state) in (
            ["weight", "bias", "rotate_layer"],  # LoReFT
            [
                "embed_dim",
                "interchange_dim",
                "learned_source.weight",
                "learned_source.bias",
                "proj_layer.weight",
            ],  # fmt: skip
        )
    return open_export(out).load(device="cpu")


def reftsearch_logits(base, reft: ReftModule, example: dict) -> torch.Tensor:
    ids = torch.tensor([example["input_ids"]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in example:
        inputs["token_type_ids"] = torch.tensor([example["token_type_ids"]])
    reft.eval()
    # torch's linear layers, as the library that loads the export
    with torch.no_grad(), reft.attached(base.blocks), torch_linears(base.model):
        reft.set_locations(torch.tensor([len(example["input_ids"])]))
        logits = base.model(**inputs).logits[0]
    return logits if base.head is not None else logits[-1, : len(example["logits_head"])]


def test_export_writes_pyreft_files_that_reproduce_the_logits(tmp_path, capsys):
    space = {"intervention": "loreft", "layers": "1;3", "prefix": 2, "suffix": 3, "tied": False}
    study = write_study(tmp_path, "gen", "tiny:llama", space)
    assert run_and_export(study, tmp_path / "out") == 0
    out = tmp_path / "out"
    assert "exported trial 0" in capsys.readouterr().out

    config = json.loads((out / "config.json").read_text())
    keys = [f"layer_{n}_comp_block_output_unit_pos_nunit_1#{g}" for g in (0, 1) for n in (1, 3)]
    assert config["sorted_keys"] == keys == pyvene_keys(config["representations"])
    assert config["representations"][0] == [1, "block_output", "pos", 1, 2] + [None] * 9
    assert config["intervention_constant_sources"] == [True] * 4
    assert set(config["intervention_types"]) == {
        "<class 'pyreft.interventions.LoreftIntervention'>"
    }
    state = torch.load(out / f"intkey_{keys[0]}.bin", weights_only=True)
    assert {k: (list(v.shape), v.dtype) for k, v in state.items()} == {
        "weight": ([2, 64], torch.float32),
        "bias": ([2], torch.float32),
        "rotate_layer": ([64, 2], torch.float32),
    }
    R = state["rotate_layer"].double()
    assert torch.allclose(R.T @ R, torch.eye(2, dtype=torch.float64), atol=1e-5)

    sidecar = json.loads((out / "reftsearch.json").read_text())
    assert sidecar["positions"] == "f2+l3" and sidecar["tied"] is False
    assert sidecar["pyreft_loadable"] is True and sidecar["weights"].startswith("kept artifact")
    assert 0.0 <= sidecar["test_score"] <= 1.0 and sidecar["trial"] == 0

    reference = json.loads((out / "reference_io.json").read_text())
    base, reft = reload_into_reftsearch(out)
    for example in reference["examples"]:
        n = len(example["input_ids"])
        assert example["positions"] == [
            [0, 1],
            [0, 1],
            [n - 3, n - 2, n - 1],
            [n - 3, n - 2, n - 1],
        ]
        got = reftsearch_logits(base, reft, example)
        assert torch.allclose(got, torch.tensor(example["logits_head"]), atol=1e-5)
        assert not torch.allclose(got, torch.tensor(example["base_logits_head"]), atol=1e-3)


def test_a_mixed_precision_study_exports_its_pick_retrained_in_float32(tmp_path):
    space = {"intervention": "loreft", "layers": "1;3", "prefix": 1, "suffix": 2, "tied": True}
    study = write_study(tmp_path, "gen", "tiny:llama", space)
    raw = yaml.safe_load(study.read_text())
    study.write_text(
        yaml.safe_dump({**raw, "model": {"path": "tiny:llama", "dtype": "bfloat16-mixed"}})
    )
    out = tmp_path / "out"
    assert run_and_export(study, out) == 0
    sidecar = json.loads((out / "reftsearch.json").read_text())
    assert sidecar["base_model"]["dtype"] == "float32"
    assert sidecar["dev_score_dtype"] == "bfloat16-mixed"  # what the search scored it in
    assert sidecar["weights"] == f"retrained with seed {raw['seed']} in float32"
    base, reft = reload_into_reftsearch(out)
    assert base.dtype == "float32"
    for example in json.loads((out / "reference_io.json").read_text())["examples"]:
        got = reftsearch_logits(base, reft, example)
        assert torch.allclose(got, torch.tensor(example["logits_head"]), atol=1e-5)


@pytest.mark.parametrize("intervention", ["noreft", "direft"])
def test_export_of_an_encoder_classifier_keeps_head_and_weights(
    tmp_path, easy_task_files, intervention, capsys
):
    space = {"intervention": intervention, "layers": "0;2", "prefix": 2, "suffix": 1, "tied": True}
    study = write_study(tmp_path, "enc", "tiny:bert", space, data=easy_task_files)
    assert run_and_export(study, tmp_path / "out") == 0
    out = tmp_path / "out"
    assert "ReftModel.load cannot rebuild" in capsys.readouterr().err
    sidecar = json.loads((out / "reftsearch.json").read_text())
    assert sidecar["pyreft_loadable"] is False and "add_bias" in sidecar["pyreft_note"]
    config = json.loads((out / "config.json").read_text())
    assert config["sorted_keys"][0] == "comp_bert_encoder_layer[0]_output_unit_pos_nunit_1#0"
    head = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= set(head)

    base, reft = reload_into_reftsearch(out)
    for name, tensor in head.items():  # base_model/ holds the same trained head
        assert torch.equal(dict(base.model.named_parameters())[name], tensor)
    for example in json.loads((out / "reference_io.json").read_text())["examples"]:
        got = reftsearch_logits(base, reft, example)
        assert torch.allclose(got, torch.tensor(example["logits_head"]), atol=1e-5)


def test_export_retrains_when_the_kept_weights_are_gone(tmp_path, capsys):
    space = {"intervention": "loreft", "layers": "2", "prefix": 0, "suffix": 2, "tied": False}
    study = write_study(tmp_path, "gen", "tiny:llama", space)
    assert run_and_export(study, tmp_path / "kept") == 0
    shutil.rmtree(tmp_path / "gen.artifacts")
    capsys.readouterr()
    assert main(["export", str(study), str(tmp_path / "retrained")]) == 0
    captured = capsys.readouterr()
    assert "retraining its config with seed 5" in captured.err
    assert "not touching test again" in captured.err  # the test score is the cached one
    kept, retrained = (
        json.loads((tmp_path / d / "reference_io.json").read_text()) for d in ("kept", "retrained")
    )
    # retrained through the cache, as the trial trained: the same weights, bit for bit
    assert torch.equal(torch.tensor(kept["logits_head"]), torch.tensor(retrained["logits_head"]))
    assert "retrained with seed 5" in (tmp_path / "retrained" / "reftsearch.json").read_text()


def test_export_refuses_bad_input(tmp_path, capsys):
    raw = {"intervention": "loreft", "layers": "1", "prefix": 1, "suffix": 1, "tied": True}
    study = write_study(tmp_path, "gen", "tiny:llama", {**raw, "lr": [2e-2, 1e30]}, n_trials=2)
    spec = load_spec(study)
    study_db = open_study(spec, spec.storage)
    study_db.enqueue_trial({"lr": 1e30})  # diverges: FAIL
    study_db.enqueue_trial({"lr": 2e-2})  # completes: the run has a result
    assert main(["run", str(study)]) == 0
    states = [t.state for t in optuna.load_study(study_name="gen", storage=spec.storage).trials]
    assert states[0] == optuna.trial.TrialState.FAIL
    capsys.readouterr()
    assert main(["export", str(study), str(tmp_path / "o"), "--trial", "7"]) == 2
    assert "has no trial 7" in capsys.readouterr().err
    assert main(["export", str(study), str(tmp_path / "o"), "--trial", "0"]) == 2
    assert "must be COMPLETE (trained to its end), it is FAIL" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", str(study), str(tmp_path / "busy")]) == 2
    assert "must be empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_export_replaces_only_what_a_previous_export_wrote(tmp_path, capsys):
    space = {"intervention": "loreft", "layers": "1", "prefix": 1, "suffix": 1, "tied": True}
    study = write_study(tmp_path, "gen", "tiny:llama", space)
    out = tmp_path / "out"
    assert run_and_export(study, out) == 0
    sidecar = json.loads((out / "reftsearch.json").read_text())
    assert sidecar["files"] == sorted(p.name for p in out.iterdir())
    assert "base_model" in sidecar["files"] and "reftsearch.json" in sidecar["files"]
    first = (out / "reference_io.json").read_text()

    capsys.readouterr()
    assert main(["export", str(study), str(out)]) == 0  # a previous export: replaced
    assert "Writing model shards" not in capsys.readouterr().err  # transformers' progress bar
    assert sorted(p.name for p in out.iterdir()) == sidecar["files"]
    assert (out / "reference_io.json").read_text() == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []

    (out / "notes.txt").write_text("mine")  # an export with a file of the user's: refused
    capsys.readouterr()
    assert main(["export", str(study), str(out)]) == 2
    assert "holds files no reftsearch export wrote (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == sorted([*sidecar["files"], "notes.txt"])


def test_export_into_a_symlink_is_refused_before_scoring(tmp_path, capsys):
    space = {"intervention": "loreft", "layers": "1", "prefix": 1, "suffix": 1, "tied": True}
    study = write_study(tmp_path, "gen", "tiny:llama", space)
    assert main(["run", str(study)]) == 0
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    capsys.readouterr()
    assert main(["export", str(study), str(tmp_path / "link")]) == 2
    captured = capsys.readouterr()
    assert "is a symbolic link" in captured.err and "scoring" not in captured.err
    spec = load_spec(study)
    stored = optuna.load_study(study_name="gen", storage=spec.storage).user_attrs
    assert not [key for key in stored if key.startswith("test_score")]  # test never touched
    assert (tmp_path / "link").is_symlink() and list((tmp_path / "real").iterdir()) == []


def tiny_llama_directory(directory: Path, rope_theta: float) -> Path:
    """tiny:llama saved as a Hugging Face directory by transformers 5, with ``rope_theta``
    (a key only ``rope_parameters`` holds there, as in SmolLM2's config)."""
    model, tokenizer = BUILTIN_MODELS["tiny:llama"]("tiny:llama", "causal_lm", 2, torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    assert "rope_theta" not in config
    config["rope_parameters"]["rope_theta"] = rope_theta
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_local_model_is_referenced_with_its_checksums(tmp_path):
    model = tiny_llama_directory(tmp_path / "my-llama", rope_theta=100000.0)
    space = {"intervention": "direft", "layers": "1;2", "prefix": 1, "suffix": 2, "tied": False}
    study = write_study(tmp_path, "gen", str(model), space)
    out = tmp_path / "out"
    assert run_and_export(study, out) == 0
    assert not (out / "base_model").exists()
    assert sum(p.stat().st_size for p in out.iterdir()) < 200_000  # the model alone is ~530 kB
    sidecar = json.loads((out / "reftsearch.json").read_text())
    base_model = sidecar["base_model"]
    assert base_model["load_from"] == str(model.resolve()) and base_model["copied"] is False
    weights = model / "model.safetensors"
    assert base_model["sha256"] == {weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()}
    config = json.loads((out / base_model["config"]).read_text())
    assert config["rope_theta"] == 100000.0 and config["rope_scaling"] is None
    assert config["rope_parameters"]["rope_theta"] == 100000.0  # transformers 5 reads it too
    snippet = (out / "reft_config.py").read_text()
    assert f"BASE_MODEL = {str(model.resolve())!r}" in snippet
    assert "BASE_MODEL_CONFIG = 'base_model_config.json'" in snippet

    assert main(["export", str(study), str(tmp_path / "full"), "--with-base-model"]) == 0
    copied = json.loads((tmp_path / "full" / "base_model" / "config.json").read_text())
    assert copied["rope_theta"] == 100000.0
    assert json.loads((tmp_path / "full" / "reftsearch.json").read_text())["base_model"]["copied"]


def test_transformers5_config_fields_are_written_under_their_4_45_names():
    from transformers import LlamaConfig

    plain = transformers4_config(LlamaConfig(rope_theta=5e5, dtype="float32").to_dict())
    assert plain["rope_theta"] == 5e5 and plain["rope_scaling"] is None
    assert plain["torch_dtype"] == "float32"
    scaled = LlamaConfig(
        max_position_embeddings=16384,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )  # fmt: skip
    legacy = transformers4_config(scaled.to_dict())
    assert legacy["rope_theta"] == 10000.0
    assert legacy["rope_scaling"] == {
        "rope_type": "llama3", "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }  # fmt: skip
    ignored = {"model_type": "bert", "position_embedding_type": "relative_key"}
    assert transformers4_config(ignored)["position_embedding_type"] == "absolute"
    per_layer = {"rope_parameters": {"full_attention": {"rope_theta": 1e6}}}
    with pytest.raises(BadInputError, match="one rope setting per layer type"):
        transformers4_config(per_layer)
    with pytest.raises(BadInputError, match="rope_parameters.rope_type: .* no 'proportional'"):
        transformers4_config({"rope_parameters": {"rope_type": "proportional"}})


# --- the real pyreft -------------------------------------------------------------------------


def run_checker(python: Path, *args: str) -> dict:
    """Run a checker in the pyreft venv; its stdout is one JSON summary."""
    result = subprocess.run(
        [str(python), *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.stdout.strip(), result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert result.returncode == 0, json.dumps(summary)[:3000]
    return summary


DECODER_CASES = {
    "untied": {
        "intervention": "loreft",
        "layers": "0;2;3",
        "prefix": 2,
        "suffix": 3,
        "tied": False,
    },
    "tied": {"intervention": "loreft", "layers": "1-3", "prefix": 1, "suffix": 2, "tied": True},
}


@pytest.mark.slow
@pytest.mark.parametrize("case", DECODER_CASES)
def test_decoder_export_loads_in_real_pyreft(tmp_path, pyreft_python, case):
    study = write_study(tmp_path, "gen", "tiny:llama", DECODER_CASES[case])
    out = tmp_path / "out"
    assert run_and_export(study, out) == 0
    summary = run_checker(
        pyreft_python, str(PYREFT_TOOLS / "check_export.py"), str(out),
        "--model", str(out / "base_model"), "--expect-json", str(out / "reference_io.json"),
    )  # fmt: skip
    assert summary["ok"] and summary["pyreft_load"]["ok"]
    assert summary["expect"]["logits_max_abs_diff"] <= ATOL
    assert summary["expect"]["base_logits_max_abs_diff"] <= ATOL
    assert summary["logits"]["max_abs_effect_of_interventions"] > 10 * ATOL

    # the shipped snippet runs there too and reproduces reftsearch's logits
    snippet = subprocess.run(
        [str(pyreft_python), str(out / "reft_config.py")], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert snippet.returncode == 0, snippet.stderr[-3000:]
    printed = json.loads(snippet.stdout.strip().splitlines()[-1])
    reference = json.loads((out / "reference_io.json").read_text())
    assert printed["positions"] == reference["positions"]
    assert torch.allclose(
        torch.tensor(printed["logits"]), torch.tensor(reference["logits_head"]), atol=ATOL
    )
    assert_matches_real_pyreft(pyreft_python, out)


def assert_matches_real_pyreft(python: Path, out: Path) -> dict:
    """tests/pyreft_check.py on ``out``: pyreft's logits with and without the interventions
    within ATOL of reftsearch's, and, for a decoder, the same greedy tokens."""
    summary = run_checker(python, str(REPO / "tests" / "pyreft_check.py"), str(out))
    print(json.dumps(summary))  # the figures, for `pytest -rA`
    assert summary["ok"] and summary["examples"] == 3, summary["failures"]
    assert summary["logits_max_abs_diff"] <= ATOL and summary["base_logits_max_abs_diff"] <= ATOL
    assert summary["max_abs_effect_of_interventions"] > ATOL
    decoder = json.loads((out / "reftsearch.json").read_text())["task"] == "generation"
    assert summary["generations"] == summary["generations_matching"] == (3 if decoder else 0)
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("copied", [False, True])
def test_a_model_with_another_rope_theta_matches_real_pyreft(tmp_path, pyreft_python, copied):
    """rope_theta 100000, which transformers 5 writes only inside rope_parameters: pyreft's
    transformers 4.45 would use 10000 (and different logits) unless the export says it."""
    model = tiny_llama_directory(tmp_path / "my-llama", rope_theta=100000.0)
    space = {"intervention": "loreft", "layers": "0;2", "prefix": 2, "suffix": 2, "tied": False}
    study = write_study(tmp_path, "gen", str(model), space)
    out = tmp_path / "out"
    assert run_and_export(study, out, *(["--with-base-model"] if copied else [])) == 0
    assert (out / "base_model").is_dir() == copied
    assert_matches_real_pyreft(pyreft_python, out)
    if not copied:  # a referenced model whose weights changed since is refused
        with (model / "model.safetensors").open("ab") as weights:
            weights.write(b"\0")
        snippet = subprocess.run(
            [str(pyreft_python), str(out / "reft_config.py")], capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert snippet.returncode != 0
        assert "model.safetensors: not the base model this export was trained on" in (
            snippet.stderr
        )


PYREFT_CHECK_CASES = {
    "bert-loreft-untied": ("tiny:bert", {"intervention": "loreft", "layers": "0;3", "prefix": 2,
                                         "suffix": 2, "tied": False}),
    "bert-direft-tied": ("tiny:bert", {"intervention": "direft", "layers": "1", "prefix": 1,
                                       "suffix": 1, "tied": True}),
    "llama-noreft-untied": ("tiny:llama", {"intervention": "noreft", "layers": "1;2",
                                           "prefix": 1, "suffix": 2, "tied": False}),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", PYREFT_CHECK_CASES)
def test_classifier_export_matches_real_pyreft(tmp_path, easy_task_files, pyreft_python, case):
    model, space = PYREFT_CHECK_CASES[case]
    study = write_study(tmp_path, "cls", model, space, data=easy_task_files)
    out = tmp_path / "out"
    assert run_and_export(study, out) == 0
    assert_matches_real_pyreft(pyreft_python, out)


# embedded:smollm2 (30 layers, rope_theta 100000): one study, a trial per config, an export each
SMOLLM2_CASES = {
    "loreft-f3+l3-untied": {"intervention": "loreft", "prefix": 3, "suffix": 3, "tied": False},
    "loreft-f3+l3-tied": {"intervention": "loreft", "prefix": 3, "suffix": 3, "tied": True},
    "loreft-l5": {"intervention": "loreft", "prefix": 0, "suffix": 5},
    "direft-f3+l3-untied": {"intervention": "direft", "prefix": 3, "suffix": 3, "tied": False},
    "noreft-f3+l3-untied": {"intervention": "noreft", "prefix": 3, "suffix": 3, "tied": False},
}
SMOLLM2_LAYERS = "3;12;24"


@pytest.fixture(scope="module")
def smollm2_study(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("smollm2")
    space = {"intervention": ["loreft", "direft", "noreft"], "layers": SMOLLM2_LAYERS,
             "prefix": [0, 3], "suffix": [3, 5], "tied": [True, False], "lr": 2e-3}  # fmt: skip
    study = write_study(directory, "smol", "embedded:smollm2", space, n_trials=len(SMOLLM2_CASES))
    # prompts of 12 tokens and more (builtin:arithmetic's have 7: too short for l5)
    for split, n in (("train", 32), ("dev", 6)):
        rows = [{"prompt": f"Add the numbers {a} and {a + 3} and write only the sum:",
                 "response": f" {2 * a + 3}"} for a in range(n)]  # fmt: skip
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = yaml.safe_load(study.read_text())
    data = {split: str(directory / f"{split}.jsonl") for split in ("train", "dev")}
    raw["task"] = {**raw["task"], "data": data}
    study.write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = load_spec(study)
    stored = open_study(spec, spec.storage)
    for params in SMOLLM2_CASES.values():
        stored.enqueue_trial(params)
    assert main(["run", str(study)]) == 0
    return study


@pytest.mark.slow
@pytest.mark.parametrize("case", SMOLLM2_CASES)
def test_smollm2_export_matches_real_pyreft(smollm2_study, tmp_path, pyreft_python, case):
    trial = list(SMOLLM2_CASES).index(case)
    out = tmp_path / "out"
    assert main(["export", str(smollm2_study), str(out), "--trial", str(trial)]) == 0
    sidecar = json.loads((out / "reftsearch.json").read_text())
    assert sidecar["config"]["intervention"] == SMOLLM2_CASES[case]["intervention"]
    prefix, suffix = SMOLLM2_CASES[case]["prefix"], SMOLLM2_CASES[case]["suffix"]
    groups = 2 if prefix and suffix and not SMOLLM2_CASES[case]["tied"] else 1
    assert len(sidecar["pyreft"]["sorted_keys"]) == groups * len(SMOLLM2_LAYERS.split(";"))
    assert json.loads((out / "base_model" / "config.json").read_text())["rope_theta"] == 1e5
    assert_matches_real_pyreft(pyreft_python, out)


@pytest.mark.slow
def test_minilm_export_with_its_head_matches_real_pyreft(tmp_path, easy_task_files, pyreft_python):
    space = {"intervention": "loreft", "layers": "1;4", "prefix": 2, "suffix": 2, "tied": False}
    study = write_study(tmp_path, "cls", "embedded:minilm", space, data=easy_task_files)
    out = tmp_path / "out"
    assert run_and_export(study, out) == 0
    assert (out / "pytorch_model.bin").is_file()
    # its PyPI package's directory is named, not copied: only the head and interventions
    sidecar = json.loads((out / "reftsearch.json").read_text())
    assert not sidecar["base_model"]["copied"] and not (out / "base_model").exists()
    assert set(sidecar["base_model"]["sha256"]) == {"model.safetensors"}
    assert sum(p.stat().st_size for p in out.iterdir()) < 2_000_000
    assert_matches_real_pyreft(pyreft_python, out)


def test_pyreft_is_not_a_dependency():
    requirements = importlib.metadata.requires("reftsearch") or []
    assert requirements and not [r for r in requirements if r.startswith(("pyreft", "pyvene"))]
