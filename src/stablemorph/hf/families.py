"""Reading supported Hugging Face models into a :class:`~stablemorph.hf.net.Net` and writing a
grown one back as the same class with its config rewritten.

Supported (by ``config.model_type`` and class):

- ``llama``, ``qwen2``, ``qwen3``, ``mistral`` (``*ForCausalLM``): RMSNorm, RoPE, SwiGLU,
  grouped-query attention, tied or untied head, optional q/k/v biases (Qwen2), per-head
  query/key RMSNorms (Qwen3: shared by the heads, so new heads use them unchanged). The head
  width is kept by writing ``head_dim`` into the config, so heads grow independently of the
  hidden size.
- ``gpt2`` (``GPT2LMHeadModel``): LayerNorm, learned positions, tied head,
  ``Conv1D`` projections (``(in, out)`` weights, transposed here) and the fused ``c_attn``.
  GPT-2 computes ``head_dim = hidden / heads``: heads and hidden grow together.
- ``vit`` (``ViTForImageClassification``): pre-LayerNorm encoder; a patch
  convolution, a class token and position embeddings write the stream.
- ``bert`` (``BertModel``, ``BertForSequenceClassification``): post-LayerNorm encoder
  (:mod:`stablemorph.hf.postln`: hidden size at multiples only, no depth), pooler.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from stablemorph.hf.net import Net, check_roles

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Family:
    """How one family's parameters map onto :class:`Net` roles.

    ``block``: role -> parameter name (without prefix) in block ``i``; ``prefix``: where the
    blocks live; ``glob``: Net key -> parameter name; ``writers``: (glob key, stream dim);
    ``fixed_head_dim``: the class derives ``head_dim = hidden / heads`` (it cannot be set);
    ``inputs``: ``"tokens"`` or ``"pixels"``; ``headless``: a base model without its head
    (``LlamaModel``, ``GPT2Model``, ``ViTModel``): its output is the hidden state itself.
    """

    name: str
    prefix: str
    block: dict[str, str]
    glob: dict[str, str]
    writers: tuple[tuple[str, int], ...]
    norm: str
    fixed_head_dim: bool
    inputs: str
    conv1d: bool = False
    headless: bool = False


def _llama(base: str) -> Family:
    att, mlp = "self_attn.", "mlp."
    block = {"ln1.w": "input_layernorm.weight", "ln2.w": "post_attention_layernorm.weight"}
    for r in "qkvo":
        block |= {f"{r}.w": f"{att}{r}_proj.weight", f"{r}.b": f"{att}{r}_proj.bias"}
    for r in ("gate", "up", "down"):
        block |= {f"{r}.w": f"{mlp}{r}_proj.weight", f"{r}.b": f"{mlp}{r}_proj.bias"}
    # Qwen3: RMSNorms over each query / key head (one weight shared by all heads)
    block |= {"qn.w": f"{att}q_norm.weight", "kn.w": f"{att}k_norm.weight"}
    return Family("llama", f"{base}layers.", block,
                  {"embed": f"{base}embed_tokens.weight", "lnf.w": f"{base}norm.weight",
                   "head.w": "lm_head.weight"}, (("embed", 1),), "rms", False, "tokens")


def _gpt2(base: str) -> Family:
    block = {"ln1.w": "ln_1.weight", "ln1.b": "ln_1.bias", "qkv.w": "attn.c_attn.weight",
             "qkv.b": "attn.c_attn.bias", "o.w": "attn.c_proj.weight",
             "o.b": "attn.c_proj.bias", "ln2.w": "ln_2.weight", "ln2.b": "ln_2.bias",
             "up.w": "mlp.c_fc.weight", "up.b": "mlp.c_fc.bias",
             "down.w": "mlp.c_proj.weight", "down.b": "mlp.c_proj.bias"}
    return Family("gpt2", f"{base}h.", block,
                  {"embed": f"{base}wte.weight", "pos": f"{base}wpe.weight",
                   "lnf.w": f"{base}ln_f.weight", "lnf.b": f"{base}ln_f.bias",
                   "head.w": "lm_head.weight"}, (("embed", 1), ("pos", 1)), "ln", True,
                  "tokens", conv1d=True)


def _vit(base: str) -> Family:
    block = {"ln1.w": "layernorm_before.weight", "ln1.b": "layernorm_before.bias",
             "ln2.w": "layernorm_after.weight", "ln2.b": "layernorm_after.bias",
             "up.w": "mlp.fc1.weight", "up.b": "mlp.fc1.bias",
             "down.w": "mlp.fc2.weight", "down.b": "mlp.fc2.bias"}
    for r in "qkvo":
        block |= {f"{r}.w": f"attention.{r}_proj.weight", f"{r}.b": f"attention.{r}_proj.bias"}
    emb = f"{base}embeddings."
    return Family("vit", f"{base}layers.", block,
                  {"cls": f"{emb}cls_token", "posv": f"{emb}position_embeddings",
                   "patch.w": f"{emb}patch_embeddings.projection.weight",
                   "patch.b": f"{emb}patch_embeddings.projection.bias",
                   "lnf.w": f"{base}layernorm.weight", "lnf.b": f"{base}layernorm.bias",
                   "head.w": "classifier.weight", "head.b": "classifier.bias"},
                  (("cls", 2), ("posv", 2), ("patch.w", 0), ("patch.b", 0)), "ln", False,
                  "pixels")


def _bert(base: str) -> Family:
    att = "attention."
    block = {"o.w": f"{att}output.dense.weight", "o.b": f"{att}output.dense.bias",
             "ln1.w": f"{att}output.LayerNorm.weight", "ln1.b": f"{att}output.LayerNorm.bias",
             "up.w": "intermediate.dense.weight", "up.b": "intermediate.dense.bias",
             "down.w": "output.dense.weight", "down.b": "output.dense.bias",
             "ln2.w": "output.LayerNorm.weight", "ln2.b": "output.LayerNorm.bias"}
    for r, name in (("q", "query"), ("k", "key"), ("v", "value")):
        block |= {f"{r}.w": f"{att}self.{name}.weight", f"{r}.b": f"{att}self.{name}.bias"}
    emb = f"{base}embeddings."
    return Family("bert", f"{base}encoder.layer.", block,
                  {"word": f"{emb}word_embeddings.weight",
                   "pos": f"{emb}position_embeddings.weight",
                   "type": f"{emb}token_type_embeddings.weight",
                   "lne.w": f"{emb}LayerNorm.weight", "lne.b": f"{emb}LayerNorm.bias",
                   "pool.w": f"{base}pooler.dense.weight", "pool.b": f"{base}pooler.dense.bias",
                   "head.w": "classifier.weight", "head.b": "classifier.bias"},
                  (("word", 1), ("pos", 1), ("type", 1)), "post-ln", True, "tokens")


_BUILDERS: dict[str, Callable[[str], Family]] = {
    **dict.fromkeys(LLAMA_TYPES, _llama), "gpt2": _gpt2, "vit": _vit, "bert": _bert}
_BASES = {**dict.fromkeys(LLAMA_TYPES, "model."), "gpt2": "transformer.", "vit": "vit.",
          "bert": "bert."}
_BERT_CLASSES = ("BertModel", "BertForSequenceClassification")

SUPPORTED = (
    "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM, "
    "GPT2LMHeadModel, ViTForImageClassification, BertModel, BertForSequenceClassification, "
    "the base models without a head (LlamaModel, Qwen2Model, Qwen3Model, MistralModel, "
    "GPT2Model, ViTModel: layers, heads and mlp) and stablemorph.transformer.GPT"
)


class UnsupportedModel(TypeError):
    """The model's class is not one sm.grow knows how to grow."""


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` of ``model``, or :class:`UnsupportedModel` naming its class."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in _BUILDERS or (kind == "bert" and type(model).__name__ not in _BERT_CLASSES):
        raise UnsupportedModel(
            f"sm.grow does not support {type(model).__name__}"
            f"{f' (model_type {kind!r})' if kind else ''}; supported: {SUPPORTED}")
    keys = model.state_dict().keys()
    base = _BASES[kind]
    base = base if any(k.startswith(base) for k in keys) else ""
    fam = _BUILDERS[kind](base)
    # a base model (AutoModel) has no head and no prefix: its blocks sit at the top
    headless = fam.glob["head.w"] not in keys and fam.name != "bert" and not base
    if f"{fam.prefix}0.{fam.block['ln1.w']}" not in keys or (
            fam.glob["head.w"] not in keys and fam.name != "bert" and not headless):
        raise UnsupportedModel(
            f"sm.grow does not support {type(model).__name__} (no "
            f"{fam.prefix}0.{fam.block['ln1.w']} or {fam.glob['head.w']}); supported: "
            f"{SUPPORTED}")
    return replace(fam, headless=headless)


def tied(model: nn.Module) -> bool:
    """Whether the output head is the input embedding (the same parameter)."""
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return out is not None and inp is not None and out.weight is inp.weight


def _has_output_embeddings(model: nn.Module) -> bool:
    try:
        return model.get_output_embeddings() is not None
    except (AttributeError, NotImplementedError):
        return False


def head_dim(model: nn.Module) -> int:
    c = model.config
    hd = getattr(c, "head_dim", None)
    return int(hd) if hd else c.hidden_size // c.num_attention_heads


def sizes(model: nn.Module) -> dict[str, int]:
    """Current ``layers, hidden, heads, kv_heads, mlp``."""
    c = model.config
    heads = c.num_attention_heads
    mlp = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * c.hidden_size
    return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": heads,
            "kv_heads": getattr(c, "num_key_value_heads", None) or heads, "mlp": mlp}


def read(model: nn.Module, fam: Family) -> Net:
    """The model's parameters as a :class:`Net` (float64 copies on the CPU)."""
    sd = {k: v.detach().to("cpu", torch.float64) for k, v in model.state_dict().items()}
    s = sizes(model)
    blocks = []
    for i in range(s["layers"]):
        blk = {r: sd[f"{fam.prefix}{i}.{k}"] for r, k in fam.block.items()
               if f"{fam.prefix}{i}.{k}" in sd}
        if fam.conv1d:
            blk = _from_conv1d(blk, s["hidden"])
        blocks.append(blk)
    is_tied = tied(model)
    glob = {r: sd[k] for r, k in fam.glob.items() if k in sd and not (r == "head.w" and is_tied)}
    return Net(blocks=blocks, glob=glob, writers=list(fam.writers), d=s["hidden"],
               n_head=s["heads"], n_kv=s["kv_heads"], head_dim=head_dim(model), d_mlp=s["mlp"],
               norm=fam.norm, tied=is_tied)


def _from_conv1d(blk: dict[str, Tensor], d: int) -> dict[str, Tensor]:
    out = {k: v for k, v in blk.items() if not k.startswith("qkv")}
    for k in ("o.w", "up.w", "down.w"):
        out[k] = blk[k].T
    w, b = blk["qkv.w"].T, blk["qkv.b"]
    for n, r in enumerate("qkv"):
        out[f"{r}.w"], out[f"{r}.b"] = w[n * d:(n + 1) * d], b[n * d:(n + 1) * d]
    return out


def _to_conv1d(blk: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {k: v for k, v in blk.items() if k[0] not in "qkv"}
    for k in ("o.w", "up.w", "down.w"):
        out[k] = blk[k].T
    out["qkv.w"] = torch.cat([blk["q.w"], blk["k.w"], blk["v.w"]], 0).T
    out["qkv.b"] = torch.cat([blk["q.b"], blk["k.b"], blk["v.b"]], 0)
    return out


def child_config(model: nn.Module, fam: Family, want: dict[str, int], head_width: int,
                 points: list[int]):
    """The parent's config rewritten to the sizes ``want`` (``points``: where new blocks go,
    for per-layer config lists such as ``layer_types``)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "tie_word_embeddings") and _has_output_embeddings(model):
        config.tie_word_embeddings = tied(model)  # what the weights are, whatever it said
    config.hidden_size = want["hidden"]
    config.num_hidden_layers = want["layers"]
    config.num_attention_heads = want["heads"]
    if fam.name == "gpt2":
        config.n_inner = want["mlp"]
    else:
        config.intermediate_size = want["mlp"]
    if hasattr(config, "num_key_value_heads"):
        config.num_key_value_heads = want["kv_heads"]
    if not fam.fixed_head_dim:
        config.head_dim = head_width
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and points:
        types = list(types)
        for index in points:
            types.insert(index, types[max(index - 1, 0)])
        config.layer_types = types
    return config


def write(model: nn.Module, fam: Family, net: Net, config: object) -> nn.Module:
    """A new model of ``model``'s class and ``config`` holding ``net`` (in ``model``'s
    dtype, device and train/eval mode)."""
    check_roles(net.blocks)
    ref = next(model.parameters())
    sd: dict[str, Tensor] = {}
    for i, blk in enumerate(net.blocks):
        blk = _to_conv1d(blk) if fam.conv1d else blk
        for r, v in blk.items():
            sd[f"{fam.prefix}{i}.{fam.block[r]}"] = v
    for r, v in net.glob.items():
        sd[fam.glob[r]] = v
    if net.tied:
        sd[fam.glob["head.w"]] = net.glob["embed"]
    try:  # every tensor is overwritten below: skip transformers' random initialisation
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    # base models built without their pooler (the trunk of a *ForImageClassification) stay so
    kwargs = {"add_pooling_layer": getattr(model, "pooler", None) is not None} if (
        "add_pooling_layer" in inspect.signature(type(model).__init__).parameters) else {}
    with no_init_weights():
        child = type(model)(config, **kwargs)
    child.tie_weights()  # (part of the initialisation skipped)
    child.to(device=ref.device, dtype=ref.dtype)
    state = child.state_dict()
    parent_state = model.state_dict()
    extra = set(sd) - set(state)
    if extra:
        raise RuntimeError(f"internal: {type(model).__name__} has no parameters {sorted(extra)}")
    for k in state:
        if k in sd:
            state[k] = sd[k].to(ref.dtype)
        elif k in parent_state and parent_state[k].shape == state[k].shape:
            state[k] = parent_state[k]  # buffers and tensors the growth does not touch
        elif state[k].is_floating_point():
            raise RuntimeError(f"internal: the grown {k!r} has no value")
    child.load_state_dict(state)
    if hasattr(model, "generation_config") and model.generation_config is not None:
        child.generation_config = copy.deepcopy(model.generation_config)
    child.train(model.training)
    new_api = hasattr(model, "activation_checkpointing_enable")  # transformers >= 5
    if getattr(model, "is_activation_checkpointing" if new_api else
               "is_gradient_checkpointing", False):
        if new_api:
            child.activation_checkpointing_enable()
        else:
            child.gradient_checkpointing_enable()
    return child
