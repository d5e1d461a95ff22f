"""Serving stage: using a trained run to answer (predict and chat today; the HTTP server builds on these)."""
