"""Prune torchvision's ImageNet ResNet-50 with DSF (or a baseline) and fine-tune it; ``--help`` for everything.

    python recipes/resnet50_imagenet.py --data-dir /data/imagenet --density 0.1 --devices 8

The logic lives in :mod:`dsf_lightning.recipes.vision` (``resnet50_main``); ``--print-config`` shows a
run's config as YAML and ``--config FILE.yaml`` reads one back.
"""

import sys

from dsf_lightning.recipes import resnet50_main

if __name__ == "__main__":
    sys.exit(resnet50_main())
