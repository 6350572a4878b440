"""The only thing ``fedadapt serve`` exposes to the network: a TLS gateway that passes the Fleet API alone.

Flower 1.41 serves its Fleet, Control and Runtime APIs on one HTTP port (``flower-superlink --host
--port``; the ``--control-api-address``/``--fleet-api-address`` options are deprecated and ignored),
and open-source Flower's Control API lets any caller ``register-node`` or ``start-run``. So the
SuperLink listens on loopback only, and this gateway, on the address devices dial, forwards the
twelve Fleet paths a SuperNode calls (``flwr.supernode.fleet_http_client``) and answers every other
path and method with 403. TLS terminates here with the SuperLink certificate that devices check
against ``ca.crt``; the hop to the SuperLink is TLS too (loopback, the same certificate).

It also attaches the server's FAB signature to the ``get-fab`` reply of the FAB it signed: open-source
Flower stores no signature for a FAB submitted with ``flwr run`` (only Flower Hub apps carry one), while
``flower-supernode --trusted-entities`` refuses a FAB without a valid one. The signature is made by
``fedadapt serve`` with the server's identity key; this process never holds the key.

Built on Starlette, httpx and uvicorn: the libraries Flower's own HTTP transport runs on.
Run as ``python -m deploy.gateway --listen HOST:PORT --upstream https://127.0.0.1:PORT ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fedadapt import jsonsafe

logger = logging.getLogger("fedadapt.gateway")

# Every path flwr 1.41's FleetHttpClient calls (supernode/fleet_http_client.py), all POST.
FLEET_PATHS = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
GET_FAB = "/v1/fleet/get-fab"
REFUSAL = "fedadapt gateway: only the Fleet API is served on this address\n"
# Hop-by-hop headers (RFC 9110 7.6.1) and those httpx/uvicorn set themselves.
_DROP_HEADERS = frozenset(
    {"host", "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
_UPSTREAM_TIMEOUT = httpx.Timeout(120.0, connect=10.0)
_MAX_FAB_REPLY = 64 * 1024 * 1024  # Flower caps a FAB at 10 MB; its reply is read whole to attach the signature
_MAX_VERIFICATIONS_BYTES = 16 * 1024 * 1024  # a few hundred bytes per FAB the server signed


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens, where the SuperLink is, and how both hops are secured."""

    host: str
    port: int
    upstream: str  # the SuperLink's loopback URL, e.g. https://127.0.0.1:40123
    certfile: Path | None = None  # the SuperLink certificate (None: plain HTTP, --insecure demos)
    keyfile: Path | None = None
    ca_certfile: Path | None = None  # checks the SuperLink's certificate on the loopback hop
    fab_verifications: Path | None = None  # JSON {sha256 of a FAB: {key id: signature record}}

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port!r}")
        if not self.upstream.startswith(("http://", "https://")):
            raise ValueError(f"upstream must be an http(s):// URL, got {self.upstream!r}")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        if self.upstream.startswith("https://") and self.ca_certfile is None:
            raise ValueError("an https upstream needs ca_certfile to check its certificate")


def create_app(config: GatewayConfig) -> Starlette:
    """The gateway's ASGI app: Fleet paths forwarded, everything else refused."""
    verify: ssl.SSLContext | bool = False
    if config.ca_certfile is not None:
        verify = ssl.create_default_context(cafile=str(config.ca_certfile))
    client = httpx.AsyncClient(base_url=config.upstream, verify=verify, timeout=_UPSTREAM_TIMEOUT)
    verifications = load_verifications(config.fab_verifications)

    async def handle(request: Request) -> Response:
        if request.method != "POST" or request.url.path not in FLEET_PATHS:
            peer = request.client.host if request.client else "?"
            logger.warning("refused %s %s from %s", request.method, request.url.path, peer)
            return PlainTextResponse(REFUSAL, status_code=403)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _DROP_HEADERS]
        upstream = client.build_request("POST", request.url.path, headers=headers, content=request.stream())
        try:
            reply = await client.send(upstream, stream=True)
        except httpx.HTTPError as err:
            logger.warning("the SuperLink did not answer %s: %s", request.url.path, type(err).__name__)
            return PlainTextResponse("fedadapt gateway: the SuperLink is unavailable\n", status_code=502)
        out_headers = {k: v for k, v in reply.headers.items() if k.lower() not in _DROP_HEADERS}
        if request.url.path == GET_FAB and reply.status_code == 200:
            body = await _read_capped(reply)
            out_headers.pop("content-length", None)
            return Response(with_signature(body, verifications), reply.status_code, out_headers)
        return StreamingResponse(
            reply.aiter_raw(), reply.status_code, out_headers, background=BackgroundTask(reply.aclose)
        )

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with client:
            yield

    return Starlette(routes=[Route("/{path:path}", handle, methods=methods)], lifespan=lifespan)


async def _read_capped(reply: httpx.Response) -> bytes:
    chunks, size = [], 0
    try:
        async for chunk in reply.aiter_raw():
            size += len(chunk)
            if size > _MAX_FAB_REPLY:
                raise ValueError(f"get-fab reply over {_MAX_FAB_REPLY} bytes")
            chunks.append(chunk)
    finally:
        await reply.aclose()
    return b"".join(chunks)


def load_verifications(path: Path | None) -> dict[str, dict[str, str]]:
    """The FAB signatures ``fedadapt serve`` wrote: {FAB sha256: {key id: signature record}}."""
    if path is None:
        return {}
    # {FAB hash: {key id: record}} is 2 levels deep: deeper or larger is not a file `fedadapt serve` wrote.
    data = jsonsafe.load_file(path, max_bytes=_MAX_VERIFICATIONS_BYTES, max_depth=4)  # JsonInputError: a ValueError
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path} must map FAB hashes to verification records")
    return {str(k): {str(i): str(r) for i, r in v.items()} for k, v in data.items()}


def with_signature(get_fab_reply: bytes, verifications: Mapping[str, Mapping[str, str]]) -> bytes:
    """A ``GetFabResponse`` with the server's signature of its FAB attached (by the FAB's own hash).

    ``valid_license`` says "this SuperLink supports verification": without it a SuperNode with
    trusted entities refuses every FAB as "not supported"; with it, a FAB the server did not
    sign is refused as "could not verify". Records the SuperLink itself sent are dropped: only
    the server's signatures travel.
    """
    # Flower's generated protobuf is the Fleet API's wire format, which the gateway must speak; its field
    # numbers are what Flower keeps stable between SuperNode and SuperLink releases. The import contracts
    # in pyproject.toml allow this one module of flwr.proto.
    from flwr.proto.fab_pb2 import GetFabResponse  # noqa: PLC0415  (protobuf only where a FAB passes)

    reply = GetFabResponse()
    reply.ParseFromString(get_fab_reply)
    digest = hashlib.sha256(reply.fab.content).hexdigest()
    reply.fab.verifications.clear()
    reply.fab.verifications.update({"valid_license": "Valid", **verifications.get(digest, {})})
    return reply.SerializeToString()


def _parse_args() -> GatewayConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT devices dial")
    parser.add_argument("--upstream", required=True, help="the SuperLink's loopback URL")
    parser.add_argument("--certfile", type=Path)
    parser.add_argument("--keyfile", type=Path)
    parser.add_argument("--ca-certfile", type=Path)
    parser.add_argument("--fab-verifications", type=Path)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    return GatewayConfig(
        host=host.strip("[]"),
        port=int(port),
        upstream=args.upstream,
        certfile=args.certfile,
        keyfile=args.keyfile,
        ca_certfile=args.ca_certfile,
        fab_verifications=args.fab_verifications,
    )


def main() -> None:
    """Serve until SIGTERM."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded poll would drown the refusals
    config = _parse_args()
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        ssl_certfile=None if config.certfile is None else str(config.certfile),
        ssl_keyfile=None if config.keyfile is None else str(config.keyfile),
        access_log=False,  # refusals are logged above; per-poll lines would drown them
        log_level="info",
    )


if __name__ == "__main__":
    main()
