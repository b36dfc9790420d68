"""`medkd tsne` (the paper's Figure 5): t-SNE maps of teacher and student features, coloured by label.

A teacher's features come from its cache (`/split/features`), a student's from its run folder (the
penultimate features of `best.pt`, caught by `medkd.students.FeatureTap`). Given both, the panels sit side
by side over the same images. The PNG target rules (`check_png_out`) live in `medkd.plots`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure  # no pyplot: no global backend state; PNGs render with Agg

from medkd.cache import TeacherCache
from medkd.data import prepare_images
from medkd.deploy import label_names
from medkd.errors import MedkdError
from medkd.files import atomic_path
from medkd.plots import check_png_out
from medkd.students import FeatureTap
from medkd.trained import load_trained_run

NONE = "none"  # the bucket of a multi-label image with no positive label
DPI = 150
BATCH = 256
MIN_SAMPLES = 4  # t-SNE needs a few neighbours per point
PANEL_INCHES = 6.0
LEGEND_CHARS = 40  # bloodmnist's class names run past 60 characters


class SourceFeatures(NamedTuple):
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N, L) int64
    names: list[str]  # class names in label order
    title: str  # how the panel names the source


# ---------------------------------------------------------------- PNG figures (shared with saliency)


def write_png(fig: Figure, path: Path) -> Path:
    """Render `fig` with Agg to `path` through a temporary file renamed into place."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    fig.clear()  # an object-API figure is in no pyplot registry; clearing drops its artists now
    return path


# ---------------------------------------------------------------- labels


def label_groups(labels: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """One group per image and the groups' names: its class (labels (N, 1)), or for multi-label (N, L) its
    first positive label, with a last group "none" for images with no positive label."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise MedkdError(f"labels must be (N, L), got shape {labels.shape}")
    if labels.shape[1] == 1:  # MedMNIST stores single-label tasks as (N, 1)
        return labels[:, 0].astype(np.int64), list(names)
    positive = labels > 0
    first = np.where(positive.any(axis=1), positive.argmax(axis=1), labels.shape[1])
    return first.astype(np.int64), [*names, NONE]


# ---------------------------------------------------------------- features


def source_features(
    source: str | os.PathLike, split: str = "test", data_dir: str | None = None
) -> SourceFeatures:
    """Features, labels, class names and a title of one split: from a teacher cache (.h5 file) or from a
    run folder (its student's penultimate features on the split's images)."""
    path = Path(source)
    if path.is_file():
        return _cache_features(path, split)
    if path.is_dir():
        return _run_features(path, split, data_dir)
    raise MedkdError(f"{path} not found; give a teacher cache (.h5) or the folder of a finished run")


def _cache_features(path: Path, split: str) -> SourceFeatures:
    cache = TeacherCache(path)
    features = cache.features(split).astype(np.float32)
    stored = cache.attrs["label_names"]
    names = [stored[str(i)] for i in range(len(stored))]
    title = f"teacher {cache.attrs['teacher']} (cache {path.name})"
    return SourceFeatures(features, cache.labels[split], names, title)


def _run_features(path: Path, split: str, data_dir: str | None) -> SourceFeatures:
    run = load_trained_run(path)
    images, labels = run.split(split, data_dir)
    tap = FeatureTap(run.model, purpose="a t-SNE map")
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(images), BATCH):
            run.model(prepare_images(torch.from_numpy(images[start : start + BATCH]), run.view))
            chunks.append(tap.features.float().flatten(1))  # (B, D)
    features = torch.cat(chunks).numpy() if chunks else np.zeros((0, tap.dim), np.float32)
    title = f"student {run.result.student} (run {path.name})"
    return SourceFeatures(features, labels, label_names(run.result.dataset), title)


# ---------------------------------------------------------------- t-SNE


def effective_perplexity(perplexity: float, n: int) -> float:
    """The perplexity t-SNE runs with: `perplexity`, clamped to (n − 1) / 3 on small splits (sklearn needs
    perplexity < n, and 3·perplexity neighbours per point)."""
    if not perplexity > 0:
        raise MedkdError(f"--perplexity must be > 0, got {perplexity}")
    if n < MIN_SAMPLES:
        raise MedkdError(f"a t-SNE map needs at least {MIN_SAMPLES} images; the split has {n}")
    return min(float(perplexity), (n - 1) / 3)


def embed(features: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """sklearn's t-SNE of (N, D) features → (N, 2), PCA-initialised, perplexity clamped by
    `effective_perplexity`; the same seed gives the same map. With a PCA start the seed reaches only
    the randomized SVD of that start, so where the SVD is exact (few, low-dimensional features) other seeds
    give the same map too."""
    from sklearn.manifold import TSNE  # imported here: sklearn.manifold takes a second to import

    x = np.asarray(features, dtype=np.float32)
    tsne = TSNE(
        n_components=2,
        perplexity=effective_perplexity(perplexity, len(x)),
        init="pca",
        learning_rate="auto",
        random_state=seed,
    )
    return tsne.fit_transform(x)


def short_name(name: str, chars: int) -> str:
    """`name` cut to `chars` characters with an ellipsis, for titles and legends."""
    return name if len(name) <= chars else name[: chars - 1] + "…"


def _colours(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    # tab20 pairs a dark and a light shade of each hue: all ten dark shades first, so neighbours differ.
    return [colormaps["tab20"]((2 * i) % 20 + (2 * i) // 20) for i in range(n)]


def tsne_figure(
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    split: str = "test",
    seed: int = 0,
    perplexity: float = 30.0,
    data_dir: str | None = None,
    force: bool = False,
) -> Path:
    """Write one t-SNE panel per source (cache or run), coloured by label, side by side, as a PNG.

    Multi-label images are coloured by their first positive label ("none" for none). Several sources must
    describe the same images (same class names and labels), so their panels compare like with like.
    """
    if not sources:
        raise MedkdError("give at least one teacher cache or run folder")
    path = check_png_out(out, force)
    panels = [source_features(s, split, data_dir) for s in sources]
    first = panels[0]
    for other in panels[1:]:
        if other.names != first.names or not np.array_equal(other.labels, first.labels):
            raise MedkdError(
                f"{first.title} and {other.title} describe different {split} images (other classes or "
                f"labels); give a cache and a run of the same dataset"
            )
    used = effective_perplexity(perplexity, len(first.labels))
    groups, names = label_groups(first.labels, first.names)
    colours = _colours(len(names))
    if names[-1] == NONE:
        colours[-1] = (0.6, 0.6, 0.6, 1.0)  # "none" in grey, the labels in colour

    fig = Figure(figsize=(PANEL_INCHES * len(panels), PANEL_INCHES + 0.03 * len(names)), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels, strict=True):
        xy = embed(panel.features, seed, perplexity)
        for k, name in enumerate(names):
            mask = groups == k
            if mask.any():
                ax.scatter(*xy[mask].T, s=14, color=colours[k], alpha=0.8, linewidths=0,
                           label=f"{short_name(name, LEGEND_CHARS)} ({mask.sum()})")  # fmt: skip
        ax.set_title(f"{panel.title}\n{panel.features.shape[1]}-d features", fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 2 * len(panels)),
               fontsize=10, markerscale=1.6, frameon=False)  # fmt: skip
    clamped = f" (clamped from {perplexity:g} for {len(groups)} images)" if used < perplexity else ""
    fig.suptitle(
        f"t-SNE of {split} features, {len(groups)} images\nperplexity {used:.3g}{clamped}, seed {seed}",
        fontsize=12,
    )
    return write_png(fig, path)
