"""
Parallel corpora in, a trained tokenizer and token-budget batches out.

    from config import Config
    from dataset import load_data
    data = load_data(Config(data_dir="../shared/data/multi30k"))
    for idx in data.train.batches(max_tokens=4096, seed=0, epoch=0):
        src, tgt_in, labels = data.train.batch(idx)

Sources: local Moses-style files `{data_dir}/{split}.{lang}[.gz]`, or a Hugging Face Hub dataset (either a
`translation` dict column or one column per language), both read in chunks, so memory does not grow with the corpus.
The tokenizer and the token ids are cached, keyed by the text and the tokenizer settings. The ids of all splits lie
flat in one binary file (int16 when the vocabulary allows) that every later run and every DDP rank memory-maps, so
they share one copy through the page cache; each batch is padded when it is asked for. Sentence text is kept only
for the splits that are decoded (val, test). WMT14's 4.5M pairs take about 0.6 GB of ids this way.
"""
import contextlib
import gzip
import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import IO, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from torch import Tensor

from checkpoint import atomic_save
from config import Config, UserError

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids are read back from the tokenizer, never assumed
SPLITS = ("train", "val", "test")
CHUNK_BYTES = 1 << 20  # text is read this much at a time
CHUNK_PAIRS = 20_000  # sentence pairs handed to the tokenizer at once: enough to keep its threads busy
TOKENIZER_SAMPLE = 1_000_000  # a larger training split trains the tokenizer on this many pairs, drawn with a seed
SAMPLE_SEED = 0
CACHE_MAGIC = b"transformer-mt token ids v1\n"  # the ids cache file starts with this, then its JSON header
HEADER_BYTES = 4096  # magic + JSON, padded with spaces; the flat ids follow
Pairs = tuple[list[str], list[str]]  # (sources, targets)


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---------------------------------------------------------------- reading corpora

def line_chunks(path: str) -> Iterator[list[str]]:
    """The lines of a file, stripped, in chunks of about CHUNK_BYTES. Lines end at "\n" only; strict UTF-8 (a bad
    byte is reported with its line number); .gz read transparently; "-" for standard input."""
    name, f = ("stdin" if path == "-" else path), None
    try:
        f = sys.stdin.buffer if path == "-" else gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
        rest, lines_before = b"", 0  # the bytes after the last newline so far; lines already yielded
        while block := f.read(CHUNK_BYTES):
            cut = block.rfind(b"\n") + 1
            rest, raw = (rest + block, b"") if not cut else (block[cut:], rest + block[:cut])
            if raw:
                lines = decode_utf8(raw, name, lines_before).split("\n")[:-1]  # the final newline ends a line
                lines_before += len(lines)
                yield [line.strip() for line in lines]
        if rest:
            yield [decode_utf8(rest, name, lines_before).strip()]
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {name}: {e}") from None
    finally:
        if f is not None and path != "-":
            f.close()


def read_lines(path: str) -> list[str]:
    """All lines of a file (see line_chunks): for the sentences translate.py is given."""
    return [line for chunk in line_chunks(path) for line in chunk]


def decode_utf8(raw: bytes, name: str, lines_before: int = 0) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = lines_before + raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{name}: invalid UTF-8 on line {line}") from None


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes as stored (gzipped or not): a read at disk speed, no decoding."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(CHUNK_BYTES * 16):
                h.update(block)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return h.hexdigest()


def find_file(data_dir: str, split: str, lang: str) -> str:
    for name in (f"{split}.{lang}", f"{split}.{lang}.gz"):
        if os.path.isfile(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    raise UserError(f"missing {data_dir}/{split}.{lang} (or .gz) for split {split!r}")


class LocalCorpus:
    """The three splits as aligned files {data_dir}/{name}.{lang}[.gz], read in chunks of sentence pairs, any
    number of times."""

    def __init__(self, data_dir: str, names: list[str], src_lang: str, tgt_lang: str):
        self.paths = {split: (find_file(data_dir, name, src_lang), find_file(data_dir, name, tgt_lang))
                      for split, name in zip(SPLITS, names)}

    def digest(self, split: str) -> str:
        """Changes whenever the split's text does (and when a file is merely recompressed)."""
        return _digest(*map(file_digest, self.paths[split]))

    def chunks(self, split: str) -> Iterator[Pairs]:
        """(sources, targets), at least CHUNK_PAIRS pairs at a time until the end."""
        src_path, tgt_path = self.paths[split]
        src_chunks, tgt_chunks = line_chunks(src_path), line_chunks(tgt_path)
        src, tgt, done = [], [], 0
        while True:
            while len(src) < CHUNK_PAIRS and (more := next(src_chunks, None)) is not None:
                src += more
            while len(tgt) < CHUNK_PAIRS and (more := next(tgt_chunks, None)) is not None:
                tgt += more
            n = min(len(src), len(tgt))
            if n == 0:
                break
            yield src[:n], tgt[:n]
            src, tgt, done = src[n:], tgt[n:], done + n
        if src or tgt:  # one file ended first: count both to say so
            n_src, n_tgt = (done + len(rest) + sum(map(len, it)) for rest, it in ((src, src_chunks), (tgt, tgt_chunks)))
            raise UserError(f"{src_path} has {n_src} lines but {tgt_path} has {n_tgt}: they must be aligned")

    def rows(self, split: str) -> int:
        return sum(len(src) for src, _ in self.chunks(split))


class HubCorpus:
    """The three splits of a Hugging Face dataset, read as Arrow record batches: no list of all rows is made."""

    def __init__(self, parts: dict, columns: tuple[str, str]):
        self.parts, self.columns = parts, columns

    def digest(self, split: str) -> str:
        # datasets' own fingerprint of the split: it names datasets' cache, which is rebuilt when the source changes
        return self.parts[split]._fingerprint

    def chunks(self, split: str) -> Iterator[Pairs]:
        for table in self.parts[split].with_format("arrow").iter(batch_size=CHUNK_PAIRS):
            yield tuple([s or "" for s in table.column(c).to_pylist()] for c in self.columns)

    def rows(self, split: str) -> int:
        return len(self.parts[split])


Corpus = LocalCorpus | HubCorpus


def read_hub(name: str, config: str, src_lang: str, tgt_lang: str, splits: list[str], holdout: int, seed: int,
             data_files: dict | None = None) -> HubCorpus:
    """A Hub dataset (or, with data_files, local json/csv/parquet files through the same code) -> the three
    splits. When validation or test is missing, both are carved from train by a seeded, never-changing split."""
    try:
        import datasets
        ds = datasets.load_dataset(name, config or None, data_files=data_files)
    except ConnectionError:
        raise UserError(f"cannot reach the Hugging Face Hub for {name!r} and it is not cached") from None
    except FileNotFoundError:
        raise UserError(f"no dataset {name!r}{f' config {config!r}' if config else ''} on the Hub") from None
    except Exception as e:  # offline mode, a missing config, a loading-script repo: all one line
        raise UserError(f"cannot load {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    train, val, test = splits
    if train not in ds:
        raise UserError(f"{name!r} has no split {train!r} (it has: {', '.join(ds)})")
    if val in ds and test in ds:
        parts = {"train": ds[train], "val": ds[val], "test": ds[test]}
    elif len(ds[train]) <= 3 * holdout:
        raise UserError(f"{name!r} has no {val!r}/{test!r} splits and too few rows to carve {holdout} each")
    else:
        rest = ds[train].train_test_split(test_size=2 * holdout, seed=seed)
        held = rest["test"].train_test_split(test_size=holdout, seed=seed)
        parts = {"train": rest["train"], "val": held["train"], "test": held["test"]}
    nested = "translation" in parts["train"].column_names  # a struct column: flattened, its fields are columns too
    if nested:
        parts = {key: part.flatten() for key, part in parts.items()}
    prefix, what = ("translation.", "language") if nested else ("", "language column")
    have = [c[len(prefix):] for c in parts["train"].column_names if c.startswith(prefix)]
    for lang in (src_lang, tgt_lang):
        if lang not in have:
            raise UserError(f"{name!r} has no {what} {lang!r} (it has: {', '.join(have)})")
    return HubCorpus(parts, (prefix + src_lang, prefix + tgt_lang))


def open_corpus(cfg: Config) -> Corpus:
    """The train/val/test sentence pairs: local files if cfg.data_dir exists, else the Hub dataset."""
    if os.path.isdir(cfg.data_dir):
        names = cfg.splits.split(",")
        if len(names) != 3:
            raise UserError(f"--splits needs three names (train,val,test), got {cfg.splits!r}")
        return LocalCorpus(cfg.data_dir, names, cfg.src_lang, cfg.tgt_lang)
    if not cfg.hf_dataset:
        raise UserError(f"data directory {cfg.data_dir} not found (and --hf_dataset is empty)")
    log(f"data: {cfg.data_dir} not found, loading {cfg.hf_dataset} from the Hugging Face Hub")
    try:
        return read_hub(cfg.hf_dataset, cfg.hf_config, cfg.src_lang, cfg.tgt_lang, cfg.hf_splits.split(","),
                        cfg.holdout, cfg.split_seed)
    except UserError as e:
        raise UserError(f"{e}; for local files put {cfg.data_dir}/train.{cfg.src_lang} (and .{cfg.tgt_lang}, "
                        f"val.*, test_2016_flickr.*) there or pass --data_dir=DIR") from None


def non_empty(src: list[str], tgt: list[str]) -> tuple[list[str], list[str], int]:
    """The pairs with text on both sides, and how many were dropped."""
    keep = [i for i, (s, t) in enumerate(zip(src, tgt)) if s.strip() and t.strip()]
    if len(keep) == len(src):
        return src, tgt, 0
    return [src[i] for i in keep], [tgt[i] for i in keep], len(src) - len(keep)


def read_texts(corpus: Corpus, split: str) -> Pairs:
    """A small split's pairs with text on both sides, as lists: the splits that are decoded (val, test)."""
    src, tgt = [], []
    for s, t in corpus.chunks(split):
        src += s
        tgt += t
    src, tgt, dropped = non_empty(src, tgt)
    report_pairs(split, len(src), dropped)
    return src, tgt


def report_pairs(split: str, kept: int, dropped: int) -> None:
    if dropped:
        log(f"data: {split}: dropped {dropped} pairs with an empty side")
    if not kept:
        raise UserError(f"the {split} split has no sentence pairs")


# ---------------------------------------------------------------- tokenizer

class Tokenizer:
    """A Hugging Face `tokenizers` tokenizer shared by both languages, with the special ids we need.

    Metaspace pre-tokenization marks each word start with "▁", so decoding restores the original spacing
    ("Hello, world." rather than the "Hello , world ." that whitespace splitting gives, which ruins BLEU)."""

    def __init__(self, tok: HFTokenizer):
        self.tok = tok
        ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids:
            raise UserError(f"tokenizer lacks the special tokens {SPECIAL_TOKENS}")
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = ids
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def train(cls, texts, kind: str, vocab_size: int, min_frequency: int) -> "Tokenizer":
        if kind == "bpe":
            tok = HFTokenizer(models.BPE(unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.Metaspace()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                           min_frequency=min_frequency, show_progress=False)
        else:  # classic words, punctuation split off
            tok = HFTokenizer(models.WordLevel(unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
            trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                                min_frequency=min_frequency, show_progress=False)
        tok.normalizer = normalizers.NFKC()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_str(cls, s: str) -> "Tokenizer":
        return cls(HFTokenizer.from_str(s))

    def to_str(self) -> str:
        return self.tok.to_str()

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_flat(self, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """The ids of all texts end to end, and each text's length: no list per sentence outlives the call."""
        encodings = self.tok.encode_batch(texts, add_special_tokens=False)  # multithreaded
        lengths = np.fromiter(map(len, encodings), np.int64, len(encodings))
        return np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), dtype, int(lengths.sum())), lengths

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [s.strip() for s in self.tok.decode_batch(ids, skip_special_tokens=True)]

    def tokens(self, text: str) -> list[str]:
        return self.tok.encode(text, add_special_tokens=False).tokens


# ---------------------------------------------------------------- batches

def round_up(n: int | Tensor, multiple: int) -> int | Tensor:
    return (n + multiple - 1) // multiple * multiple


def pad_rows(rows: list[list[int]], pad_id: int) -> Tensor:
    out = torch.full((len(rows), max(map(len, rows), default=1)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def token_batches(src_len: Tensor, tgt_len: Tensor, max_tokens: int, generator: torch.Generator | None = None,
                  pad_multiple: int = 1) -> list[Tensor]:
    """Group sentences of similar length (each at least 1) into batches of at most max_tokens per side, padding
    included. Sentences are sorted by length (ties in random order when a generator is given), cut into batches, and
    the batch order is shuffled: every batch pads only to its own longest sentence."""
    n = len(src_len)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    key = torch.maximum(src_len, tgt_len)[order] * 1024 + torch.minimum(src_len, tgt_len)[order]
    order = order[torch.sort(key, stable=True).indices]
    width = round_up(torch.maximum(src_len, tgt_len)[order], pad_multiple).numpy()
    sizes, start = [], 0
    while start < n:
        # A batch costs its longest sentence times its size, which only grows as sentences join: it takes the next
        # sentences while that stays within max_tokens (at least one), so at most max_tokens // width[start].
        longest = np.maximum.accumulate(width[start:start + max(1, max_tokens // int(width[start]))])
        over = longest[1:] * np.arange(2, len(longest) + 1) > max_tokens
        sizes.append(1 + int(over.argmax()) if over.any() else len(longest))
        start += sizes[-1]
    batches = list(torch.split(order, sizes))
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


@dataclass
class Ids:
    """One side of a split: sentence i is flat[start[i]:start[i] + length[i]] (arrays of a memory-mapped file)."""
    flat: np.ndarray
    start: np.ndarray
    length: np.ndarray


def gather_rows(flat: np.ndarray, start: np.ndarray, length: np.ndarray, width: int, pad_id: int) -> np.ndarray:
    """flat[start[i]:start[i] + length[i]] as the rows of an int64 matrix, right-padded to `width` columns."""
    columns = np.arange(width)
    real = columns < length[:, None]
    out = np.full((len(start), width), pad_id, dtype=np.int64)
    out[real] = flat[(start[:, None] + columns)[real]]
    return out


class Split:
    """One split. Source = x + [EOS]; decoder input = [BOS] + y, labels = y + [EOS] (the decoder predicts each
    next token, and EOS last); padding ids in labels are ignored by the loss. The ids stay in the cache file; a
    batch's padded matrices are built when it is asked for."""

    def __init__(self, src: Ids, tgt: Ids, texts: Pairs | None, tok: Tokenizer, max_len: int,
                 name: str, drop_long: bool):
        too_long = (src.length + 1 > max_len) | (tgt.length + 1 > max_len)
        if too_long.any():
            log(f"data: {name}: {int(too_long.sum())} pairs longer than max_len={max_len} "
                f"{'dropped' if drop_long else 'kept for BLEU only'}")
        keep = slice(None)  # every pair: the mapped arrays are not copied
        if drop_long and too_long.any():
            keep = np.flatnonzero(~too_long)
            texts = texts and tuple([side[i] for i in keep] for side in texts)
        self.src_text, self.tgt_text = texts or (None, None)
        self.src_ids, self.src_start = src.flat, src.start[keep]
        self.tgt_ids, self.tgt_start = tgt.flat, tgt.start[keep]
        self.src_len = torch.from_numpy(np.minimum(src.length[keep], max_len - 1) + 1)  # + EOS
        self.tgt_len = torch.from_numpy(np.minimum(tgt.length[keep], max_len - 1) + 1)  # + BOS (input) or EOS (labels)
        self.fits = torch.from_numpy(~too_long[keep])  # usable for the loss
        self.pad_id, self.bos_id, self.eos_id = tok.pad_id, tok.bos_id, tok.eos_id

    def __len__(self) -> int:
        return len(self.src_len)

    def batches(self, max_tokens: int, seed: int = 0, epoch: int = 0, shuffle: bool = True, rank: int = 0,
                world_size: int = 1, pad_multiple: int = 1) -> list[Tensor]:
        """The batches (index tensors) of one epoch: the same seed and epoch always give the same list, so a
        run resumes by skipping the batches it already did. With several ranks, each takes every world_size-th
        batch, cut to the same count so that no rank waits for another."""
        ids = torch.nonzero(self.fits).squeeze(1)
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch) if shuffle else None
        batches = [ids[b] for b in token_batches(self.src_len[ids], self.tgt_len[ids], max_tokens, gen, pad_multiple)]
        per_rank = len(batches) // world_size if world_size > 1 else len(batches)
        return batches[rank::world_size][:per_rank]

    def batch(self, idx: Tensor, device: str | torch.device = "cpu",
              pad_multiple: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """(src, tgt_in, labels) of these sentences, each padded only to the longest in the batch."""
        i, rows = idx.numpy(), np.arange(len(idx))
        n_src, n_tgt = self.src_len[idx].numpy() - 1, self.tgt_len[idx].numpy() - 1  # ids before EOS / after BOS
        src = gather_rows(self.src_ids, self.src_start[i], n_src, round_up(int(n_src.max()) + 1, pad_multiple),
                          self.pad_id)
        src[rows, n_src] = self.eos_id
        labels = gather_rows(self.tgt_ids, self.tgt_start[i], n_tgt, round_up(int(n_tgt.max()) + 1, pad_multiple),
                             self.pad_id)
        tgt_in = np.concatenate([np.full((len(i), 1), self.bos_id), labels[:, :-1]], axis=1)
        labels[rows, n_tgt] = self.eos_id
        non_blocking = torch.device(device).type == "cuda"
        return tuple(torch.from_numpy(m).to(device, non_blocking=non_blocking) for m in (src, tgt_in, labels))


def encode_sources(tok: Tokenizer, texts: list[str], max_len: int) -> tuple[list[list[int]], int]:
    """Source sentences for translation: ids + [EOS], cut to max_len. Returns the ids and how many were cut."""
    ids = tok.encode(texts)
    cut = sum(len(s) + 1 > max_len for s in ids)
    return [s[:max_len - 1] + [tok.eos_id] for s in ids], cut


# ---------------------------------------------------------------- the cache

def _digest(*parts) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode("utf-8", "surrogatepass")).hexdigest()[:20]


def train_tokenizer(cfg: Config, corpus: Corpus) -> Tokenizer:
    """Trained on the training pairs with text on both sides, or on a seeded sample of TOKENIZER_SAMPLE of them
    when there are more: enough to learn the subwords, and a bounded time and memory."""
    n = corpus.rows("train")
    picked = None
    if n > TOKENIZER_SAMPLE:
        picked = np.zeros(n, dtype=bool)
        picked[np.random.default_rng(SAMPLE_SEED).choice(n, TOKENIZER_SAMPLE, replace=False)] = True
    used = 0

    def texts() -> Iterator[list[str]]:
        nonlocal used
        row = 0
        for src, tgt in corpus.chunks("train"):
            if picked is not None:
                rows = np.flatnonzero(picked[row:row + len(src)])
                row += len(src)
                src, tgt = [src[i] for i in rows], [tgt[i] for i in rows]
            src, tgt, _ = non_empty(src, tgt)
            used += len(src)
            yield src
            yield tgt

    t0 = time.perf_counter()
    tok = Tokenizer.train(texts(), cfg.tokenizer, cfg.vocab_size, cfg.min_frequency)
    log(f"data: trained a {cfg.tokenizer} tokenizer ({cfg.vocab_size} tokens) on {used} pairs"
        f"{f' drawn from {n}' if picked is not None else ''} in {time.perf_counter() - t0:.1f} s")
    return tok


def write_ids(f: IO[bytes], tok: Tokenizer, corpus: Corpus, texts: dict[str, Pairs]) -> None:
    """Tokenize every split into the open file f, streaming: [header][the ids of all sentences, end to end]
    [per split and side: the int64 start and length of each sentence]. Training pairs with an empty side are
    dropped here (val and test come in `texts`, already filtered)."""
    dtype = np.dtype(np.int16 if tok.vocab_size <= np.iinfo(np.int16).max + 1 else np.int32)
    f.seek(HEADER_BYTES)
    n_ids, dropped = 0, 0
    starts = {f"{split}.{side}": [] for split in SPLITS for side in ("src", "tgt")}
    lengths = {name: [] for name in starts}
    for split in SPLITS:
        for src, tgt in corpus.chunks(split) if split == "train" else [texts[split]]:
            src, tgt, n = non_empty(src, tgt)
            dropped += n
            for side, sentences in (("src", src), ("tgt", tgt)):
                ids, length = tok.encode_flat(sentences, dtype)
                f.write(ids.data)
                starts[f"{split}.{side}"].append(n_ids + np.cumsum(length) - length)
                lengths[f"{split}.{side}"].append(length)
                n_ids += len(ids)
    index = {}
    for name in starts:
        f.write(bytes(-f.tell() % np.dtype(np.int64).itemsize))  # aligned
        index[name] = [f.tell(), sum(map(len, lengths[name]))]
        for arrays in (starts[name], lengths[name]):
            f.write(np.concatenate(arrays, dtype=np.int64).data)
    header = json.dumps({"dtype": dtype.name, "ids": n_ids, "index": index, "dropped": dropped, "size": f.tell()})
    f.seek(0)
    f.write(CACHE_MAGIC + header.encode().ljust(HEADER_BYTES - len(CACHE_MAGIC)))
    f.flush()


def read_ids(file: str | IO[bytes], vocab_size: int) -> tuple[dict[str, Ids], int]:
    """Memory-map a file of write_ids: {"train.src": Ids, ...} and the count of training pairs dropped as empty.
    Anything inconsistent (another file, a truncated one, ids out of range) raises ValueError."""
    data = np.memmap(file, dtype=np.uint8, mode="r")
    if bytes(data[:len(CACHE_MAGIC)]) != CACHE_MAGIC:
        raise ValueError("not a token id cache")
    meta = json.loads(bytes(data[len(CACHE_MAGIC):HEADER_BYTES]))
    dtype = np.dtype(meta["dtype"])
    if meta["size"] != len(data) or dtype not in (np.int16, np.int32):
        raise ValueError(f"{len(data)} bytes where the header says {meta['size']}")
    flat = data[HEADER_BYTES:HEADER_BYTES + meta["ids"] * dtype.itemsize].view(dtype)
    if len(flat) != meta["ids"] or len(flat) and not 0 <= flat.min() <= flat.max() < vocab_size:
        raise ValueError("ids missing or out of the vocabulary's range")
    out = {}
    for name in (f"{split}.{side}" for split in SPLITS for side in ("src", "tgt")):
        at, rows = meta["index"][name]
        start, length = data[at:at + 16 * rows].view(np.int64).reshape(2, rows)
        if not ((start >= 0) & (length >= 0) & (start + length <= len(flat))).all():
            raise ValueError(f"{name}: sentences outside the ids")
        out[name] = Ids(flat, start, length)
    return out, meta["dropped"]


def build_ids(path: str, tok: Tokenizer, corpus: Corpus, texts: dict[str, Pairs]) -> str | IO[bytes]:
    """Write the ids cache at `path` (a temporary file per process, then renamed: runs sharing a cache never see a
    half-written one). A full or read-only disk must not stop training: then an unnamed temporary file instead."""
    t0 = time.perf_counter()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            write_ids(f, tok, corpus, texts)
            os.fsync(f.fileno())  # on disk before the rename, as checkpoint.atomic_save does
        os.replace(tmp, path)
        log(f"data: tokenized the corpus into {path} ({os.path.getsize(path) / 1e6:.1f} MB) "
            f"in {time.perf_counter() - t0:.1f} s")
        return path
    except OSError as e:
        log(f"data: could not write cache {path}: {e.strerror or e}; using a temporary file")
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    try:
        f = tempfile.TemporaryFile()
        write_ids(f, tok, corpus, texts)
        return f
    except OSError as e:
        raise UserError(f"cannot write the token ids, neither to {path} nor to a temporary file: "
                        f"{e.strerror or e}") from None


# ---------------------------------------------------------------- everything together

@dataclass
class Data:
    tokenizer: Tokenizer
    train: Split
    val: Split
    test: Split


def load_data(cfg: Config, tokenizer: Tokenizer | None = None) -> Data:
    """Open the corpus, train (or reuse) the tokenizer, tokenize once (or map the cache), build the splits.

    Cache keys are digests of the files as stored (Hub datasets: datasets' fingerprints) and of the tokenizer:
    a second start reads the corpus once at disk speed, decodes only val and test, and maps the ids."""
    corpus = open_corpus(cfg)
    if next(corpus.chunks("train"), None) is None:
        raise UserError("the train split has no sentence pairs")
    texts = {split: read_texts(corpus, split) for split in ("val", "test")}  # their errors before the long part
    digests = [corpus.digest(split) for split in SPLITS]
    if tokenizer is None:
        key = _digest(cfg.tokenizer, cfg.vocab_size, cfg.min_frequency, TOKENIZER_SAMPLE, SAMPLE_SEED, digests[0])
        path = os.path.join(cfg.cache_dir, f"tokenizer-{key}.json")
        try:
            with open(path, encoding="utf-8") as f:
                tokenizer = Tokenizer.from_str(f.read())
        except (FileNotFoundError, NotADirectoryError):
            pass
        except Exception:
            log(f"data: ignoring unreadable cache {path}")
        if tokenizer is None:
            tokenizer = train_tokenizer(cfg, corpus)
            atomic_save(tokenizer.to_str(), path, required=False)  # a cache: a failed write only warns
    path = os.path.join(cfg.cache_dir, f"ids-{_digest(CACHE_MAGIC, tokenizer.to_str(), *digests)}.bin")
    stored = None
    try:
        stored = read_ids(path, tokenizer.vocab_size)
        if any(len(stored[0][f"{split}.src"].length) != len(texts[split][0]) for split in texts):
            raise ValueError("another val or test split")
    except (FileNotFoundError, NotADirectoryError):
        pass
    except Exception:
        stored = None
        log(f"data: ignoring unreadable cache {path}")
    ids, dropped = stored or read_ids(build_ids(path, tokenizer, corpus, texts), tokenizer.vocab_size)
    report_pairs("train", len(ids["train.src"].length), dropped)
    splits = {split: Split(ids[f"{split}.src"], ids[f"{split}.tgt"], texts.get(split), tokenizer, cfg.max_len, split,
                           drop_long=(split == "train"))
              for split in SPLITS}
    if len(splits["train"]) == 0:
        raise UserError(f"no training pair fits max_len={cfg.max_len}")
    log(f"data: {cfg.src_lang}->{cfg.tgt_lang} train {len(splits['train'])} val {len(splits['val'])} "
        f"test {len(splits['test'])} pairs, vocabulary {tokenizer.vocab_size}")
    return Data(tokenizer, splits["train"], splits["val"], splits["test"])
