"""EDM config F teacher on CIFAR-10 (Karras et al. 2022; NVlabs/edm train.py defaults).

DDPM++ SongUNet (55.7M params), batch 512, Adam lr 1e-3 with a 10 Mimg warm-up, EMA half-life
0.5 Mimg (ramp-up ratio 0.05), dropout 0.13, 200 Mimg (390,625 steps); sampler Heun, 18 steps
(35 NFE). `--config=configs/edm_cifar10.py:cond` trains the class-conditional model.
EDM's non-leaking augmentation pipe (augment p = 0.12) is not implemented here: the network keeps
augment_dim = 9 (so parameter counts and converted checkpoints match) and trains with no
augmentation labels, which EDM itself does at p = 0.

python run.py --config=configs/edm_cifar10.py --workdir=gs://bucket/edm_cifar10 \
  --config.data.data_dir=/path/to/tensorflow_datasets
"""
from jaxdistill.config import base_config
from jaxdistill.networks import presets


def get_config(arg: str = "uncond"):
    if arg not in ("uncond", "cond"):
        raise ValueError(f"configs/edm_cifar10.py:ARG takes uncond or cond, got {arg!r}")
    label_dim = 10 if arg == "cond" else 0
    c = base_config()
    c.data.update(name="cifar10", random_flip=False)
    c.model.update(shape=(32, 32, 3), label_dim=label_dim)
    c.network = dict(name="songunet", **presets.ddpmpp_cifar10(label_dim=label_dim, augment_dim=9))
    c.network.dropout = 0.13
    c.optim.update(lr=1e-3, lr_rampup_images=10_000_000)
    c.ema.update(halflife_images=500_000, rampup_ratio=0.05)
    c.train.update(batch_size=512, num_steps=200_000_000 // 512, log_every=100, ckpt_every=5000,
                   sample_every=5000, num_grid_samples=64)
    c.sample.update(sampler="heun", num_steps=18)
    c.eval.update(num_samples=50_000, batch_size=500)
    return c
