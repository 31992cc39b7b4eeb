"""Bad inputs for translate.py, train.py and visualize.py, each run as a user would run it (a subprocess).

Every case must end in one of two ways:
  * a valid result: exit 0 and sensible stdout, or
  * a non-zero exit whose stderr ends with ONE line starting with "error: ", and no traceback anywhere.
Progress and log lines before that last line are fine; a multi-line message or a traceback is not.
"""
import gzip
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, run_script, write_corpus

# ---------------------------------------------------------------- the contract


def stderr_lines(r) -> list[str]:
    """Non-empty stderr lines. Split on "\\n" only: str.splitlines() would also split on \\x1c, \\x85, \\u2028..."""
    err = r.stderr.decode("utf-8", "replace")
    return [line.rstrip("\r") for line in err.split("\n") if line.strip()]


def check(r) -> str | None:
    """The contract of every case: no traceback; an error exit ends with exactly one 'error: ...' line.
    Returns that error line (None for exit 0)."""
    err = r.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, f"traceback (exit {r.returncode}):\n{err[-3000:]}"
    if r.returncode == 0:
        return None
    assert r.returncode > 0, f"killed by signal {-r.returncode}:\n{err[-2000:]}"
    lines = stderr_lines(r)
    assert lines, f"exit {r.returncode} with nothing on stderr"
    last = lines[-1]
    assert last.startswith("error: "), f"exit {r.returncode}, the last stderr line is not 'error: ...':\n{err[-2000:]}"
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == [last], f"more than one error line (a multi-line message?):\n{err[-2000:]}"
    return last


def expect_error(r, *needles: str) -> str:
    """A clean one-line refusal that mentions every needle (case-insensitive)."""
    msg = check(r)
    assert msg is not None, (f"expected an error, got exit 0; stdout={r.stdout[:500]!r} "
                             f"stderr={r.stderr.decode('utf-8', 'replace')[-1000:]}")
    for needle in needles:
        assert needle.lower() in msg.lower(), f"{needle!r} not in the message {msg!r}"
    return msg


def expect_ok(r) -> str:
    """Exit 0 (and no traceback); returns stdout as text."""
    check(r)
    assert r.returncode == 0, r.stderr.decode("utf-8", "replace")[-2000:]
    return r.stdout.decode("utf-8")


def out_lines(stdout: str) -> list[str]:
    """stdout as lines, one per "\\n" (the scripts end every line with one)."""
    assert stdout == "" or stdout.endswith("\n"), repr(stdout[-200:])
    return stdout.split("\n")[:-1]


def expect_one_line(r) -> str:
    """A single-sentence translation: exit 0 and exactly one line on stdout."""
    lines = out_lines(expect_ok(r))
    assert len(lines) == 1, lines
    return lines[0]


def run(script: str, *args, input: bytes = b"", env: dict | None = None):
    """Run a script with a timeout that fails the case instead of hanging the suite; stdin never inherited."""
    return run_script(script, *args, input=input, env=env, timeout=240)


# ---------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Small text inputs for translate.py --file/--ref, and paths that cannot be written to."""
    d = tmp_path_factory.mktemp("files")
    (d / "two.en").write_text("A dog sees the ball.\nThe man rides the bike.\n", encoding="utf-8")
    (d / "one.de").write_text("Ein hund.\n", encoding="utf-8")
    (d / "empty.txt").write_bytes(b"")
    (d / "a_dir").mkdir()
    (d / "afile").write_text("a regular file\n")
    (d / "corrupt.en.gz").write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03this is not deflate data at all")
    data = gzip.compress(b"A dog sees the ball.\n" * 50)
    (d / "truncated.en.gz").write_bytes(data[:len(data) // 2])
    return {"dir": str(d), "afile": str(d / "afile")}


@pytest.fixture(scope="module")
def paths(trained, corpus, files, tmp_path_factory) -> dict:
    """The placeholders used in the parametrized argument lists."""
    return {"ckpt": trained, "corpus": corpus, "files": files["dir"], "afile": files["afile"],
            "tmp": str(tmp_path_factory.mktemp("scratch"))}


def fill(args, paths: dict) -> list:
    return [a.format(**paths) if isinstance(a, str) else a for a in args]


def case(case_id: str, *values):
    """One parametrized case with a readable id."""
    return pytest.param(*values, id=case_id)


# ---------------------------------------------------------------- translate.py: sentences and options

LONG = " ".join(["the big dog rides the red bike in the park"] * 500)  # 5,000 words

TRANSLATE_ERRORS = [
    # (id, args, needles the one-line message must contain)
    case("empty-sentence", ["--ckpt={ckpt}", ""], ["empty"]),
    case("blank-sentence", ["--ckpt={ckpt}", "   "], ["empty"]),
    case("no-arguments", [], ["sentence"]),
    case("two-sentences", ["--ckpt={ckpt}", "A dog.", "A man."], ["one sentence"]),
    case("sentence-and-file", ["--ckpt={ckpt}", "--file={files}/two.en", "A dog."], ["not both"]),
    case("missing-file", ["--ckpt={ckpt}", "--file={files}/nosuch.en"], ["nosuch.en"]),
    case("file-is-directory", ["--ckpt={ckpt}", "--file={files}/a_dir"], ["a_dir"]),
    case("truncated-gzip-file", ["--ckpt={ckpt}", "--file={files}/truncated.en.gz"], ["truncated.en.gz"]),
    case("corrupt-gzip-file", ["--ckpt={ckpt}", "--file={files}/corrupt.en.gz"], ["corrupt.en.gz"]),
    case("ref-line-count", ["--ckpt={ckpt}", "--file={files}/two.en", "--ref={files}/one.de"], ["1", "2", "one.de"]),
    case("ref-without-file", ["--ckpt={ckpt}", "--ref={files}/one.de", "A dog."], ["--ref", "--file"]),
    case("beam-negative", ["--ckpt={ckpt}", "--beam=-1", "A dog."], ["--beam"]),
    case("beam-not-a-number", ["--ckpt={ckpt}", "--beam=abc", "A dog."], ["--beam"]),
    case("beam-without-value", ["--ckpt={ckpt}", "--beam", "A dog."], ["--beam"]),
    case("unknown-key", ["--ckpt={ckpt}", "--nosuchkey=1", "A dog."], ["--nosuchkey"]),
    case("near-miss-key", ["--ckpt={ckpt}", "--beams=2", "A dog."], ["did you mean --beam"]),
    case("device-tpu", ["--ckpt={ckpt}", "--device=tpu", "A dog."], ["tpu"]),
]


@pytest.mark.parametrize("args,needles", TRANSLATE_ERRORS)
def test_translate_refuses(paths, args, needles):
    expect_error(run("translate.py", *fill(args, paths)), *needles)


def test_translate_device_cuda_without_cuda(paths):
    r = run("translate.py", f"--ckpt={paths['ckpt']}", "--device=cuda", "A dog.")
    if torch.cuda.is_available():
        expect_one_line(r)
    else:
        expect_error(r, "cuda")


@pytest.mark.parametrize("sentence", [
    "\x01\x07 A dog\x1b[31m rides \x1b[0m the\x7f bike\x0b\x0c \u200b\u200d",  # control characters, zero-width
    "A 😀 dog 🐕‍🦺 rides 🚲 the bike 👍🏽",  # emoji, ZWJ sequences, skin-tone modifiers
    "一个男人在公园里骑自行车。犬が走る。개가 달린다",  # CJK scripts
    "رجل يركب دراجة في الحديقة. Мужчина едет на велосипеде",  # Arabic (right to left) and Cyrillic
    "e\u0301\u0301\u0301 Z\u0351\u0327\u0334a\u035c\u0338l\u0316g\u0360o ﬁ ½ Ａ",  # combining marks, NFKC forms
], ids=["control-chars", "emoji", "cjk", "arabic-cyrillic", "combining-marks"])
def test_translate_unseen_scripts(paths, sentence):
    expect_one_line(run("translate.py", f"--ckpt={paths['ckpt']}", sentence))


def test_translate_very_long_sentence_is_cut_with_a_warning(paths):
    r = run("translate.py", f"--ckpt={paths['ckpt']}", "--beam=1", LONG)
    expect_one_line(r)
    err = r.stderr.decode("utf-8", "replace").lower()
    assert "warning" in err and "cut" in err, err[-1000:]


@pytest.mark.parametrize("script", ["translate.py", "visualize.py"])
def test_sentence_argument_with_invalid_utf8(paths, script):
    """argv bytes that are not UTF-8 (a latin-1 terminal): translate it, or refuse with one line."""
    out = [f"--out={paths['tmp']}/viz-argv"] if script == "visualize.py" else []
    r = run(script, f"--ckpt={paths['ckpt']}", *out, b"caf\xe9 au lait \xff")
    if check(r) is None and script == "translate.py":
        expect_one_line(r)


# ---------------------------------------------------------------- translate.py --file: one output line per input line

FILE_INPUTS = [
    ("blank-lines", b"A dog sees the ball.\n\n   \nThe man rides the bike.\n\t\n"),
    ("empty-input", b""),
    ("bom-and-crlf", b"\xef\xbb\xbfA dog sees the ball.\r\n\r\nThe man rides the bike.\r\n"),
    ("nul-and-control-bytes", b"\x00\x01\x02 dog\n\x1c\x1d\x1e\x1f\nA \x00 man\n"),
    ("unicode-line-separators", "A dog\u2028sees\u2029the\x85ball.\nA man.\n".encode("utf-8")),
]


@pytest.mark.parametrize("data", [c[1] for c in FILE_INPUTS], ids=[c[0] for c in FILE_INPUTS])
def test_translate_file_keeps_line_count(paths, data):
    lines_in = data.split(b"\n")
    if lines_in[-1] == b"":
        lines_in.pop()
    lines_out = out_lines(expect_ok(run("translate.py", f"--ckpt={paths['ckpt']}", "--file=-", input=data)))
    assert len(lines_out) == len(lines_in), (lines_in, lines_out)
    for src, hyp in zip(lines_in, lines_out):
        if not src.decode("utf-8").strip():
            assert hyp == "", (src, hyp)  # an empty or blank line gives an empty output line


def test_translate_file_with_a_line_of_too_many_words(paths, files):
    path = os.path.join(files["dir"], "long.en")
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"A dog sees the ball.\n{LONG}\n\nThe man.\n")
    r = run("translate.py", f"--ckpt={paths['ckpt']}", f"--file={path}", "--beam=1")
    lines = out_lines(expect_ok(r))
    assert len(lines) == 4 and lines[2] == "", lines
    assert "warning" in r.stderr.decode("utf-8", "replace").lower()


def test_translate_stdin_invalid_utf8_names_the_line(paths):
    r = run("translate.py", f"--ckpt={paths['ckpt']}", "--file=-", input=b"A dog.\nA man.\nCaf\xe9 \xff\xfe\nA girl.\n")
    if check(r) is None:  # a valid result is allowed too, as long as every line has its output line
        assert len(out_lines(r.stdout.decode("utf-8"))) == 4
    else:
        expect_error(r, "line 3")


def test_translate_utf16_file_is_refused_or_translated(paths, files):
    path = os.path.join(files["dir"], "utf16.en")
    with open(path, "wb") as f:
        f.write("A dog.\nA man.\n".encode("utf-16"))
    r = run("translate.py", f"--ckpt={paths['ckpt']}", f"--file={path}")
    if check(r) is not None:
        expect_error(r, "utf16.en", "line 1")


def test_translate_file_with_ref_prints_scores(paths, files, corpus):
    r = run("translate.py", f"--ckpt={paths['ckpt']}", f"--file={corpus}/val.en", f"--ref={corpus}/val.de")
    lines = out_lines(expect_ok(r))
    assert len(lines) == 40
    assert "sacreBLEU=" in r.stderr.decode()


def test_translate_empty_file_with_empty_ref(paths, files):
    empty = os.path.join(files["dir"], "empty.txt")
    r = run("translate.py", f"--ckpt={paths['ckpt']}", f"--file={empty}", f"--ref={empty}")
    if check(r) is None:
        assert r.stdout == b""


def test_translate_stdout_closed_pipe(paths):
    """`translate.py --file=big.en | head -1`: the reader is gone before anything is written."""
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "translate.py"), f"--ckpt={paths['ckpt']}", "--file=-"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    p.stdout.close()  # the only read end: every write gets EPIPE
    _, err = p.communicate(b"A dog sees the ball.\n" * 20, timeout=240)
    check(subprocess.CompletedProcess(p.args, p.returncode, b"", err))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_translate_stdout_disk_full(paths):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    with open("/dev/full", "wb") as full:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "translate.py"), f"--ckpt={paths['ckpt']}", "A dog."],
                           stdin=subprocess.DEVNULL, stdout=full, stderr=subprocess.PIPE, cwd=ROOT, env=env,
                           timeout=240)
    expect_error(r)


# ---------------------------------------------------------------- checkpoints (translate.py and visualize.py)


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.fixture(scope="module")
def bad_ckpts(trained, tmp_path_factory) -> dict:
    """Broken, foreign, mismatched and malicious checkpoint files built from the trained run's ckpt.pt."""
    d = tmp_path_factory.mktemp("bad_ckpts")
    real = os.path.join(trained, "ckpt.pt")
    raw = open(real, "rb").read()
    out = {"missing": str(d / "nosuch.pt"), "empty-dir": str(d / "empty_dir")}
    os.makedirs(out["empty-dir"])
    # A run directory whose first save was interrupted: config.json, tokenizer.json and a temporary file, no ckpt.pt.
    out["dir-without-ckpt"] = str(d / "run_dir")
    os.makedirs(out["dir-without-ckpt"])
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(trained, name), os.path.join(out["dir-without-ckpt"], name))
    shutil.copy(real, os.path.join(out["dir-without-ckpt"], "ckpt.pt.12345.tmp"))

    def put(name: str, data: bytes) -> None:
        out[name] = str(d / f"{name}.pt")
        with open(out[name], "wb") as f:
            f.write(data)

    put("empty-file", b"")
    put("truncated", raw[:len(raw) // 2])
    put("random-bytes", os.urandom(64 * 1024))
    # Code-running pickles, as torch.save (zip) and as a plain pickle; the marker must never appear.
    marker = str(d / "MARKER_code_ran")
    out["marker"] = marker
    torch.save({"model": _RunsCode(f"touch {marker}"), "config": {}, "tokenizer": ""}, str(d / "malicious-torch.pt"))
    out["malicious-torch"] = str(d / "malicious-torch.pt")
    with open(d / "malicious-pickle.pt", "wb") as f:
        pickle.dump(_RunsCode(f"touch {marker}"), f)
    out["malicious-pickle"] = str(d / "malicious-pickle.pt")
    # Weights that do not fit the checkpoint's own config or tokenizer.
    ckpt = torch.load(real, map_location="cpu", weights_only=True)
    wrong_size = {**ckpt, "config": {**ckpt["config"], "d_model": ckpt["config"]["d_model"] * 2}}
    torch.save(wrong_size, str(d / "other-size.pt"))
    out["other-size"] = str(d / "other-size.pt")
    from dataset import Tokenizer
    with open(os.path.join(trained, "tokenizer.json"), encoding="utf-8") as f:
        vocab = Tokenizer.from_str(f.read()).vocab_size
    other_tok = Tokenizer.train(["a dog sees the ball", "ein hund sieht den ball"] * 5, "word", 1000, 1)
    assert other_tok.vocab_size != vocab
    torch.save({**ckpt, "tokenizer": other_tok.to_str()}, str(d / "other-vocab.pt"))
    out["other-vocab"] = str(d / "other-vocab.pt")
    torch.save({**ckpt, "tokenizer": "{not json"}, str(d / "bad-tokenizer.pt"))
    out["bad-tokenizer"] = str(d / "bad-tokenizer.pt")
    torch.save({**ckpt, "config": ["not", "a", "dict"]}, str(d / "bad-config.pt"))
    out["bad-config"] = str(d / "bad-config.pt")
    # Torch files that are not checkpoints of this project.
    torch.save({"foo": torch.zeros(2)}, str(d / "foreign.pt"))
    out["foreign-dict"] = str(d / "foreign.pt")
    torch.save(torch.zeros(2), str(d / "bare-tensor.pt"))
    out["bare-tensor"] = str(d / "bare-tensor.pt")
    torch.save(ckpt["model"], str(d / "state-dict-only.pt"))
    out["state-dict-only"] = str(d / "state-dict-only.pt")
    return out


CKPT_CASES = {  # kind -> words the one-line message must contain
    "missing": ["nosuch.pt"], "empty-dir": ["empty_dir"], "dir-without-ckpt": ["run_dir"],
    "empty-file": ["empty-file.pt"], "truncated": ["truncated.pt"], "random-bytes": ["random-bytes.pt"],
    "malicious-torch": ["malicious-torch.pt"],
    "malicious-pickle": ["malicious-pickle.pt"], "other-size": [], "other-vocab": [], "bad-tokenizer": [],
    "bad-config": [], "foreign-dict": ["foreign.pt"], "bare-tensor": ["bare-tensor.pt"],
    "state-dict-only": ["state-dict-only.pt"],
}


# visualize.py loads checkpoints through checkpoint.load_model: it gets the kinds the issue lists, translate.py all.
VISUALIZE_CKPT_KINDS = ["missing", "empty-dir", "empty-file", "truncated", "random-bytes", "malicious-torch",
                        "malicious-pickle", "other-size", "other-vocab", "foreign-dict"]


@pytest.mark.parametrize("script,kind", [("translate.py", k) for k in CKPT_CASES] +
                         [("visualize.py", k) for k in VISUALIZE_CKPT_KINDS])
def test_bad_checkpoint_is_refused(bad_ckpts, paths, script, kind):
    marker = bad_ckpts["marker"]
    assert not os.path.exists(marker)
    out = [f"--out={paths['tmp']}/viz-{kind}"] if script == "visualize.py" else []
    r = run(script, f"--ckpt={bad_ckpts[kind]}", *out, "A dog sees the ball.")
    expect_error(r, *CKPT_CASES[kind])
    assert not os.path.exists(marker), "loading the checkpoint ran code from it"


# ---------------------------------------------------------------- visualize.py

VISUALIZE_ERRORS = [
    case("empty-sentence", ["--ckpt={ckpt}", "--out={tmp}/v", ""], ["sentence"]),
    case("no-arguments", [], ["sentence"]),
    case("layers-99", ["--ckpt={ckpt}", "--out={tmp}/v", "--layers=99", "A dog."], ["--layers", "99"]),
    case("layers-negative", ["--ckpt={ckpt}", "--out={tmp}/v", "--layers=-1", "A dog."], ["--layers"]),
    case("heads-abc", ["--ckpt={ckpt}", "--out={tmp}/v", "--heads=abc", "A dog."], ["--heads"]),
    case("heads-out-of-range", ["--ckpt={ckpt}", "--out={tmp}/v", "--heads=2", "A dog."], ["--heads"]),
    case("unknown-key", ["--ckpt={ckpt}", "--out={tmp}/v", "--nosuchkey=1", "A dog."], ["--nosuchkey"]),
    case("out-under-a-file", ["--ckpt={ckpt}", "--out={afile}/sub", "A dog."], ["--out"]),
    case("out-is-a-file", ["--ckpt={ckpt}", "--out={afile}", "A dog."], ["--out"]),
]


@pytest.mark.parametrize("args,needles", VISUALIZE_ERRORS)
def test_visualize_refuses(paths, args, needles):
    expect_error(run("visualize.py", *fill(args, paths)), *needles)


@pytest.mark.parametrize("sentence", ["A man rides the bike.", "A 😀 dog 犬 мир مرحبا \x07 $x^2$ \\frac{1}{2} $"],
                         ids=["plain", "unseen-scripts-and-mathtext"])
def test_visualize_writes_pngs(paths, sentence, tmp_path):
    out = tmp_path / "maps"
    r = run("visualize.py", f"--ckpt={paths['ckpt']}", f"--out={out}", sentence)
    listed = out_lines(expect_ok(r))
    assert len(listed) == 4 and listed[-1].endswith("index.html"), listed
    for kind in ("encoder", "decoder", "cross"):
        with open(out / f"{kind}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "index.html").stat().st_size > 0


def test_visualize_negative_beam(paths, tmp_path):
    """translate.py refuses --beam=-1; visualize.py may refuse it too or fall back to greedy, but cleanly."""
    r = run("visualize.py", f"--ckpt={paths['ckpt']}", f"--out={tmp_path}/v", "--beam=-1", "A dog.")
    if check(r) is None:
        assert len(out_lines(r.stdout.decode())) == 4


def test_visualize_index_html_not_writable(paths, tmp_path):
    (tmp_path / "v" / "index.html").mkdir(parents=True)  # fails for root too, unlike chmod
    expect_error(run("visualize.py", f"--ckpt={paths['ckpt']}", f"--out={tmp_path}/v", "A dog."), "index.html")


# ---------------------------------------------------------------- train.py


@pytest.fixture(scope="module")
def bad_corpora(tmp_path_factory) -> dict:
    """Small corpora that are broken in one way each."""
    base = tmp_path_factory.mktemp("bad_corpora")
    out = {}
    for name in ("mismatch", "empty", "non-utf8", "missing-split", "corrupt-gzip", "blank-val"):
        out[name] = write_corpus(str(base / name), n_train=60, n_eval=8)
    with open(os.path.join(out["mismatch"], "train.de"), "a", encoding="utf-8") as f:
        f.write("Eine zeile zu viel.\n")
    for name in os.listdir(out["empty"]):
        open(os.path.join(out["empty"], name), "w").close()
    path = os.path.join(out["non-utf8"], "train.en")
    lines = open(path, "rb").read().split(b"\n")
    lines[6] = b"Caf\xe9 \xff\xfe latin-1"
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))
    os.remove(os.path.join(out["missing-split"], "test_2016_flickr.de"))
    os.remove(os.path.join(out["corrupt-gzip"], "val.en"))
    with open(os.path.join(out["corrupt-gzip"], "val.en.gz"), "wb") as f:
        f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03this is not deflate data at all")
    for lang in ("en", "de"):
        with open(os.path.join(out["blank-val"], f"val.{lang}"), "w") as f:
            f.write("\n  \n\t\n")
    return out


def train_args(paths: dict, tmp_path, *extra: str) -> list[str]:
    """The tiny settings, a 2-step budget and fresh out/cache folders; `extra` overrides (the last flag wins)."""
    return [f"--data_dir={paths['corpus']}", *TINY, "--max_steps=2", f"--out_dir={tmp_path}/out",
            f"--cache_dir={tmp_path}/cache", *extra]


TRAIN_ERRORS = [
    # (id, extra flags, needles)
    case("lr-abc", ["--lr=abc"], ["--lr"]),
    case("unknown-key", ["--nosuchkey=1"], ["--nosuchkey"]),
    case("near-miss-key", ["--lrr=1"], ["--lrr", "did you mean --lr"]),
    case("key-without-value", ["--max_steps"], ["--max_steps"]),
    case("preset-nosuch", ["--preset=nosuch"], ["nosuch", "tiny"]),
    case("max-tokens-negative", ["--max_tokens=-5"], ["--max_tokens"]),
    case("max-tokens-zero", ["--max_tokens=0"], ["--max_tokens"]),
    case("d-model-not-divisible", ["--d_model=30", "--n_heads=4"], ["--d_model", "--n_heads"]),
    case("finetune-without-init", ["--finetune=head"], ["--init_from"]),
    case("finetune-bogus", ["--finetune=bogus"], ["bogus"]),
    case("compile-bogus", ["--compile=yes"], ["--compile", "yes"]),
    case("same-languages", ["--tgt_lang=en"], ["--tgt_lang"]),
    case("device-tpu", ["--device=tpu"], ["tpu"]),
    case("other-language-pair", ["--src_lang=fr"], ["train.fr"]),
    case("max-len-fits-nothing", ["--max_len=3"], ["max_len"]),
    case("non-finite-loss", ["--lr=1e30", "--max_bad_steps=1", "--max_steps=5"], ["non-finite"]),
    case("data-dir-missing-no-hub", ["--data_dir={tmp}/no_such_dir", "--hf_dataset="], ["no_such_dir"]),
    case("data-dir-is-a-file", ["--data_dir={afile}", "--hf_dataset="], ["afile"]),
    case("out-dir-under-a-file", ["--out_dir={afile}/sub"], ["--out_dir"]),
    case("out-dir-is-a-file", ["--out_dir={afile}"], ["--out_dir"]),
    case("init-from-missing", ["--init_from={tmp}/no_such_ckpt.pt"], ["no_such_ckpt.pt"]),
    case("lr-infinite", ["--lr=1e999"], ["--lr"]),
]


@pytest.mark.parametrize("extra,needles", TRAIN_ERRORS)
def test_train_refuses(paths, tmp_path, extra, needles):
    expect_error(run("train.py", *train_args(paths, tmp_path, *fill(extra, paths))), *needles)


def test_train_default_hub_offline_says_where_to_put_files(paths, tmp_path):
    """No local data and the Hub unreachable: one line naming the folder for local files."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    missing = str(tmp_path / "no_local_data")
    r = run("train.py", *train_args(paths, tmp_path, f"--data_dir={missing}"), env=env)
    expect_error(r, missing, "--data_dir")


BAD_CORPUS_CASES = [
    case("mismatch", "mismatch", ["train.en", "train.de", "60", "61"]),
    case("empty", "empty", ["train"]),
    case("non-utf8", "non-utf8", ["train.en", "line 7"]),
    case("missing-split", "missing-split", ["test_2016_flickr.de"]),
    case("blank-val", "blank-val", ["val"]),
    case("corrupt-gzip", "corrupt-gzip", ["val.en.gz"]),
]


@pytest.mark.parametrize("name,needles", BAD_CORPUS_CASES)
def test_train_bad_corpus(paths, bad_corpora, tmp_path, name, needles):
    expect_error(run("train.py", *train_args(paths, tmp_path, f"--data_dir={bad_corpora[name]}")), *needles)


def test_train_read_only_out_dir(paths, tmp_path):
    """A folder the run cannot write to. chmod does not stop root, so then the test uses a path under a file."""
    if os.geteuid() == 0:
        target = f"{paths['afile']}/run"
    else:
        ro = tmp_path / "read_only"
        ro.mkdir()
        os.chmod(ro, 0o500)
        target = str(ro / "run")
    try:
        expect_error(run("train.py", *train_args(paths, tmp_path, f"--out_dir={target}")), "--out_dir")
    finally:
        if os.geteuid() != 0:
            os.chmod(tmp_path / "read_only", 0o700)


@pytest.mark.parametrize("kind", ["random-bytes", "malicious-torch", "other-size"])
def test_train_init_from_bad_checkpoint(paths, bad_ckpts, tmp_path, kind):
    r = run("train.py", *train_args(paths, tmp_path, f"--init_from={bad_ckpts[kind]}", "--finetune=all"))
    expect_error(r)
    assert not os.path.exists(bad_ckpts["marker"]), "loading the checkpoint ran code from it"


def test_train_init_from_is_a_valid_run(paths, tmp_path):
    """The good path next to the bad ones: fine-tune the trained model's head for 2 steps."""
    r = run("train.py", *train_args(paths, tmp_path, f"--init_from={paths['ckpt']}", "--finetune=head"))
    lines = out_lines(expect_ok(r))
    assert lines and lines[-1].startswith("test sacreBLEU="), lines
    assert os.path.isfile(tmp_path / "out" / "best.pt")


def _resume_dir(tmp_path, trained: str, edit=None) -> str:
    """An --out_dir holding only a ckpt.pt (the trained run's, optionally edited)."""
    out = tmp_path / "out"
    out.mkdir()
    ckpt = torch.load(os.path.join(trained, "ckpt.pt"), map_location="cpu", weights_only=True)
    torch.save(edit(ckpt) if edit else ckpt, str(out / "ckpt.pt"))
    return str(out)


def test_train_resume_from_random_bytes(paths, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(os.urandom(4096))
    expect_error(run("train.py", *train_args(paths, tmp_path)), "ckpt.pt")


def test_train_resume_with_another_model_size(paths, tmp_path):
    _resume_dir(tmp_path, paths["ckpt"])
    expect_error(run("train.py", *train_args(paths, tmp_path, "--d_model=64")), "d_model")


def test_train_resume_from_stripped_checkpoint(paths, tmp_path):
    _resume_dir(tmp_path, paths["ckpt"], lambda c: {k: c[k] for k in ("model", "config", "tokenizer")})
    check(run("train.py", *train_args(paths, tmp_path, "--max_steps=62")))


def test_train_resume_without_best_pt(paths, tmp_path):
    """Only ckpt.pt was copied to continue a run elsewhere; its recorded best BLEU is not beaten."""
    def edit(c):
        c["state"]["best_bleu"] = 1000.0
        return c
    _resume_dir(tmp_path, paths["ckpt"], edit)
    step = torch.load(str(tmp_path / "out" / "ckpt.pt"), weights_only=True)["state"]["step"]
    r = run("train.py", *train_args(paths, tmp_path, f"--max_steps={step + 1}"))
    if check(r) is None:
        assert out_lines(r.stdout.decode())[-1].startswith("test sacreBLEU=")


@pytest.fixture(scope="module")
def warm_cache(paths, tmp_path_factory) -> dict:
    """A --cache_dir filled by a run that stops right after the data step: --dtype=float64 is refused only then.
    Returns the folder and that run's result (checked by test_train_dtype_refused_after_the_data_step)."""
    tmp = tmp_path_factory.mktemp("warm")
    r = run("train.py", *train_args(paths, tmp, "--dtype=float64"))
    return {"cache": str(tmp / "cache"), "result": r}


def test_train_dtype_refused_after_the_data_step(warm_cache):
    expect_error(warm_cache["result"], "--dtype")


@pytest.mark.parametrize("prefix", [
    pytest.param("tokenizer-", id="tokenizer-cache"),
    pytest.param("ids-", id="ids-cache"),
])
def test_train_corrupt_cache(paths, warm_cache, tmp_path, prefix):
    """A cache is an optimization: a broken one must be ignored (or refused with one line), never a traceback."""
    cache = tmp_path / "cache"
    shutil.copytree(warm_cache["cache"], cache)
    assert any(name.startswith(prefix) for name in os.listdir(cache)), os.listdir(cache)
    for name in os.listdir(cache):
        if name.startswith(prefix):
            if name.endswith(".json"):
                (cache / name).write_text("{this is not a tokenizer", encoding="utf-8")
            else:
                torch.save({"foo": [[1, 2, 3]]}, str(cache / name))
    r = run("train.py", *train_args(paths, tmp_path))
    if check(r) is None:
        assert out_lines(r.stdout.decode())[-1].startswith("test sacreBLEU=")
