"""The `quiver` CLI against a real server, and `quiver serve` as a process: SIGTERM drains and exits 0."""

import re
import signal

from grpc_health.v1 import health_pb2

from quiver.cli import build_parser, main
from quiver.client import QuiverClient
from quiver.v1 import inference_pb2 as pb
from tests.support.harness import health, serve_process, start_server


def test_client_commands(model_path, tmp_path, zoo, capsys):
    running = start_server(model_path, tmp_path, adapter_roots=(zoo["lora"].parent,))
    server = ["--server", running.target]
    try:
        assert main(["info", *server]) == 0
        assert 'kernel_backend: "torch"' in capsys.readouterr().out
        assert main(["adapters", "load", "l", "lora", *server]) == 0
        assert main(["adapters", "upload", "b", str(zoo["bottleneck"]), *server]) == 0
        assert main(["adapters", "list", *server]) == 0
        listed = capsys.readouterr().out.splitlines()
        assert [line.split("\t")[:2] for line in listed[-2:]] == [["b", "BOTTLENECK"], ["l", "LORA"]]
        assert "(stored)" in listed[-2]
        with QuiverClient(running.target) as c:
            want = c.generate(c.request(chat="hi", adapter_id="b", max_new_tokens=5)).text
        assert main(["generate", "hi", "--adapter", "b", "--max-new-tokens", "5", *server]) == 0
        assert capsys.readouterr().out == want + "\n"
        assert main(["adapters", "unload", "b", *server]) == 0
        assert main(["adapters", "unload", "b", *server]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
    finally:
        running.stop()


def test_serve_drains_on_sigterm_and_exits_0(model_path, tmp_path):
    flags = ("--max-prompt-bytes", "5000", "--prefix-cache-scope", "global", "--max-concurrent-uploads", "2",
             "--max-staged-bytes", str(3 << 30), "--upload-idle-seconds", "5", "--metrics-host", "127.0.0.1")
    with serve_process(model_path, tmp_path, *flags, find=r"listening on 127\.0\.0\.1:(\d+)") as (process, port):
        target = f"127.0.0.1:{port}"
        assert health(target) == health_pb2.HealthCheckResponse.SERVING
        with QuiverClient(target) as c:
            assert c.server_info().limits.max_prompt_bytes == 5000
            stream = c.generate_stream(c.request(token_ids=[3, 4], max_new_tokens=300, ignore_eos=True))
            next(stream)
            process.send_signal(signal.SIGTERM)
            rest = list(stream)
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH and rest[-1].usage.completion_tokens == 300
        assert process.wait(timeout=30) == 0


def _helps(parser) -> dict[str, str]:
    """The --help text of `parser` and of each of its subcommands, by command."""
    helps = {parser.prog: parser.format_help()}
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for sub in action.choices.values():
            helps |= _helps(sub)
    return helps


def test_help_states_each_default_once():
    helps = _helps(build_parser())
    assert {"quiver serve", "quiver deploy ray", "quiver adapters upload"} <= set(helps)
    for command, text in helps.items():
        flat = " ".join(text.split())
        assert "(default: None)" not in flat and "(default: False)" not in flat, command
        for option in re.split(r"\s(?=--?[a-z])", flat):  # one option's help at a time
            assert option.count("(default") <= 1, (command, option)


def test_serve_and_deploy_ray_share_the_store_and_token_flags():
    def store_group(command: list[str]) -> list[str]:
        parser = build_parser()._subparsers._group_actions[0].choices[command[0]]
        for name in command[1:]:
            parser = parser._subparsers._group_actions[0].choices[name]
        (group,) = [g for g in parser._action_groups if g.title == "adapter store and tokens"]
        return [a.option_strings[0] for a in group._group_actions]

    assert store_group(["serve"]) == store_group(["deploy", "ray"])
    assert {"--store-dir", "--max-concurrent-uploads", "--upload-idle-seconds", "--client-token-file"} <= set(store_group(["serve"]))
