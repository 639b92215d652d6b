"""Data in: scanning folders and TFDS, decoding images, splits, dataset checks, augmentation."""
