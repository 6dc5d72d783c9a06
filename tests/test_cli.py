import json

from conftest import run_cli

from cerberus_histo import __version__


def test_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("demo", "import-original", "info"):
        assert command in proc.stdout


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_unknown_command_is_a_usage_error():
    proc = run_cli("segment-everything")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_quick_demo_runs_twice(tmp_path):
    for _ in range(2):  # idempotent
        proc = run_cli("demo", "--quick", "--out", tmp_path / "demo")
        assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert result["reload_max_abs_diff"] == 0.0
    assert set(result["heads"]) == {"gland-inst", "gland-type", "lumen-inst", "nuclei-inst", "nuclei-type",
                                    "tissue-class"}
    assert (tmp_path / "demo" / "index.md").exists() and (tmp_path / "demo" / "model" / "weights.pt").exists()
