#!/usr/bin/env python3
"""Plot a simulated run of the stack that scales itself (simulation): backlog, hosts, Lambda
concurrency and GPU use over time, with the original's fixed setup for comparison.

    python scripts/plot_simulation.py                       # docs/img/simulation.png
    python scripts/plot_simulation.py --tiles 250000 --out /tmp/run.png

Needs the `sim` extra (simpy, matplotlib): pip install -e '.[sim]'.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "lambda"), str(REPO)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tiles", type=int, default=1_000_000)
    parser.add_argument("--hosts", type=int, default=4, help="ecs.maxInstances")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "simulation.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cnsq.ops.pricing import shipped_prices
    from simulation import Setup, simulate

    prices = shipped_prices()
    auto = simulate(Setup(max_instances=args.hosts), args.tiles, prices)
    # The original's example: one host, concurrency 5, its worker at 512 MB on x86.
    fixed = simulate(Setup(max_instances=args.hosts, fixed=1, concurrency=5, lambda_memory_mb=512,
                           lambda_architecture="x86_64"), args.tiles, prices)
    minutes = [s.t / 60 for s in auto.samples]
    with_tail = (auto.bill.total + auto.tail.total) / auto.written * 1e6
    figure, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    axes[0].plot(minutes, [s.backlog / 1000 for s in auto.samples], label="the controller")
    axes[0].plot([s.t / 60 for s in fixed.samples], [s.backlog / 1000 for s in fixed.samples],
                 "--", color="grey", label="the original's default (1 host, concurrency 5)")
    axes[0].set_ylabel("tiles left\n(thousands)")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].step(minutes, [s.hosts for s in auto.samples], where="post")
    axes[1].set_ylabel("GPU hosts")
    axes[2].step(minutes, [s.concurrency if s.receiving else 0 for s in auto.samples], where="post")
    axes[2].set_ylabel("Lambda\nconcurrency")
    axes[3].plot(minutes, [s.gpu_percent if s.gpu_percent is not None else float("nan")
                           for s in auto.samples])
    axes[3].set_ylabel("GPU busy %")
    axes[3].set_ylim(0, 105)
    axes[3].set_xlabel("minutes from the push")
    axes[3].set_xlim(0, max(minutes[-1], 1))
    figure.suptitle(
        f"{args.tiles:,} tiles from zero hosts (simulated): drained in "
        f"{auto.drained_at / 60:.0f} min at ${with_tail:.2f} per million tiles, idle tail in;\n"
        f"the original's default setup: {fixed.drained_at / 60:.0f} min at "
        f"${fixed.per_million:.2f} per million", fontsize=10)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
