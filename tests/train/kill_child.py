"""Child process of the resume test: run a config's stages and die (SIGKILL, no cleanup) right after
optimizer step KILL_STEP of stage KILL_STAGE. Usage: kill_child CONFIG KILL_STAGE KILL_STEP"""

import os
import signal
import sys

from transformers import TrainerCallback

from clinkd.train import load_config, run_training

config_path, kill_stage, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3])


class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if os.path.basename(args.output_dir) == kill_stage and state.global_step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)


run_training(load_config(config_path), progress=False, callbacks=[Kill()])
print("finished without being killed", flush=True)
