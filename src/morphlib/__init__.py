"""morphlib: runtime FP16 <-> INT4 layer morphing for Hugging Face causal LMs.

This package imports nothing on purpose: import the module you need
(``morphlib.models``, ``morphlib.morph``, ...). That keeps ``import morphlib`` instant and lets
the stale-results check see exactly which modules a chapter depends on.
"""

__version__ = "0.1.0"
