"""EDM teacher on the image-shaped mixture (one Gaussian per digit class, 8x8x1, exact teacher).

python run.py --config=configs/edm_image_mixture.py --workdir=/tmp/edm_imix
"""
from jaxdistill.config import base_config
from jaxdistill.networks import presets


def get_config():
    c = base_config()
    c.data.update(name="image_mixture", resolution=8, std=0.2)
    c.model.update(shape=(8, 8, 1), label_dim=0)
    c.network = dict(name="songunet", **presets.tiny_songunet(img_resolution=8, in_channels=1))
    c.optim.lr = 2e-3
    c.optim.lr_rampup_images = 64 * 100
    c.ema.halflife_images = 64 * 150
    c.train.update(batch_size=64, num_steps=1500, log_every=100, ckpt_every=500,
                   sample_every=750, num_grid_samples=100)
    c.eval.update(num_samples=1024, batch_size=512)
    return c
