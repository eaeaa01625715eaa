"""`quiver train` and `quiver eval`: train one method into an adapter directory; score adapters served by the engine.

    quiver train --method lora --recipe sentiment --out adapters/sentiment-lora
    quiver train --method ptuning --encoder lstm --data train.jsonl --eval-data heldout.jsonl --out adapters/qa
    quiver eval --adapter adapters/sentiment-lora --adapter adapters/sentiment-prompt --recipe sentiment
"""

import argparse
import sys
from pathlib import Path

from transformers import AutoTokenizer

from quiver.adapters.weights import ACTIVATIONS
from quiver.errors import QuiverError
from quiver.trainer.base import resolve_model_path
from quiver.trainer.data import read_jsonl, split
from quiver.trainer.evaluate import Evaluation, evaluate_served
from quiver.trainer.methods import DEFAULT_LR, ENCODERS, METHODS, MethodConfig
from quiver.trainer.pipeline import train_and_export
from quiver.trainer.recipes import Task, chatterbot_qa, sentiment
from quiver.trainer.train import TrainConfig, steps_for_epochs

RECIPES = ("sentiment", "chatterbot")
_HELDOUT_FRACTION = 0.1  # of --data, when no --eval-data is given


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except QuiverError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    model_path = resolve_model_path(args.model)
    task = _task(args, model_path)
    method = MethodConfig(
        method=args.method, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_targets=tuple(args.lora_targets.split(",")), rslora=args.rslora, bottleneck_size=args.bottleneck_size,
        non_linearity=args.non_linearity, num_virtual_tokens=args.virtual_tokens, prefix_hidden=args.prefix_hidden,
        encoder=args.encoder, encoder_hidden=args.encoder_hidden,
    )
    steps = args.steps or steps_for_epochs(len(task.train), epochs=args.epochs, batch_size=args.batch_size)
    config = TrainConfig(steps=steps, lr=args.lr or DEFAULT_LR[args.method], batch_size=args.batch_size, seed=args.seed)
    trained = train_and_export(
        model_path=model_path, method=method, config=config, examples=task.train, max_length=args.max_length,
        out=args.out, progress=True,
    )
    t = trained.trainable
    print(f"{args.method}: {t.num_trainable:,} trainable parameters ({100 * t.num_trainable / t.base_params:.3f}% of "
          f"{t.base_params:,}), {trained.exported_params:,} exported")
    r = trained.result
    print(f"trained {r.steps} steps in {r.seconds:.1f} s ({r.tokens / r.seconds:.0f} tokens/s), final loss {r.final_loss:.4f}")
    print(f"wrote {args.out}")
    serve = trained.serve_model
    results = evaluate_served(
        model_path=serve or model_path, adapters={args.method: None if serve else args.out}, examples=task.heldout,
        labels=task.labels, max_new_tokens=args.max_new_tokens or task.max_new_tokens,
    )
    _report(results)
    return 0


def _eval(args: argparse.Namespace) -> int:
    model_path = resolve_model_path(args.model)
    task = _task(args, model_path)
    adapters = {str(path): path for path in args.adapter} or {"base": None}
    results = evaluate_served(
        model_path=model_path, adapters=adapters, examples=task.heldout, labels=task.labels,
        max_new_tokens=args.max_new_tokens or task.max_new_tokens, device=args.device, dtype=args.dtype,
    )
    _report(results)
    return 0


def _report(results: dict[str, Evaluation]) -> None:
    for name, e in results.items():
        print(f"{name}: held-out {e.metric} {e.score:.4f} ({sum(e.correct)}/{e.num_examples})")


def _task(args: argparse.Namespace, model_path: Path) -> Task:
    """The recipe, or the JSONL files (for eval, --data is all held out); for files, enough new tokens for the
    longest held-out completion."""
    if args.recipe == "sentiment":
        return sentiment(train_per_class=args.train_size, heldout_per_class=args.heldout_size, seed=args.seed)
    if args.recipe == "chatterbot":
        return chatterbot_qa(seed=args.seed)
    examples = read_jsonl(args.data)
    if args.eval_data:
        train, heldout = examples, read_jsonl(args.eval_data)
    elif args.run is _eval:
        train, heldout = [], examples
    else:
        train, heldout = split(examples, heldout_fraction=_HELDOUT_FRACTION, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    longest = max(len(tokenizer.encode(e.completion, add_special_tokens=False)) for e in heldout)
    labels = tuple(args.labels.split(",")) if args.labels else None
    return Task(str(args.data), train=train, heldout=heldout, labels=labels, max_new_tokens=longest + 1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quiver", description="Train and evaluate Quiver adapters.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train one method and export it as an adapter directory")
    train.set_defaults(run=_train)
    _data_args(train)
    train.add_argument("--eval-data", type=Path, help="held-out JSONL (default: a seeded tenth of --data)")
    train.add_argument("--method", required=True, choices=METHODS)
    train.add_argument("--out", type=Path, required=True, help="the adapter directory to write (for full: a model folder)")
    train.add_argument("--steps", type=int, help="optimiser steps (default: from --epochs)")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, help=f"learning rate (default per method: {DEFAULT_LR})")
    train.add_argument("--max-length", type=int, default=256, help="tokens per example; longer prompts keep their end")
    lora = train.add_argument_group("lora")
    lora.add_argument("--lora-rank", type=int, default=8)
    lora.add_argument("--lora-alpha", type=float, default=16.0)
    lora.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names, or all-linear")
    lora.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank) instead of alpha/rank")
    adapter = train.add_argument_group("adapter (bottleneck)")
    adapter.add_argument("--bottleneck-size", type=int, default=16)
    adapter.add_argument("--non-linearity", default="gelu", choices=sorted(ACTIVATIONS))
    prompt = train.add_argument_group("prefix, ptuning-v2, prompt, ptuning")
    prompt.add_argument("--virtual-tokens", type=int, default=16)
    prompt.add_argument("--prefix-hidden", type=int, default=256, help="prefix: hidden size k of the MLP")
    prompt.add_argument("--encoder", default="mlp", choices=sorted(ENCODERS), help="ptuning: the prompt encoder")
    prompt.add_argument("--encoder-hidden", type=int, default=256, help="ptuning: hidden size of the encoder")

    evaluate = commands.add_parser("eval", help="score adapters (in one mixed batch) served by the engine")
    evaluate.set_defaults(run=_eval, eval_data=None)
    _data_args(evaluate)
    evaluate.add_argument("--adapter", type=Path, action="append", default=[],
                          help="an adapter directory (repeatable); none: the base model alone")
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--dtype", default="auto")
    return parser


def _data_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help='JSONL, one {"prompt": ..., "completion": ...} per line')
    source.add_argument("--recipe", choices=RECIPES, help="a ready task (recipes use their held-out split)")
    parser.add_argument("--model", help="base model folder (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--labels", help="comma-separated label words: score accuracy instead of exact match")
    parser.add_argument("--max-new-tokens", type=int, help="answer length (default: enough for the references)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=600, help="sentiment: training tweets per class")
    parser.add_argument("--heldout-size", type=int, default=150, help="sentiment: held-out tweets per class")
