"""The prefix-cache timing probe: can one client learn another client's secret from first-token latency?

A real `quiver serve` runs in a child process with two client tokens, once per `--prefix-cache-scope`.
Client A sends a prompt made from a template with a secret in it (so its KV blocks are cached). Client B,
with the other token, sends the same template with a guess, right (A's secret) or wrong (another value of
the same length), in random order, and times its first token. Where B's right guess reuses A's cached
blocks, everything after the secret is skipped and the first token comes sooner: the leak. Each
repetition draws a new secret, so B's own earlier guesses never help it.

Reported per scope: first-token latencies of right and wrong guesses (ms), their medians, the ratio of the
medians (wrong / right; 1 means no difference), and whether every right guess came sooner than every wrong
one (an attacker's perfect test).

    python -m benchmarks.cache_probe                                  # the tiny model: seconds
    python -m benchmarks.cache_probe --model default --repetitions 5  # SmolLM2-135M: minutes on a CPU
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.server_proc import ServerProcess
from quiver.client import QuiverClient

TOKENS = {"A": "probe-client-a", "B": "probe-client-b"}
SCOPES = ("per-token", "global")
BODY_ITEMS = {"tiny": 20, "default": 40}  # the text after the secret: ~400 bytes (tiny, 1 token a byte), ~400 tokens


def prompt(secret: str, *, items: int) -> str:
    """The shared template: a short head, the secret, then a long body that every guess repeats."""
    body = " ".join(f"Item {i}: value {i * 7919 % 10007}." for i in range(items))
    return f"Account notes. PIN {secret}. {body}"


def first_token_ms(client: QuiverClient, text: str) -> float:
    request = client.request(text=text, max_new_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    next(iter(client.generate_stream(request)))
    return (time.perf_counter() - start) * 1000


def probe(server: ServerProcess, *, repetitions: int, items: int, rng: random.Random) -> dict:
    right, wrong = [], []
    with QuiverClient(server.target, token=TOKENS["A"], timeout=600) as a, \
            QuiverClient(server.target, token=TOKENS["B"], timeout=600) as b:
        for client in (a, b):  # warm-up, on a prompt of its own
            first_token_ms(client, prompt("warm-up", items=items))
        for _ in range(repetitions):
            secret, other = (f"{rng.randrange(10**6):06d}" for _ in range(2))
            first_token_ms(a, prompt(secret, items=items))
            guesses = [(secret, right), (other, wrong)]
            rng.shuffle(guesses)
            for guess, times in guesses:
                times.append(round(first_token_ms(b, prompt(guess, items=items)), 2))
    return {
        "right_ms": right,
        "wrong_ms": wrong,
        "median_right_ms": round(statistics.median(right), 2),
        "median_wrong_ms": round(statistics.median(wrong), 2),
        "wrong_over_right": round(statistics.median(wrong) / statistics.median(right), 2),
        "every_right_sooner": max(right) < min(wrong),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(BODY_ITEMS), default="tiny",
                        help="tiny: a random 2-layer Llama with a byte tokenizer, made here; default: quiver's default model")
    parser.add_argument("--repetitions", type=int, default=10, help="secrets drawn per scope")
    parser.add_argument("--device", default="cpu", help="passed to quiver serve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = {"model": args.model, "repetitions": args.repetitions, "device": args.device, "scopes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "tokens").write_text("\n".join(TOKENS.values()) + "\n")
        flags = ["--client-token-file", str(work / "tokens"), "--device", args.device, "--adapters-dir", str(work / "none")]
        if args.model == "tiny":
            flags += ["--model", str(_tiny_model(work))]
        for scope in SCOPES:
            scope_flags = [*flags, "--prefix-cache-scope", scope, "--store-dir", str(work / f"store-{scope}")]
            with ServerProcess(scope_flags, log_path=work / f"serve-{scope}.log") as server:
                server.wait_serving()
                results["scopes"][scope] = probe(server, repetitions=args.repetitions, items=BODY_ITEMS[args.model], rng=rng)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


def _tiny_model(work: Path) -> Path:
    # the test-suite's tiny model and tokenizer; imported here only, as they import torch and transformers
    from tests.support.models import save_tiny
    from tests.support.tiny_tokenizer import save_tokenizer

    path = save_tiny("llama", work)
    save_tokenizer(path)
    return path


if __name__ == "__main__":
    sys.exit(main())
