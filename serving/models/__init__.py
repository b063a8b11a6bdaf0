"""The CoCa models Triton serves (Python backend): one module each; model_repository/*/1/model.py import them.

These run inside Triton's Python-backend stub, one process per model instance.
"""
import os

# OpenMP threads that finish a parallel region spin-wait for the next one by default,
# burning a core: with 2 cores and three model processes (plus the client) a spinning
# idle process slowed the busy one ~10x. Passive waiting must be set before torch loads
# libgomp, i.e. here, before any serving.models module imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def entry_point(module: str, cls: str) -> type:
    """The `TritonPythonModel` class of a model.py: it imports the real model in `initialize`.

    Triton imports model.py twice per model (in a stub that only asks the model to
    complete its config, then in the instance's own stub). Importing torch and open_clip
    takes ~10 s of CPU; deferring it to initialize() saves the first one.
    """

    class TritonPythonModel:
        def initialize(self, args):
            import importlib

            self.model = getattr(importlib.import_module(module), cls)()
            self.model.initialize(args)

        def execute(self, requests):
            return self.model.execute(requests)

        def finalize(self):
            self.model.finalize()

    TritonPythonModel.__qualname__ = f"TritonPythonModel[{module}.{cls}]"
    return TritonPythonModel
