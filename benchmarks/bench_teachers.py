"""Time per training step with several teachers from their caches: KD from one cache vs the mixture of M
teachers under each weighting (mean, confidence, learned gate), with and without the per-teacher feature
terms.

Same student, same batches, same device; the variants are interleaved round by round. An extra teacher
from a cache costs a row lookup, a softmax and a weighted sum per step, not a forward pass, so M teachers
should cost what one does (goal: mean / one <= 1.05, and the same for the other weightings).

    .venv/bin/python benchmarks/bench_teachers.py [--quick]
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import torch
from _common import interleave, parse_step_args, print_table, ratio_line, step_parser, step_rows, step_setup
from torch import nn

from medkd.data import prepare_images
from medkd.losses import kd_loss, mixture_kd_loss
from medkd.students import FeatureTap
from medkd.train import FeatureDistillation
from medkd.weighting import TeacherWeighting

ALPHA, TEMPERATURE = 0.2, 2.0
VARIANTS = ("one", "mean", "confidence", "learned", "one_feature", "learned_feature")


def main() -> None:
    parser = step_parser(__doc__)
    parser.add_argument("--teachers", type=int, default=3, help="M, the caches of the multi-teacher run")
    parser.add_argument("--feature-dims", default="1280,1280,512", help="each teacher's D")
    args = parse_step_args(parser)
    setup = step_setup(args)
    train, batches, m = setup.train, setup.batches, args.teachers
    dims = [int(d) for d in args.feature_dims.split(",")][:m]
    # What M caches put in memory: each teacher's logits (stacked on a teacher axis) and fp16 features.
    logits = torch.randn(len(train), m, setup.n_out) * 3
    features = [torch.randn(len(train), d).half() for d in dims]

    def variant(name: str) -> Callable[[], None]:
        model = copy.deepcopy(setup.student).train()  # the same initial student for every variant
        kind = name.removesuffix("_feature")
        tap = FeatureTap(model) if name.endswith("_feature") or kind == "learned" else None
        weighting = TeacherWeighting.create(kind, m, tap, 0.1) if kind != "one" else None
        modules: list[nn.Module] = [model]
        feature_kd = None
        if name.endswith("_feature"):
            widths = dims[:1] if kind == "one" else dims
            projectors = nn.ModuleList(nn.Linear(tap.dim, d) for d in widths)
            feature_kd = FeatureDistillation(1.0, projectors, tap, features[: len(widths)])
            modules.append(projectors)
        if weighting is not None and weighting.gate is not None:
            modules.append(weighting.gate)
        optimizer = torch.optim.Adam(nn.ModuleList(modules).parameters(), lr=1e-3)
        cursor = itertools.count()

        def run() -> None:
            idx = batches[next(cursor) % len(batches)]
            x = prepare_images(train.images[idx], setup.view)
            out, target = model(x), train.targets[idx]
            weights = None
            if weighting is None:
                loss = kd_loss(out, logits[idx, 0], target, ALPHA, TEMPERATURE).loss
            else:
                weights = weighting.weights(logits[idx], target, False)
                loss = mixture_kd_loss(out, logits[idx], weights, target, ALPHA, TEMPERATURE).loss
                loss = loss - weighting.bonus(weights)
            if feature_kd is not None:
                loss = loss + feature_kd.term(idx, None, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    times = interleave({name: variant(name) for name in VARIANTS}, rounds=args.rounds)
    rows, per_step = step_rows(times, args.batch_size, lambda n: "one_feature" if "feature" in n else "one")
    print_table(
        f"bench_teachers: {args.student} at {args.size} px, batch {args.batch_size}, {args.dataset} train, "
        f"{m} teachers, CPU; median of {args.rounds} interleaved rounds",
        ["variant", "ms/step", "range", "img/s", "x one teacher"],
        rows,
    )
    feature = per_step["learned_feature"] / per_step["one_feature"]
    print(f"learned_feature / one_feature = {feature:.3f} ({m} projectors and the gate vs one projector)")
    for name in ("confidence", "learned"):
        print(f"{name} / one = {per_step[name] / per_step['one']:.3f}")
    mean = per_step["mean"] / per_step["one"]
    ratio_line(f"mean of {m} teachers / one teacher (time per step)", mean, "<= 1.05", mean <= 1.05)


if __name__ == "__main__":
    main()
