"""One process of the DeepSpeed test (torchrun, 2 processes, DS_ACCELERATOR=cpu, gloo): the patched tiny
Qwen2-VL under ZeRO stage STAGE, trained STEPS steps (torch AdamW as DeepSpeed's client optimizer, no
clipping) on this rank's half of each batch through the fused loss, which reads the lm_head's weight inside
its forward. Rank 0 writes the full weights to OUT. Usage: zero_child DATA OUT STEPS STAGE"""

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from clinkd.train.arguments import exit_launched_process  # noqa: E402
from tests.distributed.common import batches, model  # noqa: E402

data_file, out, steps, stage = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
config = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 0.0,
    "zero_optimization": {"stage": stage},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 10**6,
}
student = model()
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=config)
head = engine.module.lm_head
if stage == 3:
    assert head.weight.numel() == 0, "ZeRO-3 keeps a placeholder outside the forward"
    from clinkd.patch import lm_head_operands

    try:  # the misuse: the fused loss's operands read outside the head's forward
        lm_head_operands(torch.zeros(2, 64), head)
        raise SystemExit("a partitioned lm_head weight was accepted outside its forward")
    except ValueError as e:
        assert "0 elements" in str(e) and "ZeRO-3" in str(e) and "call_in_forward" in str(e), e
        print("misuse refused:", str(e)[:80], flush=True)
losses = []
for _step, halves in zip(range(steps), batches(data_file, world)):
    loss = engine(**halves[rank]).loss
    engine.backward(loss)
    engine.step()
    losses.append(float(loss))
params = list(engine.module.named_parameters())
with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None, enabled=stage == 3):
    state = {name: p.detach().clone().contiguous() for name, p in params}
gathered = [None] * world
dist.all_gather_object(gathered, losses)
if rank == 0:
    save_file(state, out)
    print("losses", gathered, flush=True)
exit_launched_process(0)  # as clinkd train ends: a group left to interpreter teardown can abort
