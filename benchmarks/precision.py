"""What 16-bit precision costs in dev score and buys in time: throughput.py's configs and data,
trained by reftsearch in each ``model.dtype`` with several seeds.

The seed is the study's (intervention init and batch order); the data sample stays the same.
One seed's dev score moves by several points with any change to rounding (float32 on two
CPUs differed by 2.3 points on one config), so precisions are compared on the mean over
seeds. Usage::

    .venv/bin/python benchmarks/precision.py [--quick] [--dtypes float32 bfloat16-mixed]

The 16-bit dtypes need a CPU with native bfloat16 math (AVX512-BF16, AMX) or a GPU to be
fast. Last line: ``mixed_minus_float32=X.X`` (mean dev score over configs and seeds, points).
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
        print(f"mixed_speedup_vs_float32={speed:.2f}")
        print(f"mixed_minus_float32={statistics.fmean(gap):+.1f}")


if __name__ == "__main__":
    main()
