"""``fmseg bench families``: the JSON's structure and arithmetic on the two smallest families (no timing
assertions), the official figures against the fixtures they were copied from, the seeded fill against the
fixtures' rule."""

from __future__ import annotations

import json

import pytest
import torch
from reference_fixtures import metadata, reference_tensor

from FMSegCore.bench import families_bench
from FMSegCore.cli import bench_families
from FMSegCore.cli.main import main


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def check_call(entry: dict, repeats: int, warmup: int) -> None:
    ours = entry["ours"]
    assert ours["repeats"] == repeats == len(ours["runs_s"]) and ours["warmup"] == warmup
    assert positive(ours["median_s"]) and all(positive(run) for run in ours["runs_s"])
    assert len(ours["loadavg_1min_before_after"]) == 2
    official = entry["official"]
    assert positive(official["median_s"]) and all(positive(run) for run in official["runs_s"])
    assert entry["ratio_official_over_ours"] == pytest.approx(official["median_s"] / ours["median_s"], rel=1e-3)


def test_the_bench_records_ours_beside_the_official_figures():
    threads = torch.get_num_threads()
    figures = families_bench.run_bench(["tyche"], repeats=1, warmup=0, threads=1)
    assert torch.get_num_threads() == threads  # the caller's thread count is restored
    assert figures["threads"] == 1 and figures["torch"] == torch.__version__ and figures["cpu_model"]
    assert positive(figures["bench_seconds"])
    tyche = figures["families"]["tyche"]
    assert tyche["num_parameters"] == metadata("tyche")["num_parameters"]
    assert tyche["weights"].startswith("seeded, official layout")
    assert list(tyche["calls"]) == ["forward"]
    check_call(tyche["calls"]["forward"], repeats=1, warmup=0)
    assert tyche["calls"]["forward"]["official"] == families_bench.OFFICIAL[("tyche", "forward")]
    json.dumps(figures)  # JSON-ready
    rows = families_bench.table_rows(figures)
    assert [row[:2] for row in rows] == [("tyche", "forward")]


def test_the_command_writes_the_json_and_prints_the_table(tmp_path, capsys):
    output = tmp_path / "families.json"
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "families", "--families", "universeg", "--repeats", "2", "--warmup", "0",
                     "--threads", "1", "--output", str(output)]) == 0
    finally:
        torch.set_num_threads(threads)
    figures = json.loads(output.read_text())
    assert list(figures["families"]) == ["universeg"] and figures["allocator_tuned"] is True
    check_call(figures["families"]["universeg"]["calls"]["forward"], repeats=2, warmup=0)
    assert not list(tmp_path.glob(".*partial*"))  # written atomically, nothing left behind
    printed = capsys.readouterr().out
    assert "official/ours" in printed and "universeg" in printed and str(output) in printed


def test_a_missing_output_folder_is_an_error_before_anything_runs(tmp_path, capsys):
    assert main(["bench", "families", "--families", "universeg", "--output", str(tmp_path / "no" / "f.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_official_figures_are_the_fixtures_ones():
    for (family, call), official in families_bench.OFFICIAL.items():
        timing = metadata(official["fixture"])["timing_cpu_2threads"]
        recorded = timing[official["key"]] if "key" in official else timing
        assert {k: v for k, v in official.items() if k not in ("fixture", "key")} == recorded, (family, call)
    assert set(bench_families.FAMILIES) == set(families_bench.FAMILY_NAMES)


def test_the_seeded_fill_is_the_fixtures_rule():
    for key, shape, dtype in metadata("universeg")["state_dict"][:6] + [["x.running_var", [4], "float32"],
                                                                       ["x.num_batches_tracked", [], "int64"]]:
        dtype = getattr(torch, dtype)
        assert torch.equal(families_bench.seeded_tensor(key, shape, dtype), reference_tensor(key, tuple(shape), dtype))


def test_small_calls_are_also_measured_on_one_thread(monkeypatch):
    builders = families_bench._builders()
    tiny = torch.rand(1, 1, 16, 16), torch.rand(1, 2, 1, 16, 16), torch.ones(1, 2, 1, 16, 16)
    monkeypatch.setattr(families_bench, "_builders", lambda: {"universeg": families_bench.FamilyBench(
        builders["universeg"].builder, builders["universeg"].wrap,
        lambda net: [families_bench.Call("forward", "a 16x16 forward", lambda: net(*tiny), small=True)])})
    figures = families_bench.run_bench(["universeg"], repeats=2, warmup=1, threads=2)
    entry = figures["families"]["universeg"]["calls"]["forward"]
    check_call(entry, repeats=2, warmup=1)
    one = entry["ours_1_thread"]
    assert one["repeats"] == 2 and positive(one["median_s"])
    assert entry["ratio_official_over_ours_1_thread"] == pytest.approx(
        entry["official"]["median_s"] / one["median_s"], rel=1e-3)
    assert families_bench.table_rows(figures)[0][5].endswith(" s")
    assert "ours_1_thread" not in families_bench.run_bench(["universeg"], repeats=1, warmup=0, threads=1)[
        "families"]["universeg"]["calls"]["forward"]
