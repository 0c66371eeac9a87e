"""Benchmarks that print ratios measured in one run: INT4 kernels (``kernels``), the serving engine
(``engine``) and the Hugging Face baselines both compare against (``hf``)."""
