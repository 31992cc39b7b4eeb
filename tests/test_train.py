"""train.py end to end on the toy corpus, on CPU: exact resume after SIGTERM and SIGKILL, atomic checkpoints,
failing saves, non-finite losses, DDP and DataParallel, fine-tuning, command-line errors and the tiny preset."""
import io
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import checkpoint
import config
import model as model_module
import train
from conftest import ROOT, TINY, run_script

ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
TEST_LINE = re.compile(r"^test sacreBLEU=\d+\.\d\d lowercased=\d+\.\d\d chrF=\d+\.\d\d n=\d+ beam=\d+$")


# ---------------------------------------------------------------- helpers

def train_args(corpus: str, out: str, cache: str, *extra: str) -> list[str]:
    """TINY flags first: later flags override earlier ones."""
    return [f"--data_dir={corpus}", f"--out_dir={out}", f"--cache_dir={cache}", *TINY, *extra]


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def weights(out_dir: str) -> dict:
    return load(os.path.join(out_dir, "ckpt.pt"))["model"]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    bad = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a
           if not (torch.equal(a[k], b[k]) if atol == 0 else torch.allclose(a[k], b[k], rtol=0, atol=atol))}
    assert not bad, f"weights differ: {bad}"


class Run:
    """train.py as a background process; stdout and stderr are collected by threads (so pipes never fill)."""

    running: list = []  # every process started, so that a failing test leaves none behind

    def __init__(self, args: list[str], launcher: tuple = ()):
        self.proc = subprocess.Popen([sys.executable, *launcher, os.path.join(ROOT, "train.py"), *args], cwd=ROOT,
                                     env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out, self.err = [], []
        self.threads = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                        for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.threads:
            t.start()
        Run.running.append(self.proc)

    @staticmethod
    def _read(stream, buf):
        for line in stream:
            buf.append(line)

    def wait_until(self, cond, timeout: float = 120) -> bool:
        """Poll cond() until it holds; False if the process ended (or timed out) first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return True
            if self.proc.poll() is not None:
                return cond()
            time.sleep(0.005)
        raise AssertionError("timed out waiting; stderr:\n" + "".join(self.err)[-3000:])

    def finish(self, timeout: float = 180) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self.threads:
            t.join(timeout=10)
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    @property
    def stdout(self) -> str:
        return "".join(self.out)


def run_ok(*args: str) -> subprocess.CompletedProcess:
    r = run_script("train.py", *args)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    return r


@pytest.fixture(autouse=True)
def no_leftover_processes():
    yield
    while Run.running:
        proc = Run.running.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def in_process(monkeypatch):
    """train.main in this process installs SIGINT/SIGTERM handlers and seeds torch: undo that afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    for s, h in handlers.items():
        signal.signal(s, h)
    torch.set_rng_state(rng)
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- 1-3: exact resume and crash safety

RESUME_STEPS = ["--max_steps=40", "--eval_interval=10", "--dropout=0.1"]  # dropout: masks must resume too


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, cache) -> dict:
    """The final weights of an uninterrupted 40-step run (shared by the SIGTERM and SIGKILL tests)."""
    out = str(tmp_path_factory.mktemp("reference"))
    run_ok(*train_args(corpus, out, cache, *RESUME_STEPS))
    assert load(os.path.join(out, "ckpt.pt"))["state"]["step"] == 40
    return weights(out)


def start_until_first_checkpoint(out: str, args: list[str]) -> tuple[Run, str]:
    """Start a training run and return once its first ckpt.pt exists (the run goes on)."""
    ckpt = os.path.join(out, "ckpt.pt")
    run = Run(args)
    assert run.wait_until(lambda: os.path.exists(ckpt)), "the run ended before its first checkpoint:\n" + run.stderr
    return run, ckpt


def test_tensorboard_does_not_change_training(tmp_path, corpus, cache, reference):
    """Its attention figure runs the model at each validation: dropout must stay on after it (it once did not)."""
    out = str(tmp_path / "tb")
    run_ok(*train_args(corpus, out, cache, *RESUME_STEPS, "--tensorboard=True"))
    assert os.listdir(os.path.join(out, "tb"))
    assert_same_weights(weights(out), reference)


def test_sigterm_then_resume_is_exact(tmp_path, corpus, cache, reference):
    out = str(tmp_path / "run")
    args = train_args(corpus, out, cache, *RESUME_STEPS)
    run, ckpt = start_until_first_checkpoint(out, args)
    run.proc.send_signal(signal.SIGTERM)
    rc = run.finish()
    assert rc == 0, run.stderr[-3000:]
    assert "SIGTERM" in run.stderr
    assert "resume with the same command" in run.stderr and f"python train.py --out_dir={out}" in run.stderr
    assert run.stdout == ""  # no test score: the run is not over
    stopped = load(ckpt)["state"]["step"]
    assert 10 <= stopped < 40, f"SIGTERM came too late to test anything (step {stopped})"
    assert f"stopping at step {stopped}: SIGTERM" in run.stderr

    r = run_ok(*args)
    err = r.stderr.decode()
    assert f"resuming from {out}/ckpt.pt" in err
    assert load(ckpt)["state"]["step"] == 40
    assert TEST_LINE.match(r.stdout.decode().strip().splitlines()[-1])
    assert_same_weights(weights(out), reference)


def test_sigkill_between_checkpoints_then_resume_is_exact(tmp_path, corpus, cache, reference):
    out = str(tmp_path / "run")
    args = train_args(corpus, out, cache, *RESUME_STEPS)
    run, ckpt = start_until_first_checkpoint(out, args)
    time.sleep(0.03)  # a few steps past the checkpoint: those steps are lost and must be redone identically
    assert run.proc.poll() is None, "the run finished before it could be killed"
    run.proc.kill()
    assert run.finish() == -signal.SIGKILL
    killed_at = load(ckpt)["state"]["step"]
    assert killed_at < 40

    r = run_ok(*args)
    assert f"resuming from {out}/ckpt.pt" in r.stderr.decode()
    assert load(ckpt)["state"]["step"] == 40
    assert_same_weights(weights(out), reference)


def test_resume_from_a_checkpoint_of_the_unfused_optimizer(tmp_path, corpus, cache):
    """Checkpoints written before AdamW became fused record fused=False; they must resume (fused) all the same."""
    out = str(tmp_path / "run")
    run_ok(*train_args(corpus, out, cache, "--max_steps=10"))
    ckpt = os.path.join(out, "ckpt.pt")
    state = load(ckpt)
    for group in state["optimizer"]["param_groups"]:
        group.update(fused=False, foreach=False)
    torch.save(state, ckpt)
    r = run_ok(*train_args(corpus, out, cache, "--max_steps=20"))
    assert f"resuming from {out}/ckpt.pt" in r.stderr.decode()
    resumed = load(ckpt)
    assert resumed["state"]["step"] == 20 and all(g["fused"] for g in resumed["optimizer"]["param_groups"])


@pytest.mark.slow
def test_random_sigkills_leave_loadable_files_and_exact_result(tmp_path, corpus, cache):
    """Five SIGKILLs at seeded random moments of training (checkpoints every 5 steps, weight averaging on, so
    ckpt.pt, best.pt and avg-*.pt are written and deleted all the time): at every kill every *.pt in out_dir
    loads, and the restarted run ends with exactly the weights of an uninterrupted one."""
    extra = ["--max_steps=120", "--eval_interval=5", "--avg_last=2"]
    ref_out = str(tmp_path / "reference")
    run_ok(*train_args(corpus, ref_out, cache, *extra))
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "ckpt.pt")
    args = train_args(corpus, out, cache, *extra)
    rng = random.Random(20240611)
    kills = []  # (step of ckpt.pt when the run started, step of ckpt.pt after the kill)

    def mtime():
        try:
            return os.stat(ckpt).st_mtime_ns
        except FileNotFoundError:
            return None

    for attempt in range(5):
        before = mtime()
        start_step = load(ckpt)["state"]["step"] if before else None
        run = Run(args)
        # Startup (imports, data) and the first, slow validation of an untrained model vary a lot with the load:
        # the random delay counts from this run's first own checkpoint, so that every kill lands in training.
        wrote = run.wait_until(lambda: mtime() != before)
        if wrote:
            time.sleep(rng.uniform(0.0, 0.3))
        alive = run.proc.poll() is None
        run.proc.kill()
        rc = run.finish()
        assert rc == (-signal.SIGKILL if alive else 0), run.stderr[-3000:]
        for name in sorted(f for f in os.listdir(out) if f.endswith(".pt")):
            try:
                load(os.path.join(out, name))
            except Exception as e:
                pytest.fail(f"kill #{attempt + 1}: {name} does not load ({type(e).__name__}: {e}); kills so far "
                            f"{kills}")
        kills.append((start_step, load(ckpt)["state"]["step"]))
        if not alive:
            break
    assert len(kills) == 5 and all(k[1] < 120 for k in kills), f"a run finished before it was killed: {kills}"
    r = run_ok(*args)
    assert TEST_LINE.match(r.stdout.decode().strip().splitlines()[-1])
    assert load(ckpt)["state"]["step"] == 120
    assert_same_weights(weights(out), weights(ref_out))
    assert sorted(f for f in os.listdir(out) if f.startswith("avg-")) == \
        sorted(f for f in os.listdir(ref_out) if f.startswith("avg-"))
    print("kills (ckpt step at start, after the kill):", kills)


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs (not even `except Exception` handlers)."""


def test_kill_between_ckpt_and_best_pt(tmp_path, corpus, cache, monkeypatch, in_process):
    out = str(tmp_path / "run")
    args = train_args(corpus, out, cache, "--max_steps=10", "--eval_interval=10")
    real = train.atomic_save

    def save_then_die(obj, path, required=True):  # killed between writing best.pt and ckpt.pt
        if path.endswith("ckpt.pt") and os.path.exists(os.path.join(out, "best.pt")):
            raise Killed()
        return real(obj, path, required)

    monkeypatch.setattr(train, "atomic_save", save_then_die)
    with pytest.raises(Killed):
        train.main(args)
    assert os.path.exists(os.path.join(out, "best.pt")) and not os.path.exists(os.path.join(out, "ckpt.pt"))
    monkeypatch.setattr(train, "atomic_save", real)
    train.main(args)  # the same command again: must finish (and write best.pt)
    assert os.path.exists(os.path.join(out, "best.pt"))


# ---------------------------------------------------------------- 4: a save that fails midway

def is_ckpt_tmp(path) -> bool:
    """The temporary file ckpt.pt is written to first (ckpt.pt.<pid>.tmp)."""
    return re.fullmatch(r"ckpt\.pt\.\d+\.tmp", os.path.basename(str(path))) is not None


def test_failed_save_keeps_previous_checkpoint(tmp_path, corpus, cache, monkeypatch, in_process):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "ckpt.pt")
    real_save = torch.save
    calls, before = [], {}

    def disk_full_on_second_ckpt(obj, f, *a, **kw):
        if is_ckpt_tmp(getattr(f, "name", f)):
            calls.append(f)
            if len(calls) == 2:
                with open(ckpt, "rb") as g:
                    before["bytes"] = g.read()
                f.write(b"PK\x03\x04 half a checkpoint")
                raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(train.torch, "save", disk_full_on_second_ckpt)
    with pytest.raises(config.UserError) as e:
        train.main(train_args(corpus, out, cache, "--max_steps=40", "--eval_interval=10"))
    msg = str(e.value)
    assert "No space left on device" in msg and "ckpt.pt" in msg and "intact" in msg and "\n" not in msg
    assert len(calls) == 2
    with open(ckpt, "rb") as g:
        assert g.read() == before["bytes"]
    assert load(ckpt)["state"]["step"] == 10
    assert checkpoint.read_checkpoint(ckpt)["state"]["step"] == 10
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


class FullDisk(io.FileIO):
    """A file on a disk that fills up after `room` bytes: write() raises ENOSPC, as the OS does."""

    def __init__(self, path, room):
        super().__init__(path, "wb")
        self.room = room

    def write(self, b):
        if len(b) > self.room:
            raise OSError(28, "No space left on device")
        self.room -= len(b)
        return super().write(b)


def test_real_disk_full_during_save(tmp_path, corpus, cache, monkeypatch, in_process):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "ckpt.pt")
    opened = []

    def fake_open(path, mode="r", *a, **kw):
        if is_ckpt_tmp(path) and "w" in mode:
            opened.append(path)
            if len(opened) == 2:
                return FullDisk(path, room=20_000)
        return open(path, mode, *a, **kw)

    monkeypatch.setattr(checkpoint, "open", fake_open, raising=False)
    with pytest.raises(config.UserError, match="No space left on device"):
        train.main(train_args(corpus, out, cache, "--max_steps=40", "--eval_interval=10"))
    assert load(ckpt)["state"]["step"] == 10
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


# ---------------------------------------------------------------- 5: non-finite losses

def poison_forward(monkeypatch, bad_steps, snapshot_steps=()):
    """Training forward passes (one per step here: grad_accum=1) return a NaN loss at bad_steps; the weights
    seen by the forward of each step in snapshot_steps are recorded (= the weights after the previous step)."""
    real = model_module.Transformer.forward
    seen = {"n": 0, "snapshots": {}}

    def forward(self, src, tgt_in, *args):
        if not self.training:
            return real(self, src, tgt_in, *args)
        k = seen["n"]
        seen["n"] += 1
        if k in snapshot_steps:
            seen["snapshots"][k] = {n: t.detach().clone() for n, t in self.state_dict().items()}
        loss = real(self, src, tgt_in, *args)
        return loss * float("nan") if k in bad_steps else loss

    monkeypatch.setattr(model_module.Transformer, "forward", forward)
    return seen


@pytest.mark.parametrize("log_interval, stop_step, ckpt_step", [(1, 15, 10), (10, 20, 10), (50, 40, 40)])
def test_nonfinite_losses_stop_the_run(tmp_path, corpus, cache, monkeypatch, capsys, in_process, log_interval,
                                       stop_step, ckpt_step):
    """Skips are counted on the device and read at log steps and at the end of the run: it stops at the first of
    those after max_bad_steps bad steps in a row (steps 12, 13, 14 here; with log_interval=50, max_steps=40 ends
    the loop first, and validations at steps 20-40 saved checkpoints whose weights are still those of step 12)."""
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "ckpt.pt")
    seen = poison_forward(monkeypatch, bad_steps=range(12, 10**9), snapshot_steps={12})
    real_save, saved = train.atomic_save, {}

    def recording_save(obj, path, required=True):
        real_save(obj, path, required)
        with open(path, "rb") as f:
            saved[path] = f.read()

    monkeypatch.setattr(train, "atomic_save", recording_save)
    with pytest.raises(config.UserError) as e:
        train.main(train_args(corpus, out, cache, "--max_steps=40", "--eval_interval=10", "--max_bad_steps=3",
                              f"--log_interval={log_interval}"))
    assert "non-finite steps in a row" in str(e.value) and f"by step {stop_step}" in str(e.value)
    assert seen["n"] == stop_step
    err = capsys.readouterr().err
    assert err.count("update(s) skipped since the last log") == (3 if log_interval == 1 else 1)
    with open(ckpt, "rb") as f:
        assert f.read() == saved[ckpt]  # the last good checkpoint, untouched
    state = checkpoint.read_checkpoint(ckpt)
    assert state["state"]["step"] == ckpt_step
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    if ckpt_step > 12:
        assert_same_weights(state["model"], seen["snapshots"][12])


def test_single_nonfinite_step_is_skipped(tmp_path, corpus, cache, monkeypatch, capsys, in_process):
    out = str(tmp_path / "run")
    seen = poison_forward(monkeypatch, bad_steps={12}, snapshot_steps={12, 13, 14})
    train.main(train_args(corpus, out, cache, "--max_steps=16", "--eval_interval=10", "--max_bad_steps=3"))
    err = capsys.readouterr().err
    assert "step 15: 1 update(s) skipped since the last log" in err  # TINY logs every 5 steps
    assert err.count("skipped") == 1
    snaps = seen["snapshots"]
    assert_same_weights(snaps[13], snaps[12])  # the skipped step changed nothing
    assert any(not torch.equal(snaps[14][k], snaps[13][k]) for k in snaps[13])  # and training went on
    state = load(os.path.join(out, "ckpt.pt"))
    assert state["state"]["step"] == 16 and state["state"]["bad_steps"] == 0
    assert all(int(s["step"]) == 15 for s in state["optimizer"]["state"].values())  # Adam's step count too
    assert all(torch.isfinite(t).all() for t in state["model"].values())


# ---------------------------------------------------------------- 6-7: DDP and DataParallel

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")


def torchrun_ok(*args: str) -> subprocess.CompletedProcess:
    """train.py under torchrun with 2 processes (gloo on the CPU), which must succeed."""
    r = subprocess.run([sys.executable, *TORCHRUN, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def worker_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of the torchrun worker with this RANK (read from /proc: children and their environment)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if parent == launcher_pid and f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank}")


def test_ddp_signal_to_one_rank_then_resume_is_exact(tmp_path, corpus, cache):
    """SIGTERM to rank 1 alone: both ranks stop at the same log step and rank 0 saves ckpt.pt; resuming ends with
    the weights of an uninterrupted run, dropout masks included (they depend on seed, rank and step)."""
    ref_out, out = str(tmp_path / "reference"), str(tmp_path / "run")
    common = ["--max_steps=60", "--log_interval=2", "--dropout=0.1"]
    torchrun_ok(*train_args(corpus, ref_out, cache, *common))
    run = Run(train_args(corpus, out, cache, *common), launcher=TORCHRUN)
    ckpt = os.path.join(out, "ckpt.pt")
    assert run.wait_until(lambda: os.path.exists(ckpt)), run.stderr
    os.kill(worker_of_rank(run.proc.pid, 1), signal.SIGTERM)
    assert run.finish() == 0, run.stderr[-3000:]
    stopped = load(ckpt)["state"]["step"]
    assert stopped < 60 and stopped % 2 == 0, stopped
    assert f"stopping at step {stopped}: a signal to another rank" in run.stderr
    r = torchrun_ok(*train_args(corpus, out, cache, *common))
    assert f"resuming from {out}/ckpt.pt" in r.stderr, r.stderr[-3000:]
    assert load(ckpt)["state"]["step"] == 60
    assert_same_weights(weights(out), weights(ref_out))


def test_ddp_matches_gradient_accumulation(tmp_path, corpus, cache):
    """Each rank computes the step's total token count itself; the ranks agree on stopping at log steps."""
    common = ["--max_steps=3", "--log_interval=2", "--dropout=0", "--attn_dropout=0", "--device=cpu"]
    ddp_out, single_out = str(tmp_path / "ddp"), str(tmp_path / "single")
    r = torchrun_ok(*train_args(corpus, ddp_out, cache, *common))
    assert "2 process(es)" in r.stderr
    assert TEST_LINE.match(r.stdout.strip().splitlines()[-1])
    run_ok(*train_args(corpus, single_out, cache, *common, "--grad_accum=2"))
    ddp, single = load(os.path.join(ddp_out, "ckpt.pt")), load(os.path.join(single_out, "ckpt.pt"))
    assert ddp["state"]["step"] == single["state"]["step"] == 3
    assert not [k for k in ddp["model"] if k.startswith(("module.", "_orig_mod."))]
    assert_same_weights(ddp["model"], single["model"], atol=1e-6)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, corpus, cache):
    """The CUDA path compiles the model; here with inductor on the CPU (about a minute): the run works, recompiles
    at most once while batch shapes change every step, saves the unwrapped model, and learns as eager does."""
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    run_ok(*train_args(corpus, eager, cache, "--max_steps=8"))
    r = run_script("train.py", *train_args(corpus, compiled, cache, "--max_steps=8", "--compile=on"),
                   env={"TORCH_LOGS": "recompiles", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    err = r.stderr.decode()
    assert r.returncode == 0, err[-3000:]
    assert err.count("Recompiling function") <= 1, err[-3000:]
    assert os.listdir(tmp_path / "inductor"), "nothing was compiled"
    a, b = load(os.path.join(eager, "ckpt.pt")), load(os.path.join(compiled, "ckpt.pt"))
    assert a["model"].keys() == b["model"].keys()
    assert a["state"]["step"] == b["state"]["step"] == 8
    assert a["state"]["history"][-1][1] == pytest.approx(b["state"]["history"][-1][1], rel=1e-3)  # val loss


def test_dataparallel_state_dicts_load_both_ways(tmp_path, trained):
    for name in ("ckpt.pt", "best.pt"):
        keys = load(os.path.join(trained, name))["model"].keys()
        assert not [k for k in keys if k.startswith(("module.", "_orig_mod.")) or "._orig_mod." in k]
    ckpt = checkpoint.read_checkpoint(checkpoint.checkpoint_path(trained))
    plain, tok = checkpoint.build_model(ckpt)
    wrapped = torch.nn.DataParallel(plain)
    torch.save(wrapped.state_dict(), tmp_path / "dp.pt")
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    dp_state, plain_state = load(tmp_path / "dp.pt"), load(tmp_path / "plain.pt")
    assert dp_state and all(k.startswith("module.") for k in dp_state)
    assert checkpoint.strip_prefixes(dp_state).keys() == plain_state.keys()

    src = torch.tensor([[5, 6, 7, tok.eos_id]])
    tgt = torch.tensor([[tok.bos_id, 8, 9]])
    with torch.no_grad():
        expected = plain(src, tgt)
    cfg = config.config_from_dict(ckpt["config"])
    for state in (dp_state, plain_state):
        m, _ = checkpoint.build_model({**ckpt, "model": state})  # strip_prefixes inside
        assert_same_weights(m.state_dict(), plain_state)
        other = torch.nn.DataParallel(
            model_module.Transformer(cfg, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id))
        other.module.load_state_dict(checkpoint.strip_prefixes(state))
        assert_same_weights(other.module.state_dict(), plain_state)
        other.eval()
        with torch.no_grad():
            assert torch.equal(other(src, tgt), expected)


# ---------------------------------------------------------------- 8: fine-tuning

def test_best_pt_translates_ckpt_pt_resumes(tmp_path, corpus, cache, trained):
    """best.pt carries no optimizer state (a third of the size); resuming from it is refused with one line."""
    best, ckpt = load(os.path.join(trained, "best.pt")), load(os.path.join(trained, "ckpt.pt"))
    resume_keys = {"optimizer", "scaler"}
    assert resume_keys <= ckpt.keys() and not resume_keys & best.keys()
    assert {"model", "config", "tokenizer", "state"} <= best.keys()
    out = tmp_path / "out"
    out.mkdir()
    torch.save(best, str(out / "ckpt.pt"))
    r = run_script("train.py", *train_args(corpus, str(out), cache))
    err = r.stderr.decode()
    assert r.returncode == 1 and len(err.splitlines()) == 1 and "no training state" in err and "--init_from" in err


def test_finetune_head_changes_only_the_head(tmp_path, corpus, cache, trained):
    init_path = checkpoint.checkpoint_path(trained)  # what --init_from=<run dir> loads
    init = load(init_path)
    out = str(tmp_path / "ft")
    r = run_ok(*train_args(corpus, out, cache, f"--init_from={trained}", "--finetune=head", "--max_steps=5"))
    assert TEST_LINE.match(r.stdout.decode().strip().splitlines()[-1])
    final = load(os.path.join(out, "ckpt.pt"))
    assert final["state"]["step"] == 5
    assert final["tokenizer"] == init["tokenizer"]

    # which state-dict entries ARE head parameters (the tied embedding shows up under several names)
    m, _ = checkpoint.build_model(init)
    head_ids = {id(p) for p in m.head_parameters()}
    head_keys = {k for k, t in m.state_dict(keep_vars=True).items() if id(t) in head_ids}
    assert {"generator.weight", "generator.bias"} <= head_keys
    if init["config"]["pre_norm"]:
        assert any(k.startswith("decoder_norm.") for k in head_keys)
    if init["config"]["tie_embeddings"]:
        assert "src_embed.embedding.weight" in head_keys
    assert final["model"].keys() == init["model"].keys()
    changed_body = [k for k in init["model"] if k not in head_keys and not torch.equal(init["model"][k],
                                                                                      final["model"][k])]
    assert not changed_body, f"frozen tensors changed: {changed_body}"
    assert not torch.equal(init["model"]["generator.bias"], final["model"]["generator.bias"])
    assert not torch.equal(init["model"]["generator.weight"], final["model"]["generator.weight"])
    # the optimizer holds the head only
    n_opt = sum(len(g["params"]) for g in final["optimizer"]["param_groups"])
    assert n_opt == len(head_ids)


def test_finetune_all_has_two_learning_rates(tmp_path, corpus, cache, trained, in_process):
    out = str(tmp_path / "ft")
    train.main(train_args(corpus, out, cache, f"--init_from={trained}", "--finetune=all", "--lr=2e-3",
                          "--head_lr=5e-4", "--max_steps=2"))
    ckpt = load(os.path.join(out, "ckpt.pt"))
    groups = ckpt["optimizer"]["param_groups"]
    peaks = {}
    for g in groups:
        peaks.setdefault(g["name"], set()).add(g["peak_lr"])
    assert peaks == {"body": {2e-3}, "head": {5e-4}}
    m, _ = checkpoint.build_model(ckpt)
    n_head = sum(len(g["params"]) for g in groups if g["name"] == "head")
    assert n_head == len(m.head_parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    # the schedule scales both groups alike: the learning rates in use keep the ratio
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs["head"] / lrs["body"] == pytest.approx(5e-4 / 2e-3)


# ---------------------------------------------------------------- 9: command-line errors

@pytest.mark.parametrize("flag", ["--lr=abc", "--nosuchkey=1"])
def test_bad_flag_is_one_error_line(flag):
    r = run_script("train.py", flag)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert "Traceback" not in err
    assert flag.split("=")[0] in err


# ---------------------------------------------------------------- 10-11: learning, and budgets across resumes

def test_default_preset_learns(tmp_path, corpus, cache):
    """The real check is `python train.py` (the default preset) on Multi30k for an hour: far too slow for the test
    suite. The same preset on the toy corpus, with small batches, must lower the validation loss."""
    out = str(tmp_path / "default")
    r = run_ok(f"--data_dir={corpus}", f"--out_dir={out}", f"--cache_dir={cache}", "--device=cpu",
               "--max_tokens=600", "--max_steps=30", "--eval_interval=10", "--tensorboard=False")
    ckpt = load(os.path.join(out, "ckpt.pt"))
    preset = config.PRESETS[config.DEFAULT_PRESET]
    assert {k: ckpt["config"][k] for k in preset} == {**preset, "max_tokens": 600, "eval_interval": 10}
    assert "training preset multi30k_en_de:" in r.stderr.decode()
    history = ckpt["state"]["history"]
    assert [h[0] for h in history] == [10, 20, 30]
    losses = [h[1] for h in history]
    assert losses[-1] < losses[0] - 0.5 and losses == sorted(losses, reverse=True), losses
    assert TEST_LINE.match(r.stdout.decode().strip().splitlines()[-1])
    err = r.stderr.decode()  # with no progress bar (TQDM_DISABLE=1), log steps and validations are lines
    assert re.search(r"^step 20: train loss \d+\.\d{3} lr \S+ \d+ target tok/s$", err, re.M), err[-2000:]
    assert re.search(r"^step 30: val loss .* \[\d+\.\d min, validation \d+\.\d s\]$", err, re.M), err[-2000:]


def test_max_steps_counts_across_resumes(tmp_path, corpus, cache):
    out = str(tmp_path / "run")
    ckpt = os.path.join(out, "ckpt.pt")
    first = run_ok(*train_args(corpus, out, cache, "--max_steps=15"))
    assert load(ckpt)["state"]["step"] == 15
    assert TEST_LINE.match(first.stdout.decode().strip().splitlines()[-1])
    second = run_ok(*train_args(corpus, out, cache, "--max_steps=30"))
    err = second.stderr.decode()
    assert f"resuming from {out}/ckpt.pt" in err and "stopping at step 30: max_steps=30" in err
    state = load(ckpt)["state"]
    assert state["step"] == 30
    assert [h[0] for h in state["history"]] == [10, 15, 20, 30]
    lines = second.stdout.decode().strip().splitlines()
    assert lines and TEST_LINE.match(lines[-1]), lines


def test_cooldown_takes_the_learning_rate_linearly_to_zero():
    base = [train.lr_factor(s, warmup=10) for s in range(100)]
    assert [train.lr_factor(s, 10, cooldown=0.25, used=s / 100) for s in range(75)] == base[:75]  # untouched before
    for s in range(75, 100):
        assert train.lr_factor(s, 10, cooldown=0.25, used=s / 100) == pytest.approx(base[s] * (100 - s) / 25)
    assert train.lr_factor(5, 10, cooldown=0.25, used=1.0) == 0.0
    state = train.TrainState(step=30, epoch=2, batch=5)  # the budget furthest spent counts
    cfg = config.Config(max_steps=100, max_epochs=5, max_minutes=0)
    assert train.budget_used(cfg, state, epoch_steps=10, minutes=0.0) == pytest.approx(0.5)  # epochs: 2.5 of 5
    assert train.budget_used(cfg, state, epoch_steps=10, minutes=0.8) == pytest.approx(0.8)
    assert train.budget_used(config.Config(max_steps=40, max_epochs=0), state, 10, 0.0) == pytest.approx(0.75)


def test_cooldown_ends_the_run_at_a_learning_rate_near_zero(tmp_path, corpus, cache, in_process):
    out = str(tmp_path / "cool")
    train.main(train_args(corpus, out, cache, "--max_steps=20", "--cooldown=0.5", "--max_epochs=0"))
    groups = load(os.path.join(out, "ckpt.pt"))["optimizer"]["param_groups"]
    # The last step (index 19) is past the warmup of 20 and 1/20 of the budget from its end: a tenth of the peak.
    assert all(g["lr"] == pytest.approx(3e-3 * 0.1) for g in groups)


def test_auto_precision_uses_bf16_on_cpus_with_amx(monkeypatch):
    cfg = config.Config(dtype="auto")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert config.precision(cfg, "cpu") == (torch.bfloat16, False)  # training and decoding both measured faster
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert config.precision(cfg, "cpu") == (None, False)  # emulated bf16 would be slower than fp32
    assert config.precision(config.Config(dtype="bfloat16"), "cpu") == (torch.bfloat16, False)


def test_bf16_training_on_cpu_learns_and_keeps_fp32_weights(tmp_path, corpus, cache):
    """bf16 autocast on a CPU (native with AMX, emulated elsewhere: slow but the same math) lowers the loss, and the
    checkpoint holds fp32 weights that translate.py loads like any other."""
    out = str(tmp_path / "bf16")
    r = run_ok(*train_args(corpus, out, cache, "--dtype=bfloat16", "--max_steps=30"))
    assert "bfloat16" in r.stderr.decode()
    ckpt = load(os.path.join(out, "ckpt.pt"))
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())
    losses = [h[1] for h in ckpt["state"]["history"]]
    assert losses[-1] < losses[0] - 0.5, losses
