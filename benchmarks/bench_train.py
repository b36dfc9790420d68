"""Training images per second: medkd's epoch (`train_epochs` over a `DeviceSplit`) vs the official loop.

(a) `official`: the loop of MedMNIST/experiments `MedMNIST2D/train_and_eval_pytorch.py`: medmnist's
    `Dataset` (`as_rgb=True`, `ToTensor` + `Normalize(mean=[.5], std=[.5])`), `DataLoader(batch_size,
    shuffle=True)` with no workers, `zero_grad`, forward, CrossEntropyLoss (BCEWithLogits for
    multi-label), `loss.item()`, backward, Adam step (its TensorBoard writer left out).
(b) `medkd`: `medkd.train.train_epochs` (alpha = 1: CE only, no teacher) over a `DeviceSplit` of the
    same split, the student placed and its images made as `distill` does (`place_student`: channels_last;
    grayscale kept one channel for the student's first convolution).
(c) `medkd_compiled` (`--compile`): (b) under torch.compile; the warm-up epoch pays the compilation.

Same initial ResNet-18 student (deep copies), same batch size, same threads, the genuine files. Each
round is one epoch per variant, interleaved; img/s counts training only (medkd's val pass after each
epoch is outside `EpochStats.seconds`). `--whole` also times each side's full epoch with evaluation
as each does it: official scores train, val and test every epoch, medkd val only.

    .venv/bin/python benchmarks/bench_train.py [--quick] [--whole] [--compile] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time
from collections.abc import Callable

import medmnist
import torch
from _common import data_dir, interleave, median, print_table, ratio_line, set_threads, spread
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader
from torchvision import transforms

from medkd.data import DeviceSplit, View, batch_bounds, dataset_info, is_multilabel, load_arrays, num_outputs
from medkd.students import build_student, takes_one_channel
from medkd.train import LoopState, place_student, train_epochs

LR = 1e-3
EPOCHS = 100  # what both schedules are built for (official's default): the lr stays 1e-3 throughout
SEED = 0
GOAL = 1.2
PROFILE_STEPS = 5


class Side:
    """One variant: `epoch()` trains one epoch and returns its training seconds; it keeps each epoch's
    training img/s and, with `whole`, the wall seconds of the epoch with its evaluation."""

    def __init__(self, epoch: Callable[[], tuple[float, float, float | None]]):
        self._epoch = epoch
        self.rates: list[float] = []
        self.whole: list[float] = []

    def __call__(self) -> float:
        seconds, rate, whole = self._epoch()
        self.rates.append(rate)
        if whole is not None:
            self.whole.append(whole)
        return seconds


def official_dataset(flag: str, split: str) -> medmnist.dataset.MedMNIST:
    cls = getattr(medmnist, dataset_info(flag)["python_class"])
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=[0.5], std=[0.5])])
    return cls(split=split, transform=transform, as_rgb=True, root=data_dir(), download=False)


def official_side(base: nn.Module, flag: str, args: argparse.Namespace) -> Side:
    """The official script's train() (and, with `whole`, its test() on train, val and test) per epoch."""
    task = dataset_info(flag)["task"]
    multilabel = is_multilabel(task)
    model = copy.deepcopy(base)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [EPOCHS // 2, 3 * EPOCHS // 4], gamma=0.1)
    criterion = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    train = official_dataset(flag, "train")
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    evals = [
        (
            DataLoader(official_dataset(flag, s) if s != "train" else train, batch_size=args.batch_size),
            medmnist.Evaluator(flag, s, root=data_dir()),
        )
        for s in ("train", "val", "test")
    ] if args.whole else []  # fmt: skip

    def loss_of(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if multilabel:
            return criterion(outputs, targets.to(torch.float32))
        return criterion(outputs, torch.squeeze(targets, 1).long())

    def test(eval_loader: DataLoader, evaluator: medmnist.Evaluator) -> None:
        model.eval()
        total_loss, y_score = [], torch.tensor([])
        with torch.no_grad():
            for inputs, targets in eval_loader:
                outputs = model(inputs)
                total_loss.append(loss_of(outputs, targets).item())
                outputs = torch.sigmoid(outputs) if multilabel else torch.softmax(outputs, dim=1)
                y_score = torch.cat((y_score, outputs), 0)
        evaluator.evaluate(y_score.numpy())

    def epoch() -> tuple[float, float, float | None]:
        start = time.perf_counter()
        model.train()
        total_loss, images = [], 0
        batches = itertools.islice(loader, args.max_batches) if args.max_batches else loader
        for inputs, targets in batches:
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = loss_of(outputs, targets)
            total_loss.append(loss.item())  # the official records each step's loss (a sync on a GPU)
            loss.backward()
            optimizer.step()
            images += len(inputs)
        seconds = time.perf_counter() - start
        for eval_loader, evaluator in evals:
            test(eval_loader, evaluator)
        scheduler.step()
        return seconds, images / seconds, time.perf_counter() - start if args.whole else None

    return Side(epoch)


def capped(split: tuple, n: int) -> tuple:
    """The first `n` images and labels of a split (all of them for n = 0)."""
    return tuple(a[:n] for a in split) if n else split


def medkd_student(base: nn.Module, compiled: bool, rgb: bool) -> tuple[nn.Module, View, str]:
    """The student as `distill` trains it (`place_student`, `student_view`'s View), and a line saying so."""
    model = copy.deepcopy(base)
    model = place_student(model, torch.device("cpu"), compile=compiled)
    gray = takes_one_channel(base) and not rgb
    view = View(28, channels_last=True, gray=gray, rounded=True)
    how = "medkd.train.place_student(model, cpu" + (", compile=True)" if compiled else ")")
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    layout = "channels_last" if conv.weight.is_contiguous(memory_format=torch.channels_last) else "contiguous"
    return model, view, f"{how}, {view}, first conv weight {layout}"


def medkd_side(
    base: nn.Module, train: DeviceSplit, val: DeviceSplit, args: argparse.Namespace, compiled: bool
) -> tuple[Side, str]:
    """`train_epochs` as distill runs it for the supervised baseline; one `next` is one epoch."""
    model, view, how = medkd_student(base, compiled, args.rgb)
    loop = LoopState.create(model, LR, EPOCHS, None, SEED)
    epochs = train_epochs(
        model, train, val, view, loop, teacher_logits=None, alpha=1.0, temperature=1.0,
        batch_size=args.batch_size,
    )  # fmt: skip

    def epoch() -> tuple[float, float, float | None]:
        start = time.perf_counter()
        stats = next(epochs)
        return stats.seconds, stats.images_per_second, time.perf_counter() - start

    return Side(epoch), how


def top_ops(prof: profile) -> str:
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


class Recorder:
    """A CPU profile of training steps `2 … last` (the first, which makes Adam's state and the first
    allocations, is left out): `step()` is called after every step."""

    def __init__(self, last: int):
        self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
        self.last, self.steps = last, 0

    def step(self) -> None:
        self.steps += 1
        if self.steps == 1:
            self.prof.start()
        if self.steps == self.last:
            self.prof.stop()

    @property
    def done(self) -> bool:
        return self.steps >= self.last

    @property
    def recorded(self) -> int:
        return self.last - 1


def profile_official(base: nn.Module, flag: str, args: argparse.Namespace) -> Recorder:
    task = dataset_info(flag)["task"]
    multilabel = is_multilabel(task)
    model = copy.deepcopy(base).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    criterion = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    loader = DataLoader(official_dataset(flag, "train"), batch_size=args.batch_size, shuffle=True)
    recorder = Recorder(min(PROFILE_STEPS + 1, len(loader)))
    for inputs, targets in loader:
        optimizer.zero_grad()
        outputs = model(inputs)
        targets = targets.to(torch.float32) if multilabel else torch.squeeze(targets, 1).long()
        loss = criterion(outputs, targets)
        loss.item()
        loss.backward()
        optimizer.step()
        recorder.step()
        if recorder.done:
            break
    return recorder


def profile_medkd(base: nn.Module, arrays: dict, task: str, args: argparse.Namespace) -> Recorder:
    model, view, _ = medkd_student(base, False, args.rgb)
    train = DeviceSplit(*capped(arrays["train"], (PROFILE_STEPS + 1) * args.batch_size), task, "cpu")
    val = DeviceSplit(*arrays["val"], task, "cpu")
    loop = LoopState.create(model, LR, EPOCHS, None, SEED)
    # Stopped at the epoch's last step, so the val pass after it is not recorded.
    recorder = Recorder(len(batch_bounds(len(train), args.batch_size, merge_single=True)))
    epochs = train_epochs(
        model, train, val, view, loop, teacher_logits=None, alpha=1.0, temperature=1.0,
        batch_size=args.batch_size, on_step=recorder.step,
    )  # fmt: skip
    next(epochs)
    return recorder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="breastmnist, batch 32, 1 round, 8 batches an epoch (< 1 min)",
    )
    parser.add_argument("--dataset", default="pneumoniamnist", help="breastmnist or pneumoniamnist (28 px)")
    parser.add_argument("--batch-size", type=int, default=128, help="the official script's default")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per variant before")
    parser.add_argument("--max-batches", type=int, default=0, help="cap each epoch at N batches (0: whole)")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch intra-op threads for both sides (default 2; 0 keeps torch's default)",
    )
    parser.add_argument(
        "--whole",
        action="store_true",
        help="also time whole epochs with evaluation (over whole splits, even with --max-batches)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="add medkd_compiled (torch.compile; minutes on a CPU)"
    )
    parser.add_argument("--profile", action="store_true", help=f"top ops of {PROFILE_STEPS} steps per side")
    parser.add_argument(
        "--rgb", action="store_true", help="medkd's view replicates grayscale to 3 channels (no View.gray)"
    )
    args = parser.parse_args()
    if args.quick:
        args.dataset, args.batch_size, args.rounds, args.warmup = "breastmnist", 32, 1, 1
        args.max_batches = args.max_batches or 8
    set_threads(args.threads)

    torch.manual_seed(SEED)
    info = dataset_info(args.dataset)
    task = info["task"]
    n_out = num_outputs(task, len(info["label"]))
    base = build_student("resnet18", n_out, 28)
    arrays = load_arrays(args.dataset, 28, data_dir())
    # A capped epoch is the first max_batches * batch images, so len(train) is what one epoch trains.
    train = DeviceSplit(*capped(arrays["train"], args.max_batches * args.batch_size), task, "cpu")
    val = DeviceSplit(*arrays["val"], task, "cpu")

    sides = {"official": official_side(base, args.dataset, args)}
    sides["medkd"], how = medkd_side(base, train, val, args, compiled=False)
    print(f"# medkd: {how}")
    if args.compile:
        sides["medkd_compiled"], how = medkd_side(base, train, val, args, compiled=True)
        print(f"# medkd_compiled: {how}")
    interleave(sides, rounds=args.rounds, warmup=args.warmup)

    if args.profile:
        for name, recorder in (
            ("official", profile_official(base, args.dataset, args)),
            ("medkd", profile_medkd(base, arrays, task, args)),
        ):
            print(f"\nprofile {name}: {recorder.recorded} training steps, top 15 ops by self CPU time")
            print(top_ops(recorder.prof))

    rates = {name: side.rates[args.warmup :] for name, side in sides.items()}
    speed = {name: median(r) for name, r in rates.items()}
    print_table(
        f"bench_train: resnet18 at 28 px, {args.dataset} train ({len(train)} images an epoch), batch "
        f"{args.batch_size}, CPU, {args.threads or torch.get_num_threads()} thread(s); training img/s, "
        f"median of {args.rounds} interleaved epochs after {args.warmup} warm-up",
        ["variant", "img/s", "range", "x official"],
        [[name, speed[name], spread(r), speed[name] / speed["official"]] for name, r in rates.items()],
    )
    if args.whole:
        whole = {name: side.whole[args.warmup :] for name, side in sides.items()}
        wall = {name: median(w) for name, w in whole.items()}
        evaluated = {"official": "train, val, test"}
        print_table(
            "whole epochs: training + the evaluation each side does every epoch; wall seconds, median",
            ["variant", "evaluates", "s/epoch", "range", "official / variant"],
            [
                [name, evaluated.get(name, "val"), wall[name], spread(w), wall["official"] / wall[name]]
                for name, w in whole.items()
            ],
        )
        print(f"official / medkd whole-epoch seconds = {wall['official'] / wall['medkd']:.3f}")
    if args.compile:
        compiled = speed["medkd_compiled"] / speed["official"]
        print(f"medkd_compiled / official training img/s = {compiled:.3f}")
    ratio = speed["medkd"] / speed["official"]
    ratio_line("medkd / official training img/s", ratio, f">= {GOAL}", ratio >= GOAL)


if __name__ == "__main__":
    main()
