"""Data layer: site folders on disk, patient splits, shared preprocessing, datasets, simulator."""
