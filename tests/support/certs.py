"""Certificates made per test (trustme): a CA, a server certificate for loopback, and client
certificates from that CA and from a foreign one, written out as PEM files as operators and
clients keep them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA that signed the server's and the good client's certificates
    server: Pair
    client: Pair
    foreign_client: Pair  # signed by another CA


def issue(ca: trustme.CA, directory: Path, name: str, *identities: str) -> Pair:
    leaf = ca.issue_cert(*identities, common_name=name)
    pair = Pair(directory / f"{name}.crt", directory / f"{name}.key")
    # The whole chain, leaf first, as servers and clients expect it.
    pair.cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(pair.key))
    return pair


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="ocicache tests")
    other = trustme.CA(organization_name="somebody else")
    ca_path = directory / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_path))
    return Pki(
        ca=ca_path,
        server=issue(ca, directory, "server", *LOOPBACK_NAMES),
        client=issue(ca, directory, "client", "client@example.test"),
        foreign_client=issue(other, directory, "foreign", "client@example.test"),
    )
