"""How often `auto` picks the fastest runtime from a few rounds: its plain medians, and a round-by-round comparison.

Builds every installed runtime for one row of benchmarks/runtimes.py (`deeplab.deploy.runtimes.build_runtime`, each checked
against eager PyTorch), times them in `--rounds` interleaved rounds as `auto` does (50 ms idle before each entry's
turn, one call each for a large model; each round starts one entry later), takes the lowest median over all rounds
as the answer, and then, for every window of `--windows` consecutive rounds (what `auto` sees of a large model),
counts which runtime two rules pick: the lowest plain median (`auto`'s rule), and the lowest median over rounds of
each round's time over the geometric mean of that round's times (a slow stretch of a shared machine scales a whole
round and cancels out). Prints the per-runtime medians, both rules' counts and one JSON line per window size.

    OMP_NUM_THREADS=2 python benchmarks/auto_choice.py --model xception65 --threads 2 --rounds 24 --windows 3,6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtimes import build  # noqa: E402  (this folder's benchmark)

from deeplab import retain_freed_memory  # noqa: E402
from deeplab.deploy.runners import missing_runtime  # noqa: E402
from deeplab.deploy.runtimes import RUNTIMES, _block, build_runtime, check_against_eager


def by_round(entries: dict, rounds: int) -> dict[str, list[float]]:
    """ms of one call per entry per round after 50 ms idle (`_block`, as `auto` times a large model), each round
    starting one entry later."""
    items = list(entries.items())
    times: dict[str, list[float]] = {name: [] for name in entries}
    for fn in entries.values():
        fn(), fn()
    for r in range(rounds):
        for name, fn in items[r % len(items):] + items[: r % len(items)]:
            times[name] += _block(fn, calls=1, gap_s=0.05, settle=False)
    return times


def relative(times: dict[str, list[float]]) -> dict[str, float]:
    """Median over rounds of each entry's time over the geometric mean of that round's times."""
    rounds = range(len(next(iter(times.values()))))
    means = [statistics.geometric_mean(t[r] for t in times.values()) for r in rounds]
    return {name: statistics.median(t[r] / means[r] for r in rounds) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="xception65", help="a row of benchmarks/runtimes.py (default xception65)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=24)
    p.add_argument("--windows", default="3,6", help="rounds per simulated choice, comma-separated (default 3,6)")
    args = p.parse_args()
    retain_freed_memory()
    torch.set_num_threads(args.threads)
    model, _, size = build(args.model)
    if model is None:
        sys.exit("skipped: the model file is missing (see ../shared/README.md)")
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    built = {}
    with torch.no_grad():
        for name in RUNTIMES:
            if name != "torch" and missing_runtime(name):
                print(f"skipped {name}: {missing_runtime(name)}")
                continue
            built[name] = build_runtime(model, name, threads=args.threads)
            check_against_eager(built[name], model, x, runtime=name)
        rounds = by_round({name: (lambda m=m: m(x)) for name, m in built.items()}, args.rounds)
    medians = {name: round(statistics.median(t), 1) for name, t in rounds.items()}
    answer = min(medians, key=medians.get)
    print(f"# {args.model}, {args.threads} threads, {args.rounds} rounds: median ms {medians}; fastest: {answer}")
    for size in (int(w) for w in args.windows.split(",")):
        plain, paired = Counter(), Counter()
        for start in range(args.rounds - size + 1):
            window = {name: t[start:start + size] for name, t in rounds.items()}
            flat = {name: statistics.median(t) for name, t in window.items()}
            plain[min(flat, key=flat.get)] += 1
            rel = relative(window)
            paired[min(rel, key=rel.get)] += 1
        windows = args.rounds - size + 1
        print(f"windows of {size} rounds picking {answer}: plain medians {plain[answer]}/{windows} {dict(plain)}, "
              f"round by round {paired[answer]}/{windows} {dict(paired)}")
        print(json.dumps({"model": args.model, "threads": args.threads, "rounds": args.rounds, "window": size,
                          "ms_median": medians, "fastest": answer, "plain": dict(plain),
                          "round_by_round": dict(paired)}))


if __name__ == "__main__":
    main()
