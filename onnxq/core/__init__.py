"""The shared vocabulary: what every layer above may import, and which imports nothing of onnxq above it.

Errors, the ONNX IR helpers, integer types and encodings, presets, model-family recipes, the
options object, output files, memory, and the KV-cache step graphs' inputs.
"""
