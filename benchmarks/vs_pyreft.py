"""reftsearch against the real pyreft 0.1.0 loop, on the same configs and rows.

The baseline is what a pyreft user runs for each configuration of a hand-made grid, as
pyreft's README does it: a fresh process that imports pyreft, loads the base model, builds the
data with ``make_last_position_supervised_data_module``, trains with HF Trainer
(``ReftTrainerForCausalLM``), and scores dev one prompt at a time with
``reft_model.generate``. It runs in the isolated venv that
../shared/tools/pyreft_ref/INSTALL.sh builds (pyreft pins transformers 4.45.1, so it is never
a dependency; cached in ~/.cache/reftsearch/pyreft-venv, or $REFTSEARCH_PYREFT_VENV, and
built on first use, ~80 s), on the SmolLM2 base model reftsearch converts from its GGUF file
and writes for transformers 4.45 as its exports do (``save_base_model_for_transformers4``).

reftsearch's arm is ``reftsearch run`` on a study with the same configs enqueued, in one fresh
process (benchmarks/throughput.py's study and rows: SST-2 reviews prompted ``Review:
...\\nSentiment:``, exact match of the greedy answer). Both arms are timed as whole processes.

Configs: four last-token LoReFT interventions on SmolLM2 (layers 15 / 15 / 8;15 / 25, ranks
4 / 1 / 4 / 4), lr 4e-3 (pyreft's README), batch 8, one epoch over 512 SST-2 train rows, 256
dev rows (``--quick``: the first two configs, 128 train and 64 dev rows). Usage::

    .venv/bin/python benchmarks/vs_pyreft.py [--quick] [--device cuda] [--dtype auto]

Both arms run with reftsearch's OpenMP setting, a short spin before a thread sleeps
(``GOMP_SPINCOUNT``, unless the environment sets a wait policy): on a machine other jobs load,
torch's longer spinning waits slow both loops, reftsearch's small kernels most, and that is
benchmarks/shared_machine.py's measure, not this one's.

Dev scores: one seed per arm differs by seed noise alone (a LoReFT init and a batch order):
on 256 rows, the L8;15 config scored 0.77-0.86 over five reftsearch seeds. After the timed
runs, reftsearch's arm reruns its configs with ``--seeds`` - 1 more seeds (untimed, from its
frozen store) and prints each config's mean and spread, and how far pyreft's one score lies
from that mean, in standard deviations. That both loops are one recipe is shown exactly by
tests/test_pyreft_recipe.py: from the same start and batches, their weights agree to ~3e-7.

Last line: ``speedup_vs_pyreft=X.XX`` (pyreft's wall time for the configs / reftsearch's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from throughput import MAX_NEW_TOKENS, SEED, read_rows, run_reftsearch, study_yaml, write_data

REPO = Path(__file__).resolve().parents[1]
PYREFT_TOOLS = REPO.parent / "shared" / "tools" / "pyreft_ref"
PYREFT_VENV = Path(
    os.environ.get("REFTSEARCH_PYREFT_VENV", Path.home() / ".cache/reftsearch/pyreft-venv")
)
LR = 4.0e-3  # pyreft's README example
BATCH_SIZE = 8

# last-token LoReFT (pyreft's "l1", the README's recipe) on SmolLM2's 30 layers
CONFIGS = [
    dict(intervention="loreft", layers=layers, prefix=0, suffix=1, tied=False, rank=rank,
         lr=LR, batch_size=BATCH_SIZE)
    for layers, rank in (("15", 4), ("15", 1), ("8;15", 4), ("25", 4))
]  # fmt: skip


def pyreft_python() -> Path:
    """The pyreft venv's python, built by INSTALL.sh when missing (as tests/test_export.py)."""
    python = PYREFT_VENV / "bin" / "python"
    if not (PYREFT_VENV / "pyreft-ref-freeze.txt").exists():  # INSTALL.sh's last step
        print(f"building the pyreft 0.1.0 venv in {PYREFT_VENV} (once, ~80 s)", flush=True)
        subprocess.run(["bash", str(PYREFT_TOOLS / "INSTALL.sh"), str(PYREFT_VENV)], check=True)
    return python


def write_base_model(folder: Path) -> Path:
    """SmolLM2 as reftsearch converts it, saved for transformers 4.45 (not timed: reftsearch's
    arm converts once per machine too)."""
    from reftsearch.export.base_model import save_base_model_for_transformers4
    from reftsearch.models.base import load_base_model

    base = load_base_model("embedded:smollm2", "causal_lm")
    target = folder / "smollm2-transformers4"
    save_base_model_for_transformers4(base.model, base.tokenizer, target)
    return target


# --------------------------------------------------------------------------- pyreft arm


def pyreft_trial(config: dict, model_dir: str, train_path: Path, dev_path: Path, device: str):
    """One configuration as pyreft's README trains and scores it, in this (fresh) process of
    the pyreft venv; returns its stage times and dev score."""
    start = time.perf_counter()
    import pyreft
    import torch
    import transformers

    imported = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, torch_dtype=torch.float32
    ).to(device)
    # right padding as pyreft's examples: its positions count on unpadded text
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, padding_side="right")
    tokenizer.model_max_length = 2048  # the GGUF's 1e30 overflows the tokenizer call
    loaded = time.perf_counter()

    layers = [int(layer) for layer in config["layers"].split(";")]
    torch.manual_seed(SEED)
    representations = [
        {
            "layer": layer,
            "component": "block_output",
            "low_rank_dimension": config["rank"],
            "intervention": pyreft.LoreftIntervention(
                embed_dim=model.config.hidden_size,
                low_rank_dimension=config["rank"],
                dtype=torch.float32,  # its default builds part of it in bfloat16
            ),
        }
        for layer in layers
    ]
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=representations))
    reft_model.set_device(device)
    train = read_rows(train_path)
    data_module = pyreft.make_last_position_supervised_data_module(
        tokenizer,
        model,
        [row["prompt"] for row in train],
        [row["response"] for row in train],
        num_interventions=len(layers),
    )
    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(
            output_dir=output_dir,
            num_train_epochs=1,
            per_device_train_batch_size=config["batch_size"],
            learning_rate=config["lr"],
            lr_scheduler_type="linear",
            warmup_ratio=0.0,
            weight_decay=0.0,
            logging_steps=1000,
            save_strategy="no",
            report_to=[],
            seed=SEED,
            use_cpu=device == "cpu",
            disable_tqdm=True,
        )
        trainer = pyreft.ReftTrainerForCausalLM(
            model=reft_model, tokenizer=tokenizer, args=args, **data_module
        )
        prepared = time.perf_counter()
        trainer.train()
    trained = time.perf_counter()

    right = 0
    dev = read_rows(dev_path)
    for row in dev:  # one prompt at a time, as pyreft's README scores
        # a fast tokenizer of transformers 4.45 adds token_type_ids, which generate() refuses
        prompt = tokenizer(row["prompt"], return_tensors="pt", return_token_type_ids=False)
        prompt = prompt.to(device)
        last = prompt["input_ids"].shape[-1] - 1
        _, response = reft_model.generate(
            prompt,
            unit_locations={"sources->base": (None, [[[last]]] * len(layers))},
            intervene_on_prompt=True,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
        )
        text = tokenizer.decode(
            response[0][prompt["input_ids"].shape[-1] :], skip_special_tokens=True
        )
        right += " ".join(text.split()) == " ".join(row["response"].split())
    done = time.perf_counter()
    return {
        "import_s": imported - start,
        "load_s": loaded - imported,
        "data_s": prepared - loaded,
        "train_s": trained - prepared,
        "dev_s": done - trained,
        "dev_score": right / len(dev),
    }


def run_pyreft(
    python: Path, model_dir: Path, train: Path, dev: Path, configs: list[dict], device: str
) -> list[dict]:
    from reftsearch.engine.threads import prefer_short_waits  # not in the pyreft venv

    results = []
    for config in configs:
        start = time.perf_counter()
        command = [str(python), __file__, "--pyreft-trial", json.dumps(config)]
        command += [str(model_dir), str(train), str(dev), device]
        # the pyreft venv must not see reftsearch's modules; the benchmarks folder it needs
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
        prefer_short_waits(env)  # as reftsearch's arm runs (see the module's text)
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["wall_s"] = time.perf_counter() - start
        results.append(result)
        print(
            f"  pyreft L[{config['layers']}] r{config['rank']}: {result['wall_s']:.1f}s "
            f"(import {result['import_s']:.1f} + load {result['load_s']:.1f} + data "
            f"{result['data_s']:.1f} + train {result['train_s']:.1f} + dev "
            f"{result['dev_s']:.1f}), dev={result['dev_score']:.3f}",
            flush=True,
        )
    return results


# --------------------------------------------------------------------------- main


def print_seed_noise(configs: list[dict], theirs: list[dict], seeded: list[list[float]]) -> None:
    """Each config's reftsearch dev score over seeds, and pyreft's one score against it."""
    if len(seeded) < 2:
        return
    print(f"dev scores over {len(seeded)} reftsearch seeds (pyreft: one seed):")
    for index, (config, result) in enumerate(zip(configs, theirs, strict=True)):
        scores = [run[index] for run in seeded]
        mean, spread = statistics.mean(scores), statistics.stdev(scores)
        away = (result["dev_score"] - mean) / spread if spread else float("inf")
        print(
            f"  L[{config['layers']}] r{config['rank']}: reftsearch {mean:.3f} +- {spread:.3f} "
            f"({min(scores):.3f}-{max(scores):.3f}), pyreft {result['dev_score']:.3f} "
            f"({away:+.1f} sd)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 configs, 128 train / 64 dev rows")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda, for both arms")
    parser.add_argument(
        "--dtype",
        default="float32",
        help="reftsearch's model.dtype (default float32, as pyreft's arm; auto: bfloat16-mixed "
        "where the CPU or GPU has native bfloat16 math)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="reftsearch's arm over this many seeds, for the dev scores' noise (default 3; "
        "the extra seeds are not timed)",
    )
    parser.add_argument("--pyreft-trial", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pyreft_trial:
        config, model_dir, train, dev, device = args.pyreft_trial
        result = pyreft_trial(json.loads(config), model_dir, Path(train), Path(dev), device)
        print(json.dumps(result))
        return

    configs = CONFIGS[:2] if args.quick else CONFIGS
    n_train, n_dev = (128, 64) if args.quick else (512, 256)
    python = pyreft_python()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train, dev = write_data(folder, n_train, n_dev)
        start = time.perf_counter()
        model_dir = write_base_model(folder)
        print(
            f"{len(configs)} configs, 1 epoch over {n_train} SST-2 rows, {n_dev} dev, batch "
            f"{BATCH_SIZE}, on {args.device}; base model converted and saved for pyreft in "
            f"{time.perf_counter() - start:.1f}s (not timed)",
            flush=True,
        )
        print("pyreft 0.1.0 (a fresh process per config):", flush=True)
        theirs = run_pyreft(python, model_dir, train, dev, configs, args.device)
        print(f"reftsearch (one `reftsearch run`, model.dtype {args.dtype}):", flush=True)
        study = study_yaml(folder, train, dev, configs, args.dtype)
        raw = json.loads(study.read_text())
        raw["model"]["device"] = args.device
        study.write_text(json.dumps(raw))
        ours = run_reftsearch(study, configs)
        for line in ours["stdout"].splitlines():  # its stages: load, frozen passes, trials
            if line.startswith(("loaded", "frozen pass", "estimate", "trial")):
                print(f"    {line}", flush=True)
        print(f"reftsearch's arm again at {args.seeds - 1} more seeds (not timed):", flush=True)
        seeded = [ours["scores"]]
        for seed in range(SEED + 1, SEED + args.seeds):
            again = folder / f"seed{seed}.yaml"  # a study of its own; the same frozen store
            again.write_text(json.dumps({**raw, "name": f"throughput-seed{seed}", "seed": seed}))
            seeded.append(run_reftsearch(again, configs)["scores"])

    pyreft_wall = sum(r["wall_s"] for r in theirs)
    print()
    print(f"pyreft: {pyreft_wall:.1f}s for {len(configs)} configs")
    for key in ("import_s", "load_s", "data_s", "train_s", "dev_s"):
        print(f"  {key[:-2]:>6}: {sum(r[key] for r in theirs):7.1f}s")
    print(
        f"reftsearch: {ours['wall_s']:.1f}s for {len(configs)} configs (model load "
        f"{ours['load_s']:.1f}s once, trials {ours['trials_s']:.1f}s)"
    )
    print(
        f"dev scores pyreft {[round(r['dev_score'], 3) for r in theirs]}, "
        f"reftsearch {[round(s, 3) for s in ours['scores']]}"
    )
    print_seed_noise(configs, theirs, seeded)
    print(f"speedup_vs_pyreft={pyreft_wall / ours['wall_s']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
