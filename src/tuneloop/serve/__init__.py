"""Serving stage: a trained run answering (``Predictor``: predict and chat) and the OpenAI-compatible server.

``server.run(ServeConfig)`` serves one base model with many LoRA adapters chosen per request; the layers
follow vLLM's split: ``openai/protocol`` (pydantic models), ``openai/routes`` (FastAPI only), ``service``
(model resolution, limits, streaming; no FastAPI), ``engine`` (batched multi-adapter generation),
``adapters`` (the adapter pool and its safety checks).
"""
