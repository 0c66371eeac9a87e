"""Which layers to swap: per-layer importance measures (``sensitivity``), layer-set strategies (``strategies``)."""
