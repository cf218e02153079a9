"""TLS on the client listener, against real proxyd, a throwaway CA, the openai SDK and curl."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import warnings
from pathlib import Path

import aiohttp
import httpx2
import openai
import pytest
import trustme

from proxyd.mockprovider import create_mock_app
from tests.conftest import SECRET, StartServer, server_url
from tests.served import serve


def issue(ca: trustme.CA, directory: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 from `ca`, written as PEM files; (cert path, key path)."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    directory.mkdir(exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_path.write_bytes(cert.private_key_pem.bytes())
    return str(cert_path), str(key_path)


def spoil(path: str) -> None:
    Path(path).write_text("not a certificate")


def client_context(ca: trustme.CA, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 on purpose
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = context.maximum_version = version
    return context


async def handshake(port: int, context: ssl.SSLContext) -> tuple[str | None, bytes | None]:
    """The TLS version and the server certificate (DER) of a new connection."""
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
    )
    try:
        tls = writer.get_extra_info("ssl_object")
        return tls.version(), tls.getpeercert(binary_form=True)
    finally:
        writer.close()


async def refused(port: int, context: ssl.SSLContext) -> None:
    """A handshake the server refuses: it drops the connection after the ClientHello (or sends
    a protocol_version alert); never the client's own refusal to speak that version."""
    with pytest.raises((ConnectionResetError, ssl.SSLError)) as caught:
        await handshake(port, context)
    if isinstance(caught.value, ssl.SSLError):
        assert "PROTOCOL_VERSION" in str(caught.value).upper(), caught.value


async def test_tls13_with_the_openai_sdk_and_curl(
    tmp_path: Path, start_server: StartServer
) -> None:
    """PROXYD_TLS_CERT/KEY: the openai SDK streams over TLS 1.3; curl verifies the chain."""
    mock = await start_server(create_mock_app(chunks=5))
    ca = trustme.CA()
    cert, key = issue(ca, tmp_path / "tls")
    env = {"PROXYD_TLS_CERT": cert, "PROXYD_TLS_KEY": key}
    async with serve(tmp_path, server_url(mock), env=env) as px:
        assert px.url.startswith("https://")
        version, _ = await handshake(px.port, client_context(ca))
        assert version == "TLSv1.3"

        async with httpx2.AsyncClient(verify=client_context(ca)) as http:
            sdk = openai.AsyncOpenAI(
                api_key=SECRET, base_url=px.url + "/v1", http_client=http, max_retries=0
            )
            stream = await sdk.chat.completions.create(
                model="mock-gpt", stream=True, messages=[{"role": "user", "content": "Hi"}]
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert len(text.split()) == 5

        ca_path = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", "-v", "--cacert", str(ca_path), "-H", f"Authorization: Bearer {SECRET}",
            px.url + "/v1/models",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await curl.communicate()
        assert curl.returncode == 0, err.decode()
        assert b'"mock-gpt"' in out
        assert b"SSL connection using TLSv1.3" in err
        assert b"\n< server:" not in err.lower()
        # without the CA, curl refuses the certificate (it is really checked)
        curl = await asyncio.create_subprocess_exec(
            "curl", "-sS", px.url + "/healthz",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await curl.communicate()
        assert curl.returncode == 60  # peer certificate cannot be authenticated


async def test_tls12_only_by_choice_and_tls11_never(
    tmp_path: Path, start_server: StartServer
) -> None:
    """Default: TLS 1.2 and 1.1 clients refused; `tls_min_version = "1.2"`: 1.2 in, 1.1 out."""
    mock = await start_server(create_mock_app())
    ca = trustme.CA()
    cert, key = issue(ca, tmp_path / "tls")
    async with serve(tmp_path, server_url(mock), {"tls_cert": cert, "tls_key": key}) as px:
        await refused(px.port, client_context(ca, ssl.TLSVersion.TLSv1_2))
        await refused(px.port, client_context(ca, ssl.TLSVersion.TLSv1_1))
    settings = {"tls_cert": cert, "tls_key": key, "tls_min_version": "1.2"}
    async with serve(tmp_path, server_url(mock), settings) as px:
        version, _ = await handshake(px.port, client_context(ca, ssl.TLSVersion.TLSv1_2))
        assert version == "TLSv1.2"
        await refused(px.port, client_context(ca, ssl.TLSVersion.TLSv1_1))


async def test_sighup_reloads_the_certificate_without_dropping_connections(
    tmp_path: Path, start_server: StartServer
) -> None:
    """SIGHUP: new handshakes get the new certificate; a stream already open runs to its end."""
    mock = await start_server(create_mock_app(chunks=40, chunk_interval=0.05))
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = issue(old_ca, tmp_path / "tls")
    trust = client_context(old_ca)
    new_ca.configure_trust(trust)
    async with serve(tmp_path, server_url(mock), {"tls_cert": cert, "tls_key": key}) as px:
        _, before = await handshake(px.port, trust)
        async with aiohttp.ClientSession() as session:
            body = {
                "model": "mock-gpt",
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            }
            async with session.post(
                px.url + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {SECRET}"},
                ssl=trust,
            ) as resp:
                assert resp.status == 200
                first = await resp.content.readany()
                issue(new_ca, tmp_path / "tls")  # the same paths, a new pair
                px.proc.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.3)
                _, after = await handshake(px.port, trust)
                rest = await resp.read()
        assert before != after
        with pytest.raises(ssl.SSLError):  # only the new CA vouches for it now
            await handshake(px.port, client_context(old_ca))
        stream = first + rest
        assert stream.endswith(b"data: [DONE]\n\n")
        assert stream.count(b'"content"') >= 40
        assert px.proc.returncode is None

        # a broken pair on SIGHUP is refused and the one in force stays
        spoil(cert)
        px.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        _, still = await handshake(px.port, trust)
        assert still == after


@pytest.mark.slow
async def test_tls_under_workers_and_sighup_brings_the_new_certificate(
    tmp_path: Path, start_server: StartServer
) -> None:
    """--workers 2: every worker serves TLS 1.3; SIGHUP's new workers load the new pair."""
    mock = await start_server(create_mock_app())
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = issue(old_ca, tmp_path / "tls")
    trust = client_context(old_ca)
    new_ca.configure_trust(trust)
    settings = {"workers": 2, "tls_cert": cert, "tls_key": key}
    async with serve(tmp_path, server_url(mock), settings) as px:
        seen = {await handshake(px.port, trust) for _ in range(8)}
        assert len(seen) == 1
        ((version, before),) = seen
        assert version == "TLSv1.3"
        issue(new_ca, tmp_path / "tls")
        px.proc.send_signal(signal.SIGHUP)
        after: set[bytes | None] = set()
        for _ in range(200):  # the workers are replaced one at a time
            after = {(await handshake(px.port, trust))[1] for _ in range(6)}
            if before not in after:
                break
            await asyncio.sleep(0.1)
        assert before not in after
        assert len(after) == 1
        async with (
            aiohttp.ClientSession() as session,
            session.get(px.url + "/healthz", ssl=trust) as resp,
        ):
            assert resp.status == 200


async def test_a_tls_handshake_under_way_at_drain_is_finished_and_served(
    tmp_path: Path, start_server: StartServer
) -> None:
    """SIGTERM (or a reload retiring a worker) while a client's TLS handshake is under way: the
    connection was accepted before the listener closed, so the handshake completes and its
    request is answered, then the connection closed; exit 0. Before: the drain did not know
    the connection (aiohttp meets it only after the handshake) and the process exited under it,
    a `ConnectionResetError` in the client's handshake (the SIGHUP test's rare failure). The
    answer says `Connection: close`, the request sent right after the handshake or not."""
    mock = await start_server(create_mock_app(instant=True))
    ca = trustme.CA()
    cert, key = issue(ca, tmp_path / "tls")
    settings = {"tls_cert": cert, "tls_key": key, "head_timeout_seconds": 3}
    async with serve(tmp_path, server_url(mock), settings) as px:
        sock = socket.create_connection(("127.0.0.1", px.port))  # accepted; no ClientHello yet
        await asyncio.sleep(0.2)
        px.proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)  # the listener is closed; the drain has begun
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=client_context(ca), server_hostname="127.0.0.1"
        )
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 10)  # to the end: the server closes it
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        assert b"\r\nconnection: close\r\n" in data.lower().split(b"\r\n\r\n")[0] + b"\r\n"
        assert data.endswith(b'{"status": "ok"}')
        assert await asyncio.wait_for(px.proc.wait(), 10) == 0
        writer.close()


def test_check_config_and_serve_refuse_a_certificate_that_cannot_be_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config and serve exit 2 naming the file: missing, not a certificate, key alone."""
    from proxyd.cli import main

    ca = trustme.CA()
    cert, key = issue(ca, tmp_path / "tls")
    config = tmp_path / "proxyd.toml"
    config.write_text(f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    assert main(["check-config", str(config)]) == 0
    missing = tmp_path / "nope.pem"
    config.write_text(f'[server]\ntls_cert = "{missing}"\ntls_key = "{key}"\n')
    assert main(["check-config", str(config)]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err
    assert main(["serve", "--config", str(config)]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err
    spoil(cert)
    config.write_text(f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    assert main(["check-config", str(config)]) == 2
    assert "server.tls_cert" in capsys.readouterr().err
    config.write_text(f'[server]\ntls_key = "{key}"\n')
    assert main(["check-config", str(config)]) == 2
    assert "tls_cert and tls_key go together" in capsys.readouterr().err
