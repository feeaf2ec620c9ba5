"""Quantization engines other than llm-compressor's oneshot that GSR feeds:
``optimum`` (Optimum's ``GPTQQuantizer`` and transformers' ``GPTQConfig``, both on the
gptqmodel backend)."""
