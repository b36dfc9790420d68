"""Time per training step with augmentation: CE on views drawn on the fly (the augmented baseline) vs KD
from a multi-view cache (the view's parameters and its K-view logits looked up by dataset index), with and
without the cached-feature term; plain CE shows what the augmentation itself costs.

Same student, same batches, same device; the variants are interleaved round by round. A KD step from the
cache regenerates the view from stored parameters instead of drawing them, gathers the view's logits and
adds the KL term, so it should cost what the augmented CE step costs (goal: kd_views / ce_aug <= 1.05).

    .venv/bin/python benchmarks/bench_views.py [--quick]
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import torch
from _common import interleave, parse_step_args, print_table, ratio_line, step_parser, step_rows, step_setup
from torch import nn

from medkd.data import prepare_images
from medkd.losses import kd_loss
from medkd.students import FeatureTap
from medkd.train import Augmentation, FeatureDistillation, per_view
from medkd.views import draw_views

ALPHA, TEMPERATURE = 0.2, 2.0
VARIANTS = ("ce_plain", "ce_aug", "kd_views", "kd_views_feature")


def main() -> None:
    parser = step_parser(__doc__)
    parser.add_argument("--views", type=int, default=8, help="K, the cached views per image")
    parser.add_argument("--preset", default="medmnist")
    parser.add_argument("--feature-dim", type=int, default=1280, help="the teacher's D (Lite0: 1280)")
    args = parse_step_args(parser)
    setup = step_setup(args)
    train, batches, view, n = setup.train, setup.batches, setup.view, len(setup.train)
    # What a K-view cache puts in memory: the views' parameters, logits and (fp16) features.
    stored = Augmentation(args.preset, draw_views(args.preset, n, args.views, seed=0))
    view_logits = torch.randn(n, args.views, setup.n_out)
    view_features = torch.randn(n, args.views, args.feature_dim).half()
    fresh = Augmentation(args.preset)
    generator = torch.Generator().manual_seed(0)
    chosen = stored.choose(n, generator)

    def variant(name: str) -> Callable[[], None]:
        model = copy.deepcopy(setup.student).train()  # the same initial student for every variant
        feature_kd = None
        params = list(model.parameters())
        if name == "kd_views_feature":
            tap = FeatureTap(model)
            projectors = nn.ModuleList([nn.Linear(tap.dim, args.feature_dim)])
            feature_kd = FeatureDistillation(1.0, projectors, tap, [view_features])
            params += list(projectors.parameters())
        optimizer = torch.optim.Adam(params, lr=1e-3)
        cursor = itertools.count()

        def run() -> None:
            idx = batches[next(cursor) % len(batches)]
            if name == "ce_plain":
                views, t, alpha = None, None, 1.0
            elif name == "ce_aug":
                views, t, alpha = fresh.params_of(idx, None, generator), None, 1.0
            else:
                views, alpha = stored.params_of(idx, chosen, generator), ALPHA
                t = per_view(view_logits, idx, chosen)  # (B, C): the shown view's logits
            x = prepare_images(train.images[idx], view, views)  # (B, 3, S, S)
            loss = kd_loss(model(x), t, train.targets[idx], alpha, TEMPERATURE).loss
            if feature_kd is not None:
                loss = loss + feature_kd.weight * feature_kd.term(idx, chosen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    times = interleave({name: variant(name) for name in VARIANTS}, rounds=args.rounds)
    rows, per_step = step_rows(times, args.batch_size, lambda _: "ce_aug")
    print_table(
        f"bench_views: {args.student} at {args.size} px, batch {args.batch_size}, {args.dataset} train, "
        f"{args.views} {args.preset} views, CPU; median of {args.rounds} interleaved rounds",
        ["variant", "ms/step", "range", "img/s", "x ce_aug"],
        rows,
    )
    aug = per_step["ce_aug"] / per_step["ce_plain"]
    print(f"ce_aug / ce_plain = {aug:.3f} (what drawing and applying the views costs)")
    feature = per_step["kd_views_feature"] / per_step["ce_aug"]
    print(f"kd_views_feature / ce_aug = {feature:.3f}")
    kd = per_step["kd_views"] / per_step["ce_aug"]
    ratio_line("kd_views / ce_aug (time per step)", kd, "<= 1.05", kd <= 1.05)


if __name__ == "__main__":
    main()
