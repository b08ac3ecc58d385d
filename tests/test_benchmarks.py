"""Smoke test: the speed benchmark runs end to end at a tiny size (it measures nothing here; numbers live in
benchmarks/RESULTS.md)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]


def test_train_speed_runs_tiny(tmp_path):
    out = tmp_path / "table.md"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--config", "tiny",
                          "--device", "cpu", "--adapters", "lora,mlora", "--steps", "1", "--warmup", "0", "--repeats", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| lora |", "| mlora |"))]
    assert len(rows) == 3  # nanoalign lora, HF+PEFT lora, nanoalign mlora
    assert all(float(r.split("|")[3].replace(",", "")) > 0 for r in rows)  # tok/s column
    assert all(len(r.split("|")) == 11 for r in rows)                       # 9 columns, speed/mem ratios included
    targets = [line for line in table.splitlines() if line.startswith(("| lora: ", "| mlora ("))]
    assert len(targets) == 3 and all(line.endswith(("| yes |", "| no |")) for line in targets)  # speed, mem, 3-head


def test_gpu_suite_dry_run(tmp_path):
    """--suite gpu --dry-run runs every GPU cell (2 models x with/without checkpointing) end to end on a tiny
    config in this process, appending one table per cell with a row per (adapter, implementation)."""
    out = tmp_path / "gpu.md"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_speed.py"), "--suite", "gpu", "--dry-run",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    tables = out.read_text().split("### ")[1:]
    assert len(tables) == 4 and all("(DRY RUN)" in t for t in tables)
    assert sum("grad-ckpt" in t.splitlines()[0] for t in tables) == 2
    for t in tables:
        cells = [[c.strip() for c in line.split("|")[1:-1]] for line in t.splitlines() if line.startswith("| ")]
        names = {(c[0], c[1]) for c in cells if len(c) == 9 and c[0] != "adapter"}
        assert all(float(c[2].replace(",", "")) > 0 for c in cells if len(c) == 9 and c[0] != "adapter")
        assert {("lora", "nanoalign"), ("lora", "HF+PEFT"), ("hydra", "nanoalign"), ("mlora", "nanoalign"),
                ("align", "nanoalign"), ("align", "HF+PEFT")} <= names, names
