"""Import trained PyTorch diffusion networks as jaxdistill teachers.

`edm_pickle` converts official EDM network pickles (NVlabs/edm; SiD's released generators use the
same format) and DMD2's ImageNet-64 generator state dict into a teacher run directory for
`config.teacher.kind='checkpoint'`; `torch_pickle` reads the files without running code stored in
them.  Reading needs torch (`pip install 'jaxdistill[convert]'`), which is imported only when a file
is read: importing jaxdistill or this package does not import torch.
"""
