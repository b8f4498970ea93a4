"""The DownloadAndPredict Lambda: download tiles, predict, upsert results (see base.py)."""
