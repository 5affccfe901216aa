"""Compile every attention ``aot_specs()`` entry for each of its own architectures (``spec.archs``) and
print the CompileReports as JSON. Run as ``python -m tests.attention.aot_worker`` with
TRITON_INTERPRET=0: kernels defined for the interpreter cannot be compiled in the same process."""

from __future__ import annotations

import dataclasses
import json
import sys
from concurrent.futures import ProcessPoolExecutor


def _compile(job):
    from clinkd_kernels.attention import aot_specs

    index, arch = job
    return dataclasses.asdict(aot_specs()[index].compile(arch))


def main() -> int:
    from clinkd_kernels.attention import aot_specs

    jobs = [(i, arch) for i, spec in enumerate(aot_specs()) for arch in spec.archs]
    # Independent, CPU-bound compiles (ptxas): two processes halve the wall time on CI's 2 cores.
    with ProcessPoolExecutor(max_workers=2) as pool:
        json.dump(list(pool.map(_compile, jobs)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
