"""The documentation's executable parts: examples, the uapi chapter generator, conf.py.

* Every ``pycon`` block of ``docs/uapi-extensibility.md`` is run as a doctest
  against the real dispatcher, so the bytes the page shows cannot rot.
* ``docs/_ext/luo_uapi.py`` accepts the struct docs of ``liveupdate.uapi``
  and fails the build (``ExtensionError``) on every way a doc can break rule 5.
* ``docs/conf.py``'s glob expansion of the root toctrees.
* ``examples/roundtrip.py``, the README's round trip, runs verbatim against a
  real luod (it reboots luod itself) and the README tells to run it.
"""

from __future__ import annotations

import ctypes
import doctest
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from liveupdate import uapi
from luodtest import Luod, events

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
ROUNDTRIP = REPO / "examples" / "roundtrip.py"

pytest.importorskip("sphinx")
sys.path.insert(0, str(DOCS / "_ext"))
import luo_uapi  # noqa: E402
from docutils import nodes  # noqa: E402
from sphinx.errors import ExtensionError  # noqa: E402


def _load_conf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("liveupdate_docs_conf", DOCS / "conf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------
# The worked example of uapi-extensibility.md
# ---------------------------------------------------------------------------

_PYCON_RE = re.compile(r"^```pycon\n(.*?)^```", re.MULTILINE | re.DOTALL)


def test_extensibility_page_has_examples() -> None:
    blocks = _PYCON_RE.findall((DOCS / "uapi-extensibility.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 5
    text = "\n".join(blocks)
    for needle in ("E2BIG", "EINVAL", "EFAULT", "c=0", "size=24"):
        assert needle in text


@pytest.mark.skipif(sys.byteorder != "little", reason="the page shows little-endian dumps")
def test_extensibility_page_examples_run() -> None:
    path = DOCS / "uapi-extensibility.md"
    source = path.read_text(encoding="utf-8")
    text = "\n".join(_PYCON_RE.findall(source))
    parser = doctest.DocTestParser()
    test = parser.get_doctest(text, {"__name__": "uapi_extensibility"}, path.name, str(path), 0)
    assert len(test.examples) >= 15
    runner = doctest.DocTestRunner(optionflags=doctest.REPORT_NDIFF)
    report: list[str] = []
    runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, "".join(report)


# ---------------------------------------------------------------------------
# The uapi chapter generator
# ---------------------------------------------------------------------------


def test_every_registered_struct_doc_is_valid() -> None:
    checked = luo_uapi.collect()
    assert [info.cmd for info, _ in checked] == sorted(uapi.IOCTLS)
    for info, doc in checked:
        assert doc.struct_name == info.struct.__name__
        assert doc.ioctl_name == info.name
        assert [f.name for f in doc.fields] == [f[0] for f in info.struct._fields_]
        assert doc.returns
        assert doc.prose


def test_chapter_renders_every_ioctl() -> None:
    chapter = luo_uapi.render_chapter(luo_uapi.collect())
    sections = [n for n in chapter if isinstance(n, nodes.section)]
    assert [s["ids"][0] for s in sections] == [
        nodes.make_id(uapi.IOCTLS[cmd].name) for cmd in sorted(uapi.IOCTLS)
    ]
    create = sections[0].astext()
    for needle in ("0xBA00", "_IO(0xBA, 0x00)", "u8[64]", "Output", "Return:", "72 bytes"):
        assert needle in create


def test_field_rows_from_ctypes() -> None:
    info = uapi.PRESERVE_FD
    rows = luo_uapi.field_rows(info, luo_uapi.check_ioctl(info))
    assert [(r.offset, r.type, r.name, r.direction, r.optional) for r in rows] == [
        (0, "u32", "size", "Input", False),
        (4, "s32", "fd", "Input", False),
        (8, "u64", "token", "Input", False),
    ]


def test_ctype_name() -> None:
    assert luo_uapi.ctype_name(ctypes.c_uint8 * 64) == "u8[64]"
    assert luo_uapi.ctype_name(ctypes.c_int64) == "s64"
    assert luo_uapi.ctype_name(ctypes.c_uint16) == "u16"
    with pytest.raises(ExtensionError, match="fixed-width"):
        luo_uapi.ctype_name(ctypes.c_double)
    with pytest.raises(ExtensionError, match="fixed-width"):
        luo_uapi.ctype_name(ctypes.c_char * 4)


def test_inline_markup() -> None:
    para = nodes.paragraph("", "", *luo_uapi.inline("@fd is EBADF, not EXAMPLE; see LUOD_X_Y."))
    literals = [n.astext() for n in para.findall(nodes.literal)]
    assert literals == ["fd", "EBADF", "LUOD_X_Y"]
    assert para.astext() == "fd is EBADF, not EXAMPLE; see LUOD_X_Y."


def test_prose_bullets() -> None:
    node = luo_uapi._prose("* first\n* second")
    assert isinstance(node, nodes.bullet_list)
    assert len(node.children) == 2
    assert isinstance(luo_uapi._prose("one\nline"), nodes.paragraph)


class _Demo(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("token", ctypes.c_uint64),
        ("extra", ctypes.c_uint64),
    ]


GOOD = """struct _Demo - ioctl(DEMO_IOCTL)

@size: Input; sizeof(struct _Demo).
@fd: Output; a new fd,
    continued on an indented line.
@token: Input; the token.
@extra: Input; added later; zero keeps the old behaviour.

Does the demo.

Second paragraph, mentioning @token.

Return: 0; EINVAL when @extra is odd.
"""


def _info(doc: str | None, **kw: Any) -> uapi.IoctlInfo:
    cls = type("_Demo", (_Demo,), {"__doc__": doc})
    cls.__module__ = __name__
    args: dict[str, Any] = {"fd_out": True, **kw}
    return uapi.IoctlInfo(
        "DEMO_IOCTL", uapi._IO(0xBA, 0xBE), cls, "token", uapi.FdKind.DEVICE, **args
    )


def test_good_demo_doc() -> None:
    info = _info(GOOD)
    doc = luo_uapi.check_ioctl(info)
    assert doc.field("fd").text == "a new fd, continued on an indented line."
    assert doc.prose == ("Does the demo.", "Second paragraph, mentioning @token.")
    assert doc.returns == "0; EINVAL when @extra is odd."
    with pytest.raises(KeyError):
        doc.field("nope")
    rows = luo_uapi.field_rows(info, doc)
    assert [r.optional for r in rows] == [False, False, False, True]
    section = luo_uapi.render_ioctl(info, doc)
    assert "Optional (past the minimum size)" in section.astext()
    assert "24 bytes, minimum 16" in section.astext()


def _replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


BAD_DOCS = {
    "no docstring": (None, "no docstring"),
    "blank docstring": ("   \n ", "no docstring"),
    "bad first line": (_replace("struct _Demo - ", "_Demo - "), "first line must be"),
    "wrong struct": (_replace("struct _Demo -", "struct other -"), "names struct other"),
    "wrong ioctl": (_replace("ioctl(DEMO_IOCTL)", "ioctl(OTHER)"), "names ioctl(OTHER)"),
    "no blank after header": (_replace("DEMO_IOCTL)\n\n", "DEMO_IOCTL)\n"), "blank line must"),
    "no direction": (_replace("@token: Input;", "@token:"), "@token: the description must"),
    "bad direction": (_replace("@token: Input;", "@token: In;"), "'Input;' or 'Output;'"),
    "empty description": (_replace("@token: Input; the token.", "@token: Input;"), "@token"),
    "malformed field": (_replace("@token:", "@token -"), "malformed field line"),
    "missing field": (_replace("@token: Input; the token.\n", ""), "'token' is not documented"),
    "unknown field": (
        _replace("@extra:", "@bogus: Input; x.\n@extra:"),
        "@bogus is documented but",
    ),
    "duplicate field": (_replace("@token:", "@fd: Output; again.\n@token:"), "documented twice"),
    "wrong order": (
        _replace(
            "@token: Input; the token.\n@extra", "@extra: Input; x.\n@token: Input; y.\n@x"
        ).replace("@x: Input; added later; zero keeps the old behaviour.\n", ""),
        "struct order",
    ),
    "no fields": (
        "struct _Demo - ioctl(DEMO_IOCTL)\n\nDoes it.\n\nReturn: 0.\n",
        "no '@field",
    ),
    "field block not ended": (
        _replace("behaviour.\n\nDoes", "behaviour.\nDoes"),
        "blank line must follow the field lines",
    ),
    "field outside block": (_replace("Does the demo.", "@late: Input; x."), "outside the field"),
    "no return": (_replace("Return: 0;", "Returns 0;"), "no 'Return:'"),
    "return not last": (_replace("Does the demo.", "Return: early."), "more than one"),
    "return in the middle": (
        _replace("\nReturn: 0; EINVAL when @extra is odd.\n", "").replace(
            "Does the demo.", "Return: 0."
        ),
        "must come last",
    ),
    "empty return": (_replace("Return: 0; EINVAL when @extra is odd.", "Return:"), "empty"),
    "no prose": (
        _replace("Does the demo.\n\nSecond paragraph, mentioning @token.\n\n", ""),
        "what the call does",
    ),
    "size not input": (_replace("@size: Input;", "@size: Output;"), "@size must be Input"),
    "fd direction": (_replace("@fd: Output;", "@fd: Input;"), "@fd must be Output"),
}


@pytest.mark.parametrize(("doc", "message"), BAD_DOCS.values(), ids=list(BAD_DOCS))
def test_bad_docs_fail(doc: str | None, message: str) -> None:
    with pytest.raises(ExtensionError, match=re.escape(message)) as exc:
        luo_uapi.check_ioctl(_info(doc))
    assert "rule 5" in str(exc.value)


def test_fd_in_must_be_input() -> None:
    doc = _replace("@fd: Output;", "@fd: Input;")
    luo_uapi.check_ioctl(_info(doc, fd_out=False, fd_in=True))
    with pytest.raises(ExtensionError, match="@fd must be Input"):
        luo_uapi.check_ioctl(_info(GOOD, fd_out=False, fd_in=True))


def test_collect_reports_every_bad_struct() -> None:
    bad1 = _info(None)
    bad2 = uapi.IoctlInfo(
        "DEMO_TWO", uapi._IO(0xBA, 0xBD), bad1.struct, "token", uapi.FdKind.DEVICE
    )
    table = {bad1.cmd: bad1, bad2.cmd: bad2, uapi.FINISH.cmd: uapi.FINISH}
    with pytest.raises(ExtensionError) as exc:
        luo_uapi.collect(table)
    assert str(exc.value).count("no docstring") == 2


# ---------------------------------------------------------------------------
# Whole builds in a scratch directory
# ---------------------------------------------------------------------------


def _scratch_docs(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "conf.py").write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(DOCS / '_ext')!r})\n"
        "extensions = ['myst_parser', 'luo_uapi']\n"
        "exclude_patterns = ['_build']\n",
        encoding="utf-8",
    )
    (src / "index.md").write_text("# Scratch\n\n```{toctree}\nuapi\n```\n", encoding="utf-8")
    return src


def _build(src: Path, out: Path) -> int:
    from sphinx.cmd.build import build_main

    return build_main(["-q", "-W", "--keep-going", "-b", "html", str(src), str(out)])


def test_build_generates_the_chapter(tmp_path: Path) -> None:
    pytest.importorskip("myst_parser")
    src = _scratch_docs(tmp_path)
    assert _build(src, tmp_path / "out") == 0
    assert (src / "uapi.md").read_text(encoding="utf-8") == luo_uapi.CHAPTER_SOURCE
    html = (tmp_path / "out" / "uapi.html").read_text(encoding="utf-8")
    for info in uapi.IOCTLS.values():
        assert info.name in html
        assert f'id="{nodes.make_id(info.name)}"' in html


def test_build_fails_on_a_bad_struct_doc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("myst_parser")
    bad = _info(_replace("@token: Input; the token.\n", ""))
    monkeypatch.setitem(uapi.IOCTLS, bad.cmd, bad)
    src = _scratch_docs(tmp_path)
    assert _build(src, tmp_path / "out") != 0
    assert "'token' is not documented" in capsys.readouterr().err
    assert not (src / "uapi.md").exists()


# ---------------------------------------------------------------------------
# conf.py: globs of the root toctrees
# ---------------------------------------------------------------------------

INDEX = """# Root

```{toctree}
:caption: Interface

uapi
guide
```

```{toctree}
:caption: Concepts
:glob:

concepts/*
```

```{toctree}
:caption: Guides
:glob:

guides/*
```

```{toctree}
:glob:

*
**
```
"""


def _expand(found: set[str], text: str = INDEX) -> str:
    conf = _load_conf()
    app = SimpleNamespace(config=SimpleNamespace(root_doc="index"), env=SimpleNamespace())
    app.env.found_docs = found
    source = [text]
    conf._expand_root_globs(app, "index", source)
    other = ["unchanged"]
    conf._expand_root_globs(app, "guide", other)
    assert other == ["unchanged"]
    return source[0]


def _toctrees(text: str) -> list[list[str]]:
    blocks = re.findall(r"```\{toctree\}\n(.*?)```", text, re.DOTALL)
    return [
        [e.strip() for e in b.splitlines() if e.strip() and not e.startswith(":")] for b in blocks
    ]


def test_globs_expand_once_and_in_order() -> None:
    found = {"index", "uapi", "guide", "concepts/a", "concepts/b", "faq", "deep/x/y"}
    assert _toctrees(_expand(found)) == [
        ["uapi", "guide"],
        ["concepts/a", "concepts/b"],
        [],
        ["faq", "deep/x/y"],
    ]


def test_globs_matching_nothing_are_dropped() -> None:
    text = _expand({"index", "uapi", "guide"})
    assert _toctrees(text) == [["uapi", "guide"], [], [], []]
    assert "*" not in text
    assert ":glob:" in text  # still marked, so Sphinx rereads the index when pages appear


def test_conf_values() -> None:
    conf = _load_conf()
    assert "luo_uapi" in conf.extensions
    assert "myst_parser" in conf.extensions
    assert "_build" in conf.exclude_patterns


# ---------------------------------------------------------------------------
# The README's round trip: examples/roundtrip.py
# ---------------------------------------------------------------------------


def _run_roundtrip(luod: Luod, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in luod.env.items() if k != "LIVEUPDATE_DEVICE"}
    return subprocess.run(
        [sys.executable, str(ROUNDTRIP), *args],
        env={**env, "LIVEUPDATE_DEVICE": luod.socket},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_roundtrip_example_reboots_luod_and_reads_the_memfd_back(luod: Luod) -> None:
    result = _run_roundtrip(luod)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "generation 1: preserved b'hello liveupdate' as 'vm-memory' token 0x1a",
        "generation 2: retrieved b'hello liveupdate'",
        "round trip ok",
    ]
    # luod really rebooted, and the session was finished, not left behind.
    with luod.open() as dev:
        info = dev.get_state()
    assert (info.generation, info.state) == (2, uapi.LuodState.NORMAL)
    assert (info.incoming_sessions, info.outgoing_sessions, info.preserved_files) == (0, 0, 0)
    assert events(luod, "restored", generation=2, sessions=1, files=1)


def test_roundtrip_example_takes_the_device_as_an_argument(luod: Luod) -> None:
    env = {k: v for k, v in luod.env.items() if k != "LIVEUPDATE_DEVICE"}
    result = subprocess.run(
        [sys.executable, str(ROUNDTRIP), luod.socket],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "round trip ok"


def test_roundtrip_example_fails_cleanly_without_luod(tmp_path: Path) -> None:
    missing = tmp_path / "no-luod" / "device"
    result = subprocess.run(
        [sys.executable, str(ROUNDTRIP), str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("roundtrip: ")
    assert "Traceback" not in result.stderr


def test_readme_runs_the_roundtrip_script_verbatim() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    script = ROUNDTRIP.read_text(encoding="utf-8")
    assert ".venv/bin/python examples/roundtrip.py" in readme
    # The Python the README shows is the script's own code, not a second copy
    # that could drift: every line of its python block is in the script.
    blocks = re.findall(r"^```python\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    assert blocks, "the README shows the round trip's code"
    for line in blocks[0].splitlines():
        assert line.strip() in script, f"README line not in examples/roundtrip.py: {line!r}"
