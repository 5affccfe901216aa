"""One process of a multi-process run (launched by torchrun): ``clinkd train`` as typed, optionally killed
(SIGKILL, every rank) right after optimizer step KILL_STEP of stage KILL_STAGE.
Usage: child CONFIG [KILL_STAGE KILL_STEP]"""

import os
import signal
import sys

from transformers import TrainerCallback

from clinkd.train import load_config, run_training

config_path = sys.argv[1]
callbacks = []
if len(sys.argv) > 3:
    kill_stage, kill_step = sys.argv[2], int(sys.argv[3])

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if os.path.basename(args.output_dir) == kill_stage and state.global_step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks.append(Kill())
run_training(load_config(config_path), progress=False, callbacks=callbacks)
print(f"rank {os.environ.get('RANK')} finished", flush=True)
