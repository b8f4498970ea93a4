"""``cnsq demo``: the whole pipeline on one machine with imagery whose answer is known.

Synthetic XYZ tiles over a small area: land texture with lakes (ellipses) drawn in, so every
tile's water share is known exactly. The model is a rule written in ONNX (share of blue pixels,
see :func:`cnsq.local.demo_models.water_classifier`), not a trained network. The run goes tiles →
tile server → the Lambda's handler → model server → SQLite → CSV → GeoJSON → PNG preview, and
scores the predicted water tiles against the ground truth.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mercantile
import numpy as np

from cnsq.errors import Interrupted
from cnsq.local import tileserver
from cnsq.local.demo_models import water_classifier
from cnsq.local.pipeline import run
from cnsq.results.geojson import convert_file
from download_and_predict.tiles import Tile, tile_id

TILE = 256
WATER_SHARE = 0.25  # a tile is "water" when at least this share of it is lake


@dataclass
class DemoResult:
    tiles: int
    seconds: float
    predicted: set[str]
    truth: set[str]
    failed: int
    directory: Path

    @property
    def precision(self) -> float:
        return len(self.predicted & self.truth) / len(self.predicted) if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return len(self.predicted & self.truth) / len(self.truth) if self.truth else 0.0

    @property
    def rate(self) -> float:
        return self.tiles / self.seconds if self.seconds else 0.0


def make_imagery(root: Path, origin: mercantile.Tile, columns: int, rows: int,
                 seed: int = 7) -> dict[str, float]:
    """Write ``root/z/x/y.png`` for the grid and return each tile's water share."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = columns * TILE, rows * TILE
    lakes = [(rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height,
              rng.uniform(0.4, 1.6) * TILE, rng.uniform(0.4, 1.2) * TILE, rng.uniform(0, np.pi))
             for _ in range(max(3, columns * rows // 10))]
    shares: dict[str, float] = {}
    ys, xs = np.mgrid[0:TILE, 0:TILE].astype(np.float32)
    for row in range(rows):
        for col in range(columns):
            gx, gy = xs + col * TILE, ys + row * TILE
            water = np.zeros((TILE, TILE), dtype=bool)
            for cx, cy, a, b, angle in lakes:
                dx, dy = gx - cx, gy - cy
                u = dx * np.cos(angle) + dy * np.sin(angle)
                v = -dx * np.sin(angle) + dy * np.cos(angle)
                water |= (u / a) ** 2 + (v / b) ** 2 <= 1.0
            noise = rng.normal(0, 12, (TILE, TILE, 3))
            land = np.array([96, 118, 62]) + rng.normal(0, 10, 3)  # fields and woods
            pixels = np.where(water[:, :, None], np.array([38, 82, 156]), land) + noise
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
            tile = mercantile.Tile(origin.x + col, origin.y + row, origin.z)
            path = root / str(tile.z) / str(tile.x) / f"{tile.y}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            shares[tile_id(tile)] = float(water.mean())
    return shares


def make_overviews(root: Path, zoom: int, levels: int = 3) -> None:
    """Write ``levels`` coarser zooms of ``root/zoom``, each tile the four below it halved, as a
    tile endpoint has them: ``cnsq view`` shows the imagery at the zoom that fits the area."""
    from PIL import Image

    for z in range(zoom - 1, zoom - levels - 1, -1):
        children = sorted((root / str(z + 1)).glob("*/*.png"))
        parents = {(int(p.parent.name) // 2, int(p.stem) // 2) for p in children}
        for x, y in parents:
            tile = Image.new("RGBA", (2 * TILE, 2 * TILE))  # transparent beyond the area
            for dx in (0, 1):
                for dy in (0, 1):
                    child = root / str(z + 1) / str(2 * x + dx) / f"{2 * y + dy}.png"
                    if child.is_file():
                        tile.paste(Image.open(child).convert("RGBA"), (dx * TILE, dy * TILE))
            target = root / str(z) / str(x) / f"{y}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            tile.resize((TILE, TILE), Image.Resampling.BOX).save(target)


def make_cog(root: Path, target: Path, origin: mercantile.Tile, columns: int, rows: int) -> str:
    """The demo's imagery as one Cloud-Optimized GeoTIFF in the UTM zone of its centre, as
    imagery is published: the tiles under ``root`` mosaicked, reprojected from Web Mercator
    (bilinear) at the ground resolution of their zoom, written with GDAL's COG driver
    (256-pixel blocks, deflate, overviews). 0 is nodata (no valid pixel is 0). Returns the CRS.
    """
    import rasterio
    import rasterio.shutil
    from PIL import Image
    from rasterio.io import MemoryFile
    from rasterio.transform import from_bounds
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    mosaic = np.zeros((3, rows * TILE, columns * TILE), dtype=np.uint8)
    for row in range(rows):
        for col in range(columns):
            path = root / str(origin.z) / str(origin.x + col) / f"{origin.y + row}.png"
            pixels = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
            mosaic[:, row * TILE:(row + 1) * TILE, col * TILE:(col + 1) * TILE] = np.maximum(
                pixels, 1)
    west, _, _, north = mercantile.xy_bounds(origin)
    last = mercantile.xy_bounds(mercantile.Tile(origin.x + columns - 1, origin.y + rows - 1,
                                                origin.z))
    east, south = last.right, last.bottom
    source = from_bounds(west, south, east, north, columns * TILE, rows * TILE)
    centre = mercantile.lnglat((west + east) / 2, (south + north) / 2)
    crs = f"EPSG:{32600 + int((centre.lng + 180) // 6) + 1 + (0 if centre.lat >= 0 else 100)}"
    transform, width, height = calculate_default_transform(
        "EPSG:3857", crs, columns * TILE, rows * TILE, west, south, east, north)
    data = np.zeros((3, height, width), dtype=np.uint8)
    reproject(mosaic, data, src_transform=source, src_crs="EPSG:3857", src_nodata=0,
              dst_transform=transform, dst_crs=crs, dst_nodata=0, resampling=Resampling.bilinear)
    profile = {"driver": "GTiff", "dtype": "uint8", "count": 3, "height": height,
               "width": width, "crs": crs, "transform": transform, "nodata": 0}
    with MemoryFile() as memory:
        with memory.open(**profile) as dataset:
            dataset.write(data)
        with memory.open() as dataset:
            rasterio.shutil.copy(dataset, target, driver="COG", BLOCKSIZE=256,
                                 COMPRESS="DEFLATE", OVERVIEWS="AUTO")
    return crs


def preview(root: Path, origin: mercantile.Tile, columns: int, rows: int, predicted: set[str],
            target: Path, scale: int = 128) -> None:
    """A mosaic of the tiles with the predicted water tiles outlined."""
    from PIL import Image, ImageDraw

    mosaic = Image.new("RGB", (columns * scale, rows * scale))
    draw = ImageDraw.Draw(mosaic)
    for row in range(rows):
        for col in range(columns):
            tile = mercantile.Tile(origin.x + col, origin.y + row, origin.z)
            path = root / str(tile.z) / str(tile.x) / f"{tile.y}.png"
            mosaic.paste(Image.open(path).resize((scale, scale)), (col * scale, row * scale))
    for row in range(rows):
        for col in range(columns):
            if tile_id(Tile(origin.x + col, origin.y + row, origin.z)) in predicted:
                box = (col * scale + 2, row * scale + 2, (col + 1) * scale - 3, (row + 1) * scale - 3)
                draw.rectangle(box, outline=(255, 40, 40), width=3)
    mosaic.save(target)


def run_demo(directory: Path, columns: int = 10, rows: int = 8, lon: float = -3.70,
             lat: float = 40.42, zoom: int = 15, concurrency: int = 8,
             imagery: str = "xyz") -> DemoResult:
    """``imagery``: ``xyz`` (tiles served by ``cnsq tileserver``) or ``cog`` (the same picture
    as one UTM COG, served with range requests, read by the worker itself)."""
    directory.mkdir(parents=True, exist_ok=True)
    origin = mercantile.tile(lon, lat, zoom)
    shares = make_imagery(directory / "tiles", origin, columns, rows)
    make_overviews(directory / "tiles", zoom)
    truth = {tile for tile, share in shares.items() if share >= WATER_SHARE}
    (directory / "tiles.txt").write_text("".join(f"{t}\n" for t in shares))
    model = water_classifier(directory / "water.onnx", water_share=WATER_SHARE)
    database = directory / "results.db"
    database.unlink(missing_ok=True)  # each demo starts from an empty results table
    source = None
    if imagery == "cog":
        from download_and_predict.cog import Imagery

        make_cog(directory / "tiles", directory / "imagery.tif", origin, columns, rows)
        server = tileserver.serve_file(directory / "imagery.tif")
        source = Imagery((f"{server.url}/imagery.tif",)).to_json()
    else:
        server = tileserver.start(directory / "tiles", port=0)
    try:
        report = run(directory / "tiles.txt", server.template, model, directory / "results.csv",
                     f"sqlite:///{database}", concurrency=concurrency, imagery=source)
    finally:
        server.close()
    if report.interrupted:
        raise Interrupted(f"Interrupted after {report.tiles:,} tiles: their results are in "
                          f"{directory / 'results.csv'}; run the demo again to do them all")
    convert_file(directory / "results.csv", str(directory / "water.geojson"), stdout=None,
                 thresh_ind=1, thresh=0.5)
    features = json.loads((directory / "water.geojson").read_text())["features"]
    predicted = {feature["properties"]["tile"] for feature in features}
    preview(directory / "tiles", origin, columns, rows, predicted, directory / "preview.png")
    return DemoResult(report.tiles, report.seconds, predicted, truth, len(report.failed), directory)
