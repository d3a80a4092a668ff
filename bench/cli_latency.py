"""How fast the command line answers: `fgvc --help`, `fgvc train --help` and a refused option
(`fgvc train --arch nonsense`), each a fresh process as a user starts it, on the harness
(warm-up, interleaved rounds, median and spread). Target: under 1 s each, median.

    python bench/cli_latency.py             # the figures: 5 rounds (a quiet machine, nothing else running)
    python bench/cli_latency.py --quick     # smoke run: one round, no figures
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Contender, Machine, compare, report_target  # noqa: E402

TARGET_S = 1.0
CASES = {
    "fgvc --help": (["--help"], 0),
    "fgvc train --help": (["train", "--help"], 0),
    "fgvc train --arch nonsense": (["train", "--arch", "nonsense"], 1),
}


def command() -> list[str]:
    """The console script a user types, or the same module through this interpreter."""
    script = shutil.which("fgvc")
    return [script] if script else [sys.executable, "-m", "fgvc.cli"]


def answer(args: list[str], status: int) -> None:
    done = subprocess.run([*command(), *args], capture_output=True, text=True, timeout=120)
    if done.returncode != status:
        raise SystemExit(f"fgvc {' '.join(args)}: exit {done.returncode}, expected {status}:\n{done.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one round, no warm-up: checks it works, no figures")
    opts = parser.parse_args()
    rounds, warmup = (1, 0) if opts.quick else (opts.rounds, 1)
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    with Machine(f"CLI latency: {' '.join(command())}, {rounds} round(s)"):
        timings = compare([Contender(name, lambda a=args, s=status: answer(a, s), unit="answer")
                           for name, (args, status) in CASES.items()], rounds=rounds, warmup=warmup)
        for name in CASES:
            seconds = timings.time(name)
            report_target(f"{name} seconds", seconds.median, "<=", TARGET_S, seconds)
    if opts.quick:
        print("(--quick: one round, not a figure)")


if __name__ == "__main__":
    main()
