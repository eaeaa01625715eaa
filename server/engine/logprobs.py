"""Log-probabilities of sampled and prompt tokens, vectorised over the rows that ask for them.

A sampled token's distribution is log_softmax((logits after penalties) / T), T = 1 when greedy, before any
top-k / top-p cut, in float32; a prompt token's is log_softmax(raw logits). Each is reported with its rank
(1 + how many tokens are strictly more likely) and the N most likely tokens, most likely first.
"""

from collections.abc import Callable

import torch

from quiver.engine.request import Request, TokenLogprob
from quiver.engine.sampler import temperature_of

_PROMPT_ROWS_PER_PASS = 256  # prompt rows put through the LM head at once: bounds the [rows, V] float32 logits


def describe(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]) -> list[TokenLogprob]:
    """logprobs [R, V] (log-softmaxed), token_ids [R] -> one TokenLogprob per row, with num_top[r] alternatives."""
    chosen = logprobs.gather(1, token_ids[:, None])  # [R, 1]
    ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
    k = min(max(num_top), logprobs.shape[-1])
    top: list[list[tuple[int, float]]] = [[]] * len(num_top)
    if k:
        top_lp, top_ids = logprobs.topk(k, dim=-1)  # sorted, most likely first
        top = [list(zip(ids, lps)) for ids, lps in zip(top_ids.tolist(), top_lp.tolist())]
    return [
        TokenLogprob(token_id=t, logprob=lp, rank=rank, top=tuple(alternatives[:n]))
        for t, lp, rank, alternatives, n in zip(token_ids.tolist(), chosen[:, 0].tolist(), ranks, top, num_top)
    ]


def record_sampled(logits: torch.Tensor, requests: list[Request], rows: list[int], tokens: list) -> None:
    """Append to each `requests[i].token_logprobs` (i in `rows`, asking logprobs, whose outcome tokens[i] is a
    token, not an error) its token's TokenLogprob under logits [B, V] (after penalties)."""
    rows = [i for i in rows if requests[i].params.logprobs is not None and isinstance(tokens[i], int)]
    if not rows:
        return
    dev = logits.device
    sub = logits.index_select(0, torch.tensor(rows, device=dev))
    temperatures = torch.tensor([temperature_of(requests[i].params) for i in rows], dtype=sub.dtype, device=dev)
    # shifted first, as the sampler draws: the top logit is 0, so a tiny T gives -inf, never NaN
    scaled = (sub - sub.amax(dim=-1, keepdim=True)) / temperatures[:, None]
    entries = describe(
        torch.log_softmax(scaled, dim=-1), torch.tensor([tokens[i] for i in rows], device=dev),
        [requests[i].params.logprobs for i in rows],
    )
    for i, entry in zip(rows, entries):
        requests[i].token_logprobs.append(entry)


def record_prompt(
    lm_head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, spans: list[tuple[Request, int, int, int]]
) -> None:
    """Extend each request's `prompt_logprobs` with the prompt tokens this step's rows predict.

    spans: (request, begin, end, first row): the request's tokens begin..end-1 are rows first row.. of
    hidden [T, H]. The row of prompt token p predicts token p + 1; entry p + 1 is added if it is the next one
    missing (rows recomputed after a preemption add nothing twice)."""
    rows: list[int] = []
    targets: list[int] = []
    owners: list[Request] = []
    for request, begin, end, first in spans:
        prompt = request.prompt_token_ids
        for p in range(max(begin, len(request.prompt_logprobs) - 1), min(end, len(prompt) - 1)):
            rows.append(first + p - begin)
            targets.append(prompt[p + 1])
            owners.append(request)
    dev = hidden.device
    for at in range(0, len(rows), _PROMPT_ROWS_PER_PASS):
        part = slice(at, at + _PROMPT_ROWS_PER_PASS)
        logits = lm_head(hidden[torch.tensor(rows[part], device=dev)]).float()
        entries = describe(
            torch.log_softmax(logits, dim=-1), torch.tensor(targets[part], device=dev),
            [r.params.logprobs or 0 for r in owners[part]],
        )
        for request, entry in zip(owners[part], entries):
            request.prompt_logprobs.append(entry)
