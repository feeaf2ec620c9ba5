"""Runs inside the vLLM environment (scripts/vllm_env.sh), not in gsr-plugin's: it
imports only the standard library, torch and vLLM.

    python vllm_worker.py REQUEST.json RESULT.json    # serve and score
    python vllm_worker.py --probe RESULT.json         # which kernels this vLLM has here

REQUEST: {"checkpoint", "dtype", "prompts": [str], "references": [str], "max_tokens",
"max_model_len", optional "lora": {"path", "rank"}} (a LoRA adapter served with
``enable_lora=True`` and a ``LoRARequest`` on every request). RESULT: for each prompt the prompt and greedy token ids; for each
reference text its token ids and the log-probability vLLM gives every token after the
first (``prompt_logprobs``, computed from the raw logits).

Optional, for ``gsr eval --engine vllm``: "sequences": [[token id]] (scored as they
are, no tokenizer: RESULT "sequences" holds each one's log-probabilities after its
first token); "speed": {"prompt_ids", "decode_tokens", "repeats"} (RESULT "speed":
the best time of a prefill of ``prompt_ids`` alone and of the same prompt followed
by ``decode_tokens`` greedy tokens, as tokens per second; batch 1). With either, the
engine runs without prefix caching (a cached prefix would skip the work measured).
RESULT "peak_rss_bytes": the peak resident memory of this process and every process
under it (vLLM's engine), at the end.

The probe loads vLLM's kernel library the way vLLM does on this processor (on x86
CPUs one of three builds, chosen by torch's instruction-set checks) and reports which
of the ops in ``PROBED_OPS`` it registered.

``GSR_VLLM_CPU_ISA=avx2`` makes vLLM load its AVX2 build even where AVX-512 is present,
as it does on a processor without AVX-512 (AVX2 code runs on both), so that both kinds
of machine can be checked on either. It is applied at import, so the engine processes
vLLM spawns (which re-run this file as ``__mp_main__``) see it too.
"""

import json
import os
import sys
import time

# ops whose presence decides what vLLM can run on CPU (vllm-cpu 0.32, x86)
PROBED_OPS = (
    "cpu_gemm_wna16",  # int4 weight-only linears (compressed-tensors W4A16, GPTQ)
    "int4_scaled_mm_cpu",  # int4 weights as W4A8 on AMX (VLLM_CPU_INT4_W4A8=1)
    "onednn_scaled_mm",  # int8 W8A8 linears through oneDNN
    "int8_scaled_mm_with_quant",  # int8 W8A8 linears on AMX
    "onednn_mm",  # unquantized bf16/fp16 linears through oneDNN
    "cpu_attention_with_kv_cache",  # paged attention on CPU
)


def _apply_isa_override() -> None:
    isa = os.environ.get("GSR_VLLM_CPU_ISA", "").lower()
    if not isa:
        return
    if isa != "avx2":
        raise SystemExit(f"GSR_VLLM_CPU_ISA={isa!r}: only 'avx2' can be simulated (unset it to use the processor's own)")
    import torch

    for name in dir(torch.cpu):  # what vLLM's build choice and kernel dispatch read
        if name.startswith(("_is_avx512", "_is_amx")):
            setattr(torch.cpu, name, lambda: False)


if __name__ in ("__main__", "__mp_main__"):  # not when gsr-plugin imports PROBED_OPS
    _apply_isa_override()


def probe() -> dict:
    import torch
    import vllm
    from vllm.platforms import current_platform

    platform = current_platform.device_type
    build = None
    if current_platform.is_cpu():
        current_platform.import_kernels()
        build = "_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512" if torch.cpu._is_avx512_supported() else "_C_AVX2"
    ops = getattr(torch.ops, "_C", None)
    return {
        "vllm": vllm.__version__,
        "platform": platform,
        "build": build,
        "isa": {
            "avx2": bool(torch.cpu._is_avx2_supported()),
            "avx512": bool(torch.cpu._is_avx512_supported()),
            "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
            "amx": bool(torch.cpu._is_amx_tile_supported()),
        },
        "simulated": os.environ.get("GSR_VLLM_CPU_ISA") or None,
        "ops": {name: bool(ops is not None and hasattr(ops, name)) for name in PROBED_OPS},
    }


def run(request: dict) -> tuple[dict, object]:
    from vllm import LLM, SamplingParams

    lora = request.get("lora")
    extra, lora_request = {}, None
    if lora:
        from vllm.lora.request import LoRARequest

        # vLLM takes max_lora_rank from a fixed list: the smallest that holds the adapter
        extra = {"enable_lora": True, "max_loras": 1,
                 "max_lora_rank": next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= lora["rank"])}
        lora_request = LoRARequest("gsr-lowrank", 1, lora["path"])
    if request.get("sequences") or request.get("speed"):
        extra["enable_prefix_caching"] = False
    start = time.perf_counter()
    llm = LLM(
        model=request["checkpoint"],
        dtype=request["dtype"],
        max_model_len=request["max_model_len"],
        enforce_eager=True,
        seed=0,
        **extra,
    )
    loaded = time.perf_counter() - start
    # texts are cut to the context (a model may have fewer positions than they need)
    tokenizer, context = llm.get_tokenizer(), request["max_model_len"]

    def fit(text: str, room: int) -> dict:
        return {"prompt_token_ids": tokenizer(text).input_ids[: context - room]}

    greedy = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"])
    start = time.perf_counter()
    generations = [
        {"prompt_ids": list(out.prompt_token_ids), "ids": list(out.outputs[0].token_ids), "text": out.outputs[0].text}
        for out in llm.generate([fit(p, request["max_tokens"]) for p in request["prompts"]], greedy, use_tqdm=False,
                                lora_request=lora_request)
    ] if request["prompts"] else []
    generate_seconds = time.perf_counter() - start
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    references = []
    # one text per call: with a LoRA, vllm-cpu 0.32 intermittently fails on prompt_logprobs
    # of a batch of several sequences ("einsum(): subscript b has size 2 ... size 45")
    outputs = [llm.generate([fit(text, 1)], scoring, use_tqdm=False, lora_request=lora_request)[0]
               for text in request["references"]]
    for out in outputs:
        ids = list(out.prompt_token_ids)
        logprobs = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
        references.append({"ids": ids, "logprobs": logprobs})
    import vllm

    result = {
        "vllm": vllm.__version__,
        "load_seconds": round(loaded, 1),
        "generate_seconds": round(generate_seconds, 3),
        "generations": generations,
        "references": references,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("VLLM_CPU", "GSR_VLLM_CPU_ISA"))},
    }
    if request.get("sequences"):
        start = time.perf_counter()
        result["sequences"] = _score(llm, request["sequences"], scoring, lora_request)
        result["score_seconds"] = round(time.perf_counter() - start, 3)
    if request.get("speed"):
        result["speed"] = _speed(llm, lora_request, **request["speed"])
    result["peak_rss_bytes"] = _peak_rss()
    return result, llm


def _score(llm, sequences, scoring, lora_request) -> list[list[float]]:
    """Each sequence's token log-probabilities after its first token; in one batch,
    or one at a time with a LoRA (see above)."""
    prompts = [{"prompt_token_ids": list(ids)} for ids in sequences]
    if lora_request is None:
        outputs = llm.generate(prompts, scoring, use_tqdm=False)
    else:
        outputs = [llm.generate([p], scoring, use_tqdm=False, lora_request=lora_request)[0] for p in prompts]
    out = []
    for ids, output in zip(sequences, outputs):
        out.append([output.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))])
    return out


def _speed(llm, lora_request, prompt_ids, decode_tokens=128, repeats=3) -> dict:
    """Best-of-``repeats`` seconds of a prefill (one token generated) and of a prefill
    followed by ``decode_tokens`` greedy tokens (end of text ignored), one request."""
    from vllm import SamplingParams

    prompt = [{"prompt_token_ids": list(prompt_ids)}]

    def best(params) -> float:
        llm.generate(prompt, params, use_tqdm=False, lora_request=lora_request)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            llm.generate(prompt, params, use_tqdm=False, lora_request=lora_request)
            times.append(time.perf_counter() - start)
        return min(times)

    prefill = best(SamplingParams(temperature=0.0, max_tokens=1))
    both = best(SamplingParams(temperature=0.0, max_tokens=decode_tokens, ignore_eos=True))
    decode = max(both - prefill, 1e-9)
    return {"prompt_tokens": len(prompt_ids), "decode_tokens": decode_tokens, "repeats": repeats,
            "prefill_seconds": round(prefill, 4), "decode_seconds": round(decode, 4),
            "prefill_tokens_per_second": len(prompt_ids) / prefill,
            "decode_tokens_per_second": (decode_tokens - 1) / decode}


def _peak_rss() -> int:
    """Sum of the peak resident memory (VmHWM) of this process and its descendants."""
    def children(pid: int) -> list[int]:
        out = []
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    out += [int(c) for c in f.read().split()]
        except OSError:
            pass
        return out

    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo += children(pid)
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            pass
    return total


def _write(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if sys.argv[1] == "--probe":
        _write(sys.argv[2], probe())
        sys.exit(0)
    request_path, result_path = sys.argv[1], sys.argv[2]
    with open(request_path) as f:
        request = json.load(f)
    result, llm = run(request)
    _write(result_path, result)
    # vLLM's own teardown at interpreter exit can abort (seen: SIGABRT after a complete
    # run): stop the engine explicitly, then leave without the interpreter's teardown.
    # The caller also ends this process group, so no engine process outlives us.
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as error:  # the result is written; report and go on
        print(f"engine shutdown: {error!r}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
