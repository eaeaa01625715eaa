"""Bounded soak: many clients streaming with adapters of all six kinds while adapters churn.

A real gRPC server on 127.0.0.1 over the tiny test model (in this process, so its engine can be inspected).
`clients` concurrent clients stream generations, each with a random adapter id (or the base model); 20% of
them cancel mid-stream and 10% carry a short deadline. Every second one adapter is uploaded, replaced by
another kind, or unloaded. Faults are mixed in: a share of the requests are hostile (a temperature so small
it overflows a naive sampler; a token id outside the vocabulary), and every fourth churn turn uploads a bad
adapter (a catastrophic-backtracking target pattern, weights that would overflow, malformed config values,
a truncated weights file). Another share are probes: greedy base-model requests on fixed prompts whose
tokens were taken before the soak, on a quiet server. The run ends after `seconds` or `max_requests`,
whichever comes first. Then:

- every request is accounted for: completed, cancelled by its client, past its deadline, or NOT_FOUND (its
  adapter was unloaded); every hostile request ends as its kind must (FAULTS); every probe completes with
  exactly its reference tokens; every bad upload is refused with INVALID_ARGUMENT; anything else is counted
  as unexpected; the server's request counter agrees, but
  for calls whose short deadline passed before they reached the servicer;
- no error was logged (a servicer bug, an engine step failure, an unretrieved task exception), apart from
  gRPC core's note of a message sent as its call hit the deadline (counted apart, see _SEND_AFTER_DEADLINE);
- the engine is idle: no request, pin or placement left, KV blocks only in adapter prefixes (idle.py);
- resident memory grew less than 10% from the end of the warm-up (the first quarter) to the end.

Its command line is benchmarks/soak.py (`python -m benchmarks.soak`); the suite runs a 15 s soak
(tests/test_soak.py).
"""

import asyncio
import gc
import logging
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import torch

from quiver.v1 import adapters_pb2 as apb
from quiver.v1 import adapters_pb2_grpc, inference_pb2_grpc
from quiver.v1 import inference_pb2 as pb
from tests.support.adapter_mutations import both, edit_config, edit_tensors, truncate
from tests.support.adapter_zoo import ALL
from tests.support.harness import RunningServer, start_server
from tests.support.idle import wait_idle

EXPECTED = {  # client-side outcome -> the server's status label for it
    "completed": "OK", "cancelled": "CANCELLED", "deadline_exceeded": "DEADLINE_EXCEEDED", "not_found": "NOT_FOUND",
}
ENGINE = dict(num_kv_blocks=512, block_size=8, adapter_slots=4, max_num_seqs=64)
FAULTS = {  # hostile request kind -> the outcome it must have (or not_found: its adapter was unloaded meanwhile)
    "tiny_temperature": "completed",  # sampled as (logits - max) / T: behaves as greedy, harms no one
    "bad_token": "invalid_argument",  # a token id outside the vocabulary
}
PROBE_PROMPTS = ([5, 17, 33, 2, 90], [120, 7, 7, 64], list(range(10, 30)))
PROBE_TOKENS = 12


@dataclass(frozen=True)
class SoakConfig:
    seconds: float = 60.0
    clients: int = 64
    max_requests: int = 20_000
    cancel_fraction: float = 0.2
    deadline_fraction: float = 0.1
    fault_fraction: float = 0.1  # requests that are hostile (FAULTS), spread evenly over its kinds
    probe_fraction: float = 0.1  # greedy base-model requests checked against their reference tokens
    churn_every: float = 1.0  # seconds between adapter uploads / replaces / unloads
    seed: int = 0


@dataclass
class SoakReport:
    config: dict
    wall_seconds: float = 0.0
    requests: int = 0
    outcomes: dict = field(default_factory=dict)  # completed, cancelled, ... and unexpected:<CODE>
    faults: dict = field(default_factory=dict)  # "<fault kind>:<outcome>" -> count
    probes: dict = field(default_factory=dict)  # exact, differ, failed:<outcome> -> count
    server_statuses: dict = field(default_factory=dict)  # the server's quiver_requests_total by status
    tokens: int = 0
    churn: dict = field(default_factory=dict)  # upload, replace, unload, bad_upload -> count; failed:<action>:<CODE>
    errors_logged: list = field(default_factory=list)
    grpc_sends_after_deadline: int = 0  # see _SEND_AFTER_DEADLINE
    leaks: list = field(default_factory=list)
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# gRPC core's own log when a stream's next message is sent just as the call ends by its deadline: the call
# has already ended (the client sees DEADLINE_EXCEEDED); no server code raised. Counted, not failed.
_SEND_AFTER_DEADLINE = "ExecuteBatchError raised in core by servicer method"


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[str] = []
        self.sends_after_deadline = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name == "grpc._cython.cygrpc" and message.startswith(_SEND_AFTER_DEADLINE):
            self.sends_after_deadline += 1
        else:
            self.records.append(f"{record.name}: {message[:300]}")


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _upload_messages(adapter_id: str, directory: Path, *, replace: bool) -> list[apb.UploadAdapterRequest]:
    messages = [apb.UploadAdapterRequest(header=apb.UploadHeader(adapter_id=adapter_id, replace=replace))]
    for f in sorted(directory.iterdir()):
        messages.append(apb.UploadAdapterRequest(chunk=apb.FileChunk(file_name=f.name, data=f.read_bytes())))
    return messages


def _bad_adapters(zoo: dict[str, Path], root: Path) -> list[Path]:
    """Copies of the zoo's LoRA that the server must refuse, each in its own way."""
    def lora_b_at(value: float):
        return lambda tensors: {k: torch.full_like(t, value) if "lora_B" in k else t for k, t in tensors.items()}

    mutations = {
        "pattern": edit_config(target_modules="(.*.*)*!"),
        "overflow": both(edit_config(lora_alpha=3e38), edit_tensors(lora_b_at(3e38))),
        "malformed": edit_config(peft_type=[]),
        "truncated": truncate,
    }
    dirs = []
    for name, mutate in mutations.items():
        path = root / name
        shutil.copytree(zoo["lora"], path)
        mutate(path)
        dirs.append(path)
    return dirs


class _Soak:
    def __init__(self, config: SoakConfig, running: RunningServer, zoo: dict[str, Path], bad: list[Path]) -> None:
        self.config = config
        self.running = running
        self.zoo = zoo
        self.bad = bad
        self.references: list[list[int]] = []  # PROBE_PROMPTS' greedy tokens on the quiet server
        self.faults: Counter = Counter()
        self.probes: Counter = Counter()
        self.rng = random.Random(config.seed)
        self.served: dict[str, str] = {}  # adapter id -> zoo kind, as the churn left it
        self.ever: list[str] = []  # every id ever served: clients also ask for unloaded ones
        self.outcomes: Counter = Counter()
        self.churn: Counter = Counter()
        self.tokens = 0
        self.started = 0
        self.next_id = 0
        self.rss_warm = 0.0

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.running.target) as channel:
            self.inference = inference_pb2_grpc.InferenceServiceStub(channel)
            self.adapters = adapters_pb2_grpc.AdapterServiceStub(channel)
            for kind in ALL:  # two ids of every kind to start with
                for _ in range(2):
                    await self._upload(kind, replace_id=None)
            for prompt in PROBE_PROMPTS:
                response = await self.inference.Generate(_probe(prompt), timeout=60)
                self.references.append(list(response.token_ids))
            self.deadline = time.monotonic() + self.config.seconds
            warm = asyncio.ensure_future(self._warm_rss())
            churn = asyncio.ensure_future(self._churn())
            await asyncio.gather(*(self._client(i) for i in range(self.config.clients)))
            churn.cancel()
            await asyncio.gather(churn, return_exceptions=True)
            await warm

    def _more(self) -> bool:
        return time.monotonic() < self.deadline and self.started < self.config.max_requests

    async def _warm_rss(self) -> None:
        await asyncio.sleep(self.config.seconds / 4)
        gc.collect()
        self.rss_warm = _rss_mb()

    async def _client(self, index: int) -> None:
        rng = random.Random(self.config.seed * 1000 + index)
        while self._more():
            self.started += 1
            draw = rng.random()
            if draw < self.config.fault_fraction:
                kind = sorted(FAULTS)[self.started % len(FAULTS)]
                self.faults[f"{kind}:{await self._fault(kind, rng)}"] += 1
                continue
            if draw < self.config.fault_fraction + self.config.probe_fraction:
                await self._probe(rng.randrange(len(PROBE_PROMPTS)))
                continue
            adapter_id = rng.choice(["", *self.ever])
            request = pb.GenerateRequest(
                adapter_id=adapter_id,
                prompt=pb.Prompt(token_ids=pb.TokenIds(ids=[rng.randrange(3, 160) for _ in range(rng.randint(1, 24))])),
                sampling=pb.SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(2**32)),
                stopping=pb.StoppingCriteria(max_new_tokens=rng.randint(1, 32), ignore_eos=rng.random() < 0.5),
            )
            cancel_after = rng.randint(1, 4) if rng.random() < self.config.cancel_fraction else None
            timeout = rng.uniform(0.02, 0.3) if rng.random() < self.config.deadline_fraction else 60.0
            self.outcomes[await self._stream(request, cancel_after, timeout)] += 1

    async def _fault(self, kind: str, rng: random.Random) -> str:
        prompt = [rng.randrange(3, 160) for _ in range(rng.randint(1, 24))]
        temperature = 0.0
        if kind == "tiny_temperature":
            temperature = 1e-40
        elif kind == "bad_token":
            prompt[rng.randrange(len(prompt))] = 10**6
        request = pb.GenerateRequest(
            adapter_id=rng.choice(["", *self.served]),
            prompt=pb.Prompt(token_ids=pb.TokenIds(ids=prompt)),
            sampling=pb.SamplingParams(temperature=temperature, seed=rng.randrange(2**32)),
            stopping=pb.StoppingCriteria(max_new_tokens=rng.randint(1, 32), ignore_eos=True),
        )
        return await self._stream(request, None, 60.0)

    async def _probe(self, index: int) -> None:
        tokens: list[int] = []
        outcome = await self._stream(_probe(PROBE_PROMPTS[index]), None, 60.0, into=tokens)
        if outcome != "completed":
            self.probes[f"failed:{outcome}"] += 1
        else:
            self.probes["exact" if tokens == self.references[index] else "differ"] += 1

    async def _stream(
        self, request: pb.GenerateRequest, cancel_after: int | None, timeout: float, *, into: list[int] | None = None
    ) -> str:
        call = self.inference.GenerateStream(request, timeout=timeout)
        received = 0
        try:
            async for message in call:
                received += 1
                self.tokens += len(message.token_ids)
                if into is not None:
                    into.extend(message.token_ids)
                if message.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    return "completed"
                if cancel_after is not None and received >= cancel_after:
                    call.cancel()
                    return "cancelled"
        except grpc.aio.AioRpcError as e:
            outcome = e.code().name.lower()
            return outcome if outcome in EXPECTED or outcome in FAULTS.values() else f"unexpected:{e.code().name}"
        return "unexpected:stream ended without a finish reason"

    async def _churn(self) -> None:
        actions = ("replace", "unload", "upload", "bad_upload")
        turn = 0
        while self._more():
            await asyncio.sleep(self.config.churn_every)
            action = actions[turn % len(actions)]
            turn += 1
            try:
                if action == "bad_upload":
                    code = await self._bad_upload(self.bad[(turn // len(actions) - 1) % len(self.bad)])
                    if code != "INVALID_ARGUMENT":
                        action = f"failed:bad_upload:{code}"
                elif action == "unload" and len(self.served) > 3:
                    adapter_id = self.rng.choice(sorted(self.served))
                    await self.adapters.UnloadAdapter(apb.UnloadAdapterRequest(adapter_id=adapter_id), timeout=60)
                    del self.served[adapter_id]
                elif action == "replace" and self.served:
                    adapter_id = self.rng.choice(sorted(self.served))
                    await self._upload(self.rng.choice([k for k in ALL if k != self.served[adapter_id]]), replace_id=adapter_id)
                else:
                    action = "upload"
                    await self._upload(self.rng.choice(ALL), replace_id=None)
                self.churn[action] += 1
            except grpc.aio.AioRpcError as e:
                self.churn[f"failed:{action}:{e.code().name}"] += 1

    async def _upload(self, kind: str, *, replace_id: str | None) -> None:
        adapter_id = replace_id or f"soak-{self.next_id}"
        if replace_id is None:
            self.next_id += 1
        messages = _upload_messages(adapter_id, self.zoo[kind], replace=replace_id is not None)
        await self.adapters.UploadAdapter(iter(messages), timeout=60)
        self.served[adapter_id] = kind
        if adapter_id not in self.ever:
            self.ever.append(adapter_id)

    async def _bad_upload(self, directory: Path) -> str:
        """Upload an adapter the server must refuse; the call's status code (INVALID_ARGUMENT expected)."""
        try:
            await self.adapters.UploadAdapter(iter(_upload_messages(f"bad-{directory.name}", directory, replace=False)), timeout=60)
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return "OK"


def _probe(prompt: list[int]) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=pb.Prompt(token_ids=pb.TokenIds(ids=prompt)),
        stopping=pb.StoppingCriteria(max_new_tokens=PROBE_TOKENS, ignore_eos=True),
    )


def _server_statuses(running: RunningServer) -> Counter:
    statuses: Counter = Counter()
    for metric in running.server.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "quiver_requests_total":
                statuses[sample.labels["status"]] += int(sample.value)
    return statuses


def run(config: SoakConfig, *, model_path: Path, zoo: dict[str, Path], work: Path) -> SoakReport:
    """One soak over the tiny model at `model_path` (with its tokenizer) and zoo adapters; `work` holds the store."""
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    running = start_server(model_path, work, metrics_port=None, engine=ENGINE)
    report = SoakReport(config=asdict(config))
    try:
        soak = _Soak(config, running, zoo, _bad_adapters(zoo, work / "bad"))
        start = time.monotonic()
        # the clients run on the server's event loop: grpc.aio's completion poller is shared by the process,
        # and a second loop closed by asyncio.run could still be handed a late event ("Event loop is closed")
        running.run(soak.run(), timeout=config.seconds + 300)
        report.wall_seconds = round(time.monotonic() - start, 1)
        report.leaks = wait_idle(running.service, timeout=30)
        gc.collect()
        report.rss_warm_mb, report.rss_end_mb = round(soak.rss_warm, 1), round(_rss_mb(), 1)
        report.requests, report.tokens = soak.started, soak.tokens
        report.outcomes, report.churn = dict(soak.outcomes), dict(soak.churn)
        report.faults, report.probes = dict(soak.faults), dict(soak.probes)
        statuses = _server_statuses(running)
        statuses["OK"] -= len(PROBE_PROMPTS)  # the probes' references, taken before the clients started
        report.server_statuses = dict(statuses)
    finally:
        running.stop()
        logging.getLogger().removeHandler(errors)
    report.errors_logged = errors.records
    report.grpc_sends_after_deadline = errors.sends_after_deadline
    report.problems = _problems(report)
    return report


def _problems(report: SoakReport) -> list[str]:
    problems = []
    accounted = sum(report.outcomes.values()) + sum(report.faults.values()) + sum(report.probes.values())
    if accounted != report.requests:
        problems.append(f"{report.requests} requests started, {accounted} accounted for")
    unexpected = {k: v for k, v in report.outcomes.items() if k not in EXPECTED}
    unexpected |= {k: v for k, v in report.faults.items() if k.split(":", 1)[1] not in (FAULTS[k.split(":")[0]], "not_found")}
    unexpected |= {f"probe:{k}": v for k, v in report.probes.items() if k != "exact"}
    if unexpected:
        problems.append(f"unexpected outcomes: {unexpected}")
    unseen = report.requests - sum(report.server_statuses.values())  # a deadline can pass before the call reaches it
    if not 0 <= unseen <= report.outcomes.get("deadline_exceeded", 0):
        problems.append(f"the server counted {sum(report.server_statuses.values())} requests, clients {report.requests}")
    failed = {k: v for k, v in report.churn.items() if k.startswith("failed:")}
    if failed or not all(report.churn.get(a) for a in ("upload", "replace", "unload", "bad_upload")):
        problems.append(f"adapter churn: {report.churn}")
    if report.errors_logged:
        problems.append(f"{len(report.errors_logged)} errors logged, first: {report.errors_logged[0]}")
    if report.leaks:
        problems.append(f"not idle at the end: {report.leaks}")
    if report.rss_end_mb > 1.10 * report.rss_warm_mb:
        problems.append(f"resident memory grew from {report.rss_warm_mb} MB to {report.rss_end_mb} MB (> 10%)")
    return problems
