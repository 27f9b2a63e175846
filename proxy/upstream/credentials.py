"""Upstream credentials that do not sit in our own configuration.

From a Docker ``config.json`` (pure): ``docker login`` writes
``{"auths": {"<registry>": {"auth": base64("user:secret")}}}``; Docker Hub's key is the
historical ``https://index.docker.io/v1/``. Docker's credential helpers (``credsStore``) are
programs, not data: an upstream's ``credential_command`` runs one (:func:`run_helper`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import shlex
from collections.abc import Mapping
from typing import Any, Final

import structlog
from yarl import URL

log = structlog.get_logger("ocicache.credentials")

Credentials = tuple[str, str]

# Names under which Docker Hub credentials are stored, and the names we call it by.
_DOCKER_HUB: Final = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)


def _host_key(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``; ``ghcr.io`` -> ``ghcr.io``."""
    text = key.strip().lower()
    if "://" in text:
        url = URL(text)
        host = url.host or ""
        return f"{host}:{url.port}" if url.explicit_port else host
    return text.split("/")[0]


def _decode(entry: Any) -> Credentials | None:
    if not isinstance(entry, Mapping):
        return None
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, sep, secret = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return (user, secret) if sep else None
    name, password = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(password, str):
        return (name, password)
    return None


def parse_auths(doc: Any) -> dict[str, Credentials]:
    """Host -> credentials from a parsed config.json; entries we cannot read are skipped."""
    auths = doc.get("auths") if isinstance(doc, Mapping) else None
    if not isinstance(auths, Mapping):
        return {}
    found: dict[str, Credentials] = {}
    for key, entry in auths.items():
        creds = _decode(entry)
        if creds is not None:
            found[_host_key(str(key))] = creds
    return found


def lookup(auths: Mapping[str, Credentials], name: str, url: str) -> Credentials | None:
    """Credentials for the upstream clients call ``name``, reached at ``url``."""
    candidates = [name.lower()]
    u = URL(url)
    if u.host:
        candidates.append(f"{u.host}:{u.port}" if u.explicit_port else u.host)
    for candidate in candidates:
        if candidate in auths:
            return auths[candidate]
        if candidate in _DOCKER_HUB:
            for alias in _DOCKER_HUB:
                if alias in auths:
                    return auths[alias]
    return None


# A helper that takes longer than this is broken; the request fails rather than hangs.
HELPER_TIMEOUT: Final = 30.0


async def run_helper(command: str, username: str | None, upstream: str) -> Credentials | None:
    """Run a credential command; it prints ``user:secret``, or a bare secret to go with
    ``username`` (ECR's ``aws ecr get-login-password`` goes with ``AWS``)."""
    proc = await asyncio.create_subprocess_exec(
        *shlex.split(command),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=HELPER_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("credential_command_timeout", upstream=upstream)
        return None
    if proc.returncode != 0:
        log.warning("credential_command_failed", upstream=upstream, rc=proc.returncode)
        return None
    text = out.decode(errors="replace").strip()
    user, sep, secret = text.partition(":")
    return (user, secret) if sep else (username or "oauth2accesstoken", text)
