"""How a launched process ends (clinkd.train.arguments.exit_launched_process)."""

import os
import subprocess
import sys

from clinkd.train.arguments import exit_launched_process
from tests.distributed.common import REPO

ENDS = """
import atexit, sys
from clinkd.train.arguments import exit_launched_process
atexit.register(lambda: print("teardown ran", flush=True))
print("work written", end="")  # unflushed: the exit must flush it
exit_launched_process(int(sys.argv[1]))
print("not reached")
"""


def test_one_process_returns(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert exit_launched_process(3) is None  # a pytest process goes on


def test_a_launched_process_flushes_and_leaves_without_teardown():
    env = dict(os.environ, WORLD_SIZE="2", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", ENDS, "5"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 5, done.stderr
    assert done.stdout == "work written"  # no atexit teardown, nothing after the exit
