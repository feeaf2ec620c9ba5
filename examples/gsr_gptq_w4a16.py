"""GSR + GPTQ W4A16 on a model, with WikiText-2 perplexity before and after.

    python examples/gsr_gptq_w4a16.py                      # the default model
    python examples/gsr_gptq_w4a16.py --ppl-windows 20 --output out/smollm2-gsr-w4a16

Everything a recipe needs is the two modifiers below: GSRModifier fuses the grouped
sequency-Walsh rotation into the weights, then GPTQ quantizes the rotated weights
(4-bit symmetric integers in groups of `--group-size`, activations in 16 bit).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

import gsr_plugin  # noqa: F401  (registers GSRModifier and the sequency-walsh type)
from gsr_plugin import GSRModifier
from gsr_plugin.eval.data import calibration_windows, wikitext2_test_text
from gsr_plugin.eval.models import resolve_model
from gsr_plugin.eval.perplexity import perplexity


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="hub id, directory or 'default' (SmolLM2-135M-Instruct)")
    parser.add_argument("--output", default=None, help="where to save the checkpoint (default: a temporary directory)")
    parser.add_argument("--group-size", type=int, default=64, help="GPTQ group (64: SmolLM2's hidden 576 = 9 x 64)")
    parser.add_argument("--block-size", type=int, default=None, help="GSR block (default: head_dim)")
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=5, help="first N 2048-token windows of the test stream")
    parser.add_argument("--data-dir", default=None, help="directory laid out like shared/data (default: $GSR_DATA_DIR, ../shared/data)")
    args = parser.parse_args(argv)

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    stream = tokenizer(wikitext2_test_text(args.data_dir), return_tensors="pt").input_ids
    before = perplexity(model, stream, max_windows=args.ppl_windows)

    windows = calibration_windows(tokenizer, args.calib_samples, args.calib_len, data_dir=args.data_dir)
    dataset = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    w4 = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=args.group_size)
    recipe = [
        GSRModifier(block_size=args.block_size),
        GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=w4)}, ignore=["lm_head"]),
    ]
    output = args.output or tempfile.mkdtemp(prefix="gsr-w4a16-")
    start = time.perf_counter()
    oneshot(
        model=model,
        processor=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=args.calib_samples,
        max_seq_length=args.calib_len,
        output_dir=output,
        save_compressed=True,
    )
    seconds = time.perf_counter() - start
    reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    after = perplexity(reloaded, stream, max_windows=args.ppl_windows)

    print(f"\nWikiText-2 perplexity, {args.model}, first {before.windows} windows of 2048 tokens")
    print("| model | PPL |\n|---|---|")
    print(f"| float32 | {before.ppl:.3f} |")
    print(f"| GSR + GPTQ W4A16 g{args.group_size} (reloaded from {output}) | {after.ppl:.3f} |")
    print(f"quantization took {seconds:.0f}s (calibration {args.calib_samples} x {args.calib_len})")
    return {"fp": before.ppl, "quantized": after.ppl, "output": output, "seconds": seconds}


if __name__ == "__main__":
    main()
