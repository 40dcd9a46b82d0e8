"""CLIP / SigLIP text embeddings of free-text concepts, from the same model as a run's image backbone.

    from encoders.backbones import build_backbone
    from encoders.text import TextEncoder
    bb = build_backbone("clip_vitb32", pretrained=True)         # FrozenBackbone: bb.model is the whole CLIP
    text = TextEncoder.from_backbone(bb)
    T = text.encode(["faces", "places"], templates=["a photo of {}.", "{}"])   # (2, 512), unit norm

A registered open_clip backbone (``clip_rn50``, ``clip_vitb32``, ``clip_vitb16``, ``siglip_vitb16``, and the
toy ``tiny_clip``) wraps the whole open_clip model, text tower included, so the text embeddings come from
exactly the weights the image embeddings came from (pretrained, ``weights_path`` or random init alike).

Prompt templates: each concept is put into every template (``"{}"`` = the bare word, as CLIP-Dissect);
the embeddings of one concept's prompts are unit-normalised, averaged and normalised again (CLIP's
zero-shot prompt ensembling).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["TextEncoder", "tokenizer_for", "prompts"]

DEFAULT_TEMPLATES = ("{}",)


def prompts(concepts: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[list[str]]:
    """Each concept put into each template: (n_concepts, n_templates) strings. ValueError on a template
    without exactly one ``{}``."""
    templates = list(templates)
    if not templates:
        raise ValueError("no prompt templates given")
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"prompt template {t!r} must contain exactly one '{{}}' for the concept")
    return [[t.format(c) for t in templates] for c in concepts]


def tokenizer_for(spec, model: nn.Module) -> Callable[[list[str]], torch.Tensor]:
    """The open_clip tokenizer that belongs to a backbone spec's model.

    open_clip registry entries use ``open_clip.get_tokenizer(model_id)`` (SigLIP's is a Hugging Face
    tokenizer that must be in the local HF cache when offline); other models with a text tower use
    open_clip's BPE tokenizer with the model's context length.
    """
    import open_clip

    if spec.library == "open_clip":
        try:
            return open_clip.get_tokenizer(spec.model_id)
        except (ImportError, OSError, ValueError) as err:
            raise ValueError(f"backbone '{spec.name}': its text tokenizer cannot be loaded ({type(err).__name__}: "
                             f"{err}); supply concept embeddings from a file instead") from None
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=int(getattr(model, "context_length", 77)))


class TextEncoder:
    """Text tower of a CLIP-like model: ``encode(concepts, templates) -> (n_concepts, d)`` unit-norm float32.

    model: anything with ``encode_text(tokens)`` (an open_clip CLIP / CustomTextCLIP);
    tokenizer: list[str] -> (n, context_length) token ids.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], torch.Tensor], name: str = "?"):
        if not hasattr(model, "encode_text"):
            raise ValueError(f"backbone '{name}' has no text tower (encode_text): CLIP text embeddings need an "
                             f"open_clip backbone (clip_rn50, clip_vitb32, clip_vitb16, siglip_vitb16, tiny_clip)")
        self.model, self.tokenizer, self.name = model, tokenizer, name

    @classmethod
    def from_backbone(cls, backbone) -> "TextEncoder":
        """The text tower of a FrozenBackbone's wrapped model (the same weights as its image tower)."""
        model = backbone.model
        tokenizer = tokenizer_for(backbone.spec, model) if hasattr(model, "encode_text") else None
        return cls(model, tokenizer, backbone.spec.name)

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Raw text embeddings (n, d) float32 of strings, in batches."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens).float().cpu())
        if not out:
            raise ValueError("no texts to encode")
        return torch.cat(out).numpy()

    def encode(self, concepts: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
               batch_size: int = 256) -> np.ndarray:
        """Concept embeddings (n_concepts, d), unit norm: the normalised mean of each concept's normalised
        prompt embeddings (one prompt per template)."""
        concepts = list(concepts)
        if not concepts:
            raise ValueError("no concepts to encode")
        grid = prompts(concepts, templates)
        flat = [p for row in grid for p in row]
        emb = self.encode_texts(flat, batch_size).astype(np.float64)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        emb = emb.reshape(len(concepts), len(grid[0]), -1).mean(axis=1)
        return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
