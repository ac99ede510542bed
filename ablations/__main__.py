"""Tandem's experiments: one YAML file per question in ablations/experiments/.

  python -m ablations list                                              # each experiment and its question
  python -m ablations run ablations/experiments/rtt_sweep.yaml          # results in a fresh /tmp/tandem-results/ folder
  python -m ablations run ablations/experiments/switches.yaml --quick   # a smoke run: 1 prompt, 16 tokens
  python -m ablations run ablations/experiments/switches.yaml --set workload.num_prompts=2 --set draft.max_k=6
  python -m ablations run ablations/experiments/switches.yaml --out ablations/results   # refresh the committed report
  python -m ablations report switches --out ablations/results          # re-draw switches.{md,png} from its JSON
  python -m ablations device run --jobs plain,big_plain,big --out $OUT  # the GPU engine jobs (ablations/gpu_vllm.py)

--set KEY=VALUE: a key under the experiment's own fields (workload.*, links, repeats, matrix.*, ...)
changes the experiment; any other key is a Tandem config override applied to every row (a row's own
overrides win). Each cell starts the link emulator and the edge as processes, the cloud kept across cells
of one cloud configuration; see ablations/runner.py.

The modules: experiment.py (an experiment file, its cells) -> runner.py (the cells' processes, via
processes.py; the links, linkemu.py; the benchmark, bench.py) -> report.py (JSON -> Markdown, PNG).
population.py runs `kind: population | goodput` files (users replayed by replay.py beside real edges;
population_report.py draws them). device.py: what only the GPU runs need (staged models, model shapes);
a file's `device:` block pins processes to CPUs and runs cells on parallel edge lanes. gpu_vllm.py and
gpu_report.py: the GPU engine jobs and their report (results/gpu_vllm.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import HelpFormatter

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def _run(args, argv) -> int:
    from ablations.experiment import EXPERIMENTS, load_experiment
    from ablations.runner import default_out, run_experiment, sigterm_as_interrupt
    path = Path(args.experiment)
    if not path.exists() and path.suffix != ".yaml" and (EXPERIMENTS / f"{args.experiment}.yaml").exists():
        path = EXPERIMENTS / f"{args.experiment}.yaml"          # a name: `run switches`
    from ablations.population import kind_of
    if kind_of(path):                                           # kind: population | goodput (ablations/population.py)
        from ablations import population
        return population.run(path, Path(args.out) if args.out else default_out(path.stem), args.set, argv)
    exp = load_experiment(path, args.set, args.repeats, args.quick)
    out = Path(args.out) if args.out else default_out(exp.name)
    print(f"{exp.name}: {exp.question}\nresults -> {out}", file=sys.stderr)
    with sigterm_as_interrupt():
        result, ok = run_experiment(exp, out, ["run", *argv])
    written = [p.name for p in sorted(out.glob(f"{exp.name}.*"))]
    print(f"wrote {', '.join(written)} in {out} ({result['meta']['duration_s']:.0f} s)", file=sys.stderr)
    return 0 if ok else EXIT_FAILED


def _list(args) -> int:
    from ablations.experiment import ExperimentError, experiment_files, load_experiment
    for path in experiment_files():
        try:
            from ablations import population
            exp = population.load(path) if population.kind_of(path) else load_experiment(path)
            print(f"{exp.name:<16} {exp.question}  ({path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path})")
        except ExperimentError as e:
            print(f"{path.stem:<16} INVALID: {e}")
    return 0


def _report(args, argv) -> int:
    from ablations import report
    from ablations.runner import RESULTS_TMP
    target = Path(args.name)
    if target.suffix == ".json":
        path = target
    elif args.out:
        path = Path(args.out) / f"{args.name}.json"
    else:
        found = sorted(RESULTS_TMP.glob(f"{args.name}-*/{args.name}.json"))
        if not found:
            raise ValueError(f"no {args.name}.json under {RESULTS_TMP}; name the folder with --out "
                             "(e.g. --out ablations/results)")
        path = found[-1]
    from ablations.runner import _command, _git, derive_rows
    from ablations import population_report
    if not path.exists():
        raise ValueError(f"no result file {path}")
    raw = population_report.load(path)
    if (raw.get("experiment") or {}).get("kind") in ("population", "goodput"):
        for f in population_report.write(raw, Path(args.out) if args.out else path.parent):
            print(f"wrote {f}", file=sys.stderr)
        return 0
    result = derive_rows(report.load(path), path.parent)      # the benchmark outputs: from the logs beside it
    if result.get("cells"):
        result["meta"]["rows_derived_by"] = {"command": _command(["report", *argv]),
                                             "commit": _git("rev-parse", "--short=12", "HEAD")}
    out = Path(args.out) if args.out else path.parent
    for f in report.write(result, out):
        print(f"wrote {f}", file=sys.stderr)
    return 0


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m ablations", description=__doc__, formatter_class=HelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment file", formatter_class=HelpFormatter)
    run.add_argument("experiment", help="an experiment file, or the NAME of ablations/experiments/NAME.yaml")
    run.add_argument("--out", default=None, help="results folder (default: a fresh folder under /tmp/tandem-results/)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="change the experiment (workload.num_prompts=2) or override a config key of every "
                          "row (draft.max_k=6); repeatable")
    run.add_argument("--repeats", type=int, default=None, help="repeat every cell N times (default: the file's)")
    run.add_argument("--quick", action="store_true", help="smoke run: one prompt per dataset, 16 tokens, one repeat")
    sub.add_parser("list", help="each experiment's name and question")
    rep = sub.add_parser("report", help="re-draw NAME.md and NAME.png from NAME.json (its rows derived again from "
                                        "its raw cells)", formatter_class=HelpFormatter)
    rep.add_argument("name", help="experiment name (or a path to its JSON)")
    rep.add_argument("--out", default=None, help="folder holding NAME.json, written to (default: the newest "
                                                  "/tmp/tandem-results/NAME-* run)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["device"]:           # the GPU jobs of ablations/gpu_vllm.py (their own flags: device --help)
        from ablations.gpu_vllm import main as device_main
        return device_main(argv[1:])
    args = parse_args(argv)
    from ablations.experiment import ExperimentError
    from common.config import ConfigError
    try:
        if args.command == "run":
            return _run(args, argv[1:])
        if args.command == "list":
            return _list(args)
        return _report(args, argv[1:])
    except (ExperimentError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: processes stopped; what was measured is in the results folder", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
