"""Batched inference: many sequences decoding together."""
