"""The `dcam` command line. Every subcommand takes omegaconf dotlist overrides (key=value);
evaluation and benchmark commands take --json and then print exactly one JSON object."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (help, "module:function"). Handlers are imported only when their command runs, by
# name, so `dcam --help` imports neither torch nor Ray and the CLI depends on no handler module.
COMMANDS = {
    "run": ("the audit job on Ray Data (no arguments: synthesise a small corpus and audit the tiny model)",
            "dcam.pipeline.commands:run"),
    "synth": ("write a grounded-scene corpus (Parquet shards) to output=URL", "dcam.pipeline.commands:synth"),
    "report": ("HTML + JSON audit report of a run directory", "dcam.pipeline.commands:report"),
    "train-tiny": ("train the built-in tiny dMLLM (fixed steps, quality gate)", "dcam.training.train_tiny:command"),
    "eval-tiny": ("caption quality of the tiny model on fresh held-out scenes", "dcam.evals.eval_tiny:command"),
    "eval-cam": ("localisation and faithfulness table of every map method on held-out scenes",
                 "dcam.evals.eval_cam:command"),
    "eval-grounding": ("which answer words depend on the image (image_reliance) on held-out scenes",
                       "dcam.evals.eval_grounding:command"),
    "bench-refine": ("vectorised refinement vs a per-pixel Python loop", "dcam.benchmarks.bench_refine:command"),
    "bench-probe": ("batched probing vs a batch-1 loop", "dcam.benchmarks.bench_probe:command"),
    "bench": ("in-process loop vs Ray pipeline vs batch-1 loop throughput", "dcam.benchmarks.bench_pipeline:command"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcam", description="Diffusion-CAM audits for diffusion multimodal LLMs")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, _) in COMMANDS.items():
        s = sub.add_parser(name, help=help_, description=help_)
        if name == "report":
            s.add_argument("run_dir", help="run directory or URL (local or s3://)")
            s.add_argument("--baseline", help="another run to compare with (drift)")
            s.add_argument("--fail-under", dest="fail_under", help="e.g. obj_iou=0.30,pointing=0.8; exit 2 if missed")
            s.add_argument("--out", help="where to write report.html / summary.json (default: <run>/report)")
        s.add_argument("--json", action="store_true", help="print one JSON object with the figures")
        s.add_argument("overrides", nargs="*", help="omegaconf dotlist overrides, e.g. n=500 seed=7")
    return p


VALUE_OPTIONS = ("--baseline", "--fail-under", "--out")


def _options_first(args: list[str]) -> list[str]:
    """Options (with their values) before positionals, so `k=v` overrides may stand anywhere."""
    opts, rest, i = [], [], 0
    while i < len(args):
        if args[i] in VALUE_OPTIONS and i + 1 < len(args):
            opts += args[i:i + 2]
            i += 2
            continue
        (opts if args[i].startswith("-") else rest).append(args[i])
        i += 1
    return opts + rest


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]  # `dcam` alone (or `dcam k=v ...`) is `dcam run`
    args = _parser().parse_args([argv[0], *_options_first(argv[1:])])
    module, _, function = COMMANDS[args.command][1].partition(":")
    handler = getattr(importlib.import_module(module), function)
    try:
        code = handler(args)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
