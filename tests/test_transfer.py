"""Transfer learning: loading pretrained weights (head re-init, channel adaptation, clear errors), linear probe,
full fine-tuning with two learning rates, gradual unfreezing, the transfer configs and DDP, on tiny real subsets."""

from tests.conftest import needs_fashion_mnist

pytestmark = needs_fashion_mnist
HEAD = ("fc.weight", "fc.bias")  # LeNet-5's classifier
