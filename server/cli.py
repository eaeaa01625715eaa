"""The `quiver` command.

`quiver serve` loads the model and answers prompts typed at the terminal, streaming the reply (the gRPC
front end replaces this loop when it lands); `quiver generate PROMPT` answers one prompt and exits.
"""

import argparse
import logging
import sys

from server.config import EngineConfig, ModelConfig, default_cache_dir
from server.engine.engine import Engine
from server.engine.request import SamplingParams
from server.engine.service import EngineService
from server.errors import QuiverError
from server.model import attention
from server.model.loader import load_model


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local Hugging Face Llama/Qwen2/Mistral folder (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weights and KV dtype (auto: fp32 on CPU, bf16 on CUDA)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--cache-dir", default=None, help="where the default model is converted once (default: ~/.cache/quiver)")
    e = p.add_argument_group("engine")
    e.add_argument("--block-size", type=int, default=16, help="KV entries per block")
    e.add_argument("--kv-cache-bytes", type=int, default=None, help="KV pool budget (default: 90%% of free GPU memory, 1 GiB on CPU)")
    e.add_argument("--max-num-seqs", type=int, default=128, help="requests running at once")
    e.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per engine step")
    e.add_argument("--max-model-len", type=int, default=None, help="prompt + output limit (default: the model's)")
    e.add_argument("--kernel-backend", default="auto", choices=["auto", "torch", "triton"], help="auto: triton on CUDA, torch on CPU")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="quiver", description="Serve many task adapters over one frozen base model.", formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="load the model and answer prompts typed at the terminal", formatter_class=fmt)
    gen = sub.add_parser("generate", help="answer one prompt and exit", formatter_class=fmt)
    gen.add_argument("prompt", help="the user message (the model's chat template is applied)")
    for p in (serve, gen):
        _add_model_flags(p)
        _add_sampling_flags(p)
    return parser


def _start(args) -> EngineService:
    model_config = ModelConfig(path=args.model, dtype=args.dtype, device=args.device, cache_dir=args.cache_dir or default_cache_dir())
    engine_config = EngineConfig(
        block_size=args.block_size,
        kv_cache_bytes=args.kv_cache_bytes,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        kernel_backend=args.kernel_backend,
    )
    loaded = load_model(model_config, attn_implementation=attention.register())
    return EngineService(Engine(loaded, engine_config))


def _answer(service: EngineService, text: str, params: SamplingParams) -> None:
    tokenizer = service.engine.tokenizer
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False)
    ids: list[int] = []
    printed = ""
    for out in service.submit(list(prompt), params):
        ids += out.new_token_ids
        text_so_far = tokenizer.decode(ids, skip_special_tokens=True)
        if not text_so_far.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text_so_far[len(printed):])
            sys.stdout.flush()
            printed = text_so_far
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        service = _start(args)
    except QuiverError as e:
        print(f"quiver: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "generate":
            _answer(service, args.prompt, params)
            return 0
        print("Quiver is ready. Type a prompt and press Enter (Ctrl-D to quit).\n> ", end="", flush=True)
        for line in sys.stdin:
            if line.strip():
                _answer(service, line.strip(), params)
            print("> ", end="", flush=True)
        return 0
    finally:
        service.shutdown()
