"""Serving: what vLLM runs on this machine and whether it computes what transformers
computes (``check``: ``gsr serve-check``), and the script that runs inside vLLM's own
environment (``vllm_worker``: standard library, torch and vLLM only)."""
