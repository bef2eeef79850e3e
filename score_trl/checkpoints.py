"""Which checkpoints a run can resume from.

transformers writes a checkpoint in this order: weights (or adapter), optimizer, scheduler, (scaler,) RNG state(s), and
last `trainer_state.json`. A kill in between leaves a folder that `get_last_checkpoint` still picks and that then fails
to load, so "resume from the last checkpoint" here means the newest *complete* one: every part present and no file cut
short. Nothing is ever deleted: incomplete folders are only named in the log.
"""

import json
import logging
import re
import struct
import zipfile
from pathlib import Path


logger = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_GLOBAL_STEP = re.compile(r"^global_step\d+$")
_RNG_RANK = re.compile(r"^rng_state_\d+\.pth$")
# DeepSpeed's shard names; bf16 runs prefix the optimizer's with "bf16_"
_SHARD = re.compile(r"^(?:bf16_)?zero_pp_rank_(?P<rank>\d+)_mp_rank_\d+_(?P<kind>optim|model)_states\.pt$")


def missing_parts(folder: str | Path) -> list[str]:
    """What a checkpoint folder lacks to be resumed, in save order; empty when it is complete.

    DeepSpeed keeps optimizer and scheduler in its own `global_step*` folder (see `deepspeed_missing`); FSDP writes
    `optimizer_*` entries. Safetensors and torch zip files are checked for truncation."""
    folder = Path(folder)
    names = {p.name for p in folder.iterdir()}
    deepspeed = "latest" in names or any(_GLOBAL_STEP.match(name) for name in names)
    missing = []
    if not any(name in names for name in WEIGHT_FILES) and not deepspeed:
        missing.append("weights (model.safetensors or adapter_model.safetensors)")
    if not deepspeed and not any(name.startswith("optimizer") for name in names):
        missing.append("optimizer.pt")
    if not deepspeed and "scheduler.pt" not in names:
        missing.append("scheduler.pt")
    if not any(name.startswith("rng_state") and name.endswith(".pth") for name in names):
        missing.append("rng_state.pth")
    if "trainer_state.json" not in names:
        missing.append("trainer_state.json")
    if deepspeed:
        missing += deepspeed_missing(folder, names)
    missing += [
        f"{name} (cut short)" for name in sorted(names) if (folder / name).is_file() and not _intact(folder / name)
    ]
    return missing


def deepspeed_missing(folder: Path, names: set[str]) -> list[str]:
    """What DeepSpeed's part of a checkpoint lacks. Each rank writes its shards into `global_stepN/` (ZeRO-2: one
    `mp_rank_00_model_states.pt` and an optimizer shard per rank; ZeRO-3: a model and an optimizer shard per rank),
    then rank 0 writes `latest` naming the folder, without waiting for the other ranks. So `latest` alone does not
    prove the folder whole: every rank's shards must be there, intact. The number of ranks is read from the
    `rng_state_{rank}.pth` files transformers writes after DeepSpeed is done (one `rng_state.pth` alone: one rank)."""
    if "latest" not in names:
        return ["latest (DeepSpeed writes it after the global_step folder)"]
    tag = (folder / "latest").read_text().strip()
    shards = folder / tag
    if not tag or not shards.is_dir():
        return [f"{tag or '?'}/ (the folder `latest` names)"]
    files = {p.name for p in shards.iterdir() if p.is_file()}
    ranks = len([n for n in names if _RNG_RANK.match(n)]) or 1
    per_rank_model = any(_SHARD.match(n) and n.endswith("_model_states.pt") for n in files)
    missing = [] if per_rank_model or "mp_rank_00_model_states.pt" in files else [f"{tag}/mp_rank_00_model_states.pt"]
    for rank in range(ranks):
        for kind in ("optim",) + (("model",) if per_rank_model else ()):
            if not any((m := _SHARD.match(n)) and m["rank"] == str(rank) and m["kind"] == kind for n in files):
                missing.append(f"{tag}/zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt")
    return missing + [f"{tag}/{name} (cut short)" for name in sorted(files) if not _intact(shards / name)]


def _intact(path: Path) -> bool:
    """False for a file whose own framing shows it was cut short: safetensors (header length + data offsets), torch's
    zip files (central directory at the end), JSON (parses). Other files are taken as they are."""
    try:
        if path.suffix == ".safetensors":
            with path.open("rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_size))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            return path.stat().st_size >= 8 + header_size + end
        if path.suffix in (".pt", ".pth", ".bin"):
            return zipfile.is_zipfile(path)
        if path.suffix == ".json":
            json.loads(path.read_text())
        return True
    except (OSError, ValueError, struct.error, KeyError, TypeError):
        return False


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` folder in `output_dir` that can be resumed, or None. Newer incomplete ones are logged
    with what they lack, and left in place."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    for _, folder in sorted(found, reverse=True):
        missing = missing_parts(folder)
        if not missing:
            return str(folder)
        logger.warning(f"Skipping incomplete checkpoint {folder} (missing: {', '.join(missing)}); left in place.")
    return None
