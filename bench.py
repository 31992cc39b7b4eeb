"""
Speed: training tokens/s and MFU against torch.nn.Transformer of the same size, decoding speed with and without
the KV cache (and against CTranslate2 on the same checkpoint, when it is installed), on real Multi30k batches.

    python bench.py                                   # base preset, best device (bf16 + torch.compile on CUDA)
    python bench.py --preset=multi30k_en_de --device=cpu --ckpt=out-ende   # the README's CPU figures
    python bench.py --preset=tiny --ckpt=out-tiny     # decode with trained weights (realistic output lengths)
    python bench.py --steps=2 --sentences=16          # a quick smoke run
    python bench.py --profile=5                       # plus the kernels that take the time, over 5 steps
    python bench.py --preset=multi30k_en_de --device=cpu --dtype=float32    # fp32 even where AMX gives bf16
    python bench.py --data_pairs=4500000              # the data path at WMT14's size (a synthetic corpus)

The last line sums it up: train_tok_s=... mfu=... ratio_vs_nn_transformer=... greedy_s=... beam5_s=...
"""
import contextlib
import copy
import gzip
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import export
from checkpoint import load_model
from config import Config, UserError, check, compiles, get_config, parse_args, pick_device, precision, run_main
from dataset import encode_sources, load_data, log, pad_rows
from model import KVCache, PositionalEncoding, TokenEmbedding, Transformer
from train import make_optimizer, train_step
from translate import score, translate_sentences

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' datasheets; other devices get a measured matmul rate.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12, "4090": 165e12, "3090": 71e12}


@dataclass
class Options:
    preset: str = "base"  # the model size to measure
    device: str = "auto"
    steps: int = 20  # timed training steps per model (after warmup), each on a different batch of an epoch
    sentences: int = 1000  # test sentences to decode
    uncached: int = 100  # of which this many also without the KV cache (slow: quadratic in the output length)
    ckpt: str = ""  # decode with these trained weights (default: the untrained model, which runs to max length)
    data_dir: str = "../shared/data/multi30k"  # real Multi30k batches (falls back to the config's default)
    max_tokens: int = 0  # token budget of a training batch (0: the preset's)
    dtype: str = "auto"  # precision, as train.py's --dtype; on a CPU in bf16, ours in fp32 eager is timed too
    compile: str = "auto"  # torch.compile, as train.py's --compile: auto (CUDA only), on or off
    profile: int = 0  # profile this many training steps of ours: where the time goes (0: off)
    data_pairs: int = 0  # instead, time the data path on a synthetic corpus of this many pairs (WMT14: 4.5M)
    workdir: str = "/tmp/bench-data"  # --data_pairs: where the corpus and its cache go


warnings.filterwarnings("ignore", message="enable_nested_tensor")  # nn.Transformer's inference-only fast path


class TorchTransformer(nn.Module):
    """torch.nn.Transformer with the same embeddings, positional encoding, tied output and loss as ours, so that
    train.py's train_step and optimizer run it exactly as they run ours."""

    configure_optimizer = Transformer.configure_optimizer  # AdamW, decay on matrices only

    def __init__(self, cfg: Config, vocab_size: int, pad_id: int):
        super().__init__()
        self.pad_id = pad_id
        self.embed = TokenEmbedding(vocab_size, cfg.d_model)
        self.positional = PositionalEncoding(cfg.d_model, cfg.max_len)
        self.transformer = nn.Transformer(cfg.d_model, cfg.n_heads, cfg.n_encoder_layers, cfg.n_decoder_layers,
                                          cfg.d_ff, cfg.dropout, batch_first=True, norm_first=cfg.pre_norm)
        # Its one dropout rate goes everywhere; give attention and the FFN's hidden layer ours (the presets: 0), and
        # the embeddings theirs, so that both take the same random draws as train.py's step.
        for layer in [*self.transformer.encoder.layers, *self.transformer.decoder.layers]:
            layer.dropout.p = cfg.act_dropout
            for attn in (layer.self_attn, getattr(layer, "multihead_attn", layer.self_attn)):
                attn.dropout = cfg.attn_dropout
        self.dropout = nn.Dropout(cfg.dropout)
        self.generator = nn.Linear(cfg.d_model, vocab_size)
        self.generator.weight = self.embed.embedding.weight

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, labels: torch.Tensor | None = None,
                label_smoothing: float = 0.0) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1), device=src.device)
        src_pad = src == self.pad_id  # nn.Transformer's convention: True = masked out
        # its fastest SDPA kernel: on a CPU in bf16 the math one trains 3-4x faster than flash (README, Speed)
        slow_flash = self.training and src.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        with sdpa_kernel(SDPBackend.MATH) if slow_flash else contextlib.nullcontext():
            out = self.transformer(self.dropout(self.positional(self.embed(src))),
                                   self.dropout(self.positional(self.embed(tgt_in))),
                                   tgt_mask=causal, src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad,
                                   tgt_is_causal=True)
        logits = self.generator(out)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=self.pad_id,
                               label_smoothing=label_smoothing, reduction="sum")


def clock(device: str) -> float:
    """time.perf_counter(), once the device has finished the work queued (as train.py's Progress.clock)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_flops(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """The device's matmul peak in the training precision: a GPU's datasheet bf16 figure, else a measured square
    matmul (8192 on a GPU, 2048 on a CPU, where larger ones add nothing)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_BF16.items():
            if key in name and dtype is torch.bfloat16:
                return flops, "datasheet"
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ a
    t = clock(device)
    for _ in range(10):
        a @ a
    return 10 * 2 * n ** 3 / (clock(device) - t), f"measured {n}x{n} matmul"


def train_steps(models: dict, batches: list, device: str, profile: int = 0) -> tuple[dict, dict, str]:
    """Mean seconds per training step of each model over the batches, each once (train.py's tokens/s is a mean too),
    in alternating rounds so that all see the same machine load. models: name -> (model, its Config); batches:
    ((src, tgt_in, labels), target tokens). Each model takes train.py's own train_step in its Config's precision.
    Also each model's warmup seconds, and with profile > 0 the profiler's table over that many steps of the first."""
    cuda = device.startswith("cuda")
    setups = {}
    for name, (model, cfg) in models.items():
        dtype, use_scaler = precision(cfg, device)
        autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None)
        fn = torch.compile(model, dynamic=True) if compiles(cfg, device) else model  # as train.py: dynamic shapes
        setups[name] = (fn, model, make_optimizer(model, cfg), torch.amp.GradScaler("cuda", enabled=use_scaler), cfg,
                        autocast)
    taken = dict.fromkeys(models, 0)  # each model's steps so far: its learning rate and dropout seed follow them

    def step(name: str, batch) -> None:
        fn, model, optimizer, scaler, cfg, autocast = setups[name]
        tensors, n_tokens = batch
        train_step(fn, model, optimizer, scaler, [tensors], n_tokens, cfg, autocast, step=taken[name])
        taken[name] += 1

    # Warmup: compilation, allocation, and one step per shape of the timed batches: oneDNN (bf16 on a CPU) and cuBLAS
    # choose kernels per shape, and train.py meets an epoch's few dozen shapes again in every epoch.
    shapes = {(tensors[0].shape, tensors[1].shape): (tensors, n) for tensors, n in batches}
    warmup = {}
    for name in setups:
        t = clock(device)
        for batch in [batches[0], *shapes.values()]:
            step(name, batch)
        warmup[name] = clock(device) - t
    times = dict.fromkeys(setups, 0.0)
    rounds = min(len(batches), 5)
    for r in range(rounds):
        for name in setups:
            t = clock(device)
            for batch in batches[r * len(batches) // rounds:(r + 1) * len(batches) // rounds]:
                step(name, batch)
            times[name] += clock(device) - t
    table = ""
    if profile:
        from torch.profiler import ProfilerActivity
        first = next(iter(setups))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t = time.perf_counter()
        try:  # a profiler that cannot start (no CUPTI, say) must not cost the measurements above
            with torch.profiler.profile(activities=activities) as prof:
                for i in range(profile):
                    step(first, batches[i % len(batches)])
                clock(device)
            wall = (time.perf_counter() - t) / profile
            # On CUDA: kernels by their own device time; a device total well under the wall time means the host
            # (Python, kernel launches) is the limit, not the GPU.
            table = (f"profile: {profile} training step(s) of {first} ({wall * 1e3:.1f} ms/step wall clock, "
                     f"profiler included):\n" + prof.key_averages().table(
                         sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=15))
        except Exception as e:
            table = f"profile: unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return {name: t / len(batches) for name, t in times.items()}, warmup, table


def decode_time(model: Transformer, tok, texts: list[str], beam: int, use_cache: bool,
                device: str) -> tuple[float, int, list[str]]:
    """Seconds to translate the texts as translate.py does (token-budget batches, its precision), about how many
    target tokens that produced (the output re-encoded, plus EOS), and the translations."""
    t = clock(device)
    hyps = translate_sentences(model, tok, texts, beam, use_cache=use_cache)
    return clock(device) - t, sum(len(h) + 1 for h in tok.encode(hyps)), hyps


@torch.no_grad()
def decode_curve(model: Transformer, src: torch.Tensor, lengths: list[int], device: str) -> list[tuple]:
    """Seconds to produce L tokens for a batch, with and without the cache: linear vs quadratic in L."""
    memory, src_mask = model.encode(src)
    rows = []
    for n in lengths:
        result = []
        for use_cache in (True, False):
            tokens = torch.full((src.size(0), 1), model.bos_id, device=device)
            cache = KVCache(len(model.decoder)) if use_cache else None
            t = clock(device)
            for _ in range(n):
                nxt = model._next_logits(tokens, memory, src_mask, cache).argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, nxt], 1)
            result.append(clock(device) - t)
        rows.append((n, *result))
    return rows


@torch.inference_mode()
def decoding(model: Transformer, tok, texts: list[str], refs: list[str], device: str, n_uncached: int) -> dict:
    """Print the decoding times, greedy and beam 5, with and without the KV cache (with BLEU), the time per output
    length, and one sentence's latency. Returns (seconds, tokens, translations) by beam size, with the cache."""
    ids, _ = encode_sources(tok, texts, model.cfg.max_len)
    results = {}
    print(f"decoding ({model.cfg.eval_max_tokens}-token batches, as translate.py and validation do):")
    for beam in (1, 5):
        name = "greedy" if beam == 1 else f"beam {beam}"
        decode_time(model, tok, texts[:64], beam, True, device)  # warmup
        s, n, hyps = results[beam] = decode_time(model, tok, texts, beam, True, device)
        print(f"  {name:7s} {s:7.2f} s for {len(texts)} sentences, {len(texts) / s:7.1f} sent/s, {n / s:7.0f} tok/s, "
              f"BLEU {score(hyps, refs)['bleu']:.2f}")
        few = texts[:n_uncached]
        cached, uncached = (decode_time(model, tok, few, beam, use_cache, device)[0] for use_cache in (True, False))
        print(f"  {name:7s} KV cache speed-up on {len(few)} sentences: {uncached / cached:.2f}x ({cached:.2f} s with, "
              f"{uncached:.2f} s without)")
    src = pad_rows(ids[:32], tok.pad_id).to(device)
    print("decode time vs output length (32 sentences; seconds with cache / without):")
    for n, with_cache, without in decode_curve(model, src, [8, 16, 32, 64], device):
        print(f"  {n:3d} tokens: {with_cache:6.3f} / {without:6.3f}")
    for beam in (1, 5):  # latency: one sentence, from its source ids to its last output token
        times = []
        for _ in range(5):
            t = clock(device)
            model.generate(src[:1], beam_size=beam)
            times.append(clock(device) - t)
        print(f"  one sentence, {'greedy' if beam == 1 else 'beam 5'}: {statistics.median(times) * 1e3:.1f} ms")
    return results


def ctranslate2_rows(ckpt: str, texts: list[str], refs: list[str], ours: dict) -> None:
    """The same checkpoint exported to CTranslate2 (float32 and int8), decoding the same texts on the same threads:
    seconds, BLEU, and how many translations equal ours."""
    try:
        import ctranslate2  # noqa: F401 (optional: only this comparison needs it)
    except ImportError:
        print("CTranslate2: not installed (pip install ctranslate2), comparison skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for quantization in ("float32", "int8"):
            path = export.export(ckpt, os.path.join(tmp, quantization), quantization.replace("float32", ""))
            translator, tok, cfg = export.load_exported(path, threads=torch.get_num_threads())
            for beam in (1, 5):
                export.translate_exported(translator, tok, cfg, texts[:64], beam)  # warmup
                t = time.perf_counter()
                hyps = export.translate_exported(translator, tok, cfg, texts, beam)
                s = time.perf_counter() - t
                same = sum(a == b for a, b in zip(hyps, ours[beam][2])) / len(hyps)
                print(f"  CTranslate2 {quantization:7s} {'greedy' if beam == 1 else 'beam 5':6s}: {s:7.2f} s, ours "
                      f"{ours[beam][0] / s:.2f}x its time, BLEU {score(hyps, refs)['bleu']:.2f}, {same:.1%} "
                      f"translations identical to ours")


# --data_pairs: a fresh process loads the data (first from nothing, then from the cache) and plans one epoch.
DATA_CHILD = """
import json, sys, time
from dataclasses import replace
from config import Config
from dataset import load_data
t0 = time.perf_counter()
data = load_data(replace(Config(), data_dir=sys.argv[1], cache_dir=sys.argv[2], hf_dataset=""))
t1 = time.perf_counter()
batches = data.train.batches(25_000, seed=0, epoch=0)
print(json.dumps({"load_s": t1 - t0, "plan_s": time.perf_counter() - t1, "pairs": len(data.train)}))
"""


def make_corpus(folder: str, pairs: int, multi30k: str, seed: int = 0) -> None:
    """WMT14's size without WMT14 (the Hub is not always reachable): each training line joins two random Multi30k
    training sentences (about 26 words, like WMT news); validation and test are Multi30k's own."""
    def read(name: str) -> list[str]:
        with gzip.open(os.path.join(multi30k, name + ".gz"), "rt", encoding="utf-8") as f:
            return f.read().splitlines()

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    for lang in ("en", "de"):
        for name in ("val", "test_2016_flickr"):
            shutil.copy(os.path.join(multi30k, f"{name}.{lang}.gz"), folder)
    src, tgt = read("train.en"), read("train.de")
    with open(os.path.join(folder, "train.en"), "w") as f_src, open(os.path.join(folder, "train.de"), "w") as f_tgt:
        for start in range(0, pairs, 100_000):
            picks = [(rng.randrange(len(src)), rng.randrange(len(src))) for _ in range(min(100_000, pairs - start))]
            f_src.write("".join(f"{src[i]} {src[j]}\n" for i, j in picks))
            f_tgt.write("".join(f"{tgt[i]} {tgt[j]}\n" for i, j in picks))


def bench_data(opt: Options) -> None:
    """Time load_data on a corpus of opt.data_pairs pairs: the first preparation (read, train the tokenizer on a
    sample, encode, write the cache) and a second start from the cache, each in a fresh process with its peak RSS."""
    corpus, cache = os.path.join(opt.workdir, f"corpus-{opt.data_pairs}"), os.path.join(opt.workdir, "cache")
    if not os.path.isdir(corpus) and not os.path.isfile(os.path.join(opt.data_dir, "train.en.gz")):
        raise UserError(f"--data_dir={opt.data_dir} has no train.en.gz: the corpus is built from Multi30k's files")
    if not os.path.isdir(corpus):
        make_corpus(corpus + ".tmp", opt.data_pairs, opt.data_dir)
        os.replace(corpus + ".tmp", corpus)
    print(f"corpus: {opt.data_pairs} pairs, {sum(os.path.getsize(e.path) for e in os.scandir(corpus)) / 1e6:.0f} MB")
    shutil.rmtree(cache, ignore_errors=True)
    for name in ("first preparation", "second start (cache)"):
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", DATA_CHILD, corpus, cache], stdout=subprocess.PIPE,
                                cwd=os.path.dirname(os.path.abspath(__file__)))
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status:
            raise UserError(f"the {name} failed (wait status {status})")
        r = json.loads(out.decode().splitlines()[-1])
        print(f"{name}: {time.perf_counter() - t0:.1f} s wall (load_data {r['load_s']:.1f} s), peak RSS "
              f"{usage.ru_maxrss / 2**20:.2f} GiB; one epoch's batch list (25k-token batches) {r['plan_s']:.2f} s")


def main(argv: list[str]) -> None:
    opt, _ = parse_args(argv, Options())
    if opt.data_pairs:
        return bench_data(opt)
    if opt.steps <= 0 or opt.sentences <= 0 or opt.profile < 0:
        raise UserError("--steps and --sentences must be positive, --profile not negative")
    device = pick_device(opt.device)
    cfg = get_config([f"--preset={opt.preset}"])  # an unknown preset: one line naming the valid ones
    cfg = replace(cfg, device=device, dtype=opt.dtype, compile=opt.compile, max_tokens=opt.max_tokens or cfg.max_tokens,
                  data_dir=opt.data_dir if os.path.isdir(opt.data_dir) else cfg.data_dir)
    check(cfg)
    torch.manual_seed(0)
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cores = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    name = torch.cuda.get_device_name(device) if cuda else cores
    print(f"device: {name}; preset {opt.preset}; torch {torch.__version__}")

    data = load_data(cfg)
    tok = data.tokenizer
    ours = Transformer(cfg, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id).to(device).train()
    theirs = TorchTransformer(cfg, tok.vocab_size, tok.pad_id).to(device).train()
    print(f"parameters: ours {ours.num_parameters() / 1e6:.2f}M, nn.Transformer "
          f"{sum(p.numel() for p in theirs.parameters()) / 1e6:.2f}M")
    epoch = data.train.batches(cfg.max_tokens, seed=0, epoch=0)  # seeded and shuffled, as train.py plans one
    index = [epoch[i * len(epoch) // opt.steps] for i in range(opt.steps)]  # spread over it: the epoch's mix of shapes
    batches = [(data.train.batch(idx, device), float(data.train.tgt_len[idx].sum())) for idx in index]
    useful = statistics.mean(n for _, n in batches)
    flops = statistics.mean(ours.estimate_flops(data.train.src_len[idx], data.train.tgt_len[idx]) for idx in index)
    padded = statistics.mean(tensors[2].numel() for tensors, _ in batches)
    dtype = precision(cfg, device)[0] or torch.float32
    models = {"ours": (ours, cfg), "nn.Transformer": (theirs, cfg)}
    if dtype is not torch.float32 and not cuda:  # the same run's fp32 eager step: what the CPU's bf16 units gain
        models["ours fp32"] = (copy.deepcopy(ours), replace(cfg, dtype="float32", compile="off"))
    sec, warmup, profile = train_steps(models, batches, device, opt.profile)
    ratio = sec["ours"] / sec["nn.Transformer"]
    train_tok_s = useful / sec["ours"]
    compiled = compiles(cfg, device)
    print(f"training ({str(dtype)[6:]}{' + torch.compile' if compiled else ', eager'}, {cfg.max_tokens}-token batches, "
          f"{useful:.0f} useful target tokens of {padded:.0f} padded per step, mean over {len(index)} of an epoch's "
          f"{len(epoch)} batches):")
    for key, s in sec.items():
        print(f"  {key:15s} {s * 1e3:8.1f} ms/step  {useful / s:10.0f} target tok/s")
    if "ours fp32" in sec:
        print(f"  ours {str(dtype)[6:]} / ours fp32 eager: {sec['ours fp32'] / sec['ours']:.2f}x the tokens/s")
    peak, how = peak_flops(device, dtype)
    mfu = flops / sec["ours"] / peak  # on a CPU too: how far the step is from the chip's matmul rate
    print(f"  MFU {mfu:.1%} ({flops / sec['ours'] / 1e9:.1f} GFLOP/s of {peak / 1e9:.0f}, peak {how})")
    print(f"  time per step ours / nn.Transformer = {ratio:.3f}")
    print(f"  warmup steps{', compilation included' if compiled else ''}: "
          + ", ".join(f"{key} {s:.1f} s" for key, s in warmup.items()))
    if profile:
        print(profile)

    if opt.ckpt:
        model, tok = load_model(opt.ckpt, device)  # and its own tokenizer: the ids must match its embeddings
        model.cfg = replace(model.cfg, dtype=cfg.dtype)  # decoded in --dtype, not the precision it trained in
        if model.cfg.d_model != cfg.d_model:
            log(f"note: decoding uses the checkpoint's model, not preset {opt.preset}")
    else:
        model = ours.eval()
        print("decoding: untrained weights (pass --ckpt for realistic lengths): every sentence runs to its limit")
    texts, refs = data.test.src_text[:opt.sentences], data.test.tgt_text[:opt.sentences]
    results = decoding(model, tok, texts, refs, device, opt.uncached)
    if opt.ckpt and not cuda:
        ctranslate2_rows(opt.ckpt, texts, refs, results)
    memory = (f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (GPU)" if cuda else
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)")
    print(f"peak memory: {memory}")
    print(f"train_tok_s={train_tok_s:.0f} mfu={mfu:.3f} ratio_vs_nn_transformer={ratio:.3f} "
          f"greedy_s={results[1][0]:.2f} beam5_s={results[5][0]:.2f}")


if __name__ == "__main__":
    run_main(main)
