"""XLA FFI bindings of the CUDA kernels in kernels/ (see bindings/cuda.py)."""
