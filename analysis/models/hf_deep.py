"""Deep models from any local Hugging Face causal-LM folder, through the ``transformers``
library's own classes (Llama, SmolLM2, TinyLlama, OLMo-2, Qwen2, GPT-2, …).

Offline and safe: ``local_files_only``, safetensors only, never ``trust_remote_code`` (a folder
whose ``model_type`` transformers does not know natively is refused). Before any weight is
allocated the model is built on the meta device from config.json and its parameter shapes are
compared with the safetensors headers.

As a loopscope model it is deep, ``(L, -, -)``: ``encode`` returns the token embeddings,
``initial_state`` returns them unchanged, one ``step`` runs all L decoder layers (recording each
layer's output and, when wanted, its attention probabilities with eager attention) and returns
the last layer's output before the final norm; ``decode`` and ``logit_lens`` apply the model's
own final norm and unembedding.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import names
from .folder import ModelFolderError, TensorInfo, check_shapes, first
from .layers import record
from .spec import ModelSpec, TrainedSchedule

_LAYER_LISTS = ("layers", "h", "blocks", "decoder.layers")
_FINAL_NORMS = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "decoder.norm", "decoder.final_layer_norm")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def native_model_types() -> set[str]:
    """The ``model_type`` values transformers supports natively (no remote code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES)


class HFDeepLM(nn.Module):
    """A transformers causal LM seen as a deep loopscope model. ``hf`` is the transformers model."""

    family = "hf-deep"

    def __init__(self, hf, folder: str = ""):
        super().__init__()
        self.hf = hf
        self.folder = folder
        base = hf.base_model
        self._base = base
        layers = next((_get(base, n) for n in _LAYER_LISTS if isinstance(_get(base, n), nn.ModuleList)), None)
        norm = next((_get(base, n) for n in _FINAL_NORMS if isinstance(_get(base, n), nn.Module)), None)
        if layers is None or norm is None or hf.get_output_embeddings() is None:
            raise ModelFolderError(f"{folder}: {type(hf).__name__} has no decoder-layer list, final norm or "
                                   "unembedding loopscope can find")
        self.layers, self.final_norm, self.head = layers, norm, hf.get_output_embeddings()
        cfg = hf.config
        D = int(first(cfg.to_dict(), "hidden_size", "n_embd", "d_model"))
        H = int(first(cfg.to_dict(), "num_attention_heads", "n_head"))
        V = int(first(cfg.to_dict(), "vocab_size"))
        ctx = int(first(cfg.to_dict(), "max_position_embeddings", "n_positions", "n_ctx", default=2048))
        self.spec = ModelSpec(kind="deep", n_prelude=0, n_block=len(layers), n_coda=0, d_model=D, n_heads=H,
                              vocab_size=V, context_length=ctx, schedule=TrainedSchedule.fixed(1),
                              family=f"hf-{cfg.model_type}")
        self.tokenizer = None
        self.eager = False

    def initial_state_info(self) -> dict:
        return {"kind": "embed"}

    def _set_attention(self, eager: bool):
        want = "eager" if eager else "sdpa"
        if getattr(self.hf.config, "_attn_implementation", None) != want:
            try:
                self.hf.set_attn_implementation(want)
            except (ValueError, ImportError):
                self.hf.set_attn_implementation("eager")

    def initial_state(self, e, seed=None):
        """s₀ = the embeddings."""
        return e

    def encode(self, idx, capture=None):
        """idx [B, T] -> token embeddings [B, T, D] (position embeddings, if the family has them,
        are added inside the layers' forward, as transformers does for ``inputs_embeds``)."""
        if idx.shape[1] > self.spec.context_length:
            raise ValueError(f"{idx.shape[1]} tokens exceed this model's context of {self.spec.context_length}")
        e = self.hf.get_input_embeddings()(idx)
        record(capture, names.EMBED, e)
        record(capture, names.INPUT, e)
        return e

    def step(self, s, e=None, t=0, capture=None):
        """All L layers from the embeddings ``s`` [B, T, D]; returns the last layer's output
        (before the final norm). Records ``loop.{t}.blocks.{l}.hook_resid_post`` and, with eager
        attention, ``loop.{t}.blocks.{l}.attn.hook_pattern``."""
        want_attn = capture is not None and any(capture.wants(names.block_pattern(t, l))
                                                for l in range(len(self.layers)))
        self._set_attention(want_attn or self.eager)
        outs: dict[int, torch.Tensor] = {}
        handles = []

        def keep(l):
            def hook(_mod, _inp, out):
                outs[l] = out[0] if isinstance(out, tuple) else out
            return hook

        for l, layer in enumerate(self.layers):
            handles.append(layer.register_forward_hook(keep(l)))
        try:
            res = self._base(inputs_embeds=s, use_cache=False, output_attentions=want_attn, return_dict=True)
        finally:
            for h in handles:
                h.remove()
        record(capture, names.state_in(t), s)
        for l in range(len(self.layers)):
            record(capture, names.block_resid(t, l), outs[l])
        if want_attn:
            for l, a in enumerate(res.attentions or ()):
                record(capture, names.block_pattern(t, l), a)
        h = outs[len(self.layers) - 1]
        record(capture, names.state_out(t), h)
        return h

    def carried_state(self, h):
        return h

    def decode(self, s, capture=None):
        """The model's final norm and unembedding: [B, T, D] -> logits [B, T, V] float32."""
        x = self.final_norm(s)
        record(capture, names.FINAL, x)
        return self.head(x).float()

    def logit_lens(self, state):
        """unembed(final_norm(state)) for any [..., D] -> [..., V] float32."""
        return self.head(self.final_norm(state)).float()

    def forward(self, idx, iterations=None, capture=None, seed=None):
        e = self.encode(idx, capture)
        record(capture, names.INITIAL_STATE, e)
        return self.decode(self.step(e, e, 0, capture), capture)


def load_hf_deep(folder, cfg: dict, index: dict[str, TensorInfo], dtype=None, device="cpu") -> HFDeepLM:
    """Load a native transformers causal LM from ``folder`` (checked first, nothing remote)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    mt = cfg.get("model_type")
    try:
        hf_cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises ValueError/OSError/KeyError variously
        raise ModelFolderError(f"{folder}: transformers cannot read config.json as a native {mt!r} config: "
                               f"{' '.join(str(exc).split())[:300]}") from None
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(hf_cfg, trust_remote_code=False)
    except Exception as exc:
        raise ModelFolderError(f"{folder}: {mt!r} has no native causal-LM class in transformers "
                               f"{transformers.__version__}: {' '.join(str(exc).split())[:300]}") from None
    expected = {n: tuple(p.shape) for n, p in skeleton.state_dict().items()}
    tied = bool(getattr(hf_cfg, "tie_word_embeddings", False))
    head_names = {n for n in expected if n.endswith("lm_head.weight")}
    buffers = {n for n, _ in skeleton.named_buffers()}
    need = {n: s for n, s in expected.items() if n not in buffers and not (tied and n in head_names)}
    # checkpoints written by older code may prefix names differently; compare only when names line up
    if set(need) & set(index):
        check_shapes(folder, index, need)
    else:
        raise ModelFolderError(f"{folder}: the weight names do not match {type(skeleton).__name__} "
                               f"(expected e.g. {sorted(need)[:3]}, found {sorted(index)[:3]})")
    del skeleton
    kwargs = dict(local_files_only=True, trust_remote_code=False, use_safetensors=True,
                  attn_implementation="sdpa", dtype=dtype if dtype is not None else "auto")
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except Exception as exc:
        raise ModelFolderError(f"{folder}: transformers could not load the weights: "
                               f"{' '.join(str(exc).split())[:300]}") from None
    hf.to(device).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    return HFDeepLM(hf, str(folder))
