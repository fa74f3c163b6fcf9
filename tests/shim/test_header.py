"""The C header liveupdate/luo.h says what uapi.py says: numbers, sizes, offsets.

A C program generated from uapi.py's registry prints every ioctl number and
every struct's size, alignment and field offsets as gcc lays them out; they
must equal the ctypes layouts and the shared ABI vectors.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
from pathlib import Path

import pytest

from liveupdate import shim, uapi
from luodtest import SHARED

CONSTANTS = [
    "LIVEUPDATE_IOCTL_TYPE",
    "LIVEUPDATE_SESSION_NAME_LENGTH",
    "LIVEUPDATE_CMD_BASE",
    "LIVEUPDATE_CMD_SESSION_BASE",
    "LUOD_CMD_BASE",
    "LUOD_CMD_SESSION_BASE",
    "LUOD_REBOOT_NO_EXEC",
    "LUOD_SET_EVENT_FLAGS",
    "LUOD_ERROR_LENGTH",
    "LUOD_STATE_LOST_INCOMPLETE",
    "LUOD_LIST_FILES",
    "LUOD_LIST_FLAGS",
    "LUOD_SESSION_KEEP_ON_CLOSE",
    "LUOD_SESSION_FLAGS",
    "LUOD_SERVICE_PID_MAX",
    "LUOD_PARTICIPANT_DATA_MAX",
    "LUOD_PARTICIPANT_TIMEOUT_MS",
    "LUOD_PARTICIPANT_ANSWER_DATA",
    "LUOD_PARTICIPANT_ANSWER_FLAGS",
]


def _structs() -> list[type[ctypes.Structure]]:
    # The participant fd's messages are ABI too, though no ioctl takes them.
    structs = {info.struct for info in uapi.IOCTLS.values()}
    structs |= {message.struct for message in uapi.PARTICIPANT_MESSAGES}
    return sorted(structs, key=lambda s: s.__name__)


def _program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <stdalign.h>",
        "#include <liveupdate/luo.h>",
        "int main(void) {",
    ]
    for info in uapi.IOCTLS.values():
        lines.append(f'printf("ioctl {info.name} %lu\\n", (unsigned long){info.name});')
    for name in CONSTANTS:
        lines.append(f'printf("const {name} %lu\\n", (unsigned long)({name}));')
    for struct in _structs():
        c = f"struct {struct.__name__}"
        lines.append(f'printf("struct {struct.__name__} %zu %zu\\n", sizeof({c}), alignof({c}));')
        for field, *_ in struct._fields_:
            lines.append(
                f'printf("field {struct.__name__}.{field} %zu %zu\\n", '
                f"offsetof({c}, {field}), sizeof((({c} *)0)->{field}));"
            )
    lines += ["return 0;", "}"]
    return "\n".join(lines) + "\n"


def _expected() -> list[str]:
    lines = [f"ioctl {info.name} {info.cmd}" for info in uapi.IOCTLS.values()]
    lines += [f"const {name} {int(getattr(uapi, name))}" for name in CONSTANTS]
    for struct in _structs():
        lines.append(f"struct {struct.__name__} {ctypes.sizeof(struct)} {ctypes.alignment(struct)}")
        for field, *_ in struct._fields_:
            desc = getattr(struct, field)
            lines.append(f"field {struct.__name__}.{field} {desc.offset} {desc.size}")
    return lines


@pytest.fixture(scope="module")
def header_output(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    work = tmp_path_factory.mktemp("header")
    source = work / "layout.c"
    source.write_text(_program())
    program = work / "layout"
    flags = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"]
    include = f"-I{shim.include_dir()}"
    subprocess.run(["gcc", *flags, include, "-o", str(program), str(source)], check=True)
    return subprocess.run(
        [str(program)], capture_output=True, text=True, check=True
    ).stdout.splitlines()


def test_header_layouts_and_numbers_match_uapi_py(header_output: list[str]) -> None:
    assert header_output == _expected()


def test_header_matches_the_shared_abi_vectors(header_output: list[str]) -> None:
    vectors = json.loads((SHARED / "abi" / "vectors.json").read_text())
    seen = set(header_output)
    for name, ioctl in vectors["ioctls"].items():
        assert f"ioctl {name} {ioctl['number']}" in seen
    for name, struct in vectors["structs"].items():
        assert f"struct {name} {struct['sizeof']} {struct['align']}" in seen
        for field, _type, offset, size, _dir in struct["fields"]:
            assert f"field {name}.{field} {offset} {size}" in seen


def test_header_is_installed_with_the_package() -> None:
    assert (shim.include_dir() / "liveupdate" / "luo.h").is_file()
    assert Path(shim.shim_source()).is_file()
