"""``stablemorph``: the command line.

    stablemorph demo                    the stability experiment at a small size (minutes)
    stablemorph experiment ...          the full experiment, any data set / model / morph
    stablemorph morph ...               grow a saved model and save the child
    stablemorph decompose ...           factor one random or given kernel and print the report

Every command prints where its outputs are. ``stablemorph COMMAND --help`` explains each
option.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

# The keys of stablemorph.morphs.MORPHS (not imported here: --help stays fast; a test checks).
MORPH_OPS = ["deepen", "widen", "enlarge_kernel", "insert_subnet", "grow_mlp", "grow_heads",
             "grow_d_model", "insert_block"]
EPILOG = "Documentation and measured results: README.md of the stablemorph repository."


class UsageError(ValueError):
    """The command cannot run as given (exit code 2, one line on stderr)."""


class CommandFailed(RuntimeError):
    """The command ran and failed (exit code 1, one line on stderr)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"expected a JSON object like '{{\"k\": 1}}', got {text!r}"
        )
    return value


def _add_experiment_options(p: argparse.ArgumentParser, demo: bool) -> None:
    from stablemorph.experiment.stability import ARM_OPTIONS, BASELINES, SCHEMES

    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/demo" if demo else "runs/experiment"),
        help="output folder (curves CSV/JSON, curves.png, report.md); an existing "
        "folder of the same experiment is resumed (default: %(default)s)",
    )
    p.add_argument(
        "--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default: %(default)s)"
    )
    p.add_argument(
        "--schemes",
        nargs="+",
        default=list(SCHEMES),
        help=f"morph schemes compared, each optionally with +options, e.g. netmorph+lr "
        f"(schemes {', '.join(SCHEMES)}; options {', '.join(ARM_OPTIONS)}; default: the "
        f"three schemes)",
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        default=list(BASELINES),
        choices=BASELINES,
        help="baseline arms: the parent trained on, the child from scratch",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch CPU threads (default: %(default)s; "
        "use 1 when anything else runs on a 2-core machine)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _experiment_choices() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from stablemorph.experiment.growth import ALL_MORPHS
    from stablemorph.experiment.stability import REGIMES

    return ALL_MORPHS, REGIMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stablemorph",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    morph_choices, regime_choices = _experiment_choices()

    demo = sub.add_parser(
        "demo",
        help="the stability experiment, small: a few minutes on 2 CPU cores",
        description="Train a small CNN parent, deepen every conv with each scheme "
        "(stable, netmorph, net2net), continue training every arm with identical "
        "settings and write a report with a plot. Uses Fashion-MNIST when Debian's "
        "dataset-fashion-mnist is installed, otherwise scikit-learn's embedded 8x8 "
        "digits.",
    )
    _add_experiment_options(demo, demo=True)
    demo.add_argument("--dataset", default=None, help="override the automatic choice")

    exp = sub.add_parser(
        "experiment",
        help="the full stability experiment",
        description="The stability experiment of DESIGN.md section 5 on any data "
        "set, model and morph. With --model tiny-gpt: the transformer growth "
        "experiment on Python standard-library source text.",
    )
    _add_experiment_options(exp, demo=False)
    exp.add_argument(
        "--dataset",
        default=None,
        help="fashion-mnist | mnist | cifar10 | digits | text (the Python standard "
        "library's source, for --model gpt; its default) (default: fashion-mnist if "
        "installed, else digits)",
    )
    exp.add_argument(
        "--data-root",
        default=None,
        help="folder holding the data set's files "
        "(MNIST/Fashion-MNIST IDX, gzip or not; CIFAR-10 python pickles)",
    )
    exp.add_argument(
        "--limit-train", type=int, default=None, help="use only this many training images"
    )
    exp.add_argument("--limit-test", type=int, default=None, help="use only this many test images")
    exp.add_argument(
        "--model",
        default="cnn",
        help="zoo model: cnn | vgg | resnet | depthwise | mlp, or gpt (the project's "
        "character-level GPT, on --dataset text; tiny-gpt is the same) (default: %(default)s)",
    )
    exp.add_argument(
        "--model-kwargs",
        type=_json,
        default={},
        help="constructor arguments as JSON, e.g. '{\"widths\": [32, 64]}'",
    )
    exp.add_argument(
        "--morph",
        default=None,
        choices=list(morph_choices),
        help="the morph applied to every target: deepen, widen, insert_subnet, "
        "enlarge_kernel (CNN/MLP), depth, width (GPT); default: deepen, depth for gpt",
    )
    exp.add_argument(
        "--targets",
        nargs="+",
        default=None,
        help="layer names to morph, in order (default: every conv)",
    )
    exp.add_argument(
        "--morph-kwargs",
        type=_json,
        default=None,
        help="morph options as JSON (default for deepen: '{\"kernel_size\": 3}'; widen "
        "and GPT width take '{\"factor\": 2}', GPT depth '{\"n_layer\": 4}')",
    )
    exp.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "adamw"])
    exp.add_argument(
        "--lr",
        type=float,
        default=0.05,
        help="parent's initial learning rate; the parent ends at lr/10 (default: %(default)s)",
    )
    exp.add_argument(
        "--lr-after",
        nargs="+",
        default=["same", "raised"],
        choices=list(regime_choices),
        help="learning-rate regimes after the morph: same = the parent's last rate "
        "(lr/10), raised = lr, warmup = from lr/10 linearly up to lr over --warmup-steps",
    )
    exp.add_argument("--warmup-steps", type=int, default=50,
                     help="length of the warmup regime's ramp (default: %(default)s)")
    exp.add_argument("--weight-decay", type=float, default=5e-4)
    exp.add_argument("--batch-size", type=int, default=64)
    exp.add_argument("--parent-steps", type=int, default=600, help="parent training steps")
    exp.add_argument("--steps", type=int, default=400, help="training steps after the morph")
    exp.add_argument(
        "--dense-until",
        type=int,
        default=200,
        help="evaluate every --dense-every steps up to this step",
    )
    exp.add_argument("--dense-every", type=int, default=10)
    exp.add_argument("--every", type=int, default=50, help="evaluation interval afterwards")
    exp.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train each arm with N DDP processes on the CPU (gloo); the global batches are the "
        "single-process ones, so curves equal the single-process ones for models without "
        "BatchNorm; BatchNorm normalises per rank, on 1/N of each batch (default: %(default)s)",
    )
    exp.add_argument(
        "--drop-window",
        type=int,
        default=200,
        help="T: drop depth = parent accuracy - worst accuracy in the first T steps",
    )

    morph = sub.add_parser(
        "morph",
        help="grow a saved model and save the child",
        description="Load a model saved with stablemorph.save (sm.save(model, path); zoo "
        "models need nothing else), apply one morph and save the "
        "child with its recipe; prints the morph report.",
    )
    morph.add_argument("--checkpoint", type=Path, required=True, help="the parent's file")
    morph.add_argument(
        "--op", required=True, choices=MORPH_OPS,
        help="the morph (transformer growths need a saved stablemorph.transformer.GPT)",
    )
    morph.add_argument("--at", required=True, help="the layer's dotted name, e.g. features.conv1")
    morph.add_argument(
        "--scheme",
        default=None,
        choices=["stable", "netmorph", "net2net"],
        help="the morph's scheme (default: stable, or the scheme given in --kwargs)",
    )
    morph.add_argument(
        "--kwargs",
        type=_json,
        default={},
        help="the morph's options as JSON, e.g. '{\"width\": 96}' (widen needs a width)",
    )
    morph.add_argument(
        "--input-shape",
        type=_positive_int,
        nargs="+",
        default=None,
        help="probe input shape without the batch dim, if the model does not record one",
    )
    morph.add_argument("--out", type=Path, required=True, help="the child's file")

    dec = sub.add_parser(
        "decompose",
        help="factor a kernel and print the report",
        description="Decompose a random He-scaled kernel "
        "with each scheme and print residual, zero fraction and time.",
    )
    dec.add_argument("--c-in", type=_positive_int, default=64)
    dec.add_argument("--c-out", type=_positive_int, default=64)
    dec.add_argument("--kernel", type=_positive_int, default=3)
    dec.add_argument("--mid", type=_positive_int, default=None,
                     help="C_mid (default: smallest feasible)")
    dec.add_argument("--kernel-sizes", type=_positive_int, nargs=2, default=[3, 3],
                     metavar=("K1", "K2"))
    dec.add_argument("--methods", nargs="+", default=["stable", "netmorph", "net2net"])

    from stablemorph.hf import cli as hf_cli  # the `grow` subcommand (Hugging Face folders)

    hf_cli.add_parser(sub)
    from stablemorph.experiment.progressive import add_arguments as progressive_arguments

    progressive_arguments(sub.add_parser(
        "progressive",
        help="grow a model during training; FLOPs and time saved against scratch",
        description="Progressive growth (exact schemes, block stacking, random new parts, a "
        "plateau trigger) of a character-level GPT, a Hugging Face Llama or the Fashion-MNIST "
        "CNN, in depth and width, against the large model trained from scratch under the "
        "same FLOPs budget.",
    ))
    return parser


def _data_note(name: str) -> str:
    if name == "digits":
        return (
            "scikit-learn's embedded 8x8 digits (1,437 train / 360 test). For Fashion-MNIST: "
            "`apt-get install dataset-fashion-mnist` (Debian), then run again."
        )
    return f"{name}"


def _run_experiment(args: argparse.Namespace, demo: bool) -> int:
    from stablemorph.experiment.data import default_dataset_name
    from stablemorph.experiment.report import write_report
    from stablemorph.experiment.stability import Experiment, ExperimentConfig

    dataset = args.dataset or default_dataset_name()
    if demo:
        small = dataset == "digits"
        cfg = ExperimentConfig(
            dataset=dataset,
            model="cnn",
            model_kwargs={"widths": [16, 32]},
            limit_train=None if small else 12_000,
            limit_test=None if small else 1_000,
            schemes=args.schemes,
            baselines=args.baselines,
            seeds=args.seeds,
            parent_steps=300 if small else 600,
            child_steps=200,
            regimes=["same", "raised", "warmup"],
            dense_until=100,
            dense_every=10,
            every=25,
            drop_window=100,
            threads=args.threads,
        )
        if small and args.dataset is None:
            print(
                "Fashion-MNIST is not installed: running on scikit-learn's embedded 8x8 digits. "
                "For Fashion-MNIST: apt-get install dataset-fashion-mnist",
                flush=True,
            )
        elif not small:
            print(f"running on {dataset} (12,000 training / 1,000 test images for the demo)",
                  flush=True)
    else:
        model = "gpt" if args.model == "tiny-gpt" else args.model
        if model == "gpt":
            dataset = args.dataset or "text"
        morph = args.morph or ("depth" if model == "gpt" else "deepen")
        cfg = ExperimentConfig(
            dataset=dataset,
            data_root=args.data_root,
            limit_train=args.limit_train,
            limit_test=args.limit_test,
            model=model,
            model_kwargs=args.model_kwargs,
            morph=morph,
            targets=args.targets,
            morph_kwargs=args.morph_kwargs
            if args.morph_kwargs is not None
            else ({"kernel_size": 3} if morph == "deepen" and model != "mlp" else {}),
            schemes=args.schemes,
            baselines=args.baselines,
            seeds=args.seeds,
            optimizer=args.optimizer,
            lr=args.lr,
            weight_decay=args.weight_decay,
            batch_size=args.batch_size,
            parent_steps=args.parent_steps,
            child_steps=args.steps,
            regimes=args.lr_after,
            warmup_steps=args.warmup_steps,
            dense_until=args.dense_until,
            dense_every=args.dense_every,
            every=args.every,
            drop_window=args.drop_window,
            threads=args.threads,
            nproc=args.nproc,
        )
    arms = Experiment(cfg, args.out, progress=not args.no_progress).run()
    report = write_report(arms, cfg, args.out, _command(), _data_note(cfg.dataset))
    print(report.read_text().split("## Results", 1)[1].split("![curves]", 1)[0].strip())
    print(
        f"\nreport: {report}\nplot:   {args.out / 'curves.png'}\ncurves: {args.out / 'curves.csv'}"
    )
    return 0


def _command() -> str:
    return "stablemorph " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _morph_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``--kwargs`` checked against the morph's signature, with ``--scheme`` and
    ``--input-shape`` merged in (a conflict is a usage error)."""
    import inspect

    from stablemorph.morphs import MORPHS

    params = inspect.signature(MORPHS[args.op]).parameters
    allowed = [n for n, p in params.items() if n not in ("model", "target", "inputs")
               and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    open_ended = any(p.kind == p.VAR_KEYWORD for p in params.values())  # checks its own
    kwargs = dict(args.kwargs)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown and not open_ended:
        raise UsageError(f"--kwargs: unknown option(s) {', '.join(map(repr, unknown))} for "
                         f"{args.op}; it takes {', '.join(allowed)}")
    missing = [n for n in allowed if params[n].default is inspect.Parameter.empty
               and n not in kwargs]
    if missing:
        example = ", ".join(f'"{n}": ...' for n in missing)
        raise UsageError(f"{args.op} needs {', '.join(missing)}: pass --kwargs '{{{example}}}'")
    if args.scheme is not None:
        if kwargs.get("scheme", args.scheme) != args.scheme:
            raise UsageError(f"--scheme {args.scheme} conflicts with \"scheme\": "
                             f"{kwargs['scheme']!r} in --kwargs; give it once")
        kwargs["scheme"] = args.scheme
    if args.input_shape:
        if "input_shape" in kwargs:
            raise UsageError("--input-shape and \"input_shape\" in --kwargs: give it once")
        kwargs["input_shape"] = [8, *args.input_shape]  # a probe batch of 8
    return kwargs


def _check_out(path: Path) -> None:
    """Refuse an ``--out`` that cannot become a file, before any work."""
    if path.is_dir():
        raise UsageError(f"--out {path}: is a folder; give the child's file name")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"--out {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and
                                                     not os.access(path, os.W_OK)):
        raise UsageError(f"--out {path}: not writable ({folder} does not allow it)")


def _run_morph(args: argparse.Namespace) -> int:
    import stablemorph as sm

    kwargs = _morph_kwargs(args)
    _check_out(args.out)
    if not args.checkpoint.is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: no such file")
    parent = sm.load(args.checkpoint)
    child = sm.apply(args.op, parent, args.at, **kwargs)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sm.save(child, args.out)
    except OSError as err:
        raise CommandFailed(f"writing {args.out} failed: {err.strerror or err}") from err
    print(sm.last_report(child).summary())
    print(f"child: {args.out}")
    return 0


def _run_decompose(args: argparse.Namespace) -> int:
    import torch

    from stablemorph.equation import min_mid_channels
    from stablemorph.solvers import DecompositionError, decompose

    gen = torch.Generator().manual_seed(0)
    G = torch.randn(args.c_out, args.c_in, args.kernel, args.kernel, generator=gen)
    G *= (2.0 / (args.c_in * args.kernel**2)) ** 0.5
    k1, k2 = args.kernel_sizes
    mid = args.mid or min_mid_channels(args.c_in, args.c_out, k1, k2, k=args.kernel)
    print(f"G {tuple(G.shape)} -> C_mid={mid}, kernels {k1} (*) {k2}")
    failed = []
    for method in args.methods:
        try:
            _, _, rep = decompose(G, mid, (k1, k2), method=method)
        except (DecompositionError, ValueError) as err:
            print(f"  {method:9s} failed: {err}")
            failed.append(method)
            continue
        print(
            f"  {method:9s} {rep.how:9s} residual {rep.residual:.1e} (float32 "
            f"{rep.residual_cast:.1e}), zeros {rep.zero_fraction:.1%}, near-zeros "
            f"{rep.near_zero_fraction:.2%}, {rep.seconds:.3f} s"
        )
    if failed and len(failed) == len(args.methods):
        raise CommandFailed(f"every method failed ({', '.join(failed)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("demo", "experiment"):
            return _run_experiment(args, demo=args.command == "demo")
        if args.command == "grow":
            from stablemorph.hf import cli as hf_cli

            return hf_cli.run(args)
        if args.command == "progressive":
            from stablemorph.experiment.progressive import run_from_args

            return run_from_args(args)
        return _run_tool(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"stablemorph {args.command}: error: {err}", file=sys.stderr)
        return 2


def _run_tool(args: argparse.Namespace) -> int:
    """``morph`` and ``decompose``: exit 2 when the command cannot run as given (usage,
    unknown layer, refused input: one line on stderr), 1 when it ran and failed."""
    from stablemorph.checkpoint import CheckpointError
    from stablemorph.morphs import MorphError

    try:
        return _run_morph(args) if args.command == "morph" else _run_decompose(args)
    except (UsageError, MorphError, CheckpointError, ValueError) as err:
        print(f"stablemorph {args.command}: error: {err}", file=sys.stderr)
        return 2
    except CommandFailed as err:
        print(f"stablemorph {args.command}: error: {err}", file=sys.stderr)
        return 1
    except (OSError, MemoryError, RuntimeError) as err:
        print(f"stablemorph {args.command}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
