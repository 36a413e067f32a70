"""EDM teacher on ImageNet-64, class-conditional ADM (Karras et al. 2022; NVlabs/edm README:
--arch=adm --duration=2500 --batch=4096 --lr=1e-4 --ema=50 --dropout=0.10 --augment=0 --fp16=1).

DhariwalUNet (295.9M params), batch 4096, Adam lr 1e-4 with a 10 Mimg warm-up, EMA half-life
50 Mimg, 2500 Mimg (610,351 steps); sampler Heun, 40 steps (79 NFE, deterministic). EDM's
stochastic ImageNet-64 setting is `--config.sample.num_steps=256 --config.sample.s_churn=40
--config.sample.s_min=0.05 --config.sample.s_max=50 --config.sample.s_noise=1.003`.

python run.py --config=configs/edm_imagenet64.py --workdir=gs://bucket/edm_in64 \
  --config.data.data_dir=/path/to/tensorflow_datasets
"""
from jaxdistill.config import base_config
from jaxdistill.networks import presets


def get_config():
    c = base_config()
    c.data.update(name="imagenet64", random_flip=False)
    c.model.update(shape=(64, 64, 3), label_dim=1000)
    c.network = dict(name="dhariwal", **presets.adm_imagenet64(label_dim=1000))
    c.network.dropout = 0.10
    c.optim.update(lr=1e-4, lr_rampup_images=10_000_000)
    c.ema.update(halflife_images=50_000_000, rampup_ratio=0.05)
    c.train.update(batch_size=4096, num_steps=2_500_000_000 // 4096, log_every=100,
                   ckpt_every=2000, sample_every=5000, num_grid_samples=64)
    c.sample.update(sampler="heun", num_steps=40)
    c.eval.update(num_samples=50_000, batch_size=500)
    return c
