"""Bounded memory on a node (issue 8): the traced-graph LRU really frees what it
drops, and node processes stay flat over many jobs of more shapes than it holds."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from meshdl.node.graphs import GraphCache, _fx_sources, trim_heap
from meshdl.transport.broker import mosquitto_binary

from proc_util import TAG_VAR, kill_tagged, wait_gone

ROOT = Path(__file__).resolve().parents[1]


def test_graph_lru_evicts_graphs_and_their_generated_sources():
    cache = GraphCache(max_graphs=2)
    sources = len(_fx_sources()[0])
    for size in (32, 40, 48, 56, 32, 64):
        g = cache.get("tiny_cnn", (1, 3, size, size))
        assert g.input_shape == (1, 3, size, size)
    assert cache.size() == 2 and cache.traces == 6         # 32 was dropped, then rebuilt
    # torch.fx keeps every generated forward() source; only the live graphs' remain
    assert cache.sources() <= 2 * 4
    assert len(_fx_sources()[0]) - sources <= cache.sources()
    cache.get("tiny_cnn", (1, 3, 64, 64))
    assert cache.traces == 6                              # a hit builds nothing


def test_trim_heap_runs_on_this_libc():
    assert trim_heap() in (True, False)                   # never raises (glibc or not)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
def test_node_rss_stays_flat_over_many_jobs_of_many_shapes(tmp_path):
    """120 resnet18 jobs cycling over 8 input shapes on a 4-node mesh whose graph LRU
    holds 4 (every job re-traces on every node): RSS after warm-up grows < 30 MiB."""
    tag = f"mem-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, **{TAG_VAR: tag})
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "bench_memory.py"), "--model", "resnet18",
             "--shapes", "8", "--jobs", "120", "--max-graphs", "4", "--sample-every", "24",
             "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
        out = proc.stdout + proc.stderr[-3000:]
        assert "exact 120, wrong 0, failed 0" in out, out
        rows = list(csv.DictReader(open(tmp_path / "bench_memory.csv")))
        nodes = {r["node"] for r in rows}
        assert len(nodes) == 4
        for node in nodes:
            warm = [int(r["rss_kb"]) for r in rows if r["node"] == node and r["phase"] == "warm"]
            end = [int(r["rss_kb"]) for r in rows if r["node"] == node and r["phase"] == "end"]
            assert warm and end and warm[0] > 0
            growth_mib = (end[0] - warm[0]) / 1024
            assert growth_mib < 30, (node, warm[0], end[0], out)
        assert proc.returncode == 0, out
        assert wait_gone(tag, 30) == []
    finally:
        kill_tagged(tag)
