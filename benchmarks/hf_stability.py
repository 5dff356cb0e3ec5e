"""Loss rise after growing a Hugging Face Llama mid-training (the HF cell of issue 9's matrix).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/hf_stability.py [--seeds 3]

Per seed: a small ``LlamaForCausalLM`` (built from a config, random start) trains on the
character-level text of :mod:`stablemorph.transformer.text` (AdamW, linear warm-up, then a
constant rate) for ``--parent-steps``; it is then grown with :func:`stablemorph.grow` by each
scheme, in depth (2 -> 4 layers) and in width (hidden, heads, kv heads and MLP x2), its AdamW
state carried by :func:`stablemorph.transfer_optimizer`, and every arm (the three schemes and
the parent trained on) trains ``--child-steps`` more on the same batches, at the parent's
rate (``same``) or three times it (``raised``).
The *rise* is the worst validation loss in the first ``--window`` steps minus the loss at the
growth (> 0: it got worse); paired differences are stable minus each baseline, same seed.
Appends nothing: writes ``benchmarks/results/hf_stability.md``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import stablemorph as sm
from stablemorph.transformer.text import (
    VOCAB_SIZE,
    fixed_windows,
    load_stdlib_corpus,
    random_windows,
)

SCHEMES = ("stable", "net2net", "netmorph")
CELLS = {"depth": {"layers": 4}, "width": {"hidden": 128, "heads": 8, "kv_heads": 4,
                                             "mlp": 256}}
REGIMES = {"same": 1.0, "raised": 3.0}  # the rate after growth, times the parent's


def llama(seed: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=VOCAB_SIZE, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: tuple[torch.Tensor, torch.Tensor]) -> float:
    was = model.training
    model.eval()
    value = float(loss_of(model, *val))
    model.train(was)
    return value


def train(model, opt, tokens, start: int, steps: int, args, seed: int, val=None,
          every: int = 0, factor: float = 1.0) -> list[float]:
    curve = []
    model.train()
    for step in range(start, start + steps):
        if val is not None and (step - start) % every == 0:
            curve.append(evaluate(model, val))
        for group in opt.param_groups:
            group["lr"] = factor * args.lr * min(1.0, (step + 1) / args.warmup)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        x, y = random_windows(tokens, args.batch, args.block, gen)
        loss = loss_of(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if val is not None:
        curve.append(evaluate(model, val))
    return curve


def run(args: argparse.Namespace) -> dict:
    corpus = load_stdlib_corpus(max_chars=300_000)
    val = fixed_windows(corpus.val, 64, args.block)
    keys = [f"{c}/{r}" for c in CELLS for r in REGIMES]
    rises: dict[str, dict[str, list[float]]] = {k: {} for k in keys}
    finals: dict[str, dict[str, list[float]]] = {k: {} for k in keys}
    zeros: dict[str, dict[str, float]] = {k: {} for k in keys}
    for seed in range(args.seeds):
        parent = llama(seed)
        opt = torch.optim.AdamW(parent.parameters(), lr=args.lr, weight_decay=0.1)
        train(parent, opt, corpus.train, 0, args.parent_steps, args, seed)
        probe = random_windows(corpus.train, 4, args.block, torch.Generator().manual_seed(7))[0]
        for cell, sizes in CELLS.items():
            grown = {arm: sm.grow(parent, scheme=arm, inputs=probe, seed=seed, **sizes)
                     for arm in SCHEMES}
            for regime, factor in REGIMES.items():
                key = f"{cell}/{regime}"
                for arm in ("parent", *SCHEMES):
                    if arm == "parent":
                        model, arm_opt = copy.deepcopy((parent, opt))
                    else:
                        model = copy.deepcopy(grown[arm])
                        arm_opt = sm.transfer_optimizer(opt, parent, model)
                        zeros[key][arm] = sm.last_report(model).zero_fraction
                    curve = train(model, arm_opt, corpus.train, args.parent_steps,
                                  args.child_steps, args, seed, val, args.every, factor)
                    window = curve[: args.window // args.every + 1]
                    rises[key].setdefault(arm, []).append(max(window) - curve[0])
                    finals[key].setdefault(arm, []).append(curve[-1])
                    print(f"seed {seed} {key} {arm}: rise {rises[key][arm][-1]:+.4f}, "
                          f"final {curve[-1]:.4f}", flush=True)
    return {"rises": rises, "finals": finals, "zeros": zeros}


def fmt(values: list[float], sign: str = "+") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):{sign}.4f} ± {sd:.4f}"


def report(result: dict, args: argparse.Namespace, seconds: float, load: str) -> str:
    lines = [
        "# Loss rise after growing a Hugging Face Llama mid-training", "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch thread(s), torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d')}; load average at start {load}; "
        f"{seconds:.0f} s.", "",
        f"LlamaForCausalLM hidden 64, 2 layers, 4 heads / 2 kv heads, MLP 128, untied; "
        f"char-level text; AdamW lr {args.lr} (warm-up {args.warmup}, then constant), "
        f"batch {args.batch} x {args.block}; parent {args.parent_steps} steps, then every arm "
        f"{args.child_steps} steps on the same batches at the parent's rate (same) or 3x "
        f"(raised); rise = worst "
        f"validation loss in the first {args.window} steps minus the loss at growth "
        f"(evaluated every {args.every}); {args.seeds} seeds.", "",
        "| cell | arm | rise (nats) | final loss | zeros in new/changed weights | "
        "paired rise: stable minus this arm |", "|---|---|---|---|---|---|",
    ]
    for key in result["rises"]:
        cell, regime = key.split("/")
        stable = result["rises"][key]["stable"]
        for arm in ("parent", *SCHEMES):
            rise = result["rises"][key][arm]
            paired = "" if arm == "stable" else fmt([s - r for s, r in zip(stable, rise,
                                                                         strict=True)])
            z = result["zeros"][key].get(arm)
            lines.append(f"| {cell} ({CELLS[cell]}), {regime} lr | {arm} | {fmt(rise)} | "
                         f"{fmt(result['finals'][key][arm], '')} | "
                         f"{'' if z is None else f'{z:.1%}'} | {paired} |")
    lines += ["", "Command:", "", "    OMP_WAIT_POLICY=PASSIVE .venv/bin/python "
              f"benchmarks/hf_stability.py --seeds {args.seeds} --threads {args.threads}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--parent-steps", type=int, default=400)
    parser.add_argument("--child-steps", type=int, default=150)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "hf_stability.md")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    with open("/proc/loadavg") as f:
        load_avg = " ".join(f.read().split()[:3])
    t0 = time.perf_counter()
    res = run(a)
    a.out.write_text(report(res, a, time.perf_counter() - t0, load_avg))
    print(a.out.read_text())
