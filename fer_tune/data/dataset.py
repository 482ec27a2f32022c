"""A torch Dataset over a cached split: uint8 images in, augmented uint8 CHW tensors out.

Images stay uint8 until they reach the device, where the loop scales them to [0, 1]: a quarter of
the bytes through the DataLoader and the host-to-device copy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class FaceDataset(Dataset):
    def __init__(self, split, augment=None):
        self.images = split.images
        targets = split.targets()
        self.expression = torch.as_tensor(targets["expression"].copy())
        self.valence = torch.as_tensor(targets["valence"].copy())
        self.arousal = torch.as_tensor(targets["arousal"].copy())
        self.augment = augment

    def __len__(self) -> int:
        return len(self.expression)

    def __getitem__(self, i: int):
        image = np.array(self.images[i])  # a writable copy out of the read-only memory map
        if self.augment is not None:
            image = self.augment(image=image)["image"]
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return image, self.expression[i], self.valence[i], self.arousal[i]
