"""``aa-compile mad run | report``: train the MAD grid on CPU and score it.

`add_subcommand` registers ``mad`` on the main CLI's subparsers; ``python -m aa_compile.mad``
runs the same parser on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from aa_compile.cli_format import HelpFormatter

from .grid import grid_runs, run_grid
from .results import read_rows, score_table, write_rows, write_scores
from .settings import LEARNING_RATES, WEIGHT_DECAYS, quick_settings, settings
from .tasks import TASKS
from .zoo import MODELS

# The quick grid's epochs per task: enough for attention + SwiGLU on the reduced settings.
QUICK_EPOCHS = {"in-context-recall": 8, "fuzzy-in-context-recall": 8,
                "noisy-in-context-recall": 8, "selective-copying": 8, "compression": 8,
                "memorization": 40}


def floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def names(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; choose from "
                                             f"{', '.join(choices)}")
        return values
    return parse


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run_command(args: argparse.Namespace) -> int:
    quick = args.grid == "quick"
    chosen = [s for s in (quick_settings() if quick else settings())
              if s.task in (args.tasks or TASKS)]
    if args.settings_per_task:
        kept: dict[str, int] = {}
        chosen = [s for s in chosen
                  if kept.setdefault(s.task, 0) < args.settings_per_task
                  and not kept.__setitem__(s.task, kept[s.task] + 1)]
    resize = {k: v for k, v in (("num_train_examples", args.train_examples),
                                ("num_test_examples", args.test_examples)) if v}
    chosen = [dataclasses.replace(s, **resize) for s in chosen]
    lrs = args.lrs or ([1e-3] if quick else list(LEARNING_RATES))
    wds = args.wds or ([0.0] if quick else list(WEIGHT_DECAYS))
    epochs = args.epochs or (QUICK_EPOCHS if quick else 200)
    runs = grid_runs(args.models, chosen, lrs, wds, epochs=epochs, batch_size=args.batch_size,
                     dim=args.dim or (64 if quick else 128), threads=args.threads_per_worker,
                     warmup_steps=args.warmup_steps, crop_len=args.crop_len,
                     crop_epochs=args.crop_epochs)
    if not runs:
        raise ValueError("no run left: no chosen model takes any chosen task")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = run_grid(runs, workers=args.workers, show_progress=not args.no_progress)
    wall = time.perf_counter() - start
    write_rows(rows, out)
    paths = write_scores(rows, out)
    (out / "run.json").write_text(json.dumps({"grid": args.grid, "runs": len(rows),
                                              "workers": args.workers,
                                              "wall_seconds": round(wall, 1)}, indent=1))
    print(score_table(json.loads(paths["scores_json"].read_text())))
    print(f"{len(rows)} runs in {wall:.0f} s; results in {out}/ (results.csv, scores.csv, "
          f"tasks.png, heatmap.png)")
    return 0


def report_command(args: argparse.Namespace) -> int:
    rows = read_rows(args.results)
    out = Path(args.out or (args.results if Path(args.results).is_dir()
                            else Path(args.results).parent))
    paths = write_scores(rows, out)
    print(score_table(json.loads(paths["scores_json"].read_text())))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def add_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``mad`` (with ``run`` and ``report``) on the main CLI's subparsers."""
    mad = subparsers.add_parser(
        "mad", help="MAD synthetic capability suite: train the grid on CPU and score it",
        description="MAD (arXiv 2403.17844): six synthetic token tasks that test in-context "
        "recall, fuzzy and noisy recall, selective copying, compression and memorization.",
        formatter_class=HelpFormatter)
    actions = mad.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run", help="train models on the quick or full grid and score them",
        description="Train every model on every chosen setting at every lr x wd, in parallel "
        "processes; write results.json/csv, scores.json/csv, tasks.png and heatmap.png.",
        formatter_class=HelpFormatter)
    run.add_argument("--grid", choices=["quick", "full"], default="quick",
                     help="quick: 2 reduced settings per task, lr 1e-3, wd 0, few epochs, "
                     "dim 64; full: the 66 MAD settings x 3 lr x 2 wd, 200 epochs, dim 128")
    run.add_argument("--models", type=names(tuple(MODELS)), default="attention-swiglu",
                     help=f"comma-separated, from: {', '.join(MODELS)}")
    run.add_argument("--tasks", type=names(TASKS), default=None,
                     help="comma-separated task names (default: all six)")
    run.add_argument("--settings-per-task", type=positive, default=None,
                     help="keep only the first N settings of each task (default: all; the "
                     "first is the baseline)")
    run.add_argument("--train-examples", type=positive, default=None,
                     help="override every setting's training-set size (default: the grid's)")
    run.add_argument("--test-examples", type=positive, default=None,
                     help="override every setting's test-set size (default: the grid's)")
    run.add_argument("--epochs", type=positive, default=None,
                     help="epochs per run (default: per task for quick, 200 for full)")
    run.add_argument("--lrs", type=floats, default=None,
                     help="learning rates (default: 1e-3 for quick, 1e-4,5e-4,1e-3 for full)")
    run.add_argument("--wds", type=floats, default=None,
                     help="weight decays (default: 0 for quick, 0,0.1 for full)")
    run.add_argument("--dim", type=positive, default=None,
                     help="model width (default: 64 for quick, 128 for full)")
    run.add_argument("--batch-size", type=positive, default=128, help="examples per step")
    run.add_argument("--warmup-steps", type=int, default=0,
                     help="linear lr warm-up over this many steps (not in mad-lab)")
    run.add_argument("--crop-len", type=positive, default=None,
                     help="length curriculum (not in mad-lab): train the first --crop-epochs "
                     "epochs on the first N tokens of each sequence (default: off)")
    run.add_argument("--crop-epochs", type=int, default=0,
                     help="epochs trained at --crop-len")
    run.add_argument("--workers", type=positive, default=1, help="parallel processes")
    run.add_argument("--threads-per-worker", type=positive, default=1,
                     help="torch threads in each process")
    run.add_argument("--out", default="runs/mad", help="output directory")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=run_command)
    rep = actions.add_parser(
        "report", help="score saved results: table, scores.json/csv, tasks.png, heatmap.png",
        formatter_class=HelpFormatter)
    rep.add_argument("--results", default="runs/mad",
                     help="a results.json or the directory holding one")
    rep.add_argument("--out", default=None,
                     help="where to write the scores and PNGs (default: beside the results)")
    rep.set_defaults(func=report_command)
    return mad


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aa-compile",
                                     formatter_class=HelpFormatter)
    add_subcommand(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(["mad", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"aa-compile mad: error: {e}", file=sys.stderr)
        return 2
