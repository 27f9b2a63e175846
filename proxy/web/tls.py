"""HTTPS on the listener (``tls:``): the server's SSL context, and reloading its certificate.

SIGHUP reloads ``tls.cert`` and ``tls.key`` into the *same* context: OpenSSL copies the
certificate into each connection when its handshake starts, so connections already open keep
the one they began with and new ones get the new one, with nothing dropped. The new pair is
first loaded into a scratch context, so a bad file (a renewal half-copied, a key that does not
match) leaves the old pair serving rather than a broken one. The live context is changed on
the event-loop thread, where every handshake runs, never while one is being set up.

``tls.client_ca`` (mTLS) is read at start only: OpenSSL can add trusted CAs to a context but
not take them away, so a changed client CA needs a restart.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import structlog

from proxy.core.authconfig import TlsConfig
from proxy.core.configvalues import ConfigError

log = structlog.get_logger("ocicache")


def _no_passphrase() -> bytes:
    # An encrypted key would otherwise make OpenSSL ask on the terminal, and the start hang.
    raise ConfigError("tls.key", "encrypted private keys are not supported (decrypt it with openssl)")


def _readable(key: str, path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror}") from None


def _load_chain(ctx: ssl.SSLContext, cfg: TlsConfig) -> None:
    _readable("tls.cert", cfg.cert)
    _readable("tls.key", cfg.key)
    try:
        ctx.load_cert_chain(cfg.cert, cfg.key, password=_no_passphrase)
    except ssl.SSLError as exc:
        raise ConfigError("tls.cert", f"cannot use {cfg.cert} with {cfg.key}: {exc.reason or exc}") from None


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(ctx, cfg)
    if cfg.client_ca is not None:
        _readable("tls.client_ca", cfg.client_ca)
        try:
            ctx.load_verify_locations(cafile=cfg.client_ca)
        except ssl.SSLError as exc:
            raise ConfigError("tls.client_ca", f"not a PEM CA bundle: {exc.reason or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def check(cfg: TlsConfig) -> None:
    """Load the pair into a scratch context (blocking: run it in a thread); ConfigError if bad."""
    _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cfg)


def reload(ctx: ssl.SSLContext, cfg: TlsConfig) -> None:
    """Load the pair into the live context; call :func:`check` first, and on the loop thread."""
    _load_chain(ctx, cfg)


async def reload_logged(ctx: ssl.SSLContext, cfg: TlsConfig) -> None:
    """SIGHUP: the renewed certificate for new connections; open ones keep theirs."""
    try:
        await asyncio.to_thread(check, cfg)
        reload(ctx, cfg)
    except ConfigError as exc:
        log.error("tls_reload_failed", error=str(exc), kept="previous certificate")
        print(f"ocicache: TLS reload failed, still serving the previous certificate: {exc}", flush=True)
        return
    log.info("tls_reloaded", cert=str(cfg.cert))
    print(f"ocicache: reloaded TLS certificate {cfg.cert}", flush=True)
