"""Triton Inference Server infrastructure: run the real ``tritonserver`` (Python backend, CPU).

The server binary is the one that ships inside the ``nvidia-pytriton`` wheel; we run it
directly (no PyTriton API). See ``serving/launcher.py`` and ``serving/NOTES.md``.

Nothing is imported eagerly here so that ``python -m serving.launcher`` does not import
the module twice (runpy warns about that).
"""

__all__ = ["TritonServer", "TritonServerError", "find_triton", "pick_free_ports"]


def __getattr__(name):
    if name in __all__:
        from serving import launcher

        return getattr(launcher, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
