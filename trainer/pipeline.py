"""One method from base model to exported directory: load, set up, encode, train, export."""

from dataclasses import dataclass
from pathlib import Path

import torch

from quiver.adapters.formats import load_adapter
from quiver.trainer.base import load_base
from quiver.trainer.data import Example
from quiver.trainer.encode import encode
from quiver.trainer.export import export
from quiver.trainer.methods import FULL, MethodConfig, Trainable, prepare
from quiver.trainer.train import TrainConfig, TrainResult, train


@dataclass(frozen=True)
class Trained:
    trainable: Trainable  # the trained model, in eval mode
    result: TrainResult
    out: Path  # the adapter directory, or for "full" the model folder
    exported_params: int  # what the server holds: adapter tensors (no re-parametrisation), or the whole model

    @property
    def serve_model(self) -> Path | None:
        """The model folder to serve instead of the base (full fine-tuning), or None to serve `out` as an adapter."""
        return self.out if self.trainable.method == FULL else None


def train_and_export(
    *, model_path: Path, method: MethodConfig, config: TrainConfig, examples: list[Example], max_length: int,
    out: Path, progress: bool,
) -> Trained:
    base, tokenizer = load_base(model_path)
    data = [encode(tokenizer, e, max_length=max_length) for e in examples]
    torch.manual_seed(config.seed)  # the methods' initialisations
    trainable = prepare(base, method)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = train(trainable, data, config, pad_id=pad_id, progress=progress)
    export(trainable, out, tokenizer=tokenizer, base_path=model_path)
    exported = trainable.base_params if method.kind is None else load_adapter(out, base.config).num_params
    return Trained(trainable=trainable, result=result, out=Path(out), exported_params=exported)
