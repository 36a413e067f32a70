"""MSD on the class-conditional image mixture (one Gaussian per digit class, 8x8x1): 4 small MLP
students owning classes {0,1,2}, {3,4,5}, {6,7}, {8,9} (a given partition), distilled with DMD2 from
the exact conditional teacher (CPU, minutes).

python run.py --config=configs/msd_image_mixture.py --workdir=/tmp/msd_imix
"""
from jaxdistill.config import base_config
from jaxdistill.methods.dmd2_config import method_config, optim_config


def get_config():
    c = base_config()
    c.method = method_config(tsm_steps=1000, guidance_lr=5e-4, distance="l2")
    c.method.update(name="msd", num_students=4, partition=((0, 1, 2), (3, 4, 5), (6, 7), (8, 9)))
    c.teacher.kind = "analytic"
    c.data.update(name="image_mixture", resolution=8, std=0.2)
    c.model.update(shape=(8, 8, 1), label_dim=10)
    c.network = dict(name="mlp", dim=64, hidden=32, depth=2, embed=32, label_dim=10)
    c.optim.update(optim_config(batch_size=256, lr=5e-4, warmup_updates=50))
    c.train.update(batch_size=256, num_steps=4000, log_every=500, ckpt_every=2000,
                   sample_every=4000, num_grid_samples=100)
    c.sample.update(sampler="generator", num_steps=1)
    c.eval.update(num_samples=1024, batch_size=512)
    return c
