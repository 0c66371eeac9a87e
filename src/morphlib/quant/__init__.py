"""Weight quantization: group-wise INT4 storage (``int4``) and its Triton kernels (``kernels``).

AWQ-style scales need a model's layers, so they live above ``structure``: ``morphlib.awq``."""
