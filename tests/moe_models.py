"""Tiny random mixture-of-experts models (transformers 5 fused 3-D experts) for the MoE tests.

Hidden 32, 4 experts (2 routed per token), 2 layers, vocabulary 97: a forward takes milliseconds on CPU.
Experts: ``mlp.experts.gate_up_proj`` (E, 2*ffn, hidden) and ``mlp.experts.down_proj`` (E, hidden, ffn); Qwen2-MoE
adds a dense shared expert (``mlp.shared_expert.{gate,up,down}_proj``, nn.Linear); gpt-oss stores its experts
transposed ((E, hidden, 2*ffn), gate and up interleaved, ``is_transposed=True``) with biases.
"""

from __future__ import annotations

import torch

MOE_ARCHS = ("mixtral", "qwen2_moe", "olmoe")
#: The fused expert parameters of every tiny MoE architecture (PEFT ``target_parameters`` spelling).
EXPERT_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]
#: Dense linear targets (attention; Qwen2-MoE's shared expert too).
DENSE_TARGETS = {
    "mixtral": ["q_proj", "v_proj"],
    "olmoe": ["q_proj", "v_proj"],
    "qwen2_moe": ["q_proj", "v_proj", "shared_expert.up_proj", "shared_expert.down_proj"],
    "gpt_oss": ["q_proj", "v_proj"],
}


def tiny_moe_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "mixtral":
        return tf.MixtralConfig(intermediate_size=48, num_local_experts=4, **common)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=48, shared_expert_intermediate_size=40,
                                 num_experts=4, **common)
    if arch == "olmoe":
        return tf.OlmoeConfig(intermediate_size=48, num_experts=4, **common)
    if arch == "gpt_oss":
        return tf.GptOssConfig(intermediate_size=48, num_local_experts=4, head_dim=8, **common)
    raise ValueError(arch)


def tiny_moe(arch: str, seed: int = 0):
    """A tiny random ``arch`` causal LM in eval mode, initialised from ``seed``."""
    import transformers as tf

    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(tiny_moe_config(arch)).eval()


def moe_ids(batch: int = 2, length: int = 11, seed: int = 0) -> torch.Tensor:
    """Token ids (batch, length) that route to several experts per layer."""
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
