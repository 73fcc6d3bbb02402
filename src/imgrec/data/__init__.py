"""Data sources, the safe decoder and the in-memory loader (import the submodules you need)."""
