"""Driver of the kill test: loads the store once, then runs one writer per command, each in a forked
child that dies by SIGKILL (no cleanup) where the command says.

Each line on stdin: ``FOLDER N SHARD CRASH_AT KILL_AFTER PACE``. The child fills FOLDER with the fake
pseudo-labels of N samples (``write_store``, shard size SHARD, batches of 2, sleeping PACE seconds per
batch) and kills itself at its CRASH_AT-th fsync/rename (0: never); with KILL_AFTER >= 0 the driver
kills it that many seconds after the fork. The driver answers each line with the child's fate:
``killed``, ``complete``, ``incomplete`` or ``error``.
"""

import os
import signal
import sys
import time
import traceback
import types
from pathlib import Path

# Start faster: the store needs neither clinkd/__init__ (which loads transformers) nor the patch.
_pkg = types.ModuleType("clinkd")
_pkg.__path__ = [str(Path(__file__).resolve().parents[2] / "clinkd")]
sys.modules["clinkd"] = _pkg

import safetensors.torch  # noqa: E402, F401  (imported by the writer: once here, not in every child)
import torch  # noqa: E402
import tqdm.auto  # noqa: E402, F401

from clinkd.distill import StoreMeta, write_store  # noqa: E402
from tests.distill import fake  # noqa: E402

META = StoreMeta(teacher="fake", k=fake.K, temperature=0.5, vocab_size=fake.VOCAB, tokenizer_hash="t0")
FATES = {0: "complete", 3: "incomplete"}


def child(folder: str, n: int, shard: int, crash_at: int, pace: float) -> None:
    events = 0

    def hooked(fn):
        def wrapper(*args, **kwargs):
            nonlocal events
            events += 1
            if events == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return wrapper

    def compute(indices):
        time.sleep(pace)
        return fake.compute(indices)

    os.fsync, os.replace = hooked(os.fsync), hooked(os.replace)
    try:
        complete = write_store(
            folder, META, fake.sample_ids(n), compute, batch_size=2, shard_size=shard, progress=False
        )
        code = 0 if complete else 3
    except BaseException:
        traceback.print_exc()
        code = 4
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    torch.set_num_threads(1)  # the children are forked: no thread pools to inherit
    print("ready", flush=True)
    for line in sys.stdin:
        folder, n, shard, crash_at, kill_after, pace = line.split()
        pid = os.fork()
        if pid == 0:
            child(folder, int(n), int(shard), int(crash_at), float(pace))
        if float(kill_after) >= 0:
            time.sleep(float(kill_after))
            os.kill(pid, signal.SIGKILL)  # an unreaped child that already exited is not affected
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            fate = "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
        else:
            fate = FATES.get(os.WEXITSTATUS(status), "error")
        print(fate, flush=True)


if __name__ == "__main__":
    main()
