"""argparse `type=` validators for the `glm5` flags (each turns a bad value into a message stating the rule), and
`print_error`, the one `glm5: error: ...` line every command reports a user error with.

Every numeric flag of every subcommand goes through one of these, so a bad value stops the command before it
loads a model or writes a file. argparse prefixes the message with the flag (`argument --port: ...`) and
`glm5.cli` prints it as one `glm5: error: ...` line with exit code 2. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

MAX_PORT = 65_535


def print_error(message: str) -> None:
    """`glm5: error: MESSAGE` on stderr, in red, on one line whatever the message held."""
    from rich.console import Console  # lazy: torch-free CLI start-up
    from rich.text import Text  # lazy: torch-free CLI start-up

    message = " ".join(message.split())
    Console(stderr=True, highlight=False, soft_wrap=True).print(Text(f"glm5: error: {message}", style="red"))


def _number(text: str, kind: type, what: str) -> int | float:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def int_range(
    low: int | None = None, high: int | None = None, name: str | None = None
) -> Callable[[str], int]:
    """An integer in [low, high] (either bound may be None: open)."""
    if low is not None and high is not None:
        what = f"an integer from {low} to {high}"
    elif low is not None:
        what = f"an integer >= {low}"
    elif high is not None:
        what = f"an integer <= {high}"
    else:
        what = "an integer"

    def parse(text: str) -> int:
        value = _number(text, int, what)
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = name or "int_range"
    return parse


def float_range(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    name: str | None = None,
) -> Callable[[str], float]:
    """A finite float between low and high (each bound inclusive unless `*_open`; None: unbounded)."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    what = "a number" + (" " + " and ".join(parts) if parts else "")

    def parse(text: str) -> float:
        value = float(_number(text, float, what))
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value:g}")
        return value

    parse.__name__ = name or "float_range"
    return parse


positive_int = int_range(1, name="positive_int")
"""An integer >= 1 (counts, sizes, steps)."""
nonnegative_int = int_range(0, name="nonnegative_int")
"""An integer >= 0 (0 meaning off / none)."""
positive_float = float_range(0.0, low_open=True, name="positive_float")
"""A finite number > 0 (durations, sizes)."""
nonnegative_float = float_range(0.0, name="nonnegative_float")
"""A finite number >= 0."""
fraction = float_range(0.0, 1.0, low_open=True, name="fraction")
"""A number in (0, 1] (efficiencies, probabilities that must not be 0)."""
port = int_range(1, MAX_PORT, name="port")
"""A TCP port, 1-65535."""


def text(value: str) -> str:
    """Text from the command line that is valid Unicode.

    Python decodes argv bytes that are not UTF-8 to lone surrogates ("surrogateescape"); no tokenizer or terminal
    can take those, so reject them here, naming the first bad byte."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        byte = f"0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else repr(bad)
        raise argparse.ArgumentTypeError(
            f"is not valid UTF-8 text (byte {byte} at character {e.start}); pass UTF-8 text, e.g. from a file with "
            '"$(cat prompt.txt)"'
        ) from None
    return value


def output_path(value: str) -> str:
    """A folder to write into: it may exist (as a folder) or not, but must not be a file."""
    text(value)
    if os.path.exists(value) and not os.path.isdir(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is a file; name a folder (new, or one to resume/replace)"
        )
    return value


def existing_dir(value: str) -> str:
    """A folder that exists (a checkpoint, a tokenizer)."""
    text(value)
    if not os.path.exists(value):
        raise argparse.ArgumentTypeError(f"no such folder {value!r}")
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value!r} is a file; pass a folder")
    return value


def existing_file(value: str) -> str:
    """A file that exists."""
    text(value)
    if not os.path.isfile(value):
        raise argparse.ArgumentTypeError(
            f"no such file {value!r}" if not os.path.exists(value) else f"{value!r} is not a file"
        )
    return value
