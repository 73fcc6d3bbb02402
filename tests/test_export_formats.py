"""The export formats' table (imgrec.infer.export.FORMATS): every entry complete, the CLI's --format choices
taken from it without importing torch, an unknown format refused in one line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import assert_clean_error, run_cli


def test_every_format_has_its_functions_and_file_names():
    from imgrec.infer.export import DEFAULT_FORMAT, FORMATS
    assert DEFAULT_FORMAT in FORMATS and {"onnx", "torchscript"} <= set(FORMATS)
    for name, spec in FORMATS.items():
        assert spec.name == name
        assert callable(spec.write) and callable(spec.run), name
        for optional in (spec.needs, spec.inspect, spec.check_unknown):
            assert optional is None or callable(optional), name
        assert spec.suffixes and all(s.startswith(".") for s in spec.suffixes), name
        assert spec.default_name.endswith(spec.suffixes), name
        assert spec.int8_name is None or spec.int8_name.endswith(spec.suffixes), name
    # `export --check` tells the format from the file name: no ending may belong to two formats
    endings = [s for spec in FORMATS.values() for s in spec.suffixes]
    assert len(endings) == len(set(endings))


def test_the_cli_choices_are_the_table_and_building_the_parser_imports_no_torch():
    code = ("import sys\nfrom imgrec.cli import build_parser\np = build_parser()\n"
            "print('torch' in sys.modules)\n"
            "export = p._subparsers._group_actions[0].choices['export']\n"
            "fmt = next(a for a in export._actions if a.dest == 'format')\n"
            "from imgrec.infer.export import FORMATS\nprint(list(fmt.choices) == list(FORMATS))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]


def test_an_unknown_format_is_refused_in_one_line(tmp_path):
    r = run_cli("export", "--model", tmp_path, "--format", "tflite")
    assert_clean_error(r, "unknown export format 'tflite'", "onnx", "torchscript")
    assert r.returncode == 2 and "usage:" not in r.stderr


def test_the_library_refuses_an_unknown_format_and_int8_where_there_is_none(tmp_path):
    from imgrec.errors import ConfigError
    from imgrec.infer.export import export_model
    with pytest.raises(ConfigError, match="unknown export format 'tflite'; choose one of: onnx, torchscript"):
        export_model(tmp_path, fmt="tflite")
    with pytest.raises(ConfigError, match="--int8 needs --format onnx"):
        export_model(tmp_path, fmt="torchscript", int8=True)
