"""Shared fixtures: a tiny synthetic parallel corpus written by the tests, and a tiny model trained on it."""
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI30K = os.path.join(ROOT, "..", "shared", "data", "multi30k")
sys.path.insert(0, ROOT)

# A toy "English -> German" language: word-by-word with one reordering, so a small model learns it quickly.
LEXICON = {"a": "ein", "the": "der", "man": "mann", "woman": "frau", "dog": "hund", "boy": "junge", "girl": "mädchen",
           "rides": "fährt", "sees": "sieht", "walks": "läuft", "eats": "isst", "big": "großer", "small": "kleiner",
           "red": "roter", "green": "grüner", "bike": "rad", "ball": "ball", "street": "straße", "park": "park",
           "in": "im", "on": "auf", "with": "mit", "today": "heute", "now": "jetzt"}
SUBJECTS, VERBS = ["man", "woman", "dog", "boy", "girl"], ["rides", "sees", "walks", "eats"]
ADJS, OBJECTS, PLACES = ["big", "small", "red", "green"], ["bike", "ball"], ["street", "park"]


def make_pair(rng: random.Random) -> tuple[str, str]:
    words = ["a", rng.choice(ADJS), rng.choice(SUBJECTS), rng.choice(VERBS), "the", rng.choice(OBJECTS)]
    if rng.random() < 0.5:
        words += ["in", "the", rng.choice(PLACES)]
    tgt = [LEXICON[w] for w in words]
    if rng.random() < 0.5:  # a time word moves to the front in "German"
        words, tgt = words + ["today"], ["heute"] + tgt
    return " ".join(words).capitalize() + ".", " ".join(tgt).capitalize() + "."


def write_corpus(path: str, n_train: int = 400, n_eval: int = 40, seed: int = 0) -> str:
    rng = random.Random(seed)
    os.makedirs(path, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_eval), ("test_2016_flickr", n_eval)):
        pairs = [make_pair(rng) for _ in range(n)]
        for i, lang in enumerate(("en", "de")):
            with open(os.path.join(path, f"{split}.{lang}"), "w", encoding="utf-8") as f:
                f.write("\n".join(p[i] for p in pairs) + "\n")
    return path


# Flags for a model small enough that a few dozen steps take seconds on a CPU. fp32 on every CPU: with AMX,
# dtype=auto would train in bf16, and the tests that compare two runs' weights (DDP against accumulation, compiled
# against eager) need the same arithmetic everywhere. The bf16 tests and the default preset's test use auto.
TINY = ["--d_model=32", "--n_heads=2", "--n_encoder_layers=1", "--n_decoder_layers=1", "--d_ff=64",
        "--vocab_size=120", "--max_tokens=400", "--warmup_steps=20", "--lr=3e-3", "--eval_interval=10",
        "--beam_size=2", "--tensorboard=False", "--device=cpu", "--log_interval=5", "--dropout=0.0",
        "--attn_dropout=0.0", "--avg_last=0", "--dtype=float32"]


def run_script(script: str, *args: str, input: bytes | None = None, timeout: float = 300, env: dict | None = None):
    """Run one of the project's scripts as a user would; returns the CompletedProcess (bytes out, text err)."""
    full_env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], input=input, capture_output=True,
                          timeout=timeout, cwd=ROOT, env=full_env)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    return write_corpus(str(tmp_path_factory.mktemp("corpus")))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, corpus) -> str:
    """A run directory with a tiny model trained for 60 steps on the toy corpus (ckpt.pt and best.pt)."""
    out = str(tmp_path_factory.mktemp("run"))
    cache = str(tmp_path_factory.mktemp("cache"))
    r = run_script("train.py", f"--data_dir={corpus}", f"--out_dir={out}", f"--cache_dir={cache}", "--max_steps=60",
                   "--eval_interval=30", *TINY)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (CI still runs them; deselect with -m 'not slow')")
