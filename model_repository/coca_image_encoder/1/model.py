"""Triton Python-backend entry point of coca_image_encoder: the model is serving/models/image_encoder.py."""
from serving.models import entry_point

TritonPythonModel = entry_point("serving.models.image_encoder", "ImageEncoderModel")
