"""EDM teacher on the 2-D ring mixture (exact teacher known): ~1 minute on a 2-core CPU.

python run.py --config=configs/edm_mixture2d.py --workdir=/tmp/edm2d
"""
from jaxdistill.config import base_config


def get_config():
    c = base_config()
    c.model.shape = (2,)
    c.network = dict(name="mlp", dim=2, hidden=128, depth=3, embed=64)
    c.data.name = "mixture2d"
    c.optim.lr = 2e-3
    c.optim.lr_rampup_images = 256 * 100
    c.ema.halflife_images = 256 * 200
    c.train.update(batch_size=256, num_steps=3000, log_every=250, ckpt_every=1000,
                   sample_every=1500, num_grid_samples=4096)
    c.eval.update(num_samples=4096, batch_size=4096)
    return c
