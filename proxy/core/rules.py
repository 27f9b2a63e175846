"""Pure: which client may pull which repository of which upstream (``auth.rules``).

Rules are tried in order; the first whose client, upstream and repository all match decides
(``deny: true`` refuses, anything else allows). No match refuses. Without rules, every client
the authentication step let through may pull everything.

* client: ``anonymous: true`` matches every client, logged in or not; ``users: [a, b]``
  matches those users; ``users: ["*"]`` any logged-in user.
* ``upstreams``: configured upstream names; left out, every upstream.
* ``repositories``: globs over the repository name on the upstream (after Docker Hub's
  ``library/`` is added): ``*`` and ``?`` stay within one path component, ``**`` crosses
  them. Left out, every repository.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.core.authconfig import AccessRule

ANY_USER = "*"


def glob_regex(glob: str) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    while i < len(glob):
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out))


@dataclass(frozen=True, slots=True)
class _Compiled:
    anyone: bool
    any_user: bool
    users: frozenset[str]
    upstreams: frozenset[str] | None
    repositories: tuple[re.Pattern[str], ...]
    deny: bool

    def matches(self, user: str | None, upstream: str, repository: str) -> bool:
        if not (self.anyone or (user is not None and (self.any_user or user in self.users))):
            return False
        if self.upstreams is not None and upstream not in self.upstreams:
            return False
        return any(p.fullmatch(repository) for p in self.repositories)


class Rules:
    def __init__(self, rules: Sequence[AccessRule]) -> None:
        self._rules = tuple(
            _Compiled(
                anyone=r.anonymous,
                any_user=ANY_USER in r.users,
                users=frozenset(r.users),
                upstreams=None if r.upstreams is None else frozenset(r.upstreams),
                repositories=tuple(glob_regex(g) for g in r.repositories),
                deny=r.deny,
            )
            for r in rules
        )

    def allows(self, user: str | None, upstream: str, repository: str) -> bool:
        """May ``user`` (None: an anonymous client) pull ``repository`` from ``upstream``?"""
        if not self._rules:
            return True
        for rule in self._rules:
            if rule.matches(user, upstream, repository):
                return not rule.deny
        return False

    def __bool__(self) -> bool:
        return bool(self._rules)
