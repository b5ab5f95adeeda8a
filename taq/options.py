"""Command-line options that several commands share: the model and where its weights come from, the histogram
layout, and value types whose errors name the option. Errors are one line and exit status 2."""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

from taq.config import DEFAULT_MODEL
from taq.tracing.histogram import HistogramSpec, HistogramSpecError



def histogram_option_names(prefix: str = "--") -> dict[str, str]:
    """HistogramSpec field -> option name: --bins, --hist-scale, --hist-limit (the test suite's: --taq-...)."""
    return {"bins": f"{prefix}bins", "scale": f"{prefix}hist-scale", "limit": f"{prefix}hist-limit"}


HISTOGRAM_OPTIONS = histogram_option_names()


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit status 2); its subparsers are Parsers too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind: type, at_least: float | None = None, above: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite `kind` (int or float), >= at_least or > above."""
    bound = f" >= {at_least:g}" if at_least is not None else f" > {above:g}" if above is not None else ""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (at_least is not None and value < at_least) or (
                above is not None and value <= above):
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}{bound}, "
                                             f"got {text!r}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def add_model_options(parser: argparse.ArgumentParser, *, default: str = DEFAULT_MODEL) -> None:
    parser.add_argument("--model", default=default, help="model preset (default: %(default)s)")
    parser.add_argument("--checkpoint", help="SD3-layout weights for presets that do not ship theirs (sd3-medium)")
    parser.add_argument("--random-weights", action="store_true",
                        help="seeded random weights for a preset without shipped weights (recorded in the output; "
                             "the numbers then describe no trained model)")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="compute dtype; auto: float32 on the CPU and for pocket, bfloat16 for SD3-size models "
                             "on GPUs (recorded in the output) (default: %(default)s)")


def add_histogram_options(add: Callable, names: dict[str, str] = HISTOGRAM_OPTIONS) -> None:
    """The histogram layout's options (see taq.tracing.histogram). `add` is `parser.add_argument` or a pytest
    option group's `addoption`; `names` maps spec fields to option names."""
    default = HistogramSpec()
    add(names["bins"], dest="hist_bins", type=int, default=default.bins, metavar="N",
        help="histogram bins, even; they hold every finite value (default: %(default)s)")
    add(names["scale"], dest="hist_scale", type=float, default=default.scale, metavar="S",
        help="bins are uniform in asinh(x / S): linear within about +-S, logarithmic beyond (default: 1/64)")
    add(names["limit"], dest="hist_limit", type=float, default=default.limit, metavar="L",
        help="the fine bins span +-L; one end bin on each side holds the rest (default: %(default)g)")


def histogram_spec(bins, scale, limit, names: dict[str, str] = HISTOGRAM_OPTIONS) -> HistogramSpec:
    """HistogramSpec(bins, scale, limit); a bad value is a ValueError naming its option in `names`."""
    try:
        return HistogramSpec(bins, scale, limit)
    except HistogramSpecError as exc:
        raise ValueError(f"{names[exc.field]} {exc.problem}") from None


def histogram_spec_from(args: argparse.Namespace) -> HistogramSpec:
    return histogram_spec(args.hist_bins, args.hist_scale, args.hist_limit)


@contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Within the block, show warnings as `taq <command>: warning: ...`, one line each, instead of Python's two."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"taq {command}: warning: {message}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
