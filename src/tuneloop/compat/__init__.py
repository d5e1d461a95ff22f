"""Workarounds for third-party API drift and bugs: each with a version guard, an upstream link and a test."""
