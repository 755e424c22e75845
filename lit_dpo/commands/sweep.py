"""`lit_dpo sweep`: the guide's ablations (beta, learning rate, epochs, ...) as one command.

    python -m lit_dpo sweep --config configs/balanced.yaml --grid model.beta=0.05,0.1,0.2,0.5 \\
        --grid model.learning_rate=1e-5,5e-5,1e-4 [--product] [--name NAME] [-- extra fit arguments]

Arguments after `--` (or any unknown --key=value) go to every `fit` unchanged. The work is in
`lit_dpo.sweep`: `plan` decides the runs, `runs` trains them as `fit` subprocesses, `results` tabulates.
Exit status: 0 when every run finished, 1 when some failed, 2 on bad input.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading

from lit_dpo.sweep.plan import Sweep, SweepInputError

HELP = "ablations over config keys: one fit per configuration, then tables and plots"
FORWARDS_UNKNOWN_ARGUMENTS = True  # they are `fit` arguments for every run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "Arguments after `--` (or any unknown --key=value) go to every `fit` unchanged."
    parser.add_argument("--config", required=True, help="base config, e.g. configs/balanced.yaml")
    parser.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2",
                        help="a dotted config key and its values; repeat for more keys")
    parser.add_argument("--product", action="store_true", help="cartesian product instead of one-at-a-time ablations")
    parser.add_argument("--name", default=None, help="sweep folder under the logger's save_dir "
                        "(default: <logger name>-sweep-<keys>)")
    parser.add_argument("--epoch-reuse", choices=["exact", "approximate", "off"], default="exact",
                        help="serve shorter trainer.max_epochs values from the longest run's epoch checkpoints: "
                        "exact = only with a constant LR schedule (default), approximate = always (labelled), off")
    parser.add_argument("--test", choices=["auto", "off"], default="auto",
                        help="auto: run `test` after each fit and read results.json when it is written")
    parser.add_argument("--best-by", default="auto", help="metric that names the best run: a results.csv column "
                        "such as hit@1 or val_reward_accuracy (auto: hit@1 when available, else val_reward_accuracy)")
    parser.add_argument("--devices-per-run", type=int, default=None,
                        help="trainer.devices for every run (multi-GPU runs; see --shard for one run per GPU)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="run only every N-th trained configuration starting at I (one process per GPU)")
    parser.add_argument("--results-only", action="store_true", help="train nothing; rebuild results and plots")
    parser.add_argument("--dry-run", action="store_true", help="print the planned runs (versions, reuse) and "
                        "fix their version numbers in sweep.json; train nothing")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """`sweep ...` as the shell parses it: (options, the extra `fit` arguments).

    Raises:
        SweepInputError: A malformed `--shard` or `--devices-per-run`.
    """
    from lit_dpo.commands import build_parser

    args, extra = build_parser().parse_known_args(list(argv))
    return args, _checked(args, [a for a in extra if a != "--"])


def _checked(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """Validate `--shard` (into `(i, n)`) and `--devices-per-run` (into a `fit` argument)."""
    if args.shard is not None and not isinstance(args.shard, tuple):
        match = re.fullmatch(r"(\d+)/(\d+)", args.shard)
        if not match or not int(match[1]) < int(match[2]):
            raise SweepInputError(f"--shard {args.shard}: expected I/N with 0 <= I < N, e.g. --shard 0/4")
        args.shard = (int(match[1]), int(match[2]))
    if args.devices_per_run is not None:
        if args.devices_per_run < 1:
            raise SweepInputError(f"--devices-per-run {args.devices_per_run}: must be >= 1")
        extra = [*extra, f"--trainer.devices={args.devices_per_run}"]
    return extra


def plan_sweep(args: argparse.Namespace, fit_args: list[str]) -> Sweep:
    """The sweep these options describe (`lit_dpo.sweep.plan.plan`)."""
    from lit_dpo.sweep.plan import plan

    return plan(args.config, args.grid, fit_args, product=args.product, name=args.name, epoch_reuse=args.epoch_reuse)


def run(args: argparse.Namespace) -> int:
    """Plan, run, tabulate; SIGTERM (a scheduler, `kill`) stops the running fit with the sweep, like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        return _run(args)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    from lit_dpo.sweep.results import write_results
    from lit_dpo.sweep.runs import run_sweep

    sweep = plan_sweep(args, _checked(args, args.unknown))
    print(f"[sweep] {sweep.name}: {len(sweep.runs)} run(s) in {sweep.directory}", flush=True)
    if args.dry_run:
        for planned in sweep.runs:
            reuse = f"  <- epoch checkpoint of {planned.reuse_of} ({'exact' if planned.reuse_exact else 'approximate'})"
            print(f"  version_{planned.version}  {planned.run_id}{reuse if planned.reuse_of else ''}")
        return 0
    failed = 0 if args.results_only else run_sweep(sweep, test=args.test != "off", shard=args.shard)
    if args.shard is None or args.results_only:
        print(write_results(sweep, best_by=args.best_by), flush=True)
    else:
        print("[sweep] shard done; after all shards: python -m lit_dpo sweep ... --results-only", flush=True)
    return 1 if failed else 0
