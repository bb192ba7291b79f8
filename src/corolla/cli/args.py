"""Command-line flags built from the config dataclasses, and the plumbing every command shares.

Each flag is one dataclass field: its name (Petals' flag names), type, default and
``metadata["help"]`` come from ``corolla.config``, so a default lives in one place. Every
flag can also come from a YAML file (``--config FILE``) or from ``COROLLA_<FLAG>``.
A refusal of any kind becomes ``ConfigError``; entry points print it as one line.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import os
import re
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import configargparse

from corolla.config import LimitsConfig, NetworkConfig, ServerConfig
from corolla.errors import ConfigError, CorollaError

ENV_PREFIX = "COROLLA_"
C = TypeVar("C")
LOG_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
# field name -> flag name, where Petals' flag name differs from ours
FLAG_NAMES = {"model": "converted_model_name_or_path"}
_SPAN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
# flags that take a list of multiaddrs; in a command line their list ends at the first value that
# is not a multiaddr, so `corolla generate --initial_peers ADDR "Hello"` keeps "Hello" as the prompt
MULTIADDR_FLAGS = ("--initial_peers", "--host_maddrs", "--announce_maddrs")


@dataclass(frozen=True)
class FlagGroup:
    """A ``--help`` section: some (``names``) or all fields of one config dataclass."""

    title: str
    config: type
    names: tuple[str, ...] | None = None

    def fields(self) -> list[Field]:
        own = [f for f in fields(self.config) if not is_dataclass(_hint(self.config, f))]
        if self.names is None:
            return own
        by_name = {f.name: f for f in own}
        return [by_name[name] for name in self.names]


SERVER_GROUPS = (
    FlagGroup(
        "model",
        ServerConfig,
        ("model", "dht_prefix", "cache_dir", "revision", "token", "max_disk_space", "adapters"),
    ),
    FlagGroup(
        "blocks",
        ServerConfig,
        ("num_blocks", "block_indices", "mean_balance_check_period", "balance_quality"),
    ),
    FlagGroup(
        "hardware",
        ServerConfig,
        ("device", "torch_dtype", "quant_type", "num_threads", "tensor_parallel_devices"),
    ),
    FlagGroup("announcement", ServerConfig, ("public_name", "throughput", "update_period", "expiration")),
    FlagGroup("network", NetworkConfig),
    FlagGroup("limits", LimitsConfig),
    FlagGroup("monitoring", ServerConfig, ("metrics_port",)),
    FlagGroup("access", ServerConfig, ("allowed_peers",)),
)
NETWORK_GROUPS = (FlagGroup("network", NetworkConfig),)


class ArgumentParser(configargparse.ArgumentParser):
    """Raises ``ConfigError`` instead of printing usage and exiting, so refusals stay one line."""

    _config_labels: tuple[str, ...] = ()

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)

    def _open_config_files(self, command_line_args: list[str]) -> list[tuple[Any, str]]:
        streams = super()._open_config_files(command_line_args)
        self._config_labels = tuple(label for _, label in streams)  # to name the file in errors
        return streams

    def convert_item_to_command_line_arg(self, action: Any, key: str, value: Any) -> list[str]:
        if action is None:  # a key that is no flag: name it and the file, not "--key=value"
            where = " or ".join(self._config_labels) or "the config file"
            known = [o.lstrip("-") for a in self._actions for o in a.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "keys are flag names without --; see --help"
            raise ConfigError(f"unknown key {key!r} in {where}: {hint}")
        return super().convert_item_to_command_line_arg(action, key, value)


class HelpFormatter(configargparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except where the help text already states its own."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(
    prog: str, description: str, groups: Sequence[FlagGroup], *, model_positional: bool = False
) -> ArgumentParser:
    """A parser with ``--config`` and one flag per field of ``groups``."""
    parser = ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=HelpFormatter,
        config_file_parser_class=configargparse.YAMLConfigFileParser,
        auto_env_var_prefix=ENV_PREFIX,
        args_for_setting_config_path=["--config"],
        config_arg_help_message="YAML file with flag values (keys are flag names without --)",
    )
    if model_positional:
        parser.add_argument(
            "model_positional",
            nargs="?",
            metavar="MODEL",
            help=f"the model to serve, as --converted_model_name_or_path (default: {_default_model()})",
        )
    for group in groups:
        section = parser.add_argument_group(group.title)
        for f in group.fields():
            _add_flag(section, group.config, f, model_positional)
    return parser


def parse_config(parser: ArgumentParser, config_cls: type[C], argv: Sequence[str] | None) -> C:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into ``config_cls``; refusals raise ``ConfigError``."""
    values = vars(parser.parse_args(split_multiaddr_lists(sys.argv[1:] if argv is None else argv)))
    if "model_positional" in values:
        values["model"] = _pick_model(values.pop("model_positional"), values.get("model"))
    return build_config(config_cls, values)


def build_config(config_cls: type[C], values: dict[str, Any]) -> C:
    """Fill ``config_cls`` (and its nested configs) from flat flag values; ``None`` keeps the default."""
    kwargs: dict[str, Any] = {}
    for f in fields(config_cls):
        hint = _hint(config_cls, f)
        if is_dataclass(hint):
            kwargs[f.name] = build_config(hint, values)  # type: ignore[arg-type]
        elif values.get(f.name) is not None:
            value = values[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return config_cls(**kwargs)


def server_parser() -> ArgumentParser:
    return build_parser(
        "corolla serve",
        "Host a span of a model's transformer blocks in a swarm.",
        SERVER_GROUPS,
        model_positional=True,
    )


def parse_server_args(argv: Sequence[str] | None = None) -> ServerConfig:
    """``corolla serve`` flags -> ``ServerConfig``; raises ``ConfigError`` for any refusal."""
    return parse_config(server_parser(), ServerConfig, argv)


def split_multiaddr_lists(argv: Sequence[str]) -> list[str]:
    """Give each value of a multiaddr flag its own ``--flag=VALUE`` (the flags accumulate), so the
    list ends at the first value that is not a multiaddr (not starting with ``/``) and what follows
    is read as usual: ``--initial_peers A B "Hello"`` -> ``--initial_peers=A --initial_peers=B "Hello"``."""
    out: list[str] = []
    flag: str | None = None  # the multiaddr flag whose values are being read
    values = 0  # how many it has had
    for i, token in enumerate(argv):
        if flag is not None and token.startswith("/"):
            out.append(f"{flag}={token}")
            values += 1
            continue
        if flag is not None and values == 0:
            out.append(flag)  # no multiaddr followed it: let the parser read it as written
        if token == "--":
            return out + list(argv[i:])
        flag, values = (token, 0) if token in MULTIADDR_FLAGS else (None, 0)
        if flag is None:
            out.append(token)
    if flag is not None and values == 0:
        out.append(flag)
    return out


def parse_block_indices(text: str) -> tuple[int, int]:
    """``"3:7"`` -> ``(3, 7)``."""
    match = _SPAN_RE.match(text)
    if match is None:
        # YAML reads an unquoted 10:20 as the base-60 number 620
        hint = " (in a YAML file, quote it: '10:20')" if text.strip().isdigit() else ""
        raise argparse.ArgumentTypeError(f"expected START:END such as 0:16, got {text!r}{hint}")
    return int(match.group(1)), int(match.group(2))


def setup_logging(level: int = logging.INFO) -> None:
    """Readable logs on stderr; only CLI entry points call this, never an import. ``COROLLA_LOGLEVEL``
    (DEBUG, INFO, WARNING, ERROR) sets corolla's own level, as ``HIVEMIND_LOGLEVEL`` sets hivemind's."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr)
    wanted = os.environ.get("COROLLA_LOGLEVEL", "").strip().upper()
    if wanted in ("DEBUG", "INFO", "WARNING", "ERROR"):
        logging.getLogger("corolla").setLevel(wanted)
    elif wanted:
        logging.getLogger(__name__).warning(
            "ignoring COROLLA_LOGLEVEL=%s: use DEBUG, INFO, WARNING or ERROR", os.environ["COROLLA_LOGLEVEL"]
        )
    for chatty in ("httpx", "httpx2"):  # a line per HTTP request (hub downloads: one per range)
        logging.getLogger(chatty).setLevel(logging.WARNING)


def route_hivemind_logs() -> None:
    """Send hivemind's log records through our handler (hivemind installs its own on import), at
    the level ``HIVEMIND_LOGLEVEL`` names, if any (moving the handler resets hivemind's level)."""
    from hivemind.utils.logging import loglevel, use_hivemind_log_handler

    use_hivemind_log_handler("nowhere")
    if "HIVEMIND_LOGLEVEL" in os.environ:
        logging.getLogger("hivemind").setLevel(loglevel)


def run_command(prog: str, body: Callable[[], None]) -> int:
    """Run a command's body: 0 when it returns, 2 with a one-line message for any
    ``CorollaError`` (never a traceback), 130 on Ctrl-C."""
    try:
        body()
    except CorollaError as error:
        return report_error(prog, error)
    except KeyboardInterrupt:
        return 130
    return 0


def client_parser(prog: str, description: str | None, *, swarm: bool = True) -> argparse.ArgumentParser:
    """The parser of a client-side command: ``--cache_dir``, and with ``swarm`` the swarm to talk to
    (``MODEL``, ``--initial_peers``, ``--dht_prefix``); the command adds its own flags."""
    from corolla.config import BUILTIN_MODEL, default_cache_dir

    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    if swarm:
        p.add_argument(
            "model", nargs="?", default=BUILTIN_MODEL, help="model name or path (as given to corolla serve)"
        )
        p.add_argument(
            "--initial_peers", nargs="+", action="extend", required=True,
            help="multiaddrs of peers in the swarm",
        )  # fmt: skip
        p.add_argument(
            "--dht_prefix", default=None, help="the model's name in the DHT (default: from the model)"
        )
        p.add_argument(
            "--swarm_key",
            default=None,
            metavar="FILE",
            help="the key file of a closed swarm (as its servers' --swarm_key); none: an open swarm",
        )
        p.add_argument(
            "--identity_path",
            default=None,
            metavar="FILE",
            help="file with a persistent peer identity (created if missing): keeps this client's peer id "
            "for servers' --allowed_peers; none: a new peer id each run",
        )
        p.add_argument(
            "--revision", default=None,
            help="a hub model's branch, tag or commit, as its servers' --revision (default: main)",
        )  # fmt: skip
        p.add_argument(
            "--token", default=None,
            help="Hugging Face access token for gated and private hub models (default: $HF_TOKEN or the "
            "token saved by 'hf auth login')",
        )  # fmt: skip
    p.add_argument("--cache_dir", default=default_cache_dir(), help="where converted models live")
    return p


def run_client_command(
    prog: str, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], None],
    argv: Sequence[str] | None,
) -> int:  # fmt: skip
    """The entry point of a client-side command (generate, demo, swarm): quiet logs, parse, run."""
    setup_logging(logging.WARNING)
    args = parse_client_args(parser, argv)
    route_hivemind_logs()
    return run_command(prog, lambda: run(args))


def parse_client_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse a client-side command's ``argv`` (default: ``sys.argv[1:]``). Positionals may stand
    anywhere (``corolla generate MODEL --initial_peers ADDR "prompt"``), and multiaddr lists end at
    the first value that is not a multiaddr (``split_multiaddr_lists``)."""
    return parser.parse_intermixed_args(split_multiaddr_lists(sys.argv[1:] if argv is None else argv))


def report_error(prog: str, error: BaseException) -> int:
    """Print ``error`` as one line on stderr; return the exit status (2)."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def _add_flag(section: Any, config_cls: type, f: Field, model_positional: bool) -> None:
    name = FLAG_NAMES.get(f.name, f.name)
    default = _default(f)
    help_text = f.metadata.get("help", "").replace("%", "%%")
    if f.name == "model" and model_positional:
        # None here, so a flag that repeats MODEL differently can be told apart from the default
        help_text, default = f"{help_text} (default: {default})", None
    off = f.metadata.get("off")
    if off is not None:  # a switch that is on by default: --NAME (the default) and --OFF
        # an optional value, so that "NAME: false" in a config file and COROLLA_NAME=false turn it off
        section.add_argument(
            f"--{name}", dest=f.name, nargs="?", const=True, default=default, type=parse_switch,
            metavar="BOOL", help=f"{help_text} (default: on)",
        )  # fmt: skip
        section.add_argument(f"--{off}", dest=f.name, action="store_false", help=f"turn --{name} off")
        return
    kind = _kind(config_cls, f)
    if kind.get("action") == "extend":
        default = list(default)  # extended in place by argparse: a copy of its own, and a list
    section.add_argument(f"--{name}", dest=f.name, default=default, help=help_text, **kind)


def parse_switch(text: str) -> bool:
    """``true``/``false`` (also yes/no, on/off, 1/0) as a switch's value."""
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _kind(config_cls: type, f: Field) -> dict[str, Any]:
    """argparse ``type``/``nargs``/``action`` for a field's annotation."""
    hint = _strip_optional(_hint(config_cls, f))
    if hint is bool:
        if f.default is not False:
            raise TypeError(f"{config_cls.__name__}.{f.name}: a boolean flag must default to False")
        return {"action": "store_true"}
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:  # repeated flags add up: --adapters A --adapters B
            return {"nargs": "+", "type": args[0], "action": "extend"}
        if args == (int, int):
            return {"type": parse_block_indices, "metavar": "START:END"}
    if hint in (int, float, str):
        return {"type": hint}
    raise TypeError(f"no command-line form for {config_cls.__name__}.{f.name}: {hint}")


def _hint(config_cls: type, f: Field) -> Any:
    return _type_hints(config_cls)[f.name]


@functools.cache
def _type_hints(config_cls: type) -> dict[str, Any]:
    return get_type_hints(config_cls)


def _strip_optional(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise TypeError(f"field {f.name} needs a default to become a flag")


def _default_model() -> str:
    return next(f for f in fields(ServerConfig) if f.name == "model").default


def _pick_model(positional: str | None, flag: str | None) -> str | None:
    if positional and flag and positional != flag:
        raise ConfigError(
            f"MODEL {positional!r} and --converted_model_name_or_path {flag!r} conflict: give the model once"
        )
    return positional or flag
