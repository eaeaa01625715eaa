"""The training loop: AdamW with linear warm-up and decay over a fixed step budget, loss on completions only."""

import math
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from quiver.errors import InvalidArgument
from quiver.trainer.encode import Encoded, collate
from quiver.trainer.methods import Trainable

_WARMUP = 0.1  # fraction of the steps
_MAX_GRAD_NORM = 1.0
_LOSS_WINDOW = 10  # steps averaged into the reported final loss


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise InvalidArgument(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidArgument(f"lr must be a positive number, got {self.lr}")


@dataclass(frozen=True)
class TrainResult:
    steps: int
    seconds: float
    tokens: int  # real (unpadded) tokens seen
    final_loss: float  # mean loss of the last steps


def steps_for_epochs(num_examples: int, *, epochs: float, batch_size: int) -> int:
    return max(1, math.ceil(epochs * num_examples / batch_size))


def train(trainable: Trainable, data: list[Encoded], config: TrainConfig, *, pad_id: int, progress: bool) -> TrainResult:
    """Run `config.steps` optimiser steps over `data` (reshuffled every epoch); leaves the model in eval mode."""
    if not data:
        raise InvalidArgument("no training examples")
    torch.manual_seed(config.seed)
    params = trainable.parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(_WARMUP * config.steps), config.steps)
    batches = _batches(data, batch_size=config.batch_size, seed=config.seed)
    trainable.model.train()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    bar = tqdm(total=config.steps, desc=f"train {trainable.method}", unit="step", disable=not progress)
    for _ in range(config.steps):
        batch = collate(next(batches), pad_id=pad_id)
        loss = trainable.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, _MAX_GRAD_NORM)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(batch["attention_mask"].sum())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        bar.update()
    bar.close()
    trainable.model.eval()
    window = losses[-_LOSS_WINDOW:]
    return TrainResult(config.steps, time.perf_counter() - start, tokens, sum(window) / len(window))


def _batches(data: list[Encoded], *, batch_size: int, seed: int):
    """Endless batches: each epoch a fresh seeded shuffle; the last partial batch of an epoch is kept."""
    rng = random.Random(seed)
    while True:
        order = rng.sample(data, len(data))
        for i in range(0, len(order), batch_size):
            yield order[i : i + batch_size]
