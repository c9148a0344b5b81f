"""ONNX -> TensorRT: engine build (build.py), execution (run.py), LoRA refit (refit.py), and the
engine cache's manifests and profiles (manifest.py, pure Python).

Nothing here imports tensorrt at package import: build.py and run.py import it at module
import and are imported only when the tensorrt backend or xa-build-engines is used; refit.py
computes its refit plan with onnx/numpy and touches tensorrt only inside the refitter.
"""
