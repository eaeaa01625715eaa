"""Write a trained method where the server reads it: PEFT kinds with PEFT's own `save_pretrained`, the
bottleneck adapter with `quiver.adapters.formats.save_bottleneck`, full fine-tuning as a whole model folder."""

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from quiver.adapters.formats import save_bottleneck
from quiver.trainer.methods import FULL, Trainable


def export(trainable: Trainable, out: Path, *, tokenizer: PreTrainedTokenizerBase, base_path: Path) -> None:
    """Adapter methods: an adapter directory for `base_path`. "full": a Hugging Face model folder (with tokenizer)."""
    out = Path(out)
    if trainable.method == FULL:
        trainable.model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    elif trainable.bottlenecks is not None:
        save_bottleneck(out, weights=trainable.bottlenecks.weights(), base_model_name_or_path=str(base_path))
    else:  # PEFT: for prefix tuning and P-tuning it saves the re-parametrisation's output, not the MLP/LSTM
        trainable.model.save_pretrained(out)
