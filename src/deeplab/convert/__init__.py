"""Importers: official TensorFlow DeepLab TFLite files, torchvision and timm state dicts."""
