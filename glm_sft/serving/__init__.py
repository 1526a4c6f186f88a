"""The OpenAI-compatible server behind serve.py, one concern a module: requests (reading and bounding a chat completion
body, the OpenAI error body), worker (the model's thread, one reply at a time), batching (replies generated together),
completions (the response and chunk shapes) and app (the HTTP API: create_app)."""
