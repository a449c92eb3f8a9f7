"""Models: a backbone registry with one front door (`create_model(arch=...)`), compiling, and device setup.

Importing this package registers camid's custom layers, so `keras.models.load_model` reads camid's .keras files.
"""
from camid.models.devices import configure_devices
from camid.models.layers import BackbonePreprocessing, HighPassResiduals, PredictionErrors
from camid.models.registry import BACKBONES, Backbone, compile_model, create_model, get_backbone, list_backbones

__all__ = ["BACKBONES", "Backbone", "BackbonePreprocessing", "HighPassResiduals", "compile_model",
           "PredictionErrors", "configure_devices", "create_model", "get_backbone", "list_backbones"]
