"""The OpenAI-compatible HTTP surface: request/response models (``protocol``) and FastAPI routes (``routes``)."""
