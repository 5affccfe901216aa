"""``python -m clinkd_kernels.report``: every Triton kernel compiled ahead of time for sm_80 and sm_90.

For each configuration a kernel module lists in ``aot_specs()`` (its autotune configs and the fixed
ones), prints registers per thread, spill bytes, shared memory, resident blocks per SM and the
tensor-core instructions in the SASS (HMMA on sm_80, HGMMA on sm_90). Exits non-zero if any
configuration spills or needs more shared memory than the architecture has. Needs no GPU.

    python -m clinkd_kernels.report
"""

from __future__ import annotations

import argparse
import sys

from clinkd_kernels.aot import ARCHS, MAX_SHARED_PER_BLOCK, compile_module_specs

KERNEL_MODULES = (  # every module with an aot_specs(): the launch.py of each op with Triton kernels
    "clinkd_kernels.rope.launch",
    "clinkd_kernels.attention.launch",
    "clinkd_kernels.loss.launch",
)


def table(reports) -> str:
    lines = [
        "| kernel | config | arch | registers | spill bytes | shared memory | blocks/SM | HMMA | HGMMA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        flag = "" if r.ok else " **FAIL**"
        lines.append(
            f"| {r.kernel} | {r.config} | sm_{r.arch} | {r.registers} | {r.spill_bytes}{flag} | "
            f"{r.shared_bytes / 1024:.1f} KiB / {MAX_SHARED_PER_BLOCK[r.arch] // 1024} KiB | "
            f"{r.blocks_per_sm} | {r.hmma} | {r.hgmma} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argparse.ArgumentParser(description="AOT compile report of every Triton kernel (printed)").parse_args(argv)
    reports = []
    for module in KERNEL_MODULES:
        reports += compile_module_specs(module, ARCHS)
    sys.stdout.write(table(reports))
    bad = [r for r in reports if not r.ok]
    if bad:
        print(f"\n{len(bad)} configuration(s) spill or exceed shared memory", file=sys.stderr)
        return 1
    print(f"\n{len(reports)} configurations compiled, no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
