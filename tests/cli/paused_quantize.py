"""Runs ``gsr`` with a pause at one point of ``gsr quantize``, for the fault tests
(tests/cli/test_quantize.py): they signal this process there, or run a second
``gsr quantize`` meanwhile. Nothing else is changed.

    python paused_quantize.py gptq|save MARKER GO -- gsr arguments...

At the pause it writes MARKER and waits until GO exists (a test that signals it never
creates GO). ``gptq``: GPTQ is about to compress the first layer's modules; ``save``: the
first weights file is half written.
"""

import sys
import time
from pathlib import Path

where, marker, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
argv = sys.argv[sys.argv.index("--") + 1:]


def pause() -> None:
    marker.write_text("paused")
    while not go.exists():
        time.sleep(0.05)


if where == "gptq":
    from llmcompressor.modifiers.gptq.base import GPTQModifier

    compress = GPTQModifier.compress_modules

    def compress_modules(self, *args, **kwargs):
        pause()
        return compress(self, *args, **kwargs)

    GPTQModifier.compress_modules = compress_modules
elif where == "save":
    import transformers.modeling_utils as modeling_utils

    save_file = modeling_utils.safe_save_file

    def safe_save_file(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"\0" * 4096)  # half written
        pause()
        return save_file(tensors, filename, *args, **kwargs)

    modeling_utils.safe_save_file = safe_save_file
else:
    raise SystemExit(f"unknown pause point {where!r}")

from gsr_plugin.cli.main import main  # noqa: E402

sys.exit(main(argv))
