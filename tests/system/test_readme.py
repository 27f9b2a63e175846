"""The README's commands work as written: the two set-up commands, and the containerd snippet
under bash and zsh (an unquoted URL with ``?`` or ``&`` breaks in both)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartProxy

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def marked_block(name: str) -> str:
    """The code block that follows ``<!-- readme-test: name -->``."""
    m = re.search(rf"<!-- readme-test: {name} -->\n```sh\n(.*?)```", README, re.S)
    assert m is not None, f"README has no block marked {name}"
    return m.group(1)


def setup_commands() -> list[str]:
    """The commands of the README's "Set up" section, one per sh block."""
    section = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)][:2]


def test_the_readme_has_exactly_the_two_set_up_commands_and_ci_runs_the_test_one() -> None:
    serve, test = setup_commands()
    assert serve == "./scripts/serve.sh"
    assert test == "./scripts/test.sh"
    assert "exec ./scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    # Neither installs outside a virtual environment (Debian and Ubuntu refuse that).
    for script in ("serve.sh", "test.sh", "venv.sh"):
        text = (ROOT / "scripts" / script).read_text()
        assert not re.search(r"^\s*(python3|pip3?) (-m pip )?install", text, re.M), script


@pytest.mark.parametrize("shell", ["bash", "zsh"])
async def test_the_containerd_snippet_writes_what_setup_serves(
    start_proxy: StartProxy, session: aiohttp.ClientSession, tmp_path: Path, shell: str
) -> None:
    proxy = await start_proxy({"docker.io": "http://127.0.0.1:9", "ghcr.io": "http://127.0.0.1:9"})
    certs = tmp_path / "certs.d"
    script = (
        marked_block("containerd").replace("PROXY", proxy.host).replace("/etc/containerd/certs.d", str(certs))
    )
    proc = await asyncio.create_subprocess_exec(
        shell, "-e", "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    for registry, query in (
        ("docker.io", "registry=docker.io"),
        ("ghcr.io", "registry=ghcr.io&override_path=1"),
    ):
        async with session.get(f"{proxy.url}/setup/containerd?{query}") as resp:
            expected = await resp.text()
        assert (certs / registry / "hosts.toml").read_text() == expected
    assert "override_path = true" in (certs / "ghcr.io" / "hosts.toml").read_text()


async def test_serve_sh_installs_and_serves_on_its_defaults(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # The embedded defaults, except where it listens and caches (this machine's port 5000 and
    # home directory are not the test's to take).
    env = {**os.environ, "OCICACHE_CACHE_DIR": str(tmp_path / "cache"), "OCICACHE_LISTEN": "127.0.0.1:0"}
    proc = await asyncio.create_subprocess_exec(
        str(ROOT / "scripts" / "serve.sh"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,  # the script finds the project from its own path
    )
    try:
        assert proc.stdout is not None
        url = None
        while url is None:
            line = await asyncio.wait_for(proc.stdout.readline(), 300)
            assert line, "serve.sh ended before it served"
            found = re.search(rb"listening on (http://\S+)", line)
            url = found.group(1).decode() if found else None
        async with session.get(f"{url}/v2/") as resp:
            assert resp.status == 200
        async with session.get(f"{url}/setup/docker") as resp:
            assert resp.status == 200  # Docker Hub is the default upstream
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 60)
    assert proc.returncode == 0
    assert (tmp_path / "cache" / "blobs").is_dir()
