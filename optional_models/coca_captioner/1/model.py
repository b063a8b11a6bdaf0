"""Triton Python-backend entry point of coca_captioner: the model is serving/models/captioner.py."""
from serving.models import entry_point

TritonPythonModel = entry_point("serving.models.captioner", "CaptionerModel")
