"""DoRA and full fine-tuning: trained, pruned and exported like any trial, and reloaded by
their own libraries (peft, transformers) with the outputs reftsearch computed."""

import json

import optuna
import peft
import pytest
import torch
import transformers
from conftest import tiny_study

from reftsearch.cli import main
from reftsearch.methods.full.config import FullConfig
from reftsearch.methods.full.module import FullModule
from reftsearch.methods.lora.config import LoraConfig
from reftsearch.methods.lora.module import LoraModule
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.methods.reft.module import ReftModule
from reftsearch.models.base import load_base_model
from reftsearch.models.packed_linear import torch_linears
from reftsearch.search.costs import weights_bytes
from reftsearch.search.record import TrialRecord
from reftsearch.search.study import prepare
from reftsearch.search.test_split import trained_adapter
from reftsearch.spec.study_file import load_spec

IDS = torch.tensor([[1, 5, 9, 13, 17, 21]])


@pytest.fixture(scope="module")
def base():
    return load_base_model("tiny:llama", "classification")


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_dora_learns_each_rows_magnitude_besides_loras_matrices(base):
    lora = LoraModule(LoraConfig(2, 4.0, 0.0, ("q_proj", "v_proj")), base.blocks)
    dora = LoraModule(LoraConfig(2, 4.0, 0.0, ("q_proj", "v_proj"), use_dora=True), base.blocks)
    # one magnitude per output row: q_proj 64, v_proj 32, in each of 4 blocks
    assert dora.num_parameters() - lora.num_parameters() == 4 * (64 + 32)
    magnitude = dora.adapters["0/self_attn/q_proj"]["magnitude"]["default"].weight
    assert torch.allclose(magnitude, base.blocks[0].self_attn.q_proj.weight.norm(dim=1))


def test_full_trains_a_copy_of_every_weight_and_leaves_the_model_as_it_was(base):
    before = logits(base.model)
    full = FullModule(FullConfig(), base.model, base.head_parameters())
    head = sum(p.numel() for p in base.head_parameters())
    assert full.num_parameters() == sum(p.numel() for p in base.model.parameters()) - head
    with torch.no_grad():
        full.weights["model/norm/weight"].mul_(3.0)
    with full.attached(base.blocks):
        changed = logits(base.model)
        assert base.model.model.norm.weight is full.weights["model/norm/weight"]
    assert not torch.allclose(changed, before)
    assert torch.equal(logits(base.model), before)
    # norms and biases are not decayed (as HF Trainer); matrices are
    assert {p.dim() for p in full.no_decay_parameters()} == {1}


def test_full_keeps_tied_weights_tied():
    lm = load_base_model("tiny:llama", "causal_lm")
    lm.model.config.tie_word_embeddings = True
    lm.model.tie_weights()
    embeddings = lm.model.get_input_embeddings().weight
    assert lm.model.get_output_embeddings().weight is embeddings
    full = FullModule(FullConfig(), lm.model, [])
    with full.attached(lm.blocks):
        trained = lm.model.get_input_embeddings().weight
        assert lm.model.get_output_embeddings().weight is trained and trained is not embeddings
    assert lm.model.get_output_embeddings().weight is embeddings


def test_export_bytes_count_parameters_not_loreft_buffers():
    """LoReFT's orthogonal parametrization keeps a 64 x 64 buffer per intervention, which
    the pyreft export does not write: the recorded size leaves it out."""
    config = ReftConfig("loreft", (0, 1), prefix=1, suffix=0, tied=False, rank=2, dropout=0.0)
    reft = ReftModule(config, 64)
    assert weights_bytes(reft) == 4 * reft.num_parameters() == 4 * 2 * (2 * 64 + 2 + 64 * 2)


def method_study(data, method, **changes) -> dict:
    """Three trials; the third's learning rate cannot learn anything, and median pruning
    stops it after its first epoch."""
    raw = tiny_study(
        data,
        name=method,
        method=method,
        budget={"n_trials": 3, "max_epochs": 3},
        sampler="grid",
        pruner={"type": "median", "n_startup_trials": 1},
        **changes,
    )
    lrs = {"dora": [3e-2, 2e-2, 1e-9], "full": [3e-3, 2e-3, 1e-9]}[method]
    raw["space"] = {"lr": lrs, "batch_size": 8}
    if method == "dora":
        raw["space"].update(rank=2, alpha=8)
    return raw


def base_model_of(spec) -> torch.nn.Module:
    return load_base_model(spec.model.path, "classification").model


def reftsearch_logits(study_path, trial: int, ids=IDS) -> torch.Tensor:
    """A trial's logits on ``ids``, computed by reftsearch's own model and adapter."""
    spec = load_spec(study_path)
    study = optuna.load_study(study_name=spec.name, storage=spec.storage)
    prepared = prepare(spec)
    adapter, source = trained_adapter(prepared, study, study.trials[trial], print)
    assert source.startswith("kept artifact")
    # torch's linear layers, as the library that loads the export
    with adapter.attached(prepared.base.blocks), torch_linears(prepared.base.model):
        return logits(prepared.base.model, ids)


@pytest.mark.parametrize("method", ["dora", "full"])
def test_a_method_trains_prunes_and_exports_what_its_library_loads(
    method, write_study, easy_task_files, tmp_path, capsys
):
    path = write_study(method_study(easy_task_files, method))
    assert main(["run", str(path)]) == 0
    spec = load_spec(path)
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).trials
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"], [t.intermediate_values for t in trials]
    assert trials[2].user_attrs["pruned_at_epoch"] == 1
    assert all(t.user_attrs["config"]["method"] == method for t in trials)
    assert trials[0].user_attrs["type"] == method
    first = TrialRecord.of(trials[0])
    assert first.base_params == sum(p.numel() for p in base_model_of(spec).parameters())
    # both rounded to milliseconds when stored
    assert first.epoch_s == pytest.approx(first.wall_time_s / 3, abs=1e-3)
    assert 0 < first.peak_memory_mb < 64 * 1024

    assert main(["report", str(path), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert ("full fine-tuning trains every weight" in page) == (method == "full")

    out = tmp_path / "out"
    assert main(["export", str(path), str(out)]) == 0
    sidecar = json.loads((out / "reftsearch.json").read_text())
    assert sidecar["config"]["method"] == method and set(sidecar["files"]) <= {
        p.name for p in out.iterdir()
    }
    if method == "full":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    else:
        base_model = transformers.AutoModelForSequenceClassification.from_pretrained(
            out / "base_model"
        )
        model = peft.PeftModel.from_pretrained(base_model, out)
        assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    # the recorded size is the weights' bytes: the weight file adds only its header
    exported = TrialRecord.of(trials[sidecar["trial"]]).export_bytes
    weight_file = out / ("model.safetensors" if method == "full" else "adapter_model.safetensors")
    assert 0 < weight_file.stat().st_size - exported < 64 * 1024
    expected = reftsearch_logits(path, sidecar["trial"])
    assert torch.allclose(logits(model.eval()), expected, atol=1e-5)


def test_full_refuses_a_model_that_does_not_fit_the_memory_given(
    write_study, easy_task_files, capsys
):
    raw = method_study(easy_task_files, "full", resources={"memory_mb": 1})
    path = write_study(raw)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "method: 'full' trains every weight of the model: batches of 8 x" in err
    assert "more than the 1 MB resources.memory_mb" in err
    assert not path.with_suffix(".db").exists()


def reload_exported(out, kind: str) -> torch.nn.Module:
    """The export loaded as its library loads it: transformers for full fine-tuning, peft on
    the base model the export names (or copied) for LoRA and DoRA."""
    auto = {
        "classification": transformers.AutoModelForSequenceClassification,
        "generation": transformers.AutoModelForCausalLM,
    }[kind]
    sidecar = json.loads((out / "reftsearch.json").read_text())
    if sidecar["config"]["method"] == "full":
        return auto.from_pretrained(out).eval()
    source = out / sidecar["base_model"]["load_from"]  # an absolute path stays one
    return peft.PeftModel.from_pretrained(auto.from_pretrained(source), out).eval()


def one_trial_study(method: str, model: str, data, kind: str) -> dict:
    """A single short trial of ``method`` on a real model."""
    raw = tiny_study(
        data, name=f"{method}-real", method=method, model=model, sampler="grid",
        budget={"n_trials": 1, "max_epochs": 1}, finalize=False,
    )  # fmt: skip
    raw["task"] = {"kind": kind, "data": data, "max_length": 32, "max_new_tokens": 4}
    if kind == "classification":
        raw["task"]["text"] = "text"
        del raw["task"]["max_new_tokens"]
    raw["space"] = {"lr": 1e-3 if method == "dora" else 5e-5, "batch_size": 4}
    return raw


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora", "full"])
def test_minilm_exports_reload_with_equal_outputs(method, write_study, easy_task_files, tmp_path):
    raw = one_trial_study(method, "embedded:minilm", easy_task_files, "classification")
    path = write_study(raw)
    assert main(["run", str(path)]) == 0
    out = tmp_path / "out"
    assert main(["export", str(path), str(out)]) == 0
    model = reload_exported(out, "classification")
    ids = torch.tensor([[101, 2748, 2417, 2630, 102]])  # [CLS] yes red blue [SEP]
    assert torch.allclose(logits(model, ids), reftsearch_logits(path, 0, ids), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora", "full"])
def test_smollm2_exports_reload_with_equal_outputs(method, write_study, tmp_path):
    rows = [{"prompt": f"Add {a} and 3:", "response": f" {a + 3}"} for a in range(6)]
    data = {}
    for split, part in (("train", rows[:4]), ("dev", rows[4:])):
        data[split] = str(tmp_path / f"{split}.jsonl")
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    raw = one_trial_study(method, "embedded:smollm2", data, "generation")
    path = write_study(raw)
    assert main(["run", str(path)]) == 0
    out = tmp_path / "out"
    assert main(["export", str(path), str(out)]) == 0
    model = reload_exported(out, "generation")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    expected = reftsearch_logits(path, 0, ids)
    assert torch.allclose(logits(model, ids), expected, atol=1e-4)
