"""Prune a CIFAR ResNet-20 with DSF (or a baseline) and fine-tune it; ``--help`` for everything.

    python recipes/resnet20_cifar10.py                                   # offline digits default
    python recipes/resnet20_cifar10.py --dataset cifar10 --data-dir data --download --width 32

The logic lives in :mod:`dsf_lightning.recipes.vision` (``resnet20_main``); ``--print-config`` shows a
run's config as YAML and ``--config FILE.yaml`` reads one back.
"""

import sys

from dsf_lightning.recipes import resnet20_main

if __name__ == "__main__":
    sys.exit(resnet20_main())
