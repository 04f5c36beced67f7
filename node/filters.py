"""Which files and links of a folder replicate: its filter patterns (`filters` in sbs.ini),
shell-style globs with `**`, compiled to one regular expression per kind of pattern.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def _glob_class(pat: str, i: int) -> tuple[str, int] | None:
    """Translate the [...] set starting at pat[i]; None when it is not closed (a literal '[')."""
    j = i + 1
    if j < len(pat) and pat[j] in "!^":
        j += 1
    if j < len(pat) and pat[j] == "]":
        j += 1
    while j < len(pat) and pat[j] != "]":
        j += 1
    if j >= len(pat):
        return None
    body = pat[i + 1 : j]
    negate = body[:1] in ("!", "^")
    if negate:
        body = body[1:]
    body = "".join("\\" + c if c in "\\[]^" else c for c in body)
    # A set never matches "/": the separator belongs to the path, not to a name.
    return ("[^/" + body + "]" if negate else "(?!/)[" + body + "]"), j + 1


def glob_to_regex(pat: str) -> str:
    """`*`, `?` and `[...]` stay inside one path component; `**` as a whole component crosses
    folders (`**/x`, `a/**/x`, `a/**`)."""
    out: list[str] = []
    i, n = 0, len(pat)
    while i < n:
        c = pat[i]
        if c == "*":
            j = i
            while j < n and pat[j] == "*":
                j += 1
            whole = (i == 0 or pat[i - 1] == "/") and (j == n or pat[j] == "/")
            if j - i == 1 or not whole:
                out.append("[^/]*")  # as in gitignore, "**" inside a name is a plain "*"
            elif j < n:
                out.append("(?:.*/)?")  # "**/": zero or more whole folders
                j += 1
            else:
                out.append(".*")  # a trailing "/**": everything below
            i = j
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and (cls := _glob_class(pat, i)) is not None:
            out.append(cls[0])
            i = cls[1]
        else:
            out.append(re.escape(c))
            i += 1
    return "".join(out)


class Filter:
    """Which files and links of a folder replicate. Directories always do and are not filtered.

    A pattern without "/" matches the base name at any depth; one with "/" matches the whole
    relative path (a leading "/" only anchors it to the folder root). Patterns are OR'd.
    """

    def __init__(self, patterns: Iterable[str] = ("*",)):
        self.patterns = tuple(p for p in patterns if p)
        names = [p for p in self.patterns if "/" not in p]
        paths = [p.lstrip("/") for p in self.patterns if "/" in p]
        self._all = "*" in names or "**" in names
        self._name_re = self._compile(names)
        self._path_re = self._compile(paths)

    @staticmethod
    def _compile(patterns: list[str]) -> re.Pattern[str] | None:
        if not patterns:
            return None
        try:
            return re.compile("(?s:" + "|".join(glob_to_regex(p) for p in patterns) + ")")
        except re.error as e:
            raise ValueError(f"bad filter pattern in {patterns!r}: {e}") from e

    def match(self, relpath: str) -> bool:
        if self._all:
            return True
        if self._name_re is not None:
            if self._name_re.fullmatch(relpath.rpartition("/")[2]):
                return True
        return self._path_re is not None and self._path_re.fullmatch(relpath) is not None

    def __repr__(self) -> str:
        return f"Filter({list(self.patterns)!r})"
