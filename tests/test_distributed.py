"""Two CPU processes (gloo) train like one process on the same global batch: identical weights and codebooks
on both ranks after every step, the same losses as a single process, one set of checkpoints, and a
2-process run resumes in 1 process. The same for the priors. A stop signal to one rank stops every rank
(saved, no hang)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from oasisvq.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from oasisvq.training import Interrupted

from .conftest import shared

TINY = {"downsample": 4, "channels": (8, 16), "hidden": 16, "res_blocks": 1, "num_codes": 32, "code_dim": 8, "dead_code_steps": 2}
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(t88: str, batch_size: int, epochs: int = 2) -> RunConfig:
    return RunConfig(data=DataConfig(paths=[t88], size=32), model=ModelConfig(**TINY),
                     train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=3e-3, warmup_steps=2, device="cpu",
                                       val_slices=8, seed=5))


def _join_env(rank: int, world: int, port: int) -> None:
    import faulthandler

    faulthandler.dump_traceback_later(200, exit=True)  # a rank that hangs prints where, before the runner gives up
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))


def _signal_self(rank: int, signal_at: tuple[int, int] | None, steps_done: int) -> None:
    """SIGTERM to this process when it is rank signal_at[0] and has run signal_at[1] forward passes."""
    if signal_at is not None and (rank, steps_done) == tuple(signal_at):
        os.kill(os.getpid(), signal.SIGTERM)


def _record_steps(model, states: list, losses: list, loss_of, rank: int, signal_at) -> None:
    """Hooks on a model that record its state before every training forward and the loss of each."""

    def pre(module, args):
        if module.training:
            states.append({k: v.detach().clone() for k, v in module.state_dict().items()})

    def post(module, args, output):
        if module.training:
            losses.append(loss_of(args, output))
            _signal_self(rank, signal_at, len(losses))

    model.register_forward_pre_hook(pre)
    model.register_forward_hook(post)


def _worker(rank: int, world: int, port: int, cfg_dict: dict, out: str, cache: str, record: str,
            signal_at: tuple[int, int] | None = None) -> None:
    """One rank: train with hooks that record (state before each step, loss of each step, final state)."""
    _join_env(rank, world, port)
    import oasisvq.tokenizer as tk

    states, losses, final = [], [], {}
    orig_init, orig_fit = tk.VQVAETask.__init__, tk.fit

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        _record_steps(self.model, states, losses, lambda args, out: float(out[1]["loss"].detach()), rank,
                      signal_at)

    def fit(task, *a, **kw):
        result = orig_fit(task, *a, **kw)
        final.update({k: v.detach().clone() for k, v in task.model.state_dict().items()})
        return result

    tk.VQVAETask.__init__, tk.fit = init, fit
    stopped = ""
    try:
        tk.train(RunConfig.from_dict(cfg_dict), out, cache_dir=cache, progress=False)
    except Interrupted as e:
        stopped = str(e)
    torch.save({"states": states, "losses": losses, "final": final, "stopped": stopped}, f"{record}.rank{rank}.pt")


def _run_ranks(fn, world: int, args: tuple, record: Path, timeout: float = 240) -> list[dict]:
    """Run fn(rank, world, port, *args) in `world` processes; fail (not hang) if they do not all finish."""
    ctx = mp.start_processes(fn, args=(world, _free_port(), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{world} ranks did not finish within {timeout:.0f} s (a collective waited forever?)")
    return [torch.load(f"{record}.rank{r}.pt") for r in range(world)]


def _spawn(world: int, cfg: RunConfig, out: Path, cache: Path, record: Path, signal_at=None) -> list[dict]:
    return _run_ranks(_worker, world, (cfg.to_dict(), str(out), str(cache), str(record), signal_at), record)


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path, session_cache):
    t88 = str(shared("oasis1_t88_axial"))
    # build the slice cache once, outside the workers
    from oasisvq.data import load_slices

    load_slices(_cfg(t88, 8).data, cache_dir=session_cache, progress=False)
    two = _spawn(2, _cfg(t88, batch_size=8), tmp_path / "ddp", session_cache, tmp_path / "ddp")
    one = _spawn(1, _cfg(t88, batch_size=16), tmp_path / "single", session_cache, tmp_path / "single")[0]

    steps = 2 * (120 // 16)
    r0, r1 = two
    assert len(r0["states"]) == len(r1["states"]) == len(one["states"]) == steps
    # identical weights and codebooks on both ranks before every step and at the end
    for s0, s1 in zip(r0["states"] + [r0["final"]], r1["states"] + [r1["final"]]):
        for k in s0:
            assert torch.equal(s0[k], s1[k]), k
    assert bool(r0["final"]["quantizer.initialized"])
    # the global loss (mean of the ranks' losses) matches one process on the same global batch of 16
    ddp_loss = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    for step, (a, b) in enumerate(zip(ddp_loss, one["losses"])):
        assert a == pytest.approx(b, rel=2e-3, abs=1e-5), (step, ddp_loss, one["losses"])
    for k, v in one["final"].items():
        if v.is_floating_point():
            assert torch.allclose(r0["final"][k], v, atol=5e-3, rtol=1e-2), (k, (r0["final"][k] - v).abs().max())

    # exactly one set of checkpoints and metrics, written by rank 0
    ck = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir())
    assert ck == ["best.safetensors", "last.safetensors"]
    assert not [p for p in (tmp_path / "ddp").rglob("*") if "rank" in p.name or p.name.endswith(".tmp")]
    with open(tmp_path / "ddp" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [7, 14]
    # the logged train loss is the all-reduced mean over ranks
    assert float(rows[0]["train_loss"]) == pytest.approx(sum(ddp_loss[:7]) / 7, rel=1e-5)


def test_torchrun_cli_then_resume_in_one_process(tmp_path, session_cache):
    t88 = str(shared("oasis1_t88_axial"))
    config = tmp_path / "tiny.json"
    cfg = _cfg(t88, batch_size=8, epochs=2)
    cfg.save(config)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port()),
           "-m", "oasisvq", "train", "--config", str(config), "--out", str(run), "--cache-dir", str(session_cache),
           "--no-progress"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    summaries, text = [], p.stdout
    while "{" in text:  # every rank prints a summary; only rank 0 validates
        obj, end = json.JSONDecoder().raw_decode(text[text.index("{"):])
        summaries.append(obj)
        text = text[text.index("{") + end:]
    validated = [s["validation"] for s in summaries if s["validation"]]
    assert len(validated) == 1 and 0 < validated[0]["ssim"] < 1, p.stdout
    assert sorted(x.name for x in (run / "checkpoints").iterdir()) == ["best.safetensors", "last.safetensors"]
    from oasisvq.checkpoint import load_checkpoint

    meta = load_checkpoint(run / "checkpoints" / "last.safetensors")[1]
    assert meta["step"] == 14 and meta["world_size"] == 2 and meta["global_batch"] == 16

    # continue the 2-process run for one more epoch in a single process (global batch 8 now)
    from oasisvq.cli import main as cli_main

    rc = cli_main(["train", "--out", str(run), "--resume", "--epochs", "3", "--cache-dir", str(session_cache),
                   "--no-progress"])
    assert rc == 0
    meta = load_checkpoint(run / "checkpoints" / "last.safetensors")[1]
    # the step count is converted to single-process steps of 8 slices: 3 epochs of 15 steps (a checkpoint at
    # the end of an epoch records the position to continue from: the start of the next)
    assert meta["world_size"] == 1 and (meta["epoch"], meta["step_in_epoch"]) == (3, 0) and meta["step"] == 3 * 15
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(r["val_ssim"] for r in rows)


def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path, session_cache):
    t88 = str(shared("oasis1_t88_axial"))
    from oasisvq.checkpoint import load_checkpoint
    from oasisvq.data import load_slices

    load_slices(_cfg(t88, 8).data, cache_dir=session_cache, progress=False)
    r0, r1 = _spawn(2, _cfg(t88, batch_size=8, epochs=50), tmp_path / "ddp", session_cache, tmp_path / "ddp",
                    signal_at=(1, 3))
    # rank 1 was signalled during step 3; both ranks finish that step, save once and report the stop
    assert len(r0["losses"]) == len(r1["losses"]) == 3
    assert "SIGTERM" in r1["stopped"] and "another rank" in r0["stopped"]
    meta = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.safetensors")[1]
    assert meta["step"] == 3 and meta["world_size"] == 2
    for s0, s1 in zip(r0["states"], r1["states"]):
        for k in s0:
            assert torch.equal(s0[k], s1[k]), k


# --------------------------------------------------------------------------------------------- priors

PRIOR = {"layers": 2, "width": 16, "heads": 2, "kernel": 3, "num_classes": 0}  # no level dropout: per-rank RNG


def _prior_worker(rank: int, world: int, port: int, run_dir: str, batch_size: int, epochs: int, record: str,
                  signal_at: tuple[int, int] | None = None, resume: bool = False) -> None:
    """One rank of train_prior on synthetic code grids, recording states before each step and losses."""
    _join_env(rank, world, port)
    from oasisvq import prior

    from .test_sampling import _slices

    data = _slices((24, 6, 6))
    import oasisvq.data
    oasisvq.data.load_slices = lambda *a, **kw: data
    states, losses = [], []
    orig_init = prior.PriorTask.__init__

    def init(self, *a, **kw):
        orig_init(self, *a, **kw)
        _record_steps(self.model, states, losses,
                      lambda args, out: float(torch.nn.functional.cross_entropy(out.float(), args[0])), rank, signal_at)

    prior.PriorTask.__init__ = init
    stopped, result = "", {}
    options = {} if resume else dict(PRIOR, batch_size=batch_size)
    try:
        result = prior.train_prior(run_dir, "transformer", epochs=epochs, device="cpu", progress=False,
                                      resume=resume, **options)
    except Interrupted as e:
        stopped = str(e)
    torch.save({"states": states, "losses": losses, "stopped": stopped, "result": result}, f"{record}.rank{rank}.pt")


def test_prior_two_processes_match_one_process_then_resume_in_one(tmp_path):
    from oasisvq.checkpoint import load_checkpoint

    from .test_sampling import make_run

    two_dir, one_dir = make_run(tmp_path / "two"), make_run(tmp_path / "one")
    r0, r1 = _run_ranks(_prior_worker, 2, (str(two_dir), 4, 2, str(tmp_path / "two")), tmp_path / "two")
    (one,) = _run_ranks(_prior_worker, 1, (str(one_dir), 8, 2, str(tmp_path / "one")), tmp_path / "one")

    steps = 2 * (24 // 8)  # 24 train grids, global batch 8, 2 epochs
    assert len(r0["states"]) == len(r1["states"]) == len(one["states"]) == steps
    for s0, s1 in zip(r0["states"], r1["states"]):
        for k in s0:
            assert torch.equal(s0[k], s1[k]), k
    ddp_loss = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    for step, (a, b) in enumerate(zip(ddp_loss, one["losses"])):
        assert a == pytest.approx(b, rel=1e-4), (step, ddp_loss, one["losses"])

    pdir = two_dir / "prior-transformer"
    assert sorted(p.name for p in pdir.iterdir()) == ["best.safetensors", "codes.safetensors", "curve.png",
                                                       "last.safetensors", "metrics.csv"]
    with open(pdir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [3, 6]
    # the logged train bits are the mean over both ranks and all steps of the epoch
    assert float(rows[0]["train_bits"]) * 0.6931471805599453 == pytest.approx(sum(ddp_loss[:3]) / 3, rel=1e-5)
    assert float(rows[1]["val_bits"]) == pytest.approx(r0["result"]["val_bits"])
    meta = load_checkpoint(pdir / "last.safetensors")[1]
    assert (meta["world_size"], meta["global_batch"], meta["step"]) == (2, 8, 6)

    # continue in one process (global batch 4 now): steps are converted, one more epoch of 6 steps
    (res,) = _run_ranks(_prior_worker, 1, (str(two_dir), 4, 3, str(tmp_path / "resume"), None, True),
                        tmp_path / "resume")
    meta = load_checkpoint(pdir / "last.safetensors")[1]
    assert (meta["world_size"], meta["epoch"], meta["step"]) == (1, 3, 3 * 6)
    assert len(res["losses"]) == 6 and res["result"]["step"] == 18


def test_prior_signal_to_one_rank_stops_both(tmp_path):
    from oasisvq.checkpoint import load_checkpoint

    from .test_sampling import make_run

    run_dir = make_run(tmp_path / "run")
    r0, r1 = _run_ranks(_prior_worker, 2, (str(run_dir), 4, 100, str(tmp_path / "rec"), (1, 4)), tmp_path / "rec")
    assert len(r0["losses"]) == len(r1["losses"]) == 4
    assert "SIGTERM" in r1["stopped"] and "another rank" in r0["stopped"]
    meta = load_checkpoint(run_dir / "prior-transformer" / "last.safetensors")[1]
    assert (meta["step"], meta["epoch"], meta["step_in_epoch"]) == (4, 1, 1)
