"""Bad invocations of train_at.py, eval_autoattack.py and export_robustbench.py: exit code 2, one line naming the bad value, no
traceback, and nothing on disk changed (every file and folder under the test's folder is hashed).

Most cases call ``main(argv)`` in this process (fast); two run the scripts as the user would, to show
that no traceback reaches the terminal.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pytest
import torch

import eval_autoattack
import export_robustbench
import train_at
from training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
NEW = ["--preset", "quickstart", "--epochs", "1"]  # a valid start; each case adds one mistake


@dataclass(frozen=True)
class Paths:
    tmp: Path
    run: Path  # a run folder with config.yaml and checkpoints (copied per case)
    new: Path  # a run folder that does not exist yet (must not be created)
    marker: Path  # created if a checkpoint manages to run code

    def out(self, *argv: str) -> list[str]:
        return [*NEW, *argv, "--out", str(self.new)]


Text = Union[str, Callable[[Paths], str]]


@dataclass(frozen=True)
class Case:
    id: str
    tool: str  # "train", "eval" or "export"
    argv: Callable[[Paths], list[str]]
    expect: Text  # the offending value, as the one-line message must name it
    setup: Optional[Callable[[Paths], None]] = None
    env: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------- setups
class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_file(p: Paths) -> None:
    torch.save({"format": "gkl-at/1", "model": {}, "hook": RunsCode(p.marker)}, p.tmp / "evil.pt")


def _evil_last(p: Paths) -> None:
    state = torch.load(p.run / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**state, "hook": RunsCode(p.marker)}, p.run / "checkpoints" / "last.pt")


def _truncated_file(p: Paths) -> None:
    data = (p.run / "checkpoints" / "last.pt").read_bytes()
    (p.tmp / "cut.pt").write_bytes(data[: len(data) // 3])


def _truncate_every_checkpoint(p: Paths) -> None:
    for f in (p.run / "checkpoints").glob("*.pt"):
        data = f.read_bytes()
        f.write_bytes(data[:500])


def _partial_cifar(p: Paths) -> None:
    folder = p.tmp / "partial" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "data_batch_1").write_bytes(b"")


def _generated(p: Paths) -> dict:
    from data.convert_generated import convert

    rng = np.random.default_rng(0)
    np.savez(p.tmp / "gen.npz", image=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             label=np.arange(8, dtype=np.int64) % 10)
    index = convert([p.tmp / "gen.npz"], p.tmp / "gen", num_classes=10, progress=False)
    return index["shards"][0]


def _damaged_generated(p: Paths) -> None:
    np.save(p.tmp / "gen" / _generated(p)["labels"], np.zeros(8, dtype=np.float32))


def _generated_labels(labels: list[int]) -> Callable[[Paths], None]:
    return lambda p: np.save(p.tmp / "gen" / _generated(p)["labels"], np.array(labels, dtype=np.int64))


def _generated_flipped_pixel(p: Paths) -> None:
    images = np.load(p.tmp / "gen" / _generated(p)["images"])
    images[3, 5, 7, 1] ^= 1
    np.save(p.tmp / "gen" / "images_00000.npy", images)


def _every_checkpoint(make: Callable[[Path], None]) -> Callable[[Paths], None]:
    return lambda p: [make(f) for f in (p.run / "checkpoints").glob("*.pt")]


def _random_bytes(f: Path) -> None:
    f.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())


def _without_model(f: Path) -> None:
    state = torch.load(f, weights_only=True)
    del state["model"]
    torch.save(state, f)


def _file(name: str, data: bytes = b"", make: Optional[Callable[[Path], None]] = None) -> Callable[[Paths], None]:
    def setup(p: Paths) -> None:
        (p.tmp / name).write_bytes(data)
        if make:
            make(p.tmp / name)
    return setup


def _project_dict_without_model(f: Path) -> None:
    torch.save({"format": "gkl-at/1", "arch": "small-cnn", "num_classes": 10, "dataset": "digits"}, f)


def _write(name: str, text: str) -> Callable[[Paths], None]:
    return lambda p: (p.tmp / name).write_text(text)


def _mkdir(name: str) -> Callable[[Paths], None]:
    return lambda p: (p.tmp / name).mkdir()


def _corrupted(labels: int = 20, names: tuple[str, ...] = ("fog",)) -> Callable[[Paths], None]:
    """A CIFAR-10-C folder under tmp/cc holding ``names`` (4 images per severity) and ``labels`` labels."""
    def setup(p: Paths) -> None:
        from corruptions_fixture import write_fake_cifar_c

        folder = write_fake_cifar_c(p.tmp / "cc", names, 4)
        np.save(folder / "labels.npy", np.zeros(labels, dtype=np.uint8))
    return setup


def _saved_eval(eps: list[float], chunk_size: int) -> Callable[[Paths], None]:
    """An earlier evaluation's cache in the run's default --out, as the store leaves it."""
    def setup(p: Paths) -> None:
        from evaluation.store import ResultStore

        ResultStore(p.run / "eval" / "cache", {}).write_manifest(eps, chunk_size)
    return setup


def _bad_run_config(p: Paths) -> None:
    (p.run / "config.yaml").write_text("arch: [small-cnn\nepochs: 3\n")


BINARY = bytes(range(128, 256)) * 8  # no UTF-8 text
HELD: list[int] = []  # lock descriptors a case's setup holds; closed after each test
HOLDER_PID = 4242  # the PID a held lock file names


def _held_lock(folder: Callable[[Paths], Path], shared: bool = False) -> Callable[[Paths], None]:
    """Hold ``folder/.lock`` from another open file, as a running trainer or evaluation (or an export) would."""
    def setup(p: Paths) -> None:
        import fcntl

        target = folder(p)
        target.mkdir(parents=True, exist_ok=True)
        fd = os.open(target / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        HELD.append(fd)
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        if not shared:
            os.write(fd, f"{HOLDER_PID}\n".encode())
    return setup


def _lock_link(folder: Callable[[Paths], Path]) -> Callable[[Paths], None]:
    """``folder/.lock`` planted as a link to a file outside (which must stay untouched)."""
    def setup(p: Paths) -> None:
        (p.tmp / "victim.txt").write_text("precious\n")
        folder(p).mkdir(parents=True, exist_ok=True)
        (folder(p) / ".lock").symlink_to(p.tmp / "victim.txt")
    return setup


def _run_config(data: bytes) -> Callable[[Paths], None]:
    return lambda p: (p.run / "config.yaml").write_bytes(data)


def _eval_config(text: str) -> Callable[[Paths], None]:
    def setup(p: Paths) -> None:
        (p.run / "eval").mkdir()
        (p.run / "eval" / "config.yaml").write_text(text)
    return setup


# --------------------------------------------------------------------------------------- the table
TRAIN_CASES = [
    Case("unknown preset", "train", lambda p: ["--preset", "quickstart-xl", "--out", str(p.new)], "quickstart-xl"),
    Case("unknown arch", "train", lambda p: p.out("--arch", "resnet9000"), "resnet9000"),
    Case("unknown loss", "train", lambda p: p.out("--loss", "kl3"), "kl3"),
    Case("unknown dataset", "train", lambda p: p.out("--dataset", "imagenet"), "imagenet"),
    Case("unknown norm", "train", lambda p: p.out("--norm", "L3"), "L3"),
    Case("unknown flag", "train", lambda p: p.out("--epochz", "3"), "--epochz"),
    Case("eps divides by zero", "train", lambda p: p.out("--eps", "8/0"), "8/0"),
    Case("eps not a number", "train", lambda p: p.out("--eps", "eight"), "eight"),
    Case("eps above 1", "train", lambda p: p.out("--eps", "300"), "300"),
    Case("step size not a number", "train", lambda p: p.out("--attack-step-size", "2/x"), "2/x"),
    Case("negative epochs", "train", lambda p: p.out("--epochs", "-3"), "-3"),
    Case("fractional epochs", "train", lambda p: p.out("--epochs", "2.5"), "2.5"),
    Case("infinite lr", "train", lambda p: p.out("--lr", "inf"), "inf"),
    Case("gamma above 1", "train", lambda p: p.out("--gamma", "1.5"), "1.5"),
    Case("momentum 1", "train", lambda p: p.out("--momentum", "1"), "momentum"),
    Case("zero attack steps", "train", lambda p: p.out("--attack-steps", "0"), "--attack-steps"),
    Case("negative keep", "train", lambda p: p.out("--keep-checkpoints", "-1"), "-1"),
    Case("bool not a bool", "train", lambda p: p.out("--download", "maybe"), "maybe"),
    Case("seed not a number", "train", lambda p: p.out("--seed", "abc"), "abc"),
    Case("bad device name", "train", lambda p: p.out("--device", "tpu9"), "tpu9"),
    Case("batch larger than the data", "train", lambda p: p.out("--batch-size", "4096"), "4096"),
    Case("val split eats the data", "train", lambda p: p.out("--val-size", "5000"), "5000"),
    Case("ghost bn does not divide the batch", "train", lambda p: p.out("--ghost-bn", "48"), "48"),
    Case("ghost bn with sync bn", "train", lambda p: p.out("--ghost-bn", "16", "--sync-bn", "true"), "--sync-bn"),
    Case("attack weights both zero", "train", lambda p: p.out("--attack-alpha", "0", "--attack-beta", "0"),
         "--attack-alpha"),
    Case("unknown awp proxy views", "train", lambda p: p.out("--awp-proxy-views", "both"), "both"),
    Case("unknown generated epoch", "train", lambda p: p.out("--generated-epoch", "forever"), "forever"),
    Case("batch vs world size", "train", lambda p: p.out("--batch-size", "64"), "64", env={"WORLD_SIZE": "3"}),
    Case("world size not a number", "train", lambda p: p.out(), "two", env={"WORLD_SIZE": "two"}),
    Case("cifar folder missing", "train", lambda p: p.out("--dataset", "cifar10", "--data-dir", str(p.tmp / "nodata")),
         lambda p: str(p.tmp / "nodata")),
    Case("cifar folder incomplete", "train",
         lambda p: p.out("--dataset", "cifar10", "--data-dir", str(p.tmp / "partial")),
         lambda p: str(p.tmp / "partial"), setup=_partial_cifar),
    Case("generated folder without index", "train", lambda p: p.out("--generated", str(p.tmp / "gen")),
         lambda p: str(p.tmp / "gen"), setup=_mkdir("gen")),
    Case("generated shard of the wrong dtype", "train", lambda p: p.out("--generated", str(p.tmp / "gen")),
         "float32", setup=_damaged_generated),
    Case("config is not YAML", "train", lambda p: p.out("--config", str(p.tmp / "c.yaml")),
         lambda p: str(p.tmp / "c.yaml"), setup=_write("c.yaml", "epochs: [3\n")),
    Case("config is a list", "train", lambda p: p.out("--config", str(p.tmp / "c.yaml")),
         lambda p: str(p.tmp / "c.yaml"), setup=_write("c.yaml", "- epochs\n- 3\n")),
    Case("config has an unknown key", "train", lambda p: p.out("--config", str(p.tmp / "c.yaml")), "epoch_count",
         setup=_write("c.yaml", "epoch_count: 3\n")),
    Case("out is a file", "train", lambda p: [*NEW, "--out", str(p.tmp / "c.yaml")],
         lambda p: str(p.tmp / "c.yaml"), setup=_write("c.yaml", "")),
    Case("out holds a run", "train", lambda p: [*NEW, "--out", str(p.run)], lambda p: str(p.run)),
    Case("out on a read-only file system", "train", lambda p: [*NEW, "--out", "/sys/gkl-at-test-run"],
         "/sys/gkl-at-test-run"),
    Case("resume a missing folder", "train", lambda p: ["--resume", str(p.new)], lambda p: str(p.new)),
    Case("resume changes the config", "train", lambda p: ["--resume", str(p.run), "--epochs", "5"], "--epochs"),
    Case("resume with a preset", "train", lambda p: ["--resume", str(p.run), "--preset", "quickstart"], "--preset"),
    Case("resume a folder with a broken config", "train", lambda p: ["--resume", str(p.run)],
         lambda p: str(p.run / "config.yaml"), setup=_bad_run_config),
    Case("resume with only truncated checkpoints", "train", lambda p: ["--resume", str(p.run)],
         lambda p: str(p.run / "checkpoints"), setup=_truncate_every_checkpoint),
    Case("resume a checkpoint that would run code", "train", lambda p: ["--resume", str(p.run)],
         lambda p: str(p.run / "checkpoints" / "last.pt"), setup=_evil_last),
    Case("negative eps", "train", lambda p: p.out("--eps", "-8/255"), "'-8/255' is outside [0, 1]"),
    Case("negative step size", "train", lambda p: p.out("--attack-budget", "fixed", "--attack-step-size", "-2/255"),
         "-2/255"),
    Case("resume with only random-bytes checkpoints", "train", lambda p: ["--resume", str(p.run)],
         "last.pt is not a checkpoint", setup=_every_checkpoint(_random_bytes)),
    Case("resume a checkpoint without its model", "train", lambda p: ["--resume", str(p.run)], "lacks model",
         setup=_every_checkpoint(_without_model)),
    Case("generated labels outside the classes", "train", lambda p: p.out("--generated", str(p.tmp / "gen")),
         "label 12 at position 2", setup=_generated_labels([0, 1, 12, 3, 4, 5, 6, 7])),
    Case("generated labels unlike the index", "train", lambda p: p.out("--generated", str(p.tmp / "gen")),
         "differ from its index.json (class 0: 2 images", setup=_generated_labels([0, 1, 0, 3, 4, 5, 6, 7])),
    Case("generated shard fails its digest", "train",
         lambda p: p.out("--generated", str(p.tmp / "gen"), "--verify-generated", "--no-progress"),
         lambda p: f"{p.tmp / 'gen' / 'images_00000.npy'} does not match its SHA-256", setup=_generated_flipped_pixel),
    # issue 22: inputs that ended in a traceback, were silently ignored or got a wrong message
    Case("seed beyond the limit", "train", lambda p: p.out("--seed", "99999999999999999999999"),
         "--seed 99999999999999999999999 is above the limit of 4,294,967,295"),
    Case("epochs beyond the limit", "train", lambda p: p.out("--epochs", "10000000"), "above the limit of 100,000"),
    Case("config of binary bytes", "train", lambda p: p.out("--config", str(p.tmp / "c.yaml")),
         lambda p: f"config {p.tmp / 'c.yaml'} is not a text file", setup=_file("c.yaml", BINARY)),
    Case("config with a number as key", "train", lambda p: p.out("--config", str(p.tmp / "c.yaml")),
         "config key 3 is not a name", setup=_write("c.yaml", "3: 4\n")),
    Case("config with a null key", "train", lambda p: p.out("--config", str(p.tmp / "c.yaml")),
         "config key None is not a name", setup=_write("c.yaml", "epochs: 1\nnull: x\n")),
    Case("resume a folder with a random-bytes config", "train", lambda p: ["--resume", str(p.run)],
         lambda p: f"config {p.run / 'config.yaml'} is not a text file", setup=_run_config(BINARY)),
    Case("resume a folder with an empty config", "train", lambda p: ["--resume", str(p.run)],
         lambda p: f"{p.run / 'config.yaml'} is empty", setup=_run_config(b"")),
    Case("resume with overwrite", "train", lambda p: ["--resume", str(p.run), "--overwrite"],
         "--overwrite deletes it"),
    Case("resume into another folder", "train", lambda p: ["--resume", str(p.run), "--out", str(p.new)],
         lambda p: f"drop --out {p.new}"),
    Case("out in /proc", "train", lambda p: [*NEW, "--out", "/proc/1/nope"],
         "cannot write to run folder /proc/1/nope: /proc/1 is a virtual file system"),
    Case("out of a running run", "train", lambda p: [*NEW, "--out", str(p.run)],
         f"is in use by another training run (process {HOLDER_PID} holds", setup=_held_lock(lambda p: p.run)),
    Case("overwrite a running run", "train", lambda p: [*NEW, "--out", str(p.run), "--overwrite"],
         f"is in use by another training run (process {HOLDER_PID} holds", setup=_held_lock(lambda p: p.run)),
    Case("overwrite while the run is evaluated", "train", lambda p: [*NEW, "--out", str(p.run), "--overwrite"],
         lambda p: f"--overwrite {p.run}: {p.run / 'eval'} is in use by an evaluation or export of this run "
                   f"(process {HOLDER_PID} holds", setup=_held_lock(lambda p: p.run / "eval")),
    Case("overwrite while another evaluation folder of the run is in use", "train",
         lambda p: [*NEW, "--out", str(p.run), "--overwrite"], lambda p: f"{p.run / 'eval-l2'} is in use",
         setup=_held_lock(lambda p: p.run / "eval-l2")),
    Case("overwrite while an export reads the run's evaluation", "train",
         lambda p: [*NEW, "--out", str(p.run), "--overwrite"], lambda p: f"{p.run / 'eval'} is in use",
         setup=_held_lock(lambda p: p.run / "eval", shared=True)),
    Case("resume through a planted lock link", "train", lambda p: ["--resume", str(p.run)],
         lambda p: f"{p.run / '.lock'} is a symbolic link, not a lock file", setup=_lock_link(lambda p: p.run)),
]

EVAL_CASES = [
    Case("eval: checkpoint that would run code", "eval", lambda p: [str(p.tmp / "evil.pt")],
         lambda p: str(p.tmp / "evil.pt"), setup=_evil_file),
    Case("eval: truncated checkpoint", "eval", lambda p: [str(p.tmp / "cut.pt")], lambda p: str(p.tmp / "cut.pt"),
         setup=_truncated_file),
    Case("eval: eps not a number", "eval", lambda p: [str(p.run), "--eps", "8", "abc"], "abc"),
    Case("eval: eps divides by zero", "eval", lambda p: [str(p.run), "--eps", "4/0"], "4/0"),
    Case("eval: unknown attack", "eval", lambda p: [str(p.run), "--attacks", "pgd10", "fgsm-9"], "fgsm-9"),
    Case("eval: unknown weights", "eval", lambda p: [str(p.run), "--weights", "best"], "best"),
    Case("eval: unknown checkpoint", "eval", lambda p: [str(p.run), "--checkpoint", "epoch_0099"], "epoch_0099"),
    Case("eval: other arch", "eval", lambda p: [str(p.run), "--arch", "wrn-28-10"], "wrn-28-10"),
    Case("eval: bad device", "eval", lambda p: [str(p.run), "--device", "tpu9"], "tpu9"),
    Case("eval: unknown norm", "eval", lambda p: [str(p.run), "--norm", "L3"], "L3"),
    Case("eval: negative n-ex", "eval", lambda p: [str(p.run), "--n-ex", "-5"], "-5"),
    Case("eval: unknown split", "eval", lambda p: [str(p.run), "--split", "nope"], "nope"),
    Case("eval: unknown norm among several", "eval", lambda p: [str(p.run), "--norm", "Linf", "L3"], "L3"),
    Case("eval: radius of a norm not asked for", "eval", lambda p: [str(p.run), "--eps", "L2:0.5", "--norm", "Linf"],
         "L2:0.5"),
    Case("eval: unprefixed radius with two norms", "eval", lambda p: [str(p.run), "--norm", "Linf", "L2", "--eps",
                                                                       "0.5"], "NORM:RADIUS"),
    Case("eval: L2 radius beyond the image cube", "eval", lambda p: [str(p.run), "--norm", "L2", "--eps", "80"], "80"),
    Case("eval: unknown corruption", "eval", lambda p: [str(p.run), "--attacks", "corruptions", "--corruptions",
                                                        "rain"], "rain"),
    Case("eval: severity 6", "eval", lambda p: [str(p.run), "--attacks", "corruptions", "--severities", "6"], "6"),
    Case("eval: severities without corruptions", "eval", lambda p: [str(p.run), "--severities", "1"],
         "--severities"),
    Case("eval: corruptions of digits", "eval", lambda p: [str(p.run), "--attacks", "corruptions"], "digits"),
    Case("eval: corruptions folder missing", "eval", lambda p: [str(p.run), "--dataset", "cifar10", "--data-dir",
                                                                str(p.tmp / "cc"), "--attacks", "corruptions"],
         lambda p: str(p.tmp / "cc" / "CIFAR-10-C")),
    Case("eval: corruptions folder missing a file", "eval",
         lambda p: [str(p.run), "--dataset", "cifar10", "--data-dir", str(p.tmp / "cc"), "--attacks", "corruptions",
                    "--corruptions", "fog", "snow"], "snow.npy", setup=_corrupted()),
    Case("eval: corruption labels of another length", "eval",
         lambda p: [str(p.run), "--dataset", "cifar10", "--data-dir", str(p.tmp / "cc"), "--attacks", "corruptions",
                    "--corruptions", "fog"], "labels.npy 25 labels", setup=_corrupted(labels=25)),
    Case("eval: folder without checkpoints", "eval", lambda p: [str(p.tmp / "empty")], lambda p: str(p.tmp / "empty"),
         setup=_mkdir("empty")),
    Case("eval: random bytes as checkpoint", "eval", lambda p: [str(p.tmp / "noise.pt")], "noise.pt is not a checkpoint",
         setup=_file("noise.pt", make=_random_bytes)),
    Case("eval: YAML file as checkpoint", "eval", lambda p: [str(p.tmp / "c.yaml")], "c.yaml is not a checkpoint",
         setup=_write("c.yaml", "arch: small-cnn\nepochs: 3\n")),
    Case("eval: empty checkpoint", "eval", lambda p: [str(p.tmp / "e.pt")], "e.pt is empty, not a checkpoint",
         setup=_file("e.pt")),
    Case("eval: project dict without model", "eval", lambda p: [str(p.tmp / "m.pt")], "has no valid model",
         setup=_file("m.pt", make=_project_dict_without_model)),
    Case("eval: negative eps", "eval", lambda p: [str(p.run), "--eps", "4", "-8/255"], "'-8/255' is outside [0, 1]"),
    Case("export: negative eps", "export", lambda p: [str(p.run), "--eps", "-8/255"], "'-8/255' is outside [0, 1]"),
    Case("export: project dict without model", "export", lambda p: [str(p.tmp / "m.pt"), "--allow-unevaluated"],
         "has no valid model", setup=_file("m.pt", make=_project_dict_without_model)),
    Case("eval: world size not a number", "eval", lambda p: [str(p.run)], "two", env={"WORLD_SIZE": "two"}),
    Case("eval: chunk size 0", "eval", lambda p: [str(p.run), "--chunk-size", "0"], "--chunk-size must be >= 1"),
    Case("eval: resume with another chunk size", "eval", lambda p: [str(p.run), "--resume", "--chunk-size", "8"],
         "was made with --chunk-size 4", setup=_saved_eval([8 / 255], 4)),
    Case("eval: resume with other eps", "eval", lambda p: [str(p.run), "--resume", "--eps", "8", "--chunk-size", "4"],
         "made for --eps 8/255 16/255", setup=_saved_eval([8 / 255, 16 / 255], 4)),
    # issue 22
    Case("eval: attack steps beyond the limit", "eval", lambda p: [str(p.run), "--attacks", "pgd99999999999"],
         "--attacks pgd99999999999: 99999999999 steps is above the limit of 10,000"),
    Case("eval: seed beyond the limit", "eval", lambda p: [str(p.run), "--seed", "99999999999999999999999"],
         "--seed 99999999999999999999999 is above the limit"),
    Case("eval: n-ex beyond the limit", "eval", lambda p: [str(p.run), "--n-ex", "10000000000000"],
         "--n-ex 10000000000000 is above the limit"),
    Case("eval: batch beyond the limit", "eval", lambda p: [str(p.run), "--batch-size", "1000000000000"],
         "--batch-size 1000000000000 is above the limit"),
    Case("eval: into a folder another evaluation writes", "eval", lambda p: [str(p.run), "--attacks", "clean"],
         f"is in use by another evaluation or an export reading it (process {HOLDER_PID} holds",
         setup=_held_lock(lambda p: p.run / "eval")),
    Case("eval: into a folder an export reads", "eval", lambda p: [str(p.run), "--attacks", "clean"],
         "is in use by another evaluation or an export reading it (another process holds",
         setup=_held_lock(lambda p: p.run / "eval", shared=True)),
    Case("eval: through a planted lock link", "eval", lambda p: [str(p.run), "--attacks", "clean"],
         lambda p: f"{p.run / 'eval' / '.lock'} is a symbolic link", setup=_lock_link(lambda p: p.run / "eval")),
    Case("eval: resume with a broken saved config", "eval", lambda p: [str(p.run), "--resume"],
         lambda p: f"cannot read {p.run / 'eval' / 'config.yaml'}", setup=_eval_config("attacks: [aa\n")),
    Case("eval: resume with a saved config of unknown keys", "eval", lambda p: [str(p.run), "--resume"],
         "unknown evaluation config key(s) epochs", setup=_eval_config("epochs: 3\n")),
    Case("export: model name ..", "export", lambda p: [str(p.run), "--model-name", ".."],
         "--model-name '..' must start"),
    Case("export: model name .", "export", lambda p: [str(p.run), "--model-name", "."], "--model-name '.' must start"),
    Case("export: model name ...", "export", lambda p: [str(p.run), "--model-name", "..."], "--model-name '...'"),
    Case("export: model name of 300 characters", "export", lambda p: [str(p.run), "--model-name", "A" * 300],
         "at most 100 characters"),
    Case("export: verify-n beyond the limit", "export", lambda p: [str(p.run), "--verify-n", "1000000000"],
         "--verify-n 1000000000 is above the limit of 4,096"),
    Case("export: while an evaluation writes the report", "export", lambda p: [str(p.run), "--allow-unevaluated"],
         lambda p: f"{p.run / 'eval'} is being written by an evaluation (process {HOLDER_PID} holds",
         setup=_held_lock(lambda p: p.run / "eval")),
]

MAINS = {"train": train_at.main, "eval": eval_autoattack.main, "export": export_robustbench.main}


# --------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def run_template(tmp_path_factory) -> Path:
    """A run folder as train_at.py leaves it after its first epoch checkpoint (no training needed)."""
    from training.config import TrainConfig, load_preset, save_config

    run = tmp_path_factory.mktemp("template") / "run"
    cfg = TrainConfig.from_dict({**load_preset("quickstart"), "preset": "quickstart", "epochs": 1}).validate()
    trainer = Trainer(cfg, run, progress=False)
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    trainer.save(epoch_end=True)
    return run


@pytest.fixture
def paths(run_template, tmp_path) -> Paths:
    import shutil

    run = Path(shutil.copytree(run_template, tmp_path / "run"))
    yield Paths(tmp=tmp_path, run=run, new=tmp_path / "new-run", marker=tmp_path / "code_ran")
    while HELD:
        os.close(HELD.pop())


def _tree(folder: Path) -> dict[str, str]:
    """Every file's SHA-256 and every folder's name under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _never(*args, **kwargs):
    raise AssertionError("a bad invocation got as far as training or evaluating")


# --------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", TRAIN_CASES + EVAL_CASES, ids=lambda c: c.id)
def test_bad_invocation_exits_2_with_one_line_and_changes_nothing(case, paths, monkeypatch, capsys):
    import evaluation

    if case.setup:
        case.setup(paths)
    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(Trainer, "fit", _never)
    monkeypatch.setattr(evaluation, "run_suite", _never)
    expect = case.expect(paths) if callable(case.expect) else case.expect
    before = _tree(paths.tmp)
    code = MAINS[case.tool](case.argv(paths))
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, (code, out.err)
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert expect in lines[0], lines[0]
    assert "Traceback" not in out.err + out.out
    assert _tree(paths.tmp) == before
    assert not paths.marker.exists()


def test_the_table_is_big_enough():
    assert len(TRAIN_CASES) >= 60 and len(EVAL_CASES) >= 50
    assert len({c.id for c in TRAIN_CASES + EVAL_CASES}) == len(TRAIN_CASES) + len(EVAL_CASES)


def test_cuda_without_a_gpu_is_one_line(paths, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(Trainer, "fit", _never)
    before = _tree(paths.tmp)
    assert train_at.main(paths.out("--device", "cuda")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--device cuda" in err and "no GPU" in err
    assert _tree(paths.tmp) == before


def test_unwritable_run_folder_is_found_before_training(paths, monkeypatch, capsys):
    from checkpoints import run_folder

    real_open = os.open

    def denied(path, *args, **kwargs):
        if run_folder.PROBE_PREFIX in str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(run_folder.os, "open", denied)  # root ignores chmod, so fake the refusal
    monkeypatch.setattr(Trainer, "fit", _never)
    before = _tree(paths.tmp)
    assert train_at.main(["--resume", str(paths.run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write to run folder {paths.run}: Permission denied (free some space, fix its " \
                  "permissions or choose another --out)"
    assert _tree(paths.tmp) == before


def test_too_little_disk_space_is_found_before_training(paths, monkeypatch, capsys):
    import shutil

    import checkpoints.io as io_module

    usage = shutil.disk_usage(paths.tmp)
    monkeypatch.setattr(io_module.shutil, "disk_usage", lambda p: usage._replace(free=300_000))
    monkeypatch.setattr(Trainer, "fit", _never)
    before = _tree(paths.tmp)
    assert train_at.main(paths.out()) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "0.3 MiB free" in err and str(paths.new) in err, err
    assert _tree(paths.tmp) == before


@pytest.mark.parametrize("script,argv,expect", [
    ("train_at.py", ["--preset", "quickstart", "--batch-size", "4096"], "--batch-size 4096"),
    ("eval_autoattack.py", ["RUN", "--attacks", "fgsm-9"], "fgsm-9"),
])
def test_no_traceback_reaches_the_terminal(script, argv, expect, paths):
    argv = [str(paths.run) if a == "RUN" else a for a in argv]
    if script == "train_at.py":
        argv += ["--out", str(paths.new)]
    before = _tree(paths.tmp)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=paths.tmp, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert expect in proc.stderr
    assert _tree(paths.tmp) == before
