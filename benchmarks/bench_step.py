"""Time per training step: CE only vs KD from the cache vs online KD (a teacher forward in every step).

Same student, same batches, same device; the variants are interleaved round by round. The cached KD
step differs from the CE step only by an index into an in-memory logits tensor and the KL term, so
it should cost what a CE step costs (goal: kd_cache / ce <= 1.03). Online KD pays a teacher forward
per batch (the tiny DINOv2-architecture teacher, and a random-init ViT-S/14 at reduced input size).

    .venv/bin/python benchmarks/bench_step.py [--quick]
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import torch
from _common import (
    interleave,
    median,
    parse_step_args,
    print_table,
    ratio_line,
    spread,
    step_parser,
    step_setup,
)
from torch import nn

from medkd.backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneTeacher, build_teacher
from medkd.data import View, prepare_images
from medkd.losses import kd_loss
from medkd.registry import TEACHERS

ALPHA, TEMPERATURE = 0.2, 2.0


def vit_s14(img_size: int) -> BackboneTeacher:
    """DINOv2 ViT-S/14's architecture, random init (no weights offline): the cost of a real teacher."""
    import timm

    spec = TEACHERS["dinov2_vits14"]
    backbone = timm.create_model(spec.model_id, pretrained=False, img_size=img_size)
    return BackboneTeacher(
        "vit_s14", backbone, spec.model_id, "cls", img_size, IMAGENET_MEAN, IMAGENET_STD, "", True
    )


def online_teacher(teacher: BackboneTeacher, n_out: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images (B, H, W[, 3]) → teacher logits (B, C): resize to the teacher's view, backbone, head."""
    head = nn.Linear(teacher.feature_dim, n_out).requires_grad_(False)
    view = View(teacher.img_size, teacher.mean, teacher.std)

    @torch.inference_mode()
    def logits(raw: torch.Tensor) -> torch.Tensor:
        return head(teacher.features(prepare_images(raw, view)))

    return logits


def loss_overhead(cached: torch.Tensor, targets: torch.Tensor, batch_size: int, reps: int = 300) -> float:
    """Median extra seconds of (gather + KD loss, forward and backward) over (CE loss) on the same logits.

    The whole-step ratio is measured through the noise of a busy machine; this isolates what KD from
    the cache adds to a step, microseconds that the step's median cannot resolve.
    """
    n_out = cached.shape[1]
    logits = torch.randn(batch_size, n_out, requires_grad=True)
    idx = torch.randperm(len(cached))[:batch_size]
    y = targets[idx]

    def ce() -> None:
        kd_loss(logits, None, y, 1.0, TEMPERATURE).loss.backward()

    def kd() -> None:
        kd_loss(logits, cached[idx], y, ALPHA, TEMPERATURE).loss.backward()

    times = interleave({"ce": ce, "kd": kd}, rounds=reps, warmup=10)
    return median(times["kd"]) - median(times["ce"])


def main() -> None:
    parser = step_parser(__doc__, rounds=8, quick="batch 8, 6 rounds, no ViT-S/14 (< 1 min)")
    parser.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    parser.add_argument("--teacher-size", type=int, default=224, help="tiny teacher's input size (px)")
    parser.add_argument("--vit-size", type=int, default=112, help="ViT-S/14 input size (px); 0 skips it")
    parser.add_argument(
        "--compile", action="store_true", help="also CE and KD-from-cache with torch.compile'd students"
    )
    # Many single-step rounds: the median then sees each variant under many states of the machine's load.
    args = parse_step_args(parser)
    if args.quick:
        args.steps, args.vit_size = 1, 0
    setup = step_setup(args)
    train, batches, view, n_out, base = setup.train, setup.batches, setup.view, setup.n_out, setup.student
    # The cache's logits for the train split: one in-memory (N, C) tensor, looked up by dataset index.
    cached = torch.randn(len(train), n_out)

    teachers: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
        "ce": None,
        "kd_cache": None,
        f"online_tiny{args.teacher_size}": online_teacher(
            build_teacher("tiny", img_size=args.teacher_size), n_out
        ),
    }
    if args.vit_size:
        teachers[f"online_vits14_{args.vit_size}"] = online_teacher(vit_s14(args.vit_size), n_out)
    if args.compile:  # compiled once in the untimed warm-up round
        teachers |= {"ce_compiled": None, "kd_cache_compiled": None}

    def variant(name: str) -> Callable[[], float | None]:
        model = copy.deepcopy(base).train()  # the same initial student for every variant
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        teacher = teachers[name]
        if name.endswith("_compiled"):
            model, name = torch.compile(model), name.removesuffix("_compiled")
        cursor = itertools.count()

        def run() -> None:
            for _ in range(args.steps):
                idx = batches[next(cursor) % len(batches)]
                x = prepare_images(train.images[idx], view)  # (B, 3, S, S)
                y = train.targets[idx]
                if name == "ce":
                    t, alpha = None, 1.0
                elif name == "kd_cache":
                    t, alpha = cached[idx], ALPHA  # (B, C), an index gather
                else:
                    t, alpha = teacher(train.images[idx]), ALPHA  # (B, C), a teacher forward
                loss = kd_loss(model(x), t, y, alpha, TEMPERATURE).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        return run

    times = interleave({name: variant(name) for name in teachers}, rounds=args.rounds)
    per_step = {name: median(t) / args.steps for name, t in times.items()}
    rows = [
        [
            name,
            per_step[name] * 1e3,
            spread([s / args.steps * 1e3 for s in times[name]]),
            args.batch_size / per_step[name],
            per_step[name] / per_step["ce"],
        ]
        for name in teachers
    ]
    print_table(
        f"bench_step: {args.student} at {args.size} px, batch {args.batch_size}, {args.dataset} train, CPU; "
        f"median of {args.rounds} interleaved rounds x {args.steps} steps",
        ["variant", "ms/step", "range", "img/s", "x ce"],
        rows,
    )
    tiny = per_step[f"online_tiny{args.teacher_size}"] / per_step["kd_cache"]
    print(f"online_tiny{args.teacher_size} / kd_cache = {tiny:.3f}")
    if args.vit_size:
        vit = per_step[f"online_vits14_{args.vit_size}"] / per_step["kd_cache"]
        print(f"online_vits14_{args.vit_size} / kd_cache = {vit:.3f}")
    extra = loss_overhead(cached, train.targets, args.batch_size)
    print(
        f"KD-from-cache extra per step (gather + KL, fwd+bwd, isolated): {extra * 1e6:.0f} us "
        f"= {extra / per_step['ce']:.3%} of a CE step"
    )
    if args.compile:
        for name in ("ce", "kd_cache"):
            print(f"{name}_compiled / {name} = {per_step[name + '_compiled'] / per_step[name]:.3f}")
    kd = per_step["kd_cache"] / per_step["ce"]
    ratio_line("kd_cache / ce (time per step)", kd, "<= 1.03", kd <= 1.03)


if __name__ == "__main__":
    main()
