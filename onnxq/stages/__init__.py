"""The stages of a quantization: export, rewrite and plan, calibrate, learn, round weights, emit, write.

They import the shared vocabulary (:mod:`onnxq.core`), the graph passes (:mod:`rewrites`), the plan
and calibration (:mod:`calib`); nothing here runs a model on a device.
"""
