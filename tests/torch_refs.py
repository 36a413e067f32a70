"""PyTorch references for CTM's pretrained GAN backbones, with timm's parameter names and torch's
own ops (imported only by tests; torch is in the test extra).

They follow timm (`vision_transformer.py` Block/Attention, `_efficientnet_blocks.py`,
`layers/padding.py` pad_same / Conv2dSame) and sony/ctm (`feature_networks/vit.py` hooks, Slice
readout and act_postprocess; `pretrained_builder.py` _make_efficientnet taps; `cm/enc_dec_lib.py`
get_feature input preparation); their structure is written out here, not taken from jaxdistill.
"""
import math

import numpy as np
import torch

nn = torch.nn
F = torch.nn.functional

# ------------------------------------------------------------------------------------------------
# DeiT reference (timm names; tiny: width 32, 4 heads, 8x8 patches on 32x32 -> a 4x4 grid)

D_WIDTH, D_HEADS, D_PATCH, D_SIZE, D_DEPTH, D_HOOKS = 32, 4, 8, 32, 6, (1, 2, 4, 5)


class TAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (c // self.num_heads) ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class TMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), TAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), TMlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TPatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)


class TDeiT(nn.Module):
    """timm VisionTransformerDistilled layout (incl. final norm and both heads, unused by CTM)."""

    def __init__(self):
        super().__init__()
        grid = D_SIZE // D_PATCH
        self.cls_token = nn.Parameter(torch.randn(1, 1, D_WIDTH) * 0.02)
        self.dist_token = nn.Parameter(torch.randn(1, 1, D_WIDTH) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 2, D_WIDTH) * 0.02)
        self.patch_embed = TPatchEmbed(D_WIDTH, D_PATCH)
        self.blocks = nn.ModuleList([TBlock(D_WIDTH, D_HEADS) for _ in range(D_DEPTH)])
        self.norm = nn.LayerNorm(D_WIDTH, eps=1e-6)
        self.head, self.head_dist = nn.Linear(D_WIDTH, 10), nn.Linear(D_WIDTH, 10)


class TDeiTFeatures(nn.Module):
    """sony/ctm forward_vit: hooks on block outputs, Slice(2), unflatten, act_postprocess."""

    def __init__(self, model):
        super().__init__()
        self.model, grid, w = model, D_SIZE // D_PATCH, D_WIDTH
        self.unflatten = nn.Unflatten(2, torch.Size([grid, grid]))
        self.layer1 = nn.Sequential(nn.Conv2d(w, w // 8, 1), nn.ConvTranspose2d(w // 8, w // 8, 4, 4))
        self.layer2 = nn.Sequential(nn.Conv2d(w, w // 4, 1), nn.ConvTranspose2d(w // 4, w // 4, 2, 2))
        self.layer3 = nn.Sequential(nn.Conv2d(w, w // 2, 1))
        self.layer4 = nn.Sequential(nn.Conv2d(w, w, 1), nn.Conv2d(w, w, 3, stride=2, padding=1))

    def forward(self, x):
        m, acts = self.model, []
        hooks = [m.blocks[h].register_forward_hook(lambda mod, i, o: acts.append(o)) for h in D_HOOKS]
        t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([m.cls_token.expand(len(x), -1, -1), m.dist_token.expand(len(x), -1, -1), t], 1)
        t = t + m.pos_embed
        for blk in m.blocks:
            t = blk(t)
        m.norm(t)
        for h in hooks:
            h.remove()
        grids = [self.unflatten(a[:, 2:].transpose(1, 2)) for a in acts]
        return [layer(g) for layer, g in zip((self.layer1, self.layer2, self.layer3, self.layer4), grids)]


# ------------------------------------------------------------------------------------------------
# tf_efficientnet_lite0 reference (timm names; tiny: channel multiplier 0.25, depth 0.5)


def pad_same(x, k, s):
    """timm layers/padding.py pad_same for dilation 1: TF 'SAME' padding, extra after."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class Conv2dSame(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(pad_same(x, self.kernel_size[0], self.stride[0]), self.weight, None,
                        self.stride, 0, 1, self.groups)


def tconv(cin, cout, k, s=1, groups=1):
    """timm create_conv2d(padding='same'): static symmetric padding at stride 1, dynamic else."""
    if s == 1:
        return nn.Conv2d(cin, cout, k, 1, (k - 1) // 2, groups=groups, bias=False)
    return Conv2dSame(cin, cout, k, s, 0, groups=groups, bias=False)


def tbn(c):
    bn = nn.BatchNorm2d(c, eps=1e-3)
    with torch.no_grad():  # non-trivial running statistics and affine params
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


class TDs(nn.Module):
    def __init__(self, cin, cout, k, s):
        super().__init__()
        self.conv_dw, self.bn1 = tconv(cin, cin, k, s, cin), tbn(cin)
        self.conv_pw, self.bn2 = tconv(cin, cout, 1), tbn(cout)
        self.skip = s == 1 and cin == cout

    def forward(self, x):
        h = self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)))))
        return x + h if self.skip else h


class TIr(nn.Module):
    def __init__(self, cin, cout, k, s, e):
        super().__init__()
        mid = cin * e
        self.conv_pw, self.bn1 = tconv(cin, mid, 1), tbn(mid)
        self.conv_dw, self.bn2 = tconv(mid, mid, k, s, mid), tbn(mid)
        self.conv_pwl, self.bn3 = tconv(mid, cout, 1), tbn(cout)
        self.skip = s == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self.bn1(self.conv_pw(x)))
        h = F.relu6(self.bn2(self.conv_dw(h)))
        h = self.bn3(self.conv_pwl(h))
        return x + h if self.skip else h


# timm channels for multiplier 0.25 (make_divisible(c * 0.25, 8), +8 when rounding lost > 10%):
# 16->8, 24->8, 40->16, 80->24, 112->32, 192->48, 320->80; repeats ceil(r * 0.5) except the
# first and last stage.  (type, repeats, kernel, stride, out)
TINY_EFFNET = [("ds", 1, 3, 1, 8), ("ir", 1, 3, 2, 8), ("ir", 1, 5, 2, 16), ("ir", 2, 3, 2, 24),
               ("ir", 2, 5, 1, 32), ("ir", 2, 5, 2, 48), ("ir", 1, 3, 1, 80)]


class TEffNet(nn.Module):
    """timm EfficientNet layout (incl. conv_head / bn2 / classifier, unused by CTM)."""

    def __init__(self):
        super().__init__()
        self.conv_stem, self.bn1 = tconv(3, 32, 3, 2), tbn(32)
        stages, cin = [], 32
        for kind, r, k, s, cout in TINY_EFFNET:
            blocks = []
            for j in range(r):
                stride = s if j == 0 else 1
                blocks.append(TDs(cin, cout, k, stride) if kind == "ds" else TIr(cin, cout, k, stride, 6))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head, self.bn2 = tconv(cin, 64, 1), tbn(64)
        self.classifier = nn.Linear(64, 10)

    def features(self, x):
        """sony/ctm _make_efficientnet: stem + blocks[0:2], blocks[2:3], blocks[3:5], blocks[5:]."""
        x = F.relu6(self.bn1(self.conv_stem(x)))
        out = []
        for a, b in ((0, 2), (2, 3), (3, 5), (5, 7)):
            for stage in self.blocks[a:b]:
                x = stage(x)
            out.append(x)
        return out


# ------------------------------------------------------------------------------------------------
# Fixtures: reference models, their files, the library's backbones built from a config


def save(model, directory, name):
    state = model.state_dict()
    pth, npz = str(directory / f"{name}.pth"), str(directory / f"{name}.npz")
    torch.save(state, pth)
    np.savez(npz, **{k: v.numpy() for k, v in state.items()})
    return pth, npz


def copy_readouts_to_torch(postprocess, tfeat):
    """Our random frozen readout convs into the torch reference's act_postprocess layers."""
    t = lambda a, perm: torch.from_numpy(np.array(np.transpose(np.asarray(a), perm)))  # noqa: E731
    layers = (tfeat.layer1, tfeat.layer2, tfeat.layer3, tfeat.layer4)
    with torch.no_grad():
        for j, layer in enumerate(layers):
            p = postprocess[f"readout_{j}"]
            layer[0].weight.copy_(t(p["proj_kernel"], (1, 0))[:, :, None, None])
            layer[0].bias.copy_(t(p["proj_bias"], (0,)))
            if "up_kernel" in p:      # ours (a, b, in, out) -> torch ConvTranspose (in, out, a, b)
                layer[1].weight.copy_(t(p["up_kernel"], (2, 3, 0, 1)))
                layer[1].bias.copy_(t(p["up_bias"], (0,)))
            if "down_kernel" in p:    # HWIO -> OIHW
                layer[1].weight.copy_(t(p["down_kernel"], (3, 2, 0, 1)))
                layer[1].bias.copy_(t(p["down_bias"], (0,)))


def torch_prepare(x_nhwc, mean, std, size):
    """sony/ctm get_feature: [-1, 1] -> [0, 1] -> Normalize -> bilinear (align_corners=False)."""
    x = (torch.from_numpy(np.asarray(x_nhwc)).permute(0, 3, 1, 2) + 1) / 2
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


def max_err(ours, theirs):
    return max(float(np.max(np.abs(np.asarray(a) - b.detach().permute(0, 2, 3, 1).numpy())))
               for a, b in zip(ours, theirs))

