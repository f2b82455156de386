"""``reftsearch`` command line. Exit codes: 0 ok, 1 the run failed, 2 bad input."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from reftsearch.engine.threads import prefer_short_waits
from reftsearch.errors import BadInputError, ReftSearchError, TrialFailed
from reftsearch.own_files import holds, is_stream, refuse_foreign, why_unwritable, written_whole
from reftsearch.spec.study_file import SPLITS, StudySpec, load_spec

if TYPE_CHECKING:
    from reftsearch.search.trial_gain import TrialGain

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
MAX_PORT = 65535
STORAGE_ENV = "REFTSEARCH_STORAGE"  # where `reftsearch worker` finds its storage URL


def main(argv: Sequence[str] | None = None) -> int:
    prefer_short_waits()  # before torch loads OpenMP (reftsearch.engine.threads)
    parser = _parser()
    args = parser.parse_args(argv)
    return report_errors(lambda: args.handler(args), trains=args.command in TRAINING_COMMANDS)


# the commands that run a study's trials: an interrupt ends the running one recorded as
# interrupted, and the same command resumes the study
TRAINING_COMMANDS = ("run", "worker", "compare")


def report_errors(command: Callable[[], int], trains: bool = True) -> int:
    """Run ``command``: a ReftSearchError becomes one line on stderr and its exit code.
    SIGTERM (``kill``, a scheduler's stop) interrupts it as Ctrl-C does: for a command that
    ``trains`` a study's trials, the running trial ends recorded as interrupted, and the same
    command resumes."""
    quiet_libraries()
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = _interruptible(_stopping if trains else _stopping_quietly) if main_thread else {}
    try:
        _check_temporary_folder()
        return command()
    except ReftSearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        again = "run the same command again" + (" to resume" if trains else "")
        print(f"interrupted: {again}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:  # `reftsearch data ... | head`: the reader stopped reading
        # stdout's last flush at exit would raise again ("Exception ignored ...")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _check_temporary_folder() -> None:
    """Libraries that commands import (datasets, through dill) ask for the temporary folder
    at import time, and Python's own check writes a file there: on a full disk that was a
    traceback, "No usable temporary directory found"."""
    try:
        tempfile.gettempdir()
    except OSError as err:
        raise ReftSearchError(
            f"cannot write temporary files ({err.strerror or err}): is the disk full? Free "
            "some space, or set TMPDIR to a folder with room"
        ) from None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interruptible(stopping: Callable[[int, object], None]) -> dict:
    """Let Ctrl-C and SIGTERM interrupt the command (``_interrupt``), later ones only call
    ``stopping``; returns the handlers they had, to put back."""
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, partial(_interrupt, stopping=stopping))
    return handlers


def _interrupt(signum: int, frame: object, stopping: Callable[[int, object], None]) -> None:
    # Only the first signal interrupts: a second one cut short the clean-up of the first (the
    # running trial given back), and that trial's config was lost from the study.
    for each in STOP_SIGNALS:
        signal.signal(each, stopping)
    raise KeyboardInterrupt


def _stopping(signum: int, frame: object) -> None:
    print("stopping: the running trial is being recorded as interrupted", file=sys.stderr)


def _stopping_quietly(signum: int, frame: object) -> None:
    print("stopping", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reftsearch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="start or resume a study")
    _add_study_arguments(run)
    run.add_argument("--n-trials", type=int, help="run until this many trials have finished")
    run.add_argument("--workers", type=int, help="parallel workers (default: resources.workers)")
    run.add_argument(
        "--address",
        help="join this Ray cluster (ray://host:10001 or auto) instead of starting a local one",
    )
    run.set_defaults(handler=_run)

    validate = commands.add_parser(
        "validate",
        help="check study files, their data files (columns, labels, classes) and each against "
        "its model's config (no weights)",
    )
    validate.add_argument("studies", nargs="+", metavar="STUDY")
    validate.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    validate.set_defaults(handler=_validate)

    data = commands.add_parser(
        "data", help="list the rows of each split (a carved dev split's too), by source row"
    )
    _add_study_arguments(data)
    data.add_argument(
        "--split", action="append", choices=SPLITS, help="only this split (repeatable)"
    )
    data.add_argument("--out", metavar="FILE", help="write the rows to FILE (.csv or .tsv)")
    data.set_defaults(handler=_data)

    estimate = commands.add_parser("estimate", help="time a few configs, predict the cost")
    _add_study_arguments(estimate)
    estimate.add_argument(
        "--samples",
        type=int,
        help="configs to time: the study's warm starts first, then random ones (default: as "
        "`run` does, min(3, n_trials))",
    )
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
        help="score the best trial once on the test split, with its kept weights (its "
        "config retrained with its seed only if they are gone)",
    )
    best.add_argument(
        "--csv", metavar="FILE", help="also write every trial as a table (tab-separated: .tsv)"
    )
    best.set_defaults(handler=_best)

    dashboard = commands.add_parser("dashboard", help="watch a study in optuna-dashboard")
    _add_study_arguments(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (no login!)")
    dashboard.add_argument("--port", type=int, default=8080, help="default 8080 (0: any free)")
    dashboard.set_defaults(handler=_dashboard)

    report = commands.add_parser("report", help="write an HTML report with plots")
    _add_study_arguments(report)
    report.add_argument("--out", metavar="DIR", help="default: reports/<study name>")
    report.set_defaults(handler=_report)

    compare = commands.add_parser(
        "compare",
        help="run studies (e.g. ReFT, LoRA, DoRA, full) on one budget, test each pick over "
        "seeds; a table and plots of score against cost",
    )
    compare.add_argument("studies", nargs="+", metavar="STUDY", help="two or more study files")
    compare.add_argument("--n-trials", type=int, help="trials per study (default: the first's)")
    compare.add_argument("--timeout", type=float, help="seconds per study (default: none)")
    compare.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a value in every study, e.g. --set task.data=...",
    )
    compare.add_argument(
        "--out",
        metavar="FILE",
        help="CSV table, its plots beside as .png (default: next to the first STUDY)",
    )
    compare.set_defaults(handler=_compare)

    export = commands.add_parser(
        "export",
        help="write a trial for pyreft (or adapters) to load; LoRA/DoRA for peft, full as a "
        "Hugging Face model",
    )
    _add_study_arguments(export)
    export.add_argument(
        "out_dir", nargs="?", metavar="OUT_DIR", help="default: the spec's export.dir"
    )
    export.add_argument("--trial", type=int, help="trial number (default: the best trial)")
    export.add_argument(
        "--with-base-model",
        action="store_true",
        help="copy the base model into OUT_DIR/base_model (default: only for built-in models; "
        "a hub id or directory is referenced with its weights' sha256)",
    )
    export.add_argument(
        "--format",
        choices=["pyreft", "adapters"],
        default="pyreft",
        help="pyreft: pyreft.ReftModel.load(OUT_DIR); adapters: AdapterHub adapters' "
        "model.load_adapter(OUT_DIR) (default: pyreft)",
    )
    export.set_defaults(handler=_export)

    predict = commands.add_parser(
        "predict", help="run a trained trial on new texts: labels and probabilities, or text"
    )
    _add_study_arguments(
        predict,
        "STUDY|EXPORT_DIR",
        "study file (YAML), or a directory `reftsearch export` wrote (no storage needed)",
    )
    predict.add_argument("--trial", type=int, help="trial number (default: the best trial)")
    inputs = predict.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--text", nargs="+", metavar="T", help="texts (prompts for generation)")
    inputs.add_argument(
        "--input", metavar="FILE", help="a file in the task's format (its columns; label optional)"
    )
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.add_argument("--out", metavar="FILE", help="write to a new FILE instead of stdout")
    predict.set_defaults(handler=_predict)

    worker = commands.add_parser(
        "worker", help="join a study `reftsearch run` created, as one more worker (no Ray)"
    )
    worker.add_argument(
        "--storage",
        type=_storage_url,
        default=os.environ.get(STORAGE_ENV),
        help=f"storage URL (default: ${STORAGE_ENV}; prefer it: a command line is visible "
        "to every user of the machine)",
    )
    worker.add_argument("--study", required=True, help="name of a study `reftsearch run` created")
    worker.add_argument("--n-trials", type=int, help="budget (default: the driver's)")
    worker.set_defaults(handler=_worker)
    return parser


def _add_study_arguments(
    parser: argparse.ArgumentParser, metavar: str = "STUDY", help: str = "study file (YAML)"
) -> None:
    parser.add_argument("study", metavar=metavar, help=help)
    parser.add_argument(
        "--storage", type=_storage_url, help="storage URL (default: the spec's storage)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a spec value, e.g. --set budget.n_trials=5",
    )


def _storage_url(text: str) -> str:
    # an empty --storage (an unset shell variable) must not fall back to the spec's storage
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a storage URL, got an empty string")
    return text


def _spec(args: argparse.Namespace) -> StudySpec:
    return load_spec(args.study, args.set)


def _run(args: argparse.Namespace) -> int:
    from reftsearch.search.storage import check_storage

    _check_count(args.n_trials, "--n-trials")
    spec = _spec(args)
    _check_count(args.workers, "--workers")
    workers = args.workers or spec.resources.workers
    storage = args.storage or spec.storage
    # a bad spec or storage URL is told at once, not after the runner's imports (torch and
    # transformers: ~10 s on a CPU machine)
    check_storage(storage, writing=True)
    print(f"loading {spec.model.path} and the task's data...", flush=True)
    from reftsearch.run.driver import run_study
    from reftsearch.search.trial_gain import trial_gain

    study = run_study(spec, storage, args.n_trials, workers=workers, address=args.address)
    _print_best(study, top=1)
    gain = trial_gain(study, args.n_trials or spec.budget.n_trials, spec.metric)
    if gain is not None:  # whether raising --n-trials pays, from this study's own scores
        print(gain.line())
    return EXIT_OK


def _estimate(args: argparse.Namespace) -> int:
    _check_count(args.samples, "--samples")
    _check_count(args.workers, "--workers")
    spec = _spec(args)
    workers = args.workers or spec.resources.workers
    storage = args.storage or spec.storage
    from reftsearch.search.storage import check_storage

    check_storage(storage)  # a study not run yet is fine; a storage that cannot be is not
    from reftsearch.run.driver import estimate_new_study  # after the spec is read (see _run)
    from reftsearch.search.study import prepare

    estimate = estimate_new_study(spec, storage, prepare(spec), workers, args.samples)
    gain, unmeasured = _trial_gain(spec, storage)
    if args.json:
        gain_dict = None if gain is None else {**asdict(gain), "per_trial": gain.per_trial}
        print(json.dumps({**estimate.to_dict(), "trial_gain": gain_dict}, indent=2))
        return EXIT_OK
    for label, cost in (
        ("cheapest", estimate.cheapest),
        ("median", estimate.median),
        ("most expensive", estimate.most_expensive),
    ):
        print(f"{label:>15}: {cost.epoch_s:8.1f}s/epoch {cost.trial_s:8.1f}s/trial  {cost.config}")
    print(estimate.line())
    print(gain.line() if gain is not None else f"score gain per trial: {unmeasured}")
    return EXIT_OK


def _trial_gain(spec: StudySpec, storage: str) -> tuple[TrialGain | None, str]:
    """What trials past the budget are expected to add, from the stored study's own trials
    (``reftsearch.search.trial_gain``), or why that is not measured."""
    from reftsearch.search.storage import load_named_study
    from reftsearch.search.trial_gain import MIN_SCORES, trial_gain

    try:
        study = load_named_study(spec.name, storage)
    except BadInputError as err:  # not run yet (or its storage is not there): nothing to read
        return None, f"not measured ({err})"
    gain = trial_gain(study, spec.budget.n_trials, spec.metric)
    return gain, f"not measured: fewer than {MIN_SCORES} complete trials in study {spec.name!r}"


def _validate(args: argparse.Namespace) -> int:
    # the model's config, not its weights: no torch is imported (tests/test_hostile_specs.py)
    from reftsearch.search.fit import check_model_fit, read_model_shape
    from reftsearch.search.storage import check_storage, sqlite_path

    status = EXIT_OK
    for path in args.studies:
        try:
            spec = load_spec(path, args.set)
            if sqlite_path(spec.storage) is not None:  # a server is left to run: no connection
                check_storage(spec.storage, writing=True)
            shape = read_model_shape(spec)
            check_model_fit(spec, shape)
            data = _data_summary(spec)
        except BadInputError as err:
            print(f"{path}: error: {err}", file=sys.stderr)
            status = EXIT_BAD_INPUT
        else:
            print(
                f"{path}: ok (study {spec.name!r}, {spec.task.kind}, metric {spec.metric}; "
                f"{spec.model.path}: {shape.num_layers} layers, hidden size {shape.hidden_size}, "
                f"{shape.max_positions} positions; data: {data})"
            )
    return status


def _data_summary(spec: StudySpec) -> str:
    """The data as ``run`` reads it (local files and builtin tasks; a hub dataset is left to
    ``run``, which needs the network for it)."""
    if spec.task.data.hub is not None:
        return f"hub dataset {spec.task.data.hub}, not opened"
    from reftsearch.data.listing import list_rows

    return list_rows(spec.task, spec.seed).summary()


def _data(args: argparse.Namespace) -> int:
    spec = _spec(args)
    from reftsearch.data.listing import describe, list_rows, print_rows, rows_delimiter, write_rows
    from reftsearch.data.splits import has_split

    out = None if args.out is None else _output_file(args.out, "--out")
    if out is not None:  # refused before the rows are read, not after their summary
        rows_delimiter(out)
    if args.split and "test" in args.split and not has_split(spec.task.data, "test"):
        raise BadInputError("--split test: the study has no test split (task.data.test)")
    listing = list_rows(spec.task, spec.seed, args.split or SPLITS)
    for split in listing.splits:
        _stderr(describe(split))
    if out is not None:
        with _writing(out, "--out"):
            n = write_rows(listing, spec.task, out)
        _stderr(f"wrote {n:,} rows to {args.out}")
    else:
        print_rows(listing, spec.task, sys.stdout)
    return EXIT_OK


def _best(args: argparse.Namespace) -> int:
    from reftsearch.data.listing import DELIMITERS
    from reftsearch.data.splits import has_split
    from reftsearch.results.best_table import CSV_MARK, best_summaries, trials_frame
    from reftsearch.search.ranking import best_trials, is_pareto, pareto_front
    from reftsearch.search.study import load_study_of

    if args.top < 1:
        raise BadInputError(f"--top: must be a positive integer, got {args.top}")
    csv = None if args.csv is None else _output_file(args.csv, "--csv")
    delimiter = DELIMITERS.get(csv.suffix.lower(), ",") if csv is not None else ","
    if csv is not None:
        refuse_foreign(csv, "--csv", "best --csv", CSV_MARK.replace(",", delimiter))
    spec = _spec(args)
    study = load_study_of(spec, args.storage or spec.storage)
    if csv is not None:
        with _writing(csv, "--csv"), written_whole(csv) as scratch:
            trials_frame(study).to_csv(scratch, index=False, sep=delimiter)
        _stderr(f"wrote {len(study.trials)} trials to {csv}")
    pareto = is_pareto(study)  # two objectives: the whole front, fewest parameters first
    if pareto and args.test:
        raise BadInputError("--test: a study with two objectives has a front, not one best config")
    if args.test and not has_split(spec.task.data, "test"):  # before the pick is retrained
        raise BadInputError("task.data.test: the study has no test split (--test scores on it)")
    trials = pareto_front(study) if pareto else best_trials(study, args.top)
    if not trials:
        raise BadInputError(f"study {spec.name!r} has no completed trial yet")
    summaries = best_summaries(study, trials)
    if args.test:
        from reftsearch.search.test_split import test_score

        summaries[0]["test_score"] = test_score(spec, study, trials[0], log=_stderr)
    if args.json:
        print(json.dumps(summaries[0] if args.top == 1 and not pareto else summaries, indent=2))
    else:
        _print_best(study, len(summaries), summaries)
    return EXIT_OK


def _dashboard(args: argparse.Namespace) -> int:
    from reftsearch.results.dashboard import serve
    from reftsearch.search.storage import check_storage

    if not 0 <= args.port <= MAX_PORT:
        raise BadInputError(f"--port: must be 0 to {MAX_PORT} (0: any free one), got {args.port}")
    if not args.host.strip():  # the server would listen on every interface, with no login
        raise BadInputError("--host: give an address to listen on, e.g. 127.0.0.1, got ''")
    spec = _spec(args)
    storage = args.storage or spec.storage
    check_storage(storage)
    serve(spec.name, storage, args.host, args.port, log=lambda line: print(line, flush=True))
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from reftsearch.results.html_report import check_report_folder, write_report
    from reftsearch.search.storage import load_named_study

    spec = _spec(args)
    if args.out == "":
        raise BadInputError("--out: give a folder, got ''")
    out = Path(args.out) if args.out is not None else Path("reports") / spec.name
    with _writing(out, "--out"):
        check_report_folder(out, "--out")
    study = load_named_study(spec.name, args.storage or spec.storage)
    with _writing(out, "--out"):
        print(f"wrote {write_report(study, out)}")
    return EXIT_OK


def _compare(args: argparse.Namespace) -> int:
    if len(args.studies) < 2:
        raise BadInputError(f"compare: give two or more study files, got {len(args.studies)}")
    _check_count(args.n_trials, "--n-trials")
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        raise BadInputError(f"--timeout: must be a positive number of seconds, got {args.timeout}")
    out = None if args.out is None else _output_file(args.out, "--out")
    specs = [load_spec(path, args.set) for path in args.studies]
    from reftsearch.run.compare import CSV_MARK, check_comparable, compare, plot, printable, table

    name = "compare-" + "-vs-".join(s.name for s in specs) + ".csv"
    out = out or Path(args.studies[0]).with_name(name)
    figure = out.with_suffix(".png")
    if figure == out:
        raise BadInputError(f"--out {out}: name the table (.csv); its plot goes beside it (.png)")
    refuse_foreign(out, "--out", "compare", CSV_MARK)
    if figure.exists() and not holds(out, CSV_MARK):  # its plot sits beside its table
        raise BadInputError(
            f"--out {out}: {figure.name} exists beside it and is not the plot of a table "
            "`reftsearch compare` wrote; remove it or give another name"
        )
    check_comparable(specs, same_trials=args.n_trials is None)
    from reftsearch.search.storage import check_storage

    for spec in specs:  # every arm's, before the first arm runs for minutes
        check_storage(spec.storage, writing=True)
    n_trials = args.n_trials if args.n_trials is not None else specs[0].budget.n_trials
    results = compare([(s, s.storage) for s in specs], n_trials, args.timeout, log=_stderr)
    metric = specs[0].metric
    frame = table(results, metric)
    with _writing(out, "--out"):
        with written_whole(out) as scratch:
            frame.to_csv(scratch, index=False)
        with written_whole(figure) as scratch:
            plot(frame, metric, scratch)
    print(printable(frame, metric))
    print(f"wrote {out} and {figure.name}")
    return EXIT_OK


def _export(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if args.format == "adapters":
        return _export_adapters(args, spec)
    if spec.method != "reft":
        return _export_peft(args, spec)
    from reftsearch.export.pyreft import export_study  # after the spec is read (see _run)

    result = export_study(
        spec,
        args.storage or spec.storage,
        _out_dir(args, spec),
        args.trial,
        _stderr,
        with_base_model=args.with_base_model,
    )
    test = "" if result.test_score is None else f", test={result.test_score:.4f}"
    print(f"exported trial {result.trial}{test} to {result.out_dir} ({result.weights})")
    if not result.pyreft_loadable:
        _stderr(f"note: {result.note}")
    return EXIT_OK


def _out_dir(args: argparse.Namespace, spec: StudySpec) -> str:
    """OUT_DIR as given, or the spec's ``export_dir``; an empty one is refused (it exported
    to the spec's folder instead)."""
    if args.out_dir is None:
        return spec.export_dir
    if not args.out_dir.strip():
        raise BadInputError("OUT_DIR: give a directory (or leave it out for the spec's), got ''")
    return args.out_dir


def _predict(args: argparse.Namespace) -> int:
    out = None if args.out is None else _output_file(args.out, "--out")
    if out is not None and out.exists():
        raise BadInputError(f"--out {out}: exists; name a new file (predict never overwrites)")
    target = Path(args.study)
    if target.is_dir():  # an export: everything is in it
        given = [o for o, key in _STUDY_ONLY.items() if getattr(args, key) not in (None, [])]
        if given:
            raise BadInputError(
                f"{', '.join(given)}: for a study file; {target} is an export directory, which "
                "holds one trial (export another with reftsearch export STUDY OUT --trial N)"
            )
        from reftsearch.export.reader import open_export  # after the arguments are checked
        from reftsearch.results.predict import trained_export

        export = open_export(target)
        task, load = export.task, lambda: trained_export(export)
    else:
        spec = _spec(args)
        from reftsearch.results.predict import trained_trial  # after the spec is read (see _run)

        storage = args.storage or spec.storage
        task, load = spec.task, lambda: trained_trial(spec, storage, args.trial, _stderr)
    from reftsearch.results.predict import file_inputs, predict, text_inputs

    inputs = text_inputs(task, args.text) if args.text else file_inputs(task, Path(args.input))
    trained = load()
    _stderr(f"{trained.source}: {len(inputs)} inputs")
    predictions = predict(trained, inputs)
    if args.json:
        rows = [{k: v for k, v in asdict(p).items() if v is not None} for p in predictions]
        text = json.dumps(rows, indent=2)
    else:
        text = "\n".join(p.line() for p in predictions)
    if out is None:
        print(text)
    else:
        with _writing(out, "--out"):
            try:  # made now, or refused: never another's file
                with written_whole(out, exclusive=True) as scratch:
                    scratch.write_text(text + "\n")
            except FileExistsError:
                raise BadInputError(
                    f"--out {out}: exists (made while predicting); name a new file"
                ) from None
        _stderr(f"wrote {len(predictions)} predictions to {out}")
    return EXIT_OK


# predict's options that pick from a study, meaningless for an export directory
_STUDY_ONLY = {"--trial": "trial", "--storage": "storage", "--set": "set"}


def _export_peft(args: argparse.Namespace, spec: StudySpec) -> int:
    """LoRA and DoRA as peft saves them, full fine-tuning as a Hugging Face model."""
    from reftsearch.export.peft_model import export_study

    result = export_study(
        spec, args.storage or spec.storage, _out_dir(args, spec), args.trial, _stderr
    )
    test = "" if result.test_score is None else f", test={result.test_score:.4f}"
    print(f"exported trial {result.trial}{test} to {result.out_dir} ({result.weights})")
    return EXIT_OK


def _export_adapters(args: argparse.Namespace, spec: StudySpec) -> int:
    from reftsearch.export.adapters import export_study

    result = export_study(
        spec, args.storage or spec.storage, _out_dir(args, spec), args.trial, _stderr
    )
    test = "" if result.test_score is None else f", test={result.test_score:.4f}"
    print(f"exported trial {result.trial}{test} to {result.out_dir} ({result.weights})")
    if result.note:
        _stderr(f"note: {result.note}")
    return EXIT_OK


def _worker(args: argparse.Namespace) -> int:
    from reftsearch.search.storage import check_storage, load_named_study, mask_url, storage_errors

    if not args.storage:
        raise BadInputError(f"--storage: give a storage URL or set ${STORAGE_ENV}")
    _check_count(args.n_trials, "--n-trials")
    check_storage(args.storage, writing=True)
    from reftsearch.run.lines import ProgressPrinter
    from reftsearch.run.worker import Worker, published_spec

    study = load_named_study(args.study, args.storage)
    spec, n_trials = published_spec(study)
    n_trials = args.n_trials if args.n_trials is not None else n_trials
    print(f"joining study {spec.name!r} on {mask_url(args.storage)}: budget {n_trials}")
    with storage_errors(args.storage):
        Worker(spec, args.storage).run(
            n_trials, spec.budget.timeout, [ProgressPrinter(n_trials, print)]
        )
    return EXIT_OK


def _print_best(study, top: int, summaries: list[dict] | None = None) -> None:
    from reftsearch.results.best_table import best_summaries, format_table
    from reftsearch.search.ranking import best_trials, is_pareto, pareto_front

    if summaries is None:
        trials = pareto_front(study) if is_pareto(study) else best_trials(study, top)
        summaries = best_summaries(study, trials)
    print(format_table(summaries, study.user_attrs.get("metric", "value")))


MAX_COUNT = 2**31 - 1  # as a study file's integers (reftsearch.spec.yaml_file)


def _check_count(value: int | None, option: str) -> None:
    """A count given on the command line (trials, workers, samples), if given."""
    if value is not None and value < 1:
        raise BadInputError(f"{option}: must be a positive integer, got {value}")
    if value is not None and value > MAX_COUNT:
        raise BadInputError(f"{option}: must be at most {MAX_COUNT:,}, got {value}")


def _output_file(path: str, option: str) -> Path:
    """``path`` as a file this command is to write, refused before any work if it cannot be."""
    if not path:  # ``--csv ""`` (an unset variable): no file to write was no error
        raise BadInputError(f"{option}: give a file name, got ''")
    out = Path(path)
    if out.is_dir():
        raise BadInputError(f"{option} {out}: is a directory; give a file name")
    if not out.parent.is_dir():
        raise BadInputError(f"{option} {out}: directory {out.parent} does not exist")
    if is_stream(out):  # /dev/stdout, a named pipe: written to, not made in its folder
        return out
    reason = why_unwritable(out.parent)
    if reason is not None:
        raise BadInputError(f"{option} {out}: cannot write in {out.parent} ({reason})")
    return out


@contextmanager
def _writing(path: Path, option: str) -> Iterator[None]:
    """Writing ``path`` failed: no room left (exit 1), or the path's fault (no permission, a
    file where a folder is wanted): bad input."""
    from reftsearch.search.storage import NO_ROOM

    try:
        yield
    except OSError as err:
        reason = err.strerror or err
        if err.errno in NO_ROOM:
            raise ReftSearchError(
                f"{option} {path}: no room to write it ({reason}); free some space, then run "
                "the same command again"
            ) from None
        raise BadInputError(f"{option} {path}: cannot write there ({reason})") from None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def quiet_libraries() -> None:
    """Keep the output to reftsearch's own lines; libraries' chatter goes nowhere."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars too
    if "datasets" in sys.modules:  # loaded before (main called in a process that used it):
        sys.modules["datasets"].disable_progress_bars()  # it read the variable then
    if "transformers" in sys.modules:  # e.g. export's "Writing model shards" bar
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # the module of Optuna's that logs each failed trial (study.optimize)
    optimize_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, ReportedFailures) for f in optimize_log.filters):
        optimize_log.addFilter(ReportedFailures())
    # Heartbeats are "experimental" since Optuna 2.8, yet they are what keeps a killed trial
    # from staying RUNNING forever: the warning is noise to our users.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class ReportedFailures(logging.Filter):
    """Drops Optuna's two warnings about a trial that raised ``TrialFailed`` (it diverged,
    ran out of memory, or was asked past the budget), was interrupted (Ctrl-C, SIGTERM) or
    met a failing storage or a full disk: reftsearch's own lines say why already, and
    Optuna's first one carries the exception's whole traceback. Other failures (a bug) keep
    theirs."""

    def __init__(self) -> None:
        super().__init__()
        self._trials: set[str] = set()  # whose "failed with value None" line is still to come

    def filter(self, record: logging.LogRecord) -> bool:
        number = re.match(r"Trial (\d+) failed with ", record.getMessage())
        if number is None:
            return True
        if record.exc_info is not None and _reported(record.exc_info[1]):
            self._trials.add(number[1])
            return False
        if number[1] in self._trials and record.exc_info is None:
            self._trials.discard(number[1])
            return False
        return True


def _reported(err: BaseException) -> bool:
    """Whether the command's own lines say why a trial failed with ``err``."""
    from reftsearch.search.storage import storage_cause

    return isinstance(err, TrialFailed | KeyboardInterrupt) or storage_cause(err) is not None


if __name__ == "__main__":
    sys.exit(main())
