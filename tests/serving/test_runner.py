"""gsr_plugin.serving.runner: vLLM in its own process group, bounded in time. A stand-in
for vLLM's environment (a python that runs a fake worker) hangs or dies, with an engine
process of its own, as vLLM can; the runner stops and reaps them all and says which."""

import json
import os
import signal
import sys
import time

import pytest

from gsr_plugin.cli.main import main
from gsr_plugin.serving.agreement import PROMPTS, REFERENCES
from gsr_plugin.serving.runner import MAX_MODEL_LEN, VllmDied, VllmTimedOut, max_model_len, run_vllm

FAKE_WORKER = """
import json, os, signal, subprocess, sys, time
if sys.argv[2] == "--probe":  # the kernels of a full AVX-512 build
    ops = ["cpu_gemm_wna16", "onednn_scaled_mm", "int4_scaled_mm_cpu", "int8_scaled_mm_with_quant"]
    json.dump({"platform": "cpu", "build": "_C", "isa": {"avx2": True, "avx512": True}, "ops": dict.fromkeys(ops, True),
               "vllm": "fake"}, open(sys.argv[3], "w"))
    sys.exit(0)
request = json.load(open(sys.argv[2]))
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # an engine process
open(os.environ["FAKE_VLLM_PIDS"], "w").write(json.dumps({"worker": os.getpid(), "engine": engine.pid,
                                                          "max_model_len": request["max_model_len"]}))
if os.environ["FAKE_VLLM"] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(300)
"""


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """fake_vllm(mode) -> the python of a stand-in vLLM environment that hangs or dies."""
    worker = tmp_path / "fake_worker.py"
    worker.write_text(FAKE_WORKER)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{worker}" "$@"\n')
    python.chmod(0o755)
    pids = tmp_path / "pids.json"
    monkeypatch.setenv("FAKE_VLLM_PIDS", str(pids))

    def make(mode: str):
        monkeypatch.setenv("FAKE_VLLM", mode)
        return python

    make.pids = lambda: json.loads(pids.read_text())
    return make


def gone(pid: int) -> bool:
    """No such process, or only its exit status left (a zombie of another parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return gone(pid)


def test_a_hanging_vllm_is_stopped_with_its_engine_processes(tiny_checkpoints, fake_vllm):
    start = time.monotonic()
    with pytest.raises(VllmTimedOut, match=r"did not answer within 3 s.*stopped"):
        run_vllm(str(tiny_checkpoints["llama"]), "bfloat16", PROMPTS, REFERENCES, 4, fake_vllm("hang"), timeout=3)
    assert time.monotonic() - start < 30
    pids = fake_vllm.pids()
    assert wait_gone(pids["worker"]) and wait_gone(pids["engine"]), pids


def test_a_vllm_that_dies_is_reported_with_the_signal(tiny_checkpoints, fake_vllm):
    with pytest.raises(VllmDied, match="killed by SIGKILL"):
        run_vllm(str(tiny_checkpoints["llama"]), "bfloat16", PROMPTS, REFERENCES, 4, fake_vllm("die"), timeout=60)
    assert wait_gone(fake_vllm.pids()["engine"])


@pytest.mark.parametrize("mode, code, words", [("hang", 4, "did not answer within 2 s"), ("die", 3, "killed by SIGKILL")])
def test_serve_check_exit_status_says_which(tiny_checkpoints, fake_vllm, capsys, mode, code, words):
    argv = ["serve-check", str(tiny_checkpoints["llama"]), "--device", "cpu", "--vllm-python", str(fake_vllm(mode)),
            "--timeout", "2"]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert wait_gone(fake_vllm.pids()["engine"])


def test_vllm_is_asked_for_no_more_positions_than_the_model_has(tiny_checkpoints, default_model_dir, fake_vllm):
    """The tiny models have 256 positions; asking vLLM for 512 fails inside it."""
    assert max_model_len(tiny_checkpoints["llama"]) == 256
    assert max_model_len(default_model_dir) == MAX_MODEL_LEN
    with pytest.raises(VllmDied):
        run_vllm(str(tiny_checkpoints["llama"]), "bfloat16", PROMPTS, REFERENCES, 4, fake_vllm("die"))
    assert fake_vllm.pids()["max_model_len"] == 256


def test_an_interrupt_stops_vllm_too(tiny_checkpoints, fake_vllm):
    """SIGTERM to the check (raised as Interrupted by the command) reaps the worker group."""
    from gsr_plugin.cli.faults import Interrupted, stop_signals_raise

    def stop_soon(signum, frame):
        os.kill(os.getpid(), signal.SIGTERM)

    with stop_signals_raise(), pytest.raises(Interrupted):
        previous = signal.signal(signal.SIGALRM, stop_soon)
        signal.alarm(3)
        try:
            run_vllm(str(tiny_checkpoints["llama"]), "bfloat16", PROMPTS, REFERENCES, 4, fake_vllm("hang"), timeout=60)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    pids = fake_vllm.pids()
    assert wait_gone(pids["worker"]) and wait_gone(pids["engine"]), pids
