"""``gsr serve-check``: does vLLM serve a checkpoint, and does it compute what
transformers computes on the same checkpoint?

The command: refuse what vLLM cannot run here (``gsr_plugin.serving.rules``), run vLLM on
fixed prompts and reference texts (``gsr_plugin.serving.runner``), run transformers on
the same token ids and compare (``gsr_plugin.serving.agreement``), and report.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gsr_plugin.checkpoint import check_checkpoint
from gsr_plugin.serving.agreement import PROMPTS, REFERENCES, Tolerance, compare_outputs, run_transformers
from gsr_plugin.serving.rules import refuse_unservable
from gsr_plugin.serving.runner import VLLM_TIMEOUT_SECONDS, run_vllm, vllm_python

__all__ = ["ServeReport", "serve_check"]


@dataclass
class ServeReport:
    checkpoint: str
    dtype: str
    tolerance: Tolerance
    prompts: list[dict] = field(default_factory=list)
    references: list[dict] = field(default_factory=list)
    vllm: str = ""
    reference_dtype: str = "float32"
    notes: list[str] = field(default_factory=list)
    kernels: dict | None = None

    @property
    def ok(self) -> bool:
        return all(p["ok"] for p in self.prompts) and all(r["ok"] for r in self.references)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        return out

    def text(self) -> str:
        t = self.tolerance
        lines = [
            f"vLLM {self.vllm} ({self.dtype}) vs transformers ({self.reference_dtype} reference) on {self.checkpoint}",
            f"tolerance: {t.noise_factor} x transformers' own {self.dtype}-vs-{self.reference_dtype} difference "
            f"(at least {t.floor} nats); greedy divergences allowed where the reference's preference is below the "
            "allowed worst-token difference",
            "",
            "| prompt | tokens equal | first divergence | gap there (nats) | result |",
            "|---|---|---|---|---|",
        ]
        for p in self.prompts:
            where = "-" if p["diverged_at"] is None else str(p["diverged_at"])
            gap = "-" if p["gap"] is None else f"{p['gap']:.3f}"
            lines.append(
                f"| {p['prompt'][:32]!r} | {p['equal']}/{p['compared']} | {where} | {gap} | {'ok' if p['ok'] else 'MISMATCH'} |"
            )
        lines += [
            "",
            f"| reference | tokens | vLLM max diff (allowed) | vLLM mean diff (allowed) | transformers {self.dtype} max / mean | result |",
            "|---|---|---|---|---|---|",
        ]
        for i, r in enumerate(self.references):
            lines.append(
                f"| {i} | {r['tokens']} | {r['max_abs_diff']:.3f} ({r['allowed_max']:.3f}) | "
                f"{r['mean_abs_diff']:.3f} ({r['allowed_mean']:.3f}) | {r['noise_max']:.3f} / {r['noise_mean']:.3f} | "
                f"{'ok' if r['ok'] else 'MISMATCH'} |"
            )
        lines += [f"note: {n}" for n in self.notes]
        lines += ["", "serve-check: " + ("PASS" if self.ok else "FAIL")]
        return "\n".join(lines)


def _has_int4_weight_only(checkpoint: str) -> bool:
    qconfig = json.loads((Path(checkpoint) / "config.json").read_text()).get("quantization_config") or {}
    if qconfig.get("quant_method") == "gptq":
        return qconfig.get("bits") == 4
    return any(
        (g.get("weights") or {}).get("num_bits") == 4 and not g.get("input_activations")
        for g in (qconfig.get("config_groups") or {}).values()
    )


def serve_check(
    checkpoint: str | Path,
    dtype: str = "bfloat16",
    reference_dtype: str = "float32",
    max_tokens: int = 16,
    tolerance: Tolerance = Tolerance(),
    device: str = "cpu",
    python: Path | None = None,
    timeout: float = VLLM_TIMEOUT_SECONDS,
) -> ServeReport:
    """Refuse what vLLM cannot run here (``ValueError`` naming the setting or machine
    that would; on CPU after probing this processor's kernels), else generate and score
    with both and compare."""
    check_checkpoint(checkpoint)  # before vLLM or its environment is touched
    checkpoint = str(checkpoint)
    python = python or vllm_python()
    kernels = refuse_unservable(checkpoint, device, python)
    vllm_result = run_vllm(checkpoint, dtype, PROMPTS, REFERENCES, max_tokens, python, timeout)
    hf_result = run_transformers(checkpoint, reference_dtype, vllm_result, max_tokens, noise_dtype=dtype)
    prompts, references = compare_outputs(vllm_result, hf_result, tolerance)
    report = ServeReport(checkpoint, dtype, tolerance, prompts, references, vllm_result["vllm"], reference_dtype)
    if kernels is not None:
        report.kernels = asdict(kernels)
        report.notes.append(f"vLLM kernels: {kernels.describe()}")
    env = vllm_result.get("env", {})
    if env.get("VLLM_CPU_INT4_W4A8") == "0" and _has_int4_weight_only(checkpoint):
        report.notes.append("VLLM_CPU_INT4_W4A8=0: int4 weights run as true W4A16 (vLLM's default on AMX CPUs is W4A8)")
    return report


if __name__ == "__main__":  # pragma: no cover - debugging aid
    print(serve_check(sys.argv[1]).text())
