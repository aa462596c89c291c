"""A call's files in object storage (moto's S3 server in its own process, over HTTP), read
through the bridge as from its disk: whole, by ``Range``, or by ``HEAD``."""

from __future__ import annotations

import pytest

from .conftest import api_client
from .replicas import BUCKET, S3_ENV, ObjectStore


@pytest.fixture
async def s3(tmp_path, monkeypatch):
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    store = ObjectStore(tmp_path)
    await store.start()
    yield store
    store.stop()


async def test_a_recording_in_object_storage_is_served_whole_by_range_and_by_head(start_bridge, s3):
    bridge = await start_bridge(files_url=f"s3://{BUCKET}/calls", s3_endpoint_url=s3.url)
    result = await bridge.call()
    assert not bridge.calls.recording_path(result.call_id).exists()  # only in the bucket now
    path = f"/v2/recordings/{result.call_id}.wav"
    async with api_client(bridge.base_url) as http:
        whole = await http.get(path)
        assert whole.status_code == 200 and whole.content[:4] == b"RIFF" and whole.headers["accept-ranges"] == "bytes"
        size = len(whole.content)
        part = await http.get(path, headers={"Range": "bytes=4-11"})
        assert part.status_code == 206 and part.content == whole.content[4:12], (part.status_code, part.headers)
        assert part.headers["content-range"] == f"bytes 4-11/{size}" and part.headers["content-length"] == "8"
        head = await http.head(path)
        assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(size)
        beyond = await http.get(path, headers={"Range": f"bytes={size + 10}-"})
        assert beyond.status_code == 416, beyond.text
        log = await http.head(f"/v2/public-logs/{result.call_id}.jsonl")
        assert log.status_code == 200 and int(log.headers["content-length"]) > 0
        missing = await http.head("/v2/recordings/nosuchcall.wav")
        assert missing.status_code == 404


async def test_a_recording_on_this_disk_answers_range_and_head(bridge):
    result = await bridge.call()
    path = f"/v2/recordings/{result.call_id}.wav"
    async with api_client(bridge.base_url) as http:
        whole = await http.get(path)
        part = await http.get(path, headers={"Range": "bytes=0-3"})
        head = await http.head(path)
    assert whole.status_code == 200 and part.status_code == 206 and part.content == b"RIFF"
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(whole.content))
