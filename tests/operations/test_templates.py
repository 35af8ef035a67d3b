"""Template intervals: what operators type for --every."""

from __future__ import annotations

import pytest

from tandem.errors import InvalidInput
from tandem.operations.templates import format_every, parse_every


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("1h", 3600),
        ("1d", 86400),
        ("1h30m", 5400),
        ("90", 90),
        (" 2S ", 2),
    ],
)
def test_parse_every(text: str, seconds: int) -> None:
    assert parse_every(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "5x", "1h 30m", "-5s", "0s", "400d", "1.5h", "9" * 12])
def test_parse_every_refuses(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_every(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, None), (2, "2s"), (900, "15m"), (5400, "1h30m"), (90061, "1d1h1m1s")],
)
def test_format_every(seconds: int | None, text: str | None) -> None:
    assert format_every(seconds) == text
    if seconds is not None:
        assert parse_every(str(text)) == seconds
