"""Dense patch features (MaskCLIP / NACLIP last block) and their learning-free distillation, on tiny random ViTs."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist
from torch import nn

from encoders.backbones import build_backbone
from encoders.dense import DenseFeatures, dense_features, gaussian_bias
from encoders.distill import View, apply_view, distill, distill_batches, make_views, source_index


def _jitter_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random LayerNorm affine parameters, so that a skipped or misplaced norm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def open_clip_vit(seed=0):
    from open_clip.transformer import VisionTransformer
    torch.manual_seed(seed)
    return _jitter_norms(VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2,
                                           output_dim=16), seed)


def timm_vit(seed=0, **kw):
    """DINOv2-with-registers-like: CLS + 2 registers, pos_embed on patches only, LayerScale."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=0,
                reg_tokens=2, no_embed_class=True, init_values=0.5, global_pool="token")
    return _jitter_norms(VisionTransformer(**{**args, **kw}), seed)


def last_block_input(model, blocks, run, x):
    """The input of the last block during the model's own forward."""
    seen = {}
    handle = blocks[-1].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        run(x)
    handle.remove()
    return seen["x"]


def self_only_mask(L):
    """Additive mask letting each token attend only to itself: attention then returns out_proj(v)."""
    return torch.full((L, L), float("-inf")).fill_diagonal_(0.0)


# ----------------------------------------------------------------------------- dense features


def test_maskclip_is_the_last_block_with_the_value_path_open_clip():
    """MaskCLIP's reference (and BrainSAIL): only the last block's attention becomes the value path; its residual
    and MLP stay. Reference: open_clip's own ResidualAttentionBlock, each token attending to itself only (softmax
    over one key = 1, so its attention returns out_proj(v)), then the model's ln_post and proj."""
    vit = open_clip_vit()
    x = torch.randn(3, 3, 32, 32)
    tokens = last_block_input(vit, vit.transformer.resblocks, vit, x)
    blk = vit.transformer.resblocks[-1]
    with torch.no_grad():
        block_out = blk(tokens, attn_mask=self_only_mask(tokens.shape[1]))  # the whole block, as trained
        expected = (vit.ln_post(block_out) @ vit.proj)[:, 1:].reshape(3, 4, 4, 16)
        y = blk.ln_1(tokens)  # the same by hand: y = x + ls_1(out_proj(v)); y + ls_2(mlp(ln_2(y)))
        v = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, -1)[2]
        by_hand = tokens + blk.ls_1(blk.attn.out_proj(v))
        by_hand = by_hand + blk.ls_2(blk.mlp(blk.ln_2(by_hand)))
        torch.testing.assert_close(by_hand, block_out, atol=1e-5, rtol=1e-4)
        value_only = (vit.ln_post(blk.attn.out_proj(v)) @ vit.proj)[:, 1:].reshape(3, 4, 4, 16)
    got = DenseFeatures(vit, "maskclip")(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, (vit.ln_post(blk(tokens)) @ vit.proj)[:, 1:].reshape(3, 4, 4, 16), atol=1e-3)
    assert not torch.allclose(got, value_only, atol=1e-2)  # what it was before: no residual, no MLP


def test_maskclip_is_the_last_block_with_the_value_path_timm_with_registers():
    vit = timm_vit()
    x = torch.randn(2, 3, 32, 32)
    tokens = last_block_input(vit, vit.blocks, vit.forward_features, x)
    blk = vit.blocks[-1]
    with torch.no_grad():  # timm's own Block (LayerScale ls1, ls2) with a self-only mask, then norm, fc_norm
        block_out = blk(tokens, attn_mask=self_only_mask(tokens.shape[1]))
        expected = vit.fc_norm(vit.norm(block_out))[:, 3:].reshape(2, 4, 4, 32)
    torch.testing.assert_close(DenseFeatures(vit, "maskclip")(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["open_clip", "timm"])
def test_naclip_is_key_key_attention_with_a_gaussian_bias(family):
    sigma = 1.5
    vit = open_clip_vit(1) if family == "open_clip" else timm_vit(1)
    x = torch.randn(2, 3, 32, 32)
    n_prefix = 1 if family == "open_clip" else 3
    blocks = vit.transformer.resblocks if family == "open_clip" else vit.blocks
    tokens = last_block_input(vit, blocks, vit if family == "open_clip" else vit.forward_features, x)
    blk = blocks[-1]
    grid = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1).reshape(-1, 2)
    omega = np.zeros((n_prefix + 16, n_prefix + 16))
    omega[n_prefix:, n_prefix:] = np.exp(-cdist(grid, grid, "sqeuclidean") / (2 * sigma ** 2))
    torch.testing.assert_close(gaussian_bias(4, 4, sigma, n_prefix), torch.tensor(omega, dtype=torch.float32))
    with torch.no_grad():
        if family == "open_clip":
            y = blk.ln_1(tokens)
            _, k, v = F.linear(y, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, -1)
        else:
            y = blk.norm1(tokens)
            _, k, v = blk.attn.qkv(y).chunk(3, -1)
        k, v = (t.reshape(2, -1, 2, 16).transpose(1, 2) for t in (k, v))
        logits = k @ k.transpose(-2, -1) / np.sqrt(16) + torch.tensor(omega, dtype=torch.float32)
        o = torch.softmax(logits, dim=-1) @ v
        o = o.transpose(1, 2).reshape(2, -1, 32)
        if family == "open_clip":
            expected = vit.ln_post(blk.attn.out_proj(o)) @ vit.proj
        else:
            expected = vit.fc_norm(vit.norm(blk.ls1(blk.attn.proj(o))))
    expected = expected[:, n_prefix:].reshape(2, 4, 4, -1)
    torch.testing.assert_close(DenseFeatures(vit, "naclip", sigma=sigma)(x), expected, atol=1e-5, rtol=1e-4)


def test_tokens_and_tail_are_the_models_own():
    """The token pipeline reproduces the model's forward; its tail maps the CLS token to the image embedding,
    so patch features live where the head was trained (the registry's ``embed`` layer)."""
    for name in ("tiny_vit", "tiny_clip"):
        torch.manual_seed(0)
        bb = build_backbone(name, layers=["embed"])
        arch = dense_features(bb).arch
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            last = arch.last(arch.run_blocks(arch.embed_tokens(x)))
            torch.testing.assert_close(arch.tail(last[:, 0]), bb(x), atol=1e-5, rtol=1e-4)


def test_positional_embeddings_are_interpolated_like_timm_dynamic_size():
    from timm.models.vision_transformer import VisionTransformer
    vit = timm_vit(2)
    dyn = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, num_classes=0,
                            reg_tokens=2, no_embed_class=True, init_values=0.5, dynamic_img_size=True).eval()
    dyn.load_state_dict(vit.state_dict())
    dense = DenseFeatures(vit, "maskclip", image_size=64)
    x = torch.randn(1, 3, 64, 64)
    arch = dense.arch
    with torch.no_grad():
        ours = vit.norm(arch.last(arch.run_blocks(arch.embed_tokens(x))))
        torch.testing.assert_close(ours, dyn.forward_features(x), atol=1e-5, rtol=1e-4)
    assert dense(x).shape == (1, 8, 8, 32) and dense.grid == 8
    oc = DenseFeatures(open_clip_vit(), "naclip", image_size=48)
    assert oc(torch.randn(1, 3, 48, 48)).shape == (1, 6, 6, 16)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        DenseFeatures(vit, image_size=36)


def test_attention_pool_head_sees_each_patch_alone():
    """SigLIP-like timm trunk (no CLS, ``attn_pool``): a one-token pool is proj(v) + MLP residual."""
    vit = timm_vit(3, class_token=False, reg_tokens=0, no_embed_class=False, global_pool="map", init_values=None)
    x = torch.randn(2, 3, 32, 32)
    tokens = last_block_input(vit, vit.blocks, vit.forward_features, x)
    blk, pool = vit.blocks[-1], vit.attn_pool
    with torch.no_grad():
        t = vit.norm(blk(tokens, attn_mask=self_only_mask(16)))  # MaskCLIP's last block, then the trunk's norm
        v = pool.kv(t).chunk(2, -1)[1]
        p = pool.proj(v)
        expected = vit.fc_norm(p + pool.mlp(pool.norm(p))).reshape(2, 4, 4, 32)
    torch.testing.assert_close(DenseFeatures(vit, "maskclip")(x), expected, atol=1e-5, rtol=1e-4)


def test_non_vit_backbones_are_refused():
    with pytest.raises(ValueError, match="backbone 'tiny'.*not a ViT"):
        dense_features(build_backbone("tiny"))
    with pytest.raises(ValueError, match="maskclip"):
        DenseFeatures(timm_vit(), method="gradcam")


# ----------------------------------------------------------------------------- distillation


def test_views_cover_the_shift_range_evenly():
    views = make_views(51, 3, seed=0)
    assert views[0] == View(0, 0, False) and len(views) == 51
    offsets = [(v.dy, v.dx) for v in views[1:]]
    assert all(max(abs(dy), abs(dx)) <= 3 and (dy, dx) != (0, 0) for dy, dx in offsets)
    counts = np.array([offsets.count((dy, dx)) for dy in range(-3, 4) for dx in range(-3, 4) if (dy, dx) != (0, 0)])
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1  # 48 offsets, 50 views: every one used
    assert 10 < sum(v.flip for v in views) < 41
    assert make_views(51, 3, seed=0) == views and make_views(51, 3, seed=1) != views


def test_source_index_by_hand():
    # 3x3 grid, content moved down 1 and left 1, then mirrored: view (i, j) shows source (i-1, (2-j)+1)
    src = source_index(View(1, -1, True), 3, 3).reshape(3, 3)
    expected = np.array([[-1, -1, -1], [-1, 2, 1], [-1, 5, 4]])
    np.testing.assert_array_equal(src.numpy(), expected)
    img = torch.arange(36.0).reshape(1, 1, 6, 6)  # 2-px patches: the same map at pixel level
    moved = apply_view(img, View(1, -1, True), 2, fill="zero")[0, 0]
    assert moved[2, 2] == img[0, 0, 0, 5] and moved[5, 5] == img[0, 0, 3, 2] and moved[0, 0] == 0


def test_identity_only_distillation_is_the_dense_features():
    torch.manual_seed(0)
    dense = dense_features(build_backbone("tiny_vit", layers=["embed"]))
    x = torch.randn(3, 3, 64, 64)
    raw = dense(x)
    torch.testing.assert_close(distill(dense, x, [View()], 8, normalize=False), raw)
    torch.testing.assert_close(distill(dense, x, [View()], 8), F.normalize(raw, dim=-1))


def equivariant_vit():
    """One block, no positional embedding, a left-right symmetric patch filter: every patch feature depends on
    that patch's pixels alone and not on a mirroring, so shifting/flipping the image moves features exactly."""
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(4)
    vit = _jitter_norms(VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                          num_classes=0), 4)
    with torch.no_grad():
        vit.pos_embed.zero_()
        w = vit.patch_embed.proj.weight
        w.copy_((w + w.flip(-1)) / 2)
    return DenseFeatures(vit, "maskclip")


def test_shifted_image_distills_to_the_shifted_map():
    dense = equivariant_vit()
    views = make_views(13, 2, seed=0)
    a = torch.randn(1, 3, 64, 64)
    k = 2  # patches
    b = torch.randn(1, 3, 64, 64)  # other content in the k columns the shift brings in
    b[..., k * 8:] = a[..., :-k * 8]
    raw = dense(a)
    for v in views[1:4]:  # the views really do see other things at each position
        assert not torch.allclose(dense(apply_view(a, v, 8)), raw, atol=1e-3)
    da, db = distill(dense, a, views, 8), distill(dense, b, views, 8)
    torch.testing.assert_close(da, F.normalize(raw, dim=-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(db[:, :, k:], da[:, :, :-k], atol=1e-5, rtol=1e-4)
    u = torch.randn(32)  # and so the map of any readout
    torch.testing.assert_close((db @ u)[:, :, k:], (da @ u)[:, :, :-k], atol=1e-4, rtol=1e-4)


def test_distillation_batched_over_views_and_streamed_over_images():
    torch.manual_seed(0)
    dense = dense_features(build_backbone("tiny_vit", layers=["embed"]), "naclip", sigma=2.0)
    views = make_views(5, 2, seed=3)
    x = torch.randn(3, 3, 64, 64)
    one_by_one = distill(dense, x, views, 8, view_batch=1)
    torch.testing.assert_close(distill(dense, x, views, 8, view_batch=5), one_by_one, atol=1e-5, rtol=1e-4)
    streamed = torch.cat([f for _, f in distill_batches(dense, [(0, x[:2]), (1, x[2:])], views, 8, view_batch=2)])
    torch.testing.assert_close(streamed, one_by_one, atol=1e-5, rtol=1e-4)
    assert torch.allclose(one_by_one.norm(dim=-1), torch.ones(3, 8, 8), atol=1e-5)
    # the views changed something: the distilled features are not the identity view's
    assert not torch.allclose(one_by_one, distill(dense, x, views[:1], 8), atol=1e-3)
