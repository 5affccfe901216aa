"""One process of a multi-process run (launched by torchrun): ``clinkd train`` as typed, optionally killed
(SIGKILL, every rank) right after optimizer step KILL_STEP of stage KILL_STAGE.
Usage: child CONFIG [KILL_STAGE KILL_STEP]"""

import os
import signal
import sys

from transformers import TrainerCallback

from clinkd.train import load_config, run_training
from clinkd.train.arguments import exit_launched_process

config_path = sys.argv[1]
if os.environ.get("CLINKD_TEST_ACCELERATE_STATE"):  # the state transformers makes alone, as in a user's own loop
    from clinkd.train import arguments

    arguments._own_state_is_set_up = lambda: False
callbacks = []
if len(sys.argv) > 3:
    kill_stage, kill_step = sys.argv[2], int(sys.argv[3])

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if os.path.basename(args.output_dir) == kill_stage and state.global_step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks.append(Kill())
if os.environ.get("CLINKD_TEST_SHOW_TEACHER"):  # say how the online teacher was placed
    from clinkd.train.trainer import ClinKDTrainer

    prepare = ClinKDTrainer._prepare_teacher

    def show(self):
        prepare(self)
        head = getattr(self.teacher, "module", self.teacher).get_output_embeddings()
        print(
            f"teacher {type(self.teacher).__name__} lm_head elements {head.weight.numel()}; student "
            f"{type(self.model_wrapped).__name__}, deepspeed {self.is_deepspeed_enabled}",
            flush=True,
        )

    ClinKDTrainer._prepare_teacher = show
if os.environ.get("CLINKD_TEST_SHOW_ENGINE"):  # say which engine wraps the student when training starts
    from clinkd.train.trainer import ClinKDTrainer

    compute = ClinKDTrainer.compute_loss

    def compute_and_show(self, model, inputs, *a, **k):
        if not getattr(self, "_shown", False):
            self._shown = True
            print(f"student {type(self.model_wrapped).__name__}", flush=True)
        return compute(self, model, inputs, *a, **k)

    ClinKDTrainer.compute_loss = compute_and_show
run_training(load_config(config_path), progress=False, callbacks=callbacks)
print(f"rank {os.environ.get('RANK')} finished", flush=True)
exit_launched_process(0)  # as clinkd train does
