"""The command line: smoke runs of `bench --quick`, `eval --quick` and `demo` writing their files,
`info`, and bad input ending in one line on stderr with a non-zero exit (never a traceback)."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvpress_kernels import cli

ROOT = Path(__file__).resolve().parent.parent
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _run_main(argv, capsys):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv,needle", [
    (["eval", "--methods", "magic"], "unknown method 'magic'"),
    (["eval", "--methods", "shotkv", "nope"], "unknown method 'nope'"),
    (["eval", "--keep-ratios", "0"], "keep ratio must be in (0, 1]"),
    (["eval", "--keep-ratios", "1.5"], "keep ratio must be in (0, 1]"),
    (["eval", "--keep-ratios", "-0.2"], "keep ratio must be in (0, 1]"),
    (["eval", "--keep-ratios", "half"], "keep ratio must be a number"),
    (["eval", "--n", "0"], "positive integer"),
    (["eval", "--tasks", "sudoku"], "unknown task 'sudoku'"),
    (["demo", "--keep-ratio", "2"], "keep ratio must be in (0, 1]"),
    (["demo", "--token-method", "zip"], "unknown method 'zip'"),
    (["bench", "--ops", "teleport"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    rc, out, err = _run_main(argv + (["--out", str(tmp_path / "o")] if argv[0] in ("eval", "bench") else []), capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kvpress-kernels: error:") and needle in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()      # nothing written on bad input


@pytest.mark.parametrize("command", ["bench", "eval"])
def test_unwritable_output_path(command, capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    # a directory cannot be created under a regular file, even as root
    rc, out, err = _run_main([command, "--quick", "--out", str(blocker / "sub")], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot write to output directory" in lines[0] and "a_file" in lines[0]


def test_console_entry_point_bad_input_no_traceback(tmp_path):
    """The real entry (`python -m kvpress_kernels.cli`, what the console script runs)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "kvpress_kernels.cli", "eval", "--methods", "magic"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "unknown method 'magic'" in p.stderr
    assert "Traceback" not in p.stderr


def test_unexpected_failure_is_one_line(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("kaboom\nsecond line")
    monkeypatch.setattr(cli, "cmd_info", boom)
    rc, out, err = _run_main(["info"], capsys)
    assert rc == 1
    assert err.strip().splitlines() == [
        "kvpress-kernels: error: RuntimeError: kaboom (set KVPRESS_KERNELS_TRACEBACK=1 for the traceback)"]


# ----------------------------------------------------------------------------- info
def test_info_prints_the_backends(capsys):
    rc, out, err = _run_main(["info"], capsys)
    assert rc == 0
    keys = {line.split(":", 1)[0].strip() for line in out.splitlines() if ":" in line}
    assert {"torch", "reference", "triton", "cuda", "demo/eval model"} <= keys
    assert "available" in out


# ----------------------------------------------------------------------------- smoke runs
def test_bench_quick_writes_results(tmp_path, capsys):
    out_dir = tmp_path / "bench"
    rc, out, err = _run_main(["bench", "--quick", "--out", str(out_dir), "--device", "cpu"], capsys)
    assert rc == 0, err
    data = json.loads((out_dir / "bench.json").read_text())
    meta, rows = data["meta"], data["rows"]
    for key in ("device", "torch", "triton", "commit"):
        assert meta[key]
    # memory rows (bytes in use, no timing) are their own kind; every other row is a timing row
    memory = [r for r in rows if r.get("kind") == "memory"]
    assert memory and all(r["kv_bytes"] > 0 and "median_ms" not in r for r in memory if r["status"] == "ok")
    timing = [r for r in rows if r.get("kind") != "memory"]
    ops = {r["op"] for r in timing}
    assert {"end_to_end", "compaction", "block_compaction", "selection", "append", "decode_attention",
            "adakv_select"} <= ops
    ok = [r for r in timing if r["status"] == "ok"]
    assert ok and all(r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] + 1e-9 for r in ok)
    # the reference path is measured for every op; Triton is skipped on CPU and says why
    for op in ops - {"scoring"}:
        assert any(r["op"] == op and r["provider"] == "reference" and r["status"] == "ok" for r in timing), op
    assert all(r["status"] == "skipped" and "interpreter" in r["note"] for r in timing if r["provider"] == "triton")
    # peers side by side, with ratios
    e2e = {r["provider"]: r for r in rows if r["op"] == "end_to_end"}
    assert e2e["kvpress"]["status"] == "ok"
    assert e2e["reference"]["x_vs_kvpress"] == pytest.approx(e2e["kvpress"]["median_ms"] / e2e["reference"]["median_ms"])
    assert e2e["reference"]["floor_bytes"] > 0 and e2e["reference"]["gbps"] > 0
    with (out_dir / "bench.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and csv_rows[0]["commit"] == meta["commit"]
    assert (out_dir / "bench_end_to_end.png").exists() == HAS_MPL
    assert "copy bandwidth" in out


@pytest.mark.slow
def test_eval_quick_writes_results(tmp_path, capsys):
    out_dir = tmp_path / "eval"
    rc, out, err = _run_main(["eval", "--quick", "--out", str(out_dir), "--n", "2"], capsys)
    assert rc == 0, err
    res = json.loads((out_dir / "eval_results.json").read_text())
    cfg = res["config"]
    assert cfg["methods"] == ["shotkv", "snapkv"] and cfg["keep_ratios"] == [0.3] and cfg["n_examples"] == 2
    summ = res["summary"]
    combos = {(r["task"], r["setting"], r["method"]) for r in summ}
    for task in cfg["tasks"]:
        for setting in ("query_aware", "query_agnostic"):
            for m in ("full", "shotkv", "snapkv"):
                assert (task, setting, m) in combos
    for r in summ:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 2
        if r["method"] == "full":
            assert r["agreement"] == 1.0 and r["kl"] == 0.0 and r["kv_kept"] == 1.0
        else:
            assert r["kl"] >= 0.0 and 0.0 < r["kv_kept"] < 0.6       # memory really freed
    recs = res["records"]
    assert len(recs) == len(cfg["tasks"]) * 2 * 2 * 3
    assert any(p["task"] == "all" and p["a"] == "shotkv" and p["b"] == "snapkv" for p in res["pairs"])
    assert (out_dir / "eval_summary.csv").exists()
    assert "| task | setting |" in (out_dir / "eval_table.md").read_text()
    assert (out_dir / "eval_accuracy.png").exists() == HAS_MPL
    assert "| shotkv |" in out


@pytest.mark.slow
def test_demo_runs_end_to_end(capsys):
    rc, out, err = _run_main(["demo", "--prompts", "1", "--shots", "12", "--max-new-tokens", "4"], capsys)
    assert rc == 0, err
    assert "full cache" in out and "ShotKV keep 0.3" in out and "SnapKV keep 0.3" in out
    assert "KV cache after prefill" in out and "backend" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("KV cache after prefill"))
    assert "(100%)" in line and line.count("%") == 3
