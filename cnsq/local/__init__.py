"""The one-machine stack: model server, tile server, queue worker, pipeline and demo."""
