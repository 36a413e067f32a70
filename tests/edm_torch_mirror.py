"""Small PyTorch networks with NVlabs/edm's module, parameter and attribute names, pickled the way
EDM's snapshots are (a dict with 'ema', each network object saved through a
`torch_utils.persistence`-style reduce), for the converter tests.

Written for these tests from the structure of NVlabs/edm training/networks.py (Linear, Conv2d,
GroupNorm, UNetBlock, PositionalEmbedding, FourierEmbedding, SongUNet, DhariwalUNet, EDMPrecond)
and torch_utils/persistence.py (`__reduce__` -> `_reconstruct_persistent_obj(meta)`).  Unlike EDM,
every parameter is drawn at random with O(1) effect (EDM initialises several layers at or near zero,
which would hide mapping errors), and only the code paths EDM's released networks use are mirrored.
The pickled module source is a line that raises, so a loader that executed it would fail.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import pickle
import sys
import types

import numpy as np
import torch
from torch import nn

STORED_SOURCE = "raise RuntimeError('the stored module source must never be executed')\n"


def _reconstruct_persistent_obj(meta):  # the name the pickle records; never called in tests
    raise RuntimeError("the test pickles are read by jaxdistill's restricted unpickler only")


class EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access)."""


@contextlib.contextmanager
def edm_modules():
    """Registers `torch_utils.persistence` and `dnnlib.util` so pickle can name their objects."""
    fake = {"torch_utils": types.ModuleType("torch_utils"),
            "torch_utils.persistence": types.ModuleType("torch_utils.persistence"),
            "dnnlib": types.ModuleType("dnnlib"), "dnnlib.util": types.ModuleType("dnnlib.util")}
    fake["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    fake["dnnlib.util"].EasyDict = EasyDict
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    EasyDict.__module__ = "dnnlib.util"
    saved = {name: sys.modules.get(name) for name in fake}
    sys.modules.update(fake)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


def persistent(cls):
    """Records the init kwargs and pickles instances as persistence's reconstruct call."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, **kwargs):
        init(self, **kwargs)
        self._init_args = ()
        self._init_kwargs = copy.deepcopy(kwargs)

    def __reduce__(self):
        meta = dict(type="class", version=6, module_src=STORED_SOURCE, class_name=cls.__name__,
                    state=dict(self.__dict__))
        return _reconstruct_persistent_obj, (meta,), None

    cls.__init__ = __init__
    cls.__reduce__ = __reduce__
    return cls


def _weight(*shape, fan_in):
    return nn.Parameter(torch.randn(*shape) / math.sqrt(fan_in))


def _bias(n):
    return nn.Parameter(torch.randn(n) * 0.1)


@persistent
class Linear(nn.Module):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _weight(out_features, in_features, fan_in=in_features)
        self.bias = _bias(out_features) if bias else None

    def forward(self, x):
        x = x @ self.weight.t()
        return x + self.bias if self.bias is not None else x


@persistent
class Conv2d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), fused_resample=False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        self.weight = (_weight(out_channels, in_channels, kernel, kernel,
                               fan_in=in_channels * kernel * kernel) if kernel else None)
        self.bias = _bias(out_channels) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum() ** 2
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        w, f = self.weight, self.resample_filter
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        F = nn.functional
        if self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.repeat(self.out_channels, 1, 1, 1), groups=self.out_channels,
                         stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).repeat(self.in_channels, 1, 1, 1),
                                       groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.repeat(self.in_channels, 1, 1, 1), groups=self.in_channels,
                             stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        return x + self.bias[None, :, None, None] if self.bias is not None else x


@persistent
class GroupNorm(nn.Module):
    def __init__(self, num_channels, eps=1e-5):
        super().__init__()
        self.num_groups = min(32, num_channels // 4)
        self.eps = eps
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(num_channels))
        self.bias = _bias(num_channels)

    def forward(self, x):
        return nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


@persistent
class UNetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False,
                 attention=False, num_heads=None, channels_per_head=64, skip_scale=1.0, eps=1e-5,
                 resample_filter=(1, 1), resample_proj=False, adaptive_scale=True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = (0 if not attention else num_heads if num_heads is not None
                          else out_channels // channels_per_head)
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up,
                            down=down, resample_filter=resample_filter)
        self.affine = Linear(in_features=emb_channels,
                             out_features=out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel,
                               up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1)
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1)

    def forward(self, x, emb):
        silu = nn.functional.silu
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        p = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = p.chunk(2, dim=1)
            x = silu(shift + self.norm1(x) * (scale + 1))
        else:
            x = silu(self.norm1(x + p))
        x = self.conv1(x)
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            n, c, h, w = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1)
            q, k, v = qkv.unbind(2)
            weights = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(dim=2)
            a = torch.einsum("nqk,nck->ncq", weights, v).reshape(n, c, h, w)
            x = (self.proj(a) + x) * self.skip_scale
        return x


@persistent
class PositionalEmbedding(nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32) / (half - (1 if self.endpoint else 0))
        x = torch.outer(x, (1 / self.max_positions) ** freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistent
class FourierEmbedding(nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, 2 * np.pi * self.freqs)
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistent
class SongUNet(nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=(16,), dropout=0.10, label_dropout=0,
                 embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                 decoder_type="standard", resample_filter=(1, 1)):
        super().__init__()
        assert encoder_type in ("standard", "residual") and decoder_type == "standard"
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = functools.partial(UNetBlock, emb_channels=emb_channels, num_heads=1,
                                  skip_scale=np.sqrt(0.5), eps=1e-6,
                                  resample_filter=resample_filter, resample_proj=True,
                                  adaptive_scale=False)
        self.map_noise = (PositionalEmbedding(num_channels=noise_channels, endpoint=True)
                          if embedding_type == "positional"
                          else FourierEmbedding(num_channels=noise_channels))
        self.map_label = (Linear(in_features=label_dim, out_features=noise_channels)
                          if label_dim else None)
        self.map_augment = (Linear(in_features=augment_dim, out_features=noise_channels,
                                   bias=False) if augment_dim else None)
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels=cin, out_channels=cout,
                                                       kernel=3)
            else:
                self.enc[f"{res}x{res}_down"] = block(in_channels=cout, out_channels=cout,
                                                      down=True)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        in_channels=caux, out_channels=cout, kernel=3, down=True,
                        resample_filter=resample_filter, fused_resample=True)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = block(
                    in_channels=cin, out_channels=cout, attention=res in attn_resolutions)
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(in_channels=cout, out_channels=cout,
                                                     attention=True)
                self.dec[f"{res}x{res}_in1"] = block(in_channels=cout, out_channels=cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(in_channels=cout, out_channels=cout, up=True)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = block(
                    in_channels=cin, out_channels=cout,
                    attention=idx == num_blocks and res in attn_resolutions)
            if level == 0:
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(in_channels=cout,
                                                           out_channels=out_channels, kernel=3)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        silu = nn.functional.silu
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))
        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        out = tmp = None
        for name, block in self.dec.items():
            if "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                out = block(silu(tmp))
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out


@persistent
class DhariwalUNet(nn.Module):
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0):
        super().__init__()
        emb_channels = model_channels * channel_mult_emb
        block = functools.partial(UNetBlock, emb_channels=emb_channels, channels_per_head=64)
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (Linear(in_features=augment_dim, out_features=model_channels,
                                   bias=False) if augment_dim else None)
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels)
        self.map_label = (Linear(in_features=label_dim, out_features=emb_channels, bias=False)
                          if label_dim else None)
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels=cin, out_channels=cout,
                                                       kernel=3)
            else:
                self.enc[f"{res}x{res}_down"] = block(in_channels=cout, out_channels=cout,
                                                      down=True)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = block(
                    in_channels=cin, out_channels=cout, attention=res in attn_resolutions)
        skips = [b.out_channels for b in self.enc.values()]
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(in_channels=cout, out_channels=cout,
                                                     attention=True)
                self.dec[f"{res}x{res}_in1"] = block(in_channels=cout, out_channels=cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(in_channels=cout, out_channels=cout, up=True)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = block(
                    in_channels=cin, out_channels=cout, attention=res in attn_resolutions)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        silu = nn.functional.silu
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        emb = silu(emb)
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))


@persistent
class EDMPrecond(nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet",
                 **model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        model_class = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[model_type]
        self.model = model_class(img_resolution=img_resolution, in_channels=img_channels,
                                 out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.reshape(-1, 1, 1, 1)
        if self.label_dim and class_labels is None:
            class_labels = torch.zeros([1, self.label_dim])
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        f = self.model(c_in * x, (sigma.log() / 4).flatten(), class_labels=class_labels)
        return c_skip * x + c_out * f


@persistent
class EDMLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data


def save_edm_pickle(path, net: EDMPrecond) -> None:
    """Writes `net` in the layout of EDM's network-snapshot-*.pkl (training_loop.py)."""
    data = dict(ema=net.eval().requires_grad_(False), loss_fn=EDMLoss(),
                augment_pipe=None,
                dataset_kwargs=EasyDict(class_name="training.dataset.ImageFolderDataset",
                                        path="datasets/tiny.zip", use_labels=net.label_dim > 0))
    with edm_modules(), open(path, "wb") as f:
        pickle.dump(data, f)
