"""megabatch: extremely large minibatch training for image classifiers.

Reproduces Akiba et al. 2017 (ResNet-50 on ImageNet in 15 minutes with a 32k
minibatch): RMSprop warm-up, slow-start learning rate, batch normalization
without moving averages and fp16 gradient all-reduce, on a real cluster or with
thousands of workers emulated exactly on one device.
"""

__version__ = "0.1.0"
