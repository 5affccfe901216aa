"""pytest-benchmark JSON → markdown tables (and optionally plots) of clinkd vs its peers.

    python -m benchmarks.render results.json [more.json ...] [--out FILE.md] [--plot FILE.png]

Benchmarks are grouped by their pytest-benchmark ``group`` (one op, shape and dtype on one device).
In each group each clinkd implementation (``extra_info["impl"]`` ``clinkd`` or a variant
``clinkd-*``) is compared with the fastest peer (any other implementation), and with the floor recorded in
``extra_info["floor_s"]``. Times are
medians. Where the benchmarks record them, the table also gives the peak memory
(``extra_info["peak_bytes"]``) and the throughput (``extra_info["tokens"]`` / median) of both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

from clinkd.io import write_text_atomic


def load(paths: list[str]) -> tuple[list[dict], dict]:
    benchmarks, machine = [], {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        benchmarks += data.get("benchmarks", [])
        machine = machine or {
            **data.get("machine_info", {}),
            **data.get("commit_info", {}),
            "date": data.get("datetime", "?"),
        }
    return benchmarks, machine


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def _info(bench: dict | None, key: str):
    return None if bench is None else bench.get("extra_info", {}).get(key)


def _per_s(bench: dict | None, key: str) -> float | None:
    count = _info(bench, key)
    return None if count is None else count / bench["stats"]["median"]


def _pair(ours, peer, fmt) -> str:
    """ "ours / peer" with "—" for a missing side; "—" when both are missing."""
    if ours is None and peer is None:
        return "—"
    return f"{'—' if ours is None else fmt(ours)} / {'—' if peer is None else fmt(peer)}"


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def rows(benchmarks: list[dict]) -> list[dict]:
    """Per group, one row per clinkd implementation (``clinkd``, variants ``clinkd-*`` labelled in
    brackets): its time, the fastest peer (an implementation not named clinkd*), the ratio, the floor
    and ours/floor (None where unknown); a group without clinkd gets one row for its fastest peer."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benchmarks:
        groups[b.get("group") or b["name"]].append(b)
    out = []
    for group, members in sorted(groups.items()):
        by_impl = {m["extra_info"].get("impl", m["name"]): m for m in members}
        mine = sorted((k for k in by_impl if k.startswith("clinkd")), key=lambda k: (k != "clinkd", k))
        peers = {k: v for k, v in by_impl.items() if not k.startswith("clinkd")}
        best_name, best = min(peers.items(), key=lambda kv: kv[1]["stats"]["median"]) if peers else (None, None)
        t_peer = best["stats"]["median"] if best else None
        for name in mine or [None]:
            ours = by_impl.get(name)
            t_ours = ours["stats"]["median"] if ours else None
            floor = (ours or best or {}).get("extra_info", {}).get("floor_s")
            out.append(
                {
                    "group": group if name in (None, "clinkd") else f"{group} [{name}]",
                    "ours": t_ours,
                    "peer": best_name,
                    "peer_time": t_peer,
                    "speedup": (t_peer / t_ours) if t_ours and t_peer else None,
                    "floor": floor,
                    "ours_over_floor": (t_ours / floor) if t_ours and floor else None,
                    "peak": _info(ours, "peak_bytes"),
                    "peer_peak": _info(best, "peak_bytes"),
                    "tokens_per_s": _per_s(ours, "tokens"),
                    "peer_tokens_per_s": _per_s(best, "tokens"),
                }
            )
    return out


def every_peer(benchmarks: list[dict]) -> str:
    """A second table: per group, clinkd's time beside every peer's (not only the fastest), with the
    ratio and peak memory of each."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benchmarks:
        groups[b.get("group") or b["name"]].append(b)
    lines = [
        "| benchmark | clinkd | peer | peer time | peer/clinkd | peak memory clinkd / peer |",
        "|---|---|---|---|---|---|",
    ]
    for group, members in sorted(groups.items()):
        by_impl = {m["extra_info"].get("impl", m["name"]): m for m in members}
        ours = by_impl.get("clinkd")
        peers = sorted(
            ((k, v) for k, v in by_impl.items() if not k.startswith("clinkd")), key=lambda kv: kv[1]["stats"]["median"]
        )
        if ours is None or not peers:
            continue
        t_ours = ours["stats"]["median"]
        for name, peer in peers:
            t_peer = peer["stats"]["median"]
            lines.append(
                f"| {group} | {_fmt_time(t_ours)} | {name} | {_fmt_time(t_peer)} | {t_peer / t_ours:.2f}× | "
                f"{_pair(_info(ours, 'peak_bytes'), _info(peer, 'peak_bytes'), _fmt_bytes)} |"
            )
    return "\n".join(lines) + "\n"


def markdown(benchmarks: list[dict], machine: dict) -> str:
    header = (
        "| benchmark | ours | best peer | peer time | peer/ours | floor | ours/floor | peak memory ours / peer "
        "| tokens/s ours / peer |\n|---|---|---|---|---|---|---|---|---|"
    )
    lines = []
    for r in rows(benchmarks):

        def cell(v, fmt):
            return "—" if v is None else fmt(v)

        lines.append(
            f"| {r['group']} | {cell(r['ours'], _fmt_time)} | {r['peer'] or '—'} | "
            f"{cell(r['peer_time'], _fmt_time)} | {cell(r['speedup'], lambda v: f'{v:.2f}×')} | "
            f"{cell(r['floor'], _fmt_time)} | {cell(r['ours_over_floor'], lambda v: f'{v:.1f}×')} | "
            f"{_pair(r['peak'], r['peer_peak'], _fmt_bytes)} | "
            f"{_pair(r['tokens_per_s'], r['peer_tokens_per_s'], lambda v: f'{v:.4g}')} |"
        )
    cpu = machine.get("cpu", {}).get("brand_raw", "") if isinstance(machine.get("cpu"), dict) else ""
    head = (
        f"Machine: {machine.get('node', '?')} {cpu}; commit {machine.get('id', '?')[:12]}; "
        f"date {machine.get('date', '?')}"
    )
    return head + "\n\n" + header + "\n" + "\n".join(lines) + "\n"


def plot(benchmarks: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [r for r in rows(benchmarks) if r["speedup"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(data) + 1.5))
    ax.barh([r["group"] for r in data], [r["speedup"] for r in data])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("speed-up of clinkd over the fastest peer (×)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--out", help="write the markdown here (atomically) instead of stdout")
    parser.add_argument("--plot", help="also write a PNG bar chart of the speed-ups (needs matplotlib)")
    parser.add_argument(
        "--every-peer",
        action="store_true",
        help="also a table of clinkd beside every peer of each benchmark, not only the fastest",
    )
    args = parser.parse_args(argv)
    for path in args.json:
        if not os.path.isfile(path):
            parser.error(f"json: no such file {path!r}")
    benchmarks, machine = load(args.json)
    text = markdown(benchmarks, machine)
    if args.every_peer:
        text += "\nEvery peer:\n\n" + every_peer(benchmarks)
    if args.out:
        write_text_atomic(args.out, text)
    else:
        sys.stdout.write(text)
    if args.plot:
        plot(benchmarks, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
