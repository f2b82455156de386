"""reftsearch trains LoReFT as pyreft 0.1.0 does: from the same start, on the same batches,
one epoch of ``train_trial`` and one of pyreft's HF Trainer end at the same weights.

The real pyreft runs in its isolated venv (../shared/tools/pyreft_ref/INSTALL.sh) on the
embedded SmolLM2, saved for its transformers 4.45. What is compared covers the whole recipe:
which tokens are supervised (the response and the end of sequence), where the intervention
sits (the last prompt token), the loss's normalisation (the mean over a batch's supervised
tokens), AdamW, the linear schedule and the gradient clipping. pyreft takes the rows in
reftsearch's batch order (a sequential sampler) and starts from reftsearch's init, down to
R's orthogonal parametrization, whose fixed ``base`` decides how R moves.
"""

import json
import subprocess

import pytest
import torch
from conftest import REPO, SHARED_DATA

from reftsearch.engine.train import TrainConfig, epoch_batches, train_trial
from reftsearch.export.base_model import save_base_model_for_transformers4
from reftsearch.methods.adapter import build_adapter
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.search.study import prepare
from reftsearch.spec.study_file import load_spec

TRAIN_FROM = REPO / "tests" / "tools" / "pyreft_recipe" / "train_from.py"
SEED = 3
CONFIG = ReftConfig("loreft", (8, 15), prefix=0, suffix=1, tied=False, rank=4)
TRAIN = TrainConfig(lr=4e-3, epochs=1, batch_size=8, seed=SEED)


def sst2_prompts(path, n: int) -> list[dict]:
    """The first ``n`` SST-2 rows as vs_pyreft.py's prompts and one-word answers."""
    lines = path.read_text().splitlines()[1 : n + 1]
    rows = [line.split("\t") for line in lines]
    return [
        {"prompt": f"Review: {text.strip()}\nSentiment:",
         "response": " positive" if label == "1" else " negative"}
        for text, label in rows
    ]  # fmt: skip


@pytest.fixture
def smollm2_sst2(tmp_path, write_study):
    if not (SHARED_DATA / "sst2" / "train.tsv").exists():
        pytest.skip("needs ../shared/data/sst2")
    files = {}
    for split, n in (("train", 64), ("dev", 8)):
        files[split] = tmp_path / f"{split}.json"
        files[split].write_text(json.dumps(sst2_prompts(SHARED_DATA / "sst2" / "train.tsv", n)))
    raw = {
        "name": "recipe",
        "storage": f"sqlite:///{tmp_path / 'recipe.db'}",
        "model": {"path": "embedded:smollm2", "dtype": "float32"},
        "task": {"kind": "generation", "data": {k: str(v) for k, v in files.items()},
                 "max_length": 128, "max_new_tokens": 2},
        "metric": "exact_match",
        "budget": {"n_trials": 1, "max_epochs": 1},
        "space": {"layers": "8;15", "rank": 4, "lr": TRAIN.lr, "batch_size": TRAIN.batch_size},
    }  # fmt: skip
    return prepare(load_spec(write_study(raw)))


def loreft_starts(adapter) -> list[dict]:
    """Each intervention's init as pyreft's side sets it (tests/tools/pyreft_recipe)."""
    starts = []
    for layer in CONFIG.layers:
        intervention = adapter.intervention(layer, 0)
        orthogonal = intervention.rotate_layer.parametrizations.weight
        starts.append(
            {
                "weight": intervention.learned_source.weight.detach().clone(),
                "bias": intervention.learned_source.bias.detach().clone(),
                "original": orthogonal.original.detach().clone(),
                "base": orthogonal[0].base.clone(),
            }
        )
    return starts


@pytest.mark.slow
def test_one_epoch_of_smollm2_ends_where_pyreft_ends(smollm2_sst2, pyreft_python, tmp_path):
    prepared = smollm2_sst2
    base, split = prepared.base, prepared.split
    adapter = build_adapter(CONFIG, base, SEED)
    torch.save(loreft_starts(adapter), tmp_path / "init.pt")
    # train_trial's batches: its own generator, seeded as it seeds it
    lengths = [len(e.input_ids) for e in split.train]
    order = epoch_batches(lengths, TRAIN.batch_size, torch.Generator().manual_seed(SEED))
    assert all(len(rows) == TRAIN.batch_size for rows in order)  # pyreft's batches are these
    rows = [prepared.data.train[i] for batch in order for i in batch]

    train_trial(base, adapter, split, TRAIN, cache=prepared.cache_for(CONFIG))

    model_dir = tmp_path / "smollm2-transformers4"
    save_base_model_for_transformers4(base.model, base.tokenizer, model_dir)
    job = {"model_dir": str(model_dir), "rows": rows, "layers": list(CONFIG.layers),
           "rank": CONFIG.rank, "lr": TRAIN.lr, "batch_size": TRAIN.batch_size, "seed": SEED,
           "init": str(tmp_path / "init.pt")}  # fmt: skip
    (tmp_path / "job.json").write_text(json.dumps(job))
    ran = subprocess.run(
        [str(pyreft_python), str(TRAIN_FROM), str(tmp_path / "job.json"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    assert len(theirs["losses"]) == len(order)

    starts = loreft_starts(build_adapter(CONFIG, base, SEED))
    for layer, start, pyreft_trained in zip(CONFIG.layers, starts, theirs["layers"], strict=True):
        ours = adapter.intervention(layer, 0)
        trained = {
            "weight": ours.learned_source.weight.detach(),
            "bias": ours.learned_source.bias.detach(),
            "rotate_layer": ours.rotation().detach(),
        }
        # Adam moves W and b by ~lr a step; the two loops agree to float32 noise (~3e-7 here),
        # far below that (from pyreft's own shuffled batches instead: 3e-2 apart)
        for name in ("weight", "bias"):
            moved = (trained[name] - start[name]).abs().max().item()
            assert moved > 2 * TRAIN.lr, f"layer {layer} {name} did not train"
        for name, value in trained.items():
            torch.testing.assert_close(value, pyreft_trained[name], atol=1e-5, rtol=0)
