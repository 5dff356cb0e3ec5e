"""Load time of a grown ResNet-18's checkpoint: structure (format 2) against morph replay
(format 1), measured in one run.

    git archive ec674de src | tar -x -C /tmp/before     # the code before format 2
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/load.py \\
        --before /tmp/before/src [--runs 3]

The model: ``build_model("resnet")`` (ResNet-18, 11.2M parameters), every 3x3 conv deepened
with ``kernel_size=3`` under ``"stable"``, one after the other, probe ``4x3x32x32``. Per run
(median of ``--runs``): the morphs' time, ``sm.save``, ``sm.load`` (checked bit for bit
against the grown model in eval and train mode). Then the same model saved in format 1 by the
code before format 2 (``--before``, in a subprocess: it morphs and saves, then times its own
``load``, which replays every morph), and that file loaded here with
``load(..., legacy_replay=True)`` (replay with this branch's morphs, then the old code's
weights), median of ``--runs``, checked against the old code's model's outputs.
Results go to ``benchmarks/results/load.md`` with the machine, the load average and the
command.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from stablemorph.checkpoint import load, save

OUT = Path(__file__).parent / "results" / "load.md"
SHAPE = [4, 3, 32, 32]

GROW = """
import torch
from torch import nn
from stablemorph.morphs import deepen
from stablemorph.zoo import build_model


def grow():
    torch.manual_seed(0)
    model = build_model("resnet")
    targets = [n for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    for name in targets:
        model = deepen(model, name, kernel_size=3, input_shape=SHAPE)
    return model, len(targets)
""".replace("SHAPE", repr(SHAPE))

BEFORE = GROW + """
import json, sys, time
from stablemorph.checkpoint import load, save
started = time.perf_counter()
model, n = grow()
morph = time.perf_counter() - started
save(model, sys.argv[1])
started = time.perf_counter()
loaded = load(sys.argv[1])
replay = time.perf_counter() - started
x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    y = model.eval()(x)
    same = torch.equal(loaded.eval()(x), y)
torch.save(y, sys.argv[2])
print(json.dumps({"morph": morph, "load": replay, "same": same, "targets": n}))
""".replace("SHAPE", repr(SHAPE))


def grow() -> tuple[nn.Module, int]:
    namespace: dict = {}
    exec(GROW, namespace)  # the same growth the subprocess runs
    return namespace["grow"]()


def same_outputs(a: nn.Module, b: nn.Module) -> bool:
    """Bit-for-bit equal outputs in eval and in train mode (on copies: train-mode forwards
    update BatchNorm statistics)."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    ok = True
    for train in (False, True):
        ca, cb = copy.deepcopy(a).train(train), copy.deepcopy(b).train(train)
        with torch.no_grad():
            ok = ok and torch.equal(ca(x), cb(x))
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--before", type=Path, help="src/ of the code before format 2")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="sm-load-"))
    rows = []
    for run in range(args.runs):
        started = time.perf_counter()
        model, n = grow()
        morph = time.perf_counter() - started
        started = time.perf_counter()
        save(model, tmp / "v2.pt")
        saved = time.perf_counter() - started
        started = time.perf_counter()
        loaded = load(tmp / "v2.pt")
        loading = time.perf_counter() - started
        rows.append({"morph": morph, "save": saved, "load": loading,
                     "same": same_outputs(loaded, model), "targets": n})
        print(f"run {run}: {rows[-1]}", flush=True)
    size = (tmp / "v2.pt").stat().st_size
    before = legacy = None
    legacy_same: list[bool] = []
    if args.before is not None:
        env = {**os.environ, "PYTHONPATH": str(args.before)}
        proc = subprocess.run([sys.executable, "-c", BEFORE, str(tmp / "v1.pt"),
                               str(tmp / "y1.pt")], env=env, capture_output=True, text=True,
                              check=True)
        y1 = torch.load(tmp / "y1.pt", weights_only=True)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
        before = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"before: {before}", flush=True)
        legacy, legacy_same = [], []
        for run in range(args.runs):
            started = time.perf_counter()
            replayed = load(tmp / "v1.pt", legacy_replay=True)
            legacy.append(time.perf_counter() - started)
            with torch.no_grad():
                same = torch.equal(replayed.eval()(x), y1)
            legacy_same.append(same)
            print(f"legacy run {run}: {legacy[-1]:.1f}s, equal to the model the old code "
                  f"saved (eval mode): {same}", flush=True)
    load_end = os.getloadavg()
    write(args, rows, size, before, legacy, all(legacy_same), load_start, load_end)
    return 0


def joined(rows: list[dict], key: str, digits: int) -> str:
    return ", ".join(f"{r[key]:.{digits}f}" for r in rows)


def write(args: argparse.Namespace, rows: list[dict], size: int, before: dict | None,
          legacy: list[float] | None, legacy_same: bool, load_start: tuple,
          load_end: tuple) -> None:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    morph, saved, loading = med("morph"), med("save"), med("load")
    lines = [
        "# Checkpoint load time: structure (format 2) vs morph replay (format 1)",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} PYTHONPATH=src "
        f"python benchmarks/load.py --runs {args.runs}"
        + (f" --before {args.before}" if args.before else "") + "` (`--before`: `git archive "
        "ec674de src | tar -x -C /tmp/before`, the code before format 2).",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Machine: "
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); shared with other jobs: load average "
        f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end.",
        "",
        f"Model: `build_model(\"resnet\")` (ResNet-18), each of its {rows[0]['targets']} 3x3 "
        f"convs deepened with `kernel_size=3` under `stable`, probe {'x'.join(map(str, SHAPE))}; "
        f"file {size / 1e6:.1f} MB. Median of {len(rows)} runs.",
        "",
        "| step | seconds (median) | runs | ratio to the morphs |",
        "|---|---|---|---|",
        f"| morphs (this branch) | {morph:.2f} | "
        f"{joined(rows, 'morph', 2)} | 1 |",
        f"| `sm.save` | {saved:.3f} | {joined(rows, 'save', 3)} | "
        f"{saved / morph:.4f} |",
        f"| `sm.load`, format 2 (structure) | {loading:.3f} | "
        f"{joined(rows, 'load', 3)} | {loading / morph:.4f} |",
    ]
    if legacy is not None and before is not None:
        lines += [
            f"| `sm.load(..., legacy_replay=True)`, format 1 (replay, this branch) | "
            f"{statistics.median(legacy):.2f} | {', '.join(f'{t:.2f}' for t in legacy)} | "
            f"{statistics.median(legacy) / morph:.3f} |",
            f"| morphs, code before format 2 (subprocess) | {before['morph']:.2f} | 1 | "
            f"{before['morph'] / morph:.3f} |",
            f"| `sm.load`, code before format 2 (replay, subprocess) | {before['load']:.2f} | 1 | "
            f"{before['load'] / morph:.3f} |",
        ]
    lines += [
        "",
        f"Loaded models equal to the grown one bit for bit (eval and train mode): "
        f"{all(r['same'] for r in rows)}"
        + (f"; the old code's own round trip: {before['same']}; the format-1 file replayed "
           f"here against the model the old code saved (eval mode): {legacy_same}"
           if before else "") + ".",
        "",
        f"Load (format 2) against the morphs: {loading / morph:.4f}x (goal: at most 0.1x)."
        + (f" Against format 1's replay in this run: {statistics.median(legacy) / loading:.0f}x "
           f"faster." if legacy else ""),
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
