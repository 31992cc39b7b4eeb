"""translate.py, visualize.py and bench.py as a user runs them, on a checkpoint the tests train themselves."""
import importlib.util
import os
import re

import pytest
import torch

from checkpoint import load_model
from conftest import MULTI30K, run_script
from translate import translate_sentences
from visualize import collect

SENTENCES = ["A big man rides the bike.", "A small red dog eats the ball in the park today.", "A girl sees the ball.",
             "A green boy walks the bike in the street.", "A woman eats the ball today."]


def lines(out: bytes) -> list[str]:
    return out.decode("utf-8").splitlines()


def test_translate_single_sentence(trained):
    r = run_script("translate.py", f"--ckpt={trained}", "--beam=1", SENTENCES[0])
    assert r.returncode == 0, r.stderr
    assert len(lines(r.stdout)) == 1 and lines(r.stdout)[0].strip()


def test_translate_dtype_overrides_the_checkpoint(trained):
    """--dtype=bfloat16 decodes under bf16 autocast (emulated without AMX: slower, same code path); a bad value is
    one line."""
    r = run_script("translate.py", f"--ckpt={trained}", "--beam=2", "--dtype=bfloat16", SENTENCES[0])
    assert r.returncode == 0, r.stderr
    assert len(lines(r.stdout)) == 1 and lines(r.stdout)[0].strip()
    r = run_script("translate.py", f"--ckpt={trained}", "--dtype=float64", SENTENCES[0])
    assert r.returncode == 1 and r.stderr.decode().strip().splitlines() == [
        "error: --dtype must be auto, float32, bfloat16 or float16, got 'float64'"], r.stderr


def test_translate_file_and_stdin_keep_line_count_and_order(trained, tmp_path):
    path = tmp_path / "in.en"
    text = SENTENCES[:2] + [""] + SENTENCES[2:]  # an empty line gives an empty translation, in place
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    from_file = run_script("translate.py", f"--ckpt={trained}", f"--file={path}", "--beam=1")
    from_stdin = run_script("translate.py", f"--ckpt={trained}", "--file=-", "--beam=1", input=path.read_bytes())
    assert from_file.returncode == 0 and from_stdin.returncode == 0, from_file.stderr
    assert lines(from_file.stdout) == lines(from_stdin.stdout)
    assert len(lines(from_file.stdout)) == len(text) and lines(from_file.stdout)[2] == ""
    # each line alone gives the same greedy translation as inside the file (batch and padding invariance)
    for sentence, translated in zip(text, lines(from_file.stdout)):
        if sentence:
            alone = run_script("translate.py", f"--ckpt={trained}", "--beam=1", sentence)
            assert lines(alone.stdout) == [translated]


def test_translate_reports_bleu_against_references(trained, tmp_path):
    src, ref = tmp_path / "src", tmp_path / "ref"
    src.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    ref.write_text("\n".join(["Ein großer mann fährt der rad."] * len(SENTENCES)) + "\n", encoding="utf-8")
    r = run_script("translate.py", f"--ckpt={trained}", f"--file={src}", f"--ref={ref}")
    assert r.returncode == 0
    assert re.search(r"sacreBLEU=\d+\.\d\d lowercased=\d+\.\d\d chrF=\d+\.\d\d n=5 beam=2", r.stderr.decode())


def test_batched_translation_equals_one_by_one_in_process(trained):
    model, tok = load_model(trained)
    together = translate_sentences(model, tok, SENTENCES * 4, beam_size=2)
    assert together == [translate_sentences(model, tok, [s], beam_size=2)[0] for s in SENTENCES] * 4
    # decoding runs in eval mode, then gives the caller's mode back (validation translates mid-training)
    assert translate_sentences(model.train(), tok, SENTENCES, beam_size=2) == together[:len(SENTENCES)]
    assert model.training


def test_visualize_writes_pictures_and_index(trained, tmp_path):
    out = tmp_path / "maps"
    r = run_script("visualize.py", f"--ckpt={trained}", f"--out={out}", "Ein Mädchen und ein Junge: ÄÖÜ éà ß.")
    assert r.returncode == 0, r.stderr
    written = lines(r.stdout)
    assert sorted(os.path.basename(p) for p in written) == ["cross.png", "decoder.png", "encoder.png", "index.html"]
    for path in written:
        assert os.path.getsize(path) > 1000 if path.endswith(".png") else os.path.getsize(path) > 0
        if path.endswith(".png"):
            with open(path, "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "cross.png" in (out / "index.html").read_text(encoding="utf-8")


def test_plotted_attention_rows_sum_to_one_and_decoder_is_lower_triangular(trained):
    model, tok = load_model(trained)
    res = collect(model.train(), tok, SENTENCES[1], beam_size=2)
    assert model.training  # training draws TensorBoard's figure mid-run: its dropout must stay on afterwards
    for kind in ("encoder", "decoder", "cross"):
        weights, rows, cols = res[kind]
        assert weights.shape[-2:] == (len(rows), len(cols))
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5)
    decoder = res["decoder"][0]
    assert (decoder.triu(1) == 0).all()


@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="Multi30k not available")
def test_bench_runs_in_minimal_mode(trained):
    r = run_script("bench.py", "--preset=tiny", "--device=cpu", "--steps=2", "--sentences=8", "--profile=1",
                   f"--data_dir={MULTI30K}", f"--ckpt={trained}", env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    out = r.stdout.decode()
    assert "profile: 1 training step(s) of ours" in out and "aten::" in out  # the profiler's table of operations
    assert re.search(r"warmup steps: ours \d+\.\d s, nn.Transformer \d+\.\d s", out), out
    assert re.search(r"mean over 2 of an epoch's \d+ batches", out), out  # --steps distinct batches, each timed once
    assert re.search(r"MFU \d+\.\d% \(.* GFLOP/s of \d+, peak measured 2048x2048 matmul\)", out), out
    if "training (bfloat16" in out:  # a CPU with AMX: ours in fp32 is timed in the same rounds
        assert re.search(r"ours bfloat16 / ours fp32 eager: \d+\.\d\dx the tokens/s", out), out
    assert re.search(r"one sentence, beam 5: \d+\.\d ms", out), out
    if importlib.util.find_spec("ctranslate2"):  # CI installs it
        assert re.search(r"CTranslate2 int8 +beam 5 *: +\d+\.\d+ s, ours \d+\.\d+x its time, BLEU", out), out
    last = lines(r.stdout)[-1]
    assert re.fullmatch(r"train_tok_s=\d+ mfu=\d\.\d+ ratio_vs_nn_transformer=\d+\.\d+ greedy_s=\d+\.\d+ "
                        r"beam5_s=\d+\.\d+", last), last


@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="needs ../shared/data/multi30k")
def test_bench_times_the_data_path(tmp_path):
    r = run_script("bench.py", "--data_pairs=3000", f"--workdir={tmp_path}", f"--data_dir={MULTI30K}")
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    out = r.stdout.decode()
    assert "corpus: 3000 pairs" in out
    for name in ("first preparation", r"second start \(cache\)"):
        assert re.search(name + r": \d+\.\d s wall \(load_data \d+\.\d s\), peak RSS \d\.\d\d GiB; one epoch's "
                         r"batch list \(25k-token batches\) \d+\.\d\d s", out), out
