"""How much a decode step slows when another process keeps one core busy, by the engine's thread count.

torch runs a step's parallel regions on an OpenMP team of `torch.get_num_threads()` workers that wait for
each other at the end of every region; when another process takes a core, one worker is descheduled and
the others wait for it. This starts that neighbour itself (a Python busy loop, one core) and times the
same engine's decode steps, base model and one distinct LoRA adapter per sequence, with and without it,
for each thread count, in one process (the engine on the main thread, as in `benchmarks.lora_step`):

    python -m benchmarks.neighbour                  # 64 sequences, threads = every core, then 1
    python -m benchmarks.neighbour --threads 2,1 --rank 8 --targets q_proj,v_proj

Fair share on a machine with one core taken is a slowdown of at most cores / (cores - 1) for a team that
fits on the free cores, and 2x at worst; `slowdown` is busy / idle for each thread count.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import machine
from benchmarks.lora_step import TwoGroups

BUSY_LOOP = "while True: pass"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--threads", default=f"{os.cpu_count()},1", help="thread counts to compare, e.g. 2,1")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="decode steps per round and side")
    args = p.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]

    two = TwoGroups(args.prompts, rank=args.rank, targets=args.targets.split(","),
                    max_steps=len(thread_counts) * 2 * args.rounds * args.steps * 2)

    def measure() -> dict[str, float]:
        times: dict[str, list[float]] = {"base": [], "lora": []}
        for _ in range(args.rounds):
            for group, values in times.items():
                values.append(two.step_ms(group, args.steps))
        return {group: statistics.median(values) for group, values in times.items()}

    results = {"machine": machine.describe(), "sequences": args.prompts, "rank": args.rank, "targets": args.targets, "runs": []}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        idle = measure()
        neighbour = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
        try:
            time.sleep(0.5)  # scheduled and spinning
            busy = measure()
        finally:
            neighbour.kill()
            neighbour.wait()
        results["runs"].append({
            "threads": threads, "idle_ms": idle, "busy_ms": busy,
            "slowdown": {group: busy[group] / idle[group] for group in idle},
        })
        print(f"threads {threads}: idle base {idle['base']:.1f} ms, LoRA {idle['lora']:.1f} ms; one core busy: "
              f"base {busy['base']:.1f} ms ({busy['base'] / idle['base']:.2f}x), "
              f"LoRA {busy['lora']:.1f} ms ({busy['lora'] / idle['lora']:.2f}x)", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
