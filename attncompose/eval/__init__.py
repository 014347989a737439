"""Measuring: one home for everything that judges an attention against exact attention.

- ``reference``: exact attention, the one oracle (``exact_attention``, and its float32,
  few-heads-at-a-time form for long low-precision inputs)
- ``products``: exact attention's query-key products and a recipe's share of them (frac)
- ``metrics``: the project's error metric and the per-layer error on captured Q/K/V
- ``timing``: the one timing helper (and where a measurement ran)
- ``data``: the one Q/K/V loader (captures, the built-in capture, synthetic)
- ``compare``: error and latency against exact on data (``attncompose run``)
- ``model``: a recipe on a real model (``attncompose eval``)
- ``bench``: an attention against the SDPA backends (``attncompose bench``)
- ``analysis``: dense coverage views for detector quality (small n)

Imports nothing here, so ``import attncompose`` loads only what it uses.
"""
