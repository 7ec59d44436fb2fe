"""Settings for every script: one dataclass at the script's top, overridden by config files, then flags.

    python pretrain.py config/pretrain_tiny.py --batch_size=16 --compile=false

Each field becomes a `--name` flag; the comment after a field is its --help text. A config file is
Python whose top-level assignments set fields (nanoGPT's configurator, with names checked). Model
presets (config/tiny.py, config/baby_92m.py...) are read the same way, into model.ModelArgs: a name
that is not a setting is a one-line error, in a preset as in a recipe.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from babyllama.errors import SettingError
from model import ModelArgs

T = TypeVar("T")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "config")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Check:
    """What a setting's value must be, declared in its type: `batch_size: Positive = 16`."""
    low: float | None = None  # the smallest value allowed
    high: float | None = None  # the largest value allowed
    above: float | None = None  # values must be greater than this
    choices: tuple[str, ...] = ()  # the values allowed
    pattern: str = ""  # a regular expression the whole value matches
    expected: str = ""  # what pattern means, for the error
    path: str = ""  # file: an existing file ('' for none); out_dir: not a file; out_file: not a folder;
    # out_dir, out_file and out_path (either): nothing above it is a file

    def problem(self, value: Any, check_files: bool = True) -> str | None:
        """Why value is not allowed, or None."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # check_value refused nan and inf
            if self.low is not None and value < self.low:
                return f"must be at least {_number(self.low)}"
            if self.high is not None and value > self.high:
                return f"must be at most {_number(self.high)}"
            if self.above is not None and value <= self.above:
                return f"must be greater than {_number(self.above)}"
        if isinstance(value, str):
            if self.choices and value not in self.choices:
                return "must be one of " + ", ".join(c or "'' (empty)" for c in self.choices)
            if self.pattern and not re.fullmatch(self.pattern, value):
                return f"must be {self.expected or self.pattern}"
            return self._path_problem(value, check_files)
        return None

    def _path_problem(self, path: str, check_files: bool) -> str | None:
        if self.path == "file" and path:
            if os.path.isdir(path):
                return "is a folder; a file is expected"
            if check_files and not os.path.exists(path):
                return "no such file"
        if self.path == "out_dir" and os.path.isfile(path):
            return "is a file; the folder to write into is expected"
        if self.path == "out_file" and os.path.isdir(path):
            return "is a folder; the file to write is expected"
        if self.path in ("out_dir", "out_file", "out_path") and path:
            return _file_among_parents(path)
        return None


def _number(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:g}"


def _file_among_parents(path: str) -> str | None:
    """The problem when the first existing folder above path is a file (nothing can be made under it)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else f"is under {parent}, which is a file, not a folder"


Positive = Annotated[int, Check(low=1)]
NonNegative = Annotated[int, Check(low=0)]
PositiveFloat = Annotated[float, Check(above=0)]
NonNegativeFloat = Annotated[float, Check(low=0)]
Fraction = Annotated[float, Check(low=0, high=1)]
PositiveFraction = Annotated[float, Check(above=0, high=1)]
Port = Annotated[int, Check(low=0, high=65535)]  # 0: any free port
SeqLen = Annotated[int, Check(low=0, high=1 << 17)]  # 0: the model's
InputFile = Annotated[str, Check(path="file")]
OutputDir = Annotated[str, Check(path="out_dir")]
OutputFile = Annotated[str, Check(path="out_file")]
OutputPath = Annotated[str, Check(path="out_path")]  # a file or a folder, by the command's other settings
Device = Annotated[str, Check(pattern=r"auto|cpu|mps|cuda(:\d+)?", expected="auto, cpu, mps, cuda or cuda:N")]
Dtype = Annotated[str, Check(choices=("auto", "float32", "bfloat16", "float16"))]
TrackerNames = Annotated[str, Check(pattern=r"((tensorboard|wandb|swanlab)(,(tensorboard|wandb|swanlab))*)?",
                                    expected="empty or comma-separated names of tensorboard, wandb, swanlab")]


def one_of(*choices: str) -> Any:
    """The type of a setting that is one of these strings."""
    return Annotated[str, Check(choices=choices)]


def in_range(low: float, high: float, kind: type = float) -> Any:
    """The type of a number setting from low to high."""
    return Annotated[kind, Check(low=low, high=high)]


def _plain_type(hint: Any) -> tuple[Any, bool, Check | None]:
    """(the type, whether None is allowed, its Check) of a field's annotation."""
    check = None
    if typing.get_origin(hint) is Annotated:
        check = next((m for m in hint.__metadata__ if isinstance(m, Check)), None)
        hint = typing.get_args(hint)[0]
    args = typing.get_args(hint)
    optional = type(None) in args
    if args and typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
    return hint, optional, check


def check_value(name: str, hint: Any, value: Any, check_files: bool = True) -> Any:
    """value as the field's type (an int for a float field, a whole float for an int field), or
    SettingError naming the setting unless it has that type and passes the field's Check."""
    kind, optional, check = _plain_type(hint)
    if value is None and optional:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind in (int, float, str, bool) and type(value) is not kind:
        raise SettingError(f"--{name}={value!r}: expected {kind.__name__}")
    if kind is float and not math.isfinite(value):
        raise SettingError(f"--{name}={value}: must be a finite number")
    problem = check.problem(value, check_files) if check else None
    if problem:
        raise SettingError(f"--{name}={value}: {problem}")
    return value


def set_from_text(settings: Any, name: str, text: str) -> None:
    """Set one field of a settings object from text, as its --flag would (chat's /set)."""
    hint = typing.get_type_hints(type(settings), include_extras=True)[name]
    try:
        value = _converter(hint)(text.strip())
    except (ValueError, argparse.ArgumentTypeError) as e:
        raise SettingError(f"--{name}={text.strip()}: {e}") from None
    setattr(settings, name, check_value(name, hint, value))


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


def _converter(hint: Any):
    """A function from the flag's string to the field's type (int, float, str, bool, X | None)."""
    annotation, optional, _ = _plain_type(hint)

    def convert(text: str):
        if optional and text.lower() in {"none", "null", ""}:
            return None
        if annotation is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        if annotation is int and re.fullmatch(r"[+-]?[\d.]+[eE][+-]?\d+", text):
            return int(float(text))  # 1e4 steps
        if annotation in (int, float, str):
            return annotation(text)
        return text
    convert.__name__ = getattr(annotation, "__name__", str(annotation))
    return convert


def read_config_file(path: str, known: typing.Collection[str]) -> dict[str, Any]:
    """The top-level assignments of a Python config file, each the name of a setting in known; a
    missing file, an error in its code or an unknown name is a SettingError naming the file."""
    values: dict[str, Any] = {}
    try:
        with open(path, encoding="utf-8-sig") as f:
            exec(compile(f.read(), path, "exec"), {}, values)
    except FileNotFoundError:
        raise SettingError(f"config file {path} does not exist") from None
    except Exception as e:  # a config file is user code: report its error in one line
        raise SettingError(f"config file {path}: {type(e).__name__}: {e}") from None
    values = {k: v for k, v in values.items() if not k.startswith("_") and not isinstance(v, types.ModuleType)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SettingError(f"config file {path}: unknown settings {unknown}")
    return values


def read_model_preset(name_or_path: str, **overrides: Any) -> ModelArgs:
    """ModelArgs from a preset in config/ (e.g. 'baby_92m') or a path to such a file, then overrides.
    Every name the file sets must be a field of ModelArgs."""
    path = name_or_path if name_or_path.endswith(".py") else os.path.join(CONFIG_DIR, name_or_path + ".py")
    if not os.path.isfile(path):
        raise SettingError(f"no model preset {name_or_path!r} (looked for {path})")
    values = read_config_file(path, [f.name for f in dataclasses.fields(ModelArgs)])
    hints = typing.get_type_hints(ModelArgs)
    try:
        values = {name: check_value(name, hints[name], value) for name, value in values.items()}
        return ModelArgs(**{**values, **overrides})
    except SettingError as e:
        raise SettingError(f"model preset {path}: {e}") from None
    except (TypeError, ValueError) as e:
        raise SettingError(f"model preset {path}: {e}") from None


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a SettingError (one line at the command's entry, no usage block)."""

    def error(self, message: str) -> typing.NoReturn:
        raise SettingError(message)


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None,
                 check_files: bool = True) -> T:
    """An instance of the settings dataclass cls: defaults < config files (in order) < --flags, each
    value checked against its field's type and Check (with check_files=False, input files need not
    exist yet: a pipeline's later stages read what its earlier ones write)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    comments = _field_comments(cls)
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        values.update(read_config_file(path, names))
    values.update({k: v for k, v in vars(args).items() if k != "configs"})
    try:
        settings = cls(**values)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    problems = []
    for name in names:
        try:
            setattr(settings, name, check_value(name, hints[name], getattr(settings, name), check_files))
        except SettingError as e:
            problems.append(str(e))
    if problems:
        parser.error("; ".join(problems))
    return settings
