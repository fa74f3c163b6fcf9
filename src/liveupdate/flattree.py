"""Flattened Device Trees through libfdt, strictly: the generic half of the image codec.

libfdt (``pylibfdt``) is the C library of the ``dtc`` project, the same FDT
code the kernel's KHO uses. This module holds what the handover codec needs
of it and knows nothing of the LUO schema: writing a root with properties
and childless children (libfdt's sequential-write interface), and reading a
node's properties and children after ``fdt_check_full`` has checked every
offset, length, tag and the nesting of the structure block.

What libfdt leaves to its callers is checked here on top: the buffer is
exactly ``totalsize`` bytes and FDT version 17, no node repeats a property
or a child name, and names are ASCII. Every refusal is a
:class:`FlatTreeError` whose reason names the node at fault.
"""

from __future__ import annotations

from typing import Final

import libfdt

from liveupdate.handover_abi import FDT_FORMAT_VERSION

__all__ = [
    "FlatNode",
    "FlatTreeError",
    "Properties",
    "check_tree",
    "read_node",
    "root_value_spans",
    "write_tree",
]

_FDT_MAGIC: Final = 0xD00DFEED
_FDT_HEADER_SIZE: Final = 40
# libfdt sizes buffers with a C int: a bigger tree cannot be written at all.
_FDT_MAX_SIZE: Final = 0x7FFF_FFFF
#: An FDT_PROP tag, its value length and its name offset precede the value.
_FDT_PROP_HEADER: Final = 12

#: What each libfdt error means for an image that ``fdt_check_full`` or a
#: walk refused; the libfdt text is appended to the reason as well.
_LIBFDT_MEANINGS: Final = {
    libfdt.TRUNCATED: "a block, tag or name lies outside the image or its block",
    libfdt.BADMAGIC: "not a flattened device tree",
    libfdt.BADVERSION: "FDT format version not readable",
    libfdt.BADSTRUCTURE: (
        "malformed structure block (unbalanced nodes, a second root, "
        "a named root or an unknown tag)"
    ),
    libfdt.BADLAYOUT: "blocks overlap or are out of order",
    libfdt.BADOFFSET: "no node or property where the structure block needs one",
}

#: A node's properties in order: (name, raw value).
Properties = list[tuple[str, bytes]]


class FlatTreeError(Exception):
    """The buffer is not a well-formed FDT; ``reason`` names the node at fault."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _align4(size: int) -> int:
    return (size + 3) & ~3


def _tree_size(root: Properties, nodes: list[tuple[str, Properties]]) -> int:
    """The exact size of the DTB holding ``root`` and ``nodes``.

    Handed to libfdt as the buffer size: its sequential writer otherwise
    grows the buffer 1 KiB at a time, copying it each time (quadratic).
    """
    names = {name for name, _ in root}
    structure = 8 + 4 + 4  # root FDT_BEGIN_NODE and its empty name, FDT_END_NODE, FDT_END
    for name, props in [("", root), *nodes]:
        if name:
            structure += 4 + _align4(len(name) + 1) + 4
        for prop, value in props:
            structure += 12 + _align4(len(value))
            names.add(prop)
    strings = sum(len(name) + 1 for name in names)
    return _FDT_HEADER_SIZE + 16 + structure + strings


def write_tree(root: Properties, nodes: list[tuple[str, Properties]]) -> bytes:
    """Serialize a root with properties and childless children via libfdt."""
    size = _tree_size(root, nodes)
    if size > _FDT_MAX_SIZE:
        raise ValueError(
            f"too large for a flattened device tree: {size} bytes "
            f"(libfdt writes at most {_FDT_MAX_SIZE})"
        )
    writer = libfdt.FdtSw(size)
    writer.finish_reservemap()
    writer.begin_node("")
    for prop, value in root:
        writer.property(prop, value)
    for name, props in nodes:
        writer.begin_node(name)
        for prop, value in props:
            writer.property(prop, value)
        writer.end_node()
    writer.end_node()
    tree = writer.as_fdt()
    blob: bytearray = tree.as_bytearray()
    return bytes(blob[: tree.totalsize()])


class FlatNode:
    """One node as read through libfdt: raw property values and children."""

    __slots__ = ("children", "path", "props")

    def __init__(self, path: str) -> None:
        self.path = path
        self.props: dict[str, bytearray] = {}
        self.children: list[tuple[str, int]] = []  # (name, structure offset)


def _corrupt(reason: str) -> FlatTreeError:
    """Build the error for a malformed tree (raised by the caller)."""
    return FlatTreeError(reason)


def _libfdt_refusal(where: str, err: int) -> FlatTreeError:
    """The error for a libfdt error code ``err`` (negative) met at ``where``."""
    meaning = _LIBFDT_MEANINGS.get(-err, "libfdt refuses the tree")
    return _corrupt(f"{where}: {meaning} (libfdt: {libfdt.strerror(err)})")


def check_tree(buffer: bytearray) -> None:
    """Check that ``buffer`` as a whole is a tree the walks of :func:`read_node` may trust.

    The header checks that libfdt leaves to its caller come first, with
    reasons an operator can act on; then ``fdt_check_full`` walks the
    structure block once, so that the walks of :func:`read_node` never meet a bad offset.
    """
    size = len(buffer)
    if size < _FDT_HEADER_SIZE:
        raise _corrupt(f"{size} bytes is shorter than an FDT header ({_FDT_HEADER_SIZE} bytes)")
    magic = libfdt.fdt_magic(buffer)
    if magic != _FDT_MAGIC:
        raise _corrupt(
            f"magic is 0x{magic:08x}, not 0x{_FDT_MAGIC:08x}: not a flattened device tree"
        )
    totalsize = libfdt.fdt_totalsize(buffer)
    if totalsize != size:
        raise _corrupt(f"header says {totalsize} bytes but the image has {size} bytes")
    version = libfdt.fdt_version(buffer)
    last_compatible = libfdt.fdt_last_comp_version(buffer)
    if version < FDT_FORMAT_VERSION or last_compatible > FDT_FORMAT_VERSION:
        raise _corrupt(
            f"FDT format version {version} (compatible with {last_compatible}) "
            f"cannot be read as version {FDT_FORMAT_VERSION}"
        )
    err = libfdt.fdt_check_full(buffer, size)
    if err:
        raise _libfdt_refusal("/", err)


def read_node(buffer: bytearray, offset: int, path: str) -> FlatNode:
    """Read the properties and list the children of the node at ``offset``.

    Calls the libfdt functions themselves rather than pylibfdt's ``FdtRo``
    methods, whose per-call wrapping costs more than the C work (reading
    2000 session nodes: 7 ms instead of 13 ms). The functions returning a
    pointer give ``[value, ...]`` on success and ``[None, err]`` (with SWIG
    up to 4.2, the bare ``err``) on failure.

    libfdt returns the first of two same-named properties or nodes and
    ignores the second; a duplicate is refused here instead, since two
    readers could disagree on which one counts (``dtc`` refuses such a tree
    too). Names must be ASCII, as the devicetree specification's alphabet is.
    """
    node = FlatNode(path)
    try:
        _read_properties(buffer, offset, node)
        _read_children(buffer, offset, node)
    except (SystemError, UnicodeError):
        # The binding decodes names as UTF-8 and fails inside the C call.
        raise _corrupt(f"{path}: a property or child node name is not ASCII") from None
    _check_names(node)
    return node


def _read_properties(buffer: bytearray, offset: int, node: FlatNode) -> None:
    """Fill ``node.props`` from the properties of the node at ``offset``."""
    props = node.props
    get_property, next_property = libfdt.fdt_get_property_by_offset, libfdt.fdt_next_property_offset
    prop_offset = libfdt.fdt_first_property_offset(buffer, offset)
    while prop_offset >= 0:
        entry = get_property(buffer, prop_offset)
        if not isinstance(entry, list) or entry[0] is None:
            raise _libfdt_refusal(node.path, entry if isinstance(entry, int) else entry[1])
        name = entry[0]
        if name in props:
            raise _corrupt(f"{node.path}: duplicate property {name!r}")
        props[name] = entry[1]
        prop_offset = next_property(buffer, prop_offset)
    _check_end(prop_offset, node.path)


def _read_children(buffer: bytearray, offset: int, node: FlatNode) -> None:
    """Fill ``node.children`` with the names and offsets of its subnodes."""
    child = libfdt.fdt_first_subnode(buffer, offset)
    while child >= 0:
        entry = libfdt.fdt_get_name(buffer, child)
        if not isinstance(entry, list) or entry[0] is None:
            raise _libfdt_refusal(node.path, entry if isinstance(entry, int) else entry[1])
        node.children.append((entry[0], child))
        child = libfdt.fdt_next_subnode(buffer, child)
    _check_end(child, node.path)


def _check_names(node: FlatNode) -> None:
    """Refuse non-ASCII property or node names and duplicate node names."""
    for name in node.props:
        if not name.isascii():
            raise _corrupt(f"{node.path}: property name {name!r} is not ASCII")
    seen: set[str] = set()
    for name, _ in node.children:
        if not name.isascii():
            raise _corrupt(f"{node.path}: child node name {name!r} is not ASCII")
        if name in seen:
            raise _corrupt(f"{node.path}: duplicate node {name!r}")
        seen.add(name)


def root_value_spans(buffer: bytearray, names: tuple[str, ...]) -> dict[str, slice]:
    """Where the values of the root's properties ``names`` lie in ``buffer``
    (a tree :func:`check_tree` accepted, or this module wrote), as slices of
    the whole buffer; a name the root does not have is left out.

    For a caller that rewrites a fixed-size value in place (same length: the
    tree's layout does not change) instead of writing the tree again.
    """
    spans: dict[str, slice] = {}
    base = libfdt.fdt_off_dt_struct(buffer) + _FDT_PROP_HEADER
    prop_offset = libfdt.fdt_first_property_offset(buffer, 0)
    while prop_offset >= 0 and len(spans) < len(names):
        entry = libfdt.fdt_get_property_by_offset(buffer, prop_offset)
        if not isinstance(entry, list) or entry[0] is None:
            break
        if entry[0] in names:
            start = base + prop_offset
            spans[entry[0]] = slice(start, start + len(entry[1]))
        prop_offset = libfdt.fdt_next_property_offset(buffer, prop_offset)
    return spans


def _check_end(offset: int, path: str) -> None:
    """Accept the end of an iteration over properties or subnodes, else raise."""
    if offset != -libfdt.NOTFOUND:
        raise _libfdt_refusal(path, offset)
