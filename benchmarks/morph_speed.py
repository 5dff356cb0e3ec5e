"""Whole-model growth times, code before against code after, in CPU seconds single-threaded
and wall seconds with two threads (issue 14's figures).

    PYTHONPATH=src python benchmarks/morph_speed.py --before ../speed-before/src \
        --repeats 3 --json runs/morph_speed.json --out runs/morph_speed.md

Each run is one ``python benchmarks/morph.py --worker CASE --threads N`` subprocess (the
workloads are :func:`morph.grow`'s: ResNet-18, probe 4x3x32x32); per repetition every case
runs at 1 and 2 threads, before and after alternating, so both versions see the same load.
The load average (1 minute) is recorded after each run. ``cpu_seconds`` is the process's CPU
time over the timed part (``time.process_time``: all threads), ``seconds`` its wall time.
``--from-json`` renders a saved run again without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ("deepen3", "deepen3-norule", "widen", "load")
TITLES = {
    "deepen3": "deepen every 3x3 conv, kernel_size=3, step rule on (the default)",
    "deepen3-norule": "the same with step_rule=False",
    "widen": "widen every 3x3 conv by 25%",
    "load": "sm.load of the deepen3 result (after sm.save)",
}


def run_once(src: Path, case: str, threads: int) -> dict:
    """One worker run of ``case`` with the library at ``src``; its JSON plus the load."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, str(HERE / "morph.py"), "--worker", case,
                           "--threads", str(threads)], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{src} {case} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["load"] = os.getloadavg()[0]
    return row


def run_all(versions: dict[str, Path], cases: list[str], repeats: int) -> dict:
    """``{case: {threads: {version: [row, ...]}}}``, versions alternating per repetition."""
    out: dict = {c: {str(t): {v: [] for v in versions} for t in (1, 2)} for c in cases}
    for _ in range(repeats):
        for case in cases:
            for threads in (1, 2):
                for version, src in versions.items():
                    row = run_once(src, case, threads)
                    out[case][str(threads)][version].append(row)
                    print(f"{case:15s} {threads} thr {version:6s} {row['seconds']:6.2f} s wall "
                          f"{row.get('cpu_seconds', float('nan')):6.2f} s cpu load "
                          f"{row['load']:.2f}", flush=True)
    return out


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _runs(rows: list[dict], key: str) -> str:
    return ", ".join(f"{r[key]:.2f}" for r in rows)


def markdown(results: dict) -> str:
    """The table: per case, CPU seconds at 1 thread and wall seconds at 2, both versions."""
    lines = ["| workload | CPU s, 1 thread, before | CPU s, 1 thread, after | ratio | wall s, "
             "2 threads, before | wall s, 2 threads, after | ratio | CPU s, 2 threads, after |"
             " runs after (1 thr CPU; 2 thr wall) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for case, by in results.items():
        one, two = by["1"], by["2"]
        cb, ca = _median(one["before"], "cpu_seconds"), _median(one["after"], "cpu_seconds")
        wb, wa = _median(two["before"], "seconds"), _median(two["after"], "seconds")
        lines.append(f"| {TITLES[case]} | {cb:.2f} | **{ca:.2f}** | {cb / ca:.1f}x | {wb:.2f} | "
                     f"**{wa:.2f}** | {wb / wa:.1f}x | {_median(two['after'], 'cpu_seconds'):.2f}"
                     f" | {_runs(one['after'], 'cpu_seconds')}; {_runs(two['after'], 'seconds')} |")
    loads = [r["load"] for by in results.values() for t in by.values() for rows in t.values()
             for r in rows]
    lines += ["", f"Load average (1 min) after each run: {min(loads):.2f} to {max(loads):.2f}, "
              f"median {statistics.median(loads):.2f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, help="src/ of the old code")
    parser.add_argument("--after", type=Path, default=HERE.parent / "src")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, required=True, help="raw results (written or read)")
    parser.add_argument("--from-json", action="store_true", help="render --json, run nothing")
    parser.add_argument("--out", type=Path, help="the markdown table (default: stdout)")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.json.read_text())
    else:
        if args.before is None:
            parser.error("--before is required unless --from-json")
        versions = {"before": args.before.resolve(), "after": args.after.resolve()}
        results = run_all(versions, args.cases, args.repeats)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    table = markdown(results)
    if args.out:
        args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
