"""Commands that write files where they cannot: a line naming the option, the path and the
cause, exit 1, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from eobblast.cli import main


def _refused(args: list[str]) -> str:
    """The error line of a command that must fail cleanly."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    # A ClickException, said; not an exception click would show as a traceback.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    [line] = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    return line


@pytest.mark.parametrize(
    ("where", "cause"),
    [
        ("/nonexistent/x.jsonl", "No such file or directory"),
        ("{tmp}/a-file/x.jsonl", "Not a directory"),
    ],
)
def test_generate_to_a_file_that_cannot_be_written(tmp_path: Path, where: str, cause: str) -> None:
    (tmp_path / "a-file").touch()
    out = where.format(tmp=tmp_path)
    line = _refused(["generate", "-n", "1", "--out", out])
    assert line == f"Error: --out {out}: cannot be written: {cause}"


@pytest.mark.parametrize(
    ("where", "cause"),
    [
        ("/proc/nope", "No such file or directory"),
        ("{tmp}/a-file/keys", "Not a directory"),
    ],
)
def test_keys_generate_where_keys_cannot_be_made(tmp_path: Path, where: str, cause: str) -> None:
    (tmp_path / "a-file").touch()
    key_dir = where.format(tmp=tmp_path)
    line = _refused(["keys", "generate", "-d", "acme-health.com", "--key-dir", key_dir])
    assert line == f"Error: --key-dir {key_dir}: the keys cannot be made there: {cause}"


def test_keys_generate_says_which_existing_key_does_not_load(tmp_path: Path) -> None:
    # Existing keys are kept and read again for their DNS records.
    key = tmp_path / "acme-health.com.eob1e.ed25519.pem"
    key.mkdir()
    line = _refused(["keys", "generate", "-d", "acme-health.com", "--key-dir", str(tmp_path)])
    assert line == f"Error: DKIM ed25519 key at {key} is unreadable (Is a directory)"


def test_keys_generate_refuses_a_domain_that_is_no_dns_name(tmp_path: Path) -> None:
    line = _refused(["keys", "generate", "-d", "bad domain", "--key-dir", str(tmp_path)])
    assert line == "Error: DKIM domain 'bad domain' is not an ASCII DNS name"
