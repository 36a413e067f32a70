"""CTM on the embedded digits from an EDM teacher trained with configs/edm_digits.py.

python run.py --config=configs/edm_digits.py --workdir=/tmp/edm_digits        # the teacher
python run.py --config=configs/ctm_digits.py --workdir=/tmp/ctm_digits \
  --config.teacher.checkpoint=/tmp/edm_digits
"""
from jaxdistill.config import base_config
from jaxdistill.methods.ctm_config import method_config
from jaxdistill.networks import presets


def get_config():
    c = base_config()
    c.method = method_config(eval_emas=(0.999,), distance="l2")
    teacher_net = dict(name="songunet", **presets.tiny_songunet(img_resolution=16, in_channels=1,
                                                                label_dim=10))
    teacher_net["label_dropout"] = 0.1
    c.teacher.kind = "checkpoint"
    c.teacher.network = teacher_net
    c.network = dict(teacher_net, s_embedding=True, label_dropout=0.0)
    c.data.update(name="digits", resolution=16)
    c.model.update(shape=(16, 16, 1), label_dim=10)
    c.optim.update(lr=1e-3, lr_rampup_images=0)
    c.train.update(batch_size=64, num_steps=1000, log_every=100, ckpt_every=500,
                   sample_every=1000, num_grid_samples=100)
    c.sample.update(sampler="gamma", num_steps=1, gamma=0.0)
    c.eval.update(num_samples=512, batch_size=256)
    return c
