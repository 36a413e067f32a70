"""MSD on a class-conditional 2-D ring (one class per mode): 4 students, each owning 2 classes,
distilled with DMD2 from the exact conditional teacher (CPU).

python run.py --config=configs/msd_mixture2d.py --workdir=/tmp/msd_2d
A single student of the same size at the same total steps: configs/dmd2_mixture2d.py with
--config.model.label_dim=8 and the same network (see tests/test_dmd2.py and the README table).
"""
from jaxdistill.config import base_config
from jaxdistill.methods.dmd2_config import method_config, optim_config


def get_config():
    c = base_config()
    c.method = method_config(tsm_steps=500, guidance_lr=1e-3, distance="l2")
    c.method.update(name="msd", num_students=4, partition=())
    c.teacher.kind = "analytic"
    c.data.name = "mixture2d"
    c.model.update(shape=(2,), label_dim=8)
    c.network = dict(name="mlp", dim=2, hidden=32, depth=2, embed=32, label_dim=8)
    c.optim.update(optim_config(batch_size=256, lr=1e-3, warmup_updates=50))
    c.train.update(batch_size=256, num_steps=3000, log_every=250, ckpt_every=1000,
                   sample_every=1500, num_grid_samples=4096)
    c.sample.update(sampler="generator", num_steps=1)
    c.eval.update(num_samples=4096, batch_size=4096)
    return c
