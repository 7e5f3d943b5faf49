"""The ``tinker-server`` process: health, structured logs, clean shutdown, refusing bad frames."""

import json
import signal
import urllib.request

import aiohttp
import msgspec
import pytest
from conftest import ServerProcess

import tinker
from tinker import wire


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clean_shutdown_with_a_connected_client(tmp_path, sig):
    server = ServerProcess(tmp_path / "data")
    with urllib.request.urlopen(f"{server.base_url}/api/v1/healthz") as r:
        assert json.load(r) == {"status": "ok"}
    service = tinker.ServiceClient(base_url=server.base_url)
    assert service.get_server_capabilities().result(timeout=60).supported_models
    assert server.stop(sig) == 0
    service.close().result(timeout=10)
    lines = [json.loads(line) for line in server.log.read_text().splitlines() if line.startswith("{")]
    messages = [entry["msg"] for entry in lines]
    assert any(m.startswith("serving on") for m in messages)
    assert messages[-1] == "stopped"
    assert all({"ts", "level", "logger", "msg"} <= entry.keys() for entry in lines)


async def test_garbage_frames_get_a_400_and_the_connection_survives(server):
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{server.base_url}/native/v1/ws") as ws:
        await ws.send_bytes(b"\xc1 not msgpack")
        reply = wire.server_frame_decoder.decode((await ws.receive()).data)
        assert isinstance(reply, wire.Failure) and reply.status == 400
        bad_request = wire.encoder.encode(wire.Submit(7, msgspec.Raw(wire.encoder.encode({"type": "Nope"}))))
        await ws.send_bytes(bad_request)
        reply = wire.server_frame_decoder.decode((await ws.receive()).data)
        assert isinstance(reply, wire.Failure) and reply.call_id == 7 and reply.status == 400
        assert "Nope" in reply.message
        ok = wire.encoder.encode(wire.Submit(8, msgspec.Raw(wire.encoder.encode(wire.GetServerCapabilities()))))
        await ws.send_bytes(ok)
        reply = wire.server_frame_decoder.decode((await ws.receive()).data)
        assert isinstance(reply, wire.Result) and reply.call_id == 8


def test_unreachable_server_is_a_connection_error():
    from conftest import free_port

    service = tinker.ServiceClient(base_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(tinker.APIConnectionError, match="cannot connect"):
        service.get_server_capabilities().result(timeout=30)
    service.close().result(timeout=10)
