"""A byte-level tokenizer for the tiny test models (vocab 160), with a chat template, built offline.

Every token is at most one byte, so multi-byte characters are always split across tokens: the case
incremental detokenization must get right. Ids: 0 <unk>, 1 <|im_start|>, 2 <|im_end|> (eos, as the tiny
models' config says), then printable ASCII, newline and the bytes of "é", "世", "界" and a few more.
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 160
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tokenizer(model_dir: Path) -> PreTrainedTokenizerFast:
    byte_chars = ByteLevel.alphabet()  # the 256 printable stand-ins of bytes, keyed by byte below
    table = _byte_table()
    wanted = [*range(0x20, 0x7F), 0x0A, *"é世界".encode()]
    wanted += [b for b in range(0x80, 0x100) if b not in wanted][: VOCAB_SIZE - len(SPECIALS) - len(wanted)]
    assert all(table[b] in byte_chars for b in wanted)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b in wanted:
        vocab[table[b]] = len(vocab)
    assert len(vocab) == VOCAB_SIZE
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(model_dir)
    return fast


def _byte_table() -> dict[int, str]:
    """GPT-2's byte → printable character map, as the ByteLevel pre-tokenizer uses it."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}
