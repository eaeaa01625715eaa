"""`quiver serve --http-port 0`: the endpoint is announced in the log, and SIGTERM lets an HTTP stream in flight
finish before the process exits 0."""

import os
import re
import signal
import subprocess
import sys
import threading

import openai


def test_serve_with_http_drains_an_http_stream_on_sigterm(model_path, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "quiver.cli", "serve", "--model", str(model_path), "--device", "cpu", "--port", "0",
         "--metrics-port", "0", "--http-port", "0", "--store-dir", str(tmp_path / "store"),
         "--kv-cache-bytes", str(1 << 20)],
        cwd=tmp_path, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        url = None
        for line in process.stderr:
            if match := re.search(r"OpenAI-compatible HTTP endpoint on (http://127\.0\.0\.1:\d+/v1)", line):
                url = match.group(1)
            if "serving:" in line:
                break
        threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe from filling
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as client:
            stream = client.completions.create(model=model_path.name, prompt=[3, 4], max_tokens=300, temperature=0.0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True})
            chunks = [next(stream)]
            process.send_signal(signal.SIGTERM)
            chunks += list(stream)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 300
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
