"""
Translate with a trained checkpoint: weights, config and tokenizer all come from that one file.

    python translate.py "A man is riding a bicycle."            # out/best.pt (else out/ckpt.pt), beam search
    python translate.py --ckpt=out-tiny --beam=1 "Two dogs play."  # a run directory or a .pt file; greedy
    python translate.py --file=sentences.en > sentences.de      # one sentence per line, in token-budget batches
    cat sentences.en | python translate.py --file=-              # standard input
    python translate.py --file=test.en --ref=test.de > hyp.de   # also sacreBLEU and chrF (on stderr)

Translations go to stdout, one per input line (an empty line for an empty one); messages go to stderr.
"""
import os
import pickle
import sys
from dataclasses import dataclass

import torch

from config import Config, UserError, config_from_dict, parse_args, run_main
from dataset import Tokenizer, encode_sources, log, pad_rows, read_lines, token_batches
from model import Transformer


@dataclass
class Options:
    ckpt: str = "out"  # a checkpoint file, or a run directory (best.pt, else ckpt.pt)
    beam: int = 0  # beam size; 0: the checkpoint's beam_size; 1: greedy
    file: str = ""  # translate this file line by line ("-": standard input) instead of one sentence
    ref: str = ""  # references for --file: prints sacreBLEU and chrF on stderr
    device: str = "auto"  # cuda, then mps, then cpu


def pick_device(name: str) -> str:
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
    """(autocast dtype or None for fp32, whether fp16 needs a gradient scaler): training and translation share it."""
    kind = device.split(":")[0]
    want = cfg.dtype
    if want == "auto":
        want = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if kind == "cuda" else "float32"
    if want not in ("float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, got {want!r}")
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[want]
    return dtype, dtype is torch.float16 and kind == "cuda"


def checkpoint_path(path: str) -> str:
    """A file, or a run directory holding best.pt or ckpt.pt."""
    if os.path.isdir(path):
        for name in ("best.pt", "ckpt.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
    elif os.path.isfile(path):
        return path
    raise UserError(f"no checkpoint at {path}: train one with `python train.py --out_dir={path}` or pass --ckpt=PATH")


def read_checkpoint(path: str) -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never code. Any other file
    (truncated, random bytes, a pickle that would run code) is refused with one line."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported" in str(e):  # a pickle of code or other objects: never executed
            raise UserError(f"refusing to load {path}: it holds more than tensors and plain data") from None
        raise UserError(f"{path} is not a readable checkpoint (corrupt or not a torch file)") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint (corrupt or truncated?): {type(e).__name__}") from None
    missing = [k for k in ("model", "config", "tokenizer") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a checkpoint of this project (missing {', '.join(missing)})")
    return ckpt


def strip_prefixes(state: dict) -> dict:
    """Weights saved from nn.DataParallel / DDP ("module.") or torch.compile ("_orig_mod.") load all the same."""
    for prefix in ("module.", "_orig_mod."):
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def build_model(ckpt: dict, device: str = "cpu", verbose: bool = False) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer described by a checkpoint, with its weights loaded."""
    try:
        cfg, tok = config_from_dict(ckpt["config"]), Tokenizer.from_str(ckpt["tokenizer"])
        model = Transformer(cfg, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, verbose=verbose)
        model.load_state_dict(strip_prefixes(ckpt["model"]))
    except UserError:
        raise
    except Exception as e:
        detail = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        reason = next((l for l in detail if "size mismatch" in l or "Missing key" in l), detail[0])
        raise UserError(f"checkpoint does not match its own config or tokenizer: {reason[:200]}") from None
    return model.to(device).eval(), tok


def load_model(path: str, device: str = "cpu") -> tuple[Transformer, Tokenizer]:
    return build_model(read_checkpoint(checkpoint_path(path)), device)


def translate_sentences(model: Transformer, tok: Tokenizer, texts: list[str], beam_size: int,
                        max_tokens: int | None = None, use_cache: bool = True) -> list[str]:
    """Translate many sentences in token-budget batches of similar length; results in input order.
    Empty sentences give empty translations; sentences longer than the model's max_len are cut (with a warning).
    Runs in the model's training precision (config.dtype: bf16 on CUDA by default, fp32 on CPU)."""
    cfg, device = model.cfg, next(model.parameters()).device
    dtype, _ = precision(cfg, device.type)
    keep = [i for i, t in enumerate(texts) if t.strip()]
    ids, cut = encode_sources(tok, [texts[i] for i in keep], cfg.max_len)
    if cut:
        log(f"warning: {cut} sentence(s) longer than max_len={cfg.max_len} tokens were cut to fit")
    out = [""] * len(texts)
    if not ids:
        return out
    lengths = torch.tensor([len(s) for s in ids])
    budget = max(max_tokens or cfg.eval_max_tokens, cfg.max_len) // max(1, beam_size)
    model.eval()
    for batch in token_batches(lengths, lengths, budget):
        src = pad_rows([ids[i] for i in batch.tolist()], tok.pad_id).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            hyps = model.generate(src, beam_size, cfg.length_penalty, cfg.max_len_a, cfg.max_len_b, use_cache)
        for i, text in zip(batch.tolist(), tok.decode(hyps)):
            out[keep[i]] = text
    return out


def score(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus sacreBLEU (13a tokenization, cased; and lowercased, as some papers report) and chrF of detokenized
    text against the raw references."""
    from sacrebleu.metrics import BLEU, CHRF
    return {"bleu": BLEU().corpus_score(hyps, [refs]).score,
            "bleu_lc": BLEU(lowercase=True).corpus_score(hyps, [refs]).score,
            "chrf": CHRF().corpus_score(hyps, [refs]).score}


def check_text(sentences: list[str]) -> None:
    """Command-line bytes that are not UTF-8 arrive as lone surrogates: refuse them in one line."""
    for s in sentences:
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise UserError("the sentence is not valid UTF-8") from None


def main(argv: list[str]) -> None:
    opt, sentences = parse_args(argv, Options(), allow_positional=True)
    check_text(sentences)
    if opt.file and sentences:
        raise UserError("give either a sentence or --file, not both")
    if not opt.file and len(sentences) != 1:
        raise UserError('give one sentence in quotes, e.g. python translate.py "A man is riding a bicycle."'
                        if not sentences else "give one sentence in quotes (or --file=PATH for many)")
    if opt.beam < 0:
        raise UserError(f"--beam must be 1 or more (0: the checkpoint's setting), got {opt.beam}")
    if opt.ref and not opt.file:
        raise UserError("--ref needs --file")
    if not opt.file and not sentences[0].strip():
        raise UserError("nothing to translate: the sentence is empty")
    texts = read_lines(opt.file) if opt.file else sentences
    refs = read_lines(opt.ref) if opt.ref else None
    if refs is not None and len(refs) != len(texts):
        raise UserError(f"{opt.ref} has {len(refs)} lines but {opt.file} has {len(texts)}")
    model, tok = load_model(opt.ckpt, pick_device(opt.device))
    beam = opt.beam or model.cfg.beam_size
    with torch.inference_mode():
        hyps = translate_sentences(model, tok, texts, beam)
    sys.stdout.write("".join(h + "\n" for h in hyps))
    if refs is not None and hyps:
        s = score(hyps, refs)
        log(f"sacreBLEU={s['bleu']:.2f} lowercased={s['bleu_lc']:.2f} chrF={s['chrf']:.2f} n={len(hyps)} beam={beam}")


if __name__ == "__main__":
    run_main(main)
