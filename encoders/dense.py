"""Dense patch features in the image-embedding space of a ViT (MaskCLIP / NACLIP last block).

    dense = dense_features(build_backbone("clip_vitb16", pretrained=True), method="naclip", sigma=5)
    feats = dense(images)             # images (n, 3, H, W) normalised -> (n, H/p, W/p, embed_dim) float32
    x = dense.transform(uint8_image)  # the backbone's preprocessing at dense.image_size

Only the LAST transformer block changes (BrainSAIL, METHODS.md "BrainSAIL"); every earlier block runs as
trained. With x the last block's input, ``norm1`` (open_clip ``ln_1``, timm ``norm1``) and the block's own
q, k, v projections:

* ``maskclip`` (MaskCLIP's reference ``mmseg/models/backbones/vit.py``, BrainSAIL's DINOv2 / SigLIP
  scripts, which swap only ``blocks[-1].attn``): the attention is replaced by its value path and the rest
  of the block stays, y = x + ls1(out_proj(v)) with v from norm1(x), then y + ls2(mlp(norm2(y))): the
  block run as trained with every token attending only to itself.
* ``naclip``: out = out_proj(softmax(k·kᵀ/√d_head + ω) v) per head, ω[i, j] = exp(-‖g_i − g_j‖² / (2σ²))
  over the patch-grid positions g (NACLIP's Gaussian window), 0 in the rows and columns of prefix tokens
  (CLS, registers), then ls1; no residual, no FFN (NACLIP drops both).

Then the model's own tail is applied to every patch token as to the pooled token: open_clip
``ln_post(t) @ proj``; timm ``norm`` → (``attn_pool``) → ``fc_norm`` (→ ``head``, for the trunk of an
open_clip ``TimmModel``, then that model's ``head``). The attention branch's LayerScale (``ls_1``/``ls1``,
DINOv2) is kept in both: it is part of what the block adds from that branch.

SigLIP's timm trunk pools with an attention-pool head (``attn_pool``: one latent query attending over all
tokens, then an MLP). Each patch token is passed through it ALONE, as a one-token sequence: the softmax
over a single key is 1, so the pool's attention reduces to that token's value path (MaskCLIP's rule
applied to the pooling head), followed by the pool's own MLP residual. That gives a per-patch vector in
the same space as the pooled image embedding.

Inputs larger (or smaller) than the native size: the absolute positional embeddings are resampled to the
new patch grid (bicubic, timm ``resample_abs_pos_embed``); H and W must be multiples of the patch size.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["METHODS", "DenseFeatures", "dense_features", "gaussian_bias", "default_method"]

METHODS = ("maskclip", "naclip")


def gaussian_bias(h: int, w: int, sigma: float, n_prefix: int = 0) -> torch.Tensor:
    """NACLIP's additive attention bias ω (L, L) for L = n_prefix + h*w tokens (prefix tokens first).

    ω[i, j] = exp(-((r_i - r_j)² + (c_i - c_j)²) / (2σ²)) between patches at grid (row, col) positions;
    0 in every row and column of a prefix token. float32.
    """
    if sigma <= 0:
        raise ValueError(f"NACLIP sigma must be > 0, got {sigma}")
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    patch = torch.exp(-torch.cdist(pos, pos).square() / (2.0 * float(sigma) ** 2))
    out = torch.zeros(n_prefix + h * w, n_prefix + h * w)
    out[n_prefix:, n_prefix:] = patch
    return out


# ----------------------------------------------------------------------------- architectures


class _Arch:
    """What the dense forward needs from one ViT family."""

    n_prefix: int
    patch_size: int
    native_grid: tuple[int, int]

    def embed_tokens(self, images: torch.Tensor) -> torch.Tensor:  # (n, 3, H, W) -> (n, L, d)
        raise NotImplementedError

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:  # every block but the last
        raise NotImplementedError

    def qkv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Last block: y (n, L, d) -> q, k, v (n, heads, L, d_head) and the attention scale."""
        raise NotImplementedError

    def attn_out(self, o: torch.Tensor) -> torch.Tensor:
        """Last block: per-head outputs (n, heads, L, d_head) -> the attention branch (n, L, d)."""
        raise NotImplementedError

    def norm1(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mlp_residual(self, y: torch.Tensor) -> torch.Tensor:
        """Last block's second half: y (n, L, d) -> y + ls2(mlp(norm2(y)))."""
        raise NotImplementedError

    def tail(self, t: torch.Tensor) -> torch.Tensor:  # tokens (m, d) -> embeddings (m, e)
        raise NotImplementedError


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    n, L, d = t.shape
    return t.reshape(n, L, heads, d // heads).transpose(1, 2)


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    n, heads, L, dh = o.shape
    return o.transpose(1, 2).reshape(n, L, heads * dh)


def _resample_pos(pos: torch.Tensor, new: tuple[int, int], old: tuple[int, int], n_prefix: int) -> torch.Tensor:
    """pos (1, n_prefix + old_h*old_w, d) -> (1, n_prefix + new_h*new_w, d), bicubic (timm)."""
    if tuple(new) == tuple(old):
        return pos
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(pos, new_size=list(new), old_size=list(old), num_prefix_tokens=n_prefix,
                                  interpolation="bicubic", antialias=True)


class _OpenClipViT(_Arch):
    """open_clip ``VisionTransformer`` (CLIP ViT-B/16, B/32): conv1, class/positional embeddings, ln_pre,
    transformer.resblocks (ln_1, attn = nn.MultiheadAttention with in_proj / out_proj), ln_post, proj."""

    def __init__(self, visual: nn.Module):
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("open_clip VisionTransformer with an attentional pooler (CoCa) is not supported "
                             "for dense features")
        last = visual.transformer.resblocks[-1]
        attn = getattr(last, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            raise ValueError(f"open_clip last block's attention is {type(attn).__name__}, dense features need "
                             f"nn.MultiheadAttention (in_proj / out_proj)")
        if not all(hasattr(last, a) for a in ("ln_1", "ls_1", "ln_2", "mlp", "ls_2")):
            raise ValueError(f"open_clip last block {type(last).__name__} lacks ln_1 / ls_1 / ln_2 / mlp / ls_2")
        self.v, self.last, self.attn = visual, last, attn
        self.n_prefix = 1
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.native_grid = tuple(int(g) for g in visual.grid_size)
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))

    def embed_tokens(self, images):
        v = self.v
        x = v.conv1(images)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        pos = _resample_pos(v.positional_embedding[None], (h, w), self.native_grid, 1)[0]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def run_blocks(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        for blk in self.v.transformer.resblocks[:-1]:
            x = blk(x)
        return x if self.batch_first else x.transpose(0, 1)

    def norm1(self, x):
        return self.last.ln_1(x)

    def qkv(self, y):
        a = self.attn
        q, k, v = F.linear(y, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
        return (_split_heads(q, a.num_heads), _split_heads(k, a.num_heads), _split_heads(v, a.num_heads),
                a.head_dim ** -0.5)

    def attn_out(self, o):
        out = self.attn.out_proj(_merge_heads(o))
        return self.last.ls_1(out)

    def mlp_residual(self, y):
        b = self.last
        return y + b.ls_2(b.mlp(b.ln_2(y)))

    def tail(self, t):
        t = self.v.ln_post(t)
        return t @ self.v.proj if self.v.proj is not None else t


class _TimmViT(_Arch):
    """timm ``VisionTransformer`` (DINO, DINOv2 with or without registers, SigLIP trunk, tiny_vit):
    patch_embed, cls/reg tokens, pos_embed, norm_pre, blocks (norm1, attn.qkv / attn.proj, ls1), norm,
    attn_pool or token pooling, fc_norm, head. ``pre_logits``: stop before ``head`` (what the registry's
    ``embed`` layer returns for timm models); ``outer``: a module applied after (open_clip TimmModel.head)."""

    def __init__(self, vit: nn.Module, pre_logits: bool, outer: nn.Module | None = None):
        last = vit.blocks[-1]
        attn = getattr(last, "attn", None)
        if type(attn).__name__ != "Attention" or not hasattr(attn, "qkv") or getattr(attn, "gate", None) is not None:
            raise ValueError(f"timm last block's attention is {type(attn).__name__}, dense features need timm "
                             f"Attention (fused qkv, proj)")
        if not all(hasattr(last, a) for a in ("norm1", "ls1", "norm2", "mlp", "ls2")):
            raise ValueError(f"timm last block {type(last).__name__} is not a pre-norm Block "
                             f"(norm1, attn, ls1, norm2, mlp, ls2)")
        pool = getattr(vit, "attn_pool", None)
        if pool is not None and getattr(pool, "pos_embed", None) is not None:
            raise ValueError("timm attention-pool head with its own positional embedding is not supported")
        if getattr(vit, "pos_embed", None) is None:
            raise ValueError("timm ViT without absolute positional embeddings (e.g. RoPE) is not supported")
        self.vit, self.last, self.attn = vit, last, attn
        self.pre_logits, self.outer = pre_logits, outer
        self.n_prefix = int(vit.num_prefix_tokens)
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.native_grid = tuple(int(g) for g in vit.patch_embed.grid_size)

    def embed_tokens(self, images):
        vit = self.vit
        x = vit.patch_embed.proj(images)
        h, w = x.shape[-2:]
        x = vit.patch_embed.norm(x.flatten(2).transpose(1, 2))
        prefix = []
        if vit.cls_token is not None:
            prefix.append(vit.cls_token.expand(x.shape[0], -1, -1))
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(x.shape[0], -1, -1))
        n_pos_prefix = 0 if vit.no_embed_class else self.n_prefix
        pos = _resample_pos(vit.pos_embed, (h, w), self.native_grid, n_pos_prefix).to(x.dtype)
        if vit.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
        return vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))

    def run_blocks(self, x):
        for blk in self.vit.blocks[:-1]:
            x = blk(x)
        return x

    def norm1(self, x):
        return self.last.norm1(x)

    def qkv(self, y):
        a = self.attn
        n, L, _ = y.shape
        q, k, v = a.qkv(y).reshape(n, L, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return a.q_norm(q), a.k_norm(k), v, float(a.scale)

    def attn_out(self, o):
        a = self.attn
        return self.last.ls1(a.proj(a.norm(_merge_heads(o))))

    def mlp_residual(self, y):
        b = self.last
        return y + b.ls2(b.mlp(b.norm2(y)))  # drop_path2: identity in eval

    def tail(self, t):
        vit = self.vit
        t = vit.norm(t)
        if vit.attn_pool is not None:
            t = vit.attn_pool(t[:, None, :])  # each token alone: a one-token sequence (see module doc)
        t = vit.head_drop(vit.fc_norm(t))
        if not self.pre_logits:
            t = vit.head(t)
        return self.outer(t) if self.outer is not None else t


def _arch_of(model: nn.Module) -> _Arch:
    """The ViT inside a registry model (open_clip CLIP, open_clip TimmModel trunk, timm ViT)."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    visual = getattr(model, "visual", None)
    if visual is not None:  # an open_clip CLIP (both towers)
        if hasattr(visual, "transformer") and hasattr(visual, "conv1"):
            return _OpenClipViT(visual)
        trunk = getattr(visual, "trunk", None)
        if isinstance(trunk, TimmViT):
            head = getattr(visual, "head", None)
            if head is not None and hasattr(head, "pool"):  # abs_attn / rot_attn pooling over a 2-D map
                raise ValueError("open_clip TimmModel with a custom attention pool in its head is not supported")
            return _TimmViT(trunk, pre_logits=False, outer=head)
        raise ValueError(f"open_clip image tower {type(visual).__name__} is not a ViT: dense features need one")
    if isinstance(model, TimmViT):
        return _TimmViT(model, pre_logits=True)
    if hasattr(model, "transformer") and hasattr(model, "conv1") and hasattr(model, "ln_post"):
        return _OpenClipViT(model)  # a bare open_clip VisionTransformer
    raise ValueError(f"{type(model).__name__} is not a ViT: dense features need a ViT backbone")


# ----------------------------------------------------------------------------- the dense forward


def default_method(backbone) -> str:
    """BrainSAIL's choice: NACLIP for CLIP ViTs (a CLS token and no registers), MaskCLIP otherwise
    (DINOv2 / SigLIP, whose registers or attention pooling were not tried with NACLIP's CSA)."""
    spec = getattr(backbone, "spec", None)
    name = str(getattr(spec, "name", "")).lower()  # presets ("clip_vitb16") and families ("open_clip:ViT-B-16-SigLIP/webli")
    return "naclip" if "clip" in name and "siglip" not in name else "maskclip"


class DenseFeatures:
    """A ViT's dense patch features in its image-embedding space (see the module doc).

    model: an open_clip CLIP / VisionTransformer, an open_clip CLIP whose image tower is a timm trunk
    (SigLIP), or a timm VisionTransformer; frozen by the caller. method: maskclip | naclip.
    sigma: NACLIP's Gaussian σ in patches. image_size: input side in pixels (None: the native size);
    transform: optional uint8 image -> (3, S, S) preprocessing (FrozenBackbone's, rebuilt at image_size).
    Calling it: images (n, 3, H, W) -> (n, H/p, W/p, embed_dim) float32 (on the model's device).
    """

    def __init__(self, model: nn.Module, method: str = "maskclip", sigma: float = 5.0,
                 image_size: int | None = None, transform: Callable | None = None):
        if method not in METHODS:
            raise ValueError(f"dense method must be one of {METHODS}, got {method!r}")
        self.model, self.method, self.sigma = model, method, float(sigma)
        if method == "naclip" and self.sigma <= 0:
            raise ValueError(f"NACLIP sigma must be > 0, got {sigma}")
        self.arch = _arch_of(model)
        self.patch_size = self.arch.patch_size
        self.native_size = self.arch.native_grid[0] * self.patch_size
        self.image_size = int(image_size) if image_size else self.native_size
        if self.image_size % self.patch_size:
            raise ValueError(f"dense image_size {self.image_size} is not a multiple of the patch size "
                             f"{self.patch_size}")
        self.grid = self.image_size // self.patch_size
        self.transform = transform
        self._bias: dict[tuple[int, int], torch.Tensor] = {}

    def _omega(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        if (h, w) not in self._bias:
            self._bias[(h, w)] = gaussian_bias(h, w, self.sigma, self.arch.n_prefix)
        return self._bias[(h, w)].to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (n, 3, H, W) normalised -> (n, H/p, W/p, embed_dim) float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (n, 3, H, W), got {tuple(images.shape)}")
        p = self.patch_size
        if images.shape[-2] % p or images.shape[-1] % p:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the patch size {p}")
        param = next(self.model.parameters())
        images = images.to(device=param.device, dtype=param.dtype)
        h, w = images.shape[-2] // p, images.shape[-1] // p
        arch = self.arch
        x = arch.run_blocks(arch.embed_tokens(images))
        q, k, v, scale = arch.qkv(arch.norm1(x))
        if self.method == "maskclip":  # the block as trained, attention -> value path
            out = arch.mlp_residual(x + arch.attn_out(v))
        else:
            kf = k.float()  # softmax(k·kᵀ·scale + ω) v, memory-efficient kernel
            o = F.scaled_dot_product_attention(kf, kf, v.float(), attn_mask=self._omega(h, w, k.device),
                                               scale=scale).to(v.dtype)
            out = arch.attn_out(o)  # NACLIP: no residual, no FFN
        out = out[:, arch.n_prefix:]
        n, L, d = out.shape
        emb = arch.tail(out.reshape(n * L, d))
        return emb.reshape(n, h, w, -1).float()


def dense_features(backbone, method: str | None = None, sigma: float = 5.0,
                   image_size: int | None = None) -> DenseFeatures:
    """DenseFeatures of a FrozenBackbone (its wrapped ``model``), with its preprocessing at ``image_size``.

    method None: ``default_method(backbone)``. ValueError (one line) for a backbone that is not a ViT.
    """
    from encoders.backbones import ImageTransform

    spec = backbone.spec
    try:
        dense = DenseFeatures(backbone.model, method or default_method(backbone), sigma, image_size)
    except ValueError as err:
        raise ValueError(f"backbone '{spec.name}': {err}") from None
    dense.transform = ImageTransform(dense.image_size, spec.mean, spec.std, spec.interpolation)
    return dense

