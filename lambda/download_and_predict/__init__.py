"""The DownloadAndPredict Lambda (see base.py)."""
