"""The predictions a run wrote: the stores they live in (`store`: SQLite or PostgreSQL),
`cnsq download`, the results CSV read (`reader`, and `columns` for many rows at once), and the
formats it becomes (`geojson`, `export`: GeoParquet, `flatgeobuf`, in `tile_order`)."""
