"""Test fixture: reports how a batch of requests with BYTES inputs reaches execute()."""

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        n = len(requests)
        responses = []
        for request in requests:
            arr = pb_utils.get_input_tensor_by_name(request, "DATA").as_numpy()
            info = f"shape={arr.shape} dtype={arr.dtype} type0={type(arr.reshape(-1)[0]).__name__}"
            lens = np.array([[len(x)] for x in arr.reshape(-1)], dtype=np.int64)
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor("LEN", lens),
                        pb_utils.Tensor("BATCH_SIZE", np.full((arr.shape[0], 1), n, dtype=np.int64)),
                        pb_utils.Tensor("INFO", np.array([[info.encode()]] * arr.shape[0], dtype=np.object_)),
                    ]
                )
            )
        return responses
