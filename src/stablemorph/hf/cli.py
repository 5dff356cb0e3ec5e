"""``stablemorph grow DIR --layers 8 --hidden 512 ... --out DIR2``: grow a ``save_pretrained``
folder into another one (the subcommand's parser and runner; ``stablemorph.cli`` wires it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stablemorph.morphs.contract import SCHEMES

# Classes the CLI may instantiate from a folder's config.json ("architectures").
CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
           "GPT2LMHeadModel", "ViTForImageClassification", "BertModel",
           "BertForSequenceClassification")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "grow",
        help="grow a Hugging Face save_pretrained folder exactly",
        description="Load a save_pretrained folder (" + ", ".join(CLASSES) + "), grow it to "
        "the sizes given (sm.grow: same logits) and write the child with save_pretrained; "
        "prints the report.",
    )
    p.add_argument("folder", type=Path, help="the parent's save_pretrained folder")
    for name in ("layers", "hidden", "heads", "kv-heads", "mlp"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"target {name} (default: keep)")
    p.add_argument("--scheme", default="stable", choices=list(SCHEMES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="the child's folder (new or empty)")


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; errors raise ``ValueError``/``FileNotFoundError`` (the CLI prints
    them and exits with status 2)."""
    config_file = args.folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{args.folder}: no config.json; expected a save_pretrained "
                                f"folder")
    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"--out {args.out}: exists and is not empty; give a new folder")
    try:
        archs = json.loads(config_file.read_text()).get("architectures") or []
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    name = archs[0] if archs else None
    if name not in CLASSES:
        raise ValueError(f"{config_file}: architecture {name!r} is not supported by "
                         f"'stablemorph grow'; supported: {', '.join(CLASSES)}")
    try:
        import transformers
    except ImportError:
        raise ValueError("'stablemorph grow' needs transformers: pip install "
                         "'stablemorph[hf]'") from None
    import stablemorph as sm

    parent = getattr(transformers, name).from_pretrained(args.folder)
    child = sm.grow(parent, layers=args.layers, hidden=args.hidden, heads=args.heads,
                    kv_heads=args.kv_heads, mlp=args.mlp, scheme=args.scheme, seed=args.seed)
    child.save_pretrained(args.out)
    print(sm.last_report(child).summary())
    print(f"child: {args.out}")
    return 0
