"""Checkpoints: atomic writes, clear errors for damaged files, exact resume after SIGKILL."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fastvae import checkpoint as ckpt
from fastvae import models
from fastvae.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from fastvae.trainer import TIMING_KEYS


def make_state(model=None) -> dict:
    model = model or models.MLPVAE(hidden=(16,), latent=3)
    return {
        "format": ckpt.FORMAT,
        "version": ckpt.VERSION,
        "model": model.state_dict(),
        "optimizer": {},
        "rng": {"torch": torch.get_rng_state(), "cuda": None, "noise": torch.Generator().get_state()},
        "epoch": 3,
        "step": 42,
        "history": [{"epoch": 1, "val_loss": 1.5, "val_kl": None}],
        "config": {"model": model.config(), "trainer": {"lr": 1e-3, "grad_clip": None}, "meta": {}},
    }


def test_round_trip_weights_only(tmp_path):
    state = make_state()
    path = save_checkpoint(tmp_path / "sub" / "checkpoint.pt", state)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temp files
    plain = torch.load(path, weights_only=True)
    assert plain["epoch"] == 3 and plain["history"] == state["history"]
    loaded = load_checkpoint(tmp_path / "sub")  # a run directory works too
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())


def test_load_model_rebuilds_the_architecture(tmp_path):
    torch.manual_seed(3)
    model = models.ConvVAE(latent=2, hidden=(4, 8, 16))
    save_checkpoint(tmp_path / "checkpoint.pt", make_state(model))
    rebuilt = load_model(tmp_path)
    assert isinstance(rebuilt, models.ConvVAE) and not rebuilt.training
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), rebuilt.state_dict().values(), strict=True)
    )


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, make_state())
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, make_state())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "zeroed-header"])
def test_damaged_checkpoint_names_the_file(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, make_state())
    raw = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(raw)))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\0" * 64 + raw[64:])
    expected = "truncated or corrupt" if damage in ("truncated", "empty") else "not a torch zip archive"
    with pytest.raises(CheckpointError, match=expected) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(CheckpointError, match=str(path)):
        load_model(tmp_path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint file not found: .*nope\.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint in directory"):
        load_checkpoint(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fastvae checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save({"format": ckpt.FORMAT, "obj": Path("x")}, tmp_path / "pickled.pt")  # needs a pickled class
    with pytest.raises(
        CheckpointError, match=r"holds pickled Python objects \(pathlib\.\w*Path\).*weights_only"
    ):
        load_checkpoint(tmp_path / "pickled.pt")


TRAIN_SCRIPT = textwrap.dedent(
    """
    import sys
    import time
    import torch
    from fastvae import data, models
    from fastvae.trainer import Trainer

    out, epochs, slow = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "slow"
    if slow:  # stretch each epoch (after its training steps) so that the kill lands mid-run
        evaluate = Trainer._evaluate
        Trainer._evaluate = lambda self, x: (time.sleep(0.4), evaluate(self, x))[1]
    x, y = data.load_mnist("train")
    vx, vy = data.load_mnist("test")
    torch.manual_seed(0)
    model = models.MLPVAE(hidden=(32,), latent=4)
    trainer = Trainer(model, batch_size=64, device="cpu", seed=5, progress=False)
    trainer.fit((x[:256], y[:256]), epochs, val=(vx[:128], vy[:128]), out=out, plots=False)
    """
)


def _metrics(directory: Path) -> list[dict]:
    lines = (directory / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


def test_sigkill_and_resume_matches_an_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    epochs = 6
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    run = lambda out, mode: subprocess.Popen(
        [sys.executable, str(script), str(out), str(epochs), mode], env=env
    )  # noqa: E731
    uninterrupted, victim = run(full, "fast"), run(killed, "slow")
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoint.pt").exists():
            assert victim.poll() is None, "the run ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.005)
        time.sleep(0.6)  # inside epoch 2 or 3: after some optimizer steps, before the next checkpoint
        assert victim.poll() is None, "the run finished before it could be killed"
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    done = load_checkpoint(killed)["epoch"]
    assert 1 <= done < epochs
    assert uninterrupted.wait(timeout=300) == 0
    resumed = run(killed, "fast")
    assert resumed.wait(timeout=300) == 0
    assert len(_metrics(full)) == epochs
    assert _metrics(killed) == _metrics(full)
    a, b = load_checkpoint(full), load_checkpoint(killed)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == epochs


# ---------------------------------------------------------------------- untrusted checkpoints (issue 12)

RESUME_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from fastvae import data, models
    from fastvae.checkpoint import CheckpointError
    from fastvae.trainer import Trainer

    out = sys.argv[1]
    x = data.load_mnist("train")[0][:64]
    make = lambda: Trainer(models.MLPVAE(), batch_size=32, device="cpu", progress=False)
    make().fit(x, 1, out=out, plots=False)
    state = torch.load(out + "/checkpoint.pt", weights_only=True)
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(2, 2)  # fused Adam would write out of bounds
    torch.save(state, out + "/checkpoint.pt")
    try:
        make().fit(x, 2, out=out, plots=False)
    except CheckpointError as e:
        print("REFUSED", e)
    """
)


def test_wrong_shaped_adam_state_is_refused_before_it_corrupts_the_heap(tmp_path):
    # In a subprocess: before the check, resuming this file died with SIGSEGV / "munmap_chunk(): invalid
    # pointer" inside the fused Adam step, which would take pytest down with it.
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("REFUSED")]
    assert (
        "optimizer state[0].exp_avg has shape [2, 2], expected [400, 784] like parameter 0 (encoder.0.weight)"
        in line
    )
    assert str(tmp_path / "run" / "checkpoint.pt") in line


@pytest.fixture(scope="module")
def trained_state():
    """A tiny trainer's state after 2 optimizer steps (with Adam moments), and a fresh-trainer factory."""
    from fastvae.trainer import Trainer

    x = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.uint8)
    make = lambda: Trainer(  # noqa: E731
        models.MLPVAE(in_shape=(1, 4, 4), hidden=(6,), latent=2), batch_size=8, device="cpu", progress=False
    )
    trainer = make()
    trainer.fit(x, 1)
    return trainer.state_dict(), make


def _tampered(state: dict, edit) -> dict:
    import copy

    state = copy.deepcopy(state)
    edit(state)
    return state


def _set(path: tuple, value):
    def edit(state):
        node = state
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return edit


# (edit, expected message) -- each would crash, corrupt or traceback without the checks
TAMPERED = {
    "adam-dtype": (
        _set(("optimizer", "state", 2, "exp_avg_sq"), torch.zeros(2, 6, dtype=torch.float64)),
        r"optimizer state\[2\]\.exp_avg_sq has dtype torch\.float64, expected torch\.float32 "
        r"like parameter 2 \(fc_mu\.weight\)",
    ),
    "adam-meta": (
        _set(("optimizer", "state", 1, "exp_avg"), torch.zeros(6, device="meta")),
        r"optimizer state\[1\]\.exp_avg is on device meta, expected cpu or cuda",
    ),
    "adam-missing-key": (
        lambda s: s["optimizer"]["state"][0].pop("exp_avg_sq"),
        r"optimizer state\[0\] of parameter 0 \(encoder\.0\.weight\) has keys \['exp_avg', 'step'\]",
    ),
    "adam-step-shape": (
        _set(("optimizer", "state", 0, "step"), torch.zeros(3)),
        r"optimizer state\[0\]\.step is \[0\.0, 0\.0, 0\.0\], expected one integer >= 0",
    ),
    "adam-step-ahead": (
        _set(("optimizer", "state", 0, "step"), torch.tensor(99.0)),
        r"optimizer state\[0\]\.step is 99\.0, expected one integer >= 0 <= 2 \(the checkpoint's step\)",
    ),
    "adam-unknown-param": (
        _set(("optimizer", "state", 77), {}),
        r"optimizer state\[77\] belongs to no parameter",
    ),
    "group-count": (
        lambda s: s["optimizer"]["param_groups"].append(dict(s["optimizer"]["param_groups"][0])),
        r"the optimizer state has 2 param groups, expected 1",
    ),
    "group-size": (
        lambda s: s["optimizer"]["param_groups"][0]["params"].pop(),
        r"optimizer param_groups\[0\] has 9 parameters, expected 10",
    ),
    "group-lr": (
        _set(("optimizer", "param_groups", 0, "lr"), "0.001"),
        r"optimizer param_groups\[0\]\.lr is '0\.001', expected a finite number > 0",
    ),
    "weight-shape": (
        _set(("model", "fc_mu.weight"), torch.zeros(3, 6)),
        r"model tensor fc_mu\.weight has shape \[3, 6\] in the checkpoint, but the model .* "
        r"expects shape \[2, 6\]",
    ),
    "weight-missing": (
        lambda s: s["model"].pop("decoder.2.bias"),
        r"the weights do not fit the model .*missing tensors \['decoder\.2\.bias'\]",
    ),
    "rng-size": (
        _set(("rng", "torch"), torch.zeros(10, dtype=torch.uint8)),
        r"rng\['torch'\] has shape \[10\], expected \[5056\]",
    ),
    "rng-dtype": (
        _set(("rng", "noise"), torch.zeros(5056)),
        r"rng\['noise'\] is dtype torch\.float32 on cpu, expected a uint8 CPU tensor",
    ),
    "rng-content": (
        _set(("rng", "noise"), torch.zeros(5056, dtype=torch.uint8)),
        r"rng\['noise'\] is not a valid generator state: RuntimeError: Invalid mt19937 state",
    ),
    "epoch-type": (_set(("epoch",), "1"), r"'epoch' is '1', expected an integer >= 0"),
    "history-length": (
        lambda s: s["history"].append({}),
        r"'history' has 2 records, expected one per completed epoch \(1\)",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_state_is_refused_in_one_line_before_anything_loads(trained_state, case):
    state, make = trained_state
    edit, pattern = TAMPERED[case]
    trainer = make()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rng_before = trainer._noise.get_state()
    with pytest.raises(CheckpointError, match=pattern) as info:
        trainer.load_state_dict(_tampered(state, edit), source="checkpoint file X")
    message = str(info.value)
    assert message.startswith("checkpoint file X: ") and "\n" not in message
    # validated before anything was applied: the trainer is untouched
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert torch.equal(trainer._noise.get_state(), rng_before)
    assert (trainer.epoch, trainer.step, trainer.optimizer.state_dict()["state"]) == (0, 0, {})


def test_untampered_state_still_loads(trained_state):
    state, make = trained_state
    trainer = make()
    trainer.load_state_dict(state)
    assert (trainer.epoch, trainer.step) == (1, 2)
    assert torch.equal(
        trainer.optimizer.state_dict()["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"]
    )


def test_load_model_names_the_mismatched_tensor_and_both_shapes(tmp_path):
    # a config whose latent disagrees with the weights: `fastvae sample` used to stop at "Error(s) in loading"
    state = make_state(models.MLPVAE(hidden=(16,), latent=3))
    state["config"]["model"]["latent"] = 5
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path)
    assert "model tensor fc_mu.weight has shape [3, 16] in the checkpoint" in str(info.value)
    assert "expects shape [5, 16] (and 4 more tensors differ)" in str(info.value)


def test_huge_model_config_is_refused_before_allocating(tmp_path):
    state = make_state()
    state["config"]["model"]["hidden"] = [400000000]  # 6.3e11 parameters: 2.5 TB
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"6\.32e\+11 parameters .*MAX_PARAMETERS=1e\+09"):
        load_model(tmp_path)
    assert time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------- writing: disk full, modes, one writer


class _FullDisk:
    """A file that accepts ``room`` bytes and then fails like a full disk (OSError ENOSPC)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("room", [0, 1000], ids=["at-once", "mid-archive"])
def test_full_disk_says_so_in_one_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch, room):
    # A real full tmpfs makes torch.save raise RuntimeError("[enforce fail at inline_container.cc:672] .
    # unexpected pos 704 vs 598") chained to OSError(ENOSPC); "mid-archive" reproduces that chain.
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, make_state())
    before = path.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: _FullDisk(real_fdopen(fd, mode), room))
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        save_checkpoint(path, make_state())
    message = str(info.value)
    assert message == (
        f"cannot write checkpoint {path}: no space left on device (No space left on device); "
        "the previous checkpoint.pt is kept"
    )
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_files_are_written_with_the_umask_like_any_other_file(tmp_path):
    old = os.umask(0o022)
    try:
        a = save_checkpoint(tmp_path / "a.pt", make_state())
        os.umask(0o077)
        b = save_checkpoint(tmp_path / "b.pt", make_state())
        c = ckpt.atomic_write(tmp_path / "c.txt", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert [p.stat().st_mode & 0o777 for p in (a, b, c)] == [0o644, 0o600, 0o600]


def test_trainer_writes_metrics_through_the_atomic_writer(tmp_path, monkeypatch):
    from fastvae.trainer import Trainer

    written = []
    real = ckpt.atomic_write

    def spy(path, write, **kw):
        written.append(Path(path).name)
        return real(path, write, **kw)

    monkeypatch.setattr(ckpt, "atomic_write", spy)  # save_checkpoint and write_metrics call it
    x = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    trainer = Trainer(models.MLPVAE(in_shape=(1, 4, 4), hidden=(4,), latent=2), device="cpu", progress=False)
    old = os.umask(0o022)
    try:
        trainer.fit(x, 2, out=tmp_path, plots=False)
    finally:
        os.umask(old)
    assert written == ["metrics.jsonl", "checkpoint.pt", "metrics.jsonl", "checkpoint.pt", "metrics.jsonl"]
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "checkpoint.pt": 0o644,
        "metrics.jsonl": 0o644,
        ".lock": 0o644,
    }


LOCK_HOLDER = textwrap.dedent(
    """
    import sys, time
    from fastvae.checkpoint import lock_run_dir
    lock = lock_run_dir(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_a_second_training_into_a_locked_run_directory_is_refused(tmp_path):
    from fastvae.trainer import Trainer

    out = tmp_path / "run"
    script = tmp_path / "hold.py"
    script.write_text(LOCK_HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        x = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
        make = lambda: Trainer(  # noqa: E731
            models.MLPVAE(in_shape=(1, 4, 4), hidden=(4,), latent=2), device="cpu", progress=False
        )
        with pytest.raises(ckpt.RunLockedError) as info:
            make().fit(x, 1, out=out, plots=False)
        assert str(info.value).startswith(f"run directory {out} is in use: process {holder.pid} is training")
        assert isinstance(info.value, OSError) and info.value.pid == holder.pid
        assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()
        holder.send_signal(signal.SIGKILL)  # a killed run leaves its lock file, but not its lock
        holder.wait()
        assert (out / ".lock").read_text().strip() == str(holder.pid)
        assert len(make().fit(x, 1, out=out, plots=False)) == 1
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_the_lock_is_held_for_the_whole_fit_and_released_after_a_failure(tmp_path, monkeypatch):
    from fastvae.trainer import Trainer

    x = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    trainer = Trainer(models.MLPVAE(in_shape=(1, 4, 4), hidden=(4,), latent=2), device="cpu", progress=False)
    seen = []

    def save_on_a_full_disk(path, state):
        with pytest.raises(ckpt.RunLockedError, match=f"process {os.getpid()}"):
            ckpt.lock_run_dir(tmp_path)  # another trainer in this process is refused too
        seen.append(path)
        raise ckpt.CheckpointWriteError("cannot write checkpoint: no space left on device", errno.ENOSPC)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_on_a_full_disk)
    with pytest.raises(ckpt.CheckpointWriteError, match="no space left"):
        trainer.fit(x, 1, out=tmp_path, plots=False)
    assert len(seen) == 1
    ckpt.lock_run_dir(tmp_path).release()  # released by the failed fit


def test_fit_resume_flag_is_decided_under_the_lock(tmp_path):
    from fastvae.trainer import Trainer

    x = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    make = lambda: Trainer(  # noqa: E731
        models.MLPVAE(in_shape=(1, 4, 4), hidden=(4,), latent=2), device="cpu", progress=False
    )
    with pytest.raises(FileNotFoundError, match=r"no checkpoint to resume in run directory"):
        make().fit(x, 1, out=tmp_path, plots=False, resume=True)
    make().fit(x, 1, out=tmp_path, plots=False, resume=False)
    with pytest.raises(FileExistsError, match=rf"run directory {tmp_path} already holds a checkpoint"):
        make().fit(x, 2, out=tmp_path, plots=False, resume=False)
    assert len(make().fit(x, 2, out=tmp_path, plots=False, resume=True)) == 2
    with pytest.raises(ValueError, match="resume must be None, True or False"):
        make().fit(x, 2, out=tmp_path, resume="yes")


def test_ctrl_c_inside_torch_save_stays_a_keyboard_interrupt(tmp_path):
    """torch.save's zip writer answers an interrupt mid-write with a RuntimeError ("unexpected pos"):
    the writer re-raises the KeyboardInterrupt (so the CLI prints its one line) and leaves no file."""
    from fastvae.checkpoint import atomic_write

    def interrupted(f):
        try:
            f.write(b"partial")
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 623360 vs 623248")

    target = tmp_path / "checkpoint.pt"
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted, what="checkpoint")
    assert list(tmp_path.iterdir()) == []


def test_run_directory_files_next_to_the_checkpoint_code(tmp_path):
    """write_metrics rewrites metrics.jsonl whole; remove_temp_files drops only a killed writer's files."""
    history = [{"epoch": 1, "val_loss": 1.5}, {"epoch": 2, "val_loss": None}]
    assert ckpt.write_metrics(tmp_path, history) == tmp_path / ckpt.METRICS_NAME
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == history
    ckpt.write_metrics(tmp_path, history[:1])
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(history[0]) + "\n"
    stale = [tmp_path / ".checkpoint.pt.0a1b2c.tmp", tmp_path / ".metrics.jsonl.3d4e5f.tmp"]
    kept = [tmp_path / ".other.tmp", tmp_path / "notes.txt"]
    for p in stale + kept:
        p.write_text("x")
    ckpt.remove_temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["metrics.jsonl", *(p.name for p in kept)])
