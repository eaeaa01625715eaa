"""The frozen base model and tokenizer the trainer starts from: a Hugging Face folder, or the server's default model."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from quiver.config import default_cache_dir
from quiver.errors import InvalidArgument
from quiver.model.loader import default_model_dir


def resolve_model_path(model: str | None) -> Path:
    """`model` (a Hugging Face folder), or the default SmolLM2-135M-Instruct (converted once, as the server does)."""
    path = Path(model) if model else default_model_dir(default_cache_dir())
    if not (path / "config.json").is_file():
        raise InvalidArgument(f"{path} is not a Hugging Face model folder (no config.json)")
    return path


def load_base(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in float32 (training precision) and its tokenizer, which must know its end-of-sequence token."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise InvalidArgument(f"{path}: the tokenizer has no eos token, so completions could not end")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer
