"""Linear probe: logistic regression (L-BFGS) on standardised frozen features."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MIN_PER_CLASS_FOR_SELECTION = 5  # a stratified 20 % hold-out then keeps every class on both sides


class ProbeDataError(ValueError):
    """The training labels cannot support a linear probe."""


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _check_labels(y: np.ndarray, min_per_class: int) -> None:
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ProbeDataError(f"linear probe needs at least 2 classes in the training labels, got {len(classes)}")
    few = {int(c): int(n) for c, n in zip(classes, counts) if n < min_per_class}
    if few:
        raise ProbeDataError(f"linear probe needs >= {min_per_class} training samples per class; too few: {few}")


def _fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int):
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter)).fit(x, y)


def select_C(x: np.ndarray, y: np.ndarray, max_iter: int = 1000) -> float:
    """The C of ``C_GRID`` with the best accuracy on a stratified 20 % hold-out of (x, y) (first one on ties)."""
    x_fit, x_val, y_fit, y_val = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    scores = [_fit(x_fit, y_fit, C, max_iter).score(x_val, y_val) for C in C_GRID]
    return C_GRID[int(np.argmax(scores))]


def linear_probe(train_x, train_y, test_x, test_y, C: float | None = None, max_iter: int = 1000) -> float:
    """Test accuracy of a logistic regression on standardised features; C chosen by ``select_C`` when None."""
    train_x, train_y, test_x, test_y = map(_numpy, (train_x, train_y, test_x, test_y))
    _check_labels(train_y, MIN_PER_CLASS_FOR_SELECTION if C is None else 1)
    if len(test_y) == 0:
        raise ProbeDataError("linear probe needs at least one test sample")
    if C is None:
        C = select_C(train_x, train_y, max_iter)
    return float(_fit(train_x, train_y, C, max_iter).score(test_x, test_y))
