"""Benchmarks that print ratios measured in one run: INT4 kernels (``kernels``), the serving engine
(``engine``) and the Hugging Face baselines both compare against (``hf``), timed with ``timing`` (CUDA
graphs, CPU medians and the one copy-bandwidth ceiling)."""
