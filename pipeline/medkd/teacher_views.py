"""Stage one's multi-view pass (`cache-teacher --views K --augment PRESET`): the frozen teacher on K
augmented views of every training image, their features and logits, for a version-2 cache.

The views are drawn once (`medkd.views.draw_views`, seeded) and applied on the device batch by batch. The
pass runs after the heads are trained: a backbone's view logits are its head's on that view's features
(or patch tokens, which are never stored), and a cross-fitted cache's come from the image's own fold head,
so they stay out-of-fold like its plain train logits. Resumable like the plain pass, from its own partial
file, keyed by everything it depends on, the heads included.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from medkd.head import FittedHeads, Rows, fold_logits, head_record, predict
from medkd.partial import PartialOutputs
from medkd.teachers import Teacher, TeacherOutput, encode

ViewLogits = Callable[[TeacherOutput, np.ndarray], torch.Tensor]


def view_logits_fn(fitted: FittedHeads | None) -> ViewLogits:
    """`(outputs of some views, their image indices) → logits (B, C)`: the teacher's own classifier
    (`fitted` None), else its head, or with cross-fitting each image's own fold head."""
    if fitted is None:
        return lambda out, _images: out.logits.float()
    heads = [head for head, _ in fitted.heads]

    def logits(out: TeacherOutput, images: np.ndarray) -> torch.Tensor:
        inputs = out.tokens if out.tokens is not None else out.features
        if fitted.folds is None:
            return predict(heads[0], Rows(inputs))
        return fold_logits(heads, fitted.folds[images], Rows(inputs))

    return logits


def heads_digest(fitted: FittedHeads | None) -> str:
    """sha256 of the heads' arrays: a views partial file made with other heads is not resumed."""
    digest = hashlib.sha256()
    for head, _ in fitted.heads if fitted is not None else ():
        record = head_record(head)
        arrays = {k: record[k] for k in ("weight", "bias") if k in record} | record.get("state", {})
        for name in sorted(arrays):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(arrays[name], dtype=np.float32).tobytes())
    return digest.hexdigest()


def views_key(base_key: str, views: int, augment: str, fitted: FittedHeads | None) -> str:
    """The views partial file's key: the plain pass's, the views and the heads."""
    return json.dumps(
        {"plain": base_key, "views": views, "augment": augment, "heads": heads_digest(fitted)}, sort_keys=True
    )


def teacher_views(
    teacher: Teacher,
    images: np.ndarray,
    params: torch.Tensor,
    logits_of: ViewLogits,
    device: torch.device,
    batch_size: int,
    chunk: int,
    f: PartialOutputs,
    console: Console,
    quiet: bool = False,
    with_tokens: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's features (N, K, D) and logits (N, K, C), float32, on the K views `params` (N, K, P)
    of the training `images` (N, H, W[, 3]), written to `f` (split "train", N·K image-major rows) one
    chunk of `chunk` rows at a time; a rerun after a kill starts after the last complete chunk."""
    n, k = params.shape[:2]
    flat = params.reshape(n * k, -1)  # row r is view r % K of image r // K
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, disable=quiet) as progress:
        done = f.done("train")
        if done:
            console.print(f"resuming the teacher's views from {f.path}: {done}/{n * k} done", soft_wrap=True)
        bar = progress.add_task(f"{teacher.name} on {k} views", total=n * k, completed=done)
        for start in range(done, n * k, chunk):
            rows = np.arange(start, min(start + chunk, n * k))
            block = torch.from_numpy(images[rows // k]).to(device)  # (B, H, W[, 3]) uint8
            out = encode(teacher, block, batch_size, with_tokens=with_tokens, views=flat[rows].to(device))
            logits = logits_of(out, rows // k)
            f.write("train", n * k, start, out.features.numpy(), logits.numpy())
            progress.advance(bar, len(rows))
    features, logits = f.read("train")
    return features.numpy().reshape(n, k, -1), logits.numpy().reshape(n, k, -1)
