"""`quiver serve --http-port 0`: the endpoint is announced in the log, and SIGTERM lets an HTTP stream in flight
finish before the process exits 0."""

import signal

import openai

from tests.support.harness import serve_process


def test_serve_with_http_drains_an_http_stream_on_sigterm(model_path, tmp_path):
    endpoint = r"OpenAI-compatible HTTP endpoint on (http://127\.0\.0\.1:\d+/v1)"
    with serve_process(model_path, tmp_path, "--http-port", "0", find=endpoint) as (process, url):
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
