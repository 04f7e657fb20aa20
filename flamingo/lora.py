"""Low-rank adapters in the LM (``lm.trainable: lora``: LLaVA's stage 2 with the LM frozen).

``peft`` injects its LoRA layers into the Hugging Face model in place (``inject_adapter_in_model``:
no ``PeftModel`` wrapper), so the LM keeps its module tree, its decoder layers and the hooks
that run the gated blocks; each adapted linear layer becomes a peft ``LoraLayer`` holding the
frozen original as its ``base_layer`` and the trainable ``lora_A`` and ``lora_B``. The
adapters start at zero (``lora_B``), so an adapted LM is the LM until it trains. A checkpoint
carries the adapters; the LM's own weights come from its source, as when it is frozen.
"""

from __future__ import annotations

from torch import nn

from flamingo.config import LoRAConfig

ADAPTER = "default"
"""peft's name for the one adapter (in the parameter names: ``lora_A.default.weight``)."""


def add_adapters(hf_model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Give ``hf_model`` LoRA adapters on the modules ``cfg.targets`` names (in place); only
    the adapters train."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:  # peft is in the train extra, not the core install
        raise ImportError(
            "lm.trainable: lora needs peft: pip install 'flamingo[train]' (or pip install peft)"
        ) from e
    targets = cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets)
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
    )
    inject_adapter_in_model(config, hf_model, adapter_name=ADAPTER)
    adapters = adapter_modules(hf_model)
    if not adapters:
        raise ValueError(f"lm.lora.targets={cfg.targets!r} matched no linear layer of the LM")
    for name, param in hf_model.named_parameters():
        param.requires_grad_(".lora_" in name)
    return hf_model


def adapter_modules(hf_model: nn.Module) -> nn.ModuleList:
    """The adapters' modules (every ``lora_A`` and ``lora_B``), together: what trains."""
    return nn.ModuleList(
        module
        for name, module in hf_model.named_modules()
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B")
    )
