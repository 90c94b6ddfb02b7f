"""CLI surface: every design.md command is registered; user errors are one line with exit 2."""

from __future__ import annotations

import subprocess
import sys

from modelkin.cli import COMMANDS, build_parser, main


def test_all_design_commands_registered():
    names = {name for name, _, _ in COMMANDS}
    assert names >= {"doctor", "run", "score", "inspect", "fingerprint", "compare", "export-onnx",
                     "make-tiny", "demo"}
    parser = build_parser()
    for name in names:
        # every command parses --help (exits 0) and therefore has its parser wired
        try:
            parser.parse_args([name, "--help"])
        except SystemExit as stop:
            assert stop.code == 0


def test_python_dash_m_and_version():
    proc = subprocess.run([sys.executable, "-m", "modelkin", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("modelkin ")


def test_unknown_command_exits_2(capsys):
    try:
        main(["no-such-command"])
    except SystemExit as stop:
        assert stop.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_user_error_is_one_line_without_traceback(cli):
    proc = cli("doctor", "--device", "cuda:banana")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["modelkin: error: invalid device 'cuda:banana' (fix: use auto, cpu, cuda, cuda:N, npu or npu:N)"]


def test_json_to_unwritable_path_is_user_error(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = cli("doctor", "--json", str(blocker / "sub" / "out.json"))
    assert proc.returncode == 2 and "cannot write JSON" in proc.stderr


def test_public_api_names_survive_subpackage_imports():
    import modelkin
    import modelkin.compare.verdict  # noqa: F401  (binds modelkin.compare to the subpackage)
    from modelkin.compare.api import compare

    assert callable(modelkin.compare)
    assert modelkin.compare.compare is compare
    assert callable(modelkin.load) and callable(modelkin.inspect_checkpoint) and callable(modelkin.fingerprint)


def test_public_compare_name_when_it_is_used_before_any_subpackage_import():
    code = ("import modelkin\nfirst = modelkin.compare\nimport modelkin.compare.verdict\n"
            "assert callable(first) and modelkin.compare is first\n"
            "assert modelkin.compare.verdict.decide and modelkin.compare.compare is modelkin.compare.api.compare\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
