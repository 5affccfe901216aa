"""Child process of the RCT resume tests: run a config's stages and die (SIGKILL, no cleanup) at a chosen
moment. Usage: kill_child CONFIG journal ROUND APPEND [torn]   killed at the APPEND-th batch written to round
ROUND's journal (after it, or with ``torn`` half-way through writing it);
kill_child CONFIG step ROUND STEP   killed right after optimizer step STEP of round ROUND's training."""

import os
import signal
import sys

from transformers import TrainerCallback

import clinkd.rct.round as round_module
from clinkd.train import load_config, run_training

config_path, kind, kill_round, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torn = len(sys.argv) > 5 and sys.argv[5] == "torn"
appends = {}
real_append = round_module._append


def append(path, entry):
    if path.parent.name == f"round-{kill_round}":
        appends[path] = appends.get(path, 0) + 1
        if appends[path] == count:
            if torn:
                import json

                with open(path, "a") as f:
                    f.write(json.dumps(entry)[:200])
                    f.flush()
                    os.fsync(f.fileno())
            else:
                real_append(path, entry)
            os.kill(os.getpid(), signal.SIGKILL)
    real_append(path, entry)


class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if os.path.basename(args.output_dir) == f"round-{kill_round}" and state.global_step == count:
            os.kill(os.getpid(), signal.SIGKILL)


if kind == "journal":
    round_module._append = append
run_training(load_config(config_path), progress=False, callbacks=[Kill()] if kind == "step" else None)
print("finished without being killed", flush=True)
