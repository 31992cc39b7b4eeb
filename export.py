"""
Export a trained checkpoint to a CTranslate2 model directory: a C++ inference engine for CPUs and GPUs that
decodes faster than translate.py, and faster again with int8 weights. CTranslate2 is an optional dependency,
needed only here: `pip install ctranslate2`.

    python export.py --ckpt=out-tiny --out=out-tiny-ct2                       # float32 weights
    python export.py --ckpt=out-tiny --out=out-tiny-int8 --quantization=int8  # int8: ~4x smaller, faster on CPU
    python export.py --ckpt=out-tiny/best.pt --force=True                     # to out-tiny/best-ct2, replacing it

Translate with an export as translate.py would (its tokenizer, length limits and settings travel with it):

    from export import load_exported, translate_exported
    translator, tok, cfg = load_exported("out-tiny-int8")
    print(translate_exported(translator, tok, cfg, ["A man is riding a bicycle."], beam_size=1))

or with ctranslate2 and tokenizers alone. Our sources end with "</s>": the export sets add_source_eos in its
config.json, so CTranslate2 appends it; min_decoding_length=0 allows an empty translation, as ours does:

    import ctranslate2, tokenizers
    tok = tokenizers.Tokenizer.from_file("out-tiny-int8/tokenizer.json")
    translator = ctranslate2.Translator("out-tiny-int8", device="cpu")
    source = tok.encode("A man is riding a bicycle.", add_special_tokens=False).tokens
    result = translator.translate_batch([source], beam_size=4, min_decoding_length=0)
    print(tok.decode([tok.token_to_id(t) for t in result[0].hypotheses[0]]))

For int8, export with --quantization=int8 rather than asking a float32 export for compute_type="int8": that
quantizes to full 8-bit range at load, which degrades translations on CPUs without VNNI (see to_7_bits).
Greedy output is identical to translate.py's (tests/test_export.py checks it). Beam search may differ in a few
percent of sentences: CTranslate2 replaces a finished hypothesis in the beam where ours freezes it in place.
"""
import json
import os
import shutil
from dataclasses import asdict, dataclass

import torch

from checkpoint import load_model
from config import Config, UserError, config_from_dict, parse_args, run_main
from dataset import Tokenizer, log
from model import LayerNorm, MultiHeadAttention, Transformer

TOKENIZER_FILE = "tokenizer.json"  # our tokenizer, beside CTranslate2's model.bin, config.json, shared_vocabulary.json
CONFIG_FILE = "train_config.json"  # the checkpoint's Config: decoding settings and max_len


@dataclass
class Options:
    ckpt: str = "out"  # a checkpoint file, or a run directory (best.pt, else ckpt.pt)
    out: str = ""  # the model directory to write ("": the checkpoint's path + "-ct2")
    quantization: str = ""  # weight type: int8, int8_float16, int16, float16, bfloat16 ("": float32 as trained)
    force: bool = False  # replace --out if it already holds something


def import_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise UserError("CTranslate2 is not installed: pip install ctranslate2") from None
    return ctranslate2


def build_spec(model: Transformer, tok: Tokenizer):
    """Our weights in CTranslate2's TransformerSpec. Its layout matches ours one for one: the same post-/pre-norm
    residuals, fused Q|K|V for self-attention and Q, fused K|V for cross-attention, in our order."""
    from ctranslate2.specs import TransformerDecoderSpec, TransformerEncoderSpec, TransformerSpec
    cfg = model.cfg
    spec = TransformerSpec(TransformerEncoderSpec(cfg.n_encoder_layers, cfg.n_heads, pre_norm=cfg.pre_norm),
                           TransformerDecoderSpec(cfg.n_decoder_layers, cfg.n_heads, pre_norm=cfg.pre_norm))

    def array(t):
        return t.detach().float().cpu().numpy()

    def linear(s, layer) -> None:
        s.weight, s.bias = array(layer.weight), array(layer.bias)  # both (out, in) as in torch

    def norm(s, layer: LayerNorm) -> None:
        s.gamma, s.beta = array(layer.gain), array(layer.bias)

    def attention(s, attn: MultiHeadAttention, residual_norm: LayerNorm) -> None:
        norm(s.layer_norm, residual_norm)  # CTranslate2 keeps a residual's LayerNorm in its sublayer
        for s_lin, lin in zip(s.linear, [attn.w_q, attn.w_kv, attn.w_o] if attn.cross else [attn.w_qkv, attn.w_o]):
            linear(s_lin, lin)

    def feed_forward(s, layer) -> None:
        norm(s.layer_norm, layer.residual_ff.norm)
        linear(s.linear_0, layer.feed_forward.w_1)
        linear(s.linear_1, layer.feed_forward.w_2)

    for stack, embed, final_norm in ((spec.encoder, model.src_embed, model.encoder_norm),
                                     (spec.decoder, model.tgt_embed, model.decoder_norm)):
        # The encoder takes a list of embeddings (one per source factor): ours is the only one.
        embeddings = stack.embeddings[0] if isinstance(stack.embeddings, list) else stack.embeddings
        embeddings.weight = array(embed.embedding.weight)
        stack.scale_embeddings = embed.scale  # section 3.4's sqrt(d_model)
        # Our table, not CTranslate2's built-in one: that one concatenates [sin | cos] and starts at position 1.
        stack.position_encodings.encodings = array(model.positional.pe)
        if cfg.pre_norm:
            norm(stack.layer_norm, final_norm)
    for s, layer in zip(spec.encoder.layer, model.encoder):
        attention(s.self_attention, layer.self_attn, layer.residual_attn.norm)
        feed_forward(s.ffn, layer)
    for s, layer in zip(spec.decoder.layer, model.decoder):
        attention(s.self_attention, layer.self_attn, layer.residual_self.norm)
        attention(s.attention, layer.cross_attn, layer.residual_cross.norm)
        feed_forward(s.ffn, layer)
    linear(spec.decoder.projection, model.generator)  # tied: the same matrix as the embeddings, saved once

    # One shared vocabulary, tokens in id order; the special tokens by our tokenizer's ids, never by assumption.
    name = tok.tok.id_to_token
    tokens = [name(i) for i in range(tok.vocab_size)]
    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    c = spec.config
    c.unk_token, c.bos_token, c.eos_token = name(tok.unk_id), name(tok.bos_id), name(tok.eos_id)
    c.decoder_start_token = c.bos_token  # the decoder input starts with BOS (dataset.Split)
    c.add_source_eos = True  # our sources are tokens + EOS: the engine appends it, callers need not know
    c.layer_norm_epsilon = model.decoder[0].residual_ff.norm.eps  # stated, not left to the engine's default
    return spec


def to_7_bits(spec) -> None:
    """Halve CTranslate2's int8 weights (scales too) to [-64, 64]. On x86 CPUs without VNNI (AVX2 only) its int8 GEMM
    (u8 activations x s8 weights, pairwise sums in int16) saturates with full-range weights. On such a CPU (AMD EPYC,
    AVX2), the post-norm model of tests/test_export.py agreed with its float32 greedy output on 19% of sentences
    (BLEU 68 -> 52); with 7-bit weights on 91% (BLEU 68), as weights rounded to 8 bits in PyTorch do (96%)."""
    import numpy as np
    from ctranslate2.specs.model_spec import NumpyVariable, visit_spec

    def halve(layer, scope: str, value) -> None:
        name = scope.split("/")[-1]
        if getattr(value, "dtype", None) == "int8" and hasattr(layer, name + "_scale"):
            setattr(layer, name, NumpyVariable(np.rint(value.numpy() / 2).astype(np.int8)))
            setattr(layer, name + "_scale", NumpyVariable(getattr(layer, name + "_scale").numpy() / 2))

    visit_spec(spec, halve)


def export(ckpt: str, out: str, quantization: str = "", force: bool = False) -> str:
    """Write the CTranslate2 model directory `out` for checkpoint `ckpt`; returns out. Written beside it under a
    temporary name and renamed when complete, so an interrupted export never leaves a half-written model."""
    ctranslate2 = import_ctranslate2()
    accepted = ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES
    if quantization and quantization not in accepted:
        raise UserError(f"--quantization must be one of {', '.join(accepted)}, got {quantization!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out={out} is a file: the export is a directory")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise UserError(f"{out} already exists: choose another --out, or --force=True to replace it")
    model, tok = load_model(ckpt)
    spec = build_spec(model, tok)
    spec.validate()
    spec.optimize(quantization=quantization or None)  # also stores the tied matrix once
    if quantization.startswith("int8"):
        to_7_bits(spec)
    out = os.path.normpath(out)
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.tmp{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)  # with the user's umask (tempfile.mkdtemp would make it private)
        try:
            spec.save(tmp)
            with open(os.path.join(tmp, TOKENIZER_FILE), "w", encoding="utf-8") as f:
                f.write(tok.to_str())
            with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
                json.dump(asdict(model.cfg), f, indent=1)
            if os.path.isdir(out) and force:
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    size = os.path.getsize(os.path.join(out, "model.bin")) / 2**20
    log(f"export: {out} ({quantization or 'float32'} weights, {size:.1f} MiB)")
    return out


def load_exported(path: str, compute_type: str = "default", device: str = "cpu", threads: int = 0):
    """(ctranslate2.Translator, our Tokenizer, the checkpoint's Config) for an export. compute_type: float32, int8,
    ...; "default" computes in the weights' own type. threads: CPU threads (0: CTranslate2 chooses)."""
    ctranslate2 = import_ctranslate2()
    try:
        with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
            cfg = config_from_dict(json.load(f))
        with open(os.path.join(path, TOKENIZER_FILE), encoding="utf-8") as f:
            tok = Tokenizer.from_str(f.read())
        translator = ctranslate2.Translator(path, device=device, compute_type=compute_type, intra_threads=threads)
    except (OSError, ValueError, RuntimeError) as e:  # no such directory, not an export, unsupported compute_type
        raise UserError(f"cannot load the export {path}: {e}") from None
    return translator, tok, cfg


def translate_exported(translator, tok: Tokenizer, cfg: Config, texts: list[str], beam_size: int = 0,
                       max_tokens: int | None = None) -> list[str]:
    """translate.translate_sentences with an export: the same tokens in, the same length limits, the same text out.
    beam_size 0: the checkpoint's beam_size; 1: greedy. Empty sentences give empty translations."""
    beam_size = beam_size or cfg.beam_size
    keep = [i for i, t in enumerate(texts) if t.strip()]
    # As dataset.encode_sources: at most max_len - 1 tokens, then the EOS that the engine appends (add_source_eos).
    sources = [tok.tokens(texts[i])[:cfg.max_len - 1] for i in keep]
    out = [""] * len(texts)
    if not sources:
        return out
    # Transformer._max_lengths, computed the same way: at most a * (source length with EOS) + b tokens counting the
    # EOS, within the positional table; the engine counts without the EOS. It takes one limit per call, so each
    # hypothesis is then cut to its own: exact for greedy, which never looks ahead.
    with_eos = torch.tensor([len(s) + 1 for s in sources])
    limits = ((with_eos * cfg.max_len_a + cfg.max_len_b).long().clamp(max=cfg.max_len - 1) - 1).tolist()
    results = translator.translate_batch(
        sources, max_batch_size=max(max_tokens or cfg.eval_max_tokens, cfg.max_len) // beam_size, batch_type="tokens",
        beam_size=beam_size, length_penalty=cfg.length_penalty, max_input_length=0,  # cut above already
        max_decoding_length=max(limits), min_decoding_length=0)  # CTranslate2 forbids an empty translation unless told
    ids = [[tok.tok.token_to_id(t) for t in r.hypotheses[0][:n]] for r, n in zip(results, limits)]
    for i, text in zip(keep, tok.decode(ids)):
        out[i] = text
    return out


def main(argv: list[str]) -> None:
    opt, _ = parse_args(argv, Options())
    export(opt.ckpt, opt.out or os.path.splitext(os.path.normpath(opt.ckpt))[0] + "-ct2", opt.quantization, opt.force)


if __name__ == "__main__":
    run_main(main)
