"""Beam search against hand-made next-token probabilities (as fairseq's test_sequence_generator does): the exact
hypotheses it keeps at each step, how a finished hypothesis is kept, and what length_penalty changes."""
import math

import pytest
import torch

from config import Config
from model import Transformer

PAD, UNK, BOS, EOS, A, B, C = range(7)
NAMES = {PAD: "<pad>", EOS: "</s>", A: "a", B: "b", C: "c"}

# P(next token | prefix decoded so far). Greedy takes a, a, a, </s> (probability .6 * .7 * .7 * .8 = 0.235);
# "b </s>" is more probable (.4 * .9 = 0.36) but starts with the less probable token.
TABLE = {
    (): {A: 0.6, B: 0.4},
    (A,): {A: 0.7, B: 0.1, C: 0.1, EOS: 0.1},
    (B,): {EOS: 0.9, C: 0.1},
    (A, A): {A: 0.7, EOS: 0.2, C: 0.1},
    (A, A, A): {EOS: 0.8, C: 0.2},
}
LONG, SHORT = [A, A, A], [B]  # the two translations without their </s>
LOGP_LONG = math.log(0.6 * 0.7 * 0.7 * 0.8)  # -1.45, over 4 tokens: -0.36 per token
LOGP_SHORT = math.log(0.4 * 0.9)  # -1.02, over 2 tokens: -0.51 per token


def stub_model(calls: list) -> Transformer:
    """A real (tiny) Transformer whose next-token log-probabilities come from TABLE; every call records the
    prefixes it was asked about, one row per hypothesis of the beam."""
    cfg = Config(d_model=8, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, d_ff=16, max_len=32)
    model = Transformer(cfg, vocab_size=7, pad_id=PAD, bos_id=BOS, eos_id=EOS).eval()

    def next_logprobs(tokens, memory, src_mask, cache):
        rows = [tuple(t for t in row[1:] if t != PAD) for row in tokens.tolist()]
        calls.append([" ".join(NAMES[t] for t in row) for row in rows])
        logp = torch.full((len(rows), 7), -1e4)  # anything not in the table: practically impossible
        for i, row in enumerate(rows):
            for token, p in TABLE.get(row, {EOS: 1.0}).items():
                logp[i, token] = math.log(p)
        return logp

    model._next_logits = next_logprobs  # beam search normalizes them again: no change
    return model


def search(length_penalty: float, beam_size: int = 2) -> tuple[list[int], list[list[str]]]:
    calls = []
    model = stub_model(calls)
    src = torch.tensor([[A, B, EOS]])
    hyps = model.generate(src, beam_size=beam_size, length_penalty=length_penalty, max_len_a=0.0, max_len_b=10,
                          use_cache=False)
    return hyps[0], calls


def test_greedy_takes_the_locally_best_token():
    model = stub_model([])
    assert model.generate(torch.tensor([[A, EOS]]), beam_size=1, max_len_a=0.0, max_len_b=10,
                          use_cache=False) == [LONG]


def test_beam_keeps_exactly_these_hypotheses_step_by_step():
    """Beam 2: step 1 expands BOS only (the beams start identical); step 2 keeps "a a" (-0.87) and the finished
    "b </s>" (-1.02) over "a b", "a c", "a </s>" (-2.81 each); from then on the finished one is carried along with
    padding at no cost, in its place, while "a a" grows; the search stops once both have emitted </s>."""
    _, calls = search(length_penalty=1.0)
    assert calls == [
        ["", ""],  # step 1: both rows hold BOS alone
        ["a", "b"],  # the two most probable first tokens
        ["a a", "b </s>"],  # "b </s>" is finished: asked again, but only padding may follow
        ["b </s>", "a a a"],  # still there, with its score unchanged (-1.02 beats "a a a" at -1.22)
    ]


@pytest.mark.parametrize("length_penalty, expected", [(0.0, SHORT), (1.0, LONG), (2.0, LONG)])
def test_length_penalty_picks_between_finished_hypotheses(length_penalty, expected):
    """Both end in the beam with their summed log-probabilities; score / length ** length_penalty decides:
    0 compares the sums (the short one: -1.02 > -1.45), 1 the per-token averages (the long one: -0.36 > -0.51)."""
    assert LOGP_SHORT > LOGP_LONG and LOGP_SHORT / 2 < LOGP_LONG / 4  # what the table was made for
    hyp, _ = search(length_penalty)
    assert hyp == expected


def test_out_of_room_only_eos_is_left():
    """max_len_b=2: the second token must be </s>, so "a a ..." cannot grow and "b </s>" wins at any penalty."""
    model = stub_model([])
    for length_penalty in (0.0, 1.0):
        assert model.generate(torch.tensor([[A, EOS]]), beam_size=2, length_penalty=length_penalty, max_len_a=0.0,
                              max_len_b=2, use_cache=False) == [SHORT]
