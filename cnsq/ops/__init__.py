"""Operating a deployed stack: `push` tiles, `redrive` the dead letters, `status`, `gpu`
utilisation, `tag_logs`, `verify` the path of one tile, build the `model_image`, and what a run
costs (`pricing` holds the prices and the bill, `estimate` forecasts a run)."""
