"""CTM distilling the exact teacher of the 2-D ring mixture into an MLP student (CPU, ~2 min).

python run.py --config=configs/ctm_mixture2d.py --workdir=/tmp/ctm2d
"""
from jaxdistill.config import base_config
from jaxdistill.methods.ctm_config import method_config


def get_config():
    c = base_config()
    c.method = method_config(eval_emas=(0.999,))
    c.teacher.kind = "analytic"
    c.data.name = "mixture2d"
    c.model.shape = (2,)
    c.network = dict(name="mlp", dim=2, hidden=128, depth=3, embed=64, s_embedding=True)
    c.optim.update(lr=1e-3, lr_rampup_images=0)
    c.train.update(batch_size=256, num_steps=3000, log_every=250, ckpt_every=1000,
                   sample_every=1500, num_grid_samples=4096)
    c.sample.update(sampler="gamma", num_steps=1, gamma=0.0)
    c.eval.update(num_samples=4096, batch_size=4096)
    return c
