"""Test fixture: reports the stub's Python environment as JSON (imports numpy and torch)."""

import importlib.util
import json
import os
import sys

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


def _find(name):
    spec = importlib.util.find_spec(name)
    return None if spec is None else spec.origin


class TritonPythonModel:
    def initialize(self, args):
        libpython = sorted({line.split()[-1] for line in open("/proc/self/maps") if "libpython" in line})
        self.info = json.dumps(
            {
                "executable": sys.executable,
                "prefix": sys.prefix,
                "version": list(sys.version_info[:3]),
                "isolated": sys.flags.isolated,
                "sys_path": sys.path,
                "cwd": os.getcwd(),
                "numpy": np.__version__,
                "torch": torch.__version__,
                "torch_sum": float(torch.arange(4.0).sum()),
                "libpython": libpython,
                "coca": _find("coca"),
                "serving": _find("serving"),
            }
        )

    def execute(self, requests):
        out = np.array([self.info.encode()], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("INFO", out)]) for _ in requests]
