"""MSD on ImageNet-64: 4 students of 250 consecutive classes each, distilled with DMD2 from the EDM
ADM teacher (Song et al. 2024, arXiv 2410.23274: FID 1.20 with 4 same-size students, DM + GAN).

Per student the DMD2 ImageNet recipe (configs/dmd2_imagenet64.py); the global batch 280 is split
evenly, so 4 students cost what one DMD2 generator costs. `:small` builds 4 students of a smaller
ADM (channels 128, 2 blocks per level; the paper's exact small architecture is not public) that
start with teacher score matching (TSM) since they cannot copy the teacher's weights.

Needs --config.teacher.checkpoint (converted edm-imagenet-64x64-cond-adm.pkl) and
--config.data.data_dir (tfds imagenet_resized/64x64).
"""
from jaxdistill.config import base_config
from jaxdistill.methods.dmd2_config import method_config, optim_config
from jaxdistill.networks import presets


def get_config(arg: str = "same"):
    if arg not in ("same", "small"):
        raise ValueError(f"configs/msd_imagenet64.py:ARG takes same or small, got {arg!r}")
    c = base_config()
    c.method = method_config(tsm_steps=0 if arg == "same" else 20_000)
    c.method.update(name="msd", num_students=4, partition=())
    teacher_net = dict(name="dhariwal", **presets.adm_imagenet64(label_dim=1000))
    c.teacher.kind = "checkpoint"
    c.teacher.network = teacher_net
    c.network = dict(teacher_net, dropout=0.0)
    if arg == "small":
        c.network.update(model_channels=128, num_blocks=2)
    c.data.update(name="imagenet64", random_flip=False)
    c.model.update(shape=(64, 64, 3), label_dim=1000)
    c.optim.update(optim_config(batch_size=280, lr=2e-6))
    c.train.update(batch_size=280, num_steps=200_000, log_every=100, ckpt_every=5000,
                   sample_every=5000, num_grid_samples=64)
    c.sample.update(sampler="generator", num_steps=1)
    c.eval.update(num_samples=50_000, batch_size=500)
    return c
