"""TensorBoard output of a run (``train.report_to=tensorboard``, an optional dependency): every scalar of the log rows
(``train/<key>``: losses, stats, lr, throughput, grad norm), the validation loss at each checkpoint (``val/loss``),
the final evaluation's metrics (``eval/<key>``) and its retrieval-examples picture, in ``RUN/tensorboard/``.
``log.jsonl`` stays the record; this is a view of it for people who watch runs in TensorBoard."""
from __future__ import annotations

import math
from pathlib import Path

from polyalign.config import TrainConfig
from polyalign.config.checks import TENSORBOARD_MISSING
from polyalign.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"


class Reporter:
    """Where a run's numbers go besides ``log.jsonl``; this one (``train.report_to=none``, and ranks > 0) drops them."""

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        pass

    def image(self, tag: str, png: Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(Reporter):
    """Writes to an event file in ``log_dir``; a resumed run hides the events a killed attempt wrote after ``start``."""

    def __init__(self, log_dir: Path, start: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the config check catches this earlier; a saved config may come from another machine
            raise ConfigError(TENSORBOARD_MISSING) from None
        # purge_step: events at steps >= start + 1 (those log.jsonl's truncation drops too) are hidden on resume
        self.writer = SummaryWriter(str(log_dir), purge_step=start + 1 if start else None)

    def scalars(self, step: int, values: dict, prefix: str = "") -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(prefix + key, value, step)
        self.writer.flush()

    def image(self, tag: str, png: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(png) as im:
            pixels = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_reporter(cfg: TrainConfig, run_dir: Path, start: int, main: bool) -> Reporter:
    """The run's reporter: TensorBoard on rank 0 when ``train.report_to=tensorboard``, else one that drops all."""
    if main and cfg.report_to == "tensorboard":
        return TensorBoard(Path(run_dir) / TENSORBOARD_DIR, start)
    return Reporter()
