"""The ``pyraflow`` command line: parses arguments and dispatches; the work happens in the modules."""

from __future__ import annotations

import argparse
import json
import sys

from pyraflow.config import load_config, to_yaml


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config (sections: schedule, data, model, batching)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set batching.token_budget=4096 (repeatable)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyraflow", description="Pyramidal flow matching with a multi-stage MMDiT."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="inspect the resolved configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_commands.add_parser("show", help="print the resolved configuration with every default")
    _common(show)

    plan = commands.add_parser("plan", help="print the stage schedule and simulate token-budget batches")
    _common(plan)
    plan.add_argument("--schedule", metavar="NAME", help="schedule preset: continuous or pyramid-flow")
    plan.add_argument("--steps", type=_positive_int, default=1000, help="steps to simulate (default 1000)")
    plan.add_argument("--world-size", type=_positive_int, default=1, help="ranks to plan for (default 1)")
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")

    bench = commands.add_parser("bench", help="time training steps of the attention backends (JSON keys in BENCHMARKS.md)")
    bench.add_argument("--steps", type=_positive_int, default=10, help="timed steps per variant (default 10)")
    bench.add_argument("--warmup", type=_positive_int, default=2, help="untimed steps per variant (default 2)")
    bench.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    bench.add_argument("--json", action="store_true", help="print JSON only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "config":
            print(to_yaml(load_config(args.config, args.overrides)), end="")
        elif args.command == "plan":
            from pyraflow.plan import format_report, plan_report

            overrides = list(args.overrides)
            if args.schedule:
                overrides.append(f"schedule.preset={args.schedule}")
            report = plan_report(load_config(args.config, overrides), args.steps, args.world_size,
                                 progress=not args.json)
            print(json.dumps(report, indent=2) if args.json else format_report(report))
        elif args.command == "bench":
            from pyraflow.bench import format_bench, run_bench

            result = run_bench(steps=args.steps, warmup=args.warmup, threads=args.threads, progress=not args.json)
            print(json.dumps(result, indent=2) if args.json else format_bench(result))
    except (ValueError, FileNotFoundError) as err:
        print(f"pyraflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
