"""Extension Manager packaging: CMake listings, extension metadata, catalog entry, icon and the Slicer test runner.

Everything here runs without Slicer. The CMake layout test configures the module's real CMakeLists with the
installed ``cmake`` and stand-in Slicer/CTK macros written below (they copy files the way
``ctkMacroCompilePythonScript`` does: each listed path, relative to SOURCE_DIR, to the same relative path under
DESTINATION_DIR); a real extension build is only checked by the last test, which needs ``SLICER_EXECUTABLE``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "Testing" / "run_slicer_tests.py"
RAW_PREFIX = "https://raw.githubusercontent.com/fmseg/FMSeg/main/"
ICON = REPO / "FMSegSlicer" / "Resources" / "Icons" / "FMSegSlicer.png"
CATALOG = REPO / "ExtensionsIndex" / "FMSeg.json"
CATALOG_SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
                      "slicer-extension-catalog-entry-schema-v1.0.2.json#")
SLICER_RUN_TIMEOUT_S = 1800


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cmake_sources = _load("fmseg_cmake_sources", REPO / "Utilities" / "cmake_sources.py")


def _run(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(arg) for arg in args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout, check=False)


def _env_without_slicer() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "SLICER_EXECUTABLE"}


# --------------------------------------------------------------------------------------------------------------
# Module CMakeLists: every script and resource listed, and the checker that keeps it so


def test_module_cmakelists_lists_exactly_the_scripts_and_resources_present():
    problems = cmake_sources.differences(REPO)
    assert not problems, ("FMSegSlicer/CMakeLists.txt is out of sync with the tree (run "
                          "`python Utilities/cmake_sources.py --write`): " + "; ".join(problems))


def test_checker_command_line_agrees_on_the_real_tree():
    result = _run(sys.executable, REPO / "Utilities" / "cmake_sources.py", "--check")
    assert result.returncode == (1 if cmake_sources.differences(REPO) else 0), result.stdout + result.stderr
    assert len(result.stdout.strip().splitlines()) == 1


def _small_tree(root: Path) -> Path:
    """A minimal repository: the real module CMakeLists and a few files of each kind, listings regenerated."""
    (root / "FMSegSlicer").mkdir(parents=True)
    shutil.copy2(REPO / "FMSegSlicer" / "CMakeLists.txt", root / "FMSegSlicer" / "CMakeLists.txt")
    files = {
        "FMSegSlicer/FMSegSlicer.py": "",
        "FMSegSlicer/FMSegSlicerLib/__init__.py": "",
        "FMSegSlicer/FMSegSlicerLib/client.py": "",
        "FMSegSlicer/Resources/Icons/FMSegSlicer.png": "png",
        "FMSegSlicer/Resources/UI/FMSegSlicer.ui": "<ui/>",
        "FMSegCore/__init__.py": "",
        "FMSegCore/zoo/__init__.py": "",
        "FMSegCore/zoo/cache.py": "",
        "FMSegCore/__pycache__/cache.cpython-311.pyc": "",
        "FMSegCore/zoo/__pycache__/stray.py": "",
        "Resources/Models/model.pt": "weights",
        "Resources/Models/model.md": "card",
        "Resources/Models/model.log.jsonl": "{}",
        "Resources/Models/model.pt.partial": "half a download",
        "Resources/SampleData/case/image.nii.gz": "image",
        "Resources/SampleData/case/prompts/liver.mrk.json": "{}",
        "Resources/Benchmarks/result.json": "{}",
    }
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert cmake_sources.main(["--root", str(root), "--write"]) == 0
    return root


def _check(root: Path) -> subprocess.CompletedProcess:
    return _run(sys.executable, REPO / "Utilities" / "cmake_sources.py", "--root", root, "--check")


def test_checker_lists_what_ships_and_leaves_out_caches_logs_and_other_resources(tmp_path):
    root = _small_tree(tmp_path)
    result = _check(root)
    assert result.returncode == 0, result.stdout
    assert cmake_sources.listed(root) == {
        "FMSegSlicer scripts": ["FMSegSlicer.py", "FMSegSlicerLib/__init__.py", "FMSegSlicerLib/client.py"],
        "FMSegSlicer resources": ["Resources/Icons/FMSegSlicer.png", "Resources/UI/FMSegSlicer.ui"],
        "FMSegCore scripts": ["FMSegCore/__init__.py", "FMSegCore/zoo/__init__.py", "FMSegCore/zoo/cache.py"],
        "FMSegCore resources": ["Resources/Models/model.md", "Resources/Models/model.pt",
                                "Resources/SampleData/case/image.nii.gz",
                                "Resources/SampleData/case/prompts/liver.mrk.json"],
    }


def test_checker_names_an_unlisted_python_file_and_write_adds_it(tmp_path):
    root = _small_tree(tmp_path)
    (root / "FMSegCore" / "zoo" / "new_module.py").write_text("")
    result = _check(root)
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "FMSegCore scripts: missing FMSegCore/zoo/new_module.py" in lines[0], lines

    assert _run(sys.executable, REPO / "Utilities" / "cmake_sources.py", "--root", root, "--write").returncode == 0
    assert "  FMSegCore/zoo/new_module.py\n" in (root / "FMSegSlicer" / "CMakeLists.txt").read_text()
    assert _check(root).returncode == 0


def test_checker_names_listed_files_that_are_gone(tmp_path):
    root = _small_tree(tmp_path)
    (root / "FMSegSlicer" / "FMSegSlicerLib" / "client.py").unlink()
    (root / "Resources" / "SampleData" / "case" / "image.nii.gz").unlink()
    result = _check(root)
    assert result.returncode == 1
    assert "FMSegSlicer scripts: listed but absent FMSegSlicerLib/client.py" in result.stdout
    assert "FMSegCore resources: listed but absent Resources/SampleData/case/image.nii.gz" in result.stdout


def test_checker_reports_a_lost_marker_block(tmp_path):
    root = _small_tree(tmp_path)
    cmake = root / "FMSegSlicer" / "CMakeLists.txt"
    text = cmake.read_text()
    cmake.write_text(text.replace("# BEGIN generated: FMSegCore resources", "# BEGIN generated: FMSegCore data"))
    result = _check(root)
    assert result.returncode == 1
    assert "no generated block 'FMSegCore resources'" in result.stdout
    cmake.write_text(text.replace("  # END generated\n", "", 1))
    result = _check(root)
    assert result.returncode == 1 and "not closed" in result.stdout, result.stdout


def test_module_cmakelists_lists_files_explicitly_and_registers_the_tests():
    text = _code((REPO / "FMSegSlicer" / "CMakeLists.txt").read_text())
    assert not re.search(r"file\s*\(\s*GLOB", text, re.IGNORECASE), "files must be listed, not globbed"
    assert re.search(r"slicerMacroBuildScriptedModule\s*\(\s*NAME\s+\$\{MODULE_NAME\}\s+SCRIPTS\s+\S+\s+"
                     r"RESOURCES\s+\S+\s+WITH_GENERIC_TESTS\s*\)", text), text
    assert re.search(r"set\s*\(\s*MODULE_NAME\s+FMSegSlicer\s*\)", text)
    testing = re.search(r"if\s*\(\s*BUILD_TESTING\s*\)(.*?)endif\s*\(", text, re.DOTALL)
    assert testing and re.search(r"slicer_add_python_unittest\s*\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)",
                                 testing.group(1))


def test_shipped_resources_leave_out_only_files_no_runtime_code_reads():
    """Training logs are not shipped: check that FMSegCore really never reads them."""
    for path in sorted((REPO / "FMSegCore").rglob("*.py")):
        assert "log.jsonl" not in path.read_text(encoding="utf-8"), f"{path} reads a training log"
    shipped = set(cmake_sources.expected(REPO)["FMSegCore resources"])
    for path in sorted((REPO / "Resources" / "Models").iterdir()):
        relative = path.relative_to(REPO).as_posix()
        assert (relative in shipped) != path.name.endswith(".log.jsonl"), relative


# --------------------------------------------------------------------------------------------------------------
# The layout a build produces: configure the real module CMakeLists with stand-in Slicer/CTK macros

_HARNESS = textwrap.dedent("""\
    cmake_minimum_required(VERSION 3.16)
    project(FMSegPackagingHarness NONE)
    set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.8/qt-scripted-modules")
    set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
    set(BUILD_TESTING ON)
    set(HARNESS_LOG "${CMAKE_BINARY_DIR}/harness.log")
    file(WRITE "${HARNESS_LOG}" "")

    # Stand-in: copies each listed file, relative to SOURCE_DIR, to the same path under DESTINATION_DIR.
    function(ctkMacroCompilePythonScript)
      cmake_parse_arguments(ARG "NO_INSTALL_SUBDIR;GLOBAL_TARGET"
        "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
      if(ARG_UNPARSED_ARGUMENTS)
        message(FATAL_ERROR "ctkMacroCompilePythonScript: unknown arguments ${ARG_UNPARSED_ARGUMENTS}")
      endif()
      foreach(required TARGET_NAME SCRIPTS DESTINATION_DIR INSTALL_DIR)
        if(NOT ARG_${required})
          message(FATAL_ERROR "ctkMacroCompilePythonScript: ${required} is mandatory")
        endif()
      endforeach()
      if(NOT ARG_SOURCE_DIR)
        set(ARG_SOURCE_DIR "${CMAKE_CURRENT_SOURCE_DIR}")
      endif()
      foreach(file IN LISTS ARG_SCRIPTS ARG_RESOURCES)
        if(NOT EXISTS "${ARG_SOURCE_DIR}/${file}")
          message(FATAL_ERROR "ctkMacroCompilePythonScript(${ARG_TARGET_NAME}): no ${ARG_SOURCE_DIR}/${file}")
        endif()
        configure_file("${ARG_SOURCE_DIR}/${file}" "${ARG_DESTINATION_DIR}/${file}" COPYONLY)
      endforeach()
      file(APPEND "${HARNESS_LOG}" "compile ${ARG_TARGET_NAME} ${ARG_DESTINATION_DIR}\\n")
      install(DIRECTORY "${ARG_DESTINATION_DIR}/" DESTINATION "${ARG_INSTALL_DIR}")
    endfunction()

    function(slicerMacroBuildScriptedModule)
      cmake_parse_arguments(ARG "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
      if(ARG_UNPARSED_ARGUMENTS OR NOT ARG_NAME)
        message(FATAL_ERROR "slicerMacroBuildScriptedModule: bad arguments ${ARGN}")
      endif()
      file(APPEND "${HARNESS_LOG}" "module ${ARG_NAME} generic_tests=${ARG_WITH_GENERIC_TESTS}\\n")
      ctkMacroCompilePythonScript(TARGET_NAME ${ARG_NAME} SCRIPTS "${ARG_SCRIPTS}" RESOURCES "${ARG_RESOURCES}"
        DESTINATION_DIR "${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}"
        INSTALL_DIR "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" NO_INSTALL_SUBDIR)
    endfunction()

    function(slicer_add_python_unittest)
      cmake_parse_arguments(ARG "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
      file(APPEND "${HARNESS_LOG}" "unittest ${ARG_SCRIPT}\\n")
    endfunction()

    add_subdirectory("@MODULE_DIR@" FMSegSlicer)
    """)


def _copy_shipped_tree(destination: Path) -> Path:
    """A copy of the repository parts the extension ships, with the module files that may not exist yet."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "FMSegCore", destination / "FMSegCore", ignore=ignore)
    for folder in ("Models", "SampleData"):
        shutil.copytree(REPO / "Resources" / folder, destination / "Resources" / folder, ignore=ignore)
    shutil.copytree(REPO / "FMSegSlicer", destination / "FMSegSlicer", ignore=ignore)
    module = destination / "FMSegSlicer"
    for relative in ("FMSegSlicer.py", "FMSegSlicerLib/__init__.py", "Resources/UI/FMSegSlicer.ui"):
        (module / relative).parent.mkdir(parents=True, exist_ok=True)
        if not (module / relative).exists():
            (module / relative).write_text("")
    assert cmake_sources.main(["--root", str(destination), "--write"]) == 0
    return destination


@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake executable")
def test_built_and_installed_layout_puts_fmsegcore_beside_its_resources(tmp_path):
    source = _copy_shipped_tree(tmp_path / "source")
    harness = tmp_path / "harness"
    harness.mkdir()
    (harness / "CMakeLists.txt").write_text(_HARNESS.replace("@MODULE_DIR@", (source / "FMSegSlicer").as_posix()))
    build, prefix = tmp_path / "build", tmp_path / "install"
    configured = _run("cmake", "-S", harness, "-B", build, timeout=300)
    assert configured.returncode == 0, configured.stdout + configured.stderr
    installed = _run("cmake", "--install", build, "--prefix", prefix, timeout=300)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    log = (build / "harness.log").read_text().splitlines()
    assert "module FMSegSlicer generic_tests=TRUE" in log
    assert "unittest FMSegSlicer.py" in log
    assert any(line.startswith("compile FMSegCore ") for line in log), log

    listings = cmake_sources.expected(source)
    for modules in (build / "lib/Slicer-5.8/qt-scripted-modules", prefix / "lib/Slicer-5.8/qt-scripted-modules"):
        shipped = {path.relative_to(modules).as_posix() for path in modules.rglob("*") if path.is_file()}
        assert shipped == {*listings["FMSegSlicer scripts"], *listings["FMSegSlicer resources"],
                           *listings["FMSegCore scripts"], *listings["FMSegCore resources"]}
        assert "FMSegCore/zoo/cache.py" in shipped and "Resources/Models/universeg_fmseg_v1.pt" in shipped

    # Python started on the installed module folder (as Slicer puts it on sys.path) finds the package there,
    # and resources_dir() finds the shipped weights and sample data beside it.
    modules = prefix / "lib/Slicer-5.8/qt-scripted-modules"
    probe = textwrap.dedent("""\
        import json, FMSegCore
        from FMSegCore.zoo.cache import cached_path, resources_dir
        from FMSegCore.zoo.registry import list_cards
        bundled = [str(cached_path(card)) for card in list_cards() if card.parsed_source.kind == "bundled"]
        print(json.dumps({"package": FMSegCore.__file__, "resources": str(resources_dir()), "bundled": bundled}))
        """)
    env = dict(os.environ, PYTHONPATH=str(modules))
    result = _run(sys.executable, "-c", probe, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).resolve() == (modules / "FMSegCore" / "__init__.py").resolve()
    assert Path(found["resources"]).resolve() == (modules / "Resources").resolve()
    assert found["bundled"], "no bundled model card"
    for path in found["bundled"]:
        assert Path(path).is_file() and Path(path).resolve().is_relative_to(modules.resolve()), path
    assert (modules / "Resources" / "SampleData" / "ct_chest_small" / "image.nii.gz").is_file()


# --------------------------------------------------------------------------------------------------------------
# Root CMakeLists: extension metadata

_METADATA = ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS")


def _code(text: str) -> str:
    """CMake text without its line comments; a '#' inside a quoted argument (a URL's fragment) stays."""
    kept, quoted, escaped, comment = [], False, False, False
    for char in text:
        if comment:
            if char == "\n":
                comment = False
                kept.append(char)
            continue
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "#" and not quoted:
            comment = True
            continue
        kept.append(char)
    return "".join(kept)


def _root_metadata() -> dict[str, str]:
    text = _code((REPO / "CMakeLists.txt").read_text())
    return {name: value for name, value in re.findall(r'set\s*\(\s*EXTENSION_(\w+)\s+"([^"]*)"\s*\)', text)}


def test_root_cmakelists_has_every_metadata_variable():
    metadata = _root_metadata()
    for name in _METADATA:
        assert metadata.get(name, "").strip(), f"EXTENSION_{name} is missing or empty"
    assert metadata["CATEGORY"] == "Segmentation"
    assert "PyTorch" in metadata["DEPENDS"].split()
    assert metadata["HOMEPAGE"].startswith("https://github.com/fmseg/FMSeg")


@pytest.mark.parametrize("name", ["ICONURL", "SCREENSHOTURLS"])
def test_metadata_image_urls_point_at_files_in_the_repository(name):
    urls = _root_metadata()[name].split()
    assert urls
    for url in urls:
        assert url.startswith(RAW_PREFIX), url
        path = REPO / url[len(RAW_PREFIX):]
        assert path.is_file(), f"{url}: no {path.relative_to(REPO)} in the repository"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{url} is not a PNG"
    if name == "ICONURL":
        assert REPO / urls[0][len(RAW_PREFIX):] == ICON


def test_root_cmakelists_adds_the_module_unconditionally_between_slicer_setup_and_packaging():
    lines = [line.strip() for line in _code((REPO / "CMakeLists.txt").read_text()).splitlines() if line.strip()]

    def index(pattern: str) -> int:
        matches = [number for number, line in enumerate(lines) if re.fullmatch(pattern, line)]
        assert len(matches) == 1, f"{pattern}: {len(matches)} matches"
        return matches[0]

    metadata = max(index(rf'set\(EXTENSION_{name}\s+".*"\)') for name in _METADATA)
    find = index(r"find_package\(Slicer REQUIRED\)")
    use = index(r"include\(\$\{Slicer_USE_FILE\}\)")
    module = index(r"add_subdirectory\(FMSegSlicer\)")
    config = index(r"include\(\$\{Slicer_EXTENSION_GENERATE_CONFIG\}\)")
    cpack = index(r"include\(\$\{Slicer_EXTENSION_CPACK\}\)")
    assert metadata < find < use < module < config < cpack
    depth = 0
    for line in lines[:module]:
        depth += bool(re.match(r"if\s*\(", line)) - bool(re.match(r"endif\s*\(", line))
    assert depth == 0, "add_subdirectory(FMSegSlicer) must not sit inside an if()"


# --------------------------------------------------------------------------------------------------------------
# Extensions Index catalog entry

#: The constraints of slicer-extension-catalog-entry-schema-v1.0.2.json, written out for this test.
CATALOG_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["$schema", "category", "scm_url"],
    "additionalProperties": False,
    "properties": {
        "$schema": {"type": "string"},
        "category": {"type": "string"},
        "scm_url": {"type": "string"},
        "scm_revision": {"type": "string"},
        "scm_type": {"type": "string", "enum": ["git", "local"]},
        "build_dependencies": {"type": "array", "items": {"type": "string"}},
        "dicom_support_rule": {"type": "string"},
        "build_subdirectory": {"type": "string"},
        "enabled": {"type": "boolean"},
        "tier": {"type": "integer", "minimum": 1, "maximum": 5},
    },
}


def _catalog() -> dict:
    return json.loads(CATALOG.read_text(encoding="utf-8"))


def _catalog_errors(entry: dict) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(CATALOG_SCHEMA)
    return [error.message for error in validator.iter_errors(entry)]


def test_catalog_schema_is_a_valid_draft7_schema():
    pytest.importorskip("jsonschema").Draft7Validator.check_schema(CATALOG_SCHEMA)


def test_catalog_entry_validates_and_matches_the_extension():
    entry = _catalog()
    assert _catalog_errors(entry) == []
    assert entry["$schema"] == CATALOG_SCHEMA_URL
    assert entry["scm_url"] == "https://github.com/fmseg/FMSeg.git"
    assert entry["scm_revision"] == "main"
    assert entry["tier"] == 1 and entry["enabled"] is True
    metadata = _root_metadata()
    assert entry["category"] == metadata["CATEGORY"]
    assert entry["build_dependencies"] == metadata["DEPENDS"].split()


@pytest.mark.parametrize(("change", "expected"), [
    (lambda entry: entry.update(homepage="https://example.org"), "Additional properties"),
    (lambda entry: entry.pop("scm_url"), "'scm_url' is a required property"),
    (lambda entry: entry.pop("$schema"), "'$schema' is a required property"),
    (lambda entry: entry.update(tier=6), "greater than the maximum"),
    (lambda entry: entry.update(scm_type="svn"), "is not one of"),
    (lambda entry: entry.update(build_dependencies="PyTorch"), "is not of type 'array'"),
])
def test_catalog_entry_changes_that_break_the_schema_are_caught(change, expected):
    entry = _catalog()
    change(entry)
    errors = _catalog_errors(entry)
    assert any(expected in error for error in errors), errors


# --------------------------------------------------------------------------------------------------------------
# Icon


def test_icon_is_a_128_pixel_square_png():
    data = ICON.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_icon_is_what_the_drawing_script_draws():
    image_module = pytest.importorskip("PIL.Image")
    draw_icon = _load("fmseg_draw_icon", REPO / "Utilities" / "draw_icon.py")
    drawn = draw_icon.draw().convert("RGBA")
    with image_module.open(ICON) as stored:
        committed = stored.convert("RGBA")
    assert committed.size == drawn.size == (128, 128)
    stored_pixels = np.asarray(committed, dtype=np.int16)
    difference = np.abs(stored_pixels - np.asarray(drawn, dtype=np.int16))
    assert difference.max() <= 2, "the icon differs from Utilities/draw_icon.py's drawing: rerun the script"
    assert len(np.unique(stored_pixels.reshape(-1, 4), axis=0)) > 20, "the icon is (nearly) blank"


# --------------------------------------------------------------------------------------------------------------
# The Slicer test runner


def test_runner_without_slicer_skips_with_one_line():
    result = _run(sys.executable, RUNNER, env=_env_without_slicer())
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "skipped" in lines[0] and "SLICER_EXECUTABLE" in lines[0], lines


def test_runner_without_slicer_fails_when_required():
    result = _run(sys.executable, RUNNER, "--require", env=_env_without_slicer())
    assert result.returncode == 2
    assert "skipped" in result.stdout


def test_runner_with_a_slicer_path_that_is_not_executable_skips(tmp_path):
    env = dict(_env_without_slicer(), SLICER_EXECUTABLE=str(tmp_path / "no-such-Slicer"))
    assert _run(sys.executable, RUNNER, env=env).returncode == 0
    result = _run(sys.executable, RUNNER, "--require", env=env)
    assert result.returncode == 2 and "no-such-Slicer" in result.stdout


def _fake_slicer(folder: Path, exit_code: int) -> Path:
    """An executable that records its arguments (one a line) and PYTHONPATH, then exits with ``exit_code``."""
    fake = folder / "Slicer"
    fake.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        printf '%s\\n' "$@" > "{folder}/arguments.txt"
        printf '%s\\n' "$PYTHONPATH" > "{folder}/pythonpath.txt"
        exit {exit_code}
        """))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return fake


@pytest.mark.skipif(sys.platform == "win32", reason="the fake Slicer is a shell script")
@pytest.mark.parametrize("exit_code", [0, 3])
def test_runner_runs_the_module_test_in_slicer_and_returns_its_exit_code(tmp_path, exit_code):
    fake = _fake_slicer(tmp_path, exit_code)
    result = _run(sys.executable, RUNNER, "--slicer", fake, env=_env_without_slicer())
    assert result.returncode == exit_code, result.stdout + result.stderr

    arguments = (tmp_path / "arguments.txt").read_text().splitlines()
    module_path = str(REPO / "FMSegSlicer")
    assert arguments[:5] == ["--no-splash", "--testing", "--additional-module-paths", module_path, "--python-code"]
    assert len(arguments) == 6
    assert (tmp_path / "pythonpath.txt").read_text().split(os.pathsep)[0].strip() == str(REPO)

    # The code Slicer would run calls slicer.testing.runUnitTest with the module folder and the module name.
    calls = []
    testing = type(sys)("slicer.testing")
    testing.runUnitTest = lambda path, name: calls.append((path, name))
    slicer = type(sys)("slicer")
    slicer.testing = testing
    saved = {name: sys.modules.get(name) for name in ("slicer", "slicer.testing")}
    sys.modules.update({"slicer": slicer, "slicer.testing": testing})
    try:
        exec(compile(arguments[5], "<python-code>", "exec"), {})
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    assert len(calls) == 1
    path, name = calls[0]
    assert name == "FMSegSlicer" and path[0] == module_path and str(REPO) in path


@pytest.mark.skipif(sys.platform == "win32", reason="the fake Slicer is a shell script")
def test_runner_takes_slicer_from_the_environment_and_another_module_path(tmp_path):
    fake = _fake_slicer(tmp_path, 0)
    modules = tmp_path / "build" / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    (modules / "FMSegCore").mkdir(parents=True)  # a build tree ships FMSegCore beside the module
    env = dict(_env_without_slicer(), SLICER_EXECUTABLE=str(fake), PYTHONPATH="/elsewhere")
    result = _run(sys.executable, RUNNER, "--require", "--module-path", modules, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    arguments = (tmp_path / "arguments.txt").read_text().splitlines()
    assert arguments[2:4] == ["--additional-module-paths", str(modules.resolve())]
    # The shipped FMSegCore is used: the checkout is put neither on PYTHONPATH nor on the test's search path.
    assert (tmp_path / "pythonpath.txt").read_text().strip() == "/elsewhere"
    assert str(REPO) not in arguments[5].replace(str(modules.resolve()), "")


@pytest.mark.skipif(not os.environ.get("SLICER_EXECUTABLE"), reason="no Slicer executable (set SLICER_EXECUTABLE)")
def test_module_test_passes_inside_real_slicer():
    result = _run(sys.executable, RUNNER, "--require", timeout=SLICER_RUN_TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
