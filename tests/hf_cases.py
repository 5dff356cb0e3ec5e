"""Tiny Hugging Face models built from configs (no hub), with trained-looking norms and
biases (non-uniform norm weights, non-zero biases), for the tests of ``sm.grow``."""

from __future__ import annotations

import torch
from torch import nn


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or ".ln" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
    return model.eval()


def llama(tied: bool = False, kv: int = 2, heads: int = 4, hidden: int = 32,
          **kw: object) -> nn.Module:
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=heads, num_key_value_heads=kv,
                            vocab_size=100, tie_word_embeddings=tied, **kw)
    return _trained_like(tf.LlamaForCausalLM(config))


def qwen2(tied: bool = True) -> nn.Module:
    import transformers as tf

    config = tf.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                            tie_word_embeddings=tied)
    return _trained_like(tf.Qwen2ForCausalLM(config))


def gpt2() -> nn.Module:
    import transformers as tf

    config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                           bos_token_id=0, eos_token_id=0)
    return _trained_like(tf.GPT2LMHeadModel(config))


def vit(**kw: object) -> nn.Module:
    import transformers as tf

    config = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, image_size=16, patch_size=4, num_labels=3, **kw)
    return _trained_like(tf.ViTForImageClassification(config))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def bert(cls_name: str = "BertForSequenceClassification") -> nn.Module:
    import transformers as tf

    config = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, vocab_size=100, max_position_embeddings=32)
    return _trained_like(getattr(tf, cls_name)(config))
