"""Triton Python-backend entry point of coca_text_decoder: the model is serving/models/text_decoder.py."""
from serving.models import entry_point

TritonPythonModel = entry_point("serving.models.text_decoder", "TextDecoderModel")
