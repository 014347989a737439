"""Integrations of attncompose attention callables into model libraries (import each submodule)."""
