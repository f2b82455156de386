"""What 16-bit precision costs in dev score and buys in time: throughput.py's configs and data,
trained by reftsearch in each ``model.dtype`` with several seeds.

The seed is the study's (intervention init and batch order); the data sample stays the same.
One seed's dev score moves by several points with any change to rounding (float32 on two
CPUs differed by 2.3 points on one config), so precisions are compared on the mean over
seeds. Usage::

    .venv/bin/python benchmarks/precision.py [--quick] [--dtypes float32 bfloat16-mixed]

The 16-bit dtypes need a CPU with native bfloat16 math (AVX512-BF16, AMX) or a GPU to be
fast. A study that searched in 16 bits retrains its pick in float32 (finalize, export), so
what its coarser scores cost is a worse pick: per seed, the config ranked first by its
``bfloat16-mixed`` score against the one ranked first by its float32 score, both valued at
their float32 mean over seeds (``mixed_pick_loss``, points; goal: within seed noise, which is
printed beside it). Last lines: ``mixed_minus_float32=X.X`` (mean dev score over configs and
seeds, points), then ``mixed_pick_loss=X.X``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import throughput

BASELINE, MIXED = "float32", "bfloat16-mixed"


def run(dtype: str, seed: int, n_train: int, configs: list[dict]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train, dev = throughput.write_data(folder, n_train, throughput.DEV_EXAMPLES)
        study = throughput.study_yaml(folder, train, dev, configs, dtype, seed=seed)
        return throughput.run_reftsearch(study, configs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 configs x 512 examples")
    parser.add_argument("--dtypes", nargs="+", default=[BASELINE, MIXED])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    args = parser.parse_args()
    configs = throughput.CONFIGS[:2] if args.quick else throughput.CONFIGS
    n_train = 512 if args.quick else 1024
    scores: dict[str, list[list[float]]] = {dtype: [] for dtype in args.dtypes}
    seconds: dict[str, list[float]] = {dtype: [] for dtype in args.dtypes}
    for seed in args.seeds:
        for dtype in args.dtypes:
            result = run(dtype, seed, n_train, configs)
            scores[dtype].append(result["scores"])
            seconds[dtype].append(result["wall_s"])
            print(
                f"seed {seed} {dtype}: {result['wall_s']:.1f}s (trials {result['trials_s']:.1f}s), "
                f"dev {[round(s, 3) for s in result['scores']]}",
                flush=True,
            )
    print()
    print(f"{len(configs)} configs x {len(args.seeds)} seeds, {n_train} train examples")
    for dtype in args.dtypes:
        per_config = [statistics.fmean(column) for column in zip(*scores[dtype], strict=True)]
        print(
            f"{dtype:>15}: mean dev per config {[round(s, 3) for s in per_config]}, "
            f"mean wall {statistics.fmean(seconds[dtype]):.1f}s"
        )
    if BASELINE in scores and MIXED in scores:
        gap = [
            100 * (mixed - exact)
            for mixed_run, exact_run in zip(scores[MIXED], scores[BASELINE], strict=True)
            for mixed, exact in zip(mixed_run, exact_run, strict=True)
        ]
        speed = statistics.fmean(seconds[BASELINE]) / statistics.fmean(seconds[MIXED])
        losses = pick_losses(scores[MIXED], scores[BASELINE])
        noise = [100 * statistics.pstdev(column) for column in zip(*scores[BASELINE], strict=True)]
        print(
            f"pick lost per seed {[round(loss, 1) for loss in losses]} points; float32 seed "
            f"noise (std per config) {[round(n, 1) for n in noise]} points"
        )
        print(f"mixed_speedup_vs_float32={speed:.2f}")
        print(f"mixed_minus_float32={statistics.fmean(gap):+.1f}")
        print(f"mixed_pick_loss={statistics.fmean(losses):.1f}")


def pick_losses(mixed: list[list[float]], exact: list[list[float]]) -> list[float]:
    """Per seed, the float32 points (each config valued at its float32 mean over seeds) lost
    by picking the config the mixed run scored best instead of the one float32 scored best."""
    value = [statistics.fmean(column) for column in zip(*exact, strict=True)]
    configs = range(len(value))
    return [
        100 * (value[max(configs, key=e.__getitem__)] - value[max(configs, key=m.__getitem__)])
        for m, e in zip(mixed, exact, strict=True)
    ]


if __name__ == "__main__":
    main()
