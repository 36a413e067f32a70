"""DMD2 on ImageNet-64 (class-conditional) from the EDM ADM teacher: the official ImageNet recipe
(tianweiy/DMD2 experiments/imagenet/imagenet_gan_classifier_genloss3e-3_diffusion1000_lr2e-6_scratch.sh,
main/edm/train_edm.py; FID 1.51 at 200k iterations, 1.28 after the lr 5e-7 resume).

One-step generator D(80 z; 80) initialised from the teacher; fake score from the teacher; GAN
head on the fake score's 8x8x768 bottleneck; AdamW lr 2e-6 (both), betas (0.9, 0.999), weight
decay 0.01, 500 warm-up updates, clip 10; TTUR 5; GAN weights 3e-3 / 1e-2; global batch 280
(40 x 7 GPUs); no EMA; DM sigmas table[20..980]. `:dmd` gives the original DMD instead (no TTUR, no
GAN, LPIPS regression 0.25 on 25k Heun-256 pairs, batch 336, 350k iterations; DMD Appendix B.2).

Needs --config.teacher.checkpoint (a converted edm-imagenet-64x64-cond-adm.pkl run directory),
--config.data.data_dir (tfds imagenet_resized/64x64) and, for :dmd, --config.method.lpips_weights_dir.
"""
from jaxdistill.config import base_config
from jaxdistill.methods.dmd2_config import method_config, optim_config
from jaxdistill.networks import presets


def get_config(arg: str = "dmd2"):
    if arg not in ("dmd2", "dmd"):
        raise ValueError(f"configs/dmd2_imagenet64.py:ARG takes dmd2 or dmd, got {arg!r}")
    c = base_config()
    batch = 280 if arg == "dmd2" else 336
    c.method = method_config()
    if arg == "dmd":
        c.method.update(dfake_gen_update_ratio=1, gen_gan_weight=0.0, guidance_gan_weight=0.0,
                        regression_weight=0.25, regression_pairs=25_000,
                        regression_heun_steps=256, distance="lpips")
    teacher_net = dict(name="dhariwal", **presets.adm_imagenet64(label_dim=1000))
    c.teacher.kind = "checkpoint"
    c.teacher.network = teacher_net
    c.network = dict(teacher_net, dropout=0.0)
    c.data.update(name="imagenet64", random_flip=False)
    c.model.update(shape=(64, 64, 3), label_dim=1000)
    c.optim.update(optim_config(batch_size=batch, lr=2e-6))
    c.train.update(batch_size=batch, num_steps=400_000 if arg == "dmd2" else 350_000,
                   log_every=100, ckpt_every=5000, sample_every=5000, num_grid_samples=64)
    c.sample.update(sampler="generator", num_steps=1)
    c.eval.update(num_samples=50_000, batch_size=500)
    return c
