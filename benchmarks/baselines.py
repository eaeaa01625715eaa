"""What users would run instead of Quiver, timed on the same requests: transformers/PEFT `generate()` over
static batches with left padding, and "merge and swap" (one adapter merged into the weights at a time,
requests grouped by adapter)."""

import time

import torch

from benchmarks import lora_bank


def timed_static(model, prompts, lengths, batch_size, pad, adapter_ids=None) -> tuple[list[list[int]], float]:
    """generate() over static batches of `batch_size` in request order; PEFT mixes adapters with adapter_names.
    A batch runs until its longest request is done (a static batch cannot release a row early); each request
    keeps its own `lengths[i]` tokens."""
    model.generation_config.eos_token_id = None  # exactly lengths[i] tokens per request, like ignore_eos
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        extra = {"adapter_names": adapter_ids[i : i + batch_size]} if adapter_ids else {}
        outputs += _generate(model, prompts[i : i + batch_size], lengths[i : i + batch_size], pad, **extra)
    _sync(model)
    return outputs, time.perf_counter() - start


def timed_merge_and_swap(peft_model, prompts, lengths, batch_size, pad, adapter_ids) -> tuple[list[list[int]], float]:
    """For each adapter in order of first use: merge it into the base weights, run its requests in static
    batches, unmerge. Outputs come back in request order."""
    peft_model.generation_config.eos_token_id = None
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(adapter_ids):
        groups.setdefault(name, []).append(i)
    outputs: list[list[int] | None] = [None] * len(prompts)
    start = time.perf_counter()
    for name, rows in groups.items():
        peft_model.base_model.merge_adapter([name])
        for k in range(0, len(rows), batch_size):
            chunk = rows[k : k + batch_size]
            outs = _generate(peft_model, [prompts[i] for i in chunk], [lengths[i] for i in chunk], pad)
            for i, out in zip(chunk, outs, strict=True):
                outputs[i] = out
        peft_model.base_model.unmerge_adapter()
    _sync(peft_model)
    return outputs, time.perf_counter() - start


def peft_with(base, config, ids: list[int]):
    """A PeftModel over `base` holding the bank's adapters `ids` (named lora<i>), built in memory."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    model = None
    device = str(base.device)
    for i in ids:
        cfg = LoraConfig(**{k: v for k, v in lora_bank.peft_config(i).items() if k != "peft_type"})
        name = lora_bank.name_of(i)
        if model is None:
            model = get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        result = set_peft_model_state_dict(model, lora_bank.state_dict(config, i, device), adapter_name=name)
        assert not result.unexpected_keys, result.unexpected_keys
    return model.eval()


def _generate(model, batch: list[list[int]], lengths: list[int], pad: int, **extra) -> list[list[int]]:
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lengths), do_sample=False,
                             pad_token_id=pad, **extra)
    return [row[width : width + n].tolist() for row, n in zip(out, lengths, strict=True)]


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()
