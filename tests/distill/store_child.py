"""Child process of the kill test: fill a store with fake pseudo-labels, optionally dying (SIGKILL,
no cleanup) at the N-th fsync/rename the store makes. Usage: store_child FOLDER N_SAMPLES SHARD CRASH_AT"""

import os
import signal
import sys
import types
from pathlib import Path

# Start faster: the store needs neither clinkd/__init__ (which loads transformers) nor the patch.
_pkg = types.ModuleType("clinkd")
_pkg.__path__ = [str(Path(__file__).resolve().parents[2] / "clinkd")]
sys.modules["clinkd"] = _pkg

from clinkd.distill import StoreMeta, write_store  # noqa: E402
from tests.distill import fake  # noqa: E402

folder, n, shard, crash_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
events = 0


def hooked(fn):
    def wrapper(*args, **kwargs):
        global events
        events += 1
        if events == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapper


os.fsync, os.replace = hooked(os.fsync), hooked(os.replace)
print("ready", flush=True)
meta = StoreMeta(teacher="fake", k=fake.K, temperature=0.5, vocab_size=fake.VOCAB, tokenizer_hash="t0")
complete = write_store(folder, meta, fake.sample_ids(n), fake.compute, batch_size=2, shard_size=shard, progress=False)
print("complete" if complete else "incomplete", events, flush=True)
