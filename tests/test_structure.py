"""What each import and command pulls in, the optional campaign extra, the version and the type marker.

Imports are measured in fresh interpreters (`-P`: the working folder is not on the path, so they
import the oppass the tests import).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO_ROOT

import oppass
from oppass import campaign, cli

HEAVY = ("onnx", "onnxruntime", "scipy", "matplotlib", "dask", "distributed")


def loaded_after(code: str) -> dict[str, list[str]]:
    """The heavy packages and oppass modules loaded by `code` run in a fresh interpreter."""
    script = (f"import sys\n{code}\nimport json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules "
              f"if m.split('.')[0] in {HEAVY!r}}})))\nprint(json.dumps(sorted(m for m in sys.modules if "
              f"m.startswith('oppass'))))")
    result = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, check=True)
    heavy, own = result.stdout.splitlines()[-2:]
    return {"heavy": json.loads(heavy), "oppass": json.loads(own)}


@pytest.mark.parametrize("code", ["import oppass.codec", "import oppass", "import oppass.formats",
                                  "from oppass import OppassError, codec, faults"])
def test_the_codec_and_the_package_load_neither_onnx_nor_onnxruntime(code: str) -> None:
    assert loaded_after(code)["heavy"] == []


@pytest.mark.parametrize("option", ["--help", "--version"])
def test_help_and_version_load_neither_onnx_nor_onnxruntime(option: str) -> None:
    loaded = loaded_after(f"from oppass import cli\ntry:\n    cli.main([{option!r}])\nexcept SystemExit:\n    pass")
    assert loaded["heavy"] == [] and "oppass.campaign" not in loaded["oppass"]


def test_the_store_and_the_summaries_import_no_onnx_runtime() -> None:
    loaded = loaded_after("import oppass.campaign.store, oppass.campaign.summary, oppass.campaign.records")
    assert "onnx" not in loaded["heavy"] and "onnxruntime" not in loaded["heavy"]


def test_the_entry_point_loads_little_before_it_holds_sigint() -> None:
    """`python -m oppass` and the `oppass` script hold SIGINT in `oppass.__main__.run`: what loads before it
    (the package and `__main__`) is a window where Ctrl-C prints a traceback, so it imports neither typing
    (15 ms) nor numpy. An editable install's finder imports importlib.util, which is not ours."""
    script = ("import sys\nbefore = set(sys.modules)\nimport oppass.__main__\n"
              "print(' '.join(sorted(set(sys.modules) - before)))")
    result = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, check=True)
    loaded = set(result.stdout.split())
    assert {"oppass", "oppass.errors", "oppass.__main__"} <= loaded
    assert not loaded & {"typing", "numpy", "oppass.cli"}, sorted(loaded)


def test_each_command_imports_what_it_needs_only() -> None:
    inspect = loaded_after("from oppass import cli\ntry:\n    cli.main(['inspect', '/nonexistent.onnx'])\n"
                           "except SystemExit:\n    pass")
    assert inspect["heavy"] == ["onnx"]
    help_of_campaign = loaded_after("from oppass import cli\ntry:\n    cli.main(['campaign', '--help'])\n"
                                    "except SystemExit:\n    pass")
    assert help_of_campaign["heavy"] == []


def test_the_public_api_resolves_lazily_to_its_modules() -> None:
    from oppass import protect, protected_models, runtime

    assert oppass.transform is protect.transform and oppass.transform_with_report is protect.transform_with_report
    assert (oppass.inspect, oppass.strip, oppass.inject) == (protected_models.inspect, protected_models.strip,
                                                              protected_models.inject)
    assert oppass.load_session is runtime.load_session and oppass.optimize_for_cpu is runtime.optimize_for_cpu
    assert set(oppass.__all__) <= set(dir(oppass))
    assert all(callable(getattr(oppass, name)) for name in oppass.__all__)
    with pytest.raises(AttributeError, match="no attribute 'graph'"):
        oppass.graph  # noqa: B018


def test_version_is_defined_once_and_printed_by_the_command(capsys: pytest.CaptureFixture) -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    provider = project["tool"]["scikit-build"]["metadata"]["version"]
    assert provider == {"provider": "scikit_build_core.metadata.regex", "input": "oppass/__init__.py"}
    source = (REPO_ROOT / "oppass" / "__init__.py").read_text()
    assert re.findall(r'^__version__ = "(.+)"$', source, re.MULTILINE) == [oppass.__version__]
    with pytest.raises(SystemExit) as raised:
        cli.main(["--version"])
    assert raised.value.code == 0 and capsys.readouterr().out == f"oppass {oppass.__version__}\n"


def test_the_package_ships_a_type_marker() -> None:
    assert (Path(oppass.__file__).parent / "py.typed").is_file()


def test_the_campaign_extra_is_in_the_test_extra_and_not_a_core_dependency() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=;\[ ]", requirement)[0].lower() for requirement in project["dependencies"]}
    assert names == {"numpy", "ml_dtypes", "onnx", "onnxruntime", "protobuf"}  # protobuf: oppass.modelio uses it
    assert "oppass[campaign]" in project["optional-dependencies"]["test"]
    extra = {re.split(r"[<>=;\[ ]", requirement)[0].lower() for requirement in
             project["optional-dependencies"]["campaign"]}
    modules = {"pillow": "PIL"}
    assert {modules.get(name, name) for name in extra} == set(campaign.EXTRA_MODULES)


@pytest.mark.parametrize("missing", campaign.EXTRA_MODULES)
@pytest.mark.parametrize("command", ["campaign", "demo"])
def test_campaign_and_demo_without_the_extra_say_what_to_install(missing: str, command: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    arguments = {"campaign": ["campaign", str(REPO_ROOT / "oppass" / "examples" / "digits_cnn.onnx"), "--data",
                              "digits", "--out", str(out), "--scheduler", "serial"],
                 "demo": ["demo", "--out", str(out)]}[command]
    code = (f"import sys\nsys.modules[{missing!r}] = None  # as if not installed: importing it fails\n"
            f"from oppass import cli\nsys.exit(cli.main({arguments!r}))")
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"oppass: error: campaigns need {missing}, which is not installed: " \
                            "pip install 'oppass[campaign]'\n"
    assert not out.exists()
