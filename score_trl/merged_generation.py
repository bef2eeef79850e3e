"""Sampling from a merged copy of a LoRA policy (`SCoReConfig.generation_weights="merged"`).

Decoding a 4-bit (QLoRA) policy runs every weight through bitsandbytes' dequantization at every token, and every LoRA
layer as an extra pair of small matmuls. A copy of the base in bf16 with the adapter merged into it (W + ΔW, one
matmul per layer) decodes at plain bf16 speed. It costs a second copy of the weights (2 bytes per parameter), and it
is rebuilt from the training weights after every optimizer step, so it samples the policy being trained: the same
function up to the rounding of W + ΔW in the copy's dtype (exact in float32, which the tests use).
"""

import copy

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import dequantize_module_weight
from transformers import AutoModelForCausalLM


class MergedCopy:
    """A plain (unquantized, adapter-free) copy of a PEFT model's base with its active LoRA adapters merged in."""

    def __init__(self, peft_model, dtype: torch.dtype):
        base = peft_model.get_base_model()
        config = copy.deepcopy(base.config)
        config.__dict__.pop("quantization_config", None)  # the copy holds plain weights
        device = next(base.parameters()).device
        check_memory(base, dtype, device)
        with torch.device(device):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval().requires_grad_(False)
        self.model.generation_config = copy.deepcopy(base.generation_config)
        self.dtype, self.synced_step = dtype, None
        self._lora = [name for name, module in base.named_modules() if isinstance(module, LoraLayer)]
        self._copy_frozen(base)

    @torch.no_grad()
    def _copy_frozen(self, base):
        """Every weight outside the LoRA layers (embeddings, norms, untargeted linears), dequantized where 4-bit."""
        lora = set(self._lora)
        for name, module in self.model.named_modules():
            if name in lora or next(module.parameters(recurse=False), None) is None:
                continue
            source = base.get_submodule(name)
            for param_name, param in module.named_parameters(recurse=False):
                value = dequantize_module_weight(source) if param_name == "weight" else getattr(source, param_name)
                param.copy_(value.to(self.dtype))
        self.model.tie_weights()

    @torch.no_grad()
    def sync(self, peft_model, step: int):
        """Merge the current adapter into the copy, once per optimizer step."""
        if step == self.synced_step:
            return
        base = peft_model.get_base_model()
        for name in self._lora:
            layer, target = base.get_submodule(name), self.model.get_submodule(name)
            target.weight.copy_(merged_weight(layer).to(self.dtype))
            base_layer = layer.get_base_layer()
            if getattr(base_layer, "bias", None) is not None:
                target.bias.copy_(base_layer.bias.to(self.dtype))
        self.synced_step = step


def merged_weight(layer) -> torch.Tensor:
    """W + ΔW of a LoRA layer for its active adapters, in float32: the base weight dequantized when 4/8-bit."""
    weight = dequantize_module_weight(layer.get_base_layer()).float()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            weight = weight + layer.get_delta_weight(adapter).float()
    return weight


def check_memory(base, dtype: torch.dtype, device: torch.device):
    """On a GPU, refuse early (naming the fix) when the copy cannot fit next to what is already allocated."""
    if device.type != "cuda":
        return
    needed = base.num_parameters() * torch.finfo(dtype).bits // 8  # counts 4-bit weights unpacked
    free, _ = torch.cuda.mem_get_info(device)
    if needed * 1.1 > free:
        raise RuntimeError(
            f"generation_weights='merged' needs {needed / 2**30:.1f} GiB for a {dtype} copy of the model and "
            f"{free / 2**30:.1f} GiB is free on {device}: use generation_weights='policy' (sampling from the training "
            "weights) or free memory (smaller batches, gradient checkpointing)."
        )


def check_merged_generation(trainer):
    """generation_weights='merged' needs a LoRA model whose weights each process holds whole."""
    from peft import PeftModel

    if not isinstance(trainer.accelerator.unwrap_model(trainer.model), PeftModel):
        raise ValueError(
            "generation_weights='merged' merges a LoRA adapter into a copy of the base: pass peft_config (use_peft: "
            "true), or use generation_weights='policy'."
        )
    if (
        trainer.is_fsdp_enabled
        or trainer.accelerator.state.deepspeed_plugin is not None
        and (trainer.accelerator.state.deepspeed_plugin.zero_stage == 3)
    ):
        raise ValueError(
            "generation_weights='merged' copies the whole model on each process, which FSDP and ZeRO-3 shard: use "
            "generation_weights='policy' there (or ZeRO-2 / plain data parallel)."
        )


def generate_merged(trainer, prompt_ids: list[list[int]]) -> list[list[int]]:
    """One attempt for `prompt_ids` with RLOO's padded `generate` settings, sampled from the trainer's merged copy of
    its LoRA policy (made on first use in the training dtype, synced to the current step)."""
    from trl.extras.profiling import profiling_context

    from .generation import cut_at_stop, sample_padded

    if trainer._merged is None:
        args = trainer.args
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        trainer._merged = MergedCopy(trainer.accelerator.unwrap_model(trainer.model), dtype)
    trainer._merged.sync(trainer.accelerator.unwrap_model(trainer.model), trainer.state.global_step)
    with profiling_context(trainer, "transformers.generate"), torch.no_grad():
        rows = sample_padded(trainer._merged.model, prompt_ids, trainer.generation_config,
                             trainer._tokenizer.pad_token_id, trainer.pad_to_multiple_of)  # fmt: skip
    return cut_at_stop(rows, trainer.eos_token_ids)
