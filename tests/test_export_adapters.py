"""reftsearch export --format adapters: a trained trial -> AdapterHub adapters 1.3.0's files.

Quick tests check the files and the refusals on tiny models; the slow ones load the exports
in the real adapters (an isolated venv built once by tests/tools/adapters_ref/INSTALL.sh,
never a dependency) and compare its logits with reftsearch's.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from conftest import REPO, built_venv, tiny_study
from test_export import run_and_export, write_study

from reftsearch.cli import main
from reftsearch.data.batches import Encoded
from reftsearch.engine.scoring import generate
from reftsearch.export.adapters import unit_tensors
from reftsearch.methods.reft.interventions import DiReFT, LoReFT
from reftsearch.models.base import load_base_model
from reftsearch.search.study import prepare
from reftsearch.search.test_split import trained_adapter
from reftsearch.spec.study_file import load_spec

ADAPTERS_TOOLS = REPO / "tests" / "tools" / "adapters_ref"
ADAPTERS_VENV = Path(
    os.environ.get("REFTSEARCH_ADAPTERS_VENV", Path.home() / ".cache/reftsearch/adapters-venv")
)
ATOL = 1e-4
UNIT = "reft_layer.refts.reftsearch.units"  # what adapters 1.3.0's save_adapter names a unit


def adapter_files(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((out / "adapter_config.json").read_text())
    return config, torch.load(out / "pytorch_adapter.bin", weights_only=True)


def test_untied_loreft_on_a_decoder_is_two_units_per_layer(tmp_path, easy_task_files, capsys):
    space = {"intervention": "loreft", "layers": "1;3", "prefix": 2, "suffix": 3, "tied": False}
    study = write_study(tmp_path, "cls", "tiny:llama", space, data=easy_task_files)
    out = tmp_path / "out"
    assert run_and_export(study, out, "--format", "adapters") == 0
    assert "note:" not in capsys.readouterr().err  # only generation studies get one

    config, state = adapter_files(out)
    assert config["name"] == "reftsearch" and config["version"] == "adapters.1.3.0"
    assert config["model_class"] == "LlamaForSequenceClassification"
    assert config["model_type"] == "llama"
    assert config["config"] == {
        "architecture": "reft", "layers": [1, 3], "prefix_positions": 2, "suffix_positions": 3,
        "r": 2, "orthogonality": True, "tied_weights": False, "dropout": 0.0,
        "non_linearity": None, "dtype": None, "output_reft": True, "init_weights_seed": None,
    }  # fmt: skip
    shapes = {
        "learned_source.weight": [2, 64],
        "learned_source.bias": [2],
        "projection.parametrizations.weight.original": [2, 64],
        "projection.parametrizations.weight.0.base": [64, 64],
    }
    assert {k: list(v.shape) for k, v in state.items()} == {
        f"model.layers.{layer}.{UNIT}.{unit}.{name}": shape
        for layer in (1, 3)
        for unit in (0, 1)
        for name, shape in shapes.items()
    }
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert (out / "base_model" / "config.json").is_file()
    assert not (out / "pytorch_model_head.bin").exists()  # base_model/ holds the trained head
    sidecar = json.loads((out / "reftsearch.json").read_text())
    assert sidecar["adapters"]["config_class"] == "LoReftConfig"
    assert sidecar["config"]["positions"] == "f2+l3" and sidecar["note"] is None


def test_loreft_rotation_rebuilds_exactly_in_adapters_projection():
    """adapters' projection (Linear(hidden, rank) under torch's orthogonal parametrization)
    loaded with the exported tensors computes R^T of the trained intervention."""
    torch.manual_seed(0)
    loreft = LoReFT(16, 3)
    with torch.no_grad():  # away from the init, as after training
        loreft.rotate_layer.parametrizations.weight.original.add_(0.3 * torch.randn(16, 3))
    rotation = loreft.rotation().detach()
    projection = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(16, 3, bias=False))
    tensors = unit_tensors(loreft)
    projection.load_state_dict(
        {k.removeprefix("projection."): v for k, v in tensors.items() if "projection" in k}
    )
    assert torch.allclose(projection.weight, rotation.T, atol=1e-6)
    assert not torch.allclose(rotation, torch.eye(16, 3), atol=1e-2)


def test_direft_is_written_as_the_noreft_adapters_loads():
    """adapters 1.3.0 reloads every ReftConfig with subtract_projection=True: DiReFT's
    h + (W h + b) P is written as h + (W' h + b - P h) P, W' = W + P."""
    torch.manual_seed(0)
    direft = DiReFT(16, 3)
    h = torch.randn(5, 16)
    t = unit_tensors(direft)
    weight, bias, projection = (
        t[k] for k in ("learned_source.weight", "learned_source.bias", "projection.weight")
    )
    noreft = h + (h @ weight.T + bias - h @ projection.T) @ projection  # adapters' ReftUnit
    assert torch.allclose(noreft, direft(h), atol=1e-6)
    assert not torch.allclose(weight, direft.learned_source.weight, atol=1e-3)


@pytest.mark.parametrize(
    ("intervention", "prefix", "suffix", "tied"),
    [("direft", 2, 1, True), ("noreft", 0, 2, False)],  # one side, untied: one unit
)
def test_encoder_classifier_units_and_head(
    tmp_path, easy_task_files, intervention, prefix, suffix, tied, capsys
):
    space = {"intervention": intervention, "layers": "0;2", "prefix": prefix, "suffix": suffix,
             "tied": tied}  # fmt: skip
    study = write_study(tmp_path, "enc", "tiny:bert", space, data=easy_task_files)
    out = tmp_path / "out"
    assert run_and_export(study, out, "--format", "adapters") == 0
    assert "note:" not in capsys.readouterr().err
    config, state = adapter_files(out)
    assert config["model_class"] == "BertForSequenceClassification"
    assert config["config"]["tied_weights"] is True
    assert config["config"]["orthogonality"] is False
    assert sorted(state) == sorted(
        f"bert.encoder.layer.{layer}.{UNIT}.0.{name}"
        for layer in (0, 2)
        for name in ("learned_source.weight", "learned_source.bias", "projection.weight")
    )
    # a built-in base model: base_model/ holds the trained head, pooler included
    assert not (out / "head_config.json").exists()
    head = load_base_model(str(out / "base_model"), "classification")
    sidecar = json.loads((out / "reftsearch.json").read_text())
    assert sidecar["adapters"]["config_class"] == "NoReftConfig"  # DiReFT too: see below
    assert head.head is not None


def saved_model(tmp_path: Path, name: str, builtin: str) -> str:
    """A built-in classifier saved as a Hugging Face directory: a base model given by path."""
    base = load_base_model(builtin, "classification")
    directory = tmp_path / name
    base.model.save_pretrained(directory)
    base.tokenizer.save_pretrained(directory)
    return str(directory)


def test_a_static_head_outside_the_base_model_is_written_as_adapters_head_files(
    tmp_path, easy_task_files
):
    space = {"intervention": "loreft", "layers": "1", "prefix": 1, "suffix": 1, "tied": True}
    model = saved_model(tmp_path, "llama-dir", "tiny:llama")
    study = write_study(tmp_path, "cls", model, space, data=easy_task_files)
    out = tmp_path / "out"
    assert run_and_export(study, out, "--format", "adapters") == 0
    head_config = json.loads((out / "head_config.json").read_text())
    assert head_config["model_class"] == "LlamaForSequenceClassification"
    assert head_config["num_labels"] == 2 and head_config["name"] is None
    head = torch.load(out / "pytorch_model_head.bin", weights_only=True)
    assert list(head) == ["score.weight"]  # outside "model.": what adapters' loader takes
    assert not (out / "base_model").exists()
    assert json.loads((out / "reference_io.json").read_text())["model"] == model


def refused(study: Path, out: Path, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert main(["export", str(study), str(out), "--format", "adapters", *extra]) == 2
    assert not out.exists()  # refused before anything was written
    return capsys.readouterr().err


def test_refusals_say_why(tmp_path, easy_task_files, capsys):
    # prompts of 11-14 tokens: a prefix of 6 is capped at 5 on the 11-token ones
    space = {"intervention": "loreft", "layers": "1", "prefix": 6, "suffix": 0, "tied": False}
    study = write_study(tmp_path, "gen", "tiny:llama", space)
    assert main(["run", str(study)]) == 0
    err = refused(study, tmp_path / "o1", capsys)
    assert "cannot be exported to adapters" in err and "(the shortest 11)" in err
    assert "2 * max(prefix, suffix) = 12" in err

    suffix = write_study(tmp_path, "suffix", "tiny:llama", {**space, "prefix": 1, "suffix": 2})
    assert main(["run", str(suffix)]) == 0
    assert "a generation study with a suffix (f1+l2)" in refused(suffix, tmp_path / "o5", capsys)

    mixed = write_study(tmp_path, "mixed", "tiny:llama", {**space, "prefix": 2})
    raw = yaml.safe_load(mixed.read_text())
    mixed.write_text(
        yaml.safe_dump({**raw, "model": {"path": "tiny:llama", "dtype": "bfloat16-mixed"}})
    )
    assert main(["run", str(mixed)]) == 0
    # not refused: a 16-bit study's trial is exported from float32 training (ReftUnit does not
    # cast hidden states to its dtype)
    assert main(["export", str(mixed), str(tmp_path / "o2"), "--format", "adapters"]) == 0
    sidecar = json.loads((tmp_path / "o2" / "reftsearch.json").read_text())
    assert sidecar["dev_score_dtype"] == "bfloat16-mixed"
    assert sidecar["weights"].endswith("in float32")

    space = {"intervention": "loreft", "layers": "1", "prefix": 1, "suffix": 1, "tied": True}
    bert = saved_model(tmp_path, "bert-dir", "tiny:bert")  # its head has bert.pooler
    pooled = write_study(tmp_path, "pooled", bert, space, data=easy_task_files)
    assert main(["run", str(pooled)]) == 0
    assert "parameters under 'bert' (e.g. a pooler)" in refused(pooled, tmp_path / "o3", capsys)
    # the pyreft format still takes it (its pytorch_model.bin holds the whole head)
    assert main(["export", str(pooled), str(tmp_path / "o4")]) == 0


def test_lora_trials_are_refused(tmp_path, easy_task_files, capsys):
    raw = tiny_study(easy_task_files, method="lora", budget={"n_trials": 1, "max_epochs": 1})
    raw["space"] = {"rank": 2, "target_modules": "default", "lr": 5e-3, "batch_size": 16}
    study = tmp_path / "lora.yaml"
    study.write_text(yaml.safe_dump(raw))
    assert main(["run", str(study)]) == 0
    assert "only ReFT trials export to adapters" in refused(study, tmp_path / "o", capsys)


# --- the real adapters -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def adapters_python() -> Path:
    """The isolated adapters 1.3.0 venv's python, built once (70-150 s)."""
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    return built_venv(ADAPTERS_VENV, ADAPTERS_TOOLS / "INSTALL.sh", "adapters-ref-freeze.txt", env)


def check_in_adapters(python: Path, out: Path, generate: int = 0) -> dict:
    """tests/adapters_check.py in the adapters venv; its stdout is one JSON summary."""
    command = [str(python), str(REPO / "tests" / "adapters_check.py"), str(out)]
    command += ["--atol", str(ATOL), "--generate", str(generate)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.stdout.strip(), result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"adapters check of {out}: {json.dumps(summary)}")  # the figures, with pytest -s
    assert result.returncode == 0, json.dumps(summary)[:3000]
    return summary


def arithmetic_files(directory: Path) -> dict:
    """A generation task without a test split (a 30-layer model on 2 CPU cores is spared the
    test scoring): "a plus b =" -> " a+b"."""
    rows = [(a, b) for a in range(12) for b in range(12)]
    files = {"train": rows[:48], "dev": rows[48:56]}
    for split, pairs in files.items():
        lines = (
            json.dumps({"prompt": f"{a} plus {b} =", "response": f" {a + b}"}) for a, b in pairs
        )
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return {split: str(directory / f"{split}.jsonl") for split in files}


def reftsearch_generations(study: Path, out: Path, max_new_tokens: int) -> list[str]:
    """reftsearch's own greedy texts for the reference inputs, from the trial's kept weights."""
    spec = load_spec(study)
    prepared = prepare(spec)
    stored = optuna.load_study(study_name=spec.name, storage=spec.storage)
    reft, _ = trained_adapter(prepared, stored, stored.best_trial, print)
    reference = json.loads((out / "reference_io.json").read_text())
    prompts = [Encoded(e["input_ids"], len(e["input_ids"])) for e in reference["examples"]]
    reft.eval()
    with reft.attached(prepared.base.blocks):
        return generate(prepared.base, reft, prompts, max_new_tokens)


def check_generation_study(tmp_path: Path, python: Path, model: str, space: dict) -> dict:
    """A prefix-only generation study: logits, and the texts adapters decodes as the export's
    note says, against reftsearch's."""
    study = write_study(tmp_path, "s", model, space)
    raw = yaml.safe_load(study.read_text())
    raw["task"]["data"] = arithmetic_files(tmp_path)
    study.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = tmp_path / "out"
    assert run_and_export(study, out, "--format", "adapters") == 0
    assert "use_cache=False" in json.loads((out / "reftsearch.json").read_text())["note"]
    summary = check_in_adapters(python, out, generate=6)
    assert summary["generated"] == reftsearch_generations(study, out, 6)
    return summary


ADAPTERS_CHECK_CASES = {
    "llama-loreft-untied": ("tiny:llama", {"intervention": "loreft", "layers": "0;2;3",
                                           "prefix": 2, "suffix": 3, "tied": False}),
    "llama-noreft-suffix": ("tiny:llama", {"intervention": "noreft", "layers": "1;2",
                                           "prefix": 0, "suffix": 2, "tied": False}),
    "bert-direft-tied": ("tiny:bert", {"intervention": "direft", "layers": "1", "prefix": 1,
                                       "suffix": 1, "tied": True}),
    "bert-loreft-untied": ("tiny:bert", {"intervention": "loreft", "layers": "0;3",
                                         "prefix": 2, "suffix": 2, "tied": False}),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", ADAPTERS_CHECK_CASES)
def test_classifier_export_matches_real_adapters(tmp_path, easy_task_files, adapters_python, case):
    model, space = ADAPTERS_CHECK_CASES[case]
    study = write_study(tmp_path, "s", model, space, data=easy_task_files)
    out = tmp_path / "out"
    assert run_and_export(study, out, "--format", "adapters") == 0
    summary = check_in_adapters(adapters_python, out)
    assert summary["ok"] and summary["examples"] == 3
    assert summary["logits_max_abs_diff"] <= ATOL and summary["base_logits_max_abs_diff"] <= ATOL


@pytest.mark.slow
def test_prefix_generation_export_decodes_as_reftsearch_in_real_adapters(tmp_path, adapters_python):
    space = {"intervention": "loreft", "layers": "0;2;3", "prefix": 3, "suffix": 0, "tied": False}
    summary = check_generation_study(tmp_path, adapters_python, "tiny:llama", space)
    assert summary["ok"] and summary["logits_max_abs_diff"] <= ATOL


@pytest.mark.slow
def test_a_static_head_loads_in_real_adapters(tmp_path, easy_task_files, adapters_python):
    """A base model given by path: load_adapter loads the trained head from the head files."""
    space = {"intervention": "loreft", "layers": "1;2", "prefix": 1, "suffix": 2, "tied": False}
    model = saved_model(tmp_path, "llama-dir", "tiny:llama")
    study = write_study(tmp_path, "cls", model, space, data=easy_task_files)
    out = tmp_path / "out"
    assert run_and_export(study, out, "--format", "adapters") == 0
    summary = check_in_adapters(adapters_python, out)
    assert summary["ok"] and summary["base_logits_max_abs_diff"] <= ATOL


@pytest.mark.slow
def test_minilm_export_matches_real_adapters(tmp_path, easy_task_files, adapters_python):
    """MiniLM with its trained classification head (pooler included, in base_model/)."""
    space = {"intervention": "loreft", "layers": "1;4", "prefix": 2, "suffix": 2, "tied": False}
    study = write_study(tmp_path, "s", "embedded:minilm", space, data=easy_task_files)
    out = tmp_path / "out"
    assert run_and_export(study, out, "--format", "adapters") == 0
    summary = check_in_adapters(adapters_python, out)
    assert summary["ok"] and summary["logits_max_abs_diff"] <= ATOL


@pytest.mark.slow
def test_smollm2_export_matches_real_adapters(tmp_path, adapters_python):
    """SmolLM2 (30 layers): the prompt's next-token logits and greedy texts, base_model/
    written the way the pyreft export writes it."""
    space = {"intervention": "loreft", "layers": "20;29", "prefix": 2, "suffix": 0, "tied": False}
    summary = check_generation_study(tmp_path, adapters_python, "embedded:smollm2", space)
    assert summary["ok"] and summary["logits_max_abs_diff"] <= ATOL


def test_adapters_is_not_a_dependency():
    requirements = importlib.metadata.requires("reftsearch") or []
    assert requirements and not [r for r in requirements if r.startswith("adapters")]
