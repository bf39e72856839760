"""A PyTorch twin of the reference WRN (wetliu/energy_ood CIFAR/models/wrn.py), written
from the paper's description, for parity tests and benchmarks (needs torch): pre-activation
blocks whose 1x1 shortcut, where channels change, reads relu(bn1(x))."""

import torch
from torch import nn
import torch.nn.functional as F


class TwinBlock(nn.Module):
  """Pre-activation basic block (bn-relu-conv-bn-relu-dropout-conv + shortcut)."""

  def __init__(self, cin, cout, stride, drop):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.drop = drop
    self.same = cin == cout
    if not self.same:
      self.convShortcut = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

  def forward(self, x):
    pre = F.relu(self.bn1(x))
    h = F.relu(self.bn2(self.conv1(pre)))
    h = F.dropout(h, self.drop, self.training)
    h = self.conv2(h)
    return (x if self.same else self.convShortcut(pre)) + h


class TwinGroup(nn.Module):
  """``n`` blocks; the first may change channels and stride."""

  def __init__(self, n, cin, cout, stride, drop):
    super().__init__()
    self.layer = nn.Sequential(*[TwinBlock(cin if i == 0 else cout, cout,
                                           stride if i == 0 else 1, drop) for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class TwinWRN(nn.Module):
  """WRN-depth-widen for NCHW 32x32 inputs; state_dict keys as the reference's."""

  def __init__(self, depth, num_classes, widen, drop=0.0):
    super().__init__()
    n = (depth - 4) // 6
    c = [16, 16 * widen, 32 * widen, 64 * widen]
    self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
    self.block1 = TwinGroup(n, c[0], c[1], 1, drop)
    self.block2 = TwinGroup(n, c[1], c[2], 2, drop)
    self.block3 = TwinGroup(n, c[2], c[3], 2, drop)
    self.bn1 = nn.BatchNorm2d(c[3])
    self.fc = nn.Linear(c[3], num_classes)

  def features(self, x):
    """Penultimate features ``avgpool(relu(bn1(h)))``, ``[N, 64 * widen]``."""
    h = self.block3(self.block2(self.block1(self.conv1(x))))
    return F.adaptive_avg_pool2d(F.relu(self.bn1(h)), 1).flatten(1)

  def forward(self, x):
    return self.fc(self.features(x))


def randomize_batchnorm(net, generator):
  """Non-trivial affine parameters and running statistics in every BatchNorm."""
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5, generator=generator)
        m.bias.uniform_(-0.2, 0.2, generator=generator)
        m.running_mean.uniform_(-0.3, 0.3, generator=generator)
        m.running_var.uniform_(0.5, 2.0, generator=generator)
  return net
