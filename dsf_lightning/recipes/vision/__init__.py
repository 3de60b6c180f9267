"""The vision recipes (``recipes/resnet20_cifar10.py``, ``recipes/resnet50_imagenet.py``): config beside run."""
