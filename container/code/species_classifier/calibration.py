"""How far the confidence can be trusted: expected calibration error and one temperature.

A photo's confidence (its largest class probability) should be the chance that the answer
is right. The expected calibration error (ECE) measures the gap: confidences go into
equal-width bins, and the difference between each bin's mean confidence and its accuracy
is averaged, weighted by the bin's photos.

Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks") divides
the logits by one number T, fitted to the out-of-fold labels by maximum likelihood; it never
changes which class wins, so accuracy and F1 stay as they are. The folds keep probabilities,
not logits, but log(p) differs from the logits only by a constant per photo, which softmax
ignores: softmax(log(p) / T) is exactly softmax(logits / T). The temperature is served only
when it lowers the ECE it was fitted for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

BINS = 10
# Far beyond what a trained network needs in either direction; the fit stays inside.
TEMPERATURE_BOUNDS = (0.05, 20.0)
# float32 softmax rounds very small probabilities to 0; log(0) would make the fit infinite.
SMALLEST_PROBABILITY = 1e-30


@dataclass(frozen=True)
class Calibration:
    fitted_temperature: float
    ece_before: float
    ece_after: float
    bins: int = BINS

    @property
    def applied(self) -> bool:
        return self.ece_after < self.ece_before

    @property
    def temperature(self) -> float:
        """What serving divides the logits by: the fitted value when it helps, else 1."""
        return self.fitted_temperature if self.applied else 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "applied": self.applied, "temperature": self.temperature}


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per confidence bin (equal width over 0-1): photos, mean confidence and accuracy."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # Bin b holds confidences in (b/bins, (b+1)/bins]; the top bin includes 1.0.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": count,
                "confidence": float(confidence[inside].mean()) if count else None,
                "accuracy": float(correct[inside].mean()) if count else None,
            }
        )
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    total = len(labels)
    return float(
        sum(
            row["count"] / total * abs(row["accuracy"] - row["confidence"])
            for row in reliability(probs, labels, bins)
            if row["count"]
        )
    )


def logits_of(probs: np.ndarray) -> np.ndarray:
    """Logits up to a constant per row, which is all that softmax and temperature need."""
    return np.log(np.clip(probs, SMALLEST_PROBABILITY, None))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    return softmax(logits_of(probs) / temperature, axis=1)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the negative log-likelihood of softmax(log(probs) / T)."""
    logits = logits_of(np.asarray(probs, dtype=np.float64))
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean())

    low, high = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(nll, bounds=(low, high), method="bounded")
    return float(np.exp(result.x))


def calibrate(probs: np.ndarray, labels: np.ndarray) -> Calibration:
    """Fit one temperature on out-of-fold probabilities and measure the ECE before and after."""
    # Rounded as model.json stores it, so ece_after is the error of what serving applies.
    temperature = round(fit_temperature(probs, labels), 4)
    return Calibration(
        fitted_temperature=temperature,
        ece_before=expected_calibration_error(probs, labels),
        ece_after=expected_calibration_error(apply_temperature(probs, temperature), labels),
    )
