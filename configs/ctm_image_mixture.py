"""CTM distilling the exact teacher of the image mixture (one Gaussian per digit class, 8x8x1)
into a tiny DDPM++ student: the README quickstart (a few minutes on a 2-core CPU).

python run.py --config=configs/ctm_image_mixture.py --workdir=/tmp/ctm_imix
"""
from jaxdistill.config import base_config
from jaxdistill.methods.ctm_config import method_config
from jaxdistill.networks import presets


def get_config():
    c = base_config()
    c.method = method_config(eval_emas=(0.999,))
    c.teacher.kind = "analytic"
    c.data.update(name="image_mixture", resolution=8, std=0.2)
    c.model.update(shape=(8, 8, 1), label_dim=0)
    c.network = dict(name="songunet", s_embedding=True,
                     **presets.tiny_songunet(img_resolution=8, in_channels=1))
    c.optim.update(lr=1e-3, lr_rampup_images=0)
    c.train.update(batch_size=64, num_steps=1000, log_every=100, ckpt_every=500,
                   sample_every=1000, num_grid_samples=100)
    c.sample.update(sampler="gamma", num_steps=1, gamma=0.0)
    c.eval.update(num_samples=1024, batch_size=512)
    return c
