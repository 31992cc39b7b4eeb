"""
Every setting in one dataclass, with named presets and safe command-line overrides.

    python train.py                                   # the defaults below: Multi30k en->de
    python train.py --preset=tiny --device=cpu        # a preset, then overrides on top of it
    python train.py --preset=base --lr=5e-4 --max_minutes=30

Overrides are `--key=value`. Values are parsed as Python literals (numbers, True/False, quoted strings) and never
executed; a bare word is taken as a string where the setting is a string. Unknown keys and wrong types stop the
program with one line that names the closest valid keys.
"""
import ast
import difflib
import math
import os
import sys
from dataclasses import dataclass, fields, replace

import torch


class UserError(Exception):
    """Something the user can fix (a bad flag, a missing file): the scripts print it as one line and exit 1."""


@dataclass
class Config:
    # --- data
    data_dir: str = "data/multi30k"  # local parallel files {split}.{lang}[.gz]; read if the folder exists
    hf_dataset: str = "bentrevett/multi30k"  # else this Hub dataset (empty: local files only)
    hf_config: str = ""  # Hub configuration name, e.g. "en-it" for Helsinki-NLP/opus_books
    src_lang: str = "en"  # English -> German is the classic Multi30k direction
    tgt_lang: str = "de"
    splits: str = "train,val,test_2016_flickr"  # local file names of train,validation,test (Multi30k's)
    hf_splits: str = "train,validation,test"  # Hub split names; missing val/test are carved from train
    holdout: int = 1000  # sentences carved for val and for test when the Hub dataset only has train
    split_seed: int = 1234  # fixed, so a carved split never changes across runs or resumes
    cache_dir: str = "data/cache"  # tokenizer and token ids cached here: an epoch does no text work
    # --- tokenizer
    tokenizer: str = "bpe"  # "bpe" (subwords, shared by both languages) or "word" (the classic word vocabulary)
    vocab_size: int = 8000  # 8-10k suits 29k sentence pairs: few unknown words, frequent enough subwords
    min_frequency: int = 2  # rarer words (word level: they become <unk>) or pairs (BPE: never merged) are not learned
    max_len: int = 128  # most tokens per sentence, BOS/EOS included; longer training pairs are dropped
    # --- model
    d_model: int = 512  # width of every residual stream vector
    n_heads: int = 8  # d_model / n_heads = 64 dimensions per head, as in the paper
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048  # inner width of the feed-forward layer, 4 x d_model
    dropout: float = 0.1  # on embeddings and sublayer outputs (section 5.4)
    attn_dropout: float = 0.1  # on attention weights
    act_dropout: float = 0.0  # on the FFN's hidden ReLU output: not in the paper (tensor2tensor's relu_dropout)
    pre_norm: bool = True  # pre-norm trains stably without a long warmup; False = the paper's post-norm
    tie_embeddings: bool = True  # one shared matrix for both embeddings and the output (section 3.4)
    # --- optimization
    max_tokens: int = 8192  # token budget of one batch (per process), padding included
    grad_accum: int = 1  # batches per optimizer step: a larger effective batch without more memory
    lr: float = 7e-4  # peak learning rate, reached at the end of warmup
    head_lr: float = 0.0  # --finetune=all: learning rate of the head (0: same as lr)
    warmup_steps: int = 4000  # linear warmup, then lr * sqrt(warmup / step) (the paper's schedule, section 5.3)
    cooldown: float = 0.0  # the last fraction of the budget (below) takes the lr linearly to 0: the run ends converged
    weight_decay: float = 0.01  # AdamW decay on matrices only
    beta1: float = 0.9
    beta2: float = 0.98  # the paper's value: adapts faster than 0.999 to the changing gradient scale
    grad_clip: float = 1.0  # clip the global gradient norm: one bad batch cannot wreck the weights
    label_smoothing: float = 0.1  # section 5.4: hurts perplexity, helps BLEU
    # --- budgets (whichever comes first; 0 = no limit)
    max_steps: int = 0  # total optimizer steps, counted across resumes
    max_epochs: int = 30
    max_minutes: float = 0.0  # wall clock of this process
    # --- validation, decoding and checkpoints
    eval_interval: int = 0  # validate every N steps (0: at the end of each epoch)
    eval_max_tokens: int = 8192  # token budget of a decoding batch
    beam_size: int = 5  # beam search width for validation, test and translate.py (1 = greedy)
    length_penalty: float = 1.0  # hypothesis score / length ** length_penalty: offsets beam search's short bias
    max_len_a: float = 1.5  # a translation has at most a * source_length + b tokens
    max_len_b: int = 10
    n_examples: int = 3  # source / reference / hypothesis examples shown at each validation
    patience: int = 0  # stop after this many validations without a better BLEU (0: never)
    avg_last: int = 0  # at the end, average the weights of the last N validations (0: off)
    max_bad_steps: int = 5  # non-finite losses in a row before the run stops
    # --- fine-tuning
    init_from: str = ""  # a checkpoint (file or run directory) to start from: its weights and tokenizer
    finetune: str = ""  # "" trains from init_from as it is; "head" trains only the head; "all" everything
    # --- system
    out_dir: str = "out"  # ckpt.pt (latest), best.pt (best validation BLEU), config.json, tokenizer.json
    device: str = "auto"  # cuda, then mps, then cpu
    dtype: str = "auto"  # CUDA: bf16 where supported, else fp16 with a scaler; CPU: bf16 with AMX, else fp32
    compile: str = "auto"  # torch.compile: on for CUDA, off elsewhere (it does not pay off on CPU)
    pad_multiple: int = 1  # round batch lengths up to a multiple of this: fewer shapes for torch.compile
    seed: int = 1337
    log_interval: int = 50  # steps between progress updates (the only host syncs of the loop)
    tensorboard: bool = True  # write TensorBoard logs to out_dir/tb


# The Multi30k recipe, each choice measured on validation BLEU on 2-core CPUs (README, "Translation quality"): a small
# model (7.6M parameters) with dropout 0.3 and none inside the feed-forward layer; 2k-token batches (a CPU's step
# costs the same per token at half the size, and learns more from each); a short warmup to a high learning rate; a
# cooldown over the last 30% of the budget (annealed weights, not noisy ones); and the average of the last 10
# validations' weights. A GPU runs the same recipe.
_MULTI30K = dict(d_model=256, n_heads=4, n_encoder_layers=3, n_decoder_layers=3, d_ff=1024, dropout=0.3,
                 attn_dropout=0.0, act_dropout=0.0, max_tokens=2048, lr=3e-3, warmup_steps=600, vocab_size=8000,
                 beam_size=5, max_epochs=100, eval_interval=400, log_interval=20, avg_last=10, cooldown=0.3)

PRESETS: dict[str, dict] = {
    # The paper's base model, for corpora larger than Multi30k (on 29k pairs it overfits, and a CPU needs hours).
    "base": {},
    "multi30k_en_de": _MULTI30K,
    "multi30k_de_en": dict(_MULTI30K, src_lang="de", tgt_lang="en"),
    "multi30k_en_fr": dict(_MULTI30K, tgt_lang="fr"),
    # The earlier CPU recipe (test BLEU 33.11 after 60 minutes on 2 CPU cores: README), kept for comparison.
    "tiny": dict(_MULTI30K, dropout=0.2, act_dropout=0.2, max_tokens=4096, beam_size=4, eval_interval=400, avg_last=5,
                 cooldown=0.0),
    # The paper's experiment (sections 5.1-5.4): WMT14 en->de from the Hub (4.5M pairs; newstest2013 validates,
    # newstest2014 tests), the base model with the defaults above (lr 7e-4 = d_model^-0.5 * warmup^-0.5, warmup
    # 4,000), a shared BPE of 37k, ~25k target tokens per step (8 processes x 3,584 padded tokens per side; one
    # GPU: --grad_accum=8), 100k steps, beam 4 with length penalty 0.6, the last 5 validations averaged.
    "wmt14_en_de": dict(data_dir="data/wmt14", hf_dataset="wmt/wmt14", hf_config="de-en", vocab_size=37000,
                        max_len=256, max_tokens=3584, beam_size=4, length_penalty=0.6, max_epochs=0,
                        max_steps=100_000, eval_interval=2000, avg_last=5, eval_max_tokens=32768),
}
DEFAULT_PRESET = "multi30k_en_de"  # what `python train.py` trains: an hour on a laptop CPU, minutes on a GPU


def _convert(name: str, text: str, default):
    """Parse one override as a literal of the field's type; never evaluates code."""
    kind = type(default)
    if kind is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if kind is str:
            return text
        raise UserError(f"--{name}={text}: expected a {kind.__name__} value") from None
    if kind is float and type(value) is int:
        value = float(value)
    if kind is str and not isinstance(value, str):
        value = text  # e.g. --out_dir=2024 stays the string "2024"
    if type(value) is not kind:
        raise UserError(f"--{name}={text}: expected a {kind.__name__} value, got {type(value).__name__}")
    if kind is float and not math.isfinite(value):
        raise UserError(f"--{name}={text}: expected a finite number")
    return value


def parse_args(argv: list[str], defaults, allow_positional: bool = False):
    """Apply `--key=value` flags to a dataclass instance. Returns (new instance, positional arguments)."""
    names = {f.name for f in fields(defaults)}
    values, positional = {}, []
    for arg in argv:
        if not arg.startswith("--"):
            if not allow_positional:
                raise UserError(f"unexpected argument {arg!r}: settings are given as --key=value")
            positional.append(arg)
            continue
        key, eq, text = arg[2:].partition("=")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""
            raise UserError(f"unknown setting --{key}{hint}")
        if not eq:
            raise UserError(f"--{key} needs a value: --{key}=VALUE")
        values[key] = _convert(key, text, getattr(defaults, key))
    return replace(defaults, **values), positional


# What fixes the shape of a model and its vocabulary: taken from the checkpoint when fine-tuning or resuming.
MODEL_KEYS = ["d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff", "pre_norm", "tie_embeddings",
              "max_len", "tokenizer", "vocab_size", "min_frequency"]


def split_preset(argv: list[str]) -> tuple[str, list[str]]:
    """The preset named by --preset=NAME (else DEFAULT_PRESET), and the other arguments."""
    presets = [a.split("=", 1)[1] for a in argv if a.startswith("--preset=")]
    return (presets[-1] if presets else DEFAULT_PRESET), [a for a in argv if not a.startswith("--preset=")]


def get_config(argv: list[str], base: dict | None = None) -> Config:
    """The Config for a command line: the preset named by --preset, then the overrides.
    With base (a resumed run's saved config), the overrides apply to it and --preset is ignored."""
    preset, rest = split_preset(argv)
    if base is None and (preset not in PRESETS or "--preset" in rest):
        raise UserError(f"unknown preset {preset!r}; use --preset=NAME with one of: {', '.join(PRESETS)}")
    cfg, _ = parse_args(rest, config_from_dict(base) if base is not None else replace(Config(), **PRESETS[preset]))
    check(cfg)
    return cfg


CHOICES = {"tokenizer": ("bpe", "word"), "compile": ("auto", "on", "off"), "finetune": ("", "head", "all")}


def check(cfg: Config) -> None:
    """Values that parse but cannot work."""
    positive = ["d_model", "n_heads", "d_ff", "max_tokens", "grad_accum", "vocab_size", "max_len", "beam_size",
                "eval_max_tokens", "max_bad_steps", "log_interval", "pad_multiple", "n_encoder_layers",
                "n_decoder_layers"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.n_heads:
        raise UserError(f"--d_model={cfg.d_model} must be divisible by --n_heads={cfg.n_heads}")
    if cfg.lr <= 0 or cfg.head_lr < 0:
        raise UserError("--lr must be positive and --head_lr non-negative")
    if not all(0 <= getattr(cfg, k) < 1 for k in ("dropout", "attn_dropout", "act_dropout", "label_smoothing")):
        raise UserError("dropout rates and label_smoothing must be in [0, 1)")
    if not 0 <= cfg.cooldown <= 1:
        raise UserError(f"--cooldown must be in [0, 1], got {cfg.cooldown}")
    for name in ("max_steps", "max_epochs", "max_minutes", "warmup_steps", "eval_interval", "patience", "avg_last"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(cfg, name)!r}")
    if cfg.finetune and not cfg.init_from:
        raise UserError("--finetune needs --init_from=CHECKPOINT")
    if cfg.src_lang == cfg.tgt_lang:
        raise UserError("--src_lang and --tgt_lang must differ")


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from a checkpoint's plain dict (keys unknown to this version are ignored)."""
    names = {f.name for f in fields(Config)}
    return Config(**{k: v for k, v in d.items() if k in names})


def pick_device(name: str) -> str:
    """--device: auto (cuda, then mps, then cpu), or one that must be available here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {name!r}: use cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={name} but CUDA is not available here")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device=mps but MPS is not available here")
    return name


def precision(cfg: Config, device: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether fp16 needs a gradient scaler), for training and decoding alike.
    auto: bf16 on CUDA (else fp16); on a CPU bf16 only with AMX, the bf16 matrix units (README, Speed: training 2.1x
    the tokens/s of fp32, beam search 1.3x); elsewhere bf16 is emulated and slower."""
    kind = device.split(":")[0]
    want = cfg.dtype
    if want == "auto" and kind == "cuda":
        want = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    elif want == "auto":
        amx = kind == "cpu" and getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        want = "bfloat16" if amx else "float32"
    if want not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, got {want!r}")
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[want]
    return dtype, dtype is torch.float16 and kind == "cuda"


def compiles(cfg: Config, device: str) -> bool:
    """--compile: auto compiles on CUDA only (on a CPU it has not paid off: README, Speed)."""
    return cfg.compile == "on" or (cfg.compile == "auto" and device.startswith("cuda"))


def run_main(main) -> None:
    """Run a script's main(): a UserError becomes one line on stderr and exit code 1, never a traceback."""
    try:
        main(sys.argv[1:])
        sys.stdout.flush()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # stdout closed early (| head) or full: say so once, without a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: cannot write the output: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


