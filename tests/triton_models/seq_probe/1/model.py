"""Test fixture: a stateful sequence model that reports how Triton batches its requests.

Per request it answers:
  BATCH_SIZE  how many requests this execute() call received together
  COUNT       this sequence's step counter (1 on START), kept in a dict keyed by correlation id
  CORRID      request.correlation_id(), FLAGS request.flags()
  EXEC_ID     a counter of execute() calls (same value = same batch)
  LIVE        how many sequences the model still holds (after this request)
  EMBED_SUM   sum of the optional EMBED input given with START (kept in the state)
  TEXT_LEN    length of the optional TEXT (BYTES) input of this request, -1 if absent
Per-request errors: TOKEN < 0 -> INVALID_ARG error for that request only; the sequence's
state is untouched by a failing step.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

START = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
END = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END


def _error(msg):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    err = pb_utils.TritonError(msg, code) if code is not None else pb_utils.TritonError(msg)
    return pb_utils.InferenceResponse(error=err)


class TritonPythonModel:
    def initialize(self, args):
        self.state = {}
        self.exec_id = 0

    def execute(self, requests):
        self.exec_id += 1
        n = len(requests)
        responses = []
        for request in requests:
            corr = request.correlation_id()
            flags = request.flags()
            token = int(pb_utils.get_input_tensor_by_name(request, "TOKEN").as_numpy().reshape(-1)[0])
            embed = pb_utils.get_input_tensor_by_name(request, "EMBED")
            text = pb_utils.get_input_tensor_by_name(request, "TEXT")
            text_len = -1 if text is None else len(text.as_numpy().reshape(-1)[0])
            if token < 0:
                responses.append(_error(f"TOKEN must be >= 0, got {token} (sequence {corr})"))
                if flags & END:
                    self.state.pop(corr, None)
                continue
            if flags & START:
                self.state[corr] = {
                    "count": 0,
                    "embed_sum": float(embed.as_numpy().sum()) if embed is not None else 0.0,
                }
            st = self.state.get(corr)
            if st is None:
                responses.append(_error(f"unknown sequence {corr}: no START seen by the model"))
                continue
            st["count"] += 1
            if flags & END:
                del self.state[corr]
            out = {
                "BATCH_SIZE": np.array([n], dtype=np.int64),
                "COUNT": np.array([st["count"]], dtype=np.int64),
                "CORRID": np.array([corr if isinstance(corr, int) else -1], dtype=np.int64),
                "FLAGS": np.array([flags], dtype=np.int64),
                "EXEC_ID": np.array([self.exec_id], dtype=np.int64),
                "LIVE": np.array([len(self.state)], dtype=np.int64),
                "EMBED_SUM": np.array([st["embed_sum"]], dtype=np.float32),
                "TEXT_LEN": np.array([text_len], dtype=np.int64),
            }
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()]))
        return responses
