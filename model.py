"""
The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), complete, in one file.

    from config import Config
    from model import Transformer
    model = Transformer(Config(), vocab_size=8000, pad_id=0, bos_id=2, eos_id=3)
    logits = model(src, tgt_in)                      # (B, T, vocab) for training
    hyps = model.generate(src, beam_size=5)          # list of token-id lists, beam search with a KV cache

Mask convention, used everywhere in this file: a boolean mask is True where a query MAY attend to a key
(the convention of F.scaled_dot_product_attention; nn.Transformer uses the opposite one).
Padding is always on the right, so in the decoder the causal mask alone keeps real positions off the padding.

model.py knows nothing of files, tokenizers or command lines: token ids in, token ids out.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class TokenEmbedding(nn.Module):
    """Token ids -> vectors, multiplied by sqrt(d_model) (section 3.4) so they are not drowned by the encoding."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.scale = math.sqrt(d_model)

    def forward(self, ids: Tensor) -> Tensor:
        return self.embedding(ids) * self.scale


class PositionalEncoding(nn.Module):
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(...) (section 3.5), precomputed once."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        pos = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * inv_freq)
        pe[:, 1::2] = torch.cos(pos * inv_freq)
        self.register_buffer("pe", pe, persistent=False)  # derived from the config, so not saved

    def forward(self, x: Tensor, start: int = 0) -> Tensor:
        T = x.size(1)
        if start + T > self.pe.size(0):
            raise ValueError(f"sequence of {start + T} positions is longer than max_len={self.pe.size(0)}")
        return x + self.pe[start:start + T]


class LayerNorm(nn.Module):
    """gain * (x - mean) / sqrt(var + eps) + bias over the last dimension (Ba et al., 2016).

    var is the *biased* variance (divide by d_model, not d_model - 1), exactly as nn.LayerNorm; tutorials that
    write x.std() get the unbiased one. F.layer_norm computes this formula in one fused kernel, and
    tests/test_model.py checks it against the formula written out."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.gain.shape, self.gain, self.bias, self.eps)


class Dropout(nn.Module):
    """Zero each element with probability p and scale the rest by 1 / (1 - p) in training (Srivastava et al.,
    2014), as nn.Dropout does. On a CPU drawing the random numbers is most of the cost, and torch's generator takes
    about as long for a 64-bit number as for a 32-bit one, so each 64-bit draw gives four masks: its 16-bit quarters
    are uniform, and an element is dropped where its quarter falls in the lowest p of the 16-bit range (p rounded to
    1/65536; README, Speed). Other devices and compiled code keep F.dropout (dynamo cannot trace random_)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return F.dropout(x, self.p, training=True)
        bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1)
        keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= round(self.p * 2**16) - 2**15
        return x * keep * (1 / (1 - self.p))


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, applied to each position alone (section 3.3)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_2(self.dropout(F.relu(self.w_1(x))))


class SmoothedCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(logits.float(), labels, ignore_index, label_smoothing=eps, reduction="sum") for (N, vocab)
    logits, a block of rows at a time: each row's loss is logsumexp(z) - (1 - eps) z[label] - eps mean(z), and its
    gradient softmax(z) - (1 - eps) onehot(label) - eps / vocab. The (N, vocab) fp32 log-probabilities are never
    stored, and the gradient is written in the logits' dtype: on a CPU a third of F.cross_entropy's time in bf16."""
    ROWS = 64  # 64 rows x 8k words in fp32 = 2 MB: a block stays in the core's cache between its passes

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int, eps: float) -> Tensor:
        keep = labels != ignore_index
        labels = labels * keep  # padding rows point at column 0: a valid index, and their loss and gradient are zeroed
        lse, mean = torch.empty(2, logits.size(0), device=logits.device)
        for i in range(0, logits.size(0), SmoothedCrossEntropy.ROWS):
            z = logits[i:i + SmoothedCrossEntropy.ROWS].float()
            lse[i:i + z.size(0)], mean[i:i + z.size(0)] = torch.logsumexp(z, -1), z.mean(-1)
        target = logits.gather(1, labels[:, None])[:, 0].float()
        ctx.save_for_backward(logits, labels, keep, lse)
        ctx.eps = eps
        return ((lse - (1 - eps) * target - eps * mean) * keep).sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:
        logits, labels, keep, lse = ctx.saved_tensors
        rows, eps = SmoothedCrossEntropy.ROWS, ctx.eps
        scale = (grad * keep)[:, None]  # padding rows get no gradient
        out = torch.empty_like(logits)
        for i in range(0, logits.size(0), rows):
            p = (logits[i:i + rows].float() - lse[i:i + rows, None]).exp_().sub_(eps / logits.size(1))
            p.scatter_add_(1, labels[i:i + rows, None], p.new_full((p.size(0), 1), eps - 1))
            out[i:i + rows] = p.mul_(scale[i:i + rows])
        return out, None, None, None


def attention_math(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
                   dropout: nn.Module = nn.Identity()) -> tuple[Tensor, Tensor]:
    """softmax(Q K^T / sqrt(d_k)) V, written out (section 3.2.1), with dropout on the weights. Returns the output
    and the weights (before dropout)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if is_causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return dropout(weights) @ v, weights


class MultiHeadAttention(nn.Module):
    """n_heads attentions over d_k = d_model / n_heads dimensions each, concatenated, then W^O (section 3.2.2).

    Used three ways: encoder self-attention, causal decoder self-attention, and encoder-decoder (cross)
    attention, where queries come from the decoder and keys/values from the encoder output `memory`.
    Self-attention computes Q, K, V with one fused matmul (w_qkv); cross-attention fuses K and V (w_kv)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, cross: bool = False):
        super().__init__()
        assert d_model % n_heads == 0, "d_model must be divisible by n_heads"
        self.n_heads, self.d_k, self.cross = n_heads, d_model // n_heads, cross
        self.dropout = Dropout(dropout)  # on the attention weights
        if cross:
            self.w_q = nn.Linear(d_model, d_model)
            self.w_kv = nn.Linear(d_model, 2 * d_model)
        else:
            self.w_qkv = nn.Linear(d_model, 3 * d_model)
        self.w_o = nn.Linear(d_model, d_model)

    def split_heads(self, x: Tensor, n: int) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.n_heads, self.d_k).permute(2, 0, 3, 1, 4)  # (n, B, n_heads, T, d_k)

    def forward(self, x: Tensor, memory: Tensor | None = None, mask: Tensor | None = None, is_causal: bool = False,
                cache: dict | None = None, weights: list | None = None) -> Tensor:
        """x: (B, T, d_model). mask broadcasts to (B, n_heads, T, S). cache: this layer's keys/values for
        incremental decoding. weights: if a list is given, take the math path and append the weights to it."""
        B, T, d_model = x.shape
        if self.cross:
            q = self.split_heads(self.w_q(x), 1)[0]
            if cache is not None and "k" in cache:  # the source does not change while decoding: project it once
                k, v = cache["k"], cache["v"]
            else:
                k, v = self.split_heads(self.w_kv(memory), 2)
        else:
            q, k, v = self.split_heads(self.w_qkv(x), 3)
            if cache is not None and "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        # On a CPU, bf16 training takes the math written out: there SDPA's flash kernel trains 3-4x slower, and its
        # math kernel computes in fp32 (copying Q, K, V and back) and draws dropout with bernoulli_ (README, Speed).
        if weights is not None or (q.requires_grad and q.device.type == "cpu" and q.dtype != torch.float32):
            out, w = attention_math(q, k, v, mask, is_causal, self.dropout)
            if weights is not None:
                weights.append(w)
        else:
            dropout_p = self.dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
        return self.w_o(out.transpose(1, 2).reshape(B, T, d_model))  # (B, T, d_model): heads concatenated


class Residual(nn.Module):
    """A residual connection around a sublayer, with dropout on the sublayer output (section 5.4).

    post-norm (the paper): LayerNorm(x + Dropout(sublayer(x)))
    pre-norm:              x + Dropout(sublayer(LayerNorm(x)))  (the stacks then end with one LayerNorm)"""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.norm = LayerNorm(d_model)
        self.dropout = Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: Tensor, sublayer) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention, then feed-forward, each inside a residual connection (section 3.1)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attn_dropout: float, act_dropout: float,
                 pre_norm: bool):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attn_dropout)
        self.feed_forward = FeedForward(d_model, d_ff, act_dropout)
        self.residual_attn = Residual(d_model, dropout, pre_norm)
        self.residual_ff = Residual(d_model, dropout, pre_norm)

    def forward(self, x: Tensor, src_mask: Tensor, maps: dict | None = None) -> Tensor:
        w = maps["encoder"] if maps is not None else None
        x = self.residual_attn(x, lambda h: self.self_attn(h, mask=src_mask, weights=w))
        return self.residual_ff(x, self.feed_forward)


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention over the encoder output, then feed-forward (section 3.1)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, attn_dropout: float, act_dropout: float,
                 pre_norm: bool):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, attn_dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, attn_dropout, cross=True)
        self.feed_forward = FeedForward(d_model, d_ff, act_dropout)
        self.residual_self = Residual(d_model, dropout, pre_norm)
        self.residual_cross = Residual(d_model, dropout, pre_norm)
        self.residual_ff = Residual(d_model, dropout, pre_norm)

    def forward(self, x: Tensor, memory: Tensor, src_mask: Tensor, cache: dict | None = None,
                maps: dict | None = None) -> Tensor:
        # With a cache, x holds only the newest position: it may see every cached one, so no mask is needed.
        causal = cache is None or "k" not in cache["self"]
        sw, cw = (maps["decoder"], maps["cross"]) if maps is not None else (None, None)
        x = self.residual_self(x, lambda h: self.self_attn(
            h, is_causal=causal, cache=cache and cache["self"], weights=sw))
        x = self.residual_cross(x, lambda h: self.cross_attn(
            h, memory, mask=src_mask, cache=cache and cache["cross"], weights=cw))
        return self.residual_ff(x, self.feed_forward)


class KVCache:
    """Per decoder layer: keys/values of every target position decoded so far (self-attention), and of the
    source (cross-attention, computed at the first step only). Each new token then costs one decoder step."""

    def __init__(self, n_layers: int):
        self.layers = [{"self": {}, "cross": {}} for _ in range(n_layers)]

    @property
    def length(self) -> int:
        first = self.layers[0]["self"]
        return first["k"].size(2) if "k" in first else 0

    def reorder(self, rows: Tensor, cross: bool = False) -> None:
        """Row i now continues row rows[i]: for beam search, the hypotheses kept (the source rows stay, since every
        beam of a sentence holds the same one); with cross=True, also the source's rows, when finished sentences
        leave the batch."""
        for layer in self.layers:
            for part in ("self", "cross") if cross else ("self",):
                layer[part] = {key: t.index_select(0, rows) for key, t in layer[part].items()}  # k and v


class Transformer(nn.Module):
    """The encoder-decoder. Built from a Config (config.py) and the tokenizer's vocabulary size and special ids."""

    def __init__(self, cfg, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
        super().__init__()
        self.cfg, self.pad_id, self.bos_id, self.eos_id = cfg, pad_id, bos_id, eos_id
        d = cfg.d_model
        sizes = dict(d_model=d, n_heads=cfg.n_heads, d_ff=cfg.d_ff, dropout=cfg.dropout, attn_dropout=cfg.attn_dropout,
                     act_dropout=cfg.act_dropout, pre_norm=cfg.pre_norm)
        self.src_embed = TokenEmbedding(vocab_size, d)
        # Section 3.4: one matrix for both embeddings and the output projection, when the vocabulary is shared.
        self.tgt_embed = self.src_embed if cfg.tie_embeddings else TokenEmbedding(vocab_size, d)
        self.positional = PositionalEncoding(d, cfg.max_len)
        self.dropout = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList([EncoderLayer(**sizes) for _ in range(cfg.n_encoder_layers)])
        self.decoder = nn.ModuleList([DecoderLayer(**sizes) for _ in range(cfg.n_decoder_layers)])
        # Pre-norm leaves the residual stream un-normalized, so each stack ends with one LayerNorm.
        self.encoder_norm = LayerNorm(d) if cfg.pre_norm else nn.Identity()
        self.decoder_norm = LayerNorm(d) if cfg.pre_norm else nn.Identity()
        self.generator = nn.Linear(d, vocab_size)  # the final linear layer; softmax lives in the loss
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.generator.weight = self.src_embed.embedding.weight

    def _init_weights(self, module: nn.Module) -> None:
        # Xavier for projections keeps activations at unit scale through the stack; embeddings get
        # std d_model^-0.5 so that after the sqrt(d_model) scale they are unit scale too, and as the tied
        # output projection they give logits of unit scale at the start.
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=module.embedding_dim ** -0.5)

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode (no dropout) for validating and decoding, then back to the caller's mode, errors included:
        training validates and draws TensorBoard's figure mid-run, and must keep its dropout afterwards."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.train(was_training)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once

    def head_parameters(self) -> list[nn.Parameter]:
        """What --finetune=head trains: the final projection to the vocabulary (weight and bias) and, with
        pre-norm, the decoder's final LayerNorm. With tied embeddings that weight IS the shared embedding
        matrix, so the head then also moves both input embeddings; everything else stays frozen."""
        return list(self.generator.parameters()) + list(self.decoder_norm.parameters())

    def src_mask(self, src: Tensor) -> Tensor:
        return (src != self.pad_id)[:, None, None, :]  # (B, 1, 1, S): True where the key is a real token

    def embed(self, embedding: TokenEmbedding, ids: Tensor, start: int = 0) -> Tensor:
        """Token embeddings + positional encoding, then dropout (section 5.4): the residual stream (B, T, d_model).
        It stays fp32 under autocast, where the matrix products take bf16 copies: a bf16 stream rounds every residual
        sum, and it cost 0.5 test BLEU at equal steps for at most 3% more speed on a CPU (README, Speed)."""
        return self.dropout(self.positional(embedding(ids), start))

    def encode(self, src: Tensor, maps: dict | None = None) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, d_model) and its mask, reused by every decoding step."""
        src_mask = self.src_mask(src)
        x = self.embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, src_mask, maps)
        return self.encoder_norm(x), src_mask

    def decode(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor, cache: KVCache | None = None,
               maps: dict | None = None) -> Tensor:
        """tgt_in (B, T) -> logits (B, T, vocab). With a cache, tgt_in holds only the new positions."""
        start = cache.length if cache is not None else 0
        x = self.embed(self.tgt_embed, tgt_in, start)
        for i, layer in enumerate(self.decoder):
            x = layer(x, memory, src_mask, cache.layers[i] if cache is not None else None, maps)
        return self.generator(self.decoder_norm(x))

    def forward(self, src: Tensor, tgt_in: Tensor, labels: Tensor | None = None,
                label_smoothing: float = 0.0) -> Tensor:
        """Logits (B, T, vocab); or, given labels, the cross-entropy summed over the real target tokens (padding
        ignored), so that train.py can normalize by the token count of a whole step. The loss lives in forward
        so that DDP, DataParallel and torch.compile wrap all of the step's work."""
        memory, src_mask = self.encode(src)
        logits = self.decode(tgt_in, memory, src_mask)
        if labels is None:
            return logits
        logits, labels = logits.flatten(0, 1), labels.flatten()  # (B * T, vocab), (B * T)
        if logits.device.type == "cpu" and not torch.compiler.is_compiling():  # (compiled, inductor fuses it)
            return SmoothedCrossEntropy.apply(logits, labels, self.pad_id, label_smoothing)
        return F.cross_entropy(logits.float(), labels, ignore_index=self.pad_id, label_smoothing=label_smoothing,
                               reduction="sum")

    def attention_maps(self, src: Tensor, tgt_in: Tensor) -> dict[str, list[Tensor]]:
        """Runs the plain-math attention path and returns the weights: for "encoder", "decoder" (masked
        self-attention) and "cross", one (B, n_heads, T_query, T_key) tensor per layer."""
        maps = {"encoder": [], "decoder": [], "cross": []}
        memory, src_mask = self.encode(src, maps)
        self.decode(tgt_in, memory, src_mask, maps=maps)
        return maps

    # ---------------------------------------------------------------- decoding

    def _max_lengths(self, src: Tensor, max_len_a: float, max_len_b: int) -> Tensor:
        """Each sentence may output at most a * (its source length) + b tokens, within the positional table."""
        src_len = (src != self.pad_id).sum(1)
        return (src_len * max_len_a + max_len_b).long().clamp(max=self.cfg.max_len - 1)

    def _next_logits(self, tokens: Tensor, memory: Tensor, src_mask: Tensor, cache: KVCache | None) -> Tensor:
        """Scores of the next token. With a cache only the newest token runs through the decoder; without, the
        whole prefix is recomputed (kept to measure and test the cache)."""
        logits = self.decode(tokens[:, -1:] if cache is not None else tokens, memory, src_mask, cache)
        return logits[:, -1].float()

    @torch.no_grad()
    def greedy(self, src: Tensor, max_len_a: float = 1.5, max_len_b: int = 10,
               use_cache: bool = True) -> list[list[int]]:
        """Batched greedy decoding: each sentence stops at its own EOS (or its own maximum length) and then leaves
        the batch, so the others decode faster."""
        memory, src_mask = self.encode(src)
        max_lens = self._max_lengths(src, max_len_a, max_len_b)
        sentence = torch.arange(src.size(0), device=src.device)  # which sentence each row of the batch is
        tokens = torch.full((src.size(0), 1), self.bos_id, dtype=torch.long, device=src.device)
        cache = KVCache(len(self.decoder)) if use_cache else None
        out = [[] for _ in range(src.size(0))]
        for t in range(int(max_lens.max())):
            nxt = self._next_logits(tokens, memory, src_mask, cache).argmax(-1)  # argmax: no need to normalize
            nxt = torch.where(t + 1 >= max_lens, self.eos_id, nxt)  # out of room: end the sentence
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done = nxt == self.eos_id
            if done.any():
                for i, row in zip(sentence[done].tolist(), tokens[done, 1:-1].tolist()):
                    out[i] = row
                keep = (~done).nonzero().squeeze(1)
                if len(keep) == 0:
                    break
                sentence, tokens, memory, src_mask, max_lens = (x.index_select(0, keep) for x in (
                    sentence, tokens, memory, src_mask, max_lens))
                if cache is not None:
                    cache.reorder(keep, cross=True)
        return out

    @torch.no_grad()
    def beam_search(self, src: Tensor, beam_size: int = 5, length_penalty: float = 1.0, max_len_a: float = 1.5,
                    max_len_b: int = 10, use_cache: bool = True) -> list[list[int]]:
        """Batched beam search. A hypothesis that emits EOS is frozen: it may only continue with padding at no
        cost, and keeps its place in the beam. When every beam of a sentence is frozen (or out of room), the
        sentence returns its hypothesis with the best score / length ** length_penalty and leaves the batch."""
        B, K = src.size(0), beam_size
        memory, src_mask = self.encode(src)
        memory, src_mask = memory.repeat_interleave(K, 0), src_mask.repeat_interleave(K, 0)  # (B*K, S, d_model)
        max_lens = self._max_lengths(src, max_len_a, max_len_b).repeat_interleave(K)
        sentence = torch.arange(B, device=src.device)  # which sentence each group of K rows is
        tokens = torch.full((B * K, 1), self.bos_id, dtype=torch.long, device=src.device)
        scores = torch.zeros(B, K, device=src.device)
        scores[:, 1:] = float("-inf")  # all beams start identical: let only the first one expand
        done = torch.zeros(B * K, dtype=torch.bool, device=src.device)
        lengths = torch.zeros(B * K, device=src.device)
        cache = KVCache(len(self.decoder)) if use_cache else None
        out = [[] for _ in range(B)]
        for t in range(int(max_lens.max())):
            logp = self._next_logits(tokens, memory, src_mask, cache).log_softmax(-1)  # (B*K, vocab)
            V = logp.size(-1)
            eos_logp = logp[:, self.eos_id].clone()
            logp[(t + 1 >= max_lens) | done] = float("-inf")  # out of room: only EOS is left
            logp[:, self.eos_id] = eos_logp
            logp[done, self.eos_id] = float("-inf")
            logp[done, self.pad_id] = 0.0  # frozen hypotheses keep their score
            top_scores, top = (scores.view(-1, 1) + logp).view(len(sentence), K * V).topk(K, dim=1)
            rows = (torch.arange(len(sentence), device=src.device)[:, None] * K + top // V).view(-1)
            nxt = (top % V).view(-1)
            tokens = torch.cat([tokens.index_select(0, rows), nxt[:, None]], dim=1)
            lengths = lengths.index_select(0, rows) + (~done.index_select(0, rows)).float()
            done = done.index_select(0, rows) | (nxt == self.eos_id)
            scores = top_scores
            if cache is not None:
                cache.reorder(rows)
            finished = done.view(-1, K).all(1)
            if finished.any():
                best = (scores / lengths.view(-1, K).clamp(min=1) ** length_penalty).argmax(1)
                for i, row in zip(sentence[finished].tolist(),
                                  tokens.view(-1, K, tokens.size(1))[finished, best[finished], 1:].tolist()):
                    out[i] = row[:row.index(self.eos_id)] if self.eos_id in row else row  # cut at its EOS
                keep = (~finished).nonzero().squeeze(1)
                if len(keep) == 0:
                    break
                rows = (keep[:, None] * K + torch.arange(K, device=src.device)).view(-1)  # their K rows each
                sentence, scores = sentence.index_select(0, keep), scores.index_select(0, keep)
                tokens, memory, src_mask, max_lens, done, lengths = (x.index_select(0, rows) for x in (
                    tokens, memory, src_mask, max_lens, done, lengths))
                if cache is not None:
                    cache.reorder(rows, cross=True)
        return out

    def generate(self, src: Tensor, beam_size: int = 1, length_penalty: float = 1.0, max_len_a: float = 1.5,
                 max_len_b: int = 10, use_cache: bool = True) -> list[list[int]]:
        """Translate a padded batch of source ids: greedy for beam_size 1, beam search otherwise."""
        if beam_size <= 1:
            return self.greedy(src, max_len_a, max_len_b, use_cache)
        return self.beam_search(src, beam_size, length_penalty, max_len_a, max_len_b, use_cache)

    # ---------------------------------------------------------------- training helpers

    def configure_optimizer(self, lr: float, weight_decay: float, betas: tuple[float, float],
                            head_lr: float | None = None) -> torch.optim.AdamW:
        """AdamW over the parameters that require grad only (fine-tuning freezes the rest). Weight decay on
        matrices only: decaying biases and LayerNorm gains just fights the normalization. With head_lr, the
        head (see head_parameters) gets its own learning rate. The fused kernel is one launch for all tensors
        and can skip a non-finite step on the device (see train.py)."""
        head = {id(p) for p in self.head_parameters()} if head_lr is not None else set()
        groups = {}
        for p in self.parameters():
            if p.requires_grad:
                key = (id(p) in head, p.dim() >= 2)
                groups.setdefault(key, []).append(p)
        param_groups = [{"params": ps, "weight_decay": weight_decay if matrix else 0.0,
                         "lr": head_lr if is_head else lr, "name": ("head" if is_head else "body")}
                        for (is_head, matrix), ps in sorted(groups.items())]
        return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=True)

    def estimate_flops(self, src_lens: Tensor, tgt_lens: Tensor) -> float:
        """Matmul FLOPs of one training step (forward + backward = 3x forward) on sentences of these lengths.
        Counts only real tokens (padding is waste, not work), and half of each causal T x T score matrix."""
        cfg, d = self.cfg, self.cfg.d_model
        s, t = src_lens.double(), tgt_lens.double()
        S, T, SS, TT, ST = s.sum(), t.sum(), (s * s).sum(), (t * t).sum(), (s * t).sum()
        enc = 2 * S * 4 * d * d + 2 * 2 * SS * d + 2 * 2 * S * d * cfg.d_ff  # QKV+out, scores+AV, FFN
        dec_self = 2 * T * 4 * d * d + 2 * TT * d  # causal: half of 2 * 2 * TT * d
        cross = 2 * T * 2 * d * d + 2 * S * 2 * d * d + 2 * 2 * ST * d  # Q+out on target, K+V on source
        ffn = 2 * 2 * T * d * cfg.d_ff
        head = 2 * T * d * self.generator.out_features
        forward = cfg.n_encoder_layers * enc + cfg.n_decoder_layers * (dec_self + cross + ffn) + head
        return float(3 * forward)
