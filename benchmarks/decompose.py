"""Benchmark: how fast and how exactly ``decompose(method="stable")`` solves the morphism
equation, against a plain Adam minimisation of the same loss from the same start.

    .venv/bin/python benchmarks/decompose.py --out benchmarks/results/decompose.md

Problems, at C = C_in = C_out in --sizes:

- ``3x3 -> 3x3 (*) 1x1``, C_mid = C (stable: one factor random, the other solved);
- ``3x3 -> 3x3 (*) 3x3``, C_mid = 1.25 C (stable: cancelling pairs, a zero-ringed target);
- ``5x5 -> 3x3 (*) 3x3``, C_mid = 2 C (stable: Levenberg-Marquardt, a generic target).

Adam (float64, lr searched over a small grid on the smallest size) minimises the same
relative squared residual from the same random start, until it reaches stable's residual,
stops improving, or runs out of its time budget; the table says which.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from stablemorph.bilinear import BilinearShape
from stablemorph.equation import pad_kernel, relative_residual, sparsity
from stablemorph.solvers import _random_factors, decompose

PROBLEMS = {
    "3x3 -> 3x3(*)1x1": (3, (3, 1), 1.0),
    "3x3 -> 3x3(*)3x3": (3, (3, 3), 1.25),
    "5x5 -> 3x3(*)3x3": (5, (3, 3), 2.0),
}


def kernel(c: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(c, c, k, k, generator=gen) * (2.0 / (c * k * k)) ** 0.5


def adam(
    G: torch.Tensor,
    c_mid: int,
    ks: tuple[int, int],
    target: float,
    budget: float,
    lr: float,
    seed: int,
) -> tuple[float, float, int, str]:
    """Adam on ``||F2 (*) F1 - G~||^2 / ||G~||^2`` in float64; returns (residual, seconds,
    steps, why it stopped)."""
    c = G.shape[0]
    shape = BilinearShape(c, c_mid, c, ks[0], ks[1], 2)
    Gp = pad_kernel(G.double(), shape.kc)
    T = shape.target(Gp)
    F1, F2 = _random_factors(shape, torch.Generator().manual_seed(seed))
    A = shape.f2_to_a(F2).requires_grad_()
    B = shape.f1_to_b(F1).requires_grad_()
    opt = torch.optim.Adam([A, B], lr=lr)
    tnorm2 = T.pow(2).sum()
    start = time.perf_counter()
    best, since, steps, why = float("inf"), 0, 0, "budget"
    while True:
        opt.zero_grad()
        loss = (shape.apply(A, B) - T).pow(2).sum() / tnorm2
        loss.backward()
        opt.step()
        steps += 1
        res = float(loss.detach()) ** 0.5
        if res < best * 0.999:
            best, since = res, 0
        else:
            since += 1
        if res <= target:
            why = "reached"
            break
        if since > 2000:
            why = "stalled"
            break
        if time.perf_counter() - start > budget:
            break
    with torch.no_grad():
        final = relative_residual(shape.b_to_f1(B), shape.a_to_f2(A), Gp)
    return final, time.perf_counter() - start, steps, why


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--repeats", type=int, default=3, help="stable runs per cell (median)")
    parser.add_argument("--adam-seconds", type=float, default=60.0, help="Adam's time budget")
    parser.add_argument("--adam-max-size", type=int, default=128, help="largest C given to Adam")
    parser.add_argument("--lm-max-size", type=int, default=128, help="largest C for the LM problem")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--update", action="store_true",
                        help="replace only the measured rows of --out's table (and say so)")
    parser.add_argument("--before", type=Path, default=None,
                        help="src/ of older code: time it against this checkout's, alternating "
                        "subprocesses, same seeds")
    parser.add_argument("--versus-threads", type=int, nargs="+", default=None,
                        help="thread counts of the --before comparison (default: --threads)")
    parser.add_argument("--worker", nargs=4, type=str, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, c, seed, threads = args.worker
        torch.set_num_threads(int(threads))
        k, ks, ratio = PROBLEMS[name]
        G = kernel(int(c), k, seed=int(c))
        t, cpu = time.perf_counter(), time.process_time()
        *_, rep = decompose(G, round(int(c) * ratio), ks, method="stable", seed=int(seed),
                            max_iter=100)
        print(json.dumps({"seconds": time.perf_counter() - t, "cpu": time.process_time() - cpu,
                          "residual": rep.residual, "residual_f32": rep.residual_cast,
                          "near": rep.near_zero_fraction}))
        return
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = []
    for name in args.problems:
        k, ks, ratio = PROBLEMS[name]
        for c in args.sizes:
            if ks == (3, 3) and k == 5 and c > args.lm_max_size:
                continue
            c_mid = round(c * ratio)
            G = kernel(c, k, seed=c)
            times, reps = [], []
            for r in range(args.repeats):
                t = time.perf_counter()
                F1, F2, rep = decompose(G, c_mid, ks, method="stable", seed=r, max_iter=100)
                times.append(time.perf_counter() - t)
                reps.append(rep)
            rep = reps[0]
            sec = statistics.median(times)
            row = {
                "problem": name,
                "C": c,
                "C_mid": c_mid,
                "path": rep.how,
                "stable_s": sec,
                "residual": rep.residual,
                "residual_f32": rep.residual_cast,
                "zeros": sparsity(F1, F2)[0],
                "near": rep.near_zero_fraction,
            }
            if c <= args.adam_max_size:
                target = max(rep.residual, 1e-10)
                res, asec, steps, why = adam(G, c_mid, ks, target, args.adam_seconds, 1e-3, 0)
                row.update(adam_res=res, adam_s=asec, adam_steps=steps, adam_why=why)
            if args.before is not None:
                row["versus"] = [versus(args.before, name, c, args.repeats, t)
                                 for t in args.versus_threads or [args.threads]]
            rows.append(row)
            print(row, flush=True)
    write(rows, args, load)


def versus(before: Path, name: str, c: int, repeats: int, threads: int) -> dict:
    """Medians (wall and CPU seconds, residuals, near zeros) of the old and this checkout's
    ``decompose`` on the same problem and seeds, each run in a fresh subprocess, old and new
    alternating (same machine load), with the load average before and after."""
    here = Path(__file__).resolve()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    load_start = os.getloadavg()
    for seed in range(repeats):
        for version, src in (("before", before.resolve()), ("after", here.parents[1] / "src")):
            env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads)}
            out = subprocess.run(
                [sys.executable, str(here), "--worker", name, str(c), str(seed), str(threads)],
                env=env, capture_output=True, text=True, check=True).stdout
            runs[version].append(json.loads(out.strip().splitlines()[-1]))
    med = {v: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
           for v, rs in runs.items()}
    walls = {v: [r["seconds"] for r in rs] for v, rs in runs.items()}
    return med | {"threads": threads, "walls": walls, "load": (load_start, os.getloadavg())}


def write(rows: list[dict], args: argparse.Namespace, load: float) -> None:
    lines = [
        "# decompose benchmark",
        "",
        f"Command: `.venv/bin/python benchmarks/decompose.py {' '.join(os.sys.argv[1:])}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} "
        f"{platform.release()}, torch {torch.__version__}, {args.threads} threads. "
        f"Date: {datetime.date.today().isoformat()}. Load average at start: {load:.2f} "
        f"({'otherwise idle' if load < 0.5 else 'NOT idle: other jobs were running'}).",
        "",
        f"stable: median of {args.repeats} runs (seeds 0..{args.repeats - 1}). Adam: one run, "
        f"lr 1e-3, float64, same loss and same random start, stopped on reaching stable's "
        f"residual (floor 1e-10), on stalling (2,000 steps without 0.1% progress) or after "
        f"{args.adam_seconds:.0f} s. 'x faster' = Adam seconds / stable seconds (a lower bound "
        f"where Adam did not reach).",
        "",
        "| problem | C | C_mid | stable path | stable s | residual f64 | residual f32 | zeros "
        "| near-zeros | Adam s | Adam residual | Adam steps | Adam stop | x faster |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        adam_cells = (
            f"{r['adam_s']:.1f} | {r['adam_res']:.1e} | {r['adam_steps']} | {r['adam_why']} | "
            f"{r['adam_s'] / r['stable_s']:.0f}"
            if "adam_s" in r
            else "- | - | - | not run | -"
        )
        lines.append(
            f"| {r['problem']} | {r['C']} | {r['C_mid']} | {r['path']} | {r['stable_s']:.3f} | "
            f"{r['residual']:.1e} | {r['residual_f32']:.1e} | {r['zeros']:.1%} | {r['near']:.2%} | "
            f"{adam_cells} |"
        )
    versus_rows = [r for r in rows if "versus" in r]
    extra: list[str] = []
    if versus_rows:
        extra += ["", f"Before/after (code before: `{args.before}`), each run in a fresh "
                  f"subprocess, old and new alternating, seeds 0..{args.repeats - 1}, medians; "
                  f"CPU: `time.process_time()` of the decomposition (all threads); load: the "
                  f"1-minute load average before and after the cell:", "",
                  "| problem | C | threads | before wall s | after wall s | speed-up "
                  "| before CPU s | after CPU s | CPU speed-up | residual f64 before / after "
                  "| residual f32 before / after | near zeros before / after | wall runs after "
                  "| load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in versus_rows:
            for v in r["versus"]:
                b, a = v["before"], v["after"]
                extra.append(
                    f"| {r['problem']} | {r['C']} | {v['threads']} | {b['seconds']:.2f} | "
                    f"{a['seconds']:.2f} | {b['seconds'] / a['seconds']:.1f}x | {b['cpu']:.2f} | "
                    f"{a['cpu']:.2f} | {b['cpu'] / a['cpu']:.1f}x | {b['residual']:.1e} / "
                    f"{a['residual']:.1e} | {b['residual_f32']:.1e} / {a['residual_f32']:.1e} | "
                    f"{b['near']:.2%} / {a['near']:.2%} | "
                    f"{', '.join(f'{w:.2f}' for w in v['walls']['after'])} | "
                    f"{v['load'][0][0]:.2f} -> {v['load'][1][0]:.2f} |")
    text = "\n".join(lines + extra) + "\n"
    print(text)
    if args.out and args.update and args.out.exists():
        text = _update(args.out.read_text(), lines, load) + "\n".join(extra) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


def _update(old: str, lines: list[str], load: float) -> str:
    """``old`` with the rows of the same (problem, C) replaced by the new ones, and a line
    saying which rows were re-measured, when, with what command and load."""
    new = {tuple(r.split(" | ")[:2]): r for r in lines if r.startswith("| ") and " | " in r
           and not r.startswith("| problem") and not r.startswith("|---")}
    out, done = [], []
    main_table = True  # only the first table's rows: later tables share their first cells
    for line in old.splitlines():
        key = tuple(line.split(" | ")[:2])
        main_table = main_table and not line.startswith("Re-measured")
        if main_table and key in new:
            out.append(new[key])
            done.append(f"{key[0][2:]} at C={key[1]}")
        else:
            out.append(line)
    out += ["", f"Re-measured on {datetime.date.today().isoformat()} (rows: "
            f"{', '.join(done)}): `.venv/bin/python benchmarks/decompose.py "
            f"{' '.join(os.sys.argv[1:])}`, load average at start {load:.2f}"
            f"{' (NOT idle: other jobs were running)' if load >= 0.5 else ''}; the other rows "
            f"are from the run above."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
