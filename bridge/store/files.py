"""``CallFiles``: where a call's recording and public log live, readable through every replica.

While a call is live its relay writes both files on the local disk of its replica
(``files_dir``, by default ``data_dir``). That is all on one machine, and all that a shared
volume mounted as ``files_dir`` on every replica needs. With object storage
(``files_url = "s3://BUCKET/PREFIX"``: AWS S3, MinIO, Cloudflare R2, GCS interoperability, any
S3-compatible store), the relay uploads both files when the call ends, before its record says it
ended, and drops the local copies: any replica then serves them from the bucket. An upload that
fails (the store is down) leaves the local files; they are uploaded again every
``files_retry_s`` by the replica that has them, and a restarted replica uploads what it left.

The client is aiobotocore (botocore's own signing, retries and credentials chain:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a web identity on Kubernetes...), optional:
``pip install 'twilio-audio-bridge[s3]'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

#: kind -> (folder, suffix, media type)
KINDS = {
    "recording": ("recordings", ".wav", "audio/wav"),
    "log": ("logs", ".jsonl", "application/x-ndjson"),
}
#: How long a call's ending waits for its files to be uploaded; a longer upload goes on meanwhile
UPLOAD_TIMEOUT_S = 5.0
CHUNK = 64 * 1024
#: Files over this go up in parts of this size (S3's parts are 5 MiB at least, but the last): an
#: upload holds one part in memory, whatever the call's length (an hour at 24 kHz is 345 MB)
PART_BYTES = 8 * 1024 * 1024


class FilesError(ValueError):
    """Invalid object storage settings (the message names the setting)."""


@dataclass
class StoredFile:
    """A call's file as the bucket serves it: the body's chunks and the response's headers."""

    status: int  # 200, or 206 for a range
    headers: dict[str, str]
    chunks: AsyncIterator[bytes]


def parse_files_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at its ends)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise FilesError(f"files_url: {url!r} is not s3://BUCKET/PREFIX")
    return parts.netloc, parts.path.strip("/")


class CallFiles:
    def __init__(self, folder: Path, files_url: str | None = None, endpoint_url: str | None = None, region: str | None = None):
        self.folder = Path(folder)
        self.bucket, self.prefix = parse_files_url(files_url) if files_url else (None, "")
        self.endpoint_url = endpoint_url
        self.region = region
        self._client = None
        self._exit: contextlib.AsyncExitStack | None = None

    @property
    def remote(self) -> bool:
        """Files go to object storage (else they stay on this disk, or a shared volume)."""
        return self.bucket is not None

    def path(self, kind: str, call_id: str) -> Path:
        folder, suffix, _ = KINDS[kind]
        return self.folder / folder / f"{call_id}{suffix}"

    @staticmethod
    def media_type(kind: str) -> str:
        return KINDS[kind][2]

    def key(self, kind: str, call_id: str) -> str:
        folder, suffix, _ = KINDS[kind]
        return "/".join(p for p in (self.prefix, folder, f"{call_id}{suffix}") if p)

    async def open(self) -> None:
        """Make the client (nothing to do for local files). Raises FilesError if the extra is
        missing; the bucket itself is checked lazily (a store down at start-up is retried)."""
        if not self.remote:
            return
        try:
            from aiobotocore.session import get_session
        except ImportError:
            raise FilesError("files_url is s3://...: install the s3 extra (pip install 'twilio-audio-bridge[s3]')") from None
        from botocore.config import Config

        self._exit = contextlib.AsyncExitStack()
        config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
        self._client = await self._exit.enter_async_context(
            get_session().create_client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)
        )

    async def close(self) -> None:
        if self._exit is not None:
            await self._exit.aclose()
            self._exit = self._client = None

    # --- after a call -------------------------------------------------------------------------

    async def publish(self, call_id: str) -> str | None:
        """Upload the call's local files and drop them; returns what went wrong (they are then
        kept for a retry), or None."""
        if not self.remote:
            return None
        for kind, (_, _, media_type) in KINDS.items():
            path = self.path(kind, call_id)
            if not path.exists():
                continue
            try:
                await self._upload(path, self.key(kind, call_id), media_type)
            except Exception as e:  # the store is down, refuses the credentials...: retried later
                return f"its {kind} could not be uploaded to s3://{self.bucket}: {type(e).__name__}: {e}"
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return None

    async def _upload(self, path: Path, key: str, media_type: str) -> None:
        """One file: in one request, or over PART_BYTES in parts (a multipart upload, aborted if
        it fails or is cancelled: the store keeps no parts)."""
        client, bucket = self._client, self.bucket
        with open(path, "rb") as file:  # (opening is instant; the reads go to a thread)
            first = await asyncio.to_thread(file.read, PART_BYTES + 1)
            if len(first) <= PART_BYTES:
                await client.put_object(Bucket=bucket, Key=key, Body=first, ContentType=media_type)
                return
            upload = (await client.create_multipart_upload(Bucket=bucket, Key=key, ContentType=media_type))["UploadId"]
            try:
                parts, part, carry = [], first[:PART_BYTES], first[PART_BYTES:]
                while part:
                    number = len(parts) + 1
                    answer = await client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=part)
                    parts.append({"ETag": answer["ETag"], "PartNumber": number})
                    part = carry + await asyncio.to_thread(file.read, PART_BYTES - len(carry))
                    carry = b""
                await client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})
            except BaseException:
                with contextlib.suppress(Exception):
                    await client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
                raise

    def local_call_ids(self) -> set[str]:
        """Calls with files on this disk (uploads left over, or live calls)."""
        ids = set()
        for folder, suffix, _ in KINDS.values():
            ids.update(p.name[: -len(suffix)] for p in (self.folder / folder).glob(f"*{suffix}"))
        return ids

    # --- reading ------------------------------------------------------------------------------

    async def fetch(self, kind: str, call_id: str, range_header: str | None = None, head: bool = False) -> StoredFile | None:
        """The call's file from the bucket (None: not there), with ``Range`` passed on; with
        ``head``, its headers only (a HEAD request: no body is read)."""
        if not self.remote:
            return None
        options = {"Range": range_header} if range_header and range_header.startswith("bytes=") else {}
        request = self._client.head_object if head else self._client.get_object
        try:
            answer = await request(Bucket=self.bucket, Key=self.key(kind, call_id), **options)
        except self._client.exceptions.NoSuchKey:
            return None
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            if code in ("InvalidRange", "416"):
                raise ValueError("the range is not within the file") from None
            raise
        headers = {"content-type": KINDS[kind][2], "content-length": str(answer["ContentLength"]), "accept-ranges": "bytes"}
        if answer.get("ContentRange"):
            headers["content-range"] = answer["ContentRange"]
        if answer.get("ETag"):
            headers["etag"] = answer["ETag"]
        body = answer.get("Body")

        async def chunks() -> AsyncIterator[bytes]:
            if body is None:
                return
            try:
                while chunk := await body.read(CHUNK):
                    yield chunk
            finally:
                body.close()

        partial = answer.get("ContentRange") or answer.get("ResponseMetadata", {}).get("HTTPStatusCode") == 206
        return StoredFile(206 if partial else 200, headers, chunks())

    # --- deleting -----------------------------------------------------------------------------

    async def delete(self, call_id: str) -> None:
        """Delete the call's files, here and in the bucket."""
        for kind in KINDS:
            with contextlib.suppress(FileNotFoundError):
                self.path(kind, call_id).unlink()
            if self.remote:
                await self._client.delete_object(Bucket=self.bucket, Key=self.key(kind, call_id))

    async def delete_older_than(self, cutoff: float) -> int:
        """Retention: delete the files last written before ``cutoff`` (Unix time), here and in
        the bucket (one replica's pass covers the bucket for all). Returns how many."""
        deleted = 0
        for kind, (folder, suffix, _) in KINDS.items():
            for path in (self.folder / folder).glob(f"*{suffix}"):
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        deleted += 1
            if not self.remote:
                continue
            prefix = self.key(kind, "")[: -len(suffix)]
            paginator = self._client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    if item["LastModified"].timestamp() < cutoff:  # (one by one: GCS has no DeleteObjects)
                        await self._client.delete_object(Bucket=self.bucket, Key=item["Key"])
                        deleted += 1
        return deleted

