"""Cross-validation results: metrics per fold and pooled out-of-fold, plots and the report.

Everything lands in /opt/ml/output/data (uploaded as output.tar.gz):
    metrics.json            per-fold and pooled metrics, confusion matrices
    oof_predictions.csv     one row per photo: its fold, true and predicted label, probabilities
    skipped_images.csv      photos left out, with the reason (only when there are any)
    curves_fold-K.png       loss and macro-F1 per epoch
    confusion_*.png         raw and row-normalised confusion matrices, per fold and pooled
    report.md               the summary a person reads first
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in a training container

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: E402

from species_classifier.dataset import LabelledPhotos  # noqa: E402
from species_classifier.state import FoldState  # noqa: E402


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    row_sums = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, row_sums, out=np.zeros(matrix.shape), where=row_sums > 0)
    return {
        "macro_f1": float(f1.mean()),
        "accuracy": float((y_true == y_pred).mean()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": matrix.tolist(),
        "confusion_matrix_normalized": np.round(normalised, 4).tolist(),
    }


def summarize(
    folds: list[FoldState],
    fold_indices: list[np.ndarray],
    photos: LabelledPhotos,
    skipped: int,
    *,
    final_model: dict,
) -> dict:
    """metrics.json: per fold (best epoch), mean and std over folds, pooled out-of-fold,
    and `final_model`, what serving uses: {"strategy": "ensemble", "members": n} or
    {"strategy": "refit", "epochs": n, "train_loss": [...]}."""
    fold_entries, pooled_true, pooled_pred = [], [], []
    for state, val_index in zip(folds, fold_indices, strict=True):
        y_true = photos.labels[val_index]
        y_pred = state.best_val_probs.argmax(1).numpy()
        pooled_true.append(y_true)
        pooled_pred.append(y_pred)
        fold_entries.append(
            {
                "fold": state.fold,
                "best_epoch": state.best_epoch,
                "epochs_run": state.epoch,
                **classification_metrics(y_true, y_pred, photos.classes),
                "history": [asdict(r) for r in state.history],
            }
        )
    fold_f1 = np.array([f["macro_f1"] for f in fold_entries])
    pooled = classification_metrics(
        np.concatenate(pooled_true), np.concatenate(pooled_pred), photos.classes
    )
    return {
        "classes": photos.classes,
        "folds": fold_entries,
        "mean_macro_f1": float(fold_f1.mean()),
        "std_macro_f1": float(fold_f1.std()),
        "out_of_fold": pooled,
        "photos": {
            "used": len(photos.labels),
            "skipped": skipped,
            "per_class": photos.class_counts(),
        },
        "final_model": final_model,
    }


def write_outputs(
    output_dir: Path,
    metrics: dict,
    folds: list[FoldState],
    fold_indices: list[np.ndarray],
    photos: LabelledPhotos,
    channel_dir: Path,
    settings: dict,
) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _write_oof_csv(output_dir / "oof_predictions.csv", folds, fold_indices, photos, channel_dir)
    classes = photos.classes
    for state, entry in zip(folds, metrics["folds"], strict=True):
        _plot_curves(output_dir / f"curves_fold-{state.fold}.png", state)
        _plot_confusions(output_dir, f"fold-{state.fold}", entry, classes)
    _plot_confusions(output_dir, "pooled", metrics["out_of_fold"], classes)
    (output_dir / "report.md").write_text(render_report(metrics, settings))


def write_skipped(path: Path, skipped: list[tuple[str, str, str]]) -> None:
    """image_name, species_name, reason: one row per photo left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_name", "species_name", "reason"])
        writer.writerows(skipped)


def _write_oof_csv(path, folds, fold_indices, photos: LabelledPhotos, channel_dir: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["image_name", "species_name", "fold", "true_label", "predicted_label"]
            + [f"prob_{name}" for name in photos.classes]
        )
        for state, val_index in zip(folds, fold_indices, strict=True):
            probs = state.best_val_probs.numpy()
            for row, p in zip(val_index, probs, strict=True):
                writer.writerow(
                    [
                        str(photos.paths[row].relative_to(channel_dir)),
                        photos.species[row],
                        state.fold,
                        photos.classes[photos.labels[row]],
                        photos.classes[int(p.argmax())],
                    ]
                    + [f"{x:.6f}" for x in p]
                )


def _plot_curves(path: Path, state: FoldState) -> None:
    epochs = [r.epoch for r in state.history]
    figure, (loss_axis, f1_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [r.train_loss for r in state.history], marker="o", label="train")
    loss_axis.plot(epochs, [r.val_loss for r in state.history], marker="o", label="validation")
    loss_axis.set(title=f"Fold {state.fold}: loss", xlabel="epoch", ylabel="weighted cross-entropy")
    loss_axis.legend()
    f1_axis.plot(epochs, [r.val_macro_f1 for r in state.history], marker="o", color="tab:green")
    f1_axis.axvline(
        state.best_epoch, linestyle="--", color="grey", label=f"best epoch {state.best_epoch}"
    )
    f1_axis.set(title=f"Fold {state.fold}: validation macro-F1", xlabel="epoch", ylim=(0, 1.02))
    f1_axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _plot_confusions(output_dir: Path, name: str, metrics: dict, classes: list[str]) -> None:
    for key, suffix, fmt in (
        ("confusion_matrix", "", "d"),
        ("confusion_matrix_normalized", "_normalized", ".2f"),
    ):
        matrix = np.array(metrics[key])
        size = 1.2 * len(classes) + 3
        figure, axis = plt.subplots(figsize=(size, size))
        axis.imshow(matrix, cmap="Blues", vmin=0)
        axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        axis.set_yticks(range(len(classes)), classes)
        axis.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix ({name}{suffix})")
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), value in np.ndenumerate(matrix):
            colour = "white" if value > threshold else "black"
            axis.text(j, i, format(value, fmt), ha="center", va="center", color=colour)
        figure.tight_layout()
        figure.savefig(output_dir / f"confusion_{name}{suffix}.png", dpi=100)
        plt.close(figure)


def render_report(metrics: dict, settings: dict) -> str:
    pooled = metrics["out_of_fold"]
    lines = [
        "# Species classifier: cross-validation report",
        "",
        f"**Mean macro-F1 over {len(metrics['folds'])} fold(s): "
        f"{metrics['mean_macro_f1']:.3f} ± {metrics['std_macro_f1']:.3f}** "
        f"(pooled out-of-fold: {pooled['macro_f1']:.3f}, accuracy {pooled['accuracy']:.3f})",
        "",
        f"Photos used: {metrics['photos']['used']}, left out as unreadable: "
        f"{metrics['photos']['skipped']}"
        + (" (see skipped_images.csv)" if metrics["photos"]["skipped"] else ""),
        "",
        _final_model_line(metrics["final_model"]),
        "",
        "## Folds",
        "",
        "| fold | best epoch | epochs run | macro-F1 | accuracy |",
        "|---|---|---|---|---|",
    ]
    for fold in metrics["folds"]:
        lines.append(
            f"| {fold['fold']} | {fold['best_epoch']} | {fold['epochs_run']} | "
            f"{fold['macro_f1']:.3f} | {fold['accuracy']:.3f} |"
        )
    lines += [
        "",
        "## Per class (pooled out-of-fold)",
        "",
        "| class | precision | recall | F1 | photos |",
        "|---|---|---|---|---|",
    ]
    for name, scores in pooled["per_class"].items():
        lines.append(
            f"| {name} | {scores['precision']:.3f} | {scores['recall']:.3f} | "
            f"{scores['f1']:.3f} | {scores['support']} |"
        )
    lines += [
        "",
        "## Plots",
        "",
        "![pooled confusion matrix](confusion_pooled_normalized.png)",
        "",
    ]
    lines += [f"![fold {f['fold']} curves](curves_fold-{f['fold']}.png)" for f in metrics["folds"]]
    lines += ["", "## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    return "\n".join(lines)


def _final_model_line(final: dict) -> str:
    if final["strategy"] == "refit":
        return (
            f"Served model: one model refit on all photos for {final['epochs']} epoch(s) "
            "(the folds' median best epoch); the fold metrics above estimate its quality."
        )
    return f"Served model: the ensemble of the {final['members']} fold models (mean probabilities)."
