"""DMD2 distilling the exact teacher of the image mixture (one Gaussian per digit class, 8x8x1)
into a one-step MLP generator over the 64 pixels (CPU, minutes).

python run.py --config=configs/dmd2_image_mixture.py --workdir=/tmp/dmd2_imix
"""
from jaxdistill.config import base_config
from jaxdistill.methods.dmd2_config import method_config, optim_config


def get_config():
    c = base_config()
    c.method = method_config(tsm_steps=1000, guidance_lr=5e-4, distance="l2")
    c.teacher.kind = "analytic"
    c.data.update(name="image_mixture", resolution=8, std=0.2)
    c.model.update(shape=(8, 8, 1), label_dim=0)
    c.network = dict(name="mlp", dim=64, hidden=256, depth=4, embed=64)
    c.optim.update(optim_config(batch_size=256, lr=5e-4, warmup_updates=50))
    c.train.update(batch_size=256, num_steps=6000, log_every=500, ckpt_every=2000,
                   sample_every=6000, num_grid_samples=100)
    c.sample.update(sampler="generator", num_steps=1)
    c.eval.update(num_samples=1024, batch_size=512)
    return c
