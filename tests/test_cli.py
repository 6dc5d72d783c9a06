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
