"""loco: low-communication decentralized training.

Inside a site, ranks train on a ZeRO-sharded engine over torch.distributed; between sites,
every H inner steps each site averages with one random partner over gRPC (NoLoCo).
"""

__version__ = "0.1.0"
