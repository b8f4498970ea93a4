"""Cloud-Optimized GeoTIFFs for tests, written with rio-cogeo: scenes in a UTM projection with
internal overviews, a nodata area, and two that overlap (for the mosaic)."""

from __future__ import annotations

import io

import mercantile
import numpy as np

UTM_33N = "EPSG:32633"
SIZE = 1024  # pixels a side
RESOLUTION = 10.0  # metres a pixel: about zoom 14's at this latitude
# Scene A's top-left corner (near Rome); scene B starts 5 km east and 3 km south of it.
A_ORIGIN = (290_000.0, 4_645_000.0)
B_ORIGIN = (295_000.0, 4_642_000.0)


def gradient(size: int = SIZE, offset: int = 0, bands: int = 3) -> np.ndarray:
    """Smooth 8-bit bands (values 20–235): nearest-neighbour reprojections of it agree within a
    level or two wherever a pixel lands."""
    rows, cols = np.mgrid[0:size, 0:size]
    data = [(20 + (rows + cols + 97 * b + offset) * 215 // (2 * size + 300)) % 236
            for b in range(bands)]
    return np.clip(np.stack(data), 20, 235).astype("uint8")


def cog_bytes(data: np.ndarray, origin: tuple[float, float], crs: str = UTM_33N,
              resolution: float = RESOLUTION, nodata: int | None = 0) -> bytes:
    """A COG of ``data`` (bands, rows, cols) whose top-left corner is ``origin`` in ``crs``:
    256-pixel blocks, deflate, internal overviews down to under 256 pixels."""
    from rasterio.io import MemoryFile
    from rasterio.transform import from_origin
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    bands, rows, cols = data.shape
    profile = {"driver": "GTiff", "dtype": str(data.dtype), "count": bands, "height": rows,
               "width": cols, "crs": crs, "nodata": nodata,
               "transform": from_origin(origin[0], origin[1], resolution, resolution)}
    with MemoryFile() as source, MemoryFile() as target:
        with source.open(**profile) as dataset:
            dataset.write(data)
        output = cog_profiles.get("deflate")
        output.update(blockxsize=256, blockysize=256)
        with source.open() as dataset:
            cog_translate(dataset, target.name, output, in_memory=True, quiet=True,
                          overview_level=3)
        return target.read()


def scene_a() -> tuple[np.ndarray, bytes]:
    """A gradient whose south-east quarter is nodata (0)."""
    data = gradient()
    data[:, SIZE // 2:, SIZE // 2:] = 0
    return data, cog_bytes(data, A_ORIGIN)


def scene_b() -> tuple[np.ndarray, bytes]:
    """Another gradient (other values), overlapping A's south-east quarter and beyond."""
    data = gradient(offset=700)
    return data, cog_bytes(data, B_ORIGIN)


def lonlat(origin: tuple[float, float], col: float, row: float) -> tuple[float, float]:
    from rasterio.warp import transform

    xs, ys = transform(UTM_33N, "EPSG:4326", [origin[0] + col * RESOLUTION],
                       [origin[1] - row * RESOLUTION])
    return xs[0], ys[0]


def oracle(data: np.ndarray, origin: tuple[float, float], tile: mercantile.Tile,
           size: int = 256) -> np.ndarray:
    """The scene's pixels reprojected onto the tile's grid (0: no data)."""
    from rasterio.transform import from_bounds, from_origin
    from rasterio.warp import Resampling, reproject

    bounds = mercantile.xy_bounds(tile)
    out = np.zeros((data.shape[0], size, size), dtype="uint8")
    reproject(data, out, src_transform=from_origin(*origin, RESOLUTION, RESOLUTION),
              src_crs=UTM_33N, src_nodata=0, dst_transform=from_bounds(*bounds, size, size),
              dst_crs="EPSG:3857", dst_nodata=0, resampling=Resampling.nearest)
    return out


def decoded(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).transpose(2, 0, 1)
