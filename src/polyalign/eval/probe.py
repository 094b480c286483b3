"""Linear probe: logistic regression (L-BFGS) on standardised frozen features."""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
MIN_PER_CLASS_FOR_SELECTION = 5  # classes this frequent lend 20 % to the hold-out; rarer ones are only fitted


class ProbeDataError(ValueError):
    """The training labels cannot support a linear probe."""


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _check_labels(y: np.ndarray) -> None:
    if len(np.unique(y)) < 2:
        raise ProbeDataError(f"linear probe needs at least 2 classes in the training labels, got {len(np.unique(y))}")


def _fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int):
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter)).fit(x, y)


def _path(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, max_iter: int):
    """Fit every C of the grid from the strongest regularisation up, each fit warm-started from the previous one
    (the same optima; 2-3x fewer L-BFGS iterations on wide features); returns {C: val accuracy} and the model."""
    model = LogisticRegression(max_iter=max_iter, warm_start=True)
    scores, weights = {}, {}
    for C in sorted(C_GRID):
        scores[C] = model.set_params(C=C).fit(x, y).score(x_val, y_val)
        weights[C] = (model.coef_.copy(), model.intercept_.copy())
    return scores, (model, weights)


def select_C(x: np.ndarray, y: np.ndarray, max_iter: int = 1000, return_model: bool = False):
    """The C of ``C_GRID`` with the best accuracy on a stratified 20 % hold-out (ties: the C closest to 1), on
    features as given (``linear_probe`` standardises them first).

    Only classes with at least ``MIN_PER_CLASS_FOR_SELECTION`` samples give hold-out samples; rarer classes
    (common in long-tailed real data) stay entirely in the fitting part. With < 2 such classes: C = 1.
    ``return_model``: also the model fitted at the chosen C (a warm start for the final fit), or None.
    """
    classes, counts = np.unique(y, return_counts=True)
    frequent = np.isin(y, classes[counts >= MIN_PER_CLASS_FOR_SELECTION])
    if len(np.unique(y[frequent])) < 2:
        return (1.0, None) if return_model else 1.0
    idx = np.flatnonzero(frequent)
    fit_idx, val_idx = train_test_split(idx, test_size=0.2, random_state=0, stratify=y[idx])
    fit_idx = np.concatenate([fit_idx, np.flatnonzero(~frequent)])
    scores, (model, weights) = _path(x[fit_idx], y[fit_idx], x[val_idx], y[val_idx], max_iter)
    best = max(scores.values())
    C = min((c for c, s in scores.items() if s == best), key=lambda c: abs(np.log10(c)))  # ties: moderate C
    model.coef_, model.intercept_ = weights[C]
    return (C, model.set_params(C=C)) if return_model else C


def linear_probe(train_x, train_y, test_x, test_y, C: float | None = None, max_iter: int = 1000) -> float:
    """Test accuracy of a logistic regression on standardised (float32) features; C chosen by ``select_C`` when None."""
    train_x, train_y, test_x, test_y = map(_numpy, (train_x, train_y, test_x, test_y))
    _check_labels(train_y)
    if len(test_y) == 0:
        raise ProbeDataError("linear probe needs at least one test sample")
    scaler = StandardScaler().fit(train_x)
    train_x, test_x = scaler.transform(train_x).astype(np.float32), scaler.transform(test_x).astype(np.float32)
    model = None
    if C is None:
        C, model = select_C(train_x, train_y, max_iter, return_model=True)
    if model is None or list(model.classes_) != list(np.unique(train_y)):
        model = LogisticRegression(C=C, max_iter=max_iter)  # no warm start to reuse (other classes, or C was given)
    return float(model.fit(train_x, train_y).score(test_x, test_y))
