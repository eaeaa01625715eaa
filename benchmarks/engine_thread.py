"""Does running the engine in a thread cost CPU throughput? A/B of the same engine's decode steps on the
main thread and on a separate thread (as `EngineService` runs them), alternating, in one process.

    python -m benchmarks.engine_thread             # 64 chat prompts, 6 rounds of 4 decode steps on each side

On a 2-core CPU with libgomp, a second OpenMP team (the main thread's, made when the model loaded there, plus
the engine thread's) makes the runtime throttle its spin-waiting, so every parallel region of the engine
thread pays a wake-up; this measures how much a step loses to that (see RESULTS.md).
"""

import argparse
import queue
import threading
import time

from benchmarks import data
from quiver.config import EngineConfig, ModelConfig, default_cache_dir
from quiver.engine import openmp
from quiver.engine.engine import Engine
from quiver.engine.request import SamplingParams
from quiver.model.loader import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=4, help="decode steps per round and side")
    args = p.parse_args()

    loaded = load_model(ModelConfig(cache_dir=default_cache_dir()))
    engine = Engine(loaded, EngineConfig(max_num_seqs=args.prompts))
    params = SamplingParams(max_new_tokens=1 + 2 * args.rounds * args.steps + 64, ignore_eos=True)
    for i, prompt in enumerate(data.chat_prompts(loaded.tokenizer, args.prompts)):
        engine.add_request(str(i), prompt, params)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.requests.values()):
        engine.step()  # every prompt prefilled: what follows are decode steps of all sequences

    def timed(out: list[float]) -> None:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        out.append((time.perf_counter() - start) / args.steps * 1e3)

    jobs: queue.SimpleQueue = queue.SimpleQueue()  # one long-lived thread, as EngineService has

    def worker() -> None:
        while (job := jobs.get()) is not None:
            job()
            openmp.release_thread_pool()  # so that the main thread's side runs with its own team alone
            done.release()

    done = threading.Semaphore(0)
    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    sides: dict[str, list[float]] = {"main thread": [], "engine thread": [], "engine thread, main released": []}
    for _ in range(args.rounds):
        timed(sides["main thread"])  # the main thread's OpenMP team is live after this, as after a model load
        jobs.put(lambda: timed(sides["engine thread"]))
        done.acquire()
        openmp.release_thread_pool()
        jobs.put(lambda: timed(sides["engine thread, main released"]))
        done.acquire()
    jobs.put(None)
    thread.join()
    print(f"decode step of {args.prompts} sequences, ms per round:")
    for name, values in sides.items():
        print(f"  {name:30}", " ".join(f"{v:.0f}" for v in values), f"  min {min(values):.0f}")
    main_min = min(sides["main thread"])
    for name in ("engine thread", "engine thread, main released"):
        print(f"{name} / main thread (min over rounds): {min(sides[name]) / main_min:.2f}")


if __name__ == "__main__":
    main()
