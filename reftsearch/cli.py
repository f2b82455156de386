"""``reftsearch`` command line. Exit codes: 0 ok, 1 the run failed, 2 bad input."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from reftsearch.errors import BadInputError, ReftSearchError
from reftsearch.spec import StudySpec, load_spec

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return args.handler(args)
    except ReftSearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_FAILED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reftsearch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="start or resume a study")
    _add_study_arguments(run)
    run.add_argument("--n-trials", type=int, help="run until this many trials have finished")
    run.add_argument("--workers", type=int, help="parallel workers (default: resources.workers)")
    run.set_defaults(handler=_run)

    validate = commands.add_parser("validate", help="check study files (spec only)")
    validate.add_argument("studies", nargs="+", metavar="STUDY")
    validate.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    validate.set_defaults(handler=_validate)

    estimate = commands.add_parser("estimate", help="time a few configs, predict the cost")
    _add_study_arguments(estimate)
    estimate.add_argument("--samples", type=int, default=6, help="configs to time (default 6)")
    estimate.add_argument("--workers", type=int, help="workers (default: resources.workers)")
    estimate.add_argument("--json", action="store_true", help="print JSON")
    estimate.set_defaults(handler=_estimate)

    best = commands.add_parser("best", help="show the best trials of a study")
    _add_study_arguments(best)
    best.add_argument("--top", type=int, default=1, help="how many trials (default 1)")
    best.add_argument("--json", action="store_true", help="print JSON")
    best.add_argument(
        "--test",
        action="store_true",
        help="evaluate the best config once on the test split (retrains it)",
    )
    best.set_defaults(handler=_best)
    return parser


def _add_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY", help="study file (YAML)")
    parser.add_argument("--storage", help="storage URL (default: the spec's storage)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a spec value, e.g. --set budget.n_trials=5",
    )


def _spec(args: argparse.Namespace) -> StudySpec:
    return load_spec(args.study, args.set)


def _run(args: argparse.Namespace) -> int:
    from reftsearch.runner import run_study

    if args.n_trials is not None and args.n_trials < 1:
        raise BadInputError(f"--n-trials: must be a positive integer, got {args.n_trials}")
    spec = _spec(args)
    workers = args.workers or spec.resources.workers
    if workers != 1:
        raise BadInputError(f"--workers: only 1 worker is supported so far, got {workers}")
    study = run_study(spec, args.storage or spec.storage, args.n_trials)
    _print_best(study, top=1)
    return EXIT_OK


def _estimate(args: argparse.Namespace) -> int:
    from reftsearch.estimate import estimate_study
    from reftsearch.study import prepare

    if args.samples < 1:
        raise BadInputError(f"--samples: must be a positive integer, got {args.samples}")
    spec = _spec(args)
    workers = args.workers or spec.resources.workers
    estimate = estimate_study(prepare(spec), spec.budget.n_trials, workers, args.samples)
    if args.json:
        print(json.dumps(estimate.to_dict(), indent=2))
        return EXIT_OK
    for label, cost in (("cheapest", estimate.cheapest), ("median", estimate.median),
                        ("most expensive", estimate.most_expensive)):
        print(f"{label:>15}: {cost.epoch_s:8.1f}s/epoch {cost.trial_s:8.1f}s/trial  {cost.config}")
    print(estimate.line())
    return EXIT_OK


def _validate(args: argparse.Namespace) -> int:
    status = EXIT_OK
    for path in args.studies:
        try:
            spec = load_spec(path, args.set)
        except BadInputError as err:
            print(f"{path}: error: {err}", file=sys.stderr)
            status = EXIT_BAD_INPUT
        else:
            print(f"{path}: ok (study {spec.name!r}, {spec.task.kind}, metric {spec.metric})")
    return status


def _best(args: argparse.Namespace) -> int:
    from reftsearch.report import best_trials, trial_summary
    from reftsearch.study import load_existing_study

    if args.top < 1:
        raise BadInputError(f"--top: must be a positive integer, got {args.top}")
    spec = _spec(args)
    study = load_existing_study(spec, args.storage or spec.storage)
    trials = best_trials(study, args.top)
    if not trials:
        raise ReftSearchError(f"study {spec.name!r} has no completed trial yet")
    summaries = [trial_summary(study, t) for t in trials]
    if args.test:
        from reftsearch.final import test_score

        summaries[0]["test_score"] = test_score(spec, study, trials[0], log=_stderr)
    if args.json:
        print(json.dumps(summaries[0] if args.top == 1 else summaries, indent=2))
    else:
        _print_best(study, args.top, summaries)
    return EXIT_OK


def _print_best(study, top: int, summaries: list[dict] | None = None) -> None:
    from reftsearch.report import best_trials, format_table, trial_summary

    if summaries is None:
        summaries = [trial_summary(study, t) for t in best_trials(study, top)]
    print(format_table(summaries, study.user_attrs.get("metric", "value")))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _quiet_libraries() -> None:
    """Keep the output to reftsearch's own lines; libraries' chatter goes nowhere."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Heartbeats are "experimental" since Optuna 2.8, yet they are what keeps a killed trial
    # from staying RUNNING forever: the warning is noise to our users.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


if __name__ == "__main__":
    sys.exit(main())
