"""TF Serving's request batching as the stack runs it: one home for the model task (the template
writes this file in the container), the image `cnsq model` builds, and the simulation
(``gpu_max_batch``)."""

from __future__ import annotations

BATCHING = {"max_batch_size": 64, "batch_timeout_micros": 5000, "max_enqueued_batches": 1000,
            "num_batch_threads": 4}


def batching_parameters(settings: dict[str, int] = BATCHING) -> str:
    """TF Serving's ``--batching_parameters_file`` text for ``settings``."""
    return "".join(f"{key} {{ value: {value} }}\n" for key, value in settings.items())
