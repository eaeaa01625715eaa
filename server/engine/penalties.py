"""Per-request changes to a step's logits before a token is picked: penalties and min_new_tokens.

Applied only to the rows whose requests ask for them (the runner passes those rows; a batch where none
asks never comes here), vectorised over those rows, on the logits' device, in place:

1. repetition_penalty (transformers' RepetitionPenaltyLogitsProcessor): every token id that occurs in the
   prompt or the output so far has its logit multiplied by p when negative, divided by p otherwise;
2. presence_penalty and frequency_penalty (OpenAI's formula), over the OUTPUT tokens only:
   logit -= presence * (count > 0) + frequency * count;
3. min_new_tokens (transformers' MinNewTokensLengthLogitsProcessor): while fewer tokens than that were
   generated, the ids that would end the request (`Request.stop_ids`: EOS unless ignore_eos, and the
   stop token ids) get -inf.

The penalised rows are held within float32's finite range (a tiny repetition penalty could push a logit to
inf), so that no accepted parameter can make the sampler fail; the masking comes after, and only ever
removes tokens that are not the whole vocabulary.
"""

import torch

from quiver.engine.request import Request

_MAX = torch.finfo(torch.float32).max
_TINY = torch.finfo(torch.float32).tiny


def apply_penalties(logits: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
    """logits [B, V] float32, row i for requests[i]; change rows `rows` in place as the module docstring says."""
    repeat = [i for i in rows if requests[i].params.repetition_penalty != 1]
    counted = [i for i in rows if requests[i].params.presence_penalty or requests[i].params.frequency_penalty]
    if repeat:
        _repetition(logits, [requests[i] for i in repeat], repeat)
    if counted:
        _presence_frequency(logits, [requests[i] for i in counted], counted)
    early = [i for i in rows if len(requests[i].output_token_ids) < requests[i].params.min_new_tokens
             and requests[i].stop_ids]
    if early:
        _mask_early_stops(logits, [requests[i] for i in early], early)


def _occurrences(token_lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) of every token of every list, as two flat int64 tensors."""
    lengths = torch.tensor([len(t) for t in token_lists], device=device)
    row = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
    ids = torch.tensor([t for tokens in token_lists for t in tokens], dtype=torch.int64, device=device)
    return row, ids


def _repetition(logits: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
    dev = logits.device
    index = torch.tensor(rows, device=dev)
    sub = logits.index_select(0, index)  # [R, V]
    seen = torch.zeros_like(sub, dtype=torch.bool)
    seen.index_put_(_occurrences([r.all_token_ids for r in requests], dev), torch.tensor(True, device=dev))
    p = torch.tensor([r.params.repetition_penalty for r in requests], dtype=torch.float64, device=dev)[:, None]
    p = p.clamp_(_TINY, _MAX).to(sub.dtype)  # within float32's normal range: never 0 or inf (0 * inf is NaN)
    penalised = torch.where(sub < 0, sub * p, sub / p).clamp_(-_MAX, _MAX)
    logits.index_copy_(0, index, torch.where(seen, penalised, sub))


def _presence_frequency(logits: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
    dev = logits.device
    index = torch.tensor(rows, device=dev)
    sub = logits.index_select(0, index)
    counts = torch.zeros_like(sub)
    if any(r.output_token_ids for r in requests):
        row, ids = _occurrences([r.output_token_ids for r in requests], dev)
        counts.index_put_((row, ids), torch.ones_like(ids, dtype=sub.dtype), accumulate=True)
    presence = torch.tensor([r.params.presence_penalty for r in requests], dtype=sub.dtype, device=dev)[:, None]
    frequency = torch.tensor([r.params.frequency_penalty for r in requests], dtype=sub.dtype, device=dev)[:, None]
    sub = (sub - (presence * (counts > 0) + frequency * counts)).clamp_(-_MAX, _MAX)
    logits.index_copy_(0, index, sub)


def _mask_early_stops(logits: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
    dev = logits.device
    row, ids = _occurrences([sorted(r.stop_ids) for r in requests], dev)
    index = torch.tensor(rows, device=dev)
    logits.index_put_((index[row], ids), torch.tensor(float("-inf"), dtype=logits.dtype, device=dev))
