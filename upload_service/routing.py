"""Routing as data: path templates -> method -> handler, matched without a framework.

A template is a literal path (`/health`) or one with named segments (`/files/{file_id}`);
a named segment matches one non-empty path segment (never a `/`), and its text is given
to the handler as a keyword argument. The handler checks what the text may be.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

Methods = Mapping[str, Callable[..., Any]]

SEGMENT_RE = re.compile(r"\{([a-z_]+)\}")


def compile_template(template: str) -> re.Pattern[str]:
    """Turn `/files/{file_id}/record` into a pattern with one named group per segment."""
    parts = SEGMENT_RE.split(template)
    # split() alternates literal text and group names.
    pattern = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts))
    return re.compile(pattern)


class Routes:
    """A route table: exact paths looked up in a dict, templates tried in order."""

    def __init__(self, table: Mapping[str, Methods]) -> None:
        self.exact: dict[str, Methods] = {}
        self.templates: list[tuple[re.Pattern[str], Methods]] = []
        for template, methods in table.items():
            if SEGMENT_RE.search(template):
                self.templates.append((compile_template(template), methods))
            else:
                self.exact[template] = methods

    def match(self, path: str) -> tuple[Methods, dict[str, str]] | None:
        """The methods of the route for `path` and its segment values, or None (404)."""
        methods = self.exact.get(path)
        if methods is not None:
            return methods, {}
        for pattern, methods in self.templates:
            found = pattern.fullmatch(path)
            if found is not None:
                return methods, found.groupdict()
        return None


def allowed_methods(methods: Methods) -> str:
    """The `Allow` header of a route: its methods, and HEAD wherever GET is."""
    return ", ".join(sorted({*methods, *(["HEAD"] if "GET" in methods else [])}))


def pick_handler(methods: Methods, method: str) -> Callable[..., Any] | None:
    """The handler for `method`; HEAD falls back to GET (answered without a body)."""
    handler = methods.get(method)
    if handler is None and method == "HEAD":
        handler = methods.get("GET")
    return handler
