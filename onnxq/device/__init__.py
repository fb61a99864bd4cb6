"""Where models run: ONNX Runtime sessions on CPU and the QNN EP's HTP backend, HTP context
binaries, the HTP's rules (``check``), generation, and packaging for onnxruntime-genai.
"""
