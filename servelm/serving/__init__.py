"""The protocol-free serving layer between the HTTP routes (``servelm.server``) and the engine.

A route parses its body and hands the request to the stages here: the input guard, the prompt strategy,
RAG, the canary, then (after the engine) the output guard, streamed or whole. Nothing here imports
FastAPI or Starlette; what a client did wrong or what the guard refused is a typed error
(:mod:`servelm.serving.errors`) that ``servelm.server.errors`` turns into an HTTP answer in one place.
"""
