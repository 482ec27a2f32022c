"""A class-balanced sampler that also shards across DDP ranks.

Weighted draws with replacement make every expression class present in the training split
equally likely in each epoch (the report's "balance the classes" fix, as an alternative or
complement to class-weighted cross-entropy). Under DDP every rank makes the same draws (one
generator seeded by seed + epoch, like DistributedSampler's shuffle) and takes every world-th
one, so the ranks together see one balanced epoch without overlap.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


def class_balanced_weights(labels) -> torch.Tensor:
    """Per-row draw probabilities: equal mass per present class; unlabelled rows keep their share.

    Rows without an expression label (-1: valence/arousal only) are drawn as often as in the
    data, so balancing the classes does not starve the regression tasks.
    """
    labels = torch.as_tensor(labels).long()
    labelled = labels >= 0
    weights = torch.zeros(len(labels), dtype=torch.float64)
    if not len(labels):
        return weights
    unlabelled_share = (~labelled).double().mean()
    if labelled.any():
        counts = torch.bincount(labels[labelled]).double()
        present = (counts > 0).sum()
        weights[labelled] = (1 - unlabelled_share) / (present * counts[labels[labelled]])
    weights[~labelled] = 1.0 / len(labels)
    return weights


class ClassBalancedSampler(Sampler[int]):
    """`len(labels)` weighted draws per epoch (rounded up to a multiple of the ranks), this rank's share."""

    def __init__(self, labels, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.weights = class_balanced_weights(labels)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(len(self.weights) / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True,
                                  generator=generator)
        return iter(draws[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
