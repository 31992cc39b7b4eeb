"""
Translate with a trained checkpoint: weights, config and tokenizer all come from that one file.

    python translate.py "A man is riding a bicycle."            # out/best.pt (else out/ckpt.pt), beam search
    python translate.py --ckpt=out-tiny --beam=1 "Two dogs play."  # a run directory or a .pt file; greedy
    python translate.py --file=sentences.en > sentences.de      # one sentence per line, in token-budget batches
    cat sentences.en | python translate.py --file=-              # standard input
    python translate.py --file=test.en --ref=test.de > hyp.de   # also sacreBLEU and chrF (on stderr)
    python translate.py --dtype=float32 "Two dogs play."          # fp32 even where AMX would decode in bf16

Translations go to stdout, one per input line (an empty line for an empty one); messages go to stderr.
"""
import sys
from dataclasses import dataclass, replace

import torch

from checkpoint import load_model
from config import UserError, parse_args, pick_device, precision, run_main
from dataset import Tokenizer, encode_sources, log, pad_rows, read_lines, token_batches
from model import Transformer


@dataclass
class Options:
    ckpt: str = "out"  # a checkpoint file, or a run directory (best.pt, else ckpt.pt)
    beam: int = 0  # beam size; 0: the checkpoint's beam_size; 1: greedy
    file: str = ""  # translate this file line by line ("-": standard input) instead of one sentence
    ref: str = ""  # references for --file: prints sacreBLEU and chrF on stderr
    device: str = "auto"  # cuda, then mps, then cpu
    dtype: str = ""  # "": the checkpoint's (auto: bf16 on CUDA and with AMX); float32 matches the CTranslate2 export


def translate_sentences(model: Transformer, tok: Tokenizer, texts: list[str], beam_size: int,
                        max_tokens: int | None = None, use_cache: bool = True) -> list[str]:
    """Translate many sentences in token-budget batches of similar length; results in input order.
    Empty sentences give empty translations; sentences longer than the model's max_len are cut (with a warning).
    Runs in config.precision: by default bf16 on CUDA and on CPUs with AMX, else fp32."""
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
    with model.evaluating(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for batch in token_batches(lengths, lengths, budget):
            src = pad_rows([ids[i] for i in batch.tolist()], tok.pad_id).to(device)
            hyps = model.generate(src, beam_size=beam_size, length_penalty=cfg.length_penalty, max_len_a=cfg.max_len_a,
                                  max_len_b=cfg.max_len_b, use_cache=use_cache)
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
    model.cfg = replace(model.cfg, dtype=opt.dtype or model.cfg.dtype)
    beam = opt.beam or model.cfg.beam_size
    with torch.inference_mode():
        hyps = translate_sentences(model, tok, texts, beam)
    sys.stdout.write("".join(h + "\n" for h in hyps))
    if refs is not None and hyps:
        s = score(hyps, refs)
        log(f"sacreBLEU={s['bleu']:.2f} lowercased={s['bleu_lc']:.2f} chrF={s['chrf']:.2f} n={len(hyps)} beam={beam}")


if __name__ == "__main__":
    run_main(main)
