"""The OpenAI-compatible HTTP server and its chat page (`python serve.py`; the `serve` extra).

app.py: the endpoints, key check and request log; protocol.py: OpenAI's request checks and
response objects; static/chat.html: the chat page, one self-contained file. The engine that
batches the requests is the model's (model/engine.py).
"""
