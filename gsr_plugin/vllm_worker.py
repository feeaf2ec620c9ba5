"""Runs inside the vLLM environment (scripts/vllm_env.sh), not in gsr-plugin's: it
imports only the standard library and vLLM.

    python vllm_worker.py REQUEST.json RESULT.json

REQUEST: {"checkpoint", "dtype", "prompts": [str], "references": [str], "max_tokens",
"max_model_len"}. RESULT: for each prompt the prompt and greedy token ids; for each
reference text its token ids and the log-probability vLLM gives every token after the
first (``prompt_logprobs``, computed from the raw logits).
"""

import json
import os
import sys
import time


def run(request: dict) -> tuple[dict, object]:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=request["checkpoint"],
        dtype=request["dtype"],
        max_model_len=request["max_model_len"],
        enforce_eager=True,
        seed=0,
    )
    loaded = time.perf_counter() - start
    greedy = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"])
    generations = [
        {"prompt_ids": list(out.prompt_token_ids), "ids": list(out.outputs[0].token_ids), "text": out.outputs[0].text}
        for out in llm.generate(request["prompts"], greedy, use_tqdm=False)
    ]
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    references = []
    for out in llm.generate(request["references"], scoring, use_tqdm=False):
        ids = list(out.prompt_token_ids)
        logprobs = [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
        references.append({"ids": ids, "logprobs": logprobs})
    import vllm

    return {
        "vllm": vllm.__version__,
        "load_seconds": round(loaded, 1),
        "generations": generations,
        "references": references,
        "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")},
    }, llm


if __name__ == "__main__":
    request_path, result_path = sys.argv[1], sys.argv[2]
    with open(request_path) as f:
        request = json.load(f)
    result, llm = run(request)
    with open(result_path, "w") as f:
        json.dump(result, f)
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
