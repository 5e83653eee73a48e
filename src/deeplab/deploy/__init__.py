"""Running a trained model fast and elsewhere: the PyTorch fast path, runtimes (ONNX Runtime, OpenVINO, TF Lite)
behind one callable, exports, the TF Lite writer, int8 quantization and the runtime benchmark. Imports models and
data only."""
