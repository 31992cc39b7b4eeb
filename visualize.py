"""
Pictures of what the model attends to: encoder self-attention, decoder (masked) self-attention and
encoder-decoder cross-attention, one grid of layers x heads each, plus an index.html that shows them all.

    python visualize.py "A man is riding a bicycle."                  # out/best.pt -> attention/
    python visualize.py --ckpt=out-tiny --out=maps "Two dogs play in the snow."
    python visualize.py --layers=0,2 --heads=0,1 "A girl in a red dress."   # some layers / heads only

It uses the model's plain-math attention path, which returns the weights; train.py draws its TensorBoard
heatmap with the same attention_figure function.
"""
import html
import os
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch

from checkpoint import load_model
from config import UserError, parse_args, pick_device, run_main
from dataset import Tokenizer, encode_sources, log
from model import Transformer
from translate import check_text

plt.switch_backend("Agg")  # files only: works without a display
KINDS = {"encoder": "encoder self-attention", "decoder": "decoder masked self-attention",
         "cross": "encoder-decoder cross-attention"}


@dataclass
class Options:
    ckpt: str = "out"  # a checkpoint file, or a run directory (best.pt, else ckpt.pt)
    out: str = "attention"  # folder for the PNG files and index.html
    layers: str = "all"  # which layers, e.g. "0,5" (0 = the first)
    heads: str = "all"  # which heads, e.g. "0,1,2"
    beam: int = 0  # beam size of the translation; 0: the checkpoint's beam_size
    device: str = "auto"


@torch.no_grad()
def collect(model: Transformer, tok: Tokenizer, sentence: str, beam_size: int = 1) -> dict:
    """Translate one sentence, then rerun it through the math path. Returns the translation and, per kind,
    (weights (n_layers, n_heads, T_query, T_key), query labels, key labels). Rows are the decoder positions
    labelled by the token each one predicts; columns are the tokens attended to. The model keeps its mode."""
    cfg, device = model.cfg, next(model.parameters()).device
    ids, cut = encode_sources(tok, [sentence], cfg.max_len)
    if cut:
        log(f"warning: the sentence is longer than max_len={cfg.max_len} tokens and was cut to fit")
    src = torch.tensor(ids, device=device)
    with model.evaluating():
        hyp = model.generate(src, beam_size=beam_size, length_penalty=cfg.length_penalty, max_len_a=cfg.max_len_a,
                             max_len_b=cfg.max_len_b)[0]
        tgt_in = torch.tensor([[tok.bos_id] + hyp], device=device)
        maps = model.attention_maps(src, tgt_in)
    name = tok.tok.id_to_token
    src_tokens = [name(i) for i in ids[0]]
    in_tokens, out_tokens = [name(i) for i in [tok.bos_id] + hyp], [name(i) for i in hyp + [tok.eos_id]]
    labels = {"encoder": (src_tokens, src_tokens), "decoder": (out_tokens, in_tokens),
              "cross": (out_tokens, src_tokens)}
    return {"translation": tok.decode([hyp])[0],
            **{kind: (torch.stack([w[0] for w in maps[kind]]).float().cpu(), *labels[kind]) for kind in KINDS}}


def plot_attention(weights: torch.Tensor, rows: list[str], cols: list[str], title: str,
                   layers: list[int], heads: list[int]) -> plt.Figure:
    """A grid of heatmaps, one per (layer, head): rows = queries, columns = keys, darker = more attention."""
    cell = 0.22 * max(len(rows), len(cols)) + 1.2
    fig, axes = plt.subplots(len(layers), len(heads), figsize=(cell * len(heads), cell * len(layers)), squeeze=False)
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            ax.imshow(weights[layer, head].numpy(), cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_xticks(range(len(cols)), [t.replace("▁", "") or "▁" for t in cols], rotation=90, fontsize=8)
            ax.set_yticks(range(len(rows)), [t.replace("▁", "") or "▁" for t in rows], fontsize=8)
            ax.set_title(f"layer {layer} head {head}", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def attention_figure(model: Transformer, tok: Tokenizer, sentence: str) -> plt.Figure:
    """The last layer's cross-attention, every head: the TensorBoard heatmap during training."""
    res = collect(model, tok, sentence)
    weights, rows, cols = res["cross"]
    return plot_attention(weights, rows, cols, f"{KINDS['cross']}: {res['translation']}", [weights.size(0) - 1],
                          list(range(weights.size(1))))


def pick(spec: str, n: int, what: str) -> list[int]:
    if spec == "all":
        return list(range(n))
    try:
        chosen = [int(x) for x in spec.split(",")]
    except ValueError:
        raise UserError(f"--{what}={spec}: give 'all' or numbers separated by commas") from None
    bad = [x for x in chosen if not 0 <= x < n]
    if bad:
        raise UserError(f"--{what}: the model has {what} 0 to {n - 1}, not {bad[0]}")
    return chosen


def main(argv: list[str]) -> None:
    opt, sentences = parse_args(argv, Options(), allow_positional=True)
    if len(sentences) != 1 or not sentences[0].strip():
        raise UserError('give one non-empty sentence in quotes, e.g. python visualize.py "A man is riding a bicycle."')
    check_text(sentences)
    if opt.beam < 0:
        raise UserError(f"--beam must be 1 or more (0: the checkpoint's setting), got {opt.beam}")
    model, tok = load_model(opt.ckpt, pick_device(opt.device))
    cfg = model.cfg
    chosen = {kind: (pick(opt.layers, cfg.n_encoder_layers if kind == "encoder" else cfg.n_decoder_layers, "layers"),
                     pick(opt.heads, cfg.n_heads, "heads")) for kind in KINDS}
    res = collect(model, tok, sentences[0], opt.beam or cfg.beam_size)
    page = ["<!doctype html><meta charset='utf-8'><title>attention</title>",
            f"<h1>{html.escape(sentences[0])}</h1><h2>{html.escape(res['translation'])}</h2>"]
    page += [f"<h3>{KINDS[k]}</h3><img src='{k}.png' style='max-width:100%'>" for k in KINDS]
    written, path = [], opt.out  # path: the file being written, for the error message
    try:
        os.makedirs(opt.out, exist_ok=True)
        for kind, title in KINDS.items():
            path = os.path.join(opt.out, f"{kind}.png")
            fig = plot_attention(*res[kind], title, *chosen[kind])
            fig.savefig(path, dpi=80)
            plt.close(fig)
            written.append(path)
        path = os.path.join(opt.out, "index.html")
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(page) + "\n")
        written.append(path)
    except OSError as e:
        raise UserError(f"cannot write {path} (--out={opt.out}): {e.strerror or e}") from None
    log(f"translation: {res['translation']}")
    print("\n".join(written))


if __name__ == "__main__":
    run_main(main)
