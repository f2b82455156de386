"""Trial packing: trials per hour with k trials trained side by side on one device.

A SmolLM2-135M-shaped Llama (random weights: only shapes matter for speed), batch 32 x 128
tokens per trial, LoReFT (rank 4, f1+l2) at layer 15, LM head on the 8 response tokens.
Measured: a bare forward+backward of the layers a trial runs (those above the cached
frozen prefix; no interventions), one trial's training step (``engine.packing.Pack`` with one
member, from the prefix cache), and the step of k = 1, 2, 4, 8, 16 packed trials, each with its own
interventions and optimizer. On CUDA the base weights are bf16
(interventions fp32); on CPU float32. ``--quick`` shrinks the model and batch for a CPU run.

Usage::

    .venv/bin/python benchmarks/gpu_packing.py [--quick] [--device cuda|cpu]

Last line: ``packing_speedup=X.XX`` (trials per hour at the best k / at k = 1).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reftsearch.data.batches import IGNORE_INDEX, Encoded, SplitData, collate
from reftsearch.engine.activation_cache import PrefixCache
from reftsearch.engine.packing import Pack, TrialRun
from reftsearch.engine.train import TrainConfig
from reftsearch.methods.reft.config import ReftConfig
from reftsearch.methods.reft.module import ReftModule
from reftsearch.models.base import BaseModel

WARMUP, TIMED = 2, 5
RESPONSE = 8  # supervised tokens per row


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    tokens: int
    layer: int  # where the intervention sits
    packs: tuple[int, ...]


SMOLLM2 = Shape(576, 1536, 30, 9, 3, 49152, 32, 128, 15, (1, 2, 4, 8, 16))
QUICK = Shape(128, 256, 6, 4, 2, 2048, 8, 32, 3, (1, 2, 4, 8))


def build(shape: Shape, device: str) -> BaseModel:
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2 * shape.tokens,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    blocks = list(model.model.layers)
    tokenizer = SimpleNamespace(pad_token_id=0)
    return BaseModel(model, tokenizer, blocks, None, shape.hidden, shape.layers, True, "shape")


def examples(shape: Shape, n: int, seed: int) -> list[Encoded]:
    ids = torch.randint(
        1, shape.vocab, (n, shape.tokens), generator=torch.Generator().manual_seed(seed)
    )
    prompt = shape.tokens - RESPONSE
    return [
        Encoded(row, prompt, labels=[IGNORE_INDEX] * prompt + row[prompt:]) for row in ids.tolist()
    ]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step, device: str) -> float:
    seconds = []
    for i in range(WARMUP + TIMED):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        if i >= WARMUP:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def bare_step(base: BaseModel, shape: Shape, device: str):
    """Forward and backward of the layers a trial runs, with nothing trained in them."""
    batch = collate(examples(shape, shape.batch, 0), 0).to(device)
    hidden = torch.randn(shape.batch, shape.tokens, shape.hidden, device=device)
    hidden = hidden.to(base.model.dtype).requires_grad_(True)
    position_ids = torch.arange(shape.tokens, device=device)[None]
    rotary = base.model.model.rotary_emb(hidden, position_ids=position_ids)
    head = base.model.get_output_embeddings()

    def step() -> None:
        x = hidden
        for block in base.blocks[shape.layer + 1 :]:
            x = block(x, attention_mask=None, position_embeddings=rotary, position_ids=position_ids)
        x = base.model.model.norm(x)
        supervised = batch.labels[:, 1:] != IGNORE_INDEX
        logits = head(x[:, :-1][supervised])
        loss = torch.nn.functional.cross_entropy(logits.float(), batch.labels[:, 1:][supervised])
        loss.backward()
        hidden.grad = None

    return step


def packed_step(base: BaseModel, shape: Shape, k: int):
    """One ``Pack.step`` of k trials, each with its own interventions and optimizer."""
    steps = WARMUP + TIMED + 1  # never reach an epoch's end (no dev pass in the timing)
    data = SplitData(
        examples(shape, shape.batch * steps, 1), examples(shape, 1, 2), "generation", "loss"
    )
    pack = Pack(base, PrefixCache(budget_mb=8192))  # as a worker runs: from layer 15's states
    for i in range(k):
        torch.manual_seed(i)
        reft = ReftModule(ReftConfig("loreft", (shape.layer,), 1, 2, True, 4), shape.hidden)
        config = TrainConfig(lr=1e-3, epochs=1, batch_size=shape.batch, seed=i)
        pack.add(TrialRun(reft.to(base.device), data, config, None))
    return pack, pack.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shape, for a CPU check")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    shape = QUICK if args.quick else SMOLLM2
    base = build(shape, args.device)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"{name}: {shape.layers} layers x hidden {shape.hidden}, batch {shape.batch} x "
        f"{shape.tokens} tokens per trial, LoReFT at layer {shape.layer}, {base.model.dtype}",
        flush=True,
    )
    bare = timed(bare_step(base, shape, args.device), args.device)
    print(
        f"bare forward+backward of layers {shape.layer + 1}-{shape.layers - 1}: {bare * 1e3:.1f} ms"
    )
    per_hour = {}
    for k in shape.packs:
        pack, step = packed_step(base, shape, k)
        with pack:
            seconds = timed(step, args.device)
        per_hour[k] = k / seconds
        label = "one trial's step" if k == 1 else f"{k} trials packed"
        print(
            f"{label}: {seconds * 1e3:.1f} ms per step, {per_hour[k] / per_hour[1]:.2f}x the "
            f"trials per hour of k=1",
            flush=True,
        )
    best = max(per_hour, key=per_hour.get)
    print(f"best k={best}")
    print(f"packing_speedup={per_hour[best] / per_hour[1]:.2f}")


if __name__ == "__main__":
    main()
