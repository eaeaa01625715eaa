"""The OpenAI-compatible HTTP endpoint (`quiver serve --http-port`): /v1/completions, /v1/chat/completions, /v1/models."""
