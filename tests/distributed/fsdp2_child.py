"""One process of the FSDP2 test (torchrun, 2 processes, gloo on the CPU): the patched tiny Qwen2-VL with
every decoder layer and vision block sharded by ``fully_shard`` (and the lm_head as its own unit with
``head``), trained STEPS AdamW steps on this rank's half of each batch through the fused loss. Rank 0
writes the full weights to OUT. Usage: fsdp2_child DATA OUT STEPS [head]"""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from clinkd.train.arguments import exit_launched_process
from tests.distributed.common import batches, model

data_file, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
head_unit = len(sys.argv) > 4 and sys.argv[4] == "head"
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
student = model()
mesh = init_device_mesh("cpu", (world,))
for layer in student.model.language_model.layers:
    fully_shard(layer, mesh=mesh)
for block in student.model.visual.blocks:
    fully_shard(block, mesh=mesh)
if head_unit:
    fully_shard(student.lm_head, mesh=mesh)
fully_shard(student, mesh=mesh)
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
losses = []
for _step, halves in zip(range(steps), batches(data_file, world)):
    loss = student(**halves[rank]).loss
    loss.backward()  # FSDP2 averages the gradients over the ranks: the mean of the halves' losses
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.detach())
state = {k: v.full_tensor().contiguous() for k, v in student.state_dict().items()}
gathered = [None] * world
dist.all_gather_object(gathered, [float(x) for x in losses])
if rank == 0:
    save_file(state, out)
    print("losses", gathered, flush=True)
exit_launched_process(0)  # as clinkd train ends: a group left to interpreter teardown can abort
