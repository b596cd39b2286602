"""``fmseg bench prompt --protocol interactive`` on a real scan: both engines, every protocol, the JSON written."""

from __future__ import annotations

import json

from FMSegCore.cli.main import main


def test_interactive_bench_writes_curves_for_both_engines(tmp_path, capsys):
    out = tmp_path / "interactive.json"
    code = main(["bench", "prompt", "--protocol", "interactive", "--cases", "mr_abdomen", "--structures",
                 "kidney_left", "--clicks", "1", "--device", "cpu", "--json", str(out)])
    assert code == 0
    figures = json.loads(out.read_text())
    rows = figures["results"]
    assert {(r["engine"], r["protocol"]) for r in rows} == {
        (engine, protocol) for engine in ("propagation", "fmseg") for protocol in ("roi_3d", "click", "box_2d_largest")}
    for row in rows:
        assert row["split"] == "development" and row["structure"] == "kidney_left"
        assert len(row["curve"]) == len(row["seconds"]) <= (2 if row["protocol"] != "box_2d_largest" else 1)
        assert 0.0 <= row["final"] <= 1.0
    summary = figures["summary"]["development"]
    assert summary["fmseg"]["roi_3d"]["structures"] == 1
    assert "development:" in capsys.readouterr().out


def test_interactive_bench_refuses_an_unknown_scan_in_one_line(tmp_path, capsys):
    out = tmp_path / "never.json"
    code = main(["bench", "prompt", "--protocol", "interactive", "--cases", "nowhere", "--json", str(out)])
    assert code == 2 and not out.exists()
    assert "--cases: unknown scan 'nowhere'" in capsys.readouterr().err
