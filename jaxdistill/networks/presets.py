"""Constructor settings (kwargs dicts) for the networks: EDM's published models and tiny test nets.

The EDM presets reproduce NVlabs/edm `train.py` (`--arch=ddpmpp|ncsnpp|adm` switches, `--dropout`
default 0.13, `--augment` > 0 sets augment_dim=9) on top of the `SongUNet` / `DhariwalUNet`
defaults in `training/networks.py`; ImageNet-64 ADM follows the EDM README command line
(`--arch=adm --dropout=0.10 --augment=0`).  Use as `SongUNet(**ddpmpp_cifar10())`.

Trainable parameter counts (checked in tests/test_networks.py against the official networks):
ddpmpp_cifar10() 55,733,891; ddpmpp_cifar10(label_dim=10) 55,735,299; ncsnpp_cifar10() 56,397,827;
adm_imagenet64() 295,899,267.
"""
from __future__ import annotations


def _cifar10_songunet(label_dim: int, augment_dim: int) -> dict:
    return dict(img_resolution=32, in_channels=3, out_channels=3, label_dim=label_dim,
                augment_dim=augment_dim, model_channels=128, channel_mult=(2, 2, 2),
                channel_mult_emb=4, num_blocks=4, attn_resolutions=(16,), dropout=0.13,
                remat=False)


def ddpmpp_cifar10(label_dim: int = 0, augment_dim: int = 9) -> dict:
    """EDM's DDPM++ for CIFAR-10 32x32 (label_dim=10 for the class-conditional model)."""
    return dict(_cifar10_songunet(label_dim, augment_dim), embedding_type="positional",
                channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                resample_filter=(1, 1))


def ncsnpp_cifar10(label_dim: int = 0, augment_dim: int = 9) -> dict:
    """EDM's NCSN++ for CIFAR-10 32x32 (Fourier embedding, residual encoder, [1,3,3,1] filter)."""
    return dict(_cifar10_songunet(label_dim, augment_dim), embedding_type="fourier",
                channel_mult_noise=2, encoder_type="residual", decoder_type="standard",
                resample_filter=(1, 3, 3, 1))


def adm_imagenet64(label_dim: int = 1000) -> dict:
    """EDM's ADM for class-conditional ImageNet 64x64 (no augmentation)."""
    return dict(img_resolution=64, in_channels=3, out_channels=3, label_dim=label_dim,
                augment_dim=0, model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4,
                num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10, remat=False)


def tiny_songunet(img_resolution: int = 16, in_channels: int = 1, label_dim: int = 0,
                  **overrides) -> dict:
    """A ~45k-parameter DDPM++ (8/16 channels, two levels, one block each, attention at the
    lowest resolution).

    Cheap to jit on CPU; every SongUNet code path stays reachable through `overrides`
    (e.g. embedding_type='fourier', encoder_type='residual', decoder_type='skip').
    Dropout defaults to 0 so tiny teachers/students are deterministic unless asked.
    """
    kwargs = dict(img_resolution=img_resolution, in_channels=in_channels,
                  out_channels=in_channels, label_dim=label_dim, augment_dim=0,
                  model_channels=8, channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1,
                  attn_resolutions=(img_resolution // 2,), dropout=0.0,
                  embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                  decoder_type="standard", resample_filter=(1, 1), remat=False)
    kwargs.update(overrides)
    return kwargs


def tiny_dhariwal(img_resolution: int = 16, in_channels: int = 1, label_dim: int = 0,
                  **overrides) -> dict:
    """A ~48k-parameter ADM (8/16 channels, two levels, one block each, attention at the lowest
    level, 8 channels per head).

    channels_per_head=8 so the 16-channel blocks still get attention heads (EDM's 64 would give
    none).  Dropout defaults to 0.
    """
    kwargs = dict(img_resolution=img_resolution, in_channels=in_channels,
                  out_channels=in_channels, label_dim=label_dim, augment_dim=0,
                  model_channels=8, channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1,
                  attn_resolutions=(img_resolution // 2,), dropout=0.0, channels_per_head=8,
                  remat=False)
    kwargs.update(overrides)
    return kwargs
