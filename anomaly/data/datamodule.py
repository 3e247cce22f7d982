"""The Lightning data module shared by every data source: transforms, splits and loaders.

A source (MVTec AD, the user's folder, generated data) only says which files are train and
test samples. Everything else — aligned image/mask transforms, a normal-only validation split
carved from train, batching — is here, once.
"""

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from anomaly.allocator import release_freed_memory
from anomaly.data.preprocessing import Preprocessing
from anomaly.data.samples import Sample, read_image, read_mask


class SampleDataset(Dataset):
    """Reads samples into ``{"image": [3,H,W] float, "mask": [1,H,W] uint8, "label", "path"}``."""

    def __init__(self, samples: list[Sample], transform: v2.Compose) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        image = tv_tensors.Image(read_image(sample.image_path))
        height, width = image.shape[-2:]
        if sample.mask_path is None:
            mask = torch.zeros(1, height, width, dtype=torch.uint8)
        else:
            mask = read_mask(sample.mask_path, sample.image_path, (width, height))
        image, mask = self.transform(image, tv_tensors.Mask(mask))
        return {
            "image": image.as_subclass(Tensor),
            "mask": mask.as_subclass(Tensor),
            "label": sample.label,
            "path": str(sample.image_path),
        }


class TrimmedForkDataLoader(DataLoader):
    """A DataLoader that returns the heap's free pages to the OS before it forks its workers.

    Workers forked on top of freed-but-kept memory (see anomaly/allocator.py) would share it
    copy-on-write, and the main process would copy each page it reuses while they run.
    """

    def __iter__(self):
        if self.num_workers > 0:
            release_freed_memory()
        return super().__iter__()


class AnomalyDataModule(pl.LightningDataModule):
    """Base data module; subclasses implement :meth:`load_samples`.

    ``val_fraction`` moves that share of the (normal) training images into a validation split used
    for calibration only; the test set is never used to fit anything.
    """

    def __init__(
        self,
        image_size: int | list[int] = 256,
        crop_size: int | None = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        val_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.preprocessing = Preprocessing(image_size, crop_size)
        self.transform = self.preprocessing.transform()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []

    @property
    def name(self) -> str:
        """A short name for logs and result tables (e.g. the category)."""
        raise NotImplementedError

    def load_samples(self) -> tuple[list[Sample], list[Sample]]:
        """Returns (train samples, all normal; test samples)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_samples:
            return
        train, self.test_samples = self.load_samples()
        self.train_samples, self.val_samples = split_validation(train, self.val_fraction, self.seed)

    def has_pixel_ground_truth(self) -> bool:
        """Pixel metrics need a mask for every defective test image."""
        defective = [s for s in self.test_samples if s.label == 1]
        return bool(defective) and all(s.mask_path is not None for s in defective)

    def _loader(self, samples: list[Sample], shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return TrimmedForkDataLoader(
            SampleDataset(samples, self.transform),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_samples, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_samples, shuffle=False)


def split_validation(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split of normal training samples into (train, validation)."""
    count = round(len(samples) * fraction)
    if count == 0:
        return samples, []
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    val_ids = set(order[:count])
    return (
        [s for i, s in enumerate(samples) if i not in val_ids],
        [s for i, s in enumerate(samples) if i in val_ids],
    )
