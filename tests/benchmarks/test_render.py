"""benchmarks/render.py: pytest-benchmark JSON → the comparison table."""

import json

import pytest

from benchmarks import render


def _bench(name, group, median, **extra):
    return {"name": name, "group": group, "stats": {"median": median}, "extra_info": {"impl": name, **extra}}


def _write(tmp_path, benchmarks):
    path = tmp_path / "b.json"
    path.write_text(
        json.dumps(
            {
                "machine_info": {"node": "box", "cpu": {"brand_raw": "CPU9"}},
                "commit_info": {"id": "abcdef1234567890"},
                "datetime": "2026-01-02T03:04:05",
                "benchmarks": benchmarks,
            }
        )
    )
    return path


def test_ours_against_the_fastest_peer_floor_memory_and_throughput(tmp_path, capsys):
    path = _write(
        tmp_path,
        [
            _bench("clinkd", "step", 2.0, floor_s=0.5, tokens=1000, peak_bytes=3 * 2**20),
            _bench("stock", "step", 5.0, tokens=1000, peak_bytes=2**31),
            _bench("slow", "step", 9.0),
            _bench("clinkd-topk", "step", 1.0, floor_s=0.25),
            _bench("clinkd", "op", 0.004, floor_s=0.001),
            _bench("torch", "op", 0.002),
        ],
    )
    assert render.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Machine: box CPU9; commit abcdef123456; date 2026-01-02T03:04:05")
    assert "| step | 2 s | stock | 5 s | 2.50× | 500 ms | 4.0× | 3 MiB / 2 GiB | 500 / 200 |" in out
    assert "| op | 4 ms | torch | 2 ms | 0.50× | 1 ms | 4.0× | — | — |" in out
    # a clinkd variant is a row of its own against the same peer, never a peer of clinkd
    assert "| step [clinkd-topk] | 1 s | stock | 5 s | 5.00× | 250 ms | 4.0× | — / 2 GiB | — / 200 |" in out
    assert out.index("| step |") < out.index("| step [clinkd-topk] |")


def test_group_without_peers_or_ours(tmp_path):
    benchmarks, machine = render.load([str(_write(tmp_path, [_bench("torch", "only-peer", 1.0)]))])
    (row,) = render.rows(benchmarks)
    assert row["ours"] is None and row["peer"] == "torch" and row["speedup"] is None


def test_missing_json_is_an_argument_error(tmp_path):
    with pytest.raises(SystemExit):
        render.main([str(tmp_path / "nope.json")])


def test_out_file_and_plot(tmp_path):
    path = _write(tmp_path, [_bench("clinkd", "g", 1.0), _bench("torch", "g", 3.0)])
    pytest.importorskip("matplotlib")
    assert render.main([str(path), "--out", str(tmp_path / "t.md"), "--plot", str(tmp_path / "p.png")]) == 0
    assert "| g | 1 s | torch | 3 s | 3.00× |" in (tmp_path / "t.md").read_text()
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_every_peer_table(tmp_path, capsys):
    path = _write(
        tmp_path,
        [
            _bench("clinkd", "loss", 2.0, peak_bytes=2**20),
            _bench("liger", "loss", 3.0, peak_bytes=2 * 2**20),
            _bench("naive", "loss", 5.0),
            _bench("clinkd-topk", "loss", 1.0),
            _bench("torch", "lonely", 1.0),
        ],
    )
    assert render.main([str(path), "--every-peer"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("Every peer:") :]
    assert "| loss | 2 s | liger | 3 s | 1.50× | 1 MiB / 2 MiB |" in table
    assert "| loss | 2 s | naive | 5 s | 2.50× | 1 MiB / — |" in table
    assert table.index("liger") < table.index("naive")  # fastest peer first
    assert "clinkd-topk |" not in table and "lonely" not in table  # variants are not peers; no clinkd, no row
    assert render.main([str(path)]) == 0
    assert "Every peer" not in capsys.readouterr().out
