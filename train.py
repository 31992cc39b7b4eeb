"""
Train a translator: validation BLEU as it goes, atomic checkpoints, exact resume, one or many GPUs.

    python train.py                                           # the default preset, Multi30k en->de, best device
    python train.py --preset=tiny --device=cpu --max_minutes=60 --out_dir=out-tiny
    python train.py --preset=tiny --device=cpu --out_dir=out-tiny     # again: resumes from out-tiny/ckpt.pt
    python train.py --data_dir=../shared/data/multi30k --src_lang=de --tgt_lang=en
    torchrun --standalone --nproc-per-node=4 train.py         # DDP, one process per GPU
    python train.py --init_from=out-tiny --finetune=all --tgt_lang=fr --out_dir=out-fr   # fine-tune

The first lines say what runs on what, and after a few steps how long an epoch takes. Ctrl-C or SIGTERM saves a
checkpoint and exits 0; running the same command again continues exactly where it stopped. The last line on stdout
is the test score, e.g. `test sacreBLEU=33.11 lowercased=33.39 chrF=57.32 n=1000 beam=4` (the tiny preset after
60 CPU minutes).
"""
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import atomic_save, build_model, checkpoint_path, read_checkpoint
from config import MODEL_KEYS, Config, UserError, compiles, get_config, pick_device, precision, run_main, split_preset
from dataset import Tokenizer, load_data, log
from model import Transformer
from translate import score, translate_sentences

SPEED_STEPS = 20  # steps timed, after this process's first (which may compile), to say how long an epoch takes


@dataclass
class TrainState:
    """How far the run has come: saved in ckpt.pt as a plain dict, restored on resume."""
    step: int = 0  # optimizer steps taken, over all epochs and resumes
    epoch: int = 0  # epochs finished
    batch: int = 0  # steps taken in the current epoch: a resumed run skips that many of the epoch's planned steps
    best_bleu: float = -1.0  # the best validation BLEU so far: best.pt holds those weights
    stale: int = 0  # validations since the best one (early stopping after --patience of them)
    history: list = field(default_factory=list)  # [step, val loss, BLEU, chrF] of every validation

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        # Other keys are not ours: the skip counts (SkippedSteps) and older checkpoints' stale_stop (now derived).
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


class SkippedSteps:
    """Updates skipped for a non-finite loss or gradient, counted on the device so that no step waits for the host;
    read at log steps and at the end of the run. Saved in ckpt.pt's state under KEYS."""
    KEYS = ("bad_steps", "worst_bad", "skipped")

    def __init__(self, saved: dict, device: str):
        # non-finite steps in a row up to now; the most in a row since the last check; how many since then
        self.in_row, self.worst, self.skipped = (torch.tensor(float(saved.get(k, 0)), device=device) for k in self.KEYS)

    def record(self, ok: torch.Tensor) -> None:
        bad = (~ok).float()
        self.in_row.add_(1).mul_(bad)  # a good step resets it to 0
        torch.maximum(self.worst, self.in_row, out=self.worst)
        self.skipped.add_(bad)

    def saved(self) -> dict:
        return {k: int(v) for k, v in zip(self.KEYS, (self.in_row, self.worst, self.skipped))}

    def check(self, step: int, cfg: Config, master: bool) -> None:
        """Report the skips since the last check, and stop after max_bad_steps in a row. Gradients are all-reduced,
        so every rank reads the same counts and all stop together."""
        n, worst = (int(v) for v in torch.stack([self.skipped, self.worst]).tolist())  # a host sync
        if n and master:
            tqdm.write(f"step {step}: {n} update(s) skipped since the last log (non-finite loss or gradient)",
                       file=sys.stderr)
        if worst >= cfg.max_bad_steps:
            raise UserError(f"{worst} non-finite steps in a row by step {step}; stopping, the last good checkpoint in "
                            f"{cfg.out_dir} is kept (try a lower --lr)")
        self.skipped.zero_()
        self.worst.copy_(self.in_row)


class StopSignal:
    """Ctrl-C and SIGTERM only note their name here: the loop finishes its step, saves ckpt.pt and exits 0."""

    def __init__(self):
        self.name = ""
        signal.signal(signal.SIGINT, self.catch)
        signal.signal(signal.SIGTERM, self.catch)

    def catch(self, signum, frame) -> None:
        self.name = signal.Signals(signum).name


# ---------------------------------------------------------------- setting up

def resolve_config(argv: list[str]) -> tuple[Config, dict | None, dict | None]:
    """The run's config, plus the checkpoint to resume from or the one to initialize from (fine-tuning).
    A run directory that already holds ckpt.pt is resumed: its config, with the new command-line overrides."""
    cfg = get_config(argv)
    resume_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if os.path.exists(resume_path):
        ckpt = read_checkpoint(resume_path)
        missing = [k for k in ("optimizer", "scaler", "state") if k not in ckpt]
        if missing:
            raise UserError(f"{resume_path} has no training state ({', '.join(missing)}): it can only start a new run,"
                            f" with --init_from={resume_path} and another --out_dir")
        cfg = get_config(argv, base=ckpt["config"])
        changed = [k for k in MODEL_KEYS if getattr(cfg, k) != ckpt["config"].get(k)]
        if changed:
            raise UserError(f"{resume_path} was trained with other {', '.join(changed)}; use another --out_dir")
        return cfg, ckpt, None
    if cfg.init_from:
        init = read_checkpoint(checkpoint_path(cfg.init_from))
        # The model's shape and vocabulary are the checkpoint's; everything else is this command line's.
        return replace(cfg, **{k: init["config"][k] for k in MODEL_KEYS if k in init["config"]}), None, init
    return cfg, None, None


def setup_distributed(device: str) -> tuple[int, int, str]:
    """Under torchrun: one process per device, NCCL on GPUs, gloo on CPU. Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def make_run_dir(cfg: Config) -> None:
    """out_dir with config.json in it, and the config in the log."""
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        for name in os.listdir(cfg.out_dir):  # a run killed mid-write leaves its temporary file (atomic_save)
            if name.endswith(".tmp"):
                os.remove(os.path.join(cfg.out_dir, name))
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1)
    except OSError as e:
        raise UserError(f"cannot write to --out_dir={cfg.out_dir}: {e.strerror or e}") from None
    log("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """The model's AdamW; each group keeps its peak learning rate (--finetune=all: the head's is --head_lr)."""
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                          head_lr=(cfg.head_lr or cfg.lr) if cfg.finetune == "all" else None)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    return optimizer


def build(cfg: Config, source: dict | None, tok: Tokenizer, device: str) -> tuple[Transformer, torch.optim.AdamW]:
    """The model, with the weights of the checkpoint to resume or fine-tune if there is one, and its optimizer."""
    if source:
        model, _ = build_model({**source, "config": asdict(cfg)}, device)
        model.train()
    else:
        model = Transformer(cfg, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id).to(device)
    if cfg.finetune == "head":
        head = {id(p) for p in model.head_parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    return model, make_optimizer(model, cfg)


def restore(resume: dict | None, optimizer, scaler, device: str) -> tuple[TrainState, SkippedSteps]:
    """A new run's state, or the checkpoint's: optimizer moments, gradient scale, progress and skip counts."""
    if not resume:
        return TrainState(), SkippedSteps({}, device)
    for group in resume["optimizer"]["param_groups"]:  # older checkpoints were not fused: they are now
        group.update(fused=True, foreach=None)
    optimizer.load_state_dict(resume["optimizer"])
    scaler.load_state_dict(resume["scaler"])
    return TrainState.from_dict(resume["state"]), SkippedSteps(resume["state"], device)


def wrap(model: Transformer, cfg: Config, device: str, world: int) -> torch.nn.Module:
    """What the training step calls: the model compiled (on CUDA by default) and/or replicated over devices. The
    bare model stays what is clipped, validated and saved."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if compiles(cfg, device):
        # Batch shapes change every step: compile for dynamic shapes from the start (the default compiles for the first
        # shape, then again for dynamic ones: 58 s against 41 s for the tiny model's forward and backward on a CPU).
        model = torch.compile(model, dynamic=True)
    if world > 1:
        return DDP(model, device_ids=[device] if cuda else None)
    if cuda and torch.cuda.device_count() > 1 and device == "cuda":
        return torch.nn.DataParallel(model)  # one process, several GPUs; torchrun + DDP is faster
    return model


# ---------------------------------------------------------------- the phases of the loop

def plan_epoch(split, cfg: Config, epoch: int, rank: int, world: int) -> list[tuple[list[torch.Tensor], float]]:
    """This rank's steps of one epoch: each one's micro-batches (grad_accum index tensors) and target tokens over all
    ranks. Every rank derives all ranks' batches (same seed and epoch), so it knows that count without asking."""
    shards = [split.batches(cfg.max_tokens, seed=cfg.seed, epoch=epoch, shuffle=True, rank=r, world_size=world,
                            pad_multiple=cfg.pad_multiple) for r in range(world)]
    starts = range(0, len(shards[rank]), cfg.grad_accum)
    return [(shards[rank][i:i + cfg.grad_accum],
             float(sum(int(split.tgt_len[idx].sum()) for s in shards for idx in s[i:i + cfg.grad_accum])))
            for i in starts]


def stop_reason(cfg: Config, state: TrainState, stop: StopSignal, started: float, world: int,
                device: str) -> tuple[str, float | None]:
    """Why the run stops before this step ("" to go on), and the fraction of --max_minutes spent. Ranks must stop at
    the same step and use the same learning rate: under DDP they compare reasons and clocks at log steps only (a
    host sync; between them the fraction is None: keep the last), and a signal to any rank stops them all."""
    if cfg.max_steps and state.step >= cfg.max_steps:
        return f"max_steps={cfg.max_steps}", None
    signalled = bool(stop.name)
    minutes = (time.time() - started) / (60 * cfg.max_minutes) if cfg.max_minutes else 0.0
    no_progress = bool(cfg.patience and state.stale >= cfg.patience)  # (rank 0 validates, so only it knows)
    if world > 1:
        if state.step % cfg.log_interval:
            return "", None
        agreed = torch.tensor([signalled, minutes, no_progress], dtype=torch.float64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        signalled, minutes, no_progress = bool(agreed[0]), float(agreed[1]), bool(agreed[2])
        stop.name = stop.name or ("a signal to another rank" if signalled else "")  # rank 0 then saves ckpt.pt
    if signalled:
        return stop.name, minutes
    return (f"max_minutes={cfg.max_minutes}" if minutes > 1 else "early stopping" if no_progress else ""), minutes


def budget_used(cfg: Config, state: TrainState, epoch_steps: int, minutes: float) -> float:
    """How much of the run's budget is spent, 0 to 1: of max_steps, max_minutes or max_epochs, whichever is furthest
    (it ends the run first). --cooldown uses it."""
    return max(state.step / cfg.max_steps if cfg.max_steps else 0.0, minutes,
               (state.epoch + state.batch / max(epoch_steps, 1)) / cfg.max_epochs if cfg.max_epochs else 0.0)


def lr_factor(step: int, warmup: int, cooldown: float = 0.0, used: float = 0.0) -> float:
    """Section 5.3: linear warmup, then decay with the inverse square root of the step (1.0 at the peak). With a
    cooldown, the last `cooldown` of the budget (`used`: the fraction spent) brings it linearly down to 0."""
    step = step + 1
    factor = min(step / warmup, math.sqrt(warmup / step)) if warmup > 0 else 1.0 / math.sqrt(step)
    return factor * min(1.0, max(0.0, 1.0 - used) / cooldown) if cooldown > 0 else factor


def train_step(train_model: torch.nn.Module, model: Transformer, optimizer, scaler, micro_batches: list,
               n_tokens: float, cfg: Config, autocast, step: int, rank: int = 0, world: int = 1,
               used: float = 0.0) -> tuple:
    """One optimizer step over micro_batches, (src, tgt_in, labels) triples of n_tokens target tokens over all
    ranks, with `used` of the budget spent (budget_used). Returns the summed loss and whether the step was finite
    (else the update was skipped), as device tensors: nothing here waits for the GPU. bench.py times this function."""
    for group in optimizer.param_groups:
        group["lr"] = group["peak_lr"] * lr_factor(step, cfg.warmup_steps, cfg.cooldown, used)
    # Dropout masks are a function of (seed, rank, step): a resumed run draws exactly the masks the uninterrupted one
    # would, on every rank, with no RNG state to save; and ranks draw different masks.
    torch.manual_seed(hash((cfg.seed, rank, step)))
    # The loss is summed over tokens and divided by the token count of the whole step, across micro-batches and
    # ranks, so accumulation and DDP compute exactly the gradient of one big batch.
    loss_sum = torch.zeros((), device=micro_batches[0][0].device)
    for i, (src, tgt_in, labels) in enumerate(micro_batches):
        sync = contextlib.nullcontext() if world == 1 or i == len(micro_batches) - 1 else train_model.no_sync()
        with sync, autocast:
            loss = train_model(src, tgt_in, labels, cfg.label_smoothing).sum()  # DataParallel: one per GPU
            scaler.scale(loss * world / n_tokens).backward()  # DDP averages over ranks: undo it
        loss_sum += loss.detach()
    scaler.unscale_(optimizer)
    ok = torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
    if not scaler.is_enabled():  # (the fp16 scaler finds and skips non-finite steps by itself)
        optimizer.found_inf = (~ok).float()  # the fused AdamW kernel skips this update
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, ok


class Progress:
    """What rank 0 shows while training: a progress bar per epoch (with TQDM_DISABLE=1, a line per log step) with
    loss, learning rate and speed, TensorBoard, and once, early, how long an epoch takes. Losses stay on the device
    until a log step reads them; validating counts for no speed."""

    def __init__(self, cfg: Config, device: str, first_step: int, started: float):
        self.cfg, self.device, self.first_step, self.started = cfg, device, first_step, started
        self.writer = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(cfg.out_dir, "tb"))
        self.loss = torch.zeros(2, device=device)  # (sum of the good steps' losses per token, their number)
        self.tokens = 0.0  # target tokens trained on since the last log
        self.validating = 0.0  # seconds spent validating so far
        self.last_log = self.clock()

    def clock(self) -> float:
        """Seconds so far, less validation, once the device has done the work queued."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return time.time() - self.validating

    def start_epoch(self, state: TrainState, steps: int) -> None:
        self.steps_per_epoch = steps
        self.bar = tqdm(total=steps, initial=state.batch, desc=f"epoch {state.epoch + 1}", dynamic_ncols=True,
                        file=sys.stderr, leave=False)

    def step_done(self, step: int, loss: torch.Tensor, ok: torch.Tensor, n_tokens: float, lr: float) -> None:
        self.bar.update(1)
        self.loss += torch.stack([torch.where(ok, loss / n_tokens, 0.0), ok.float()])
        self.tokens += n_tokens
        if step == self.first_step + 1:
            self.timed_from = self.clock()
        elif step == self.first_step + 1 + SPEED_STEPS:
            per_step = (self.clock() - self.timed_from) / SPEED_STEPS
            log(f"speed: {per_step:.3g} s/step, so about {per_step * self.steps_per_epoch / 60:.1f} min per epoch of "
                f"{self.steps_per_epoch} steps")
        if step % self.cfg.log_interval == 0:
            total, good = self.loss.tolist()  # host syncs: log steps only
            now = self.clock()
            loss_avg = total / max(1.0, good)
            tok_s = self.tokens / (now - self.last_log)
            self.bar.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
            if self.bar.disable:  # no progress bar (TQDM_DISABLE=1): a log line instead
                tqdm.write(f"step {step}: train loss {loss_avg:.3f} lr {lr:.2e} {tok_s:.0f} target tok/s",
                           file=sys.stderr)
            for key, value in (("loss", loss_avg), ("lr", lr), ("tokens_per_s", tok_s)) if self.writer else ():
                self.writer.add_scalar(f"train/{key}", value, step)
            self.loss.zero_()
            self.tokens = 0.0
            self.last_log = now


# ---------------------------------------------------------------- validation, checkpoints and the test score

@torch.no_grad()
def validate(model: Transformer, data, cfg: Config, split: str = "val", n_examples: int = 0) -> dict:
    """Loss over the pairs that fit max_len, and sacreBLEU / chrF of the model's beam search over the whole split."""
    part = getattr(data, split)
    device = next(model.parameters()).device
    dtype, _ = precision(cfg, device.type)
    total, count = torch.zeros((), device=device), 0
    with model.evaluating(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for idx in part.batches(cfg.eval_max_tokens, shuffle=False):
            src, tgt_in, labels = part.batch(idx, device)
            total += model(src, tgt_in, labels)
            count += int(part.tgt_len[idx].sum())
        hyps = translate_sentences(model, data.tokenizer, part.src_text, cfg.beam_size)
    for i in range(min(n_examples, len(hyps))):
        tqdm.write(f"  src: {part.src_text[i]}\n  ref: {part.tgt_text[i]}\n  hyp: {hyps[i]}", file=sys.stderr)
    return {"loss": float(total) / max(count, 1), **score(hyps, part.tgt_text), "n": len(hyps), "hyps": hyps}


def save_checkpoint(path: str, model: Transformer, cfg: Config, tok: Tokenizer, state: TrainState,
                    skips: SkippedSteps, optimizer=None, scaler=None) -> None:
    """ckpt.pt holds everything to resume exactly (given the optimizer and scaler); best.pt what translating and
    fine-tuning need (a third of the size: no optimizer moments). A failed write stops the run."""
    ckpt = {"model": model.state_dict(), "state": {**asdict(state), **skips.saved()}, "config": asdict(cfg),
            "tokenizer": tok.to_str()}
    if optimizer is not None:
        ckpt.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
    atomic_save(ckpt, path)


def averaged_files(out_dir: str) -> list[str]:
    """avg-<step>.pt: the weights of the last validations (--avg_last), oldest first."""
    return sorted(f for f in os.listdir(out_dir) if f.startswith("avg-") and f.endswith(".pt"))


def validate_and_save(model: Transformer, optimizer, scaler, data, cfg: Config, state: TrainState,
                      skips: SkippedSteps, progress: Progress) -> None:
    """Validate and log it; bring best.pt, the weights for averaging and ckpt.pt up to date."""
    t0 = time.time()
    res = validate(model, data, cfg, n_examples=cfg.n_examples)
    better = res["bleu"] > state.best_bleu
    state.stale = 0 if better else state.stale + 1
    state.best_bleu = max(state.best_bleu, res["bleu"])
    state.history.append([state.step, res["loss"], res["bleu"], res["chrf"]])
    tqdm.write(f"step {state.step}: val loss {res['loss']:.3f} BLEU {res['bleu']:.2f} chrF {res['chrf']:.2f}"
               f"{' (best)' if better else ''} [{(time.time() - progress.started) / 60:.1f} min, validation "
               f"{time.time() - t0:.1f} s]", file=sys.stderr)
    tok, writer = data.tokenizer, progress.writer
    if writer:
        for key in ("loss", "bleu", "chrf"):
            writer.add_scalar(f"val/{key}", res[key], state.step)
        writer.add_text("val/examples", "\n\n".join(f"src: {s}  \nref: {r}  \nhyp: {h}" for s, r, h in zip(
            data.val.src_text[:cfg.n_examples], data.val.tgt_text, res["hyps"])), state.step)
        from visualize import attention_figure
        writer.add_figure("val/cross_attention", attention_figure(model, tok, data.val.src_text[0]), state.step)
    # ckpt.pt last: once it says this validation happened, best.pt and the averaging files already hold it.
    if better or not os.path.exists(os.path.join(cfg.out_dir, "best.pt")):
        save_checkpoint(os.path.join(cfg.out_dir, "best.pt"), model, cfg, tok, state, skips)
    if cfg.avg_last:
        atomic_save(model.state_dict(), os.path.join(cfg.out_dir, f"avg-{state.step:07d}.pt"))
        for old in averaged_files(cfg.out_dir)[:-cfg.avg_last]:
            os.remove(os.path.join(cfg.out_dir, old))
    save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), model, cfg, tok, state, skips, optimizer, scaler)
    progress.validating += time.time() - t0


def finish(model: Transformer, data, cfg: Config, state: TrainState) -> None:
    """Optionally average the last validations' weights; then score the best model on the test split."""
    best_path = os.path.join(cfg.out_dir, "best.pt")
    best = read_checkpoint(best_path)
    files = averaged_files(cfg.out_dir)
    if cfg.avg_last and len(files) > 1:
        weights = [read_checkpoint(os.path.join(cfg.out_dir, f), keys=()) for f in files]
        model.load_state_dict({k: sum(w[k].float() for w in weights) / len(weights) for k in weights[0]})
        res = validate(model, data, cfg)
        log(f"average of the last {len(weights)} validations: val BLEU {res['bleu']:.2f} "
            f"(best single: {state.best_bleu:.2f})")
        if res["bleu"] > state.best_bleu:
            best["model"] = model.state_dict()
            best["state"]["best_bleu"] = res["bleu"]
            atomic_save(best, best_path)
    model.load_state_dict(best["model"])
    res = validate(model, data, cfg, split="test")
    log(f"test (best.pt, val BLEU {best['state']['best_bleu']:.2f}): loss {res['loss']:.3f}")
    print(f"test sacreBLEU={res['bleu']:.2f} lowercased={res['bleu_lc']:.2f} chrF={res['chrf']:.2f} n={res['n']} "
          f"beam={cfg.beam_size}", flush=True)


# ---------------------------------------------------------------- main

def main(argv: list[str]) -> None:
    stop = StopSignal()
    cfg, resume, init = resolve_config(argv)
    rank, world, device = setup_distributed(pick_device(cfg.device))
    master = rank == 0
    torch.manual_seed(cfg.seed)  # the initial weights
    if master:
        make_run_dir(cfg)

    # --- data and model (a resumed or fine-tuned run keeps the checkpoint's tokenizer and weights)
    source = resume or init
    if world > 1 and not master:
        dist.barrier()  # rank 0 trains the tokenizer and fills the cache first; the others then read the same files
    data = load_data(cfg, Tokenizer.from_str(source["tokenizer"]) if source else None)
    if world > 1 and master:
        dist.barrier()
    model, optimizer = build(cfg, source, data.tokenizer, device)
    dtype, use_scaler = precision(cfg, device)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None)
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)  # fp16 only
    state, skips = restore(resume, optimizer, scaler, device)
    train_model = wrap(model, cfg, device, world)
    started = time.time()
    if master:  # what will run, on what (and, from Progress after a few steps, for how long)
        atomic_save(data.tokenizer.to_str(), os.path.join(cfg.out_dir, "tokenizer.json"))
        on = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{torch.get_num_threads()} threads"
        log(f"{f'resuming from {cfg.out_dir}/ckpt.pt' if resume else 'training preset ' + split_preset(argv)[0]}: "
            f"{model.num_parameters() / 1e6:.2f}M parameters on {device} ({on}), {world} process(es), "
            f"{str(dtype or torch.float32)[6:]}{' with a gradient scaler' if use_scaler else ''}")
        progress = Progress(cfg, device, state.step, started)

    train_model.train()
    reason, minutes = "", 0.0
    while not reason:
        # --- plan the epoch's batches
        if cfg.max_epochs and state.epoch >= cfg.max_epochs:
            reason = f"max_epochs={cfg.max_epochs}"
            break
        plan = plan_epoch(data.train, cfg, state.epoch, rank, world)
        if master:
            progress.start_epoch(state, len(plan))
        for indices, n_tokens in plan[state.batch:]:  # a resumed run skips the steps it took already
            # --- agree to stop
            reason, agreed = stop_reason(cfg, state, stop, started, world, device)
            if reason:
                break
            minutes = minutes if agreed is None else agreed
            # --- one training step (no host sync); the fp16 scaler counts its own skips
            batches = [data.train.batch(idx, device, cfg.pad_multiple) for idx in indices]
            loss, ok = train_step(train_model, model, optimizer, scaler, batches, n_tokens, cfg, autocast,
                                  step=state.step, rank=rank, world=world,
                                  used=budget_used(cfg, state, len(plan), minutes))
            if not scaler.is_enabled():
                skips.record(ok)
            state.step += 1
            state.batch += 1
            # --- log (host syncs: log steps only)
            if state.step % cfg.log_interval == 0:
                skips.check(state.step, cfg, master)
            if master:
                progress.step_done(state.step, loss, ok, n_tokens, optimizer.param_groups[0]["lr"])
            # --- validate and checkpoint, every eval_interval steps (else after each epoch, below)
            if master and cfg.eval_interval and state.step % cfg.eval_interval == 0:
                validate_and_save(model, optimizer, scaler, data, cfg, state, skips, progress)
        if master:
            progress.bar.close()
        if not reason:  # --- the epoch is over
            state.epoch += 1
            state.batch = 0
            if master and not cfg.eval_interval:
                validate_and_save(model, optimizer, scaler, data, cfg, state, skips, progress)

    # --- stop: save ckpt.pt; after a signal to resume from, else with the final weights validated, then test
    skips.check(state.step, cfg, master)  # the steps since the last log step
    if master:
        log(f"stopping at step {state.step}: {reason}")
        validated = state.history and state.history[-1][0] == state.step
        if not stop.name and (not validated or not os.path.exists(os.path.join(cfg.out_dir, "best.pt"))):
            validate_and_save(model, optimizer, scaler, data, cfg, state, skips, progress)
        save_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"), model, cfg, data.tokenizer, state, skips, optimizer,
                        scaler)
        if stop.name:
            again = "torchrun ... train.py" if world > 1 else "python train.py"
            log(f"saved {cfg.out_dir}/ckpt.pt; resume with the same command, e.g. {again} --out_dir={cfg.out_dir}")
        else:
            finish(model, data, cfg, state)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
