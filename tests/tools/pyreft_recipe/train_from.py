"""Train pyreft 0.1.0's LoReFT from a given start, as pyreft's README trains it; run in the
isolated pyreft venv (tests/test_pyreft_recipe.py).

    python train_from.py JOB.json OUT.pt

JOB.json: ``model_dir`` (a transformers 4.45 model directory), ``rows`` (prompt/response
dicts, in the order training must take them), ``layers``, ``rank``, ``lr``, ``batch_size``,
``seed`` and ``init`` (a torch file: for each layer, in order, the LoReFT start as
reftsearch holds it: ``weight``, ``bias``, and the orthogonal parametrization's
``original`` and ``base``). One epoch, HF Trainer's defaults otherwise (AdamW, linear decay,
gradient clipping at 1.0); the only change to pyreft's loop is its loader's order, unshuffled,
so that the batches are reftsearch's. OUT.pt: for each layer, ``weight``, ``bias`` and
``rotate_layer`` (R) after training, ``starts`` (each R before it) and ``losses`` (the
logged loss of every step).
"""

import contextlib
import io
import json
import sys
import tempfile

import torch
import transformers

with contextlib.redirect_stdout(io.StringIO()):  # pyvene's "nnsight is not detected"
    import pyreft
    from pyreft.reft_trainer import make_dataloader


class InOrderTrainer(pyreft.ReftTrainerForCausalLM):
    """pyreft's trainer taking the rows in the order given (its own loader shuffles them)."""

    def get_train_dataloader(self):
        return make_dataloader(
            self.train_dataset, self._train_batch_size, self.data_collator, shuffle=False
        )


def start_from(intervention, state: dict) -> None:
    """Set a LoReFT intervention to reftsearch's start: W, b, and R's parametrization
    (its trained ``original`` and its fixed ``base``), not only R's value, which does not fix
    how R moves."""
    with torch.no_grad():
        intervention.learned_source.weight.copy_(state["weight"])
        intervention.learned_source.bias.copy_(state["bias"])
        orthogonal = intervention.rotate_layer.parametrizations.weight
        orthogonal.original.copy_(state["original"])
        orthogonal[0].base.copy_(state["base"])


def main(job_path: str, out_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        job["model_dir"], torch_dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["model_dir"], padding_side="right")
    tokenizer.model_max_length = 2048
    representations = [
        {
            "layer": layer,
            "component": "block_output",
            "low_rank_dimension": job["rank"],
            "intervention": pyreft.LoreftIntervention(
                embed_dim=model.config.hidden_size,
                low_rank_dimension=job["rank"],
                dtype=torch.float32,
            ),
        }
        for layer in job["layers"]
    ]
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=representations))
    init = torch.load(job["init"])
    interventions = [r["intervention"] for r in representations]
    for intervention, state in zip(interventions, init, strict=True):
        start_from(intervention, state)
    starts = [i.rotate_layer.weight.detach().clone() for i in interventions]
    rows = job["rows"]
    data = pyreft.make_last_position_supervised_data_module(
        tokenizer,
        model,
        [row["prompt"] for row in rows],
        [row["response"] for row in rows],
        num_interventions=len(job["layers"]),
    )
    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(
            output_dir=output_dir,
            num_train_epochs=1,
            per_device_train_batch_size=job["batch_size"],
            learning_rate=job["lr"],
            lr_scheduler_type="linear",
            warmup_ratio=0.0,
            weight_decay=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=job["seed"],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = InOrderTrainer(model=reft_model, tokenizer=tokenizer, args=args, **data)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trained = [
        {
            "weight": i.learned_source.weight.detach().clone(),
            "bias": i.learned_source.bias.detach().clone(),
            "rotate_layer": i.rotate_layer.weight.detach().clone(),
        }
        for i in interventions
    ]
    torch.save({"starts": starts, "layers": trained, "losses": losses}, out_path)
    print(json.dumps({"steps": len(losses), "losses": losses}))


if __name__ == "__main__":
    main(*sys.argv[1:])
