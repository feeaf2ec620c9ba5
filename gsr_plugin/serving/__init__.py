"""Serving with vLLM: what it serves on which processor and format (``rules``), running
it in its own environment (``runner``, which starts ``vllm_worker``: standard library,
torch and vLLM only), whether it computes what transformers computes (``agreement``),
and the ``gsr serve-check`` command that puts these together (``check``)."""
