"""Weight quantization: group-wise INT4 storage and kernels (``int4``), AWQ-style scales (``awq``)."""
