"""A tiny llama with a character tokenizer (and a chat template), and a toy task it can learn in a few steps."""

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from quiver.trainer.data import Example
from tests.support.models import save_tiny

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: the tiny llama's bos 1 and eos 2
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:?!'-\n"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ("red", "green", "blue")


def save_tiny_with_tokenizer(root: Path) -> Path:
    path = save_tiny("llama", root)
    vocab = {token: i for i, token in enumerate([*SPECIALS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        additional_special_tokens=SPECIALS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return path


def toy_examples(n: int) -> list[Example]:
    """'which colour is item k?' -> one of three words, by k mod 3."""
    return [Example(prompt=f"which colour is item {k}?", completion=WORDS[k % 3]) for k in range(n)]
