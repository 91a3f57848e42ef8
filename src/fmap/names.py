"""Object names: the Windows rules, turned into registry keys.

Names are case-sensitive.  "Local\\" and "Global\\" are namespaces ("Local\\x"
and "x" are one object, as in a Windows session); any other backslash is an
error; None and "" mean unnamed.  On Linux both namespaces are per user.
"""
from __future__ import annotations

from . import _fmap

ERROR_PATH_NOT_FOUND = 3
ERROR_BAD_PATHNAME = 161
ERROR_FILENAME_EXCED_RANGE = 206
MAX_NAME_BYTES = 255     # UTF-8 bytes after the namespace prefix

_NAMESPACES = (("Local\\", b"L"), ("Global\\", b"G"))


def _bad(message: str, winerror: int) -> ValueError:
    exc = ValueError(message)
    exc.winerror = winerror  # type: ignore[attr-defined]
    return exc


_cache: dict[str, bytes] = {}


def key_for(name: str | None) -> bytes | None:
    """The registry key of a name (namespace byte + UTF-8), None when unnamed."""
    if name is None or name == "":
        return None
    exact = type(name) is str       # a subclass could hash or compare its own way
    key = _cache.get(name) if exact else None
    if key is None:
        key = _key(name)
        if exact:
            if len(_cache) >= 4096:
                _cache.clear()
            _cache[name] = key
    return key


def named(name: str | None) -> tuple[str | None, bytes | None]:
    """(name, key) for a create: (None, None) when unnamed (None or "")."""
    key = key_for(name)
    return (name if key is not None else None), key


def _key(name: str) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"a name is a str or None, not {type(name).__name__}")
    ns, rest = b"L", name
    for prefix, code in _NAMESPACES:
        if name.startswith(prefix):
            ns, rest = code, name[len(prefix):]
            break
    if not rest:
        raise _bad(f"invalid name {name!r}: nothing after the namespace", ERROR_BAD_PATHNAME)
    if "\\" in rest:
        # Windows: "a\\b" is a path into a missing directory (ERROR_PATH_NOT_FOUND),
        # a leading backslash bad syntax (ERROR_BAD_PATHNAME); Wine ntdll/tests/om.c.
        raise _bad(f"invalid name {name!r}: a backslash may only end a \"Local\\\" or "
                   "\"Global\\\" prefix",
                   ERROR_BAD_PATHNAME if rest.startswith("\\") else ERROR_PATH_NOT_FOUND)
    if "\0" in rest:
        raise _bad(f"invalid name {name!r}: names cannot contain NUL", ERROR_BAD_PATHNAME)
    try:
        raw = rest.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"invalid name {name!r}: not encodable as UTF-8", ERROR_BAD_PATHNAME) from None
    if len(raw) > MAX_NAME_BYTES:
        raise _bad(f"name too long: {len(raw)} bytes of UTF-8, at most {MAX_NAME_BYTES}",
                   ERROR_FILENAME_EXCED_RANGE)
    return ns + raw


def display(key: bytes) -> str:
    """The name a registry key stands for."""
    prefix = "Global\\" if key[:1] == b"G" else ""
    return prefix + key[1:].decode("utf-8", "replace")

