from __future__ import annotations

import pytest

from services.cli.main import main, printable


def test_server_text_cannot_drive_the_terminal() -> None:
    assert printable("a\x1b[31mred\x00\nnext") == "a\\x1b[31mred\\x00\nnext"


def test_missing_input_file_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["invoke", "com.example.x", "--input-file", "/nonexistent/input", "--gateway", "127.0.0.1:9"])
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot read --input-file" in err and "Traceback" not in err


def test_timeouts_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["status", "--timeout", "-1"])
    assert caught.value.code == 2
    assert "more than 0 seconds" in capsys.readouterr().err


def test_unreachable_gateway_says_what_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["status", "--gateway", "127.0.0.1:9", "--timeout", "2"])
    assert code == 2
    assert "Is `clawhub up` running?" in capsys.readouterr().err


def test_too_deep_json_input_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    deep = "[" * 200 + "]" * 200
    assert main(["invoke", "com.example.x", "--input", deep, "--gateway", "127.0.0.1:9"]) == 1
    assert "nested too deeply" in capsys.readouterr().err
