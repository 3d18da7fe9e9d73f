"""Cross-validation results: metrics per fold and pooled out-of-fold, plots and the report.

Everything lands in /opt/ml/output/data (uploaded as output.tar.gz):
    metrics.json                per-fold, pooled and holdout metrics with 95% intervals,
                                grouping, calibration, the abstain threshold
    oof_predictions.csv         one row per photo: its group, fold, true and predicted label,
                                probabilities
    holdout_predictions.csv     the same for the holdout photos (holdout_fraction > 0)
    per_class_metrics.csv       precision, recall, F1 and support per class, per scope
    lookalikes.csv              per species of the CSV: photos per predicted class, per scope
    skipped_images.csv          photos left out, with the reason (only when there are any)
    curves.png                  every fold's loss and macro-F1 per epoch, in one figure
    confusion_*.png             confusion matrices per fold, pooled and holdout: counts, and
                                row rates with the counts beside them
    reliability.png             confidence against accuracy, before and after the temperature
    coverage.png                share answered against their accuracy, abstain point marked
    mistakes_confident.png      contact sheet: the most confident wrong out-of-fold answers
    right_unsure.png            contact sheet: the least confident right ones
    report.md                   the summary a person reads first

Plots are drawn on matplotlib Figure objects, which need no backend and no global state.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageOps

from species_classifier.calibration import apply_temperature, calibrate, reliability
from species_classifier.dataset import GROUP_NOUNS, OTHER, LabelledPhotos
from species_classifier.holdout import HoldoutResult
from species_classifier.scoring import (
    choose_abstain_threshold,
    classification_metrics,
    coverage_curve,
    lookalike_table,
    predictions_frame,
    with_intervals,
)
from species_classifier.state import FoldState

# Photos per contact sheet, and their grid.
SHEET_COLUMNS, SHEET_ROWS = 4, 3
THUMBNAIL_PX = 160
DPI = 80


def out_of_fold_frame(
    folds: list[FoldState],
    fold_indices: list[np.ndarray],
    photos: LabelledPhotos,
    channel_dir: Path,
) -> pd.DataFrame:
    """Every photo once, predicted by the fold model that did not train on it (best epoch)."""
    frames = []
    for state, val_index in zip(folds, fold_indices, strict=True):
        frame = predictions_frame(photos, val_index, state.best_val_probs.numpy(), channel_dir)
        frame.insert(frame.columns.get_loc("species_name") + 1, "fold", state.fold)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def summarize(
    folds: list[FoldState],
    fold_indices: list[np.ndarray],
    photos: LabelledPhotos,
    skipped: int,
    *,
    final_model: dict,
    seed: int,
    min_precision: float,
) -> dict:
    """metrics.json: per fold (best epoch), mean and std over folds, pooled out-of-fold with
    95% bootstrap intervals over the groups, how the photos were grouped, the calibration of
    the out-of-fold confidences with the temperature to serve, and the confidence below which
    serving answers "unsure" so that the answers it gives reach `min_precision`."""
    fold_entries = []
    for state, val_index in zip(folds, fold_indices, strict=True):
        fold_entries.append(
            {
                "fold": state.fold,
                "best_epoch": state.best_epoch,
                "epochs_run": state.epoch,
                **classification_metrics(
                    photos.labels[val_index], state.best_val_probs.argmax(1).numpy(), photos.classes
                ),
                "history": [asdict(r) for r in state.history],
            }
        )
    fold_f1 = np.array([f["macro_f1"] for f in fold_entries])
    pooled_probs = np.concatenate([s.best_val_probs.numpy() for s in folds]).astype(np.float64)
    pooled_rows = np.concatenate(fold_indices)
    pooled_true, pooled_pred = photos.labels[pooled_rows], pooled_probs.argmax(axis=1)
    calibration = calibrate(pooled_probs, pooled_true).to_dict()
    # The threshold applies to what serving answers: confidences after its temperature.
    served = apply_temperature(pooled_probs, calibration["temperature"])
    groups = photos.group_ids()
    return {
        "classes": photos.classes,
        "grouping": {
            "group_by": photos.group_by,
            "column": photos.group_column,
            "groups": int(len(np.unique(groups))),
            "photos": len(photos.labels),
        },
        "folds": fold_entries,
        "mean_macro_f1": float(fold_f1.mean()),
        "std_macro_f1": float(fold_f1.std()),
        "out_of_fold": with_intervals(
            classification_metrics(pooled_true, pooled_pred, photos.classes),
            pooled_true,
            pooled_pred,
            groups[pooled_rows],
            photos.classes,
            seed,
        ),
        "calibration": calibration,
        "abstain": choose_abstain_threshold(
            served.max(axis=1), pooled_pred == pooled_true, min_precision
        ),
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
    holdout: HoldoutResult | None = None,
) -> None:
    """metrics.json (with the holdout's scores when there is one), tables, plots, report.md."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if holdout is not None:
        metrics = {**metrics, "holdout": holdout.metrics}
        holdout.predictions.to_csv(
            output_dir / "holdout_predictions.csv", index=False, float_format="%.6f"
        )
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    oof = out_of_fold_frame(folds, fold_indices, photos, channel_dir)
    oof.to_csv(output_dir / "oof_predictions.csv", index=False, float_format="%.6f")
    _per_class_table(metrics).to_csv(
        output_dir / "per_class_metrics.csv", index=False, float_format="%.4f"
    )
    lookalikes = {"out_of_fold": lookalike_table(oof, photos.classes, OTHER)}
    if holdout is not None:
        lookalikes["holdout"] = lookalike_table(holdout.predictions, photos.classes, OTHER)
    pd.concat(lookalikes, names=["scope", None]).reset_index(level="scope").to_csv(
        output_dir / "lookalikes.csv", index=False
    )

    classes = photos.classes
    _save(_curves_figure(folds), output_dir / "curves.png")
    for entry in metrics["folds"]:
        _plot_confusions(output_dir, f"fold-{entry['fold']}", entry, classes)
    _plot_confusions(output_dir, "pooled", metrics["out_of_fold"], classes)
    if holdout is not None:
        _plot_confusions(output_dir, "holdout", holdout.metrics, classes)
    probs = oof[[f"prob_{name}" for name in classes]].to_numpy()
    labels = oof["true_label"].map({name: i for i, name in enumerate(classes)}).to_numpy()
    _save(
        _reliability_figure(probs, labels, metrics["calibration"]),
        output_dir / "reliability.png",
    )
    served = apply_temperature(probs, metrics["calibration"]["temperature"])
    _save(
        _coverage_figure(served.max(axis=1), served.argmax(axis=1) == labels, metrics["abstain"]),
        output_dir / "coverage.png",
    )
    sheets = {}
    for name, chosen, title in _sheet_choices(oof):
        if len(chosen):
            _save(_contact_sheet(chosen, channel_dir, title), output_dir / f"{name}.png")
        sheets[name] = len(chosen)
    (output_dir / "report.md").write_text(render_report(metrics, settings, sheets, lookalikes))


def write_skipped(path: Path, skipped: list[tuple[str, str, str]]) -> None:
    """image_name, species_name, reason: one row per photo left out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image_name", "species_name", "reason"])
        writer.writerows(skipped)


def _per_class_table(metrics: dict) -> pd.DataFrame:
    """Long format: scope (out_of_fold, holdout, fold-K), class and its scores."""
    scopes = {"out_of_fold": metrics["out_of_fold"]}
    if "holdout" in metrics:
        scopes["holdout"] = metrics["holdout"]
    scopes.update({f"fold-{f['fold']}": f for f in metrics["folds"]})
    frames = [
        pd.DataFrame.from_dict(scores["per_class"], orient="index")
        .rename_axis("class")
        .reset_index()
        .assign(scope=scope)
        for scope, scores in scopes.items()
    ]
    table = pd.concat(frames, ignore_index=True)
    return table[["scope", "class", "precision", "recall", "f1", "support"]]


def _sheet_choices(oof: pd.DataFrame) -> list[tuple[str, pd.DataFrame, str]]:
    """(file stem, photos, title): the most confident mistakes, the least confident hits."""
    count = SHEET_COLUMNS * SHEET_ROWS
    right = oof["true_label"] == oof["predicted_label"]
    return [
        (
            "mistakes_confident",
            oof[~right].sort_values("confidence", ascending=False, kind="stable").head(count),
            "The most confident wrong answers (out-of-fold)",
        ),
        (
            "right_unsure",
            oof[right].sort_values("confidence", kind="stable").head(count),
            "The least confident right answers (out-of-fold)",
        ),
    ]


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI)


def _curves_figure(folds: list[FoldState]) -> Figure:
    """Loss and macro-F1 of every fold on two shared panels: colour = fold,
    solid = validation, dashed = training, star = the epoch the fold kept."""
    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axis, f1_axis = figure.subplots(1, 2)
    for number, state in enumerate(folds):
        colour = f"C{number}"
        epochs = [r.epoch for r in state.history]
        name = f"fold {state.fold}"
        solid = {"color": colour, "marker": "o", "markersize": 3, "label": name}
        dashed = {"color": colour, "ls": "--"}
        loss_axis.plot(epochs, [r.val_loss for r in state.history], **solid)
        loss_axis.plot(epochs, [r.train_loss for r in state.history], **dashed)
        f1_axis.plot(epochs, [r.val_macro_f1 for r in state.history], **solid)
        # Training macro-F1 on the epoch's (augmented) batches; NaN in checkpoints written
        # before the trainer recorded it, and those folds get no line.
        train_f1 = [r.train_macro_f1 for r in state.history]
        if not np.isnan(train_f1).all():
            f1_axis.plot(epochs, train_f1, **dashed)
        best = state.history[state.best_epoch - 1]
        f1_axis.plot(best.epoch, best.val_macro_f1, marker="*", markersize=12, color=colour)
    loss_axis.set(title="Loss (solid: validation, dashed: training)", xlabel="epoch")
    loss_axis.set(ylabel="weighted cross-entropy")
    f1_axis.set(title="Macro-F1 (star: the epoch each fold kept)", xlabel="epoch", ylim=(0, 1.02))
    for axis in (loss_axis, f1_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend()
        axis.grid(alpha=0.3)
    return figure


def _reliability_figure(probs: np.ndarray, labels: np.ndarray, calibration: dict) -> Figure:
    """Accuracy against confidence per bin (the diagonal is perfect calibration), and below
    it the photos per bin, which say how far each point can be trusted."""
    figure = Figure(figsize=(5.5, 6.5), layout="constrained")
    axis, counts_axis = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    axis.plot([0, 1], [0, 1], color="grey", ls=":", label="perfectly calibrated")
    curves = [("as trained", probs, calibration["ece_before"], "C0")]
    if calibration["fitted_temperature"] != 1.0:
        scaled = apply_temperature(probs, calibration["fitted_temperature"])
        label = f"temperature {calibration['fitted_temperature']:.2f}"
        curves.append((label, scaled, calibration["ece_after"], "C1"))
    for label, p, ece, colour in curves:
        rows = reliability(p, labels, calibration["bins"])
        counts_axis.stairs(
            [row["count"] for row in rows], [0.0] + [row["high"] for row in rows], color=colour
        )
        bins = [row for row in rows if row["count"]]
        axis.plot(
            [row["confidence"] for row in bins],
            [row["accuracy"] for row in bins],
            marker="o",
            color=colour,
            label=f"{label}: ECE {ece:.3f}",
        )
    served = "applied in serving" if calibration["applied"] else "not applied in serving"
    axis.set(
        title=f"Reliability of the out-of-fold confidence\n(temperature {served})",
        ylabel="accuracy",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
    )
    axis.legend(loc="upper left")
    counts_axis.set(xlabel="confidence (largest class probability)", ylabel="photos")
    for each in (axis, counts_axis):
        each.grid(alpha=0.3)
    return figure


def _coverage_figure(confidence: np.ndarray, correct: np.ndarray, abstain: dict) -> Figure:
    """The accuracy of the answers given against the share of photos answered, as the model
    abstains below ever higher confidence; the point `serve` uses is marked."""
    curve = coverage_curve(confidence, correct)
    figure = Figure(figsize=(6, 4.5), layout="constrained")
    axis = figure.subplots()
    axis.plot(curve["coverage"], curve["precision"], marker=".", label="out-of-fold answers")
    axis.axhline(
        abstain["min_precision"],
        color="grey",
        ls=":",
        label=f"min_precision {abstain['min_precision']:g}",
    )
    if abstain["reached"]:
        axis.plot(
            abstain["coverage"],
            abstain["precision"],
            marker="*",
            markersize=14,
            color="C3",
            ls="none",
            label=f"served: unsure below {abstain['abstain_below']:.3f}",
        )
    axis.set(
        title="Answer fewer photos, get more of them right",
        xlabel="coverage (share of photos answered, not unsure)",
        ylabel="accuracy of the answers given",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
    )
    axis.legend(loc="lower left")
    axis.grid(alpha=0.3)
    return figure


def _contact_sheet(chosen: pd.DataFrame, channel_dir: Path, title: str) -> Figure:
    """Thumbnails in a grid, each captioned with the true and predicted class and confidence."""
    rows = -(-len(chosen) // SHEET_COLUMNS)
    figure = Figure(figsize=(SHEET_COLUMNS * 2.3, rows * 2.6 + 0.4), layout="constrained")
    figure.suptitle(title)
    for cell, photo in enumerate(chosen.itertuples()):
        axis = figure.add_subplot(rows, SHEET_COLUMNS, cell + 1)
        axis.imshow(_thumbnail(channel_dir / photo.image_name))
        axis.set_title(_caption(photo), fontsize=8)
        axis.set_axis_off()
    return figure


def _caption(photo) -> str:
    """True class (with the species when it is more specific), prediction and confidence."""
    true = photo.true_label
    if photo.species_name != true:
        true = f"{true} ({photo.species_name})"
    verdict = "right" if photo.predicted_label == photo.true_label else "wrong"
    return (
        f"true: {true}\npredicted: {photo.predicted_label}\n"
        f"{verdict}, confidence {photo.confidence:.0%} (fold {photo.fold})"
    )


def _thumbnail(path: Path) -> np.ndarray:
    """The photo as a person sees it (EXIF orientation, true aspect), at most THUMBNAIL_PX."""
    with Image.open(path) as image:
        image.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))
        picture = ImageOps.exif_transpose(image).convert("RGB")
    picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    return np.asarray(picture)


def _plot_confusions(output_dir: Path, name: str, metrics: dict, classes: list[str]) -> None:
    """Counts; and row rates, each cell with its count and each row with its photos, so a
    rate of 1.00 that rests on two photos says so."""
    counts = np.array(metrics["confusion_matrix"])
    rows = counts.sum(axis=1)
    for suffix, matrix in (
        ("", counts),
        ("_normalized", np.array(metrics["confusion_matrix_normalized"])),
    ):
        size = 1.2 * len(classes) + 3
        figure = Figure(figsize=(size, size), layout="constrained")
        axis = figure.subplots()
        axis.imshow(matrix, cmap="Blues", vmin=0)
        axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        if suffix:
            labels = [f"{c}\n({n} photos)" for c, n in zip(classes, rows, strict=True)]
        else:
            labels = classes
        axis.set_yticks(range(len(classes)), labels)
        axis.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix ({name}{suffix})")
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), value in np.ndenumerate(matrix):
            colour = "white" if value > threshold else "black"
            text = f"{value:.2f}\n({counts[i, j]})" if suffix else str(value)
            axis.text(j, i, text, ha="center", va="center", color=colour)
        _save(figure, output_dir / f"confusion_{name}{suffix}.png")


def render_report(
    metrics: dict, settings: dict, sheets: dict[str, int], lookalikes: dict[str, pd.DataFrame]
) -> str:
    """report.md; `sheets` maps each contact sheet's file stem to its photo count,
    `lookalikes` each scope (out_of_fold, holdout) to its lookalike_table."""
    pooled = metrics["out_of_fold"]
    lines = ["# Species classifier: cross-validation report", ""]
    if "holdout" in metrics:
        holdout = metrics["holdout"]
        lines += [
            f"**Holdout macro-F1: {holdout['macro_f1']:.3f}** (95% interval "
            f"{_interval(holdout['macro_f1_ci95'])}), accuracy {holdout['accuracy']:.3f} "
            f"({_interval(holdout['accuracy_ci95'])}): {holdout['count']} photos never used "
            "in training, the number to quote, see below.",
            "",
        ]
    lines += [
        f"**Pooled out-of-fold macro-F1: {pooled['macro_f1']:.3f}** (95% interval "
        f"{_interval(pooled['macro_f1_ci95'])}), accuracy {pooled['accuracy']:.3f} "
        f"({_interval(pooled['accuracy_ci95'])}); mean macro-F1 over "
        f"{len(metrics['folds'])} fold(s): {metrics['mean_macro_f1']:.3f} ± "
        f"{metrics['std_macro_f1']:.3f}.",
        "",
        _grouping_line(metrics["grouping"], settings.get("group_by")),
        "",
        _abstain_line(metrics["abstain"], metrics.get("holdout")),
        "",
        f"Photos used: {metrics['photos']['used']}, left out as unreadable: "
        f"{metrics['photos']['skipped']}"
        + (" (see skipped_images.csv)" if metrics["photos"]["skipped"] else "")
        + "".join(f"; damaged {n} trained again" for n in metrics.get("damaged_checkpoints", ())),
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
        "Fold scores are optimistic: each fold's validation photos also chose the epoch it "
        "kept, so they are the best of several looks at the same photos."
        + (
            ""
            if "holdout" in metrics
            else " Set `holdout_fraction` (e.g. 0.15) for a score on photos that chose nothing."
        ),
        "",
        "![every fold's curves](curves.png)",
        "",
        "## Per class (pooled out-of-fold)",
        "",
        *_per_class_lines(pooled),
        "",
        "![pooled confusion matrix](confusion_pooled_normalized.png)",
        "",
        "## Look-alikes: which species are called what (pooled out-of-fold)",
        "",
        *_lookalike_lines(lookalikes["out_of_fold"], metrics["classes"]),
        "",
    ]
    if "holdout" in metrics:
        lines += _holdout_lines(metrics["holdout"], lookalikes["holdout"], metrics["classes"])
    lines += _calibration_lines(metrics["calibration"])
    lines += _abstain_lines(metrics["abstain"])
    lines += _mistakes_lines(sheets)
    lines += ["## Settings", "", "```json", json.dumps(settings, indent=2), "```", ""]
    return "\n".join(lines)


def _interval(bounds: list[float] | None) -> str:
    return "n/a" if bounds is None else f"{bounds[0]:.2f}-{bounds[1]:.2f}"


def _grouping_line(grouping: dict, asked: str | None) -> str:
    if grouping["group_by"] == "none":
        why = "as asked" if asked == "none" else "the CSV has no `observation_uuid` column"
        return (
            f"Splits drawn photo by photo (group_by none: {why}): the folds' "
            f"{grouping['photos']} photos. "
            "Photos of one observation may sit on both sides of a split, where near-copies "
            "flatter every score."
        )
    noun = GROUP_NOUNS[grouping["group_by"]]
    return (
        f"Splits drawn by {grouping['group_by']} (column `{grouping['column']}`): the folds' "
        f"{grouping['photos']} photos come from {grouping['groups']} {noun}; no "
        f"{grouping['group_by']} is on both sides of the holdout or of any fold, and the "
        f"intervals resample whole {noun}."
    )


def _abstain_line(abstain: dict, holdout: dict | None) -> str:
    if not abstain["reached"]:
        return (
            f"**Unsure: always.** No confidence threshold lets the out-of-fold answers reach "
            f"min_precision {abstain['min_precision']:g}, so `serve` marks every answer "
            '`"unsure": true`: lower min_precision or improve the model.'
        )
    line = (
        f"**Unsure below confidence {abstain['abstain_below']:.4f}:** `serve` marks answers "
        f'less confident than that `"unsure": true`, so that the rest reach precision '
        f"{abstain['min_precision']:g}. On the out-of-fold photos it answers "
        f"{abstain['coverage']:.0%} of them, {abstain['precision']:.1%} right"
    )
    if holdout is None:
        return line + "."
    answered = holdout["answered"]
    if answered["precision"] is None:
        return line + "; on the holdout it answers none."
    return (
        line + f"; on the holdout (the served model) {answered['coverage']:.0%}, "
        f"{answered['precision']:.1%} right."
    )


def _lookalike_lines(table: pd.DataFrame, classes: list[str]) -> list[str]:
    lines = [
        "Photos per species of the CSV (rows) and the class the model gave them (columns). "
        "Costly errors first: species behind `other` called a target species, then targets "
        "missed.",
        "",
        "| species | class | photos | " + " | ".join(f"→ {c}" for c in classes) + " | wrong |",
        "|---|---|---|" + "---|" * len(classes) + "---|",
    ]
    for species, label, photos, *counts, wrong in table.itertuples(index=False, name=None):
        cells = " | ".join(map(str, counts))
        lines.append(f"| {species} | {label} | {photos} | {cells} | {wrong} |")
    return lines


def _per_class_lines(scores: dict) -> list[str]:
    lines = [
        "| class | precision | recall | F1 | F1 95% interval | photos |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in scores["per_class"].items():
        lines.append(
            f"| {name} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | "
            f"{_interval(s['f1_ci95'])} | {s['support']} |"
        )
    return lines


def _holdout_lines(holdout: dict, lookalikes: pd.DataFrame, classes: list[str]) -> list[str]:
    unreadable = f", {holdout['unreadable']} unreadable left out" if holdout["unreadable"] else ""
    return [
        "## Holdout: the served model on photos it never saw",
        "",
        f"{holdout['count']} photos{unreadable}, set aside (whole groups, stratified as closely "
        "as they allow) before the folds were made, scored once by the model bundle exactly as "
        f"`serve` answers. Macro-F1 {holdout['macro_f1']:.3f} "
        f"({_interval(holdout['macro_f1_ci95'])}), accuracy {holdout['accuracy']:.3f} "
        f"({_interval(holdout['accuracy_ci95'])}), expected calibration error "
        f"{holdout['ece']:.3f}. Few photos make wide intervals, and a class right every "
        "time gets 1.00-1.00 however few its photos: read the photos column.",
        "",
        *_per_class_lines(holdout),
        "",
        "![holdout confusion matrix](confusion_holdout_normalized.png)",
        "",
        "### Look-alikes on the holdout",
        "",
        *_lookalike_lines(lookalikes, classes),
        "",
    ]


def _abstain_lines(abstain: dict) -> list[str]:
    return [
        '## When to answer "unsure"',
        "",
        "Each point: the model abstains below some confidence (after the temperature, as "
        "`serve` computes it); x is the share of the out-of-fold photos it still answers, y "
        "how many of those answers are right. The star is the lowest threshold whose answers "
        f"reach min_precision {abstain['min_precision']:g}, stored in model.json as "
        "`abstain_below`; `SPECIES_ABSTAIN_BELOW` overrides it per endpoint. The fold models "
        "chose it; the served ensemble is usually a little less confident and more often right.",
        "",
        "![coverage against accuracy](coverage.png)",
        "",
    ]


def _calibration_lines(calibration: dict) -> list[str]:
    temperature = calibration["fitted_temperature"]
    if calibration["applied"]:
        verdict = (
            f"It lowers the error from {calibration['ece_before']:.3f} to "
            f"{calibration['ece_after']:.3f}, so `serve` applies it (model.json `temperature`)."
        )
    else:
        verdict = (
            f"It would change the error from {calibration['ece_before']:.3f} to "
            f"{calibration['ece_after']:.3f}, no better, so `serve` does not apply it "
            "(model.json `temperature` is 1)."
        )
    return [
        "## Calibration: can the confidence be trusted?",
        "",
        "Expected calibration error (ECE): the gap between confidence and accuracy, averaged "
        f"over {calibration['bins']} confidence bins weighted by their photos (0 is perfect). "
        f"One temperature fitted on the out-of-fold predictions: T = {temperature:.3f} "
        "(above 1 softens overconfident answers, below 1 sharpens timid ones; the predicted "
        f"class never changes). {verdict}",
        "",
        "![reliability diagram](reliability.png)",
        "",
    ]


def _mistakes_lines(sheets: dict[str, int]) -> list[str]:
    lines = ["## Mistakes, seen", ""]
    captions = {
        "mistakes_confident": ("the most confident wrong answers", "No wrong answers."),
        "right_unsure": ("the least confident right answers", "No right answers."),
    }
    for name, (caption, none) in captions.items():
        lines += [f"![{caption}]({name}.png)" if sheets.get(name) else none, ""]
    return lines


def _final_model_line(final: dict) -> str:
    if final["strategy"] == "refit":
        return (
            f"Served model: one model refit on all photos for {final['epochs']} epoch(s) "
            "(the folds' median best epoch); the fold metrics above estimate its quality."
        )
    return f"Served model: the ensemble of the {final['members']} fold models (mean probabilities)."
