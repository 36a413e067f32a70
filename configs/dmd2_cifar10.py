"""DMD2 on CIFAR-10 from the EDM DDPM++ teacher.

DMD2 released no CIFAR-10 recipe; this uses DMD2's objective (TTUR 5, GAN 3e-3 / 1e-2 on the fake
score's bottleneck) with DMD's CIFAR-10 settings (arXiv 2311.18828 Appendix B.1: AdamW lr 5e-5,
global batch 392, 300k iterations). `:dmd` / `:dmd_cond` give the original DMD (no TTUR, no GAN,
LPIPS regression weight 0.5 uncond / 0.25 cond on 500k / 100k Heun-18 pairs).

Needs --config.teacher.checkpoint (an EDM run directory or a converted edm-cifar10-32x32-*-vp.pkl),
--config.data.data_dir (tfds cifar10) and, for :dmd*, --config.method.lpips_weights_dir.
"""
from jaxdistill.config import base_config
from jaxdistill.methods.dmd2_config import method_config, optim_config
from jaxdistill.networks import presets

ARGS = ("uncond", "cond", "dmd", "dmd_cond")


def get_config(arg: str = "uncond"):
    if arg not in ARGS:
        raise ValueError(f"configs/dmd2_cifar10.py:ARG takes one of {ARGS}, got {arg!r}")
    label_dim = 10 if arg.endswith("cond") and arg != "uncond" else 0
    c = base_config()
    c.method = method_config(guidance_lr=5e-5)
    if arg.startswith("dmd"):
        c.method.update(dfake_gen_update_ratio=1, gen_gan_weight=0.0, guidance_gan_weight=0.0,
                        regression_weight=0.25 if label_dim else 0.5,
                        regression_pairs=100_000 if label_dim else 500_000,
                        regression_heun_steps=18, distance="lpips")
    teacher_net = dict(name="songunet", **presets.ddpmpp_cifar10(label_dim=label_dim,
                                                                   augment_dim=9))
    c.teacher.kind = "checkpoint"
    c.teacher.network = teacher_net
    c.network = dict(teacher_net, dropout=0.0)
    c.data.update(name="cifar10", random_flip=False)
    c.model.update(shape=(32, 32, 3), label_dim=label_dim)
    c.optim.update(optim_config(batch_size=392, lr=5e-5))
    c.train.update(batch_size=392, num_steps=300_000, log_every=100, ckpt_every=5000,
                   sample_every=5000, num_grid_samples=64)
    c.sample.update(sampler="generator", num_steps=1)
    c.eval.update(num_samples=50_000, batch_size=500)
    return c
