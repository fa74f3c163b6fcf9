"""The user guides cannot silently fall behind the code they describe.

The command line is introspected (the click objects of ``luod`` and
``luoctl``), and so are the library's exports and errors:

* ``docs/guides/luod.md`` documents exactly the options ``luod --help``
  shows, no more, no fewer;
* ``docs/guides/luoctl.md`` has a section per ``luoctl`` command, and no
  section for a command that does not exist; each section names every option
  and argument of its command; the global options are documented;
* ``docs/guides/services.md`` names every environment variable ``luoctl run``
  sets;
* ``docs/guides/client.md``'s error table gives every error class with
  every errno that maps to it;
* ``docs/api/client.md`` renders every public name of ``liveupdate``;
* every command and option of ``luod`` and ``luoctl``, walking click's
  command tree and reading the real ``--help`` output of each command, is in
  the docs, with every value of a choice option.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import liveupdate
from liveupdate import paths
from liveupdate.cli.luoctl import main as luoctl_main
from liveupdate.client import errors, service
from liveupdate.server.luod import main as luod_main

DOCS = Path(__file__).resolve().parents[1] / "docs"
GUIDES = DOCS / "guides"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _mentions(text: str, option: str) -> bool:
    """``option`` appears as a whole option (``--socket`` is not ``--socket-mode``)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def _sections(text: str, level: int = 2) -> dict[str, str]:
    """Heading title -> body, for headings of exactly ``level``."""
    marker = "#" * level
    parts = re.split(rf"^{marker} (.+)$", text, flags=re.MULTILINE)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def _visible_options(command: click.Command) -> set[str]:
    """Every option string ``--help`` shows for ``command`` (help included)."""
    ctx = click.Context(command, **command.context_settings)
    found: set[str] = set()
    for param in command.get_params(ctx):
        if isinstance(param, click.Option) and not param.hidden:
            found.update(param.opts)
            found.update(param.secondary_opts)
    return found


def _arguments(command: click.Command) -> set[str]:
    return {p.human_readable_name for p in command.params if isinstance(p, click.Argument)}


# ---------------------------------------------------------------------------
# luod
# ---------------------------------------------------------------------------


def test_luod_guide_documents_exactly_the_options_of_luod_help() -> None:
    options = _sections(_read(GUIDES / "luod.md"))["Options"]
    # Definition-list terms: a line opening with a backquoted option.
    terms = [line for line in options.splitlines() if line.startswith("`-")]
    documented = {opt for line in terms for opt in re.findall(r"`(-{1,2}[\w-]+)", line)}
    expected = _visible_options(luod_main)
    assert {"--socket", "--exec", "--check-image", "--version", "--help"} <= expected
    assert documented - expected == set(), "documented, but luod has no such option"
    assert expected - documented == set(), "in `luod --help`, but not in docs/guides/luod.md"


def test_luod_guide_hides_the_internal_options() -> None:
    text = _read(GUIDES / "luod.md")
    ctx = click.Context(luod_main)
    hidden = [p for p in luod_main.get_params(ctx) if isinstance(p, click.Option) and p.hidden]
    assert hidden, "the re-exec's options are hidden from --help"
    options = _sections(text)["Options"]
    for param in hidden:
        for opt in param.opts:
            assert not _mentions(options, opt), f"{opt} is internal, not an option to document"


# ---------------------------------------------------------------------------
# luoctl
# ---------------------------------------------------------------------------


def test_luoctl_guide_has_a_section_per_command() -> None:
    sections = _sections(_read(GUIDES / "luoctl.md"))
    commands = set(luoctl_main.commands)
    assert {"state", "prepare", "cancel", "reboot", "finish", "sessions", "inspect"} <= commands
    assert {"run", "update"} <= commands
    documented = set(sections) - {"Global options"}
    assert commands - documented == set(), "luoctl commands without a section"
    assert documented - commands == set(), "sections for commands luoctl does not have"


@pytest.mark.parametrize("name", sorted(luoctl_main.commands))
def test_luoctl_guide_names_every_option_and_argument(name: str) -> None:
    body = _sections(_read(GUIDES / "luoctl.md"))[name]
    command = luoctl_main.commands[name]
    for option in _visible_options(command) - {"-h", "--help"}:
        assert _mentions(body, option), f"luoctl {name}: {option} is not documented"
    for argument in _arguments(command):
        assert re.search(rf"\b{argument}\b", body), f"luoctl {name}: {argument} not named"
    assert f"luoctl {name}" in body, f"luoctl {name}: no example"


def test_luoctl_guide_documents_the_global_options() -> None:
    body = _sections(_read(GUIDES / "luoctl.md"))["Global options"]
    expected = _visible_options(luoctl_main)
    assert {"--socket", "--json", "--timeout"} <= expected
    for option in expected:
        assert _mentions(body, option), f"luoctl {option} is not documented"


# ---------------------------------------------------------------------------
# services and the client library
# ---------------------------------------------------------------------------


def test_services_guide_names_the_environment_of_luoctl_run() -> None:
    text = _read(GUIDES / "services.md")
    variables = [
        service.SESSION_FD_ENV,
        service.SESSION_NAME_ENV,
        service.SESSION_STATE_ENV,
        service.NEXT_SESSION_FD_ENV,
        paths.DEVICE_ENV,
    ]
    for variable in variables:
        assert f"`{variable}`" in text, f"{variable} is not documented"


def test_client_guide_error_table_matches_the_errno_mapping() -> None:
    text = _read(GUIDES / "client.md")
    rows = {
        match.group(1): match.group(0)
        for match in re.finditer(r"^\| `(\w+Error)` \|.*$", text, re.MULTILINE)
    }
    classes = [name for name in errors.__all__ if name.endswith("Error")]
    for name in classes:
        assert name in rows, f"{name} is missing from the error table"
    for code, cls in errors._BY_ERRNO.items():
        # EOPNOTSUPP and ENOTSUP are one number on Linux: any of its names will do.
        names = [
            name for name in dir(errno) if name.startswith("E") and getattr(errno, name) == code
        ]
        assert any(f"`{name}`" in rows[cls.__name__] for name in names), (
            f"{'/'.join(names)} -> {cls.__name__} is not in the table"
        )


def test_client_guide_names_the_device_resolution_order() -> None:
    text = _read(GUIDES / "client.md")
    for needle in (paths.DEVICE_ENV, paths.KERNEL_DEVICE, paths.SYSTEM_SOCKET):
        assert needle in text


def test_api_reference_renders_every_public_name() -> None:
    text = _read(DOCS / "api" / "client.md")
    rendered = set(
        re.findall(
            r"^\.\. auto(?:function|class|exception):: liveupdate\.(\w+)", text, re.MULTILINE
        )
    )
    assert set(liveupdate.__all__) - rendered == set(), "public names without a reference entry"
    assert rendered - set(liveupdate.__all__) == set(), "reference entries for names not exported"


def test_autodoc_is_enabled() -> None:
    conf = _read(DOCS / "conf.py")
    assert re.search(r"^\s*\"sphinx\.ext\.autodoc\",", conf, re.MULTILINE)


# ---------------------------------------------------------------------------
# Every command and option of luod and luoctl appears in the docs
# ---------------------------------------------------------------------------


def _walk(
    command: click.Command, path: tuple[str, ...]
) -> list[tuple[tuple[str, ...], click.Command]]:
    """``(path, command)`` for ``command`` and every command below it, depth first."""
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            found += _walk(command.commands[name], (*path, name))
    return found


LUOCTL_TREE = _walk(luoctl_main, ())


def _help_text(command: click.Command, argv: list[str]) -> str:
    result = CliRunner().invoke(command, [*argv, "--help"], prog_name="luoctl")
    assert result.exit_code == 0, result.output
    return result.output


def _help_options(text: str) -> set[str]:
    """The option strings the ``Options:`` block of a ``--help`` text lists."""
    block = text.split("Options:", 1)[1]
    block = block.split("\nCommands:", 1)[0]
    found: set[str] = set()
    for line in block.splitlines():
        # An option's line opens with it (two spaces in); continuations are indented more.
        match = re.match(r"^  (-[^ ].*?)(?:  |$)", line)
        if match:
            found.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", match.group(1)))
    return found


def _section_of(path: tuple[str, ...]) -> str:
    sections = _sections(_read(GUIDES / "luoctl.md"))
    if not path:
        return sections["Global options"]
    return sections[" ".join(path)]


def test_luoctl_command_tree_is_walked_whole() -> None:
    paths = {" ".join(path) for path, _ in LUOCTL_TREE if path}
    assert paths == set(luoctl_main.commands) | {
        f"{name} {sub}"
        for name, cmd in luoctl_main.commands.items()
        if isinstance(cmd, click.Group)
        for sub in cmd.commands
    }
    assert {"run", "reboot", "inspect"} <= paths


@pytest.mark.parametrize(
    ("path", "command"), LUOCTL_TREE, ids=[" ".join(p) or "luoctl" for p, _ in LUOCTL_TREE]
)
def test_every_option_luoctl_help_shows_is_in_the_luoctl_guide(
    path: tuple[str, ...], command: click.Command
) -> None:
    """``luoctl [COMMAND] --help``, as a user reads it, against the guide's section."""
    shown = _help_options(_help_text(luoctl_main, list(path)))
    assert shown, "no option parsed from --help: the parser is out of date"
    assert shown == _visible_options(command), "--help and click's parameters disagree"
    body = _section_of(path)
    if path:
        # -h/--help of each command is documented once, with the global options.
        assert "every command has its own `--help`" in _section_of(())
        shown -= {"-h", "--help"}
    for option in shown:
        assert _mentions(body, option), f"luoctl {' '.join(path)} {option}: not in luoctl.md"
    for argument in _arguments(command):
        assert re.search(rf"\b{argument}\b", body), f"luoctl {' '.join(path)}: {argument}"


@pytest.mark.parametrize(
    ("path", "command"), LUOCTL_TREE, ids=[" ".join(p) or "luoctl" for p, _ in LUOCTL_TREE]
)
def test_every_choice_of_a_luoctl_option_is_in_the_luoctl_guide(
    path: tuple[str, ...], command: click.Command
) -> None:
    body = _section_of(path)
    for param in command.params:
        if isinstance(param, click.Option) and isinstance(param.type, click.Choice):
            for choice in param.type.choices:
                assert f"{choice}" in body, f"luoctl {' '.join(path)} {param.opts[0]} {choice}"


def test_every_luoctl_command_is_named_in_the_docs_outside_its_guide_too() -> None:
    """The operator's guide shows every command in use."""
    text = _read(GUIDES / "operations.md")
    for path, _ in LUOCTL_TREE:
        if path:
            assert f"luoctl {' '.join(path)}" in text, (
                f"luoctl {' '.join(path)}: not in operations.md"
            )


def test_every_option_luod_help_shows_is_in_the_luod_guide() -> None:
    shown = _help_options(_help_text(luod_main, []))
    assert shown == _visible_options(luod_main), "--help and click's parameters disagree"
    options = _sections(_read(GUIDES / "luod.md"))["Options"]
    for option in shown:
        assert _mentions(options, option), f"luod {option}: not in luod.md"
    for param in luod_main.params:
        if isinstance(param, click.Option) and isinstance(param.type, click.Choice):
            for choice in param.type.choices:
                assert choice in options, f"luod {param.opts[0]} {choice}: not in luod.md"
