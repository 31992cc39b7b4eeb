"""
Train a translator: validation BLEU as it goes, atomic checkpoints, exact resume, one or many GPUs.

    python train.py                                           # base model, Multi30k en->de, best device
    python train.py --preset=tiny --device=cpu --max_minutes=60 --out_dir=out-tiny
    python train.py --preset=tiny --device=cpu --out_dir=out-tiny     # again: resumes from out-tiny/ckpt.pt
    python train.py --data_dir=../shared/data/multi30k --src_lang=de --tgt_lang=en
    torchrun --standalone --nproc-per-node=4 train.py         # DDP, one process per GPU
    python train.py --init_from=out-tiny --finetune=all --tgt_lang=fr --out_dir=out-fr   # fine-tune

Ctrl-C or SIGTERM saves a checkpoint and exits 0; running the same command again continues exactly where it
stopped. The last line on stdout is the test score, e.g.
`test sacreBLEU=33.11 lowercased=33.39 chrF=57.32 n=1000 beam=4` (the tiny preset after 60 CPU minutes).
"""
import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import atomic_save, build_model, checkpoint_path, read_checkpoint
from config import MODEL_KEYS, Config, UserError, config_from_dict, get_config, pick_device, precision, run_main
from dataset import Tokenizer, load_data, log
from model import Transformer
from translate import score, translate_sentences


def lr_factor(step: int, warmup: int) -> float:
    """Section 5.3: linear warmup, then decay with the inverse square root of the step (1.0 at the peak)."""
    step = step + 1
    return min(step / warmup, math.sqrt(warmup / step)) if warmup > 0 else 1.0 / math.sqrt(step)


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
        cfg = config_from_dict({**asdict(cfg), **{k: init["config"][k] for k in MODEL_KEYS if k in init["config"]}})
        return cfg, None, init
    return cfg, None, None


def setup_distributed(device_arg: str) -> tuple[int, int, str]:
    """Under torchrun: one process per device, NCCL on GPUs, gloo on CPU. Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_arg)
    device = pick_device(device_arg)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


@torch.no_grad()
def validate(model: Transformer, data, cfg: Config, device: str, autocast, split: str = "val",
             n_examples: int = 0) -> dict:
    """Loss over the pairs that fit max_len, and sacreBLEU / chrF of the model's beam search over the whole split."""
    part = getattr(data, split)
    model.eval()
    total, count = torch.zeros((), device=device), 0
    with autocast:
        for idx in part.batches(cfg.eval_max_tokens, shuffle=False):
            src, tgt_in, labels = part.batch(idx, device)
            total += model(src, tgt_in, labels)
            count += int(part.tgt_len[idx].sum())
        hyps = translate_sentences(model, data.tokenizer, part.src_text, cfg.beam_size)
    scores = score(hyps, part.tgt_text)
    for i in range(min(n_examples, len(hyps))):
        tqdm.write(f"  src: {part.src_text[i]}\n  ref: {part.tgt_text[i]}\n  hyp: {hyps[i]}", file=sys.stderr)
    model.train()
    return {"loss": float(total) / max(count, 1), **scores, "n": len(hyps), "hyps": hyps}


def main(argv: list[str]) -> None:
    # Ctrl-C and SIGTERM only raise a flag: the loop finishes its step, saves ckpt.pt and exits 0.
    stop = {"signal": None}

    def request_stop(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    cfg, resume, init = resolve_config(argv)
    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    torch.manual_seed(cfg.seed)
    if master:
        try:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
                json.dump(asdict(cfg), f, indent=1)
        except OSError as e:
            raise UserError(f"cannot write to --out_dir={cfg.out_dir}: {e.strerror or e}") from None
        log("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
        log(f"device: {device}, {world} process(es)" + (f", resuming from {cfg.out_dir}/ckpt.pt" if resume else ""))

    # --- data and tokenizer (a resumed or fine-tuned run keeps the checkpoint's tokenizer)
    source = resume or init
    tok = Tokenizer.from_str(source["tokenizer"]) if source else None
    if world > 1 and not master:
        dist.barrier()  # rank 0 trains the tokenizer and fills the cache first; the others then read the same files
    data = load_data(cfg, tok)
    if world > 1 and master:
        dist.barrier()
    tok = data.tokenizer
    if master:
        with open(os.path.join(cfg.out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            f.write(tok.to_str())

    # --- model, optimizer, precision
    if source:
        model, _ = build_model({**source, "config": asdict(cfg)}, device, verbose=master)
        model.train()
    else:
        model = Transformer(cfg, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, verbose=master).to(device)
    if cfg.finetune == "head":
        head = {id(p) for p in model.head_parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in head)
    cuda = device.startswith("cuda")
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                                          head_lr=(cfg.head_lr or cfg.lr) if cfg.finetune == "all" else None)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"]
    dtype, use_scaler = precision(cfg, device)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype) if dtype else contextlib.nullcontext()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    state = {"step": 0, "epoch": 0, "batch": 0, "best_bleu": -1.0, "stale": 0, "stale_stop": False,
             "bad_steps": 0, "worst_bad": 0, "skipped": 0, "history": []}
    if resume:
        for group in resume["optimizer"]["param_groups"]:  # older checkpoints were not fused: they are now
            group.update(fused=True, foreach=None)
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        state.update(resume["state"])

    train_model = model
    if cfg.compile == "on" or (cfg.compile == "auto" and cuda):
        # Batch shapes change every step: compile for dynamic shapes from the start. (The default compiles for the
        # first shape, then again for dynamic ones: 58 s against 41 s for the tiny model's forward and backward on a
        # CPU. One more compile can follow if sizes in the first batch happened to be equal.)
        train_model = torch.compile(model, dynamic=True)
    if world > 1:
        train_model = DDP(train_model, device_ids=[device] if cuda else None)
    elif cuda and torch.cuda.device_count() > 1 and device == "cuda":
        train_model = torch.nn.DataParallel(train_model)  # one process, several GPUs; torchrun + DDP is faster
    writer = None
    if master and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(cfg.out_dir, "tb"))

    def checkpoint(path: str, resumable: bool = True) -> None:
        """ckpt.pt holds everything to resume exactly; best.pt only what translating and fine-tuning need
        (a third of the size: no optimizer moments)."""
        ckpt = {"model": model.state_dict(), "state": {**state, **{k: int(v) for k, v in bad.items()}},
                "config": asdict(cfg), "tokenizer": tok.to_str()}
        if resumable:
            ckpt.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict())
        atomic_save(ckpt, path)

    def evaluate() -> float:
        """Validate, log, keep best.pt and ckpt.pt (and the weights for averaging) up to date. Returns the
        seconds it took, which the training speed leaves out."""
        t0 = time.time()
        res = validate(model, data, cfg, device, autocast, n_examples=cfg.n_examples)
        better = res["bleu"] > state["best_bleu"]
        state["stale"] = 0 if better else state["stale"] + 1
        state["stale_stop"] = bool(cfg.patience and state["stale"] >= cfg.patience)  # seen at the next step
        state["best_bleu"] = max(state["best_bleu"], res["bleu"])
        state["history"].append([state["step"], res["loss"], res["bleu"], res["chrf"]])
        tqdm.write(f"step {state['step']}: val loss {res['loss']:.3f} BLEU {res['bleu']:.2f} chrF {res['chrf']:.2f}"
                   f"{' (best)' if better else ''} [{(time.time() - start_time) / 60:.1f} min, validation "
                   f"{time.time() - t0:.1f} s]", file=sys.stderr)
        if writer:
            for key in ("loss", "bleu", "chrf"):
                writer.add_scalar(f"val/{key}", res[key], state["step"])
            writer.add_text("val/examples", "\n\n".join(
                f"src: {s}  \nref: {r}  \nhyp: {h}" for s, r, h in
                zip(data.val.src_text[:cfg.n_examples], data.val.tgt_text, res["hyps"])), state["step"])
            from visualize import attention_figure
            writer.add_figure("val/cross_attention", attention_figure(model, tok, data.val.src_text[0]),
                              state["step"])
        # ckpt.pt last: once it says this validation happened, best.pt and the averaging files already hold it.
        if better or not os.path.exists(os.path.join(cfg.out_dir, "best.pt")):
            checkpoint(os.path.join(cfg.out_dir, "best.pt"), resumable=False)
        if cfg.avg_last:
            atomic_save(model.state_dict(), os.path.join(cfg.out_dir, f"avg-{state['step']:07d}.pt"))
            for old in sorted(f for f in os.listdir(cfg.out_dir) if f.startswith("avg-") and f.endswith(".pt"))[
                    :-cfg.avg_last]:
                os.remove(os.path.join(cfg.out_dir, old))
        checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
        return time.time() - t0

    start_time, bar, tokens_seen, t_log = time.time(), None, 0, time.time()
    loss_sum = torch.zeros(2, device=device)  # (sum of the good steps' losses, their number) since the last log
    # Non-finite steps are counted on the device and read at log steps and at the end: no host sync per step.
    # bad_steps: in a row now; worst_bad: the longest such run and skipped: how many, since the last check.
    bad = {k: torch.full((), float(state[k]), device=device) for k in ("bad_steps", "worst_bad", "skipped")}

    def check_skipped() -> None:
        """Report the updates skipped since the last check, and stop after max_bad_steps in a row. Gradients are
        all-reduced, so every rank reads the same counters and all stop together."""
        n, worst = (int(v) for v in torch.stack([bad["skipped"], bad["worst_bad"]]).tolist())
        if n and master:
            tqdm.write(f"step {state['step']}: {n} update(s) skipped since the last log (non-finite loss or "
                       f"gradient)", file=sys.stderr)
        if worst >= cfg.max_bad_steps:
            raise UserError(f"{worst} non-finite steps in a row by step {state['step']}; stopping, the last good "
                            f"checkpoint in {cfg.out_dir} is kept (try a lower --lr)")
        bad["skipped"].zero_()
        bad["worst_bad"].copy_(bad["bad_steps"])

    last_eval = state["step"]
    reason = None
    train_model.train()
    while reason is None:
        if cfg.max_epochs and state["epoch"] >= cfg.max_epochs:
            reason = f"max_epochs={cfg.max_epochs}"
            break
        # Every rank derives every rank's batches (same seed and epoch), so each step's token count over all ranks
        # is known without communication.
        shards = [data.train.batches(cfg.max_tokens, cfg.seed, state["epoch"], True, r, world, cfg.pad_multiple)
                  for r in range(world)]
        starts = range(0, len(shards[rank]), cfg.grad_accum)
        groups = [shards[rank][i:i + cfg.grad_accum] for i in starts]
        step_tokens = [sum(int(data.train.tgt_len[idx].sum()) for s in shards for idx in s[i:i + cfg.grad_accum])
                       for i in starts]
        if master:
            bar = tqdm(total=len(groups), initial=state["batch"], desc=f"epoch {state['epoch'] + 1}",
                       dynamic_ncols=True, file=sys.stderr, leave=False)
        while state["batch"] < len(groups):
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                reason = f"max_steps={cfg.max_steps}"
                break
            time_up = cfg.max_minutes and time.time() - start_time > 60 * cfg.max_minutes
            flags = [bool(stop["signal"]), bool(time_up), state["stale_stop"]]
            if world > 1 and state["step"] % cfg.log_interval:
                flags = [False] * 3  # ranks must stop at the same step: they agree at log steps (a host sync)
            elif world > 1:
                agreed = torch.tensor(flags, dtype=torch.float32, device=device)
                dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
                flags = [bool(f) for f in agreed.tolist()]
            if any(flags):
                stop["signal"] = stop["signal"] or ("a signal to another rank" if flags[0] else None)
                reason = stop["signal"] or (f"max_minutes={cfg.max_minutes}" if flags[1] else "early stopping")
                break
            group = groups[state["batch"]]
            # The loss is summed over tokens and divided by the token count of the whole step, across
            # micro-batches and ranks, so accumulation and DDP compute exactly the gradient of one big batch.
            n_tokens = float(step_tokens[state["batch"]])
            for g in optimizer.param_groups:
                g["lr"] = g["peak_lr"] * lr_factor(state["step"], cfg.warmup_steps)
            # Dropout masks are a function of (seed, rank, step): a resumed run draws exactly the masks the
            # uninterrupted one would, on every rank, with no RNG state to save; and ranks draw different masks.
            torch.manual_seed(hash((cfg.seed, rank, state["step"])))
            step_loss = torch.zeros((), device=device)
            for i, idx in enumerate(group):
                src, tgt_in, labels = data.train.batch(idx, device, cfg.pad_multiple)
                sync = contextlib.nullcontext() if world == 1 or i == len(group) - 1 else train_model.no_sync()
                with sync, autocast:
                    loss = train_model(src, tgt_in, labels, cfg.label_smoothing).sum()  # DataParallel: one per GPU
                    scaler.scale(loss * world / n_tokens).backward()  # DDP averages over ranks: undo it
                step_loss += loss.detach()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            ok = torch.isfinite(grad_norm)
            if not use_scaler:  # (the fp16 scaler finds and skips non-finite steps by itself)
                optimizer.found_inf = found_inf = (~ok).float()  # the fused AdamW kernel skips this update
                bad["bad_steps"].add_(1).mul_(found_inf)  # a good step resets it to 0
                bad["worst_bad"].copy_(torch.maximum(bad["worst_bad"], bad["bad_steps"]))
                bad["skipped"].add_(found_inf)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch"] += 1
            loss_sum += torch.stack([torch.where(ok, step_loss / n_tokens, 0.0), ok.float()])
            tokens_seen += n_tokens
            log_now = state["step"] % cfg.log_interval == 0
            if log_now:
                check_skipped()
            if master:
                bar.update(1)
                if log_now:
                    total, good = loss_sum.tolist()  # host syncs: log steps only
                    loss_avg = total / max(1.0, good)
                    tok_s = tokens_seen / (time.time() - t_log)
                    lr = optimizer.param_groups[0]["lr"]
                    bar.set_postfix(loss=f"{loss_avg:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:.0f}")
                    if bar.disable:  # no progress bar (TQDM_DISABLE=1): a log line instead
                        tqdm.write(f"step {state['step']}: train loss {loss_avg:.3f} lr {lr:.2e} "
                                   f"{tok_s:.0f} target tok/s", file=sys.stderr)
                    if writer:
                        writer.add_scalar("train/loss", loss_avg, state["step"])
                        writer.add_scalar("train/lr", lr, state["step"])
                        writer.add_scalar("train/tokens_per_s", tok_s, state["step"])
                    loss_sum.zero_()
                    tokens_seen, t_log = 0, time.time()
            if cfg.eval_interval and state["step"] % cfg.eval_interval == 0:
                if master:
                    t_log += evaluate()
                last_eval = state["step"]
        if bar is not None:
            bar.close()
        if reason is None:
            state["epoch"] += 1
            state["batch"] = 0
            if not cfg.eval_interval:
                if master:
                    t_log += evaluate()
                last_eval = state["step"]

    check_skipped()  # the steps since the last log step
    if master:
        log(f"stopping at step {state['step']}: {reason}")
        if stop["signal"]:
            checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
            again = "torchrun ... train.py" if world > 1 else "python train.py"
            log(f"saved {cfg.out_dir}/ckpt.pt; resume with the same command, e.g. {again} --out_dir={cfg.out_dir}")
        else:
            if last_eval != state["step"] or not os.path.exists(os.path.join(cfg.out_dir, "best.pt")):
                evaluate()
            checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))  # the final state, whatever validation said
            finish(model, data, cfg, device, autocast, state)
    if world > 1:
        dist.destroy_process_group()


def finish(model: Transformer, data, cfg: Config, device: str, autocast, state: dict) -> None:
    """Optionally average the last checkpoints; then score the best model on the test split."""
    best_path = os.path.join(cfg.out_dir, "best.pt")
    best = read_checkpoint(best_path)
    avg_files = sorted(f for f in os.listdir(cfg.out_dir) if f.startswith("avg-") and f.endswith(".pt"))
    if cfg.avg_last and len(avg_files) > 1:
        weights = [read_checkpoint(os.path.join(cfg.out_dir, f), keys=()) for f in avg_files]
        model.load_state_dict({k: sum(w[k].float() for w in weights) / len(weights) for k in weights[0]})
        res = validate(model, data, cfg, device, autocast)
        log(f"average of the last {len(weights)} validations: val BLEU {res['bleu']:.2f} "
            f"(best single: {state['best_bleu']:.2f})")
        if res["bleu"] > state["best_bleu"]:
            best["model"] = model.state_dict()
            best["state"]["best_bleu"] = res["bleu"]
            atomic_save(best, best_path)
    model.load_state_dict(best["model"])
    res = validate(model, data, cfg, device, autocast, split="test")
    log(f"test (best.pt, val BLEU {best['state']['best_bleu']:.2f}): loss {res['loss']:.3f}")
    print(f"test sacreBLEU={res['bleu']:.2f} lowercased={res['bleu_lc']:.2f} chrF={res['chrf']:.2f} n={res['n']} "
          f"beam={cfg.beam_size}", flush=True)


if __name__ == "__main__":
    run_main(main)
