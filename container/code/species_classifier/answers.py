"""The answer to one photo, from its members' probabilities: one definition for every place
that answers.

`/invocations` (predictor.py) and the offline `species-classify` (classify.py) both call
`build_answers`, so their fields and values cannot drift apart. Torch-free: numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def build_answers(
    member_probs: np.ndarray,
    classes: Sequence[str],
    member_names: Sequence[str],
    abstain_below: float | None = None,
) -> list[dict]:
    """One answer per photo from members x photos x classes probabilities.

    `predicted_species` is the class with the largest mean probability over the members (no
    ties to break, unlike a vote), `confidence` that probability. With `abstain_below` (a
    bundle's threshold) each answer also says `unsure`: confidence below it.
    """
    member_probs = np.asarray(member_probs, dtype=np.float64)
    mean = member_probs.mean(axis=0)
    # float32 softmax sums to 1 within ~1e-7; renormalising makes the sum exact enough that
    # clients can rely on it.
    mean /= mean.sum(axis=1, keepdims=True)
    result = []
    for photo, probs in enumerate(mean):
        best = int(probs.argmax())
        details = []
        for name, member in zip(member_names, member_probs[:, photo], strict=True):
            top = int(member.argmax())
            details.append(
                {"fold": name, "predicted_species": classes[top], "confidence": float(member[top])}
            )
        answer = {
            "predicted_species": classes[best],
            "confidence": float(probs[best]),
            "class_probabilities": dict(zip(classes, probs.tolist(), strict=True)),
            # The seed's key and shape: one species name per member.
            "individual_fold_predictions": [d["predicted_species"] for d in details],
            "fold_details": details,
        }
        if abstain_below is not None:
            answer["unsure"] = answer["confidence"] < abstain_below
        result.append(answer)
    return result
