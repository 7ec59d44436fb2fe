"""Settings for every script: one dataclass at the script's top, overridden by config files, then flags.

    python pretrain.py config/pretrain_tiny.py --batch_size=16 --compile=false

Each field becomes a `--name` flag; the comment after a field is its --help text. A config file is
Python whose top-level assignments set fields (nanoGPT's configurator, with names checked).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _field_comments(cls: type) -> dict[str, str]:
    """`name: type = default  # comment` lines of the dataclass source and of the dataclasses it
    inherits from, as {name: comment}; a subclass's comment wins."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        found = re.findall(r"^\s+(\w+)\s*:[^=\n]*=[^\n#]*#\s*(.+)$", source, flags=re.M)
        comments.update({name: text.strip() for name, text in found})
    return comments


def _converter(annotation: Any):
    """A function from the flag's string to the field's type (int, float, str, bool, X | None)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if args and (typing.get_origin(annotation) in (typing.Union, types.UnionType)):
        annotation = next(a for a in args if a is not type(None))

    def convert(text: str):
        if optional and text.lower() in {"none", "null", ""}:
            return None
        if annotation is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        if annotation in (int, float, str):
            return annotation(text)
        return text
    convert.__name__ = getattr(annotation, "__name__", str(annotation))
    return convert


def read_config_file(path: str) -> dict[str, Any]:
    """The top-level assignments of a Python config file."""
    values: dict[str, Any] = {}
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), {}, values)
    return {k: v for k, v in values.items() if not k.startswith("_") and not isinstance(v, types.ModuleType)}


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """An instance of the settings dataclass cls: defaults < config files (in order) < --flags."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", metavar="config.py",
                        help="config files (Python assignments) applied in order before the flags")
    names = [f.name for f in dataclasses.fields(cls)]
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        parser.add_argument(f"--{field.name}", type=_converter(hints[field.name]), default=argparse.SUPPRESS,
                            help=f"{comments.get(field.name, '')} (default: {default!r})")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    values: dict[str, Any] = {}
    for path in args.configs:
        try:
            file_values = read_config_file(path)
        except FileNotFoundError:
            parser.error(f"config file {path} does not exist")
        except Exception as e:  # a config file is user code: report its error in one line
            parser.error(f"config file {path}: {type(e).__name__}: {e}")
        unknown = sorted(set(file_values) - set(names))
        if unknown:
            parser.error(f"config file {path}: unknown settings {unknown} (see --help for the known ones)")
        values.update(file_values)
    values.update({k: v for k, v in vars(args).items() if k != "configs"})
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
