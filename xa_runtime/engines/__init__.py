"""ONNX -> TensorRT: engine build (build.py), LoRA refit of engines (refit.py), and the engine
cache's manifests and profiles (manifest.py, pure Python). Running engines is the tensorrt
backend's (xa_runtime.runtime.backends.tensorrt).

Nothing here imports tensorrt at package import: build.py imports it at module import and is
imported only by xa-build-engines and the tensorrt backend; refit.py computes its refit plan
with onnx/numpy and touches tensorrt only inside the refitter.
"""
