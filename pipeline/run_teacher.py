"""Finished medkd runs as teachers: `medkd cache-teacher --teacher run:runs/NAME [--teacher run:...]`.

A run folder (its `best.pt` and the config recorded in `result.json`) is rebuilt as the student network
it trained, and its own classifier gives the logits: no head is trained. Several runs make an ensemble
whose cached logits are the mean of the members' logits. The cache keeps format 1, so `distill`,
`sweep` and `report` read it like any other.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from medkd.cache import data_split_attrs, dataset_attrs, split_datasets, write_cache
from medkd.config import RUN_PREFIX, CacheTeacherConfig, run_teacher_paths, to_dict
from medkd.data import SPLITS, DeviceSplit, View, dataset_info, file_sha256, load_arrays, num_outputs
from medkd.errors import MedkdError
from medkd.metrics import evaluate, scores_from_logits
from medkd.runs import CHECKPOINT, OUTPUT_KEYS, RESULT, read_result
from medkd.students import build_student
from medkd.train import predict, resolve_device

# How the members' logits are combined, recorded in the cache (see `ensemble_logits`).
COMBINE = "mean_logits"


def is_run_teacher(teacher: str) -> bool:
    """True for `run:PATH` teachers (one run or a comma list), False for backbone names like `tiny`."""
    return teacher.startswith(RUN_PREFIX)


@dataclass(frozen=True)
class RunTeacher:
    """One finished run, ready to predict: its network (eval mode, on the CPU) and what it recorded."""

    path: Path
    result: dict[str, Any]
    model: nn.Module
    checkpoint_sha256: str
    checkpoint_epoch: int

    @property
    def view(self) -> View:
        """The view the run trained and evaluated with (`distill`: student size, interpolation, 0.5/0.5)."""
        interpolation = self.result["config"].get("interpolation") or "bicubic"
        return View(self.result["student_size"], interpolation=interpolation)

    def provenance(self) -> dict[str, Any]:
        """What the cache records about this member."""
        r = self.result
        return {
            "run_dir": str(self.path),
            "student": r["student"],
            "student_size": r["student_size"],
            "interpolation": r["config"].get("interpolation"),
            "alpha": r["alpha"],
            "temperature": r["temperature"],
            "seed": r["seed"],
            "teacher": (r.get("teacher") or {}).get("teacher"),
            "config_hash": r.get("config_hash"),
            "best_sha256": self.checkpoint_sha256,
            "best_epoch": r.get("best_epoch"),
            "epochs_run": r.get("epochs_run"),
            "val_auc": r["val"]["auc"],
            "val_acc": r["val"]["acc"],
            "test_auc": r["test"]["auc"],
            "test_acc": r["test"]["acc"],
        }


def load_run_teacher(run_dir: str | Path) -> RunTeacher:
    """Rebuild a finished run's network from its `result.json` config and `best.pt`; refuse anything else."""
    path = Path(run_dir)
    if not path.is_dir():
        raise MedkdError(f"teacher run folder {path} not found; give run:PATH of a finished medkd run")
    result = read_result(path)
    needed = ("medkd_result", "config", "student", "student_size", "n_outputs", "dataset", "size", "task")
    missing = [k for k in needed if not isinstance(result, dict) or k not in result]
    if missing:
        raise MedkdError(f"{path / RESULT} is not a medkd distill result (lacks {', '.join(missing)})")
    checkpoint = path / CHECKPOINT
    if not checkpoint.is_file():
        raise MedkdError(
            f"teacher run {path} has no {CHECKPOINT}; it did not finish, or the file was removed: "
            f"rerun it with `medkd distill --out {path} --force`"
        )
    what = f"teacher run {path}"
    try:
        stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MedkdError(f"{what}: cannot read {checkpoint} as a medkd checkpoint ({first})") from err
    if not isinstance(stored, dict) or not isinstance(stored.get("model"), dict):
        raise MedkdError(
            f"{what}: {checkpoint} is not a medkd checkpoint (no 'model' state dict); "
            f"it must be the best.pt that `medkd distill` wrote there"
        )
    recorded, saved = result["config"], stored.get("config")
    if not isinstance(saved, dict) or _strip(saved) != _strip(recorded):
        raise MedkdError(
            f"{what}: {checkpoint} was saved by another run than {path / RESULT} describes "
            f"(its config differs); put back that run's best.pt or rerun it"
        )
    try:
        model = build_student(result["student"], result["n_outputs"], result["student_size"])
        model.load_state_dict(stored["model"], strict=True)
    except (RuntimeError, MedkdError) as err:
        first = str(err).strip().splitlines()[0]
        raise MedkdError(
            f"{what}: {checkpoint} does not fit {result['student']} with {result['n_outputs']} outputs at "
            f"{result['student_size']} px ({first})"
        ) from err
    model.eval().requires_grad_(False)
    return RunTeacher(path, result, model, file_sha256(checkpoint), int(stored.get("epoch", 0)))


class _LogitsAndFeatures(nn.Module):
    """A ResNet that returns `[logits ‖ penultimate features]`: one pass gives both, logits unchanged."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.fc = model.fc
        self.body = model
        self.body.fc = nn.Identity()  # the body now ends in the pooled, flattened features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)  # (B, D)
        return torch.cat([self.fc(features), features], dim=1)  # (B, C + D)


def predict_run(member: RunTeacher, split: DeviceSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logits (N, C), features (N, D))` of one member on one split, float32 on the CPU, dataset order.

    Goes through `medkd.train.predict` with the run's own view and its default batch size, as
    `distill`'s evaluation did, so the logits are the ones behind the run's predictions.npz.
    """
    device = split.device
    model = _LogitsAndFeatures(copy.deepcopy(member.model)).to(device)
    if device.type == "cuda":  # distill trains and evaluates channels_last on CUDA
        model = model.to(memory_format=torch.channels_last)
    view = member.view
    if device.type == "cuda":
        view = View(view.size, interpolation=view.interpolation, channels_last=True)
    out = predict(model, split, view).cpu()  # (N, C + D)
    n_out = member.result["n_outputs"]
    return out[:, :n_out].contiguous(), out[:, n_out:].contiguous()


def ensemble_logits(logits: list[torch.Tensor]) -> torch.Tensor:
    """The members' logits averaged: one member is returned unchanged (bit for bit)."""
    if len(logits) == 1:
        return logits[0]
    # Mean of logits, not of probabilities: the cache stores raw logits that serve every temperature,
    # and a mean of logits is still a logit (softmax of it is the normalised geometric mean of the
    # members' probabilities; sigmoid of it the same per label for multi-label tasks).
    return torch.stack(logits).mean(dim=0)


def _check_members(
    members: list[RunTeacher], cfg: CacheTeacherConfig, split_attrs: dict[str, dict[str, Any]]
) -> None:
    for m in members:
        r = m.result
        if r["dataset"] != cfg.dataset or int(r["size"]) != int(cfg.size):
            raise MedkdError(
                f"teacher run {m.path} was trained on {r['dataset']} ({r['size']} px); the cache is for "
                f"{cfg.dataset} ({cfg.size} px): pass --dataset {r['dataset']} --size {r['size']}, "
                f"or a run of {cfg.dataset}"
            )
        for split in SPLITS:
            recorded = (r.get("data_sha256") or {}).get(split)
            sha = split_attrs[split]["data_sha256"]
            if recorded is not None and recorded != sha:
                raise MedkdError(
                    f"teacher run {m.path} was trained on other {cfg.dataset} data ({split} sha256 "
                    f"{recorded[:12]}…) than --data-dir holds ({sha[:12]}…); point --data-dir at its data"
                )
    n_outputs = {m.result["n_outputs"] for m in members}
    if len(n_outputs) > 1:
        raise MedkdError(f"teacher runs disagree on the number of outputs ({sorted(n_outputs)})")


def _joined(values: list[Any]) -> str:
    """`resnet18` when every member agrees, else `resnet18+resnet50`."""
    values = [str(v) for v in values]
    return values[0] if len(set(values)) == 1 else "+".join(values)


def cache_run_teacher(cfg: CacheTeacherConfig, console: Console | None = None) -> Path:
    """Stage one for `run:` teachers: the runs' own logits (mean over an ensemble) and features, cached."""
    from medkd.cache_teacher import _check_output

    console = console or Console(stderr=True)
    out = cfg.out_path()
    _check_output(out, cfg.force)
    if cfg.weights is not None:
        raise MedkdError("--weights is for backbone teachers; a run: teacher uses the run's own best.pt")
    members = [load_run_teacher(p) for p in run_teacher_paths(cfg.teacher)]  # before any data is read
    device = resolve_device(cfg.device)
    info = dataset_info(cfg.dataset)
    task, label_names = info["task"], info["label"]
    arrays = load_arrays(cfg.dataset, cfg.size, cfg.data_dir, cfg.download)
    split_attrs = data_split_attrs(arrays)  # hashed once: the members' check and the cache's attrs
    _check_members(members, cfg, split_attrs)
    if members[0].result["n_outputs"] != num_outputs(task, len(label_names)):
        raise MedkdError(
            f"teacher runs have {members[0].result['n_outputs']} outputs; {cfg.dataset} needs "
            f"{num_outputs(task, len(label_names))}"
        )

    logits, features, labels = {}, {}, {}
    start = time.perf_counter()
    for split in SPLITS:
        images, split_labels = arrays[split]
        data = DeviceSplit(images, split_labels, task, device)
        outputs = [predict_run(m, data) for m in members]
        logits[split] = ensemble_logits([lg for lg, _ in outputs]).numpy()  # (N, C)
        features[split] = torch.cat([f for _, f in outputs], dim=1).numpy()  # (N, D1 + D2 + ...)
        labels[split] = split_labels
        del data
    seconds = time.perf_counter() - start
    n_images = sum(len(a[0]) for a in arrays.values())
    scores = {split: scores_from_logits(task, torch.from_numpy(logits[split])).numpy() for split in SPLITS}
    metrics = {split: evaluate(task, labels[split], scores[split]) for split in ("val", "test")}

    provenance = [m.provenance() for m in members]
    runs = [m.result for m in members]
    attrs = {
        **dataset_attrs(cfg.dataset, cfg.size, task, label_names),
        "teacher": teacher_label(cfg.teacher),
        "backbone": _joined([r["student"] for r in runs]),
        "weights_sha256": _ensemble_sha([m.checkpoint_sha256 for m in members]),
        "teacher_input_size": max(int(r["student_size"]) for r in runs),
        "resize": _joined([m.view.interpolation for m in members]),
        "mean": list(members[0].view.mean),
        "std": list(members[0].view.std),
        "pool": "avgpool",  # the ResNet's global average pool, the input of its classifier
        "random_init": False,
        "feature_seconds": seconds,
        "head_seconds": 0.0,
        "images_per_second": n_images * len(members) / max(seconds, 1e-9),
        "ensemble": {"combine": COMBINE, "members": provenance},
        "config": to_dict(cfg),
    }
    splits = split_datasets(logits, labels, features if cfg.features else None)
    write_cache(out, attrs=attrs, splits=splits, split_attrs=split_attrs, head=_head(members, metrics))
    console.print(
        f"[bold]{attrs['teacher']}[/] ({len(members)} run(s), {COMBINE}) on {cfg.dataset} ({cfg.size} px): "
        f"val AUC {metrics['val']['auc']:.3f} ACC {metrics['val']['acc']:.3f}, test AUC "
        f"{metrics['test']['auc']:.3f} ACC {metrics['test']['acc']:.3f}; {seconds:.1f} s → {out}"
    )
    return out


def teacher_label(teacher: str) -> str:
    """The cache's `teacher` attr: `run:NAME` per member (folder names), joined with `+`."""
    return "+".join(f"{RUN_PREFIX}{Path(p).name}" for p in run_teacher_paths(teacher))


def _ensemble_sha(shas: list[str]) -> str:
    # One member: its best.pt's sha256, like a backbone's weights file; several: a hash of theirs, in order.
    return shas[0] if len(shas) == 1 else hashlib.sha256("+".join(shas).encode()).hexdigest()


def _head(members: list[RunTeacher], metrics: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The classifier as a linear head on the cached features: logits = features @ weight.T + bias.

    For k members on concatenated features, weight = [W1 … Wk] / k and bias = mean(b): exactly the
    mean of the members' logits. Attrs: the run's epochs, best_epoch, lr, batch_size (one value per
    member for an ensemble) and the val/test AUC/ACC of the cached logits.
    """
    k = len(members)
    weight = torch.cat([m.model.fc.weight.detach() for m in members], dim=1) / k  # (C, D1 + … + Dk)
    bias = torch.stack([m.model.fc.bias.detach() for m in members]).mean(dim=0)  # (C,)
    per_member = {
        "epochs": [int(m.result.get("epochs_run", 0)) for m in members],
        "best_epoch": [int(m.result.get("best_epoch", m.checkpoint_epoch)) for m in members],
        "lr": [float(m.result["lr"]) for m in members],
        "batch_size": [int(m.result["config"]["batch_size"]) for m in members],
    }
    record: dict[str, Any] = {"weight": weight.numpy(), "bias": bias.numpy()}
    record.update({key: values[0] if k == 1 else values for key, values in per_member.items()})
    record.update(
        val_auc=metrics["val"]["auc"],
        val_acc=metrics["val"]["acc"],
        test_auc=metrics["test"]["auc"],
        test_acc=metrics["test"]["acc"],
        members=k,
        combine=COMBINE,
    )
    return record


def _strip(config: dict[str, Any]) -> dict[str, Any]:
    # A checkpoint whose config differs from result.json only in output keys still belongs to that run.
    return {k: v for k, v in config.items() if k not in OUTPUT_KEYS}
