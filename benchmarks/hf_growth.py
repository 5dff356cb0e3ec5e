"""Grow a small Hugging Face Llama 2x in depth and width with ``sm.grow``, per scheme.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/hf_growth.py [--repeats 3]

Parent: ``LlamaForCausalLM`` built from a config (hidden 256, 4 layers, 8 heads, 4 key/value
heads, SwiGLU width 688, vocabulary 2000, tied and untied head), random weights with
trained-looking RMSNorm weights (1 + 0.3 N(0, 1)). Child: 8 layers, hidden 512, 16 heads,
8 key/value heads, width 1376 (every dimension 2x). For each scheme it records the median
wall time of ``--repeats`` calls of ``sm.grow`` (deep copy of nothing: the child is built from
a new config; includes verification in eval and train mode on the default probe), the
deviation ``max_rel`` of the logits on a *separate* probe (batch 4 x 32 tokens), the parent's
own float32 noise on that probe (float32 vs float64 parent), whether greedy ``generate`` (24
new tokens) gives the same tokens, and the fraction of exact zeros in the new or changed
parameters. Then a coverage matrix on tiny models of every supported family (hidden 32, 2
layers, 4 heads): each dimension under each scheme, with the deviation and zero fraction, or
the refusal's reason. Results go to ``benchmarks/results/hf_growth.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import stablemorph as sm
from stablemorph.hf.families import sizes

OUT = Path(__file__).parent / "results" / "hf_growth.md"
TARGET = {"layers": 8, "hidden": 512, "heads": 16, "kv_heads": 8, "mlp": 1376}


def parent_model(tied: bool) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                            num_attention_heads=8, num_key_value_heads=4, vocab_size=2000,
                            tie_word_embeddings=tied)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def measure(tied: bool, scheme: str, repeats: int) -> dict[str, object]:
    parent = parent_model(tied)
    ids = torch.randint(0, 2000, (4, 32), generator=torch.Generator().manual_seed(1))
    times, child = [], None
    for r in range(repeats):
        t = time.perf_counter()
        child = sm.grow(parent, scheme=scheme, seed=r, **TARGET)
        times.append(time.perf_counter() - t)
    with torch.no_grad():
        want, got = parent(ids).logits, child(ids).logits
        floor = rel(want, copy.deepcopy(parent).double()(ids).logits)
    prompt = ids[:1, :8]
    same = (parent.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0).tolist()
            == child.generate(prompt, max_new_tokens=24, do_sample=False,
                              pad_token_id=0).tolist())
    rep = sm.last_report(child)
    n_params = sum(p.numel() for p in child.parameters())
    return {"tied": tied, "scheme": scheme, "seconds": statistics.median(times),
            "all": times, "rel": rel(got, want), "floor": floor, "verify_rel": rep.max_rel,
            "zeros": rep.zero_fraction, "generate": same, "params": n_params,
            "parent_params": sum(p.numel() for p in parent.parameters())}


MATRIX_DIMS = {
    "layers 2->4": {"layers": 4},
    "hidden 32->64": {"hidden": 64},
    "hidden 32->48": {"hidden": 48},
    "heads 4->8": {"heads": 8},
    "kv heads 2->4": {"kv_heads": 4},
    "mlp 64->96": {"mlp": 96},
}


def coverage() -> list[str]:
    """One row per family and dimension, one cell per scheme."""
    sys.path.insert(0, str(Path(__file__).parent.parent))
    from tests import hf_cases

    families = {
        "Llama (untied)": hf_cases.llama, "Llama (tied)": lambda: hf_cases.llama(tied=True),
        "Qwen2 (tied, qkv bias)": hf_cases.qwen2, "GPT-2": hf_cases.gpt2,
        "ViT": hf_cases.vit, "BERT (seq. cls.)": hf_cases.bert,
    }
    lines = ["| family | growth | stable | net2net | netmorph |", "|---|---|---|---|---|"]
    for fam, make in families.items():
        for label, growth in MATRIX_DIMS.items():
            if label.startswith("kv") and fam.split()[0] not in ("Llama", "Qwen2"):
                continue  # one key/value head per query head: kv heads follow heads
            if label.startswith("mlp"):
                growth = {"mlp": sizes(make())["mlp"] * 3 // 2}
                label = f"mlp x1.5 ({growth['mlp']})"
            cells = []
            for scheme in ("stable", "net2net", "netmorph"):
                try:
                    rep = sm.last_report(sm.grow(make(), scheme=scheme, **growth))
                    cells.append(f"exact {rep.max_rel:.0e}, {rep.zero_fraction:.1%} zeros")
                except sm.MorphError as err:
                    reason = str(err).split(": ", 1)[-1]
                    cells.append("refused: " + reason[:110].replace("|", "/")
                                 + ("..." if len(reason) > 110 else ""))
            lines.append(f"| {fam} | {label} | " + " | ".join(cells) + " |")
    return lines


def gpt2_small() -> list[str]:
    """A GPT-2-small-shaped model (124M parameters, random weights) deepened 12 -> 24."""
    import transformers as tf

    torch.manual_seed(0)
    parent = tf.GPT2LMHeadModel(tf.GPT2Config()).eval()
    t = time.perf_counter()
    child = sm.grow(parent, layers=24)
    seconds = time.perf_counter() - t
    ids = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(2))
    same = (parent.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0).tolist()
            == child.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0).tolist())
    rep = sm.last_report(child)
    n = sum(p.numel() for p in parent.parameters()) / 1e6
    return [
        "## Scale: a GPT-2-small-shaped model",
        "",
        f"`GPT2LMHeadModel(GPT2Config())` ({n:.0f}M parameters, random weights) grown to 24 "
        f"layers under `stable` (one run): {seconds:.1f} s, max_rel {rep.max_rel:.1e} on the "
        f"verification probe, {rep.zero_fraction:.1%} exact zeros in the "
        f"{len(rep.changed)} new or changed tensors, greedy generate (8 tokens) "
        f"{'identical' if same else 'DIFFERENT'}.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = [measure(tied, scheme, args.repeats) for tied in (False, True)
            for scheme in ("stable", "net2net", "netmorph")]
    load_after = os.getloadavg()
    import transformers

    lines = [
        "# Growing a Hugging Face Llama 2x in every dimension (`sm.grow`)",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} "
        f"PYTHONPATH=src .venv/bin/python benchmarks/hf_growth.py --repeats {args.repeats}`  ",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {torch.get_num_threads()} thread(s); "
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (the machine "
        f"was shared with other jobs: the seconds are indicative).",
        "",
        f"Parent: LlamaForCausalLM, hidden 256, 4 layers, 8 heads / 4 kv heads, SwiGLU 688, "
        f"vocabulary 2000 ({rows[0]['parent_params'] / 1e6:.2f}M parameters untied). Child: "
        f"layers 8, hidden 512, heads 16, kv heads 8, mlp 1376 ({rows[0]['params'] / 1e6:.2f}M "
        f"untied). Logits compared on a separate probe of 4 x 32 tokens; the float32 noise "
        f"floor is the parent in float32 vs float64 on that probe.",
        "",
        "| head | scheme | seconds (median of "
        f"{args.repeats}) | max_rel logits | parent float32 noise | max_rel (verify probe) "
        "| same greedy tokens (24) | exact zeros in new/changed params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {'tied' if r['tied'] else 'untied'} | {r['scheme']} | {r['seconds']:.2f} "
            f"({', '.join(f'{t:.2f}' for t in r['all'])}) | {r['rel']:.1e} | {r['floor']:.1e} "
            f"| {r['verify_rel']:.1e} | {'yes' if r['generate'] else 'NO'} | {r['zeros']:.1%} |"
        )
    lines += [
        "",
        "Each call builds the child from its new config (transformers' initialisation "
        "skipped, every tensor written), re-encodes the stream in float64, and verifies the "
        "logits in eval and train mode on the default probe (2 x 8 tokens).",
        "",
        "## Coverage: every family x dimension x scheme (tiny models)",
        "",
        "Tiny models of `tests/hf_cases.py` (hidden 32, 2 layers, 4 heads, 2 kv heads where "
        "the family has them, norms and biases randomised like trained ones). `exact`: the "
        "logits' max_rel on the verification probe (limit 1e-5) and the fraction of exact "
        "zeros in the new or changed parameters; `refused`: the reason sm.grow gives (GPT-2 "
        "and BERT derive head_dim = hidden / heads, so there `heads 4->8` also doubles "
        "hidden; kv heads exist only in Llama and Qwen2).",
        "",
        *coverage(),
        "",
        *gpt2_small(),
    ]
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
