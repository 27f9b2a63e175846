"""Pure: a front worker's counts of the answers it gave itself, and of its connections, sent
to the primary each second, so that ``/metrics`` and the status page count every process's.

The same labels as the primary's own counting (:meth:`Metrics.count`, :meth:`Pulls.count`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.core import jsontext

# Distinct label sets in one report; more wait for the next (they are few: a label set is a
# kind, cache result, status and upstream; a pull is a tag).
MAX_ROWS: Final = 10_000

RequestLabels = tuple[str, str, int, str]  # kind, cache result, status, upstream
PullLabels = tuple[str, str, str, str]  # upstream, repository, tag, source


# A refusal's reason, as the runner names them (address_limit, header_timeout).
_REASON: Final = re.compile(r"[a-z_]{1,32}")


@dataclass(slots=True)
class Tally:
    requests: dict[RequestLabels, list[int]] = field(default_factory=dict)  # -> [answers, bytes]
    pulls: dict[PullLabels, int] = field(default_factory=dict)

    def answered(self, kind: str, cache: str, status: int, upstream: str, sent: int) -> None:
        row = self.requests.get((kind, cache, status, upstream))
        if row is None:
            row = self.requests[(kind, cache, status, upstream)] = [0, 0]
        row[0] += 1
        row[1] += sent

    def pulled(self, upstream: str, repository: str, tag: str, source: str) -> None:
        key = (upstream, repository, tag, source)
        self.pulls[key] = self.pulls.get(key, 0) + 1

    def __bool__(self) -> bool:
        return bool(self.requests or self.pulls)

    def take(self, connections: int = 0, refused: dict[str, int] | None = None) -> bytes:
        """The report as JSON, with the worker's open ``connections`` and the ones it
        ``refused`` since the last report; the tally starts again from nothing."""
        body = json.dumps(
            {
                "requests": [[*k, n, sent] for k, (n, sent) in self.requests.items()],
                "pulls": [[*k, n] for k, n in self.pulls.items()],
                "connections": connections,
                "refused": refused or {},
            }
        ).encode()
        self.requests = {}
        self.pulls = {}
        return body


class BadReport(ValueError):
    pass


def _strings(row: list[Any], n: int) -> bool:
    return all(isinstance(v, str) and len(v) <= 4096 for v in row[:n])


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


@dataclass(frozen=True, slots=True)
class Report:
    requests: list[tuple[RequestLabels, int, int]]  # labels, answers, bytes
    pulls: list[tuple[PullLabels, int]]
    connections: int
    refused: dict[str, int]


def parse(body: bytes) -> Report:
    """A report; :class:`BadReport` for anything that is not one."""
    try:
        doc = jsontext.loads(body)
    except ValueError:
        raise BadReport("not JSON") from None
    if not isinstance(doc, dict):
        raise BadReport("not an object")
    requests, pulls = doc.get("requests", []), doc.get("pulls", [])
    if not isinstance(requests, list) or not isinstance(pulls, list) or len(requests) + len(pulls) > MAX_ROWS:
        raise BadReport("not lists of rows")
    out_r: list[tuple[RequestLabels, int, int]] = []
    for row in requests:
        if not (isinstance(row, list) and len(row) == 6 and _strings(row, 2) and _strings(row[3:4], 1)):
            raise BadReport("bad request row")
        if not (_count(row[2]) and _count(row[4]) and _count(row[5])):
            raise BadReport("bad request row")
        out_r.append(((row[0], row[1], row[2], row[3]), row[4], row[5]))
    out_p: list[tuple[PullLabels, int]] = []
    for row in pulls:
        if not (isinstance(row, list) and len(row) == 5 and _strings(row, 4) and _count(row[4])):
            raise BadReport("bad pull row")
        out_p.append(((row[0], row[1], row[2], row[3]), row[4]))
    connections, refused = doc.get("connections", 0), doc.get("refused", {})
    if not _count(connections) or not isinstance(refused, dict) or len(refused) > 16:
        raise BadReport("bad connection counts")
    for reason, n in refused.items():
        if not (_REASON.fullmatch(reason) and _count(n)):
            raise BadReport("bad refusal count")
    return Report(out_r, out_p, connections, refused)
