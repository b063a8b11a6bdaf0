"""CoCa on Triton Inference Server (Python backend): the repository, the server, the models, the client.

repository.py writes a model repository (protocol.py: the names and identity all sides agree on);
triton_install.py finds the ``tritonserver`` the ``nvidia-pytriton`` wheel ships and launcher.py runs
it (directly, no PyTriton API), supervised by supervisor.py; models/ is the code Triton runs;
client.py talks to it. See ``serving/NOTES.md``.

Nothing is imported eagerly here so that ``python -m serving.launcher`` does not import
the module twice (runpy warns about that).
"""

__all__ = ["TritonServer", "TritonServerError", "find_triton", "pick_free_ports"]
_HOMES = {"TritonServer": "launcher", "pick_free_ports": "launcher", "TritonServerError": "errors",
          "find_triton": "triton_install"}


def __getattr__(name):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"serving.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
