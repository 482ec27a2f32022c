"""Datasets: sources (adapters to on-disk formats), synthetic faces, splits, image cache, augmentation."""
