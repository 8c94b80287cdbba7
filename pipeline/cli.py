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
    "eval-faithfulness-sample": ("sampled vs full corpus-level faithfulness (probe.faithfulness_sample) on held-out scenes",
                                 "dcam.evals.eval_faithfulness_sample:command"),
    "eval-grounding": ("which answer words depend on the image (image_reliance) on held-out scenes",
                       "dcam.evals.eval_grounding:command"),
    "bench-refine": ("vectorised refinement vs a per-pixel Python loop", "dcam.benchmarks.bench_refine:command"),
    "bench-probe": ("batched probing vs a batch-1 loop", "dcam.benchmarks.bench_probe:command"),
    "bench": ("in-process loop vs Ray pipeline vs batch-1 loop throughput", "dcam.benchmarks.bench_pipeline:command"),
    "bench-scale": ("capacity planning by simulation: the real job with a stand-in probe at 1/4/16 actors on a local "
                    "multi-node Ray", "dcam.benchmarks.bench_scale:command"),
    "bench-large": ("the job at scale with the stand-in probe (driver RSS, resume, compaction, report; not CI)",
                    "dcam.benchmarks.bench_large:command"),
}


# `dcam run --help`: the keys most runs set (every key, with comments: conf/run.yaml).
MAIN_RUN_KEYS = ("input", "output", "format", "model", "model.source", "probe.batch_size", "probe.rows_per_pass",
                 "probe.faithfulness_steps", "probe.faithfulness_sample", "probe.targets", "methods.diffusion_cam.preset", "actors.num_gpus",
                 "actors.pool_max", "storage.endpoint_url", "report.fail_under", "report.max_error_rate",
                 "report.grounding_threshold", "ray.address")
EXIT_CODES = ("exit codes: 0 success; 1 the job failed (a retry may help); 2 a gate failed (report.fail_under, "
              "report.max_error_rate) or the command was refused (invalid config, missing input, output holding "
              "another run); 130 interrupted (rerun to resume)")


def _run_epilog() -> str:
    """Main keys with their defaults (conf/run.yaml) and docs (pipeline/config_schema.py)."""
    from omegaconf import OmegaConf

    from dcam.conf import conf_path
    from dcam.pipeline.config_schema import doc_of

    path = conf_path("run")
    defaults = OmegaConf.load(path)
    lines = ["main keys (key=default  meaning):"]
    for k in MAIN_RUN_KEYS:
        value = OmegaConf.select(defaults, k, default=None)
        shown = "" if isinstance(value, (dict, list)) or OmegaConf.is_config(value) else value
        lines.append(f"  {k}={'' if shown is None else shown}  {doc_of(k)}")
    lines += ["", f"every key, with comments: {path}",
              "validated before anything starts: an unknown key, a wrong type or an out-of-range value is refused "
              "with one line naming the key", "", EXIT_CODES]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcam", description="Diffusion-CAM audits for diffusion multimodal LLMs",
                                epilog=EXIT_CODES)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, _) in COMMANDS.items():
        extra = dict(epilog=_run_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter) \
            if name == "run" else dict(epilog=EXIT_CODES)
        s = sub.add_parser(name, help=help_, description=help_, **extra)
        if name == "report":
            s.add_argument("run_dir", help="run directory or URL (local or s3://)")
            s.add_argument("--baseline", help="another run to compare with (drift)")
            s.add_argument("--fail-under", dest="fail_under",
                           help="e.g. obj_iou=0.30,pointing=0.8,error_rate=0.05; exit 2 if missed")
            s.add_argument("--allow-partial", dest="allow_partial", action="store_true",
                           help="let --fail-under pass on a run without _SUCCESS (by default a gate on a partial "
                                "run fails)")
            s.add_argument("--out", help="where to write report.html / summary.json (default: <run>/report)")
        s.add_argument("--json", action="store_true", help="print one JSON object with the figures")
        s.add_argument("--debug", action="store_true", help="print the traceback of an error (default: one line)")
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
    except Exception as e:  # noqa: BLE001 - an operator's error is one line; anything else re-raised
        if args.debug:
            raise
        from dcam.pipeline.operator_errors import operator_message

        known = operator_message(e)
        if known is None:
            raise
        print(f"dcam {args.command}: error: {known[1]} (--debug for the traceback)", file=sys.stderr)
        return known[0]
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
