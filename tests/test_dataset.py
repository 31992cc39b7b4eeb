"""dataset.py: corpora from files and from the Hub code path, the tokenizer, and token-budget batches."""
import gzip
import os
import time
from dataclasses import replace

import pytest
import torch

from config import Config, UserError
from conftest import MULTI30K, write_corpus
from dataset import Tokenizer, load_data, load_texts, read_hub, token_batches

SMALL = dict(vocab_size=120, max_len=32)


def cfg_for(corpus: str, cache: str, **kw) -> Config:
    return replace(Config(), data_dir=corpus, cache_dir=cache, hf_dataset="", **{**SMALL, **kw})


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
    data = load_data(cfg_for(d, str(tmp_path / "cache")))
    err = capsys.readouterr().err
    assert "dropped 1 pairs with an empty side" in err and "1 pairs longer than max_len=32 dropped" in err
    assert len(data.train) == 100


def test_bad_data_gives_clear_errors(tmp_path):
    d = write_corpus(str(tmp_path / "c"), n_train=20)
    with open(os.path.join(d, "train.de"), "a", encoding="utf-8") as f:
        f.write("extra\n")
    with pytest.raises(UserError, match=r"train\.en has 20 lines but .*train\.de has 21"):
        load_texts(cfg_for(d, ""))
    d = write_corpus(str(tmp_path / "d"), n_train=20)
    with open(os.path.join(d, "val.en"), "ab") as f:
        f.write(b"caf\xe9\n")
    with pytest.raises(UserError, match=r"val\.en: invalid UTF-8 on line 41"):
        load_texts(cfg_for(d, ""))
    with pytest.raises(UserError, match="missing .*nosuch.en"):
        load_texts(cfg_for(write_corpus(str(tmp_path / "e"), n_train=5), "", splits="train,val,nosuch"))
    with pytest.raises(UserError, match="not found"):
        load_texts(cfg_for(str(tmp_path / "nothing"), ""))


def test_gzipped_files_read_like_plain_ones(tmp_path):
    d = write_corpus(str(tmp_path / "c"), n_train=30)
    for name in os.listdir(d):
        with open(os.path.join(d, name), "rb") as f, gzip.open(os.path.join(d, name + ".gz"), "wb") as g:
            g.write(f.read())
        os.remove(os.path.join(d, name))
    assert load_texts(cfg_for(d, ""))["train"] == load_texts(cfg_for(write_corpus(str(tmp_path / "p"), n_train=30), ""))["train"]


def hub_rows(n: int, seed: int = 0):
    from conftest import make_pair
    import random
    rng = random.Random(seed)
    return [make_pair(rng) for _ in range(n)]


def test_hub_schema_translation_column_with_only_train(tmp_path):
    """Shaped like Helsinki-NLP/opus_books: a `translation` dict column and a train split only."""
    import json
    path = tmp_path / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, (en, de) in enumerate(hub_rows(300)):
            f.write(json.dumps({"id": str(i), "translation": {"en": en, "de": de}}) + "\n")
    load = lambda: read_hub("json", "", "en", "de", ["train", "validation", "test"], 50, 1234,  # noqa: E731
                            data_files={"train": str(path)})
    splits = load()
    assert [len(splits[k][0]) for k in ("train", "val", "test")] == [200, 50, 50]
    assert splits == load()  # the carved split is seeded: identical on every run and resume
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
    splits = read_hub("parquet", "", "en", "de", ["train", "validation", "test"], 1000, 1, data_files=files)
    assert [len(splits[k][1]) for k in ("train", "val", "test")] == [60, 10, 10]
    with pytest.raises(UserError, match="no language column 'fr'"):
        read_hub("parquet", "", "fr", "de", ["train", "validation", "test"], 1000, 1, data_files=files)


def test_unreachable_hub_is_one_clear_line(tmp_path, monkeypatch):
    import datasets

    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach 'bentrevett/multi30k' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = replace(Config(), data_dir=str(tmp_path / "none"), cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub.*put .*train.en"):
        load_texts(cfg)


def test_word_level_tokenizer_spaces_punctuation_back():
    tok = Tokenizer.train(["A man, riding a bike.", "Two dogs play!"], "word", 100, 1)
    ids = tok.encode(["A man, riding a bike."])
    assert tok.decode(ids) == ["A man, riding a bike."]


@pytest.mark.skipif(not os.path.isdir(MULTI30K), reason="Multi30k not available")
def test_multi30k_tokenizer_round_trip_padding_and_speed(tmp_path, capsys):
    cfg = replace(Config(), data_dir=MULTI30K, cache_dir=str(tmp_path), vocab_size=8000)
    t0 = time.perf_counter()
    data = load_data(cfg)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_data(cfg)
    warm = time.perf_counter() - t0
    tok = data.tokenizer
    texts = data.val.src_text + data.val.tgt_text
    same = sum(h == tok.normalize(t) for h, t in zip(tok.decode(tok.encode(texts)), texts)) / len(texts)
    batches = data.train.batches(4096, seed=0, epoch=0)
    real = sum(int(data.train.src_len[b].sum() + data.train.tgt_len[b].sum()) for b in batches)
    padded = sum(len(b) * int(data.train.src_len[b].max() + data.train.tgt_len[b].max()) for b in batches)
    with capsys.disabled():
        print(f"\nmulti30k: load+tokenize {cold:.1f}s cold, {warm:.2f}s cached; round trip {same:.2%}; "
              f"padding {1 - real / padded:.1%} of batch tokens")
    assert same >= 0.99
    assert 1 - real / padded <= 0.10
    assert len(data.train) == 29000 and len(data.val) == 1014 and len(data.test) == 1000


def test_token_batches_respect_budget_and_pad_multiple():
    lens = torch.tensor([3, 9, 17, 4, 30, 12, 8, 8, 1])
    batches = token_batches(lens, lens, max_tokens=32, pad_multiple=8)
    for b in batches:
        longest = (int(lens[b].max()) + 7) // 8 * 8
        assert longest * len(b) <= 32 or len(b) == 1
    assert sorted(torch.cat(batches).tolist()) == list(range(len(lens)))
