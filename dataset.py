"""
Parallel corpora in, a trained tokenizer and token-budget batches out.

    from config import Config
    from dataset import load_data
    data = load_data(Config(data_dir="../shared/data/multi30k"))
    for idx in data.train.batches(max_tokens=4096, seed=0, epoch=0):
        src, tgt_in, labels = data.train.batch(idx)

Sources: local Moses-style files `{data_dir}/{split}.{lang}[.gz]`, or a Hugging Face Hub dataset (either a
`translation` dict column or one column per language). The tokenizer and the token ids are cached, keyed by the
text and the tokenizer settings, so an epoch does no text work and a second run starts in about a second.
"""
import gzip
import hashlib
import os
import sys
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from config import Config, UserError

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids are read back from the tokenizer, never assumed


def log(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---------------------------------------------------------------- reading corpora

def read_lines(path: str) -> list[str]:
    """One sentence per line, strict UTF-8 (a bad byte is reported with its line number), .gz read transparently,
    "-" for standard input."""
    try:
        if path == "-":
            raw, path = sys.stdin.buffer.read(), "stdin"
        else:
            with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
                raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    lines = decode_utf8(raw, path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    return [line.strip() for line in lines]


def decode_utf8(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(f"{name}: invalid UTF-8 on line {line}") from None


def find_file(data_dir: str, split: str, lang: str) -> str:
    for name in (f"{split}.{lang}", f"{split}.{lang}.gz"):
        if os.path.isfile(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    raise UserError(f"missing {data_dir}/{split}.{lang} (or .gz) for split {split!r}")


def read_local(data_dir: str, split: str, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str]]:
    src_path, tgt_path = find_file(data_dir, split, src_lang), find_file(data_dir, split, tgt_lang)
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise UserError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: they must be aligned")
    return src, tgt


def read_hub(name: str, config: str, src_lang: str, tgt_lang: str, splits: list[str], holdout: int, seed: int,
             data_files: dict | None = None) -> dict[str, tuple[list[str], list[str]]]:
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
    parts = {"train": ds[train]}
    if val in ds and test in ds:
        parts.update(val=ds[val], test=ds[test])
    else:
        if len(ds[train]) <= 3 * holdout:
            raise UserError(f"{name!r} has no {val!r}/{test!r} splits and too few rows to carve {holdout} each")
        rest = ds[train].train_test_split(test_size=2 * holdout, seed=seed)
        held = rest["test"].train_test_split(test_size=holdout, seed=seed)
        parts = {"train": rest["train"], "val": held["train"], "test": held["test"]}
    out = {}
    for key, part in parts.items():
        if "translation" in part.column_names:
            rows = part["translation"]
            for lang in (src_lang, tgt_lang):
                if rows and lang not in rows[0]:
                    raise UserError(f"{name!r} has no language {lang!r} (it has: {', '.join(rows[0])})")
            out[key] = ([r[src_lang] or "" for r in rows], [r[tgt_lang] or "" for r in rows])
        else:
            for lang in (src_lang, tgt_lang):
                if lang not in part.column_names:
                    raise UserError(f"{name!r} has no language column {lang!r} (it has: {', '.join(part.column_names)})")
            out[key] = ([s or "" for s in part[src_lang]], [s or "" for s in part[tgt_lang]])
    return out


def load_texts(cfg: Config) -> dict[str, tuple[list[str], list[str]]]:
    """train/val/test sentence pairs: local files if cfg.data_dir exists, else the Hub dataset."""
    if os.path.isdir(cfg.data_dir):
        names = cfg.splits.split(",")
        if len(names) != 3:
            raise UserError(f"--splits needs three names (train,val,test), got {cfg.splits!r}")
        texts = {key: read_local(cfg.data_dir, n, cfg.src_lang, cfg.tgt_lang) for key, n in zip(("train", "val", "test"), names)}
    elif cfg.hf_dataset:
        log(f"data: {cfg.data_dir} not found, loading {cfg.hf_dataset} from the Hugging Face Hub")
        try:
            texts = read_hub(cfg.hf_dataset, cfg.hf_config, cfg.src_lang, cfg.tgt_lang, cfg.hf_splits.split(","),
                             cfg.holdout, cfg.split_seed)
        except UserError as e:
            raise UserError(f"{e}; for local files put {cfg.data_dir}/train.{cfg.src_lang} (and .{cfg.tgt_lang}, "
                            f"val.*, test_2016_flickr.*) there or pass --data_dir=DIR") from None
    else:
        raise UserError(f"data directory {cfg.data_dir} not found (and --hf_dataset is empty)")
    for key, (src, tgt) in texts.items():
        keep = [i for i in range(len(src)) if src[i].strip() and tgt[i].strip()]
        if len(keep) < len(src):
            log(f"data: {key}: dropped {len(src) - len(keep)} pairs with an empty side")
            texts[key] = ([src[i] for i in keep], [tgt[i] for i in keep])
        if not keep:
            raise UserError(f"the {key} split has no sentence pairs")
    return texts


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
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                           show_progress=False)
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

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [s.strip() for s in self.tok.decode_batch(ids, skip_special_tokens=True)]

    def tokens(self, text: str) -> list[str]:
        return self.tok.encode(text, add_special_tokens=False).tokens

    def normalize(self, text: str) -> str:
        return self.tok.normalizer.normalize_str(text)


# ---------------------------------------------------------------- batches

def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def pad_rows(rows: list[list[int]], pad_id: int) -> Tensor:
    out = torch.full((len(rows), max(map(len, rows), default=1)), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def token_batches(src_len: Tensor, tgt_len: Tensor, max_tokens: int, generator: torch.Generator | None = None,
                  pad_multiple: int = 1) -> list[Tensor]:
    """Group sentences of similar length into batches of at most max_tokens (padding included) per side.

    Sentences are sorted by length (ties in random order when a generator is given), cut into batches, and the
    batch order is shuffled: every batch pads only to its own longest sentence."""
    n = len(src_len)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    key = torch.maximum(src_len, tgt_len)[order] * 1024 + torch.minimum(src_len, tgt_len)[order]
    order = order[torch.sort(key, stable=True).indices].tolist()
    lengths = torch.maximum(src_len, tgt_len).tolist()
    batches, start, longest = [], 0, 0
    for i, j in enumerate(order):
        longest_if_added = max(longest, round_up(lengths[j], pad_multiple))
        if i > start and longest_if_added * (i - start + 1) > max_tokens:
            batches.append(torch.tensor(order[start:i]))
            start, longest_if_added = i, round_up(lengths[j], pad_multiple)
        longest = longest_if_added
    if start < n:
        batches.append(torch.tensor(order[start:]))
    if generator is not None:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


class Split:
    """One split as padded id matrices. Source = x + [EOS]; decoder input = [BOS] + y, labels = y + [EOS]
    (the decoder predicts each next token, and EOS last); padding ids in labels are ignored by the loss."""

    def __init__(self, src_ids: list[list[int]], tgt_ids: list[list[int]], src_text: list[str], tgt_text: list[str],
                 tok: Tokenizer, max_len: int, name: str, drop_long: bool):
        too_long = [len(s) + 1 > max_len or len(t) + 1 > max_len for s, t in zip(src_ids, tgt_ids)]
        if any(too_long):
            log(f"data: {name}: {sum(too_long)} pairs longer than max_len={max_len} "
                f"{'dropped' if drop_long else 'kept for BLEU only'}")
        keep = [i for i, bad in enumerate(too_long) if not bad or not drop_long]
        self.src_text, self.tgt_text = [src_text[i] for i in keep], [tgt_text[i] for i in keep]
        src = [src_ids[i][:max_len - 1] + [tok.eos_id] for i in keep]
        tgt = [tgt_ids[i][:max_len - 1] for i in keep]
        self.src = pad_rows(src, tok.pad_id)
        self.tgt_in = pad_rows([[tok.bos_id] + t for t in tgt], tok.pad_id)
        self.labels = pad_rows([t + [tok.eos_id] for t in tgt], tok.pad_id)
        self.src_len = torch.tensor([len(s) for s in src])
        self.tgt_len = torch.tensor([len(t) + 1 for t in tgt])
        self.fits = ~torch.tensor([too_long[i] for i in keep], dtype=torch.bool)  # usable for the loss
        self.pad_id = tok.pad_id

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

    def batch(self, idx: Tensor, device: str | torch.device = "cpu", pad_multiple: int = 1) -> tuple[Tensor, Tensor, Tensor]:
        """(src, tgt_in, labels) of these sentences, each padded only to the longest in the batch."""
        S = round_up(int(self.src_len[idx].max()), pad_multiple)
        T = round_up(int(self.tgt_len[idx].max()), pad_multiple)
        non_blocking = torch.device(device).type == "cuda"

        def rows(matrix: Tensor, width: int) -> Tensor:  # exactly `width` columns, padding past the matrix's own
            out = torch.nn.functional.pad(matrix[idx, :width], (0, max(0, width - matrix.size(1))), value=self.pad_id)
            return out.to(device, non_blocking=non_blocking)

        return rows(self.src, S), rows(self.tgt_in, T), rows(self.labels, T)


def encode_sources(tok: Tokenizer, texts: list[str], max_len: int) -> tuple[list[list[int]], int]:
    """Source sentences for translation: ids + [EOS], cut to max_len. Returns the ids and how many were cut."""
    ids = tok.encode(texts)
    cut = sum(len(s) + 1 > max_len for s in ids)
    return [s[:max_len - 1] + [tok.eos_id] for s in ids], cut


# ---------------------------------------------------------------- everything together

@dataclass
class Data:
    tokenizer: Tokenizer
    train: Split
    val: Split
    test: Split


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, list):
            for line in p:
                h.update(line.encode("utf-8", "surrogatepass") + b"\n")
        else:
            h.update(str(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:20]


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: runs sharing a cache never write into each other's file
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if isinstance(obj, str):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(obj)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a cache is an optimization: a full or read-only disk must not stop training
        log(f"data: could not write cache {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        try:
            os.remove(tmp)
        except OSError:
            pass


def load_data(cfg: Config, tokenizer: Tokenizer | None = None) -> Data:
    """Read the corpus, train (or reuse) the tokenizer, tokenize once (or read the cache), build the splits."""
    texts = load_texts(cfg)
    train_src, train_tgt = texts["train"]
    if tokenizer is None:
        key = _digest(cfg.tokenizer, cfg.vocab_size, cfg.min_frequency, train_src, train_tgt)
        path = os.path.join(cfg.cache_dir, f"tokenizer-{key}.json")
        try:
            with open(path, encoding="utf-8") as f:
                tokenizer = Tokenizer.from_str(f.read())
        except (FileNotFoundError, NotADirectoryError):
            pass
        except Exception:
            log(f"data: ignoring unreadable cache {path}")
        if tokenizer is None:
            log(f"data: training a {cfg.tokenizer} tokenizer ({cfg.vocab_size} tokens) on {len(train_src)} pairs")
            tokenizer = Tokenizer.train(train_src + train_tgt, cfg.tokenizer, cfg.vocab_size, cfg.min_frequency)
            _atomic_save(tokenizer.to_str(), path)
    all_texts = [t for split in ("train", "val", "test") for side in texts[split] for t in side]
    key = _digest(tokenizer.to_str(), all_texts)
    path = os.path.join(cfg.cache_dir, f"ids-{key}.pt")
    ids = None
    names = [f"{split}.{side}" for split in ("train", "val", "test") for side in ("src", "tgt")]
    if os.path.isfile(path):
        try:
            ids = torch.load(path, weights_only=True)
            assert isinstance(ids, dict) and all(isinstance(ids.get(n), list) for n in names)
        except Exception:
            ids = None
            log(f"data: ignoring unreadable cache {path}")
    if ids is None:
        ids = {f"{split}.{side}": tokenizer.encode(texts[split][i])
               for split in ("train", "val", "test") for i, side in enumerate(("src", "tgt"))}
        _atomic_save(ids, path)
    splits = {split: Split(ids[f"{split}.src"], ids[f"{split}.tgt"], *texts[split], tokenizer, cfg.max_len, split,
                           drop_long=(split == "train"))
              for split in ("train", "val", "test")}
    if len(splits["train"]) == 0:
        raise UserError(f"no training pair fits max_len={cfg.max_len}")
    log(f"data: {cfg.src_lang}->{cfg.tgt_lang} train {len(splits['train'])} val {len(splits['val'])} "
        f"test {len(splits['test'])} pairs, vocabulary {tokenizer.vocab_size}")
    return Data(tokenizer, splits["train"], splits["val"], splits["test"])
