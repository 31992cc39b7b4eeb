"""
Checkpoints, for every script: where one is, how it is read (never running code), the model it describes, and
how any file is written so that a crash leaves either the old file or the new one.

    from checkpoint import load_model
    model, tok = load_model("out-tiny")          # a run directory (best.pt, else ckpt.pt) or a .pt file

A checkpoint is a dict: "model" (weights), "config" (asdict of the Config), "tokenizer" (its JSON); ckpt.pt adds
"optimizer", "scaler" and "state" (train.py's TrainState), which is all it takes to resume exactly.
"""
import contextlib
import os
import pickle
import sys

import torch

from config import UserError, config_from_dict
from model import Transformer


def checkpoint_path(path: str) -> str:
    """A file, or a run directory holding best.pt or ckpt.pt."""
    if os.path.isdir(path):
        for name in ("best.pt", "ckpt.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
    elif os.path.isfile(path):
        return path
    raise UserError(f"no checkpoint at {path}: train one with `python train.py --out_dir={path}` or pass --ckpt=PATH")


def read_checkpoint(path: str, keys: tuple[str, ...] = ("model", "config", "tokenizer")) -> dict:
    """torch.load with weights_only=True: tensors and plain containers only, never code. Any other file
    (truncated, random bytes, a pickle that would run code) or a dict without these keys is refused with one line."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e) or "Unsupported" in str(e):  # a pickle of code or other objects: never executed
            raise UserError(f"refusing to load {path}: it holds more than tensors and plain data") from None
        raise UserError(f"{path} is not a readable checkpoint (corrupt or not a torch file)") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint (corrupt or truncated?): {type(e).__name__}") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a checkpoint of this project (missing {', '.join(missing)})")
    return ckpt


def strip_prefixes(state: dict) -> dict:
    """Weights saved from nn.DataParallel / DDP ("module.") or torch.compile ("_orig_mod.") load all the same."""
    for prefix in ("module.", "_orig_mod."):
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def build_model(ckpt: dict, device: str = "cpu"):
    """The model and tokenizer described by a checkpoint, with its weights loaded: (Transformer, Tokenizer)."""
    from dataset import Tokenizer  # here, not at the top: dataset.py writes its caches with atomic_save below
    try:
        cfg, tok = config_from_dict(ckpt["config"]), Tokenizer.from_str(ckpt["tokenizer"])
        model = Transformer(cfg, tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id)
        model.load_state_dict(strip_prefixes(ckpt["model"]))
    except UserError:
        raise
    except Exception as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in detail if "size mismatch" in line or "Missing key" in line), detail[0])
        raise UserError(f"checkpoint does not match its own config or tokenizer: {reason[:200]}") from None
    return model.to(device).eval(), tok


def load_model(path: str, device: str = "cpu"):
    """build_model of the checkpoint at path (a file or a run directory): (Transformer, Tokenizer)."""
    return build_model(read_checkpoint(checkpoint_path(path)), device)


def atomic_save(obj, path: str, required: bool = True) -> bool:
    """Write obj (a str as UTF-8 text, anything else with torch.save) to a temporary file of this process, flush it
    to disk, then rename it: a crash at any moment leaves either the old file or the new one, never half of one.
    A failed write (a full or read-only disk) leaves the old file too; then a required file (a checkpoint) stops
    the program with one line, and any other (a cache, only an optimization) is skipped with a warning."""
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: runs sharing a cache never write into each other's file
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            if isinstance(obj, str):
                f.write(obj.encode("utf-8"))
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError caused by an OSError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e if isinstance(e, OSError) else e.__context__
        reason = getattr(cause, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        if required:
            raise UserError(f"could not write {path} ({reason}); the previous file is intact") from None
        print(f"warning: could not write {path} ({reason}); going on without it", file=sys.stderr)
        return False
