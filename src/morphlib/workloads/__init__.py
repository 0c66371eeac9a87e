"""Serving workloads: request traces (``traces``) and KV-cache capacity arithmetic (``kvcache``)."""
