"""`hfpg ...` as a subprocess the fault-injection tests can kill -9 at a chosen moment.

HFPG_FAULT_SLOW_SAVE=<seconds> makes every safetensors file write pause that long after the file is written, so a
checkpoint is caught half-written (some files there, the rest not) by a kill from outside. Nothing else changes.
"""

import os
import sys
import time

pause = float(os.environ.get("HFPG_FAULT_SLOW_SAVE", "0"))
if pause:
    import safetensors.torch

    _save_file = safetensors.torch.save_file

    def slow_save_file(*args, **kwargs):
        out = _save_file(*args, **kwargs)
        time.sleep(pause)
        return out

    safetensors.torch.save_file = slow_save_file  # patched before accelerate / transformers / hfpg import it

from hfpg.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
