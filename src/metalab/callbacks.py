"""Lightning callbacks for metalab runs."""

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger


def class_grid(images: torch.Tensor, labels: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """Tile one episode's images [N, C, H, W] into a [C, H', W'] grid, one row per class."""
    order = torch.argsort(labels, stable=True)
    ways = int(labels.max()) + 1
    images = torch.nn.functional.pad(images[order], (pad, pad, pad, pad), value=0.5)
    _, channels, height, width = images.shape
    rows = images.reshape(ways, -1, channels, height, width)  # [ways, per_class, C, H, W]
    return rows.permute(2, 0, 3, 1, 4).reshape(channels, ways * height, -1)


class EpisodeImages(Callback):
    """Show one training episode's support and query images in TensorBoard, a row per class."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or len(pl_module.input_shape) != 3:
            return  # only image episodes have pictures to show
        batch = trainer.datamodule.example_batch("train")
        for name, images, labels in (("support", batch.support_x, batch.support_y), ("query", batch.query_x, batch.query_y)):
            grid = class_grid(images[0].float().cpu(), labels[0].cpu())
            logger.experiment.add_image(f"episode/{name}", grid.clamp(0, 1), global_step=trainer.global_step)
