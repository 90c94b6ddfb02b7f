"""Benchmarks. Run each as a module from the repository root, e.g. `python -m bench.decode`.

Running `python bench/inspect.py` would put bench/ on sys.path, where inspect.py and onnx.py shadow
the standard library's inspect and the onnx package; `python -m bench.NAME` (or `python -P`) avoids that.
"""
