"""Which runs `report` counts as one method: a teacher's head and folds, a dataset's own recipe, and
`run:` teachers trained on each dataset."""

from __future__ import annotations

from types import SimpleNamespace

from medkd.report import dataset_recipes, summarise, table2_rows, teacher_label
from medkd.runs import RunResult

LITE0 = {"teacher": "efficientnet_lite0", "teacher_input_size": 112, "weights_sha256": "ab" * 32}
NO_DELTA = lambda row: SimpleNamespace(baseline=None, auc=None)  # noqa: E731


def run(dataset: str, seed: int, teacher: dict | None, epochs: int = 10, batch: int = 32, auc: float = 0.9):
    config = {
        "student": "resnet18", "alpha": 1.0 if teacher is None else 0.2, "temperature": 2.0, "lr": 1e-3,
        "seed": seed, "epochs": epochs, "batch_size": batch, "feature_weight": 0.0,
    }  # fmt: skip
    if teacher is not None:
        teacher = {"cache": f"{dataset}.h5", "test_auc": 0.8, "test_acc": 0.7, **teacher}
    return RunResult(
        config=config, dataset=dataset, size=28, task="binary-class", n_outputs=2,
        run_dir=f"runs/{dataset}/{seed}/{id(teacher)}", val={"auc": auc, "acc": 0.8},
        test={"auc": auc + seed / 100, "acc": 0.8}, baseline=teacher is None, teacher=teacher,
        data_sha256={"test": dataset}, epochs_run=epochs, best_epoch=epochs, wall_seconds=1.0,
    )  # fmt: skip


def test_teacher_label_names_the_head_and_folds():
    assert teacher_label({**LITE0, "head": "linear", "cross_fit": 1}) == "efficientnet_lite0"
    assert teacher_label({**LITE0, "head": "attention"}) == "efficientnet_lite0 [attention head]"
    assert teacher_label({**LITE0, "head": "linear", "cross_fit": 5}) == "efficientnet_lite0 [cross-fit 5]"
    assert teacher_label({}) is None


def test_one_backbone_with_three_heads_is_three_teachers_and_three_kd_rows():
    heads = {"linear": (1, 0.90), "attention": (1, 0.80), "cross": (5, 0.70)}
    results = [
        run(
            "breastmnist",
            s,
            {**LITE0, "head": "attention" if h == "attention" else "linear", "cross_fit": k},
            auc=a,
        )
        for h, (k, a) in heads.items()
        for s in (0, 1, 2)
    ]
    rows = summarise(results)
    kd = {r["teacher"]: r for r in rows if r["kind"] == "kd"}
    assert sorted(kd) == [
        "efficientnet_lite0",
        "efficientnet_lite0 [attention head]",
        "efficientnet_lite0 [cross-fit 5]",
    ]
    assert all(r["n_seeds"] == 3 and r["seeds"] == [0, 1, 2] for r in kd.values())  # never 9 "seeds"
    assert abs(kd["efficientnet_lite0 [attention head]"]["test_auc_mean"] - 0.81) < 1e-9
    assert len([r for r in rows if r["kind"] == "teacher"]) == 3


def test_a_dataset_recipe_is_shown_under_the_dataset_not_split_into_methods():
    results = [
        r
        for s in (0, 1, 2)
        for r in (
            run("breastmnist", s, None),
            run("breastmnist", s, {**LITE0, "head": "linear"}),
            run("pneumoniamnist", s, None, epochs=1, batch=64),
            run("pneumoniamnist", s, {**LITE0, "head": "linear"}, epochs=1, batch=64),
        )
    ]
    rows = summarise(results)
    fields, text = dataset_recipes(rows)
    assert fields == {"epochs", "batch_size"}
    assert text == {("breastmnist", 28): "epochs 10, batch 32", ("pneumoniamnist", 28): "epochs 1, batch 64"}
    methods = table2_rows(rows, NO_DELTA)
    students = [m for m in methods if m["kind"] != "teacher"]
    assert [m["method"] for m in students] == ["baseline (α=1)", "KD efficientnet_lite0, T=2, α=0.2"]
    assert all(len(m["cells"]) == 2 for m in students)


def test_two_recipes_on_one_dataset_stay_two_methods():
    results = [run("breastmnist", s, None, epochs=e) for s in (0, 1) for e in (5, 10)]
    results += [run("pneumoniamnist", s, None, epochs=1) for s in (0, 1)]
    rows = summarise(results)
    assert dataset_recipes(rows)[0] == set()  # epochs is not one value per dataset
    labels = sorted(m["method"] for m in table2_rows(rows, NO_DELTA))
    assert labels == ["baseline (α=1), epochs 1", "baseline (α=1), epochs 10", "baseline (α=1), epochs 5"]


def test_a_run_teacher_is_one_method_across_datasets_though_its_weights_differ():
    ens = {"teacher": "run:a1_t2_s0+run:a1_t2_s1", "teacher_input_size": 28}
    results = [
        run(d, s, {**ens, "weights_sha256": d * 4}) for d in ("breastmnist", "pneumoniamnist") for s in (0, 1)
    ]
    methods = table2_rows(summarise(results), NO_DELTA)
    kd = [m for m in methods if m["kind"] == "kd"]
    teachers = [m for m in methods if m["kind"] == "teacher"]
    assert len(kd) == 1 and len(kd[0]["cells"]) == 2
    assert len(teachers) == 1 and len(teachers[0]["cells"]) == 2
    # A pretrained backbone with other weights is another teacher, on any dataset.
    other = [run("pneumoniamnist", s, {**LITE0, "weights_sha256": "cd" * 32}) for s in (0, 1)]
    lite = [run("breastmnist", s, LITE0) for s in (0, 1)]
    assert len([m for m in table2_rows(summarise(lite + other), NO_DELTA) if m["kind"] == "kd"]) == 2


def test_several_teachers_are_named_in_one_order_whatever_their_fingerprints():
    lite2 = {**LITE0, "teacher": "efficientnet_lite2"}
    results = []
    for dataset, order in (("breastmnist", (lite2, LITE0)), ("pneumoniamnist", (LITE0, lite2))):
        for s in (0, 1):
            r = run(dataset, s, None)
            r.baseline, r.config["alpha"], r.teacher_weighting = False, 0.2, "mean"
            r.teachers = [
                {"cache": f"{dataset}{i}.h5", "test_auc": 0.8, "test_acc": 0.7, **t}
                for i, t in enumerate(order)
            ]
            results.append(r)
    kd = [m for m in table2_rows(summarise(results), NO_DELTA) if m["kind"] == "kd"]
    assert [m["method"] for m in kd] == ["KD efficientnet_lite0 + efficientnet_lite2 (mean), T=2, α=0.2"]
    assert len(kd[0]["cells"]) == 2
