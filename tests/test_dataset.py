"""dataset.py: corpora from files and from the Hub code path, the tokenizer, the ids cache, token-budget batches."""
import gzip
import json
import os
import random
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

import dataset
from config import Config, UserError, get_config
from conftest import MULTI30K, make_pair, write_corpus
from dataset import Tokenizer, line_chunks, load_data, open_corpus, read_hub, read_texts, token_batches

SMALL = dict(vocab_size=120, max_len=32)


def cfg_for(corpus: str, cache: str, **kw) -> Config:
    return replace(Config(), data_dir=corpus, cache_dir=cache, hf_dataset="", **{**SMALL, **kw})


def dense_reference(src_text: list[str], tgt_text: list[str], tok: Tokenizer, max_len: int):
    """The dense matrices dataset.py built before the flat store (N x longest, rows right-padded) for these pairs,
    and its batch function: (idx, pad_multiple) -> (src, tgt_in, labels)."""
    src = [s[:max_len - 1] + [tok.eos_id] for s in tok.encode(src_text)]
    tgt = [t[:max_len - 1] for t in tok.encode(tgt_text)]
    matrices = [dataset.pad_rows(rows, tok.pad_id) for rows in
                (src, [[tok.bos_id] + t for t in tgt], [t + [tok.eos_id] for t in tgt])]
    src_len, tgt_len = torch.tensor([len(s) for s in src]), torch.tensor([len(t) + 1 for t in tgt])

    def batch(idx: torch.Tensor, pad_multiple: int) -> list[torch.Tensor]:
        s, t = (dataset.round_up(int(lens[idx].max()), pad_multiple) for lens in (src_len, tgt_len))
        return [torch.nn.functional.pad(m[idx, :w], (0, max(0, w - m.size(1))), value=tok.pad_id)
                for m, w in zip(matrices, (s, t, t))]
    return batch, src_len, tgt_len


def assert_batches_equal_dense(data, cfg: Config) -> None:
    corpus, tok = open_corpus(cfg), data.tokenizer
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        src, tgt = read_texts(corpus, name)
        if name == "train":  # the pairs the split keeps: those that fit max_len
            ids = tok.encode(src), tok.encode(tgt)
            keep = [i for i in range(len(src)) if len(ids[0][i]) < cfg.max_len and len(ids[1][i]) < cfg.max_len]
            src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
        else:
            assert (split.src_text, split.tgt_text) == (src, tgt)
        dense, src_len, tgt_len = dense_reference(src, tgt, tok, cfg.max_len)
        assert torch.equal(split.src_len, src_len) and torch.equal(split.tgt_len, tgt_len)
        for pad_multiple in (1, 8):
            for idx in split.batches(cfg.max_tokens, seed=3, pad_multiple=pad_multiple):
                for ours, theirs in zip(split.batch(idx, pad_multiple=pad_multiple), dense(idx, pad_multiple)):
                    assert ours.dtype == torch.long and torch.equal(ours, theirs)


def test_tiny_corpus_loads_and_batches_are_well_formed(corpus, tmp_path):
    data = load_data(cfg_for(corpus, str(tmp_path)))
    tok, train = data.tokenizer, data.train
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == tuple(tok.tok.token_to_id(t) for t in
                                                                     ["<pad>", "<unk>", "<s>", "</s>"])
    batches = train.batches(max_tokens=200, seed=1, epoch=0)
    assert sorted(torch.cat(batches).tolist()) == list(range(len(train)))  # every pair exactly once
    for idx in batches:
        src, tgt_in, labels = train.batch(idx)
        assert src.size(0) * max(src.size(1), tgt_in.size(1)) <= 200 or len(idx) == 1
        assert (tgt_in[:, 0] == tok.bos_id).all()
        # decoder input = [BOS] + y, labels = y + [EOS]: labels are the input shifted left by one
        real = labels != tok.pad_id
        assert torch.equal(tgt_in[:, 1:][real[:, 1:]], labels[:, :-1][real[:, 1:]])
        assert ((labels == tok.eos_id).sum(1) == 1).all()
        assert torch.equal(real.sum(1), train.tgt_len[idx])  # padded only to the longest in the batch
        assert real.sum(1).max() == labels.size(1)
    assert train.src_text is None and len(data.val.src_text) == len(data.val)  # text only where it is decoded


def test_flat_store_gives_the_dense_batches(tmp_path):
    """Every batch equals what the dense N x longest matrices gave, long pairs dropped (train) or kept (val)."""
    d = write_corpus(str(tmp_path / "c"), n_train=300)
    for split, lang in (("train", "en"), ("val", "de")):
        with open(os.path.join(d, f"{split}.{lang}"), "a", encoding="utf-8") as f:
            f.write(" ".join(["dog"] * 40) + "\n")
        with open(os.path.join(d, f"{split}.{'de' if lang == 'en' else 'en'}"), "a", encoding="utf-8") as f:
            f.write("hund\n")
    cfg = cfg_for(d, str(tmp_path / "cache"), max_tokens=150)
    data = load_data(cfg)
    assert len(data.train) == 300 and len(data.val) == 41 and not data.val.fits[-1]
    assert_batches_equal_dense(data, cfg)


def test_same_seed_same_batches_and_resume_mid_epoch(corpus, tmp_path):
    train = load_data(cfg_for(corpus, str(tmp_path))).train
    a, b = train.batches(300, seed=5, epoch=2), train.batches(300, seed=5, epoch=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    other = train.batches(300, seed=5, epoch=3)
    assert any(not torch.equal(x, y) for x, y in zip(a, other))  # a new epoch is shuffled anew
    resumed = train.batches(300, seed=5, epoch=2)[4:]  # a resumed run skips what it already did
    assert all(torch.equal(x, y) for x, y in zip(resumed, a[4:]))


def test_ddp_shards_are_disjoint_and_equal_in_number(corpus, tmp_path):
    train = load_data(cfg_for(corpus, str(tmp_path))).train
    shards = [train.batches(150, seed=0, epoch=0, rank=r, world_size=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) > 0
    seen = [i for s in shards for b in s for i in b.tolist()]
    assert len(seen) == len(set(seen))


def test_too_long_pairs_dropped_empty_lines_dropped(tmp_path, capsys):
    d = write_corpus(str(tmp_path / "c"), n_train=100)
    with open(os.path.join(d, "train.en"), "a", encoding="utf-8") as f:
        f.write(" ".join(["dog"] * 200) + "\n\n")
    with open(os.path.join(d, "train.de"), "a", encoding="utf-8") as f:
        f.write("hund\nhund\n")
    for start in ("first", "cached"):  # the same lines from the cache
        data = load_data(cfg_for(d, str(tmp_path / "cache")))
        err = capsys.readouterr().err
        assert "dropped 1 pairs with an empty side" in err and "1 pairs longer than max_len=32 dropped" in err, start
        assert len(data.train) == 100


def test_bad_data_gives_clear_errors(tmp_path):
    d = write_corpus(str(tmp_path / "c"), n_train=20)
    with open(os.path.join(d, "train.de"), "a", encoding="utf-8") as f:
        f.write("extra\n")
    with pytest.raises(UserError, match=r"train\.en has 20 lines but .*train\.de has 21"):
        open_corpus(cfg_for(d, "")).rows("train")
    d = write_corpus(str(tmp_path / "d"), n_train=20)
    with open(os.path.join(d, "val.en"), "ab") as f:
        f.write(b"caf\xe9\n")
    with pytest.raises(UserError, match=r"val\.en: invalid UTF-8 on line 41"):
        read_texts(open_corpus(cfg_for(d, "")), "val")
    with pytest.raises(UserError, match="missing .*nosuch.en"):
        open_corpus(cfg_for(write_corpus(str(tmp_path / "e"), n_train=5), "", splits="train,val,nosuch"))
    with pytest.raises(UserError, match="not found"):
        open_corpus(cfg_for(str(tmp_path / "nothing"), ""))


def test_lines_read_in_chunks_like_whole_files(tmp_path, monkeypatch):
    """Chunk edges fall inside lines and inside multi-byte characters; lines end at "\\n" only; a bad byte is
    reported with its line number however far into the file it is."""
    text = "Ä dög\r\n\n  spaced  \nä\u2028b\x85c\n" * 30 + "no newline at the end"
    path = tmp_path / "t.en"
    path.write_text(text, encoding="utf-8")
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 7)
    chunks = list(line_chunks(str(path)))
    assert len(chunks) > 10 and [x for c in chunks for x in c] == [line.strip() for line in text.split("\n")]
    path.write_bytes(text.encode("utf-8") + b"\n" * 5 + b"caf\xe9\n")
    with pytest.raises(UserError, match=r"t\.en: invalid UTF-8 on line 126"):
        list(line_chunks(str(path)))


def test_gzipped_files_read_like_plain_ones(tmp_path, monkeypatch):
    d = write_corpus(str(tmp_path / "c"), n_train=30)
    for name in os.listdir(d):
        with open(os.path.join(d, name), "rb") as f, gzip.open(os.path.join(d, name + ".gz"), "wb") as g:
            g.write(f.read())
        os.remove(os.path.join(d, name))
    monkeypatch.setattr(dataset, "CHUNK_BYTES", 100)  # and chunked: pairs still aligned
    monkeypatch.setattr(dataset, "CHUNK_PAIRS", 4)
    plain = open_corpus(cfg_for(write_corpus(str(tmp_path / "p"), n_train=30), ""))
    gzipped = open_corpus(cfg_for(d, ""))
    assert read_texts(gzipped, "train") == read_texts(plain, "train") and len(read_texts(plain, "train")[0]) == 30
    assert len(list(gzipped.chunks("train"))) > 2


# ---------------------------------------------------------------- the ids cache

def test_cache_is_shared_and_rebuilt_when_text_or_tokenizer_changes(tmp_path, capsys):
    d, cache = write_corpus(str(tmp_path / "c"), n_train=100), str(tmp_path / "cache")
    first = load_data(cfg_for(d, cache))
    assert "tokenized the corpus" in capsys.readouterr().err
    again = load_data(cfg_for(d, cache))
    assert "tokenized the corpus" not in capsys.readouterr().err
    files = sorted(os.listdir(cache))
    ids_file = [os.path.join(cache, f) for f in files if f.startswith("ids-")]
    assert len(ids_file) == 1 and os.path.samefile(again.train.src_ids.filename, ids_file[0])  # memory-mapped
    assert first.tokenizer.to_str() == again.tokenizer.to_str()
    # another tokenizer (a resumed run's, say): other ids
    other = Tokenizer.train([line for side in read_texts(open_corpus(cfg_for(d, cache)), "train") for line in side],
                            "bpe", 150, 2)
    assert load_data(cfg_for(d, cache), other).tokenizer is other
    assert len(os.listdir(cache)) == len(files) + 1
    # a changed validation sentence: same tokenizer (it is trained on train only), new ids
    with open(os.path.join(d, "val.de"), "r+", encoding="utf-8") as f:
        f.write("X")
    capsys.readouterr()
    load_data(cfg_for(d, cache))
    err = capsys.readouterr().err
    assert "tokenized the corpus" in err and "trained" not in err and len(os.listdir(cache)) == len(files) + 2
    # a changed training sentence: a new tokenizer and new ids
    with open(os.path.join(d, "train.en"), "r+", encoding="utf-8") as f:
        f.write("X")
    load_data(cfg_for(d, cache))
    err = capsys.readouterr().err
    assert "tokenized the corpus" in err and "trained" in err and len(os.listdir(cache)) == len(files) + 4


def break_truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def break_ids_out_of_range(path: str) -> None:
    """The header and sizes intact, the ids garbage: caught before an embedding lookup would fail."""
    data = np.memmap(path, dtype=np.uint8, mode="r+")
    data[dataset.HEADER_BYTES:dataset.HEADER_BYTES + 64] = 255
    data.flush()


def break_starts(path: str) -> None:
    """A sentence said to start past the ids."""
    meta = json.loads(open(path, "rb").read(dataset.HEADER_BYTES)[len(dataset.CACHE_MAGIC):])
    data = np.memmap(path, dtype=np.uint8, mode="r+")
    at = meta["index"]["val.tgt"][0]
    data[at:at + 8] = np.array([10**9], dtype=np.int64).view(np.uint8)
    data.flush()


@pytest.mark.parametrize("damage", [
    pytest.param(break_truncate, id="truncated"),
    pytest.param(lambda p: open(p, "wb").close(), id="empty"),
    pytest.param(lambda p: open(p, "wb").write(os.urandom(8192)), id="random-bytes"),
    pytest.param(lambda p: torch.save({"foo": [[1, 2, 3]]}, p), id="torch-file"),
    pytest.param(lambda p: open(p, "r+b").write(dataset.CACHE_MAGIC + b"{not json"), id="bad-header"),
    pytest.param(break_ids_out_of_range, id="ids-out-of-range"),
    pytest.param(break_starts, id="starts-out-of-range"),
])
def test_corrupt_cache_is_rebuilt_with_one_line(tmp_path, capsys, damage):
    d, cache = write_corpus(str(tmp_path / "c"), n_train=100), str(tmp_path / "cache")
    cfg = cfg_for(d, cache)
    data = load_data(cfg)
    expected = {name: getattr(data, name).batch(torch.arange(len(getattr(data, name)))) for name in dataset.SPLITS}
    del data  # nothing maps the file now: shrinking a mapped file under a process is a SIGBUS (ours replace files)
    path = next(os.path.join(cache, f) for f in os.listdir(cache) if f.startswith("ids-"))
    damage(path)
    capsys.readouterr()
    data = load_data(cfg)
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "unreadable" in line] == [f"data: ignoring unreadable cache {path}"]
    assert "tokenized the corpus" in err
    for name, batch in expected.items():
        split = getattr(data, name)
        assert all(torch.equal(x, y) for x, y in zip(batch, split.batch(torch.arange(len(split)))))
    load_data(cfg)
    assert "unreadable" not in capsys.readouterr().err  # rebuilt for good


def test_unwritable_cache_dir_still_loads(tmp_path, capsys):
    """A cache is an optimization: a cache_dir that cannot be made (here, under a file: refused even to root)."""
    d = write_corpus(str(tmp_path / "c"), n_train=100)
    (tmp_path / "afile").write_text("")
    data = load_data(cfg_for(d, str(tmp_path / "afile" / "cache")))
    assert "could not write cache" in capsys.readouterr().err
    assert len(data.train) == 100 and len(data.train.batch(torch.arange(10))[0]) == 10


def test_tokenizer_trains_on_a_seeded_sample_of_a_large_corpus(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dataset, "TOKENIZER_SAMPLE", 50)
    d = write_corpus(str(tmp_path / "c"), n_train=400)
    a = load_data(cfg_for(d, str(tmp_path / "a")))
    assert "on 50 pairs drawn from 400" in capsys.readouterr().err
    b = load_data(cfg_for(d, str(tmp_path / "b")))
    assert a.tokenizer.to_str() == b.tokenizer.to_str() and len(a.train) == 400  # the same sample every time


# ---------------------------------------------------------------- Hub datasets

def hub_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [make_pair(rng) for _ in range(n)]


def test_hub_schema_translation_column_with_only_train(tmp_path, monkeypatch):
    """Shaped like Helsinki-NLP/opus_books: a `translation` dict column and a train split only."""
    path = tmp_path / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, (en, de) in enumerate(hub_rows(300)):
            f.write(json.dumps({"id": str(i), "translation": {"en": en, "de": de}}) + "\n")
    load = lambda: read_hub("json", "", "en", "de", ["train", "validation", "test"], 50, 1234,  # noqa: E731
                            data_files={"train": str(path)})
    monkeypatch.setattr(dataset, "CHUNK_PAIRS", 64)  # Arrow batches of 64 rows
    corpus = load()
    assert [corpus.rows(k) for k in ("train", "val", "test")] == [200, 50, 50]
    texts = {k: read_texts(corpus, k) for k in ("train", "val", "test")}
    assert sorted(p for t in texts.values() for p in zip(*t)) == sorted(hub_rows(300))
    again = load()  # the carved split is seeded: identical on every run and resume
    assert texts == {k: read_texts(again, k) for k in texts}
    assert [corpus.digest(k) for k in texts] == [again.digest(k) for k in texts]
    with pytest.raises(UserError, match="no language 'fr'"):
        read_hub("json", "", "en", "fr", ["train", "validation", "test"], 50, 1, data_files={"train": str(path)})


def test_hub_schema_one_column_per_language(tmp_path):
    """Shaped like bentrevett/multi30k: columns `en` and `de`, splits train/validation/test (parquet here)."""
    import datasets
    files = {}
    for split, n in (("train", 60), ("validation", 10), ("test", 10)):
        rows = hub_rows(n, seed=len(files))
        files[split] = str(tmp_path / f"{split}.parquet")
        datasets.Dataset.from_dict({"en": [r[0] for r in rows], "de": [r[1] for r in rows]}).to_parquet(files[split])
    corpus = read_hub("parquet", "", "en", "de", ["train", "validation", "test"], 1000, 1, data_files=files)
    assert [len(read_texts(corpus, k)[1]) for k in ("train", "val", "test")] == [60, 10, 10]
    with pytest.raises(UserError, match="no language column 'fr'"):
        read_hub("parquet", "", "fr", "de", ["train", "validation", "test"], 1000, 1, data_files=files)


def test_hub_dataset_loads_end_to_end_and_from_the_cache(tmp_path, monkeypatch, capsys):
    import datasets
    rows = hub_rows(200) + [("", "Leer."), ("Empty.", "  ")]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"translation": {"en": en, "de": de}}) + "\n" for en, de in rows))
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: real("json", data_files={"train": str(path)}))
    cfg = replace(Config(), data_dir=str(tmp_path / "none"), cache_dir=str(tmp_path / "cache"), hf_dataset="fake",
                  holdout=20, **SMALL)
    data = load_data(cfg)
    err = capsys.readouterr().err
    assert "tokenized the corpus" in err and "dropped" in err
    assert len(data.train) + len(data.val) + len(data.test) == 200 and len(data.val) + len(data.test) <= 40
    cached = load_data(cfg)
    assert "tokenized the corpus" not in capsys.readouterr().err
    assert data.val.src_text == cached.val.src_text
    assert all(torch.equal(x, y) for x, y in zip(data.train.batches(200), cached.train.batches(200)))


def test_wmt14_preset_reads_the_hub_layout(tmp_path, monkeypatch):
    """--preset=wmt14_en_de asks the Hub for wmt/wmt14, config de-en: splits train/validation/test, one
    `translation` dict column {de, en}. The same layout from local files stands in for it (the Hub is not reachable
    here); the preset's own data settings are kept, only the sizes are made small."""
    import datasets
    files = {}
    for split, n in (("train", 300), ("validation", 30), ("test", 20)):
        files[split] = str(tmp_path / f"{split}.jsonl")
        with open(files[split], "w", encoding="utf-8") as f:
            for en, de in hub_rows(n, seed=n):
                f.write(json.dumps({"translation": {"de": de, "en": en}}) + "\n")
    asked = []
    real = datasets.load_dataset

    def hub(name, config=None, **kw):
        asked.append((name, config))
        return real("json", data_files=files)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    monkeypatch.chdir(tmp_path)  # the preset's data_dir, data/wmt14, is relative: it must not exist here
    cfg = get_config(["--preset=wmt14_en_de", "--vocab_size=200", f"--cache_dir={tmp_path / 'cache'}"])
    data = load_data(cfg)
    assert asked == [("wmt/wmt14", "de-en")]
    assert (cfg.src_lang, cfg.tgt_lang, len(data.train), len(data.val), len(data.test)) == ("en", "de", 300, 30, 20)
    assert data.val.src_text == [en for en, _ in hub_rows(30, seed=30)]
    assert data.test.tgt_text == [de for _, de in hub_rows(20, seed=20)]


def test_unreachable_hub_is_one_clear_line(tmp_path, monkeypatch):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'bentrevett/multi30k' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = replace(Config(), data_dir=str(tmp_path / "none"), cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub.*put .*train.en"):
        open_corpus(cfg)


# ---------------------------------------------------------------- tokenizer and batches

def test_word_level_tokenizer_spaces_punctuation_back():
    tok = Tokenizer.train(["A man, riding a bike.", "Two dogs play!"], "word", 100, 1)
    ids = tok.encode(["A man, riding a bike."])
    assert tok.decode(ids) == ["A man, riding a bike."]


def test_min_frequency_applies_to_bpe_merges():
    """--min_frequency is the tokenizer's for both kinds: BPE learns no merge of a pair seen fewer times."""
    texts = ["the cat sat on the mat"] * 3 + ["a zebra"]
    sizes = {n: Tokenizer.train(texts, "bpe", 1000, n).vocab_size for n in (1, 3)}
    assert sizes[3] < sizes[1]
    assert Tokenizer.train(texts, "bpe", 1000, 3).tokens("a zebra") == ["▁", "a", "▁", "z", "e", "b", "r", "a"]


@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="Multi30k not available")
def test_multi30k_tokenizer_round_trip_padding_speed_and_dense_batches(tmp_path, capsys):
    cfg = replace(Config(), data_dir=MULTI30K, cache_dir=str(tmp_path), vocab_size=8000)
    t0 = time.perf_counter()
    data = load_data(cfg)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_data(cfg)
    warm = time.perf_counter() - t0
    tok = data.tokenizer
    texts = data.val.src_text + data.val.tgt_text
    normalize = tok.tok.normalizer.normalize_str
    same = sum(h == normalize(t) for h, t in zip(tok.decode(tok.encode(texts)), texts)) / len(texts)
    batches = data.train.batches(4096, seed=0, epoch=0)
    real = sum(int(data.train.src_len[b].sum() + data.train.tgt_len[b].sum()) for b in batches)
    padded = sum(len(b) * int(data.train.src_len[b].max() + data.train.tgt_len[b].max()) for b in batches)
    with capsys.disabled():
        print(f"\nmulti30k: load+tokenize {cold:.1f}s cold, {warm:.2f}s cached; round trip {same:.2%}; "
              f"padding {1 - real / padded:.1%} of batch tokens")
    assert same >= 0.99
    assert 1 - real / padded <= 0.10
    assert len(data.train) == 29000 and len(data.val) == 1014 and len(data.test) == 1000
    assert_batches_equal_dense(data, replace(cfg, max_tokens=4096))


def token_batches_loop(src_len, tgt_len, max_tokens, generator=None, pad_multiple=1) -> list[torch.Tensor]:
    """token_batches as it was, one sentence at a time in Python: the vectorized one must give exactly these."""
    n = len(src_len)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    key = torch.maximum(src_len, tgt_len)[order] * 1024 + torch.minimum(src_len, tgt_len)[order]
    order = order[torch.sort(key, stable=True).indices].tolist()
    lengths = torch.maximum(src_len, tgt_len).tolist()
    batches, start, longest = [], 0, 0
    for i, j in enumerate(order):
        longest_if_added = max(longest, dataset.round_up(lengths[j], pad_multiple))
        if i > start and longest_if_added * (i - start + 1) > max_tokens:
            batches.append(torch.tensor(order[start:i]))
            start, longest_if_added = i, dataset.round_up(lengths[j], pad_multiple)
        longest = longest_if_added
    if start < n:
        batches.append(torch.tensor(order[start:]))
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


@pytest.mark.parametrize("seed", range(6))
def test_token_batches_equal_the_sentence_by_sentence_loop(seed):
    rng = torch.Generator().manual_seed(seed)
    n = [0, 1, 7, 500, 3000, 3000][seed]
    high = [5, 5, 30, 130, 2000, 130][seed]  # 2000: longer than 1024, where the sort key mixes the two sides
    src, tgt = torch.randint(1, high, (n,), generator=rng), torch.randint(1, high, (n,), generator=rng)
    for max_tokens in (1, 64, 1000, 25_000):
        for pad_multiple in (1, 8):
            for gen_seed in (None, seed):
                gens = [torch.Generator().manual_seed(gen_seed) if gen_seed is not None else None for _ in range(2)]
                ours = token_batches(src, tgt, max_tokens, gens[0], pad_multiple)
                theirs = token_batches_loop(src, tgt, max_tokens, gens[1], pad_multiple)
                assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_token_batches_respect_budget_and_pad_multiple():
    lens = torch.tensor([3, 9, 17, 4, 30, 12, 8, 8, 1])
    batches = token_batches(lens, lens, max_tokens=32, pad_multiple=8)
    for b in batches:
        longest = (int(lens[b].max()) + 7) // 8 * 8
        assert longest * len(b) <= 32 or len(b) == 1
    assert sorted(torch.cat(batches).tolist()) == list(range(len(lens)))


def test_an_epoch_of_wmt14_size_is_batched_fast(capsys):
    """4.5M pairs (WMT14 en-de) of Multi30k-like lengths: one epoch's batch list in well under 10 s."""
    rng = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(5, 60, (4_500_000,), generator=rng), torch.randint(5, 60, (4_500_000,), generator=rng)
    t0 = time.perf_counter()
    batches = token_batches(src, tgt, 25_000, torch.Generator().manual_seed(1))
    seconds = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n4.5M pairs: one epoch's batch list ({len(batches)} batches of 25k tokens) in {seconds:.2f} s")
    assert sum(map(len, batches)) == 4_500_000 and seconds < 10
