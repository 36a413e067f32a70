"""EDM teacher on scikit-learn's embedded 8x8 digits, upsampled to 16x16, class-conditional.

A few minutes on a 2-core CPU (the README quickstart):
python run.py --config=configs/edm_digits.py --workdir=/tmp/edm_digits
"""
from jaxdistill.config import base_config
from jaxdistill.networks import presets


def get_config():
    c = base_config()
    c.data.update(name="digits", resolution=16)
    c.model.update(shape=(16, 16, 1), label_dim=10)
    c.network = dict(name="songunet", **presets.tiny_songunet(img_resolution=16, in_channels=1,
                                                              label_dim=10))
    c.network.label_dropout = 0.1
    c.optim.lr = 2e-3
    c.optim.lr_rampup_images = 64 * 100
    c.ema.halflife_images = 64 * 150
    c.train.update(batch_size=64, num_steps=1500, log_every=100, ckpt_every=500,
                   sample_every=750, num_grid_samples=100)
    c.sample.num_steps = 18
    c.eval.update(num_samples=512, batch_size=256)
    return c
