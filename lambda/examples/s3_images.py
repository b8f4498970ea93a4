"""An imagery source: tiles stored in S3 as s3://BUCKET/PREFIX/{z}/{x}/{y}.jpg.

    handler: download_and_predict.s3_images.handler
    envs: { TILE_ENDPOINT: "s3://my-imagery/tiles/{z}/{x}/{y}.jpg" }

The Lambda role also needs s3:GetObject on that bucket.
"""

from __future__ import annotations

import boto3

from download_and_predict.base import DownloadAndPredict, StepFailed, Tile
from download_and_predict.handler import make_handler


class S3Images(DownloadAndPredict):
    _s3 = None

    def get_image(self, tile: Tile) -> bytes | None:
        if self._s3 is None:
            self._s3 = boto3.client("s3")
        bucket, _, key = self.url_for(tile).removeprefix("s3://").partition("/")
        try:
            return self._s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self._s3.exceptions.NoSuchKey:
            return None  # no imagery for this tile: skipped or failed per MISSING_TILES
        except Exception as exc:  # noqa: BLE001 - this tile's record fails and is retried
            raise StepFailed("tile_s3", f"s3://{bucket}/{key}: {exc}") from None


handler = make_handler(S3Images)
