"""ONNX export of backbone + adapter for edge devices: merged or swappable, optionally int8."""
