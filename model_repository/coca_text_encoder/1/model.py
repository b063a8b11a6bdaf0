"""Triton Python-backend entry point of coca_text_encoder: the model is serving/models/text_encoder.py."""
from serving.models import entry_point

TritonPythonModel = entry_point("serving.models.text_encoder", "TextEncoderModel")
