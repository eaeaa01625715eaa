"""Requests started together on an engine service, each read to its end: what a victim got beside a bad one."""

from quiver.engine.request import SamplingParams
from quiver.engine.service import EngineService, RequestStream


def drain(stream: RequestStream) -> tuple[list[int], BaseException | None]:
    """Its tokens, and the error its reader got (None if it finished)."""
    tokens: list[int] = []
    try:
        for out in stream:
            tokens += out.new_token_ids
    except Exception as error:
        return tokens, error
    return tokens, None


def run(
    service: EngineService, requests: list[tuple[list[int], str | None, SamplingParams]]
) -> list[tuple[list[int], BaseException | None]]:
    """All requests (prompt, adapter id or None, params) started in one step; each one's (tokens, error)."""
    streams = service.submit_many([r[0] for r in requests], [r[2] for r in requests], adapter_ids=[r[1] for r in requests])
    return [drain(s) for s in streams]
