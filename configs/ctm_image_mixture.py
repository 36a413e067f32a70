"""CTM distilling the exact teacher of the image mixture (one Gaussian per digit class, 8x8x1)
into an MLP student over the 64 pixels: the README quickstart (a few minutes on a 2-core CPU).
A U-Net student works the same way (`--config.network` with name songunet and s_embedding) but
trains far slower on a CPU.

python run.py --config=configs/ctm_image_mixture.py --workdir=/tmp/ctm_imix
"""
from jaxdistill.config import base_config
from jaxdistill.methods.ctm_config import method_config


def get_config():
    c = base_config()
    c.method = method_config(eval_emas=(0.999,))
    c.teacher.kind = "analytic"
    c.data.update(name="image_mixture", resolution=8, std=0.2)
    c.model.update(shape=(8, 8, 1), label_dim=0)
    c.network = dict(name="mlp", dim=64, hidden=256, depth=4, embed=64, s_embedding=True)
    c.optim.update(lr=5e-4, lr_rampup_images=0)
    c.train.update(batch_size=256, num_steps=6000, log_every=500, ckpt_every=2000,
                   sample_every=6000, num_grid_samples=100)
    c.sample.update(sampler="gamma", num_steps=1, gamma=0.0)
    c.eval.update(num_samples=1024, batch_size=512)
    return c
