"""The predictions a run wrote: the stores they live in (`store`: SQLite or PostgreSQL),
`cnsq download`, the results CSV read row by row (`geojson`) or by columns (`export`), and the
formats they become (GeoJSON, GeoParquet, `flatgeobuf`, in `tile_order`)."""
