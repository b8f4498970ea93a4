"""A result wrapper: store the class scores with the winning label's name.

    handler: download_and_predict.labelled_results.handler
    envs: { CLASS_NAMES: "background,building" }
"""

from __future__ import annotations

import os
from typing import Any

from download_and_predict.base import DownloadAndPredict, Tile
from download_and_predict.handler import make_handler


class LabelledResults(DownloadAndPredict):
    def result_output(self, tile: Tile, prediction: Any) -> Any:
        names = os.environ.get("CLASS_NAMES", "").split(",")
        best = max(range(len(prediction)), key=prediction.__getitem__)
        label = names[best] if best < len(names) and names[best] else str(best)
        return {"scores": prediction, "label": label}


handler = make_handler(LabelledResults)
