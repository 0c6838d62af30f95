"""A digit classifier trained on scikit-learn's digits, used to check that samples show the class asked for.

It reads generated 16x16 images by pooling them back to the dataset's 8x8, 0..16 features, so it judges
the digit, not our upsampling. Its penultimate layer doubles as the feature space for a Fréchet distance.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from pipelines import digits


@lru_cache(maxsize=1)
def digit_classifier():
    """An MLP fitted on all 1797 digits (seeded, so every process gets the same classifier)."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    data = load_digits()
    clf = MLPClassifier(hidden_layer_sizes=(128,), max_iter=600, random_state=0)
    clf.fit(data.data, data.target)
    return clf


def images_to_features(images) -> np.ndarray:
    """uint8 (N, H, W, 1) or float (N, 1, H, W) in [-1, 1] -> (N, 64) digit features."""
    x = np.asarray(images)
    if x.dtype == np.uint8:
        x = x.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    return digits.to_digit_features(x)


def predict_digits(images) -> np.ndarray:
    return digit_classifier().predict(images_to_features(images))


def accuracy(images, labels) -> float:
    return float(np.mean(predict_digits(images) == np.asarray(labels)))


def embed(images) -> np.ndarray:
    """Hidden-layer activations of the classifier (ReLU of the first layer): the Fréchet feature space."""
    clf = digit_classifier()
    h = images_to_features(images) @ clf.coefs_[0] + clf.intercepts_[0]
    return np.maximum(h, 0.0)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets."""
    from scipy import linalg

    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))
