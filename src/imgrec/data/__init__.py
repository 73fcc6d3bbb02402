"""Data sources, the safe decoder and the in-memory loader (import the submodules you need).

``imgrec.data.check(source, ...)`` runs the data check (:func:`imgrec.data.datacheck.check`); it is imported on
first use so that ``import imgrec.data.decode`` stays light. (The module is not named ``check``: importing a
submodule ``imgrec.data.check`` would replace this function with the module object.)
"""
from __future__ import annotations

__all__ = ["check"]


def __getattr__(name: str):
    if name == "check":
        from imgrec.data.datacheck import check
        globals()["check"] = check
        return check
    raise AttributeError(f"module 'imgrec.data' has no attribute {name!r}")
